/**
 * @module The boot, in one place: one plan, made by `resolve`, drives five steps.
 *
 *   resolve   STORAGE_URI (else /mnt/models, else the embedded demo model) → a BootPlan. For s3:// a committed cache
 *             entry's sessions start in the workers at once; otherwise the S3 transport's code starts loading.
 *   fetch     the fetch engine (storage/fetch.ts) fills the PVC cache, or the demo model is built. A committed
 *             entry's check against S3 waits until its warm-up is queued or this thread's own boot work is done
 *             (#releaseCheck).
 *   announce  a component whose files are whole starts its session in the workers; a tokenizer parses on this thread;
 *             once the layout's small files and the UNet are whole, the warm-up begins while the rest downloads.
 *   load      every worker builds the whole pipeline.
 *   warm      one real generation on every worker (or the end of the one begun early) → ready.
 *
 * `main` runs resolve as soon as it listens, while the runtime's code loads, and hands the runtime to `run()` for the
 * rest; `bootRuntime(rt)` does all of it for a runtime built in one go (tests). Boot states and their metrics are
 * runtime/boot.ts's; this module decides when to move them.
 */
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { within } from '../files.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { defaultModelUri, type Config } from '../config.js';
import { isRuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { readError } from '../pipeline/failures.js';
import { isComponent, isLayoutFile, isTokenizerFolder, TOKENIZER_JSON, unusedFiles } from '../pipeline/model.js';
import { optimizedCopyHooks } from '../pipeline/ortcache.js';
import type { ToWorker } from '../pipeline/protocol.js';
import { onGpu } from '../pipeline/provider.js';
import { chooseTransport, loadTransport } from '../storage/choose-transport.js';
import { committedEntry, sameCommit, type CommittedEntry, type ResolvedModel } from '../storage/fetch.js';
import type { EntryLease } from '../storage/lease.js';
import { cacheKey, containedPath, parseStorageUri } from '../storage/uri.js';
import { mappedWeightsHint, terminationReason } from '../termination.js';
import type { BootEventMap } from './boot-events.js';
import type { Runtime } from './runtime.js';
import type { LoadResult } from './engine.js';
import type { SpawnedWorker } from './workers.js';
import { warmupInpaint } from './image-request.js';
import { retriedCode, retryDelayMs } from './boot-retry.js';
import { checkServerDefaults, defaultGuidance, defaultStepsWarnings } from './request.js';

/** How long a committed entry's check against S3 may wait at most (see #releaseCheck). */
const CHECK_WAIT_MS = 2_000;
/** A fetch or load that ran out of file descriptors is tried this often in all, after 1, 2, 4, 8 s: some 15 s for them to free. */
const SHORTAGE_ATTEMPTS = 5;
const SHORTAGE_WAIT_MS = 1_000;

/** `run`, again while it fails for want of file descriptors (TOO_MANY_OPEN_FILES); any other failure, or a stop, ends it. */
async function waitingOutShortage<T>(run: () => Promise<T>, what: string, log: Logger, signal: AbortSignal): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run();
    } catch (e) {
      if (!isRuntimeError(e) || e.code !== 'TOO_MANY_OPEN_FILES' || attempt >= SHORTAGE_ATTEMPTS || signal.aborted) throw e;
      const waitMs = SHORTAGE_WAIT_MS * 2 ** (attempt - 1);
      log.warn({ attempt, waitMs, reason: e.message }, `${what} ran out of file descriptors; trying again`);
      await sleep(waitMs, undefined, { signal });
    }
  }
}

/** What the boot will do, decided once, before any step runs. */
export type BootPlan =
  | { readonly source: 'demo' }
  | { readonly source: 'local'; readonly uri: string }
  /**
   * `committed`: an entry on disk whose sessions start before S3 confirms it is current. `lease`: this process's mark
   * on the entry, taken before the entry is looked at, so no eviction removes it while the process runs (storage/lease.ts).
   */
  | { readonly source: 's3'; readonly uri: string; readonly bucket: string; readonly committed: CommittedEntry | undefined;
    readonly lease: EntryLease | undefined; readonly leaseError?: unknown }
  /** A STORAGE_URI that cannot be read: the fetch step fails the boot with `error`, naming what is accepted. */
  | { readonly source: 'invalid'; readonly uri: string; readonly error: unknown };

