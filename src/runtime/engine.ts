/**
 * @module The device scheduler on the main thread: pipeline workers, a bounded queue, dynamic batching.
 *
 *   submit() ──► pending (≤ MAX_QUEUE) ──► pump() ──► batch of compatible tasks (≤ MAX_BATCH_SIZE images)
 *                    │ client left: removed              │ texts → token ids here; idle worker: one generation at a time
 *                    ▼                                   ▼
 *               CANCELLED                       worker thread (ORT sessions) ──► raw pixels (worker free again)
 *                                                                                  ▼
 *                                                        sharp encodes on its own threads ──► results split per task
 *
 * A worker that dies (an uncaught error, a crash of its thread) fails the generation it held (WORKER_DIED, 500) and,
 * once it had loaded the whole model, is started again with its sessions (a load of the same folder), with a backoff
 * when it keeps dying. While no worker can run, queued and new requests get WORKER_RESTARTING (503) and onServing
 * tells the runtime, which reports not-ready. During SIGTERM's drain it is not started again, and the requests no
 * worker is left for, queued or to come, get SHUTTING_DOWN.
 */
import path from 'node:path';
import type { Worker } from 'node:worker_threads';
import type { Config, OutputFormat } from '../config.js';
import { LIMIT_ADVICE, shortage, shortageError, type Shortage } from '../descriptors.js';
import { RuntimeError, isRuntimeError } from '../errors.js';
import { batchIds, type Logger } from '../log.js';
import { REJECT_REASONS, type Metrics, type RejectReason } from '../metrics.js';
import { encodeImage } from '../pipeline/image.js';
import { ClipTokenizer, type Cleaned } from '../pipeline/tokenizer.js';
import type { AdapterSet, ModelDefaults, StageTimes } from '../pipeline/job.js';
import type { OptimizeItem } from '../pipeline/ortcache.js';
import type { FromWorker, ToWorker, TransferImage } from '../pipeline/protocol.js';
import { onGpu, type SessionProvider } from '../pipeline/provider.js';
import { LORA_SETS } from '../storage/cache.js';
import { generationsChanged, mappedWeightsHint, type InFlight, type InFlightNow } from '../termination.js';
import { spawnWorker, spawnWorkers, workerDevice, type SpawnedWorker } from './workers.js';
import { lorasKey, shapeKey, type GenerationRequest, type LoraRequest } from './request.js';
import { imageKey, jobInit } from './image-request.js';
import { AdapterSource } from './adapters.js';
import type { BootEventMap } from './boot-events.js';

export interface Progress {
  step: number;
  of: number;
  preview?: Buffer;
}

export interface EncodedImage {
  data: ArrayBuffer;
  seed: number;
  width: number;
  height: number;
  format: OutputFormat;
}

/** The worker's stage times plus the encoding of the batch's images on this thread. */
export interface RunTimes extends StageTimes {
  encodeMs: number;
}

export interface TaskResult {
  images: EncodedImage[];
  times: RunTimes;
  /** Requests in the generation batch; 0 for a result-cache hit. */
  batchSize: number;
  queuedMs: number;
  /** Answered from the result cache, without a generation. */
  cached?: boolean;
  /** With output_uri: where each image was stored, in order (the reply carries these instead of bytes). */
  uris?: string[];
}

export interface SubmitOptions {
  signal?: AbortSignal;
  onProgress?: (p: Progress) => void;
  /** The request is in the queue: it passed every check that could refuse it before its generation. */
  onQueued?: () => void;
  /** Run on this worker (its index) and alone: the warm-up of each worker. */
  worker?: number;
  /**
   * The client request this generation is one of (V1's instances, V2's prompts, …; the same object for each): MAX_QUEUE
   * and the queue depth count requests, so a request of several instances waits as one. Default: a request of its own.
   */
  request?: object;
  /**
   * The request was in flight before stopAccepting() (reading its input images): queued all the same, until close().
   * SIGTERM's drain waits for it; refused once read, it would only have been made to wait for a 503.
   */
  admitted?: boolean;
  /**
   * This generation's images for others (the result cache, identical requests joined to it), or why none will come:
   * called once, whatever happens, as the images are handed out. A client that leaves or times out once the batch
   * runs is answered at once, but the images the batch still makes for it are encoded and handed here.
   */
  onMade?: (out: EncodedImage[] | Error) => void;
  /**
   * The identical requests joined to this generation (generation.ts), waiting for its images: while any waits, a
   * generation whose clients left goes on with its LoRA adapters' look-up, keeps its place in the queue, or its batch
   * runs on if all of its clients left, or it runs again alone if its batch ran out of memory (the clients are answered
   * all the same). Once the last of them leaves, joinersLeft() stops the look-up, takes it out or stops it.
   */
  joined?: Joined;
  /**
   * The engine holds the generation no more: it finished, failed or left the queue, or was never queued. Called once,
   * whatever happens; where it ran on after its client was answered (for the requests joined to it, or for the rest of
   * its batch), only once it ends. What it uses (the request's decoded input images) may be given back then.
   */
  onEnded?: () => void;
}

/** Requests waiting for another's generation (SubmitOptions.joined). */
export interface Joined {
  readonly count: number;
  /** Those of them that stream its previews (their preview_every is the generation's). */
  readonly previews: number;
}

interface Task {
  req: GenerationRequest;
  /** SubmitOptions.request. */
  request: object;
  key: string;
  images: number;
  enqueuedAt: number;
  signal: AbortSignal | undefined;
  onProgress: ((p: Progress) => void) | undefined;
  resolve: (r: TaskResult) => void;
  reject: (e: unknown) => void;
  /** 'done': its client is answered, though its generation may run on for the requests joined to it (`joined`). */
  state: 'queued' | 'running' | 'done';
  onAbort?: () => void;
  /** The LoRA adapter set, when the request names adapters (its key is part of `key`: sets never share a batch). */
  adapters?: AdapterSet;
  /** Only this worker may run it (SubmitOptions.worker). */
  pin?: number;
  /** Runs in a batch of its own: the batch it shared ran out of memory. */
  alone?: boolean;
  /** The run it is (or was last) part of: a batch run again leaves the previews the failed run had queued behind. */
  runId?: number;
  /** SubmitOptions.onMade, until called. */
  made?: (out: EncodedImage[] | Error) => void;
  /** SubmitOptions.joined. */
  joined?: Joined;
  /** SubmitOptions.onEnded, until called. */
  ended?: () => void;
}

interface Running {
  id: number;
  tasks: Task[];
  startedAt: number;
  /** Previews and the result are encoded and handed out in the order the worker sent them. */
  delivery: Promise<void>;
  /** The worker running it, as metric labels. */
  where: { worker: string; device: string };
  /**
   * The warm-up of its worker (its one task is pinned there): timed by the boot (boot_phase_seconds{phase="warming"}),
   * not counted in the serving metrics, where the first run on a device (kernel choice, allocations) would be taken for
   * a request's and the boot's image for one served.
   */
  warmup: boolean;
  /** Every client left and the worker was told to stop it. */
  cancelled?: boolean;
  /** Its steps render previews: its preview_every, while some client of it or request joined to it wants them. */
  previews: boolean;
  /** UNet runs done so far (its last progress): what denoising_steps_total counts of a run that ends without a result. */
  unetRuns?: number;
  /** Of how many (its last progress). */
  unetOf?: number;
}

interface LoadWaiter {
  resolve: (r: LoadResult) => void;
  reject: (e: unknown) => void;
  left: number;
  settled?: boolean;
  result?: LoadResult;
  /** A load of the whole model (no `listed`): the worker then has every session, and is worth starting again. */
  whole: boolean;
}

class WorkerHandle {
  /** The batch whose UNet steps run on the worker now. */
  running: Running | undefined;
  /** Batches past their UNet steps whose VAE decodes run on the worker's decode thread (at most one, see #pump). */
  decoding: Running[] = [];
  loaded = false;
  /** LoRA adapter sets this worker is building or holds. */
  readonly sets = new Map<string, 'loading' | 'ready'>();
  /** Answered a load of the whole model: if it dies now, it is started again. */
  whole = false;
  dead = false;
  /** Why it died: what a load sent to it after its death fails with. */
  death: RuntimeError | undefined;
  /** The loads sent to this worker and not answered yet, in order (a worker answers its loads in order). */
  readonly loads: LoadWaiter[] = [];
  /** When it was last given a batch (least-busy dispatch prefers the worker idle longest). */
  dispatchedAt = 0;
  /** Its UNet's provider since its last load: a CPU fallback's memory is the host's, not the GPU's. */
  provider: SessionProvider | undefined;
  constructor(
    readonly worker: Worker,
    readonly index: number,
    /** Metric label: `cuda:N` or `cpu`. */
    readonly device: string,
  ) {}
  send(m: ToWorker): void {
    this.worker.postMessage(m);
  }
}

