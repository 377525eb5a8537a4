/**
 * @module A generation request's way through the runtime once parsed: the reading of its input images (which the server
 * hands it), its REQUEST_TIMEOUT_S, the result cache, the engine's queue, and the upload to output_uri. It counts the
 * requests in flight, for the gauge and the SIGTERM drain.
 */
import { defaultMaxListeners, setMaxListeners } from 'node:events';
import type { Config } from '../config.js';
import { deadline } from '../deadline.js';
import { RuntimeError, stoppedWhile } from '../errors.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { shuttingDownError, type EncodedImage, type Engine, type Progress, type TaskResult } from './engine.js';
import type { RequestS3 } from '../storage/request-s3.js';
import { createOutputStore, withWritten } from './output.js';
import type { GenerationRequest } from './request.js';
import { createResultCache, type ResultCache } from './result-cache.js';

export interface GenerateOptions {
  onProgress?: (p: Progress) => void;
  /** Once per request, when it is queued (or answered from the result cache). */
  onQueued?: () => void;
  /**
   * The request's own deadline (V2's parameters.timeout), taken where shorter than REQUEST_TIMEOUT_S. It runs from the
   * call, `read` included, as Triton's bounds the whole request; REQUEST_TIMEOUT_S starts at the generation.
   */
  timeoutMs?: number;
  /**
   * Reads the request's input images (the server's readImages), the request already in flight; returns what gives
   * back what they hold, run once the request has ended and the engine holds none of its generations (inputShare).
   */
  read?: (signal: AbortSignal) => Promise<() => void>;
}

export interface Generation {
  /** Runs requests through the result cache and the queue, counted in flight under `signal` (track); results in order. */
  generate(reqs: GenerationRequest[], signal: AbortSignal, opts?: GenerateOptions): Promise<TaskResult[]>;
  /**
   * Counts `work` as one request in flight (the gauge, drained()) until it settles; `id` names the request (its signal):
   * work of a request already counted (an edit's picture read before it is generated) runs within that count.
   */
  track<T>(id: object, work: () => Promise<T>): Promise<T>;
  /**
   * Throws SHUTTING_DOWN (counted in inference_rejected_total) unless request `id`, in flight (track), was admitted: in
   * flight before SIGTERM. For work on a request's inputs ahead of generate() (an edit's picture decoded for its
   * transparent area), which the drain would otherwise wait for only to answer 503, as generate() refuses before reading.
   */
  admit(id: object): void;
  readonly resultCache: ResultCache;
  /** Requests in flight, from the reading of their input images (a request of several generations counts once). */
  readonly inflight: number;
  /** Resolves once no request is in flight and the engine has nothing queued, running or encoding. */
  drained(): Promise<void>;
  /** Resolves once failed output_uri uploads' leftover multipart uploads are aborted (output.ts), or after `ms`. */
  uploadsSettled(ms: number): Promise<void>;
}

