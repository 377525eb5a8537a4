/**
 * @module One runtime: metrics, the boot state, the engine, the generation path and the background writer wired
 * together, and `close()`. No module-level state, so two runtimes can live in one process. `main` wires it to the
 * HTTP server and runs its boot (boot-sequence.ts).
 */
import { setMaxListeners } from 'node:events';
import type { Config } from '../config.js';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { createMetrics, type Metrics } from '../metrics.js';
import { Boot } from './boot.js';
import { BootEvents } from './boot-events.js';
import { Engine } from './engine.js';
import { createGeneration, type Generation } from './generation.js';
import { createOptimizedWriter, type OptimizedWriter } from './optimized-writer.js';
import type { SpawnedWorker } from './workers.js';
import { createImageSource, type ImageSource } from './image-source.js';
import { InputBudget } from './image-request.js';
import { createRequestS3, type RequestS3 } from '../storage/request-s3.js';
import { PROGRESS_LOG_MS } from '../storage/fetch.js';
import { startCleanup, warnStepFailed, type Cleanup } from '../storage/pending-io.js';

/**
 * How long close() waits, at most, for the aborts of multipart uploads that failed output_uri uploads left (a pod's
 * grace period is 30 s by default, and the drain came first).
 */
const UPLOAD_ABORTS_MS = 10_000;

export interface RuntimeOptions {
  /** Process start, for the time-to-ready metric (performance.now() based); default: when the runtime is built. */
  startedAt?: number;
  /** Workers `main` started right after listening (their heavy imports are already under way). */
  workers?: SpawnedWorker[];
  /** The emitter `main` made with the logger, which the boot's fetch emitted on before this runtime existed. */
  events?: BootEvents;
  /** How often a long load or warm-up logs where it is (default PROGRESS_LOG_MS, as a download). */
  progressLogMs?: number;
}

/** The HTTP server `main` wired in: close() stops its listening socket first and its last connections at the end. */
export interface Listener {
  closeListener(): void;
  /** Resolves once no request is being answered (its body still arriving, or its answer still being written). */
  answered(): Promise<void>;
  closeConnections(): void;
}

export class Runtime {
  readonly metrics: Metrics;
  /** The runtime's landmarks (listening, boot states, sessions, warm-ups, ready, shutdown), each also a log line. */
  readonly events: BootEvents;
  readonly boot: Boot;
  readonly engine: Engine;
  readonly generation: Generation;
  readonly optimizer: OptimizedWriter;
  /** Reads requests' s3:// input images (img2img, inpainting). */
  readonly images: ImageSource;
  /** What the input images of all requests in flight may hold at once (INPUT_IMAGES_MB). */
  readonly inputBudget: InputBudget;
  readonly startedAt: number;
  readonly #workers: SpawnedWorker[] | undefined;
  #listener: Listener | undefined;
  #stopping = false;
  #closing: Promise<void> | undefined;
  #endGrace: (() => void) | undefined;
  #cleanup: Cleanup | undefined;
  readonly #shutdown = new AbortController();
  /** Run at the end of close(), once the workers are closed (the cache entry's lease). */
  readonly #atClose: Array<() => Promise<void>> = [];
  /** The client for the objects requests name (input images, output_uri), made on first use. */
  readonly #requestS3: RequestS3;