export interface LoadResult {
  defaults: ModelDefaults;
  providers: Record<string, SessionProvider>;
  fallbackReason?: string;
  /** Optimised-model copies worth writing after ready (the first worker's list; every worker loads the same files). */
  optimize: OptimizeItem[];
}

export interface EngineEvents {
  onSession?(component: string, provider: string, ms: number, optimizedCache: string, thread: string): void;
  onImported?(ms: number, randn: string): void;
  /**
   * Whether some worker can run a generation changed after a worker died: false (with why) while none can, true once
   * a worker started again has loaded the model.
   */
  onServing?(serving: boolean, reason: string): void;
  /** A worker merged an adapter set; `waitedMs` counts from the first request that asked for it. */
  onAdapters?(d: BootEventMap['adapters-ready']): void;
}

/**
 * Texts whose token ids Engine.encodeText keeps (a default queue's 32 requests, prompt and negative, twice over); one
 * evicted before its dispatch is encoded again. At most ~2.5 MB of 10,000-character prompts.
 */
const ENCODED_TEXTS = 128;

/** Restarts of a worker that keeps dying wait 0.5 s, 1 s, 2 s, … up to this; a worker alive this long resets it. */
const RESPAWN_MAX_MS = 30_000;
const RESPAWN_RESET_MS = 60_000;

/**
 * The batches `pending` makes at the least, as #pump forms them: tasks of one key share batches of up to `max` images
 * (a task of more runs alone, a full batch); a task pinned to a worker or run alone takes one of its own.
 */
function queuedBatches(pending: readonly Task[], max: number): number {
  const images = new Map<string, number>();
  let own = 0;
  for (const t of pending) {
    if (t.pin !== undefined || t.alone) own++;
    else images.set(t.key, (images.get(t.key) ?? 0) + Math.min(t.images, max));
  }
  for (const n of images.values()) own += Math.ceil(n / max);
  return own;
}