/** `s3`: the runtime's client for the objects requests name, here for output_uri. */
export function createGeneration(cfg: Readonly<Config>, metrics: Metrics, engine: Engine, s3: RequestS3, log?: Logger): Generation {
  const labels = { model_name: cfg.modelName };
  const resultCache = createResultCache(cfg.modelName, Math.floor(cfg.resultCacheMb * 1024 * 1024), {
    onChange: (bytes) => metrics.resultCacheBytes.set(labels, bytes),
    defaults: () => engine.defaults,
    encode: (text) => engine.encodeText(text),
  });
  // At 0 from the start, as every series with known labels (engine.ts #startAtZero).
  metrics.resultCacheBytes.set(labels, 0);
  metrics.resultCacheHits.inc(labels, 0);
  metrics.inflight.set(labels, 0);
  const output = createOutputStore(s3, log, () => metrics.s3Throttled.inc({ ...labels, operation: 'output_upload' }),
    () => metrics.s3Throttled.inc({ ...labels, operation: 'output_cleanup' }), {
      upload: (outcome) => metrics.s3Requests.inc({ ...labels, operation: 'output_upload', outcome }),
      cleanup: (outcome) => metrics.s3Requests.inc({ ...labels, operation: 'output_cleanup', outcome }),
    });
  /**
   * Generations of cacheable requests now queued or running, by result-cache key: an identical request (or instance of
   * the same request) waits for their images, counted in `joined` while it does (the engine keeps a generation queued,
   * or runs its batch on, for them after its own clients left).
   */
  const running = new Map<string, Running>();
  let inflight = 0;
  const waiters: Array<() => void> = [];
  /**
   * The requests in flight, and whether each was admitted: in flight before SIGTERM (reading its input images then),
   * it is queued after it (SubmitOptions.admitted), since the drain waits for it.
   */
  const counted = new WeakMap<object, boolean>();

  /** A result-cache answer: copies of `images`, counted as a hit. */
  const cachedResult = (images: readonly EncodedImage[], onQueued?: () => void): TaskResult => {
    metrics.resultCacheHits.inc(labels);
    onQueued?.();
    return { images: images.map((i) => ({ ...i, data: i.data.slice(0) })), times: { textEncoderMs: 0, denoiseMs: 0, vaeMs: 0, encodeMs: 0, steps: 0 }, batchSize: 0, queuedMs: 0, cached: true };
  };

  /**
   * The images of the identical generation already queued or running, or undefined when it was cancelled (its batch
   * was told to stop just before this request joined): this request then looks again (generateOne), and runs its own
   * unless another request joined to it already does. A generation whose clients left goes on with its adapters'
   * look-up and keeps its place in the queue while this request waits, a batch whose clients left runs on, and one that ran out of memory runs again alone; each gives its images here. Any other
   * failure (the grace period's end, out of memory alone) is this request's too, as in a shared batch, and so is a
   * refusal once its adapters were looked up (counted in inference_rejected_total for this request too). A request
   * that streams its progress (the WebSocket) hears the generation's steps from now on through `onProgress`, and
   * `onQueued` once the generation is queued (at once if it is), as it would of its own.
   */
  const joinRunning = async (other: Running, request: object, signal: AbortSignal, onProgress: ((p: Progress) => void) | undefined,
    onQueued: () => void, previews: boolean): Promise<readonly EncodedImage[] | undefined> => {
    other.joined.count++;
    if (previews) other.joined.previews++;
    // A batch told to stop, every other party gone, goes on; previews are rendered again if this one wants them.
    engine.joinersChanged(other.joined);
    if (onProgress) other.listeners.add(onProgress);
    if (other.queued) onQueued();
    else other.whenQueued.add(onQueued);
    let leave = () => undefined as void;
    const left = new Promise<never>((_, reject) => {
      // At its deadline, while S3 throttles the look-up of the generation's adapters: TIMEOUT saying so, as its owner's.
      leave = () => reject(engine.lookupStopped(other.joined, signal) ?? new RuntimeError('CANCELLED', 'the client left'));
      if (signal.aborted) leave();
      signal.addEventListener('abort', leave, { once: true });
    });
    try {
      return await Promise.race([other.images, left]);
    } catch (err) {
      if (signal.aborted) throw err;
      if (!(err instanceof RuntimeError && err.code === 'CANCELLED')) {
        // This request's answer: a refusal of the generation (its LoRA adapters looked up, the queue was full) counts.
        engine.refusedWith(request, err);
        throw err;
      }
      return undefined;
    } finally {
      signal.removeEventListener('abort', leave);
      if (onProgress) other.listeners.delete(onProgress);
      other.whenQueued.delete(onQueued);
      if (previews) other.joined.previews--;
      // The last to wait, gone: the generation stops if its own clients left too.
      if (--other.joined.count === 0 && signal.aborted) engine.joinersLeft(other.joined);
      else engine.joinersChanged(other.joined);
    }
  };

  /**
   * Result cache → an identical generation queued or running (another request's, or an earlier instance's of this
   * one) → queue → cache fill → optional upload to output_uri.
   * `request`: the object every generation of one client request shares (the engine queues the request as one).
   * `upload`: the request's uploads, each under way until it settles; aborted by the client's leaving or the timeout,
   * not by `signal`'s failure of another generation of the request (generate()).
   * `inputs`: the request's share of the input budget, held while the engine holds the generation.
   */
  const generateOne = async (req: GenerationRequest, request: object, signal: AbortSignal, upload: Uploads, inputs: InputShare,
    onProgress?: (p: Progress) => void, onQueued?: () => void): Promise<TaskResult> => {
    const key = resultCache.keyOf(req);
    let hit: readonly EncodedImage[] | undefined = key === undefined ? undefined : resultCache.get(key);
    // Once: on joining a generation once it is queued, or on its own queueing, or with the images of the cache.
    let told = false;
    const queued = () => {
      if (told) return;
      told = true;
      onQueued?.();
    };
    // A request that streams previews joins only a generation that renders them as often (preview_every is not part
    // of the key: the images do not depend on it); one that streams steps alone is not sent the previews of another.
    const follow = onProgress && (req.previewEvery > 0 ? onProgress : (p: Progress) => onProgress({ step: p.step, of: p.of }));
    const joinable = (r: Running | undefined) => (r !== undefined && (req.previewEvery === 0 || r.previewEvery === req.previewEvery) ? r : undefined);
    // Looked up in the turn generate() called this, as a generation is registered below, before any wait: an identical
    // instance later in the same request joins the generation of the first, as an identical request would.
    let other = hit === undefined && key !== undefined ? joinable(running.get(key)) : undefined;
    while (other) {
      hit = await joinRunning(other, request, signal, follow, queued, onProgress !== undefined && req.previewEvery > 0);
      // Cancelled: the first of the requests joined to it to look again registers its own generation below, in the
      // same turn, and the others join that one (each used to run one of its own).
      other = hit === undefined ? joinable(running.get(key!)) : undefined;
    }
    let result: TaskResult;
    if (hit) result = cachedResult(hit, queued);
    else {
      // The generation's images fill the result cache and serve the identical requests joined to it even when this
      // request's client leaves or times out while they are made or encoded: they were made all the same, and a joined
      // request would otherwise generate them again.
      let onMade: ((out: EncodedImage[] | Error) => void) | undefined;
      let joined: { count: number; previews: number } | undefined;
      let progress = onProgress;
      let whenQueued = onQueued && queued;
      if (key !== undefined) {
        // The first such generation is the one identical requests join (joinRunning).
        let settle: ((out: EncodedImage[] | Error) => void) | undefined;
        let mine: Running | undefined;
        if (!running.has(key)) {
          const shared = new Promise<EncodedImage[]>((resolve, reject) => {
            // Copied as the generation ends, before this request's answer can hand its buffers on.
            settle = (out) => (out instanceof Error ? reject(out) : resolve(out.map((i) => ({ ...i, data: i.data.slice(0) }))));
          });
          shared.catch(() => undefined);
          joined = { count: 0, previews: 0 };
          const own: Running = (mine = { images: shared, joined, previewEvery: req.previewEvery, listeners: new Set(), queued: false, whenQueued: new Set() });
          running.set(key, own);
          // Every step to this request's client while it is there, and to the requests joined to the generation (the
          // engine goes on telling them after its client left).
          progress = (p) => {
            if (!signal.aborted) onProgress?.(p);
            for (const l of own.listeners) l(p);
          };
          whenQueued = () => {
            queued();
            own.queued = true;
            for (const f of own.whenQueued) f();
            own.whenQueued.clear();
          };
        }
        onMade = (out) => {
          if (!(out instanceof Error)) resultCache.put(key, out);
          // Gone before the joined requests hear of it: those told it was cancelled look again, for another.
          if (mine !== undefined && running.get(key) === mine) running.delete(key);
          settle?.(out);
        };
      }
      // Admitted (generate: admit): queued after SIGTERM all the same, as the drain waits for it.
      result = await engine.submit(req, { signal, request, admitted: true, onEnded: inputs.use(), ...(progress ? { onProgress: progress } : {}), ...(whenQueued ? { onQueued: whenQueued } : {}), ...(onMade ? { onMade } : {}), ...(joined ? { joined } : {}) });
    }
    if (req.output.uri !== undefined) {
      if (signal.aborted) throw new RuntimeError('CANCELLED', 'the client left before the upload');
      const up = output.upload(req.output.uri, result.images, upload.signal);
      upload.started.push(up);
      result.uris = await up;
    }
    return result;
  };

  const track = async <T>(id: object, work: () => Promise<T>): Promise<T> => {
    if (counted.has(id)) return work();
    counted.set(id, engine.accepting);
    inflight++;
    metrics.inflight.set(labels, inflight);
    try {
      return await work();
    } finally {
      counted.delete(id);
      inflight--;
      metrics.inflight.set(labels, inflight);
      if (inflight === 0) for (const w of waiters.splice(0)) w();
    }
  };

  const admit = (id: object): void => {
    // Not admitted (its body came after SIGTERM): refused before its input images are read, which the drain would wait
    // for only to answer the engine's 503, and before the result cache, as an arrival after the signal is. `counted`
    // holds engine.accepting when the request was counted (track), and stopAccepting() is for good: not admitted, the
    // engine is not accepting now either, so that needs no second look.
    if (counted.get(id) === true) return;
    metrics.rejected.inc({ ...labels, reason: 'shutting_down' });
    throw shuttingDownError();
  };

  return {
    resultCache,
    get inflight() {
      return inflight;
    },
    track,
    admit,
    generate: (reqs, signal, { onProgress, onQueued, timeoutMs, read } = {}) => track(signal, async () => {
      // A request that outlives REQUEST_TIMEOUT_S leaves the queue, or stops its batch at the next step. Its own shorter
      // deadline runs from now, the reading of its input images included; REQUEST_TIMEOUT_S from the generation (the
      // reading has its own).
      const own = timeoutMs !== undefined && timeoutMs < cfg.requestTimeoutS * 1000;
      const limitMs = own ? timeoutMs : cfg.requestTimeoutS * 1000;
      let timeout = own ? deadline(signal, limitMs) : undefined;
      const inputs = inputShare();
      // One generation refused or failed fails the request: its others leave the queue (or stop) rather than run for
      // nobody, holding queue slots that other clients are refused for.
      const failed = new AbortController();
      const uploads: Uploads['started'] = [];
      let each: Array<Promise<TaskResult>> = [];
      try {
        admit(signal);
        if (read) inputs.held(await read(timeout?.signal ?? signal));
        timeout ??= deadline(signal, limitMs);
        const both = AbortSignal.any([timeout.signal, failed.signal]);
        // Each generation of the request listens on `both` while queued or running, and each image on the timeout's while
        // uploading: up to MAX_IMAGES_PER_REQUEST at once, all removed when done. More than Node's 10 is no leak, so no
        // warning for it.
        setMaxListeners(Math.max(defaultMaxListeners, cfg.maxImagesPerRequest + 1), both, timeout.signal);
        const upload: Uploads = { signal: timeout.signal, started: uploads };
        each = reqs.map((r) => generateOne(r, reqs, both, upload, inputs, onProgress, onQueued));
        return await Promise.all(each);
      } catch (err) {
        // Aborted with the failure itself, so the siblings it stops are counted as request_failed, not client_left.
        failed.abort(err instanceof Error ? err : new Error(String(err)));
        if (timeout?.timedOut && !signal.aborted) {
          const limit = own ? `its parameters.timeout (${Math.round(timeoutMs * 1000)} µs)` : `REQUEST_TIMEOUT_S=${cfg.requestTimeoutS}s`;
          // The deadline stops every instance, and the first to answer (one still queued or generating: CANCELLED) is
          // seldom the one S3 was throttling: the answer says what held the request wherever it was.
          const why = [err, ...(await Promise.allSettled(each)).flatMap((o) => (o.status === 'rejected' ? [o.reason] : []))].find((e) => stoppedWhile(e) !== '') ?? err;
          throw new RuntimeError('TIMEOUT', `the request took longer than ${limit} and was stopped${stoppedWhile(why)}`, { cause: why });
        }
        // Other instances' uploads under way end first, as one instance's images do (output.ts): cancelled, their
        // requests already sent would land after the error.
        const written = (await Promise.allSettled(uploads)).flatMap((u) => (u.status === 'fulfilled' ? u.value : []));
        throw withWritten(err, written, "instances' images");
      } finally {
        timeout?.clear();
        inputs.end();
      }
    }),
    uploadsSettled: (ms) => output.settled(ms),
    drained() {
      if (inflight === 0) return engine.idle();
      return new Promise<void>((r) => waiters.push(r)).then(() => engine.idle());
    },
  };
}

