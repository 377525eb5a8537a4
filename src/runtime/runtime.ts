/** @module One runtime: HTTP server, boot, engine and shutdown wired together (no module-level state). */
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config.js';
import { describeConfig } from '../config.js';
import { isRuntimeError, RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { createMetrics, type Metrics } from '../metrics.js';
import { loadSharp } from '../pipeline/image.js';
import { registerRoutes } from '../server/app.js';
import { listenBase, type BaseServer } from '../server/base.js';
import type { ServerContext } from '../server/context.js';
import { Boot } from './boot.js';
import { Engine, type Progress, type TaskResult } from './engine.js';
import type { FromOptimizer, OptimizeItem, OptimizerInit } from '../pipeline/protocol.js';
import { removeWriterTemps } from '../pipeline/ortcache.js';
import type { GenerationRequest } from './request.js';
import type { SpawnedWorker } from './workers.js';
import { announcement } from './announce.js';
import { isLayoutFile, isTokenizerFolder } from '../pipeline/model.js';
import type { CommittedEntry } from '../storage/peek.js';
import type { EarlyFetch } from './early-fetch.js';
import { checkSchedulerName, randomSeed } from './names.js';
import { startGpuMetrics } from './gpu.js';
import { createOutputStore, type OutputStore } from './output.js';
import { createImageSource, type ImageSource } from './image-source.js';
import { warmupInpaint } from './image-request.js';
import { createResultCache, type ResultCache } from './result-cache.js';

export interface RuntimeOptions {
  /** process start, for the time-to-ready metric (performance.now() based). */
  startedAt?: number;
  /** Workers `main` started right after listening (their heavy imports are already under way). */
  workers?: SpawnedWorker[];
  /**
   * The committed cache entry `main` found for an s3:// STORAGE_URI and announced to those workers (null: it looked
   * and found none); undefined: not looked at, the runtime looks itself.
   */
  early?: CommittedEntry | null;
  /** The S3 fetch `main` started for STORAGE_URI before importing the runtime; the runtime takes it over. */
  fetch?: EarlyFetch;
}

export class Runtime {
  readonly metrics: Metrics;
  readonly boot: Boot;
  readonly engine: Engine;
  readonly resultCache: ResultCache;
  readonly #output: OutputStore;
  readonly #images: ImageSource;
  #server: BaseServer | undefined;
  #stopping = false;
  #closing: Promise<void> | undefined;
  readonly #abort = new AbortController();
  #inflight = 0;
  #inflightWaiters: Array<() => void> = [];
  #optimizer: { child: ChildProcess; files: string[] } | undefined;
  /** The warm-up begun while weights still downloaded (#maybeWarmEarly); `stale` once the files it used changed. */
  #early: { done: Promise<void>; abort: AbortController; stale: boolean } | undefined;
  #sharp = false;
  /** Boot reached ready once: a later `loading` is a pipeline worker being started again. */
  #wasReady = false;

  constructor(
    readonly cfg: Readonly<Config>,
    readonly log: Logger,
    private readonly opts: RuntimeOptions = {},
  ) {
    this.metrics = createMetrics();
    this.boot = new Boot(cfg.modelName, log, this.metrics);
    this.engine = new Engine(cfg, log, this.metrics, {
      onImported: (ms) => log.info({ ms: Math.round(ms) }, 'onnxruntime-node imported'),
      onSession: (component, provider, ms, optimizedCache) => {
        this.boot.progress.sessions[component] = provider;
        this.metrics.sessionCreate.set({ model_name: cfg.modelName, component, provider }, ms / 1000);
        log.info({ component, provider, ms: Math.round(ms), optimizedCache }, 'onnx session created');
      },
      // A pipeline worker died after ready: not ready until one started again has loaded the model.
      onServing: (serving, reason) => {
        if (!serving && this.boot.state === 'ready') this.boot.to('loading', reason);
        else if (serving && this.boot.state === 'loading' && this.#wasReady) this.boot.to('ready');
      },
    });
    const labels = { model_name: cfg.modelName };
    this.resultCache = createResultCache(cfg.modelName, Math.floor(cfg.resultCacheMb * 1024 * 1024), (bytes) => this.metrics.resultCacheBytes.set(labels, bytes));
    this.metrics.resultCacheBytes.set(labels, 0);
    this.#output = createOutputStore(cfg.s3);
    this.#images = createImageSource(cfg.s3);
  }

  context(): ServerContext {
    return {
      cfg: this.cfg,
      log: this.log,
      metrics: this.metrics,
      boot: this.boot,
      engine: this.engine,
      checkScheduler: checkSchedulerName,
      randomSeed,
      stopping: () => this.#stopping,
      images: this.#images,
      generate: (reqs, signal, onProgress) => this.#generate(reqs, signal, onProgress),
    };
  }

  /** Listens (base server with liveness first), then adds every other route. */
  async listen(): Promise<number> {
    return this.attach(await listenBase(this.cfg.host, this.cfg.port));
  }

  /** Takes over a base server that is already answering liveness. */
  attach(base: BaseServer): number {
    this.#server = base;
    registerRoutes(base, this.context());
    this.log.info({ port: base.port, host: this.cfg.host, config: describeConfig(this.cfg) }, 'listening');
    return base.port;
  }

  /** resolving → fetching → loading → warming → ready. Never throws: a failure becomes the `failed` state. */
  async start(): Promise<void> {
    const started = this.opts.startedAt ?? performance.now();
    this.engine.start(this.opts.workers); // workers import ORT while we resolve and fetch
    // With a committed entry the tokenizers parse first on this thread (the warm-up needs them as soon as the
    // sessions exist; sharp only at its end): see #resolveAndFetch. Otherwise sharp loads now.
    if (!this.opts.early) void this.#importSharp();
    try {
      const dir = await this.#resolveAndFetch();
      if (this.#stopping) return;
      this.boot.to('loading');
      const loaded = await this.engine.load(dir);
      if (loaded.fallbackReason) this.boot.progress.sessions.fallback = loaded.fallbackReason;
      if (Object.values(loaded.providers).includes('cuda')) void this.#startGpuMetrics();
      if (this.#stopping) return;
      this.boot.to('warming');
      await this.#finishWarmup();
      if (this.#stopping) return;
      this.boot.to('ready');
      this.#wasReady = true;
      const secs = (performance.now() - started) / 1000;
      this.metrics.modelLoadTime.set({ model_name: this.cfg.modelName }, secs);
      this.log.info({ seconds: Number(secs.toFixed(3)), phases: this.boot.phases, providers: loaded.providers }, 'model ready');
      if (loaded.optimize.length > 0) {
        try {
          this.#writeOptimized(loaded.optimize);
        } catch (err) {
          // Only later starts would have gained: serving goes on.
          this.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'could not start the optimized model cache writer');
        }
      }
    } catch (err) {
      // A warm-up begun during the download may be waiting for files that will not come.
      this.#early?.abort.abort();
      if (this.#stopping && this.#abort.signal.aborted) return;
      const reason = isRuntimeError(err) ? err.message : `unexpected error: ${(err as Error)?.message ?? String(err)}`;
      if (!isRuntimeError(err)) this.log.error({ err }, 'boot crashed');
      this.boot.to('failed', reason);
      if (this.cfg.exitOnBootFailure) {
        await this.close(0);
        process.exitCode = 1;
      }
    }
  }

  /**
   * sharp encodes every image on this thread (engine.ts): it loads on this thread's core while the workers import
   * ORT and build sessions on theirs, after `after` (the tokenizers, needed earlier). Once per runtime. A failure
   * surfaces where an image is first encoded (the warm-up).
   */
  async #importSharp(after?: Promise<unknown>): Promise<void> {
    if (this.#sharp) return;
    this.#sharp = true;
    await after;
    const t0 = performance.now();
    try {
      await loadSharp();
      this.log.info({ ms: Math.round(performance.now() - t0) }, 'sharp imported');
    } catch {
      // reported by the first encode
    }
  }

  async #resolveAndFetch(): Promise<string> {
    const uri = this.cfg.storageUri ?? (existsSync('/mnt/models') ? '/mnt/models' : undefined);
    if (uri === undefined) {
      const { ensureDemoModel } = await import('../demo/index.js');
      const dir = await ensureDemoModel(this.cfg.cacheDir, this.log);
      this.log.info({ dir }, 'no STORAGE_URI and no /mnt/models: serving the embedded demo model');
      this.#announceAll(dir);
      return dir;
    }
    const componentFiles = new Map<string, Set<string>>();
    const ready = new Set<string>();
    const announced = new Set<string>();
    const listed = new Set<string>();
    const onListing = (files: ReadonlyArray<{ relPath: string; size: number }>) => {
      for (const f of files) {
        listed.add(f.relPath);
        const comp = f.relPath.split('/')[0]!;
        if (!componentFiles.has(comp)) componentFiles.set(comp, new Set());
        componentFiles.get(comp)!.add(f.relPath);
      }
    };
    /** `tell` false: only the bookkeeping for sessions (`main` told the workers already); tokenizers parse here either way. */
    const onFileReady = (rel: string, abs: string, tell = true) => {
      ready.add(rel);
      const comp = rel.split('/')[0]!;
      const all = componentFiles.get(comp);
      // A component's session starts as soon as all of its own files are whole.
      const dir = abs.slice(0, abs.length - rel.length);
      if (all && !announced.has(comp) && [...all].every((f) => ready.has(f))) {
        announced.add(comp);
        if (tell || isTokenizerFolder(comp)) this.#announce(path.join(dir, comp));
      }
      this.#maybeWarmEarly(dir, listed, ready, announced);
    };
    // A new download round: what was announced may be replaced, so sessions and an early warm-up start over.
    const onRestart = () => {
      for (const s of [componentFiles, ready, announced, listed]) s.clear();
      this.#invalidate('objects changed during the download; starting the sessions again');
    };
    // A committed entry starts its sessions now, while S3 is asked whether it is current;
    // the answer comes before warm-up, and a changed entry drops those sessions (below).
    const { peekCommitted, sameCommit } = await import('../storage/peek.js');
    // `main` may have looked already (and told the workers): the comparison below must use what they were told.
    const early = this.opts.early !== undefined ? this.opts.early : await peekCommitted(uri, this.cfg);
    if (early) {
      this.log.info({ dir: early.dir, files: early.manifest.files.length }, 'committed cache entry found: starting sessions while S3 is checked');
      onListing(early.manifest.files.map((f) => ({ relPath: f.path, size: f.size })));
      // When `main` found the entry, it has told the workers already.
      for (const f of early.manifest.files) onFileReady(f.path, path.join(early.dir, f.path), this.opts.early === undefined);
      void this.#importSharp(this.engine.tokenizersSettled());
    }
    // `main` usually started the fetch before the runtime loaded (see early-fetch.ts); the runtime takes it over.
    const fetch = this.opts.fetch ?? (await (await import('./early-fetch.js')).startFetch(uri, this.cfg, this.log));
    const stop = () => fetch.abort.abort(this.#abort.signal.reason);
    if (this.#abort.signal.aborted) stop();
    else this.#abort.signal.addEventListener('abort', stop, { once: true });
    this.boot.to('fetching');
    fetch.attach({ onListing, onFileReady, onRestart, onProgress: (p) => Object.assign(this.boot.progress, p, { phase: p.phase }) });
    const res = await fetch.result;
    if (early) {
      const now = await peekCommitted(uri, this.cfg);
      if (!now || now.dir !== res.dir || !sameCommit(early.manifest, now.manifest)) {
        this.#invalidate('the cache entry changed after its sessions started; loading them again', { dir: res.dir });
      }
    }
    if (res.fromCache) this.metrics.cacheHits.inc({ model_name: this.cfg.modelName });
    else this.metrics.fetchedBytes.inc({ model_name: this.cfg.modelName }, res.bytes);
    this.log.info({ dir: res.dir, fromCache: res.fromCache, bytes: res.bytes, files: res.files, seconds: res.seconds }, 'model files ready');
    return res.dir;
  }

  /** Sessions (and an early warm-up) were built from files that changed: the workers drop them before the next load. */
  #invalidate(msg: string, fields: Record<string, unknown> = {}): void {
    this.log.info(fields, msg);
    this.engine.resetSessions();
    if (this.#early) {
      this.#early.stale = true;
      this.#early.abort.abort();
    }
  }

  /**
   * Starts the warm-up before the last weights have arrived, once the layout's small files are whole and the UNet's
   * files too: the workers load a partial pipeline from the listing, and the generation encodes and denoises while
   * the rest streams, awaiting each session where it needs it (the VAE decoder's comes last). Ready still waits for
   * the committed cache entry and this warm-up's end (#finishWarmup). At most once per boot.
   */
  #maybeWarmEarly(dir: string, listed: ReadonlySet<string>, ready: ReadonlySet<string>, announced: ReadonlySet<string>): void {
    if (this.#early || this.#stopping || this.cfg.warmupSteps === 0 || !announced.has('unet')) return;
    for (const f of listed) if (isLayoutFile(f) && !ready.has(f)) return;
    const abort = new AbortController();
    const signal = AbortSignal.any([abort.signal, this.#abort.signal]);
    const files = [...listed];
    const done = (async () => {
      await this.engine.load(dir, files);
      signal.throwIfAborted();
      // filesPending 0: a cache hit whose entry S3 has not confirmed yet.
      this.log.info({ filesPending: files.filter((f) => !ready.has(f)).length }, 'warm-up started before the fetch finished');
      await this.#warmup(signal);
    })();
    done.catch(() => undefined); // awaited by #finishWarmup
    this.#early = { done, abort, stale: false };
  }

  /** Awaits the warm-up begun during the download, or runs one now (none began, its files changed, or it failed). */
  async #finishWarmup(): Promise<void> {
    const early = this.#early;
    if (early && !early.stale) {
      try {
        return await early.done;
      } catch (err) {
        if (this.#stopping) throw err;
        this.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'the warm-up begun during the download failed; warming up again');
      }
    } else if (early) {
      await early.done.catch(() => undefined);
    }
    await this.#warmup();
  }

  /** The demo model is whole from the start: every component's session can start at once. */
  #announceAll(dir: string): void {
    for (const comp of safeList(dir)) this.#announce(path.join(dir, comp));
  }

  /** A whole component folder: start its ONNX session, or parse its tokenizer, in the workers. */
  #announce(compDir: string): void {
    const m = announcement(compDir);
    if (m?.t === 'component') this.engine.componentReady(m.component, m.path);
    else if (m?.t === 'tokenizer') this.engine.tokenizerReady(m.dir);
  }

  /** One real generation at the served default resolution through the request path. */
  /**
   * One real generation at the served default resolution through the request path, on every worker (each has its
   * own sessions, on its own GPU): ready means any worker can take the first request.
   */
  async #warmup(signal?: AbortSignal): Promise<void> {
    if (this.cfg.warmupSteps === 0) return;
    const d = this.engine.defaults!;
    const t0 = performance.now();
    await Promise.all(
      this.engine.workerIndexes.map(async (worker) => {
        const r = await this.engine.submit(
          {
            shape: { steps: this.cfg.warmupSteps, guidance: d.guidance, height: d.height, width: d.width, scheduler: undefined, eta: 0, guidanceRescale: 0 },
            items: [{ prompt: 'warm-up', negativePrompt: undefined, seed: 0, seedWasGiven: true, numImages: 1 }],
            output: { format: this.cfg.defaultOutputFormat, quality: undefined, uri: undefined },
            previewEvery: 0,
            // An inpainting model cannot run from text alone: it warms up inpainting a grey image.
            ...(d.inpainting ? { image: warmupInpaint(d.width, d.height) } : {}),
          },
          { ...(signal ? { signal } : {}), worker },
        );
        const stages = Object.fromEntries(Object.entries(r.times).filter(([k]) => k.endsWith('Ms')).map(([k, v]) => [k.slice(0, -2), Math.round(v)]));
        this.log.info({ ms: Math.round(performance.now() - t0), worker, steps: this.cfg.warmupSteps, size: `${d.width}x${d.height}`, stages }, 'warm-up generation done');
      }),
    );
  }

  async #generate(reqs: GenerationRequest[], signal: AbortSignal, onProgress?: (p: Progress) => void): Promise<TaskResult[]> {
    this.#inflight++;
    this.metrics.inflight.set({ model_name: this.cfg.modelName }, this.#inflight);
    // A request that outlives REQUEST_TIMEOUT_S leaves the queue, or stops its batch at the next step.
    const timeout = AbortSignal.timeout(this.cfg.requestTimeoutS * 1000);
    const both = AbortSignal.any([signal, timeout]);
    try {
      return await Promise.all(reqs.map((r) => this.#generateOne(r, both, onProgress)));
    } catch (err) {
      if (timeout.aborted && !signal.aborted) {
        throw new RuntimeError('TIMEOUT', `the request took longer than REQUEST_TIMEOUT_S=${this.cfg.requestTimeoutS}s and was stopped`, { cause: err });
      }
      throw err;
    } finally {
      this.#inflight--;
      this.metrics.inflight.set({ model_name: this.cfg.modelName }, this.#inflight);
      if (this.#inflight === 0) for (const w of this.#inflightWaiters.splice(0)) w();
    }
  }

  /** Result cache → queue → cache fill → optional upload to output_uri. */
  async #generateOne(req: GenerationRequest, signal: AbortSignal, onProgress?: (p: Progress) => void): Promise<TaskResult> {
    const key = this.resultCache.keyOf(req);
    const hit = key === undefined ? undefined : this.resultCache.get(key);
    let result: TaskResult;
    if (hit) {
      this.metrics.resultCacheHits.inc({ model_name: this.cfg.modelName });
      const images = hit.map((i) => ({ ...i, data: i.data.slice(0) }));
      result = { images, times: { textEncoderMs: 0, denoiseMs: 0, vaeMs: 0, encodeMs: 0, steps: 0 }, batchSize: 0, queuedMs: 0, cached: true };
    } else {
      result = await this.engine.submit(req, { signal, ...(onProgress ? { onProgress } : {}) });
      if (key !== undefined) this.resultCache.put(key, result.images);
    }
    if (req.output.uri !== undefined) {
      if (signal.aborted) throw new RuntimeError('CANCELLED', 'the client left before the upload');
      result.uris = await this.#output.upload(req.output.uri, result.images, signal);
    }
    return result;
  }

  /**
   * Writes the optimised-model copies this start loaded without, in a child process (see optimizer.ts), so the next
   * start of this cache entry skips ORT's optimisers. Serving goes on meanwhile; SIGTERM kills it (close()).
   */
  #writeOptimized(items: OptimizeItem[]): void {
    const init: OptimizerInit = { items, mode: this.cfg.optimizedModelCache };
    const t0 = performance.now();
    this.log.info({ components: items.map((i) => path.basename(path.dirname(i.path))) }, 'writing the optimized model cache in the background');
    const child = fork(fileURLToPath(new URL('../pipeline/optimizer.js', import.meta.url)), [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'], serialization: 'json' });
    const o = { child, files: [] as string[] };
    this.#optimizer = o;
    child.on('message', (m: FromOptimizer) => {
      if (m.t === 'log') this.log[m.level](m.obj ?? {}, m.msg);
      else if (m.t === 'files') o.files.push(...m.paths);
      else this.log.info({ outcomes: m.outcomes, ms: Math.round(performance.now() - t0) }, 'optimized model cache written');
    });
    child.on('error', (err) => this.log.warn({ reason: err.message }, 'the optimized model cache writer failed'));
    child.once('exit', (code, signal) => {
      if (this.#optimizer?.child === child) this.#optimizer = undefined;
      if (code !== 0 && !this.#stopping) this.log.warn({ code, signal }, 'the optimized model cache writer exited early');
    });
    child.send(init);
  }

  /** Kills a background writer at once and removes its half-written files (never a copy it already committed). */
  async #stopOptimizer(): Promise<void> {
    const o = this.#optimizer;
    if (!o || o.child.exitCode !== null) return;
    const exited = new Promise((r) => o.child.once('exit', r));
    o.child.kill('SIGKILL');
    await exited;
    await removeWriterTemps(o.files);
  }

  async #startGpuMetrics(): Promise<void> {
    const gpu = await startGpuMetrics(this.metrics.registry, {
      onError: (err) => this.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'CUDA is in use but nvidia-smi gave no sample: GPU metrics stay off'),
    });
    if (gpu.active) this.log.info({}, 'GPU metrics on (nvidia-smi)');
  }

  #drained(): Promise<void> {
    if (this.#inflight === 0) return this.engine.idle();
    return new Promise<void>((r) => this.#inflightWaiters.push(r)).then(() => this.engine.idle());
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
      this.#abort.abort(new RuntimeError('SHUTTING_DOWN', 'shutting down'));
      this.#server?.closeListener();
      this.log.info({ inflight: this.#inflight, queued: this.engine.queueDepth, graceMs, bootState: was }, 'shutting down: draining in-flight requests');
      let timer: NodeJS.Timeout | undefined;
      const drained = await Promise.race([
        this.#drained().then(() => true),
        new Promise<boolean>((r) => (timer = setTimeout(() => r(false), graceMs))),
      ]);
      clearTimeout(timer);
      if (!drained) this.log.warn({ inflight: this.#inflight }, 'grace period over: closing with requests still running');
      await Promise.all([this.engine.close(), this.#stopOptimizer()]);
      this.#output.destroy();
      this.#images.destroy();
      this.log.info({ drained }, 'shut down');
    })());
  }
}

function safeList(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}