export class Engine {
  readonly #workers: WorkerHandle[] = [];
  readonly #pending: Task[] = [];
  #nextId = 1;
  /** stopAccepting() or close(): no new work. */
  #closing = false;
  /** close(): none at all, admitted or not. */
  #closed = false;
  #windowTimer: NodeJS.Timeout | undefined;
  #defaults: ModelDefaults | undefined;
  readonly #labels: { model_name: string };
  #idleWaiters: Array<() => void> = [];
  /** Tokenizer parses by folder (main thread), and the loaded model's tokenizers in order. */
  readonly #tokenizers = new Map<string, Promise<ClipTokenizer>>();
  /** Components announced whole since the last reset (componentReady), for a worker started again mid-boot. */
  readonly #components = new Map<string, string>();
  #active: ClipTokenizer[] = [];
  /**
   * The latest texts' ids (encodeText), the one cache of encoded texts: a seeded request is encoded for its result-cache
   * key, then again when its batch is dispatched, and a body may repeat a prompt. A 10,000-character word takes 10–50 ms
   * per tokenizer (BENCHMARKS.md), and SDXL has two.
   */
  #encoded = new Map<string, number[][]>();
  /** Batches the workers have finished whose images are still being encoded here. */
  #encoding = 0;
  readonly #adapters: AdapterSource;
  /** When each adapter set was first asked for, to report how long requests waited for its sessions. */
  readonly #setAsked = new Map<string, number>();
  /** Stops the look at the cache volume kept while an adapter set is built (#watchSets). */
  #setWatch: AbortController | undefined;
  /** The folder of the last load of the whole model: what a worker started again loads. */
  #wholeDir: string | undefined;
  /** Workers being started again (their restart is scheduled or their load not answered yet). */
  readonly #restarting = new Set<number>();
  readonly #restartTimers = new Set<NodeJS.Timeout>();
  /** Per worker index: consecutive restarts, and when the last one started. */
  readonly #restarts = new Map<number, { n: number; at: number }>();
  #serving = true;
  /** Requests refused already (SubmitOptions.request): inference_rejected_total counts each once. */
  readonly #refused = new WeakSet<object>();
  /** The errors #submit refused with, and why: what a request joined to a refused generation is told (refusedWith). */
  readonly #refusals = new WeakMap<Error, RejectReason>();
  /**
   * The adapters of each generation that identical requests may join (SubmitOptions.joined) while they are looked up;
   * `stop` once its client left while such requests wait: the look-up goes on for them, and stops once the last of
   * them leaves (joinersLeft).
   */
  readonly #lookingUp = new Map<Joined, { readonly loras: readonly LoraRequest[]; stop?: AbortController }>();
  /** What the workers run, for the termination message: read only when it is written (about once a second at most). */
  readonly #inFlight = (): InFlightNow => ({
    generations: this.#workers.flatMap((w) => runsOf(w).map((r) => inFlightOf(w, r))),
    queued: this.queueDepth,
  });

  constructor(
    private readonly cfg: Readonly<Config>,
    private readonly log: Logger,
    private readonly metrics: Metrics,
    private readonly events: EngineEvents = {},
  ) {
    this.#labels = { model_name: cfg.modelName };
    this.#adapters = new AdapterSource(cfg, log, () => metrics.s3Throttled.inc({ ...this.#labels, operation: 'lora_download' }),
      { requests: (outcome) => metrics.s3Requests.inc({ ...this.#labels, operation: 'lora_download', outcome }) });
    this.#startAtZero();
  }

  /**
   * The series whose labels are known before anything happens, at 0. A counter that first appears at 1 (the first
   * rejection, cancellation or out-of-memory of a pod) is missed by rate() and increase(), which need a sample before it.
   */
  #startAtZero(): void {
    const l = this.#labels;
    for (const reason of REJECT_REASONS) this.metrics.rejected.inc({ ...l, reason }, 0);
    for (const reason of CANCEL_REASONS) this.metrics.cancelled.inc({ ...l, reason }, 0);
    for (const outcome of ['split', 'failed']) this.metrics.outOfMemory.inc({ ...l, outcome }, 0);
    // The stages every generation has (vae_encoder: image inputs only).
    for (const stage of ['text_encoder', 'denoise', 'vae_decoder', 'encode']) this.metrics.stageDuration.zero({ ...l, stage });
    this.metrics.batchSize.zero(l);
    this.metrics.adapterLoad.zero(l);
    this.metrics.steps.inc(l, 0);
    this.metrics.images.inc(l, 0);
    this.metrics.previews.inc(l, 0);
    this.metrics.queueDepth.set(l, 0);
  }

  get defaults(): ModelDefaults | undefined {
    return this.#defaults;
  }
  /** Requests waiting for a worker (a request of several instances counts once, as MAX_QUEUE counts it). */
  get queueDepth(): number {
    return new Set(this.#pending.map((t) => t.request)).size;
  }
  get busy(): number {
    return this.#workers.filter((w) => w.running || w.decoding.length > 0).length;
  }

  /** Spawns the workers (unless `main` did); each starts importing onnxruntime-node at once. */
  start(prespawned?: SpawnedWorker[]): void {
    if (this.#workers.length > 0) return;
    for (const [i, sw] of (prespawned ?? spawnWorkers(this.cfg)).entries()) this.#adopt(sw, i);
  }

  /** Whether some worker has the model loaded and can run a generation. */
  get serving(): boolean {
    return this.loadedWorkers > 0;
  }
  /** Workers alive with the model loaded. */
  get loadedWorkers(): number {
    return this.#workers.filter((w) => w.loaded && !w.dead).length;
  }
  /** The indexes of the workers (one per GPU by default), for work every worker must do once (the warm-up). */
  get workerIndexes(): number[] {
    return this.#workers.map((w) => w.index);
  }

  /** worker_busy follows whether the worker holds a batch (stepping or decoding). */
  #deviceBusy(w: WorkerHandle): void {
    this.metrics.workerBusy.set({ ...this.#labels, worker: String(w.index), device: w.device }, w.running || w.decoding.length > 0 ? 1 : 0);
  }

  #adopt(sw: SpawnedWorker, index: number): WorkerHandle {
    const device = workerDevice(this.cfg, index);
    const h = new WorkerHandle(sw.worker, index, device === undefined ? 'cpu' : `cuda:${device}`);
    const where = { ...this.#labels, worker: String(index), device: h.device };
    this.metrics.workerBusy.set(where, 0);
    this.metrics.workerImages.inc(where, 0);
    this.metrics.workerDeaths.inc(where, 0);
    sw.attach(
      (m) => this.#onMessage(h, m),
      (err) => this.#onWorkerDeath(h, err.message, shortage(err)),
      (code) => this.#onWorkerDeath(h, `exit code ${code}`),
    );
    this.#workers[index] = h;
    return h;
  }

  /** A component's files are whole: its session can be created while other files still download. */
  componentReady(component: string, path: string): void {
    this.componentAnnounced(component, path);
    for (const w of this.#workers) w.send({ t: 'component', component, path });
  }

  /** The components announced whole since the last reset, with their model files: what the workers create sessions from. */
  get announced(): ReadonlyMap<string, string> {
    return this.#components;
  }

  /** A component the workers were told of before this engine adopted them: kept for a worker started again. */
  componentAnnounced(component: string, path: string): void {
    this.#components.set(component, path);
  }

  /**
   * A tokenizer folder is whole: it parses here, on the main thread, while the workers create sessions (on a
   * worker the ~150 ms parse would sit between two of its sessions); jobs then carry token ids (#dispatch).
   */
  tokenizerReady(dir: string): void {
    void this.#tokenizer(dir).catch(() => undefined); // reported by load
  }

  /**
   * `text`'s token ids for each of the loaded model's tokenizers (tokenizer, tokenizer_2): what a job carries to the
   * text encoders, and what the result cache keys on. Undefined before the model has loaded.
   */
  encodeText(text: string): number[][] | undefined {
    if (this.#active.length === 0) return undefined;
    let ids = this.#encoded.get(text);
    if (!ids) {
      // SDXL's tokenizers clean the pieces of one text once between them.
      const cleaned: Cleaned = new Map();
      ids = this.#active.map((tok) => tok.encode(text, cleaned));
      if (this.#encoded.size >= ENCODED_TEXTS) this.#encoded.delete(this.#encoded.keys().next().value!);
      this.#encoded.set(text, ids);
    }
    return ids;
  }

  /** Resolves when every tokenizer announced so far has parsed (or failed). */
  tokenizersSettled(): Promise<void> {
    return Promise.allSettled([...this.#tokenizers.values()]).then(() => undefined);
  }

  #tokenizer(dir: string): Promise<ClipTokenizer> {
    const key = path.resolve(dir);
    let p = this.#tokenizers.get(key);
    if (!p) {
      p = ClipTokenizer.load(key);
      // A failed parse is forgotten (unless a reset already replaced it), so a later load tries again.
      const mine = p;
      p.catch(() => {
        if (this.#tokenizers.get(key) === mine) this.#tokenizers.delete(key);
      });
      this.#tokenizers.set(key, p);
    }
    return p;
  }

  /** The files sessions were started from were replaced: every worker drops them before the next `load`. */
  resetSessions(): void {
    this.#tokenizers.clear();
    this.#components.clear();
    for (const w of this.#workers) w.send({ t: 'reset' });
  }

  /**
   * Every worker builds the pipeline of `dir`. `listed` (the model's files while its weights still download): a
   * partial load, answered once the UNet's session exists; the other sessions are awaited where a generation needs
   * them. A later load of the same dir without `listed` answers when they all exist.
   */
  load(dir: string, listed?: string[]): Promise<LoadResult> {
    this.start();
    this.#adapters.setModelDir(dir);
    if (!listed) this.#wholeDir = dir;
    // A worker that ran out of descriptors before it had the whole model (its code and a download's ranges opening
    // files at once, under a tight open-file limit) starts again for this load: the shortage was the process's, not
    // the model's. One that died otherwise before this load (before it could even load its code) would never answer.
    for (const w of this.#workers) {
      if (w.dead && !this.#restarting.has(w.index) && w.death?.code === 'TOO_MANY_OPEN_FILES' && !this.#closing) {
        this.log.info({ worker: w.index }, 'starting the pipeline worker again: it had run out of file descriptors');
        const h = this.#adopt(spawnWorker(this.cfg, w.index), w.index);
        // What the one it replaces was told: a partial load waits for these before it creates those sessions.
        for (const [component, dir] of this.#components) h.send({ t: 'component', component, path: dir });
      }
    }
    const dead = this.#workers.find((w) => w.dead && !this.#restarting.has(w.index));
    if (dead) return Promise.reject(dead.death);
    return new Promise((resolve, reject) => {
      const waiter: LoadWaiter = { resolve, reject, left: this.#workers.length, whole: !listed };
      for (const w of this.#workers) {
        w.loads.push(waiter);
        w.send({ t: 'load', dir, ...(listed ? { listed } : {}) });
      }
    });
  }

  /**
   * Queues a generation; rejects at once with BUSY when the queue is full (never an unbounded wait). A request naming
   * LoRA adapters first finds their files (a 400 names the unknown ones), then queues with its adapter set.
   */
  submit(req: GenerationRequest, opts: SubmitOptions = {}): Promise<TaskResult> {
    // Closing: #submit refuses (and counts) it before any adapter is looked up.
    if (!req.loras || req.loras.length === 0 || this.#refuses(opts)) return this.#submit(req, opts, undefined);
    const lookup = this.#lookupSignal(req.loras, opts);
    const queued = this.#adapters.resolve(req.loras, lookup.signal).finally(lookup.done).then((refs) => this.#submit(req, opts, { key: lorasKey(req.loras), refs }), (err: unknown) => {
      opts.onMade?.(err instanceof Error ? err : new Error(String(err)));
      opts.onEnded?.();
      throw err;
    });
    if (!lookup.left) return queued;
    // Its client is answered when it leaves, though the look-up goes on for the requests joined to the generation.
    queued.catch(() => undefined);
    return Promise.race([queued, lookup.left]);
  }

  /**
   * What a generation's adapter look-up listens on: its client's signal, but while identical requests are joined to
   * the generation (SubmitOptions.joined) its client's leaving does not stop it, as it does not take a queued
   * generation out or stop a running batch; the last of them leaving then does (joinersLeft). Stopped, they would each
   * look the adapters up again. Its client leaving (or its deadline passing) while they are looked up abandons the
   * generation, counted in inference_cancelled_total as leaving the queue is (#abandon).
   */
  #lookupSignal(loras: readonly LoraRequest[], opts: SubmitOptions): { signal: AbortSignal | undefined; done: () => void; left?: Promise<never> } {
    const { signal, joined } = opts;
    if (!signal) return { signal, done: () => undefined };
    // Gone before the look-up began: not counted, as a generation submitted once its client left is not (#submit).
    const abandoned = () => this.metrics.cancelled.inc({ ...this.#labels, reason: cancelReason(signal.reason) });
    if (!signal.aborted) signal.addEventListener('abort', abandoned, { once: true });
    if (!joined) return { signal, done: () => signal.removeEventListener('abort', abandoned) };
    const lookingUp: { loras: readonly LoraRequest[]; stop?: AbortController } = { loras };
    this.#lookingUp.set(joined, lookingUp);
    const ac = new AbortController();
    let leave = (): void => undefined;
    // At its deadline, while S3 throttled the look-up: TIMEOUT saying so, as where its leaving stops the look-up.
    const left = new Promise<never>((_, reject) => (leave = () => reject(this.#adapters.stopped(loras, signal) ?? new RuntimeError('CANCELLED', 'the client left'))));
    left.catch(() => undefined);
    const onAbort = () => {
      if (joined.count === 0) return void ac.abort(signal.reason);
      lookingUp.stop = ac;
      leave();
    };
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
    return {
      signal: ac.signal,
      left,
      done: () => {
        signal.removeEventListener('abort', onAbort);
        signal.removeEventListener('abort', abandoned);
        if (this.#lookingUp.get(joined) === lookingUp) this.#lookingUp.delete(joined);
      },
    };
  }

  #submit(req: GenerationRequest, opts: SubmitOptions, adapters: Task['adapters']): Promise<TaskResult> {
    const request = opts.request ?? {};
    // Its client gone (while its adapters were looked up), it is queued only for the requests joined to it.
    const gone = opts.signal?.aborted === true;
    // Refused before queueing: counted in inference_rejected_total by reason, once per request (its instances are
    // submitted together and each is refused: a request of eight counted eight, against one 503). Its client gone, it
    // was answered then: the refusal is the joined requests' (refusedWith), not its own.
    const refuse = (reason: RejectReason, err: RuntimeError): Promise<never> => {
      if (!gone) this.#countRefused(request, reason);
      this.#refusals.set(err, reason);
      return this.#nothingMade(opts, err);
    };
    // Closing with no worker left (one died in the drain, and none is started again then): queued, an admitted request
    // would wait for nobody until the grace period's end.
    if (this.#refuses(opts) || (this.#closing && !this.serving)) return refuse('shutting_down', shuttingDownError());
    if (gone && !(opts.joined && opts.joined.count > 0)) return this.#nothingMade(opts, new RuntimeError('CANCELLED', 'the client left'));
    if (this.#restarting.size > 0 && !this.serving) return refuse('not_ready', this.#restartingError());
    // Each instance used to take a place: a request of more instances than MAX_QUEUE + 1 was refused on an idle server,
    // however long its client waited to retry.
    if (!this.#pending.some((t) => t.request === request) && this.queueDepth >= this.cfg.maxQueue) {
      return refuse('queue_full', new RuntimeError('BUSY', `the request queue is full (${this.cfg.maxQueue} waiting); retry later`, { retryAfter: this.#retryAfter() }));
    }
    return new Promise<TaskResult>((resolve, reject) => {
      const images = req.items.reduce((n, it) => n + it.numImages, 0);
      // Requests with other image inputs or adapter sets (or none) never share a batch: the job carries one set of each.
      // Output formats may differ: each request's images are encoded as it asked.
      const key = `${shapeKey(req.shape, this.#defaults)}|${imageKey(req)}|${req.previewEvery}|${adapters?.key ?? ''}`;
      const task: Task = { req, request, key, images, enqueuedAt: performance.now(), signal: opts.signal, onProgress: opts.onProgress, resolve, reject, state: 'queued', ...(opts.worker !== undefined ? { pin: opts.worker } : {}), ...(adapters ? { adapters } : {}), ...(opts.onMade ? { made: opts.onMade } : {}), ...(opts.joined ? { joined: opts.joined } : {}), ...(opts.onEnded ? { ended: opts.onEnded } : {}) };
      if (opts.signal && !gone) {
        task.onAbort = () => this.#abandon(task);
        opts.signal.addEventListener('abort', task.onAbort, { once: true });
      }
      this.#pending.push(task);
      this.metrics.queueDepth.set(this.#labels, this.queueDepth);
      opts.onQueued?.();
      // Answered now, as a queued generation whose client leaves is (#abandon), and counted when it left (#lookupSignal);
      // joinersLeft() takes it out.
      if (gone) this.#answer(task, new RuntimeError('CANCELLED', 'the client left while its LoRA adapters were looked up'));
      this.#pump();
    });
  }

  #countRefused(request: object, reason: RejectReason): void {
    if (!this.#refused.has(request)) this.metrics.rejected.inc({ ...this.#labels, reason });
    this.#refused.add(request);
  }

  /**
   * Request `request` (SubmitOptions.request) is answered `err`, the outcome of the generation it was joined to
   * (generation.ts): where that generation was refused (after its LoRA adapters were looked up: the queue full, the
   * worker starting again), the refusal is counted in inference_rejected_total for this request too, once, as its own.
   */
  refusedWith(request: object, err: unknown): void {
    const reason = err instanceof Error ? this.#refusals.get(err) : undefined;
    if (reason !== undefined) this.#countRefused(request, reason);
  }

  /** A request refused before it queued: nothing will be made for it. */
  #nothingMade(opts: SubmitOptions, err: RuntimeError): Promise<never> {
    opts.onMade?.(err);
    opts.onEnded?.();
    return Promise.reject(err);
  }

  /** Resolves when nothing is queued, running or being encoded (used by the SIGTERM drain). */
  idle(): Promise<void> {
    if (this.#pending.length === 0 && this.busy === 0 && this.#encoding === 0) return Promise.resolve();
    return new Promise((r) => this.#idleWaiters.push(r));
  }

  /** Stops accepting; queued and running work goes on until `idle()`, and admitted requests still queue. */
  stopAccepting(): void {
    this.#closing = true;
  }

  /** False from stopAccepting() on: a request that starts now is not admitted (SubmitOptions.admitted). */
  get accepting(): boolean {
    return !this.#closing;
  }

  #refuses(opts: SubmitOptions): boolean {
    return this.#closed || (this.#closing && opts.admitted !== true);
  }

  async close(): Promise<void> {
    this.#closing = true;
    this.#closed = true;
    for (const t of this.#restartTimers) clearTimeout(t);
    this.#restartTimers.clear();
    for (const t of this.#pending.splice(0)) this.#finish(t, shuttingDownError());
    this.metrics.queueDepth.set(this.#labels, 0);
    this.#watchSets();
    // Adapter fetches still running (LORA_URI) stop, and are waited for below: none may leave its cache lock behind.
    const adapters = this.#adapters.close();
    // Batches still running after the grace period stop at their next step (a worker closes only once its generation
    // ends, and one ended by terminate() inside an ONNX Runtime call aborts the process), and their clients get an
    // answer (503, Retry-After) now, while their connections are open, instead of a bare reset at the exit.
    const cut = new RuntimeError('SHUTTING_DOWN', 'the server shut down before the generation finished (SHUTDOWN_GRACE_S); retry', { retryAfter: 1 });
    for (const w of this.#workers) {
      for (const run of runsOf(w)) {
        if (!w.dead) w.send({ t: 'cancel', id: run.id });
        this.#countPartial(run);
        for (const t of run.tasks) this.#finish(t, cut);
      }
      // Answered: what the worker still sends about them is for nobody, and worker_busy says it holds none.
      w.running = undefined;
      w.decoding.length = 0;
      this.#deviceBusy(w);
    }
    generationsChanged(this.#inFlight, false);
    await Promise.all(
      this.#workers.filter((w) => !w.dead).map(
        (w) =>
          new Promise<void>((r) => {
            const timer = setTimeout(() => void w.worker.terminate().then(() => r()), 5_000);
            w.worker.once('exit', () => {
              clearTimeout(timer);
              r();
            });
            w.send({ t: 'close' });
          }),
      ),
    );
    await adapters;
  }

  #retryAfter(): number {
    // A rough wait: the batches the queue makes and the one running, each the last observed generation time, spread
    // over the workers; at least a second. Counting requests instead said MAX_BATCH_SIZE times too long.
    const batches = queuedBatches(this.#pending, this.cfg.maxBatchSize) + 1;
    return Math.max(1, Math.ceil((batches * this.#lastGenSeconds) / Math.max(1, this.#workers.length)));
  }
  #lastGenSeconds = 5;

  #abandon(task: Task): void {
    const counted = { ...this.#labels, reason: cancelReason(task.signal?.reason) };
    if (task.state === 'queued' && waitedFor(task)) {
      // Identical requests joined to it wait for its images: it keeps its place in the queue for them (they would
      // otherwise queue a generation of their own, behind everyone queued since), and its client is answered now. Once
      // the last of them leaves, joinersLeft() takes it out.
      this.metrics.cancelled.inc(counted);
      this.#answer(task, new RuntimeError('CANCELLED', 'the client left while queued'));
    } else if (task.state === 'queued') {
      const i = this.#pending.indexOf(task);
      if (i >= 0) this.#pending.splice(i, 1);
      this.metrics.queueDepth.set(this.#labels, this.queueDepth);
      this.metrics.cancelled.inc(counted);
      this.#finish(task, new RuntimeError('CANCELLED', 'the client left while queued'));
      this.#checkIdle();
    } else if (task.state === 'running') {
      // The batch may be stepping or already decoding (a decode can wait for a VAE still downloading).
      const w = this.#workers.find((x) => runsOf(x).some((r) => r.tasks.includes(task)));
      const run = w && runsOf(w).find((r) => r.tasks.includes(task));
      if (w && run) this.#stopIfUnwanted(w, run);
      // Answer now (client gone or timed out); the batch's other requests keep their generation. Counted here, once
      // per task, whether or not its batch stops.
      this.metrics.cancelled.inc(counted);
      this.#answer(task, new RuntimeError('CANCELLED', 'the request was abandoned while generating'));
      // Running on for others, it renders previews only if one of them wants them.
      if (w && run && !run.cancelled) this.#previewsWanted(w, run);
    }
  }

  /**
   * What a request joined to a generation (SubmitOptions.joined) is told when it stops waiting at its deadline
   * (`signal`) while that generation's adapters are looked up: TIMEOUT naming the adapter whose fetch S3 was
   * throttling, as the generation's own client is told (#lookupSignal); undefined otherwise.
   */
  lookupStopped(joined: Joined, signal: AbortSignal): RuntimeError | undefined {
    const loras = this.#lookingUp.get(joined)?.loras;
    return loras === undefined ? undefined : this.#adapters.stopped(loras, signal);
  }

  /**
   * The last of the requests joined to a generation (SubmitOptions.joined) left: its batch stops if its own clients
   * left too, and, still queued after its client left (#abandon), it leaves the queue.
   */
  joinersLeft(joined: Joined): void {
    this.#lookingUp.get(joined)?.stop?.abort(new DOMException('every request waiting for it left', 'AbortError'));
    for (const w of this.#workers) {
      for (const run of runsOf(w)) {
        if (!run.tasks.some((t) => t.joined === joined)) continue;
        this.#stopIfUnwanted(w, run);
        // Running on for a request joined to another of its generations: previews only if one of those wants them.
        if (!run.cancelled) this.#previewsWanted(w, run);
      }
    }
    const gone = this.#pending.filter((t) => t.joined === joined && t.state === 'done');
    if (gone.length === 0) return;
    for (const t of gone) {
      this.#pending.splice(this.#pending.indexOf(t), 1);
      // Its client's leaving was counted when it left (#abandon, or #lookupSignal during its adapters' look-up).
      this.#finish(t, new RuntimeError('CANCELLED', 'the client left while queued'));
    }
    this.metrics.queueDepth.set(this.#labels, this.queueDepth);
    this.#checkIdle();
  }

  /**
   * Requests joined to a generation (SubmitOptions.joined) came or left (not the last of them leaving: joinersLeft).
   * One that joined a batch told to stop, every client and joined request gone (#stopIfUnwanted), that has not ended
   * revives it: the worker goes on (`resume`), every step it ran kept, rather than the request waiting for it to stop
   * only to queue the same generation again. Where the worker stopped it already, the CANCELLED that comes back makes
   * the request look again and queue its own (generation.ts). Its previews are rendered while someone wants them.
   */
  joinersChanged(joined: Joined): void {
    for (const w of this.#workers) {
      for (const run of runsOf(w)) {
        if (!run.tasks.some((t) => t.joined === joined)) continue;
        // The termination message counts them (an OOM kill ends their requests too).
        generationsChanged(this.#inFlight, false);
        if (run.cancelled && joined.count > 0) {
          run.cancelled = false;
          if (!w.dead) w.send({ t: 'resume', id: run.id });
        }
        if (!run.cancelled) this.#previewsWanted(w, run);
      }
    }
  }

  /**
   * Tells the worker whether the run's steps are to render previews (a cheap image from the latents, sent over and
   * encoded to PNG here, each step of preview_every): while its own client streams them or a request joined to it does;
   * not for a generation that runs on only for requests that stream steps alone, or none (V1, V2).
   */
  #previewsWanted(w: WorkerHandle, run: Running): void {
    const want = run.tasks.some((t) => t.req.previewEvery > 0 && (t.state === 'running' || (t.joined?.previews ?? 0) > 0));
    if (want === run.previews) return;
    run.previews = want;
    if (!w.dead) w.send({ t: 'previews', id: run.id, on: want });
  }

  /**
   * Stops the generation at the next step or image once every client of the batch has left and no request joined to
   * it waits for its images; once: the tasks of one request share its signal, and each of them comes here.
   */
  #stopIfUnwanted(w: WorkerHandle, run: Running): void {
    if (run.cancelled || !run.tasks.every((t) => t.signal?.aborted && !waitedFor(t))) return;
    run.cancelled = true;
    w.send({ t: 'cancel', id: run.id });
  }

  #pump(): void {
    clearTimeout(this.#windowTimer);
    this.#windowTimer = undefined;
    this.#prepareSets();
    for (;;) {
      // A worker whose last batch is decoding takes the next one: its UNet steps overlap that decode. One decode
      // ahead at most, so a slow VAE holds the queue here (where clients can still leave) rather than in the worker.
      const free = this.#workers.filter((w) => w.loaded && !w.running && w.decoding.length < 2);
      if (free.length === 0 || this.#pending.length === 0) return;
      // The oldest batch ready to go that some free worker may take. A task pinned to a busy worker, or whose LoRA
      // adapter set no free worker holds yet (it is being built), lets the others pass; the base model and cached sets
      // serve meanwhile. A batch waiting a short window for compatible company (it is not full) lets a ready batch of
      // another key pass: a full one used to wait behind it for up to BATCH_WINDOW_MS, the worker idle.
      const can = (t: Task, w: WorkerHandle) => (t.pin === undefined || w.index === t.pin) && (!t.adapters || w.sets.get(t.adapters.key) === 'ready');
      const waiting = new Set<string>();
      let wait = Infinity;
      let ready: { head: Task; batch: Task[] } | undefined;
      for (const head of this.#pending) {
        // A later task of a waiting batch's key is in that batch, or waits behind it.
        if ((head.pin === undefined && !head.alone && waiting.has(head.key)) || !free.some((w) => can(head, w))) continue;
        const { batch, images } = this.#batchOf(head);
        const waited = performance.now() - head.enqueuedAt;
        if (head.pin === undefined && !head.alone && this.cfg.maxBatchSize > 1 && images < this.cfg.maxBatchSize && waited < this.cfg.batchWindowMs) {
          waiting.add(head.key);
          wait = Math.min(wait, this.cfg.batchWindowMs - waited);
          continue;
        }
        ready = { head, batch };
        break;
      }
      if (!ready) {
        if (wait !== Infinity) this.#windowTimer = setTimeout(() => this.#pump(), wait + 1);
        return;
      }
      const worker = leastBusy(free.filter((w) => can(ready.head, w)));
      for (const t of ready.batch) this.#pending.splice(this.#pending.indexOf(t), 1);
      this.metrics.queueDepth.set(this.#labels, this.queueDepth);
      this.#dispatch(worker, ready.batch);
    }
  }

  /** `head` and the queued tasks of its key behind it that fit, in order, up to MAX_BATCH_SIZE images (their count). */
  #batchOf(head: Task): { batch: Task[]; images: number } {
    const batch: Task[] = [head];
    let images = head.images;
    for (const t of head.pin === undefined && !head.alone ? this.#pending.slice(this.#pending.indexOf(head) + 1) : []) {
      if (images >= this.cfg.maxBatchSize) break;
      if (t.pin !== undefined || t.alone) continue;
      if (t.key === head.key && images + t.images <= this.cfg.maxBatchSize) {
        batch.push(t);
        images += t.images;
      }
    }
    return { batch, images };
  }

  #dispatch(worker: WorkerHandle, tasks: Task[]): void {
    const id = this.#nextId++;
    const now = performance.now();
    for (const t of tasks) {
      // A task whose client left while it was queued, kept for the requests joined to it (#abandon), stays answered.
      if (t.state === 'queued') t.state = 'running';
      t.runId = id;
    }
    const warmup = tasks.some((t) => t.pin !== undefined);
    const run: Running = { id, tasks, startedAt: now, delivery: Promise.resolve(), where: { worker: String(worker.index), device: worker.device }, warmup, previews: tasks[0]!.req.previewEvery > 0 };
    worker.running = run;
    worker.dispatchedAt = now;
    this.#deviceBusy(worker);
    const head = tasks[0]!.req;
    if (!warmup) this.metrics.batchSize.observe(this.#labels, tasks.length);
    // Requests are logged when answered: at debug level `kubectl logs --previous` shows what a process killed in a
    // generation (an OOM kill) was running, with every id of the batch (the termination message shows a few).
    if (this.log.isLevelEnabled('debug')) this.log.debug({ ...run.where, ...batchShape(tasks), ...(warmup ? { warmup } : {}), ...idsOf(tasks) }, 'generation started');
    generationsChanged(this.#inFlight, true);
    // Each image guided and rescaled by its own request's values (the batch key only holds whether there is an
    // unconditional pass); the job's shape is the first request's, eta included where its scheduler ignores eta.
    const items = tasks.flatMap((t) => t.req.items.map((it) => ({ ...it, guidance: t.req.shape.guidance, guidanceRescale: t.req.shape.guidanceRescale })));
    // Every text of the batch, encoded once by each of the model's tokenizers (a missing negative prompt is '').
    const tokens = new Map<string, number[][]>();
    for (const it of items) for (const text of [it.prompt, it.negativePrompt ?? '']) if (!tokens.has(text)) tokens.set(text, this.encodeText(text) ?? []);
    const adapters = tasks[0]!.adapters;
    // Where batches form on the CPU, a lone UNet row runs as two, so that an image is the same bytes alone and batched
    // (Job.padLoneRow). Not on a GPU: there it would cost a lone SD-Turbo/LCM image most of a second UNet row, for a
    // rounding difference not measured there.
    const padLoneRow = this.cfg.maxBatchSize > 1 && worker.provider !== undefined && !onGpu(worker.provider);
    worker.send({ t: 'generate', id, job: { shape: head.shape, items, tokens: [...tokens], ...(head.image ? { init: jobInit(head.image) } : {}), ...(padLoneRow ? { padLoneRow } : {}) }, previewEvery: head.previewEvery, ...(adapters ? { adapters } : {}) });
    // Its client gone while it was queued (kept for the requests joined to it), none of which streams previews.
    this.#previewsWanted(worker, run);
  }

  /**
   * Asks a worker to build each adapter set that queued tasks need and no worker holds or builds: the least busy
   * loaded worker, which goes on serving what it can meanwhile.
   */
  #prepareSets(): void {
    for (const t of this.#pending) {
      const a = t.adapters;
      if (!a || this.#workers.some((w) => w.sets.has(a.key))) continue;
      const loaded = this.#workers.filter((w) => w.loaded);
      if (loaded.length === 0) return;
      const w = loaded.reduce((best, x) => (x.sets.size < best.sets.size ? x : best));
      w.sets.set(a.key, 'loading');
      this.#setAsked.set(a.key, performance.now());
      this.log.info({ set: a.key, worker: w.index, adapters: a.refs.map((r) => r.name) }, 'building a LoRA adapter set; its requests wait for it');
      // Its sessions map the merged weights (and links to the model's) from the cache volume, in this process: a read
      // the volume fails is SIGBUS too, and the model may be on another volume than the cache.
      mappedWeightsHint(`the LoRA adapter sets in ${path.join(this.cfg.cacheDir, LORA_SETS)}`);
      w.send({ t: 'adapters', key: a.key, refs: a.refs });
    }
    this.#watchSets();
  }

  /**
   * While an adapter set is built, the cache volume is looked at through the adapters' gate: a build reads the
   * adapters and the model's graphs and writes the merged ones there, calls not gated, and on a volume that stopped
   * answering they wait for good, and the requests queued for the set with them (up to REQUEST_TIMEOUT_S). Those are
   * answered CACHE_STUCK instead; the build goes on, and its set serves once the volume answers and it is whole.
   */
  #watchSets(): void {
    const building = !this.#closed && this.#workers.some((w) => [...w.sets.values()].includes('loading'));
    if (!building) {
      this.#setWatch?.abort();
      this.#setWatch = undefined;
      return;
    }
    if (this.#setWatch) return;
    const stop = new AbortController();
    this.#setWatch = stop;
    this.#adapters.watch(stop.signal, (err) => {
      const loading = (key: string) => this.#workers.some((w) => w.sets.get(key) === 'loading') && !this.#workers.some((w) => w.sets.get(key) === 'ready');
      const waiting = this.#pending.filter((t) => t.adapters !== undefined && loading(t.adapters.key));
      if (waiting.length === 0) return;
      for (const t of waiting) {
        this.#pending.splice(this.#pending.indexOf(t), 1);
        this.#finish(t, new RuntimeError('CACHE_STUCK', `the LoRA adapter set ${t.adapters!.key} waits on its build: ${err.message}`, { cause: err, retryAfter: err.retryAfter }));
      }
      this.log.warn({ ...idsOf(waiting) }, 'requests waiting for a LoRA adapter set answered CACHE_STUCK: its build waits on the cache volume');
      this.metrics.queueDepth.set(this.#labels, this.queueDepth);
      this.#checkIdle();
    });
  }

  #onMessage(w: WorkerHandle, m: FromWorker): void {
    switch (m.t) {
      case 'log':
        this.log[m.level](m.obj ?? {}, m.msg);
        break;
      case 'imported':
        this.events.onImported?.(m.ms, m.randn);
        break;
      case 'session':
        this.events.onSession?.(m.component, m.provider, m.ms, m.cache, m.thread);
        break;
      case 'loaded':
      case 'load-failed': {
        const waiter = w.loads.shift();
        if (!waiter) break;
        const fail = (err: RuntimeError) => {
          waiter.left--;
          if (!waiter.settled) waiter.reject(err);
          waiter.settled = true;
        };
        if (m.t === 'load-failed') {
          fail(new RuntimeError(m.code as never, m.message, m.errno ? { cause: Object.assign(new Error(m.errno), { code: m.errno }) } : undefined));
          break;
        }
        if (waiter.whole) w.whole = true;
        // The worker's pipeline is ready; jobs need the model's tokenizers here too (parsing since announced).
        void Promise.all(m.tokenizerDirs.map((d) => this.#tokenizer(d))).then(
          (toks) => {
            if (toks.length !== this.#active.length || toks.some((t, i) => t !== this.#active[i])) this.#encoded = new Map();
            this.#active = toks;
            w.loaded = !w.dead;
            w.provider = m.providers.unet;
            this.#defaults = m.defaults;
            waiter.left--;
            waiter.result = { defaults: m.defaults, providers: m.providers, ...(m.fallbackReason ? { fallbackReason: m.fallbackReason } : {}), optimize: waiter.result?.optimize ?? m.optimize };
            if (waiter.left === 0 && !waiter.settled) {
              waiter.settled = true;
              waiter.resolve(waiter.result);
            }
            this.#servingChanged('a pipeline worker started again');
            this.#pump();
          },
          (err: unknown) => fail(isRuntimeError(err) ? err : new RuntimeError('MODEL_FORMAT', `tokenizer: ${(err as Error)?.message ?? String(err)}`)),
        );
        break;
      }
      case 'adapters-ready': {
        w.sets.set(m.key, 'ready');
        const asked = this.#setAsked.get(m.key);
        this.#setAsked.delete(m.key);
        const waited = asked === undefined ? m.ms.total : performance.now() - asked;
        this.metrics.adapterLoad.observe(this.#labels, waited / 1000);
        const ready = { set: m.key, worker: w.index, waitedMs: Math.round(waited), ms: m.ms, mergedMB: Math.round(m.bytes / 2 ** 20), components: m.components, formats: m.formats };
        if (this.events.onAdapters) this.events.onAdapters(ready);
        else this.log.info(ready, 'LoRA adapter set ready');
        this.#pump();
        break;
      }
      case 'adapters-failed': {
        w.sets.delete(m.key);
        this.#setAsked.delete(m.key);
        const waiting = this.#pending.filter((t) => t.adapters?.key === m.key);
        this.log.warn({ set: m.key, worker: w.index, code: m.code, reason: m.detail ?? m.message, ...idsOf(waiting) }, 'LoRA adapter set failed');
        const err = new RuntimeError(m.code as never, m.message);
        for (const t of waiting) {
          this.#pending.splice(this.#pending.indexOf(t), 1);
          this.#finish(t, err);
        }
        this.metrics.queueDepth.set(this.#labels, this.queueDepth);
        this.#checkIdle();
        this.#pump();
        break;
      }
      case 'adapters-evicted':
        w.sets.delete(m.key);
        this.#pump();
        break;
      case 'denoised': {
        const run = w.running;
        if (run?.id !== m.id) break;
        w.running = undefined;
        w.decoding.push(run);
        // The VAE decode, where a big batch's memory peaks: written at once where nothing was in the last second.
        generationsChanged(this.#inFlight, true);
        this.#pump();
        break;
      }
      case 'progress': {
        const run = w.running;
        if (run?.id !== m.id) break;
        const { step, of, previews } = m;
        run.unetRuns = step;
        run.unetOf = of;
        // Rendered before the worker heard that nobody wants them any more: not encoded.
        const wanted = previews && run.previews;
        run.delivery = run.delivery.then(async () => {
          const pngs = wanted ? await Promise.all(previews.map((p) => encodeImage(new Uint8Array(p.rgb), p.width, p.height, 'png'))) : undefined;
          if (pngs) this.metrics.previews.inc(this.#labels, pngs.length);
          let item = 0;
          for (const t of run.tasks) {
            const preview = pngs?.[item];
            item += t.req.items.length;
            // A task whose client left goes on telling the requests joined to it (generation.ts), which stream theirs.
            if ((t.state === 'running' || waitedFor(t)) && t.runId === run.id) t.onProgress?.({ step, of, ...(preview ? { preview } : {}) });
          }
        }).catch((err: unknown) => this.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'could not encode a preview'));
        break;
      }
      case 'result':
      case 'error': {
        const run = w.running?.id === m.id ? w.running : w.decoding.find((r) => r.id === m.id);
        // A defect's text is logged here, where the batch's requests are known: the worker knows none of their ids.
        if (m.t === 'error' && m.code === 'INTERNAL') this.log.error({ worker: String(w.index), device: w.device, err: m.detail, ...idsOf(run?.tasks ?? []) }, 'generation failed');
        if (!run) break;
        // The worker is free for the next batch while this one's images are encoded here.
        if (w.running === run) w.running = undefined;
        else w.decoding.splice(w.decoding.indexOf(run), 1);
        this.#deviceBusy(w);
        generationsChanged(this.#inFlight, false);
        if (m.t === 'error') this.#countPartial(run);
        const oom = m.t === 'error' && m.code === 'OUT_OF_MEMORY';
        if (oom && this.#outOfMemory(run, m.detail)) {
          this.#pump();
          break;
        }
        this.#encoding++;
        // A request that ran out of memory alone is told what it asked for (a batch of several runs again, above).
        const settle = m.t === 'error'
          ? run.delivery.then(() => this.#fail(run, oom ? outOfMemoryError(run.tasks[0]!.req, w.provider === 'cpu' ? 'cpu' : w.device) : new RuntimeError(m.code as never, m.message)))
          : run.delivery.then(() => this.#deliver(run, m.images, m.times));
        void settle
          // Ours already say what is wrong (sharp not loaded for want of descriptors, 503).
          .catch((err: unknown) => this.#fail(run, isRuntimeError(err) ? err : this.#encodeFailed(run, err)))
          .finally(() => {
            this.#encoding--;
            this.#checkIdle();
          });
        this.#pump();
        break;
      }
    }
  }

  async #deliver(run: Running, raw: Array<TransferImage & { seed: number }>, times: StageTimes): Promise<void> {
    // Every client of the batch left while it ran (its cancel came too late), and no one else waits for their images:
    // nobody to encode for; the device still ran every step and made every image, which count as those of a batch that
    // only some of its clients left do.
    if (run.tasks.every((t) => t.state === 'done' && !t.made)) {
      if (!run.warmup) this.#countMade(run, times.steps, raw.length);
      for (const t of run.tasks) this.#ended(t);
      return;
    }
    const t0 = performance.now();
    // Each request's images (its slice of the batch, in task order) in its own format; none for a request whose client
    // left while it ran, unless others wait for them (onMade).
    let o = 0;
    const encoded: EncodedImage[][] = await Promise.all(run.tasks.map((t) => {
      const mine = raw.slice(o, (o += t.images));
      if (t.state === 'done' && !t.made) return [];
      const { format, quality } = t.req.output;
      return Promise.all(mine.map(async (r) => {
        const buf = await encodeImage(new Uint8Array(r.rgb), r.width, r.height, format, quality);
        return { data: buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength) as ArrayBuffer, seed: r.seed, width: r.width, height: r.height, format };
      }));
    }));
    const all: RunTimes = { ...times, encodeMs: performance.now() - t0 };
    this.#lastGenSeconds = (performance.now() - run.startedAt) / 1000;
    if (!run.warmup) this.#countServed(run, all, raw.length);
    run.tasks.forEach((t, k) => this.#finish(t, { images: encoded[k]!, times: all, batchSize: run.tasks.length, queuedMs: run.startedAt - t.enqueuedAt }));
  }

  /**
   * A defect of the encoder (sharp refusing the images): logged here, once for the batch, as a failed generation is,
   * with its stack and the requests' ids; their clients are told no more than its message.
   */
  #encodeFailed(run: Running, err: unknown): RuntimeError {
    const { height, width } = run.tasks[0]!.req.shape;
    const formats = [...new Set(run.tasks.map((t) => t.req.output.format))];
    this.log.error({ ...run.where, height, width, formats, err, ...idsOf(run.tasks) }, 'the generated images could not be encoded');
    return new RuntimeError('INTERNAL', `the generated images could not be encoded: ${(err as Error)?.message ?? String(err)}`);
  }

  /** A generation's stage times, steps and images, in the serving metrics. */
  #countServed(run: Running, all: RunTimes, images: number): void {
    const l = this.#labels;
    this.metrics.stageDuration.observe({ ...l, stage: 'text_encoder' }, all.textEncoderMs / 1000);
    this.metrics.stageDuration.observe({ ...l, stage: 'denoise' }, all.denoiseMs / 1000);
    this.metrics.stageDuration.observe({ ...l, stage: 'vae_decoder' }, all.vaeMs / 1000);
    if (all.vaeEncoderMs !== undefined) this.metrics.stageDuration.observe({ ...l, stage: 'vae_encoder' }, all.vaeEncoderMs / 1000);
    this.metrics.stageDuration.observe({ ...l, stage: 'encode' }, all.encodeMs / 1000);
    if (all.denoiseMs > 0) this.metrics.stepsPerSecond.set(l, all.steps / (all.denoiseMs / 1000));
    this.#countMade(run, all.steps, images);
  }

  /** The UNet steps a generation ran to its end and the images it made, whether or not anyone took them. */
  #countMade(run: Running, steps: number, images: number): void {
    this.metrics.steps.inc(this.#labels, steps);
    this.metrics.images.inc(this.#labels, images);
    this.metrics.workerImages.inc({ ...this.#labels, ...run.where }, images);
  }

  /**
   * A generation ran out of memory; logged once with its shape and counted. A batch of several requests goes back to
   * the head of the queue, each request to run in a batch of its own: a small request never fails for the big one it
   * shared a batch with (true). A request that ran alone is answered OUT_OF_MEMORY by the caller (false).
   */
  #outOfMemory(run: Running, detail: string | undefined): boolean {
    // Wanted still: by its client, or, its client gone, by the identical requests joined to its generation, for which
    // it runs again as it keeps its place in the queue (#abandon), answered already.
    const live = run.tasks.filter((t) => t.state === 'running' || waitedFor(t));
    const split = run.tasks.length > 1 && live.length > 0;
    const { height, width } = run.tasks[0]!.req.shape;
    const shape = { height, width, images: run.tasks.reduce((n, t) => n + t.images, 0), requests: run.tasks.length };
    this.metrics.outOfMemory.inc({ ...this.#labels, outcome: split ? 'split' : 'failed' });
    if (!split) {
      this.log.warn({ ...run.where, ...shape, reason: detail, ...idsOf(run.tasks) }, live.length > 0 ? 'a generation ran out of memory: answered OUT_OF_MEMORY' : 'a generation ran out of memory; its clients had left');
      return false;
    }
    this.log.warn({ ...run.where, ...shape, reason: detail, ...idsOf(run.tasks) }, 'a generation batch ran out of memory: its requests run again one at a time (a lower MAX_BATCH_SIZE avoids the retries)');
    for (const t of live) {
      if (t.state === 'running') t.state = 'queued';
      t.alone = true;
    }
    // Those whose clients left and that no request waits for are not run again: nothing is made for them.
    for (const t of run.tasks) if (!live.includes(t)) this.#finish(t, new RuntimeError('CANCELLED', 'the client left; its batch ran out of memory'));
    this.#pending.unshift(...live);
    this.metrics.queueDepth.set(this.#labels, this.queueDepth);
    return true;
  }

  /**
   * The UNet runs of a generation that ended without a result (stopped because its clients left or timed out, out of
   * memory, failed): the device ran them, and denoising_steps_total counted only those of generations that finished.
   */
  #countPartial(run: Running): void {
    if (run.unetRuns && !run.warmup) this.metrics.steps.inc(this.#labels, run.unetRuns);
  }

  #fail(run: Running, err: Error): void {
    for (const t of run.tasks) this.#finish(t, err);
  }

  /**
   * The task's end: its images (or why there are none) to those waiting for them (onMade), even where its client left
   * while it ran and was answered then, and its client's answer.
   */
  #finish(t: Task, out: TaskResult | Error): void {
    const made = t.made;
    t.made = undefined;
    made?.(out instanceof Error ? out : out.images);
    this.#answer(t, out);
    this.#ended(t);
  }

  /** The task is over: SubmitOptions.onEnded, once. */
  #ended(t: Task): void {
    const ended = t.ended;
    t.ended = undefined;
    ended?.();
  }

  /** Answers the task's client, once. */
  #answer(t: Task, out: TaskResult | Error): void {
    if (t.state === 'done') return;
    t.state = 'done';
    if (t.onAbort) t.signal?.removeEventListener('abort', t.onAbort);
    if (out instanceof Error) t.reject(out);
    else t.resolve(out);
  }

  #checkIdle(): void {
    if (this.#pending.length === 0 && this.busy === 0 && this.#encoding === 0) for (const r of this.#idleWaiters.splice(0)) r();
  }

  #restartingError(): RuntimeError {
    return new RuntimeError('WORKER_RESTARTING', 'the pipeline worker stopped and is being started again; retry in a few seconds', { retryAfter: 5 });
  }

  /** Tells the runtime when being able to run a generation changed. */
  #servingChanged(reason: string): void {
    const now = this.serving;
    if (now === this.#serving) return;
    this.#serving = now;
    this.events.onServing?.(now, reason);
  }

  #onWorkerDeath(w: WorkerHandle, message: string, short?: Shortage): void {
    // 'error' and 'exit' both come for a thread that threw; a worker told to close exits on purpose.
    if (w.dead) return;
    // Node's message for a file it could not open names the file's local path: not for clients.
    const why = short ? shortageError('it could not open a file', short, LIMIT_ADVICE).message : message;
    w.dead = true;
    w.death = short ? shortageError(`pipeline worker ${w.index} stopped`, short, LIMIT_ADVICE) : new RuntimeError('WORKER_DIED', `pipeline worker ${w.index} died: ${why}`);
    w.loaded = false;
    if (this.#closed) {
      this.#checkIdle();
      return;
    }
    // Dying during the SIGTERM drain (stopAccepting), it is not started again, and what it held is answered now: held,
    // its requests would have waited out the grace period for the grace's 503.
    const draining = this.#closing;
    // The batch it was stepping and the one it was decoding, if any.
    const runs = runsOf(w);
    const held = idsOf(runs.flatMap((r) => r.tasks));
    // Out of descriptors the worker is started again (below, or by the next load): a warning, not an error.
    if (short) this.log.warn({ worker: w.index, reason: why, ...held }, 'pipeline worker stopped: out of file descriptors');
    else this.log.error({ worker: w.index, reason: why, ...held }, 'pipeline worker died');
    this.metrics.workerDeaths.inc({ ...this.#labels, worker: String(w.index), device: w.device });
    for (const run of runs) this.#countPartial(run);
    w.decoding.length = 0;
    w.running = undefined;
    w.sets.clear();
    this.#deviceBusy(w);
    generationsChanged(this.#inFlight, false);
    // Only a worker that had the whole model is started again: one that dies while loading it would do so again.
    const again = w.whole && this.#wholeDir !== undefined && !draining;
    if (runs.length > 0) {
      const err = new RuntimeError('WORKER_DIED', `the generation failed: the pipeline worker running it stopped (${why})${again ? '; it is being started again' : ''}`);
      for (const run of runs) for (const t of run.tasks) this.#finish(t, err);
    }
    for (const waiter of w.loads.splice(0)) {
      if (!waiter.settled) waiter.reject(w.death);
      waiter.settled = true;
    }
    if (again) this.#restart(w.index);
    if (!this.serving) {
      // Nothing can run what waits: an answer now (the client may retry on another replica) beats a timeout.
      for (const t of this.#pending.splice(0)) this.#finish(t, draining ? shuttingDownError() : this.#restartingError());
      this.metrics.queueDepth.set(this.#labels, 0);
    }
    this.#servingChanged(`pipeline worker ${w.index} stopped (${why})${again ? '; starting it again' : draining ? '; not started again: the server is shutting down' : ''}`);
    this.#checkIdle();
    this.#pump();
  }

  /** Starts worker `index` again and has it load the whole model; after a backoff when it keeps dying. */
  #restart(index: number): void {
    const prev = this.#restarts.get(index);
    const n = prev && performance.now() - prev.at < RESPAWN_RESET_MS ? prev.n + 1 : 0;
    const delay = n === 0 ? 0 : Math.min(RESPAWN_MAX_MS, 500 * 2 ** (n - 1));
    this.#restarting.add(index);
    const timer = setTimeout(() => {
      this.#restartTimers.delete(timer);
      if (this.#closing) {
        this.#restarting.delete(index);
        return;
      }
      this.#restarts.set(index, { n, at: performance.now() });
      this.log.info({ worker: index, restart: n + 1, afterMs: delay }, 'starting the pipeline worker again');
      const h = this.#adopt(spawnWorker(this.cfg, index), index);
      const t0 = performance.now();
      h.loads.push({
        left: 1, whole: true,
        resolve: () => {
          this.#restarting.delete(index);
          this.log.info({ worker: index, ms: Math.round(performance.now() - t0) }, 'pipeline worker started again with its sessions');
        },
        reject: (e) => {
          this.#restarting.delete(index);
          this.log.error({ worker: index, reason: (e as Error)?.message ?? String(e) }, 'the pipeline worker started again could not load the model');
          // Its death (below) schedules the next attempt, with a longer wait.
          h.whole = true;
          void h.worker.terminate();
        },
      });
      h.send({ t: 'load', dir: this.#wholeDir! });
    }, delay);
    timer.unref();
    this.#restartTimers.add(timer);
  }
}

/** What a request refused or dropped for the stop is told (SIGTERM: it retries on another pod). */
export const shuttingDownError = (): RuntimeError => new RuntimeError('SHUTTING_DOWN', 'the server is shutting down', { retryAfter: 1 });

/** Every cancelReason (the record's keys make the list exhaustive). */
const CANCEL_REASONS = Object.keys({ client_left: 0, timeout: 0, request_failed: 0 } satisfies Record<ReturnType<typeof cancelReason>, 0>);

/**
 * Why a task's signal fired, for inference_cancelled_total: REQUEST_TIMEOUT_S's deadline (a TimeoutError), the error that
 * failed another instance of the request (generation.ts aborts with it), or else its client leaving.
 */
export function cancelReason(reason: unknown): 'client_left' | 'timeout' | 'request_failed' {
  if (reason instanceof DOMException) return reason.name === 'TimeoutError' ? 'timeout' : 'client_left';
  return reason instanceof Error ? 'request_failed' : 'client_left';
}

/** The answer to a request that ran out of memory in a batch of its own: what it asked for, and what would fit. */
function outOfMemoryError(req: GenerationRequest, device: string): RuntimeError {
  const images = req.items.reduce((n, it) => n + it.numImages, 0);
  const what = images === 1 ? '1 image' : `${images} images`;
  const where = device === 'cpu' ? "this server's memory" : `the memory of this server's GPU (${device})`;
  return new RuntimeError('OUT_OF_MEMORY', `out of memory: ${what} of ${req.shape.height}x${req.shape.width} (height x width) ${images === 1 ? 'does' : 'do'} not fit in ${where}, even run alone; ask for a smaller height and width or fewer images (num_images_per_prompt), or use a server with a bigger GPU`);
}

/** The ids of the client requests of `tasks`, for a line about them (log.ts batchIds). */
const idsOf = (tasks: readonly Task[]) => batchIds(tasks.map((t) => t.req.ids));

/** What a batch generates (the first request's shape, as the job has it), without its prompts. */
function batchShape(tasks: readonly Task[]) {
  const head = tasks[0]!.req;
  const { height, width, steps, scheduler } = head.shape;
  const loras = lorasKey(head.loras);
  return {
    images: tasks.reduce((n, t) => n + t.images, 0), requests: new Set(tasks.map((t) => t.request)).size, width, height, steps,
    ...(scheduler !== undefined ? { scheduler } : {}), ...(head.image ? { mode: head.image.mode } : {}), ...(loras ? { loras } : {}),
  };
}

/** A batch a worker runs, for the termination message (termination.ts). */
function inFlightOf(w: WorkerHandle, run: Running): InFlight {
  const { requestIds = [], traceIds = [] } = idsOf(run.tasks);
  const joined = run.tasks.reduce((n, t) => n + (t.joined?.count ?? 0), 0);
  return {
    worker: w.index, ...batchShape(run.tasks), ...(run.warmup ? { warmup: true } : {}), ...(joined > 0 ? { joined } : {}), startedAt: run.startedAt,
    step: run.unetRuns ?? 0, of: run.unetOf ?? run.tasks[0]!.req.shape.steps, decoding: w.running !== run, requestIds, traceIds,
  };
}

/** Whether requests joined to the task's generation (SubmitOptions.joined) wait for its images. */
const waitedFor = (t: Task): boolean => t.joined !== undefined && t.joined.count > 0;

/** The batches a worker holds: the one it is stepping, then those it is decoding. */
function runsOf(w: WorkerHandle): Running[] {
  return [...(w.running ? [w.running] : []), ...w.decoding];
}

/** The worker with the fewest batches decoding, then the one idle longest: spreads batches over the GPUs. */
function leastBusy(ws: WorkerHandle[]): WorkerHandle {
  return ws.reduce((a, b) => (b.decoding.length < a.decoding.length || (b.decoding.length === a.decoding.length && b.dispatchedAt < a.dispatchedAt) ? b : a));
}