/** Step 1 for `main`: the plan, with a committed entry's sessions sent straight to the workers it spawned. */
export async function resolveBoot(cfg: Readonly<Config>, workers: readonly SpawnedWorker[]): Promise<BootSequence> {
  const toWorkers = (m: ToWorker) => {
    for (const w of workers) w.worker.postMessage(m);
  };
  return new BootSequence(cfg, await planBoot(cfg), toWorkers);
}

/** Every step for a runtime that already exists (tests; what `main` does in stages). Never throws. */
export async function bootRuntime(rt: Runtime): Promise<void> {
  rt.startWorkers(); // a committed entry's sessions are announced as the sequence is made
  const seq = new BootSequence(rt.cfg, await planBoot(rt.cfg), (m) => {
    if (m.t === 'component') rt.engine.componentReady(m.component, m.path);
  });
  await seq.run(rt);
}

async function planBoot(cfg: Readonly<Config>): Promise<BootPlan> {
  // A modelcar's /mnt/models appears after start (MODEL_INIT_MODE=async): it is the model, not a reason for the demo one.
  const uri = cfg.storageUri ?? (await defaultModelUri(cfg));
  if (uri === undefined) return { source: 'demo' };
  let src;
  try {
    src = parseStorageUri(uri);
  } catch (error) {
    return { source: 'invalid', uri, error };
  }
  if (src.kind === 'local') return { source: 'local', uri };
  let lease: EntryLease | undefined;
  let leaseError: unknown;
  let committed: CommittedEntry | undefined;
  try {
    const [{ leaseEntry }, { currentVersion }] = await Promise.all([import('../storage/lease.js'), import('../storage/versions.js')]);
    // The current version (storage/versions.ts) is leased, then looked at; a newer one committed meanwhile is leased
    // instead (a few tries), else none is served before the fetch has its own lease.
    const key = cacheKey(src, cfg.s3.endpoint);
    let dir = (await currentVersion(cfg.cacheDir, key))?.dir ?? containedPath(cfg.cacheDir, key);
    for (let i = 0; i < 3; i++) {
      lease = await leaseEntry(dir);
      committed = await committedEntry(uri, cfg);
      if (committed === undefined || committed.dir === dir) break;
      await lease.release();
      dir = committed.dir;
      committed = undefined;
      lease = undefined;
    }
    lease ??= await leaseEntry(dir);
  } catch (e) {
    // A cache that cannot be written to fails the fetch with its own reason; the boot goes on without a lease.
    leaseError = e;
    committed ??= await committedEntry(uri, cfg);
  }
  return { source: 's3', uri, bucket: src.bucket, committed, lease, ...(leaseError !== undefined ? { leaseError } : {}) };
}

/**
 * The folder a component's weights are mapped from, as the termination message names it: a cache entry by its name in
 * MODEL_CACHE_DIR, a local model (STORAGE_URI's path) by its path.
 */
function weightsFolder(cacheDir: string, modelFile: string): string {
  const dir = path.dirname(path.dirname(modelFile));
  const rel = within(cacheDir, dir);
  return rel ? `the cache entry ${rel} in MODEL_CACHE_DIR (${cacheDir})` : dir;
}

/** What a whole component folder lets start: its ONNX session in the workers, or its tokenizer's parse here. */
type Announcement = { t: 'component'; component: string; path: string } | { t: 'tokenizer'; dir: string };

/**
 * `files`: the model's relative file paths, as listed. Told from the listing, not asked of the folder: this runs on the
 * event loop, and a look at a cache volume that stopped answering would hold it (and with it every signal) for good.
 */
function announcement(compDir: string, files: ReadonlySet<string>): Announcement | undefined {
  const comp = path.basename(compDir);
  // Only what the pipeline runs: a safety checker or another folder's graph would cost each worker its memory.
  if (isComponent(comp) && files.has(`${comp}/model.onnx`)) return { t: 'component', component: comp, path: path.join(compDir, 'model.onnx') };
  if (isTokenizerFolder(comp) && ['vocab.json', TOKENIZER_JSON].some((f) => files.has(`${comp}/${f}`))) return { t: 'tokenizer', dir: compDir };
  return undefined;
}