  constructor(
    readonly cfg: Readonly<Config>,
    readonly log: Logger,
    opts: RuntimeOptions = {},
  ) {
    this.#requestS3 = createRequestS3(cfg.s3, undefined, log);
    // Every open WebSocket listens for the shutdown (and removes its listener on close): not a leak.
    setMaxListeners(0, this.#shutdown.signal);
    this.startedAt = opts.startedAt ?? performance.now();
    this.#workers = opts.workers;
    this.metrics = createMetrics();
    this.events = opts.events ?? new BootEvents(log);
    this.boot = new Boot(cfg.modelName, (c, msg, level) => this.events.emit('state', c, msg, level), this.metrics);
    this.#logProgress(opts.progressLogMs ?? PROGRESS_LOG_MS);
    this.engine = new Engine(cfg, log, this.metrics, {
      onImported: (ms, randn) => log.info({ ms: Math.round(ms), randn }, 'onnxruntime-node imported'),
      onSession: (component, provider, ms, optimizedCache, thread) => {
        this.boot.progress.sessions[component] = provider;
        this.metrics.sessionCreate.set({ model_name: cfg.modelName, component, provider }, ms / 1000);
        this.events.emit('session', { component, provider, ms: Math.round(ms), optimizedCache, thread }, 'onnx session created');
      },
      onAdapters: (d) => this.events.emit('adapters-ready', d, 'LoRA adapter set ready'),
      // A pipeline worker died after ready: not ready until one started again has loaded the model.
      onServing: (serving, reason) => {
        if (!serving && this.boot.state === 'ready') this.boot.to('loading', reason);
        else if (serving && this.boot.state === 'loading' && this.boot.wasReady) this.boot.to('ready');
      },
    });
    this.generation = createGeneration(cfg, this.metrics, this.engine, this.#requestS3, log);
    this.optimizer = createOptimizedWriter(cfg, log, this.events, () => this.#stopping);
    this.images = createImageSource(this.#requestS3, cfg, () => this.metrics.s3Throttled.inc({ model_name: cfg.modelName, operation: 'input_read' }),
      (outcome) => this.metrics.s3Requests.inc({ model_name: cfg.modelName, operation: 'input_read', outcome }));
    this.inputBudget = new InputBudget(cfg.inputImagesMb * 1024 * 1024);
  }

  /**
   * While the boot loads or warms up, a line every `everyMs` with the time so far and the sessions made, as a download
   * logs its progress: a large UNet's session on the CPU (30-45 s) or a CPU warm-up is otherwise a silence that looks hung.
   */
  #logProgress(everyMs: number): void {
    let timer: NodeJS.Timeout | undefined;
    this.events.on((e) => {
      if (e.name !== 'state') return;
      clearInterval(timer);
      const { state } = e.data;
      if (state !== 'loading' && state !== 'warming') return;
      const since = performance.now();
      timer = setInterval(() => {
        const seconds = Math.round((performance.now() - since) / 1000);
        this.log.info({ state, seconds, sessions: { ...this.boot.progress.sessions } }, `boot still ${state}`);
      }, everyMs);
      timer.unref();
    });
  }

  /**
   * close()'s cleanup, once its drain is over (storage/pending-io.ts): what it left unfinished after CLEANUP_MS (`the
   * pipeline workers`, `the model fetch and the cache entry lease`, `the output uploads`: a thread of the process may be
   * stuck on a volume that does not answer), and the wait, within the same bound, for the file calls still pending.
   */
  get cleanup(): Cleanup | undefined {
    return this.#cleanup;
  }

  /** True from the start of close(): readiness is false and new work gets 503. */
  get stopping(): boolean {
    return this.#stopping;
  }

  /** Aborted when close() begins: the boot stops with it. */
  get shutdown(): AbortSignal {
    return this.#shutdown.signal;
  }

  /** Hands the engine its workers (spawned now unless `main` did); each imports onnxruntime-node at once. */
  startWorkers(): void {
    this.engine.start(this.#workers);
  }

  /** `fn` runs at the end of close(), after the workers stopped reading the model's files. */
  atClose(fn: () => Promise<void>): void {
    this.#atClose.push(fn);
  }

  /** The listening socket close() stops accepting on. */
  setListener(l: Listener): void {
    this.#listener = l;
  }

  /**
   * SIGTERM: readiness false at once, no new connections, in-flight requests finish within the grace
   * period, then the workers close. Idempotent.
   */
  close(graceMs = this.cfg.shutdownGraceS * 1000): Promise<void> {
    return (this.#closing ??= (async () => {
      this.#stopping = true;
      const was = this.boot.state;
      this.boot.to('stopping');
      this.engine.stopAccepting();
      this.#shutdown.abort(new RuntimeError('SHUTTING_DOWN', 'shutting down'));
      this.#listener?.closeListener();
      this.events.emit('draining', { inflight: this.generation.inflight, queued: this.engine.queueDepth, graceMs, bootState: was }, 'shutting down: draining in-flight requests');
      let timer: NodeJS.Timeout | undefined;
      // Then the answers: a request whose body was still arriving at the signal is answered (503 once it has come), and
      // a large answer to a client reading slowly is written whole, not cut by closeConnections() below.
      const drained = await Promise.race([
        this.generation.drained().then(() => this.#listener?.answered()).then(() => true),
        new Promise<boolean>((r) => {
          timer = setTimeout(() => r(false), graceMs);
          this.#endGrace = () => r(false);
        }),
      ]);
      clearTimeout(timer);
      if (!drained) this.log.warn({ inflight: this.generation.inflight }, 'grace period over: closing with requests still running');
      // What follows touches the model's files and the cache (the workers read them, the lease is released there): on a
      // volume that stopped answering it would wait for good, so it gets CLEANUP_MS in all, and what did not finish is
      // named (unfinished) and left: the next start or an eviction takes over a lease or lock whose heartbeat stopped.
      const cleanup = (this.#cleanup = startCleanup({ failed: warnStepFailed(this.log) }));
      // The lease goes only once the workers stopped reading the entry's files: left held while one may still read, it
      // keeps an eviction from removing them under it until its heartbeat goes stale.
      if (await cleanup.step('the pipeline workers', () => Promise.all([this.engine.close(), this.optimizer.stop()]))) {
        await cleanup.step('the model fetch and the cache entry lease', () => Promise.all(this.#atClose.map((fn) => fn().catch(() => undefined))));
      }
      // A failed output_uri upload's multipart upload is aborted through the request client: not cut by its destroy().
      await cleanup.step('the output uploads', () => this.generation.uploadsSettled(UPLOAD_ABORTS_MS));
      this.#requestS3.destroy();
      // Last, the connections still open (idle keep-alive ones): a process exits now anyway, an embedding one keeps none.
      this.#listener?.closeConnections();
      this.events.emit('shut-down', { drained, ...(cleanup.unfinished.length > 0 ? { unfinished: [...cleanup.unfinished] } : {}) }, 'shut down');
    })());
  }

  /**
   * Ends the grace period of a close under way now (a second stop signal): what still runs is stopped as when the
   * grace runs out. Before a close, or after its drain, nothing.
   */
  endGrace(): void {
    this.#endGrace?.();
  }
}