/** A generation of a cacheable request, queued or running: its images, and the identical requests waiting for them. */
interface Running {
  readonly images: Promise<EncodedImage[]>;
  readonly joined: { count: number; previews: number };
  /** Its request's preview_every: the previews its steps carry. */
  readonly previewEvery: number;
  /** The progress of the requests waiting for it that stream theirs (generateOne: `follow`). */
  readonly listeners: Set<(p: Progress) => void>;
  /** It was queued (it passed every check that could refuse it); until then, the onQueued of those waiting. */
  queued: boolean;
  readonly whenQueued: Set<() => void>;
}

/**
 * A request's share of INPUT_IMAGES_MB (GenerateOptions.read's release), given back once the request has ended and the
 * engine holds none of its generations: one kept after its client was answered (for the identical requests joined to
 * it, or for the rest of its batch) still holds the request's decoded images, and giving the share back with the
 * answer let the requests in progress hold more than the budget.
 */
interface InputShare {
  /** What gives the share back. */
  held(release: () => void): void;
  /** A generation handed to the engine: returns its SubmitOptions.onEnded. */
  use(): () => void;
  /** The request has ended. */
  end(): void;
}

function inputShare(): InputShare {
  let release = () => undefined as void;
  let using = 0;
  let ended = false;
  const settle = () => {
    if (ended && using === 0) release();
  };
  return {
    held: (r) => void (release = r),
    use: () => {
      using++;
      return () => {
        using--;
        settle();
      };
    },
    end: () => {
      ended = true;
      settle();
    },
  };
}

/** A request's output_uri uploads: the signal that cancels them, and those started. */
interface Uploads {
  readonly signal: AbortSignal;
  readonly started: Array<Promise<string[]>>;
}