/** One boot of one runtime; all its state lives here. */
export class BootSequence {
  readonly #cfg: Readonly<Config>;
  /** Starts a session before the runtime exists (main: straight to the workers it spawned). */
  readonly #early: (m: ToWorker) => void;
  #rt: Runtime | undefined;
  readonly #abort = new AbortController();
  #fetched: Promise<{ dir: string; res?: ResolvedModel }> | undefined;
  /** The fetch starts once this opens: at once, except for a committed entry (#releaseCheck). */
  #openFetch!: () => void;
  readonly #fetchOpen = new Promise<void>((r) => (this.#openFetch = r));
  #checkReleased = false;
  /** GPU metrics, started by the first load on a GPU. */
  #gpuMetrics: Promise<void> | undefined;
  // What the fetch has reported: every listed file by component, the files whole, the components announced.
  readonly #componentFiles = new Map<string, Set<string>>();
  readonly #whole = new Set<string>();
  readonly #announced = new Set<string>();
  /** The entry's folder, once a file in it is whole. */
  #dir: string | undefined;
  /** Tokenizer folders whole before the runtime existed: they parse once it does. */
  readonly #tokenizers: string[] = [];
  /** Components the prespawned workers were told of before the runtime existed: the engine learns them once it does. */
  readonly #earlyComponents: Array<{ component: string; path: string }> = [];
  /** The warm-up begun while weights still downloaded (#maybeWarmEarly); `stale` once the files it used changed. */
  #warmEarly: { done: Promise<void>; /** Its generation is queued (on any worker). */ queued: Promise<void>; abort: AbortController; stale: boolean } | undefined;
  #sharp = false;
  /** This process's leases on versions of its cache entry, by folder: the plan's, and those the fetch asked for. */
  readonly #leases = new Map<string, EntryLease>();

  constructor(cfg: Readonly<Config>, readonly plan: BootPlan, early: (m: ToWorker) => void) {
    this.#cfg = cfg;
    this.#early = early;
    if (plan.source === 's3' && plan.lease) this.#leases.set(plan.lease.entry, plan.lease);
    this.#abort.signal.addEventListener('abort', () => this.#openFetch(), { once: true });
    if (plan.source === 's3' && plan.committed) {
      const { dir, manifest } = plan.committed;
      this.#onListing(manifest.files.map((f) => ({ relPath: f.path, size: f.size })));
      for (const f of manifest.files) this.#onFileReady(f.path, path.join(dir, f.path));
      return;
    }
    this.#openFetch();
    // A download's listing waits for this code: evaluating the AWS SDK holds this thread ~250 ms.
    if (plan.source === 's3') loadTransport(chooseTransport(cfg.s3, plan.bucket));
  }

  /**
   * Step 2: starts the fetch (or the demo model's build), with the runtime: its code is loaded before the fetch's calls
   * on the cache begin (main), and what the fetch reports goes to it.
   */
  #startFetch(rt: Runtime): void {
    this.#fetched = this.#fetchOpen.then(() => {
      this.#abort.signal.throwIfAborted();
      return this.#fetch(rt);
    });
    this.#fetched.catch(() => undefined); // run() awaits it and reports the failure
  }

  /** A stop: the fetch, if under way, stops (its cache entry stays uncommitted and resumable), and the leases go. */
  async stop(): Promise<void> {
    this.#abort.abort();
    await this.#fetched?.catch(() => undefined);
    await this.#releaseLeases();
  }

  /** Releases the leases on versions other than `keep` (all without it). */
  async #releaseLeases(keep?: string): Promise<void> {
    for (const [dir, l] of this.#leases) {
      if (dir === keep) continue;
      this.#leases.delete(dir);
      await l.release();
    }
  }

  /**
   * Leases a version folder of the entry before the fetch serves or fills it (storage/versions.ts): another version
   * than the plan's when the objects changed and pods elsewhere serve the old one, or a newer one committed meanwhile.
   */
  async #lease(dir: string): Promise<void> {
    if (this.#leases.has(dir)) return;
    const { leaseEntry } = await import('../storage/lease.js');
    let l: EntryLease;
    try {
      l = await leaseEntry(dir, { signal: this.#abort.signal });
    } catch (e) {
      this.#abort.signal.throwIfAborted();
      // As the plan's lease: a cache that cannot be written to fails a fill with its own reason, and a hit serves.
      this.#rt?.log.warn({ reason: (e as Error)?.message ?? String(e) }, 'could not mark the cache entry in use; an eviction elsewhere may remove it');
      return;
    }
    this.#leases.set(dir, l);
    this.#watchLease(l);
  }

  #watchLease(l: EntryLease): void {
    const rt = this.#rt;
    // Only when this process missed its heartbeat for minutes and an eviction elsewhere judged the lease stale.
    l.onLost((gone) => {
      // Not taken again by the lease itself (its folder is gone): forgotten, so that a later boot attempt's fetch, which
      // fills the folder anew, leases it again rather than serving it unleased.
      if (gone && this.#leases.get(l.entry) === l) this.#leases.delete(l.entry);
      rt?.log.warn({ entryGone: gone }, !gone ? 'this server\'s lease on its cache entry had gone stale and was removed; it is taken again'
        : rt.boot.wasReady ? 'the cache entry this server serves from was evicted (its lease had gone stale); sessions already loaded keep serving; restart the pod to fetch it again'
          : 'the cache entry this server was fetching was evicted (its lease had gone stale); a boot attempt that fetches it again leases it again');
    });
  }

  /**
   * Steps 2-5 with the runtime: resolving → fetching → loading → warming → ready. Never throws: a failure that can pass
   * (boot-retry.ts) is `retrying` until the next attempt, after a backoff; any other is `failed`.
   */
  async run(rt: Runtime): Promise<void> {
    const { cfg, log, boot, engine } = rt;
    this.#rt = rt;
    rt.startWorkers(); // they import ORT while the model is resolved and fetched
    const s3 = this.plan.source === 's3' ? this.plan : undefined;
    // A stop during the fetch: the process exits only once the fetch has stopped, its journal saved and its lock
    // released, or a waiter elsewhere waits for the lock's heartbeat to go stale rather than taking over at once.
    rt.atClose(async () => void (await this.#fetched?.catch(() => undefined)));
    if (s3) rt.atClose(() => this.#releaseLeases());
    for (const l of this.#leases.values()) this.#watchLease(l);
    if (s3?.leaseError !== undefined) log.warn({ reason: (s3.leaseError as Error)?.message ?? String(s3.leaseError) }, 'could not mark the cache entry in use; an eviction elsewhere may remove it');
    const stop = () => this.#abort.abort(rt.shutdown.reason);
    if (rt.shutdown.aborted) stop();
    else rt.shutdown.addEventListener('abort', stop, { once: true });
    const plan = this.plan;
    const committed = plan.source === 's3' ? plan.committed : undefined;
    if (committed) {
      log.info({ dir: committed.dir, files: committed.manifest.files.length }, 'committed cache entry found: starting sessions while S3 is checked');
    } else {
      void this.#importSharp(rt);
    }
    // Announcements go through the engine from now on; what came before it existed is announced now.
    for (const dir of this.#tokenizers.splice(0)) engine.tokenizerReady(dir);
    for (const c of this.#earlyComponents.splice(0)) engine.componentAnnounced(c.component, c.path);
    // With a committed entry the tokenizers parse first on this thread (the warm-up needs them as soon as the sessions
    // exist), sharp after them (needed only at the warm-up's end).
    const mainWorkDone = committed ? this.#importSharp(rt, engine.tokenizersSettled()) : undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#attempt(rt, attempt === 1, mainWorkDone);
      } catch (err) {
        // A warm-up begun during the download may be waiting for files that will not come.
        this.#warmEarly?.abort.abort();
        if (rt.stopping && rt.shutdown.aborted) return;
        // The stable code first, as the warm-up CLI prints it: runbooks and alerts key on `NO_SPACE`, `STORAGE_TLS`, …
        const reason = isRuntimeError(err) ? `${err.code}: ${err.message}` : `unexpected error: ${(err as Error)?.message ?? String(err)}`;
        const code = retriedCode(err);
        if (code !== undefined && cfg.bootRetryMaxS > 0) {
          const waitMs = retryDelayMs(attempt, cfg.bootRetryMaxS * 1000);
          boot.retrying(code, reason, attempt, waitMs);
          if (await this.#waitToRetry(rt, waitMs)) continue;
          return;
        }
        if (!isRuntimeError(err)) log.error({ err }, 'boot crashed');
        boot.to('failed', reason);
        if (cfg.exitOnBootFailure) {
          // The reason is in the log's `failed` state line; the termination message repeats it for the pod status.
          terminationReason(`diffusers-runtime: the boot failed (EXIT_ON_BOOT_FAILURE): ${reason}`);
          await rt.close(0);
          process.exitCode = 1;
        }
        return;
      }
    }
  }

  /**
   * One attempt at steps 2-5: fetch, announce, load, warm → ready. Throws what failed it. `first`: a committed entry's
   * sessions, started before the fetch, are checked against the entry the fetch served (later attempts start anew).
   */
  async #attempt(rt: Runtime, first: boolean, mainWorkDone: Promise<void> | undefined): Promise<void> {
    const { cfg, boot, metrics } = rt;
    const plan = this.plan;
    const s3 = plan.source === 's3' ? plan : undefined;
    const committed = s3?.committed;
    this.#startFetch(rt);
    // A later attempt leaves `retrying`: the demo model is built in `resolving`, as at first.
    boot.to(plan.source === 'demo' ? 'resolving' : 'fetching');
    if (this.#dir !== undefined) this.#maybeWarmEarly(this.#dir);
    if (mainWorkDone && first) this.#releaseCheck(rt, mainWorkDone);
    const { dir, res } = await this.#fetched!;
    if (res) {
      if (plan.source === 's3' && committed && first) {
        const now = await committedEntry(plan.uri, cfg);
        if (!now || now.dir !== res.dir || !sameCommit(committed.manifest, now.manifest)) {
          this.#invalidate({ why: 'entry-changed', dir: res.dir });
        }
      }
      if (res.fromCache) metrics.cacheHits.inc({ model_name: cfg.modelName });
      rt.events.emit('files-ready', { dir: res.dir, fromCache: res.fromCache, bytes: res.bytes, files: res.files, seconds: res.seconds }, 'model files ready');
    }
    if (rt.stopping) return;

    boot.to('loading');
    const loaded = await this.#load(rt, dir);
    // Every session now comes from `dir`: an older version this process leased (the plan's) may go once unused.
    if (s3) await this.#releaseLeases(dir);
    checkServerDefaults(cfg, loaded.defaults);
    for (const w of defaultStepsWarnings(cfg, loaded.defaults)) rt.log.warn({ variable: 'DEFAULT_STEPS' }, w);
    if (loaded.fallbackReason) boot.progress.sessions.fallback = loaded.fallbackReason;
    // Once per process: an attempt after a retried failure loads again, and the registry takes each metric once.
    if (Object.values(loaded.providers).some(onGpu)) this.#gpuMetrics ??= this.#startGpuMetrics(rt);
    if (rt.stopping) return;

    boot.to('warming');
    await this.#finishWarmup(rt);
    if (rt.stopping) return;

    boot.to('ready');
    const secs = (performance.now() - rt.startedAt) / 1000;
    metrics.modelLoadTime.set({ model_name: cfg.modelName }, secs);
    rt.events.emit('ready', { seconds: Number(secs.toFixed(3)), phases: boot.phases, providers: loaded.providers }, 'model ready');
    // After ready, in a child process: the copies this start loaded without, for later starts.
    rt.optimizer.start(loaded.optimize);
  }

  /**
   * The wait after a transient failure, then what the next attempt needs: sessions (and a warm-up) made from this
   * attempt's files are dropped, and the files announced again as the next fetch reports them (those already whole
   * are kept: the fill resumes from its journal; objects changed meanwhile are fetched anew). The leases stay: the
   * entry is still this process's. False when a stop came first (the runtime closes; nothing more is tried).
   */
  async #waitToRetry(rt: Runtime, waitMs: number): Promise<boolean> {
    const early = this.#warmEarly;
    this.#warmEarly = undefined;
    await early?.done.catch(() => undefined);
    try {
      await sleep(waitMs, undefined, { signal: this.#abort.signal });
    } catch {
      return false;
    }
    for (const s of [this.#componentFiles, this.#whole, this.#announced]) s.clear();
    this.#dir = undefined;
    rt.engine.resetSessions();
    return !rt.stopping;
  }

  async #fetch(rt: Runtime): Promise<{ dir: string; res?: ResolvedModel }> {
    const { log, metrics } = rt;
    const labels = { model_name: rt.cfg.modelName };
    const plan = this.plan;
    if (plan.source === 'invalid') throw plan.error;
    if (plan.source === 'demo') {
      const { ensureDemoModel } = await import('../demo/index.js');
      // The cache folder's errors as the S3 path reports them (CACHE_IO, relative names): Node's own carry the
      // absolute path, and boot reasons reach clients.
      // The cache folder made first by the helper that keeps the real refusal: Node's recursive mkdir reports a
      // read-only volume (a read-only /tmp, where the cache defaults without /mnt/cache) as ENOENT.
      const { mkdirs } = await import('../storage/cache.js');
      const dir = await mkdirs(this.#cfg.cacheDir).then(() => ensureDemoModel(this.#cfg.cacheDir, log)).catch(async (e: unknown) => {
        throw (await import('../storage/fetch.js')).cacheIoError(e, this.#cfg.cacheDir);
      });
      log.info({ dir }, 'no STORAGE_URI and no /mnt/models: serving the embedded demo model');
      // The demo model is whole from the start: every component's session can start at once.
      const files = await listComponents(dir);
      for (const comp of new Set([...files].map((f) => f.split('/')[0]!))) this.#announce(path.join(dir, comp), files);
      return { dir };
    }
    const { resolveModel } = await import('../storage/fetch.js');
    const signal = this.#abort.signal;
    // Out of descriptors (connections took them, with MAX_CONNECTIONS=0): over once they close, and the fetch resumes
    // what is on disk. Its announcements come again and are taken once.
    const res = await waitingOutShortage(
      () =>
        resolveModel(plan.uri, {
          cfg: this.#cfg, log, signal,
          unused: unusedFiles,
          // Unchanged components keep their optimized copies through a refresh in place or into a new version (an
          // ORT_OPTIMIZED_CACHE=off server loads none).
          ...optimizedCopyHooks(this.#cfg.optimizedModelCache),
          onListing: (files) => this.#onListing(files),
          onFileReady: (rel, abs) => this.#onFileReady(rel, abs),
          onRestart: () => this.#onRestart(),
          onProgress: (p) => Object.assign(rt.boot.progress, p, { phase: p.phase }),
          // model_download_bytes_total grows as bytes arrive (a long download shows its rate), and counts only what
          // came from S3 this time: not a local model folder, not files or spans kept from an earlier run.
          onDownloaded: (n) => metrics.fetchedBytes.inc(labels, n),
          onEvicted: (e) => {
            metrics.cacheEvictions.inc(labels);
            metrics.cacheEvictedBytes.inc(labels, e.bytes);
          },
          lease: (dir) => this.#lease(dir),
          onDamaged: () => metrics.damagedFiles.inc(labels),
          throttleWatch: { throttled: () => metrics.s3Throttled.inc({ ...labels, operation: 'model_download' }) },
          checkWatch: { throttled: () => metrics.s3Throttled.inc({ ...labels, operation: 'cache_check' }) },
          requests: (outcome) => metrics.s3Requests.inc({ ...labels, operation: 'model_download', outcome }),
          checkRequests: (outcome) => metrics.s3Requests.inc({ ...labels, operation: 'cache_check', outcome }),
        }),
      'the model fetch',
      log,
      signal,
    ).catch((e: unknown) => {
      throw plan.source === 'local' ? localFolderError(plan.uri, e) : e;
    });
    return { dir: res.dir, res };
  }

  /**
   * The whole model's load. A worker that ran out of descriptors (while the download held them) is started again by
   * the next load, so a shortage is waited out as the fetch waits it out; any other failure is the boot's.
   */
  #load(rt: Runtime, dir: string): Promise<LoadResult> {
    return waitingOutShortage(() => rt.engine.load(dir), 'loading the model', rt.log, rt.shutdown);
  }

  #onListing(files: ReadonlyArray<{ relPath: string; size: number }>): void {
    for (const f of files) {
      const comp = f.relPath.split('/')[0]!;
      if (!this.#componentFiles.has(comp)) this.#componentFiles.set(comp, new Set());
      this.#componentFiles.get(comp)!.add(f.relPath);
    }
  }

  /** A component's session starts as soon as all of its own files are whole. */
  #onFileReady(rel: string, abs: string): void {
    this.#whole.add(rel);
    const comp = rel.split('/')[0]!;
    const all = this.#componentFiles.get(comp);
    const dir = abs.slice(0, abs.length - rel.length);
    this.#dir = dir;
    if (all && !this.#announced.has(comp) && [...all].every((f) => this.#whole.has(f))) {
      this.#announced.add(comp);
      this.#announce(path.join(dir, comp), all);
    }
    this.#maybeWarmEarly(dir);
  }

  /** A new download round: what was announced may be replaced, so sessions and an early warm-up start over. */
  #onRestart(): void {
    for (const s of [this.#componentFiles, this.#whole, this.#announced]) s.clear();
    this.#tokenizers.length = 0;
    this.#earlyComponents.length = 0;
    this.#invalidate({ why: 'objects-changed' });
  }

  /** A whole component folder: its session starts in the workers, or its tokenizer parses here. */
  #announce(compDir: string, files: ReadonlySet<string>): void {
    const m = announcement(compDir, files);
    const rt = this.#rt;
    if (m?.t === 'component') {
      // Its session maps the weights from the volume: from now on a read the volume fails ends the process by SIGBUS.
      mappedWeightsHint(weightsFolder(this.#cfg.cacheDir, m.path));
      if (rt) rt.engine.componentReady(m.component, m.path);
      else {
        this.#early(m);
        this.#earlyComponents.push({ component: m.component, path: m.path });
      }
    } else if (m?.t === 'tokenizer') {
      if (rt) rt.engine.tokenizerReady(m.dir);
      else this.#tokenizers.push(m.dir);
    }
  }

  /** Sessions (and an early warm-up) were built from files that changed: the workers drop them before the next load. */
  #invalidate(data: BootEventMap['sessions-reset']): void {
    const msg = data.why === 'entry-changed' ? 'the cache entry changed after its sessions started; loading them again' : 'objects changed during the download; starting the sessions again';
    this.#rt?.events.emit('sessions-reset', data, msg);
    if (this.#rt) this.#rt.engine.resetSessions();
    else this.#early({ t: 'reset' });
    if (this.#warmEarly) {
      this.#warmEarly.stale = true;
      this.#warmEarly.abort.abort();
    }
  }

  /**
   * Starts the warm-up before the last weights have arrived, once the layout's small files are whole and the UNet's
   * files too: the workers load a partial pipeline from the listing, and the generation encodes and denoises while
   * the rest streams, awaiting each session where it needs it (the VAE decoder's comes last). Ready still waits for
   * the committed cache entry and this warm-up's end (#finishWarmup). At most once per boot, and only with the runtime.
   */
  #maybeWarmEarly(dir: string): void {
    const rt = this.#rt;
    if (!rt || this.#warmEarly || rt.stopping || this.#cfg.warmupSteps === 0 || !this.#announced.has('unet')) return;
    const files = [...this.#componentFiles.values()].flatMap((c) => [...c]);
    for (const f of files) if (isLayoutFile(f) && !this.#whole.has(f)) return;
    const abort = new AbortController();
    const signal = AbortSignal.any([abort.signal, rt.shutdown]);
    const whole = this.#whole;
    let onQueued!: () => void;
    const queued = new Promise<void>((r) => (onQueued = r));
    const done = (async () => {
      await rt.engine.load(dir, files);
      signal.throwIfAborted();
      // filesPending 0: a cache hit whose entry S3 has not confirmed yet.
      rt.events.emit('warmup-early', { filesPending: files.filter((f) => !whole.has(f)).length }, 'warm-up started before the fetch finished');
      await this.#warmup(rt, signal, onQueued);
    })();
    done.catch(() => undefined); // awaited by #finishWarmup
    this.#warmEarly = { done, queued, abort, stale: false };
  }

  /**
   * Starts a committed entry's check against S3 (which loads the S3 transport's code: the AWS SDK costs this thread
   * ~250 ms of CPU) once this thread has nothing more urgent: the warm-up is queued (tokenizers parsed, the UNet's
   * session made, the job dispatched), or this thread's own boot work is done (the tokenizers and sharp: a large UNet
   * still loading on a GPU), or that warm-up cannot start; at the latest after CHECK_WAIT_MS. Ready waits for both.
   * Started at once, it held back the runtime's import, the tokenizers' parse and the warm-up's dispatch on two cores.
   */
  #releaseCheck(rt: Runtime, mainWorkDone: Promise<void>): void {
    const t0 = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const open = (after: BootEventMap['entry-check']['after']) => {
      if (this.#checkReleased) return;
      this.#checkReleased = true;
      clearTimeout(timer);
      if (this.#abort.signal.aborted) return; // the abort opened the fetch, which ends at once
      rt.events.emit('entry-check', { after, waitedMs: Math.round(performance.now() - t0) }, 'checking the committed cache entry against S3');
      this.#openFetch();
    };
    const early = this.#warmEarly;
    if (!early) return open('no warm-up');
    timer = setTimeout(() => open('wait ran out'), CHECK_WAIT_MS);
    early.queued.then(() => open('warm-up queued'), () => undefined);
    early.done.then(() => open('warm-up queued'), () => open('warm-up failed'));
    void mainWorkDone.then(() => open('main thread free'));
  }

  /** Awaits the warm-up begun during the download, or runs one now (none began, its files changed, or it failed). */
  async #finishWarmup(rt: Runtime): Promise<void> {
    const early = this.#warmEarly;
    if (early && !early.stale) {
      try {
        return await early.done;
      } catch (err) {
        if (rt.stopping) throw err;
        rt.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'the warm-up begun during the download failed; warming up again');
      }
    } else if (early) {
      await early.done.catch(() => undefined);
    }
    await this.#warmup(rt);
  }

  /**
   * One real generation at the served default resolution through the request path, on every worker (each has its
   * own sessions, on its own GPU): ready means any worker can take the first request.
   */
  async #warmup(rt: Runtime, signal?: AbortSignal, onQueued?: () => void): Promise<void> {
    const { cfg, engine, log } = rt;
    if (cfg.warmupSteps === 0) return;
    const d = engine.defaults!;
    const t0 = performance.now();
    await Promise.all(
      engine.workerIndexes.map(async (worker) => {
        const r = await engine.submit(
          {
            // The default guidance of the mode it runs, so its UNet batch (with or without the unconditional pass) is a request's.
            shape: { steps: cfg.warmupSteps, guidance: defaultGuidance(cfg, d, d.inpainting ? 'inpaint' : undefined), height: d.height, width: d.width, scheduler: undefined, eta: 0, guidanceRescale: 0 },
            items: [{ prompt: 'warm-up', negativePrompt: undefined, seed: 0, numImages: 1 }],
            seedsGiven: true,
            output: { format: cfg.defaultOutputFormat, quality: undefined, uri: undefined },
            previewEvery: 0,
            // An inpainting model cannot run from text alone: it warms up inpainting a grey image.
            ...(d.inpainting ? { image: warmupInpaint(d.width, d.height) } : {}),
          },
          { ...(signal ? { signal } : {}), ...(onQueued ? { onQueued } : {}), worker },
        );
        const stages = Object.fromEntries(Object.entries(r.times).filter(([k]) => k.endsWith('Ms')).map(([k, v]) => [k.slice(0, -2), Math.round(v)]));
        rt.events.emit('warmup-done', { ms: Math.round(performance.now() - t0), worker, steps: cfg.warmupSteps, size: `${d.width}x${d.height}`, stages }, 'warm-up generation done');
      }),
    );
  }

  /**
   * sharp encodes every image on this thread (engine.ts): it loads on this thread's core while the workers import ORT
   * and build sessions on theirs, after `after` (the tokenizers, needed earlier). Once per boot. A failure surfaces
   * where an image is first encoded (the warm-up).
   */
  async #importSharp(rt: Runtime, after?: Promise<unknown>): Promise<void> {
    if (this.#sharp) return;
    this.#sharp = true;
    await after;
    const t0 = performance.now();
    try {
      await (await import('../pipeline/image.js')).loadSharp();
      rt.log.info({ ms: Math.round(performance.now() - t0) }, 'sharp imported');
    } catch {
      // reported by the first encode
    }
  }

  async #startGpuMetrics(rt: Runtime): Promise<void> {
    const off = (err: unknown) => rt.log.warn({ reason: (err as Error)?.message ?? String(err) }, 'CUDA is in use but nvidia-smi gave no sample: GPU metrics stay off');
    try {
      const { startGpuMetrics } = await import('./gpu.js');
      const gpu = await startGpuMetrics(rt.metrics.registry, { onError: off });
      if (gpu.active) rt.log.info({}, 'GPU metrics on (nvidia-smi)');
    } catch (err) {
      off(err);
    }
  }
}

/**
 * An OS error of the look into a local model folder (its listing, a file's size) as the load's own read errors are
 * (failures.ts readError): CACHE_IO naming the file inside the model, the errno its cause, so that a volume's passing
 * EIO is tried again (boot-retry.ts) and no absolute path reaches the boot reason (clients read it).
 */
function localFolderError(uri: string, e: unknown): unknown {
  const x = e as NodeJS.ErrnoException;
  if (isRuntimeError(e) || typeof x?.code !== 'string' || typeof x.path !== 'string') return e;
  const src = parseStorageUri(uri);
  if (src.kind !== 'local') return e;
  const rel = within(path.resolve(src.path), path.resolve(x.path));
  if (rel === undefined) return e;
  return readError(rel === '' ? 'the model folder STORAGE_URI names' : rel.split(path.sep).join('/'), e) ?? e;
}

/**
 * The relative paths of `dir`'s folders' files (`unet/model.onnx`, what announcement() looks for); none where it cannot
 * be read. One level at a time: Node's `readdir(…, { recursive: true })` stats each entry synchronously, on the event loop.
 */
async function listComponents(dir: string): Promise<Set<string>> {
  const files = new Set<string>();
  try {
    const top = await readdir(dir, { withFileTypes: true });
    await Promise.all(top.filter((d) => d.isDirectory()).map(async (d) => {
      for (const f of await readdir(path.join(dir, d.name))) files.add(`${d.name}/${f}`);
    }));
  } catch {
    return new Set();
  }
  return files;
}
