/**
 * @module Where a LoRA adapter named in a request comes from, on the main thread: the model's own `loras/` folder
 * (`loras/<name>.safetensors` or `loras/<name>/<one file>.safetensors`), then LORA_URI — a local folder with the same
 * two forms, or an S3 prefix whose `<name>/` folder is fetched through the model cache (lock, parallel ranged reads,
 * atomic commit; diffusers' `save_lora_weights` and Hugging Face LoRA repositories have that layout). A name resolves
 * once per process; a failed lookup is forgotten, so an adapter uploaded later is found, and so is a resolved file that
 * is gone (its cache entry evicted), so it is fetched again.
 */
import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { deepestHolding } from '../files.js';
import type { Config } from '../config.js';
import { REQUEST_ADVICE, shortage, shortageError, SHORTAGE_RETRY_AFTER } from '../descriptors.js';
import { RuntimeError, isRuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { AdapterRef } from '../pipeline/job.js';
import { Slots } from '../slots.js';
import { defaultIo } from '../storage/download.js';
import { mountOf, readMounts, type Mount } from '../storage/mounts.js';
import { serverVolumes, type Volume } from '../storage/pending-io.js';
import { createVolumeGate, watchVolume, type VolumeGate } from '../storage/volume-gate.js';
import { s3Code } from '../storage/s3-errors.js';
import type { RequestTally } from '../storage/s3-requests.js';
import { ThrottleNote } from '../storage/throttle.js';
import { parseStorageUri } from '../storage/uri.js';
import { LORA_NAME, type LoraRequest } from './request.js';

export class AdapterSource {
  #modelDir: string | undefined;
  /**
   * Lookups in flight or done, by name. Several requests may wait for one (an S3 fetch): each waits with its own
   * signal, and the fetch stops only once every request waiting for it has left; stopped, it stays until it ends (#begin).
   */
  readonly #files = new Map<string, Lookup>();
  /** The file each settled lookup gave: an S3 adapter's cache entry may since have been evicted (storage/entries.ts). */
  readonly #found = new Map<string, string>();
  /** Lookups not settled yet, those nobody waits for any more included: close() stops them and waits for them. */
  readonly #running = new Set<Lookup>();
  /** Aborted by close(): every request still waiting is answered SHUTTING_DOWN. */
  readonly #closed = new AbortController();
  /**
   * Every look at the adapters' files goes through the gate of the volume they lie on (#gateOf): a volume that stops
   * answering keeps one pool thread, not one a request, and its requests alone are answered CACHE_STUCK.
   */
  readonly #gates = new Map<string, VolumeGate>();
  /** This process's mounts (storage/mounts.ts), read at the first look and again for a new model; undefined: none here. */
  #mounts: readonly Mount[] | undefined | null = null;
  /** The volumes the configuration names, for the gates' answers to name the one a call waits on. */
  readonly #volumes: readonly Volume[];
  /** The positional writes of every LORA_URI fetch, and their other calls on the cache, adapterWritesAtOnce() at a time. */
  readonly #writes: Slots;
  readonly #requests: RequestTally | undefined;

  /**
   * `onThrottled` hears each answer that throttled an S3 adapter's fetch (the store's code), `o.requests` how each of its
   * HTTP requests ended (storage/s3-requests.ts); `o.writesAtOnce` replaces adapterWritesAtOnce()
   * (scripts/bench-adapter-fetch.ts compares bounds; Infinity: none).
   */
  constructor(
    private readonly cfg: Pick<Config, 'loraUri' | 'cacheDir' | 's3'> & Readonly<Config>,
    private readonly log: Logger,
    private readonly onThrottled?: (code: string) => void,
    o: { writesAtOnce?: number; requests?: RequestTally } = {},
  ) {
    this.#requests = o.requests;
    const n = o.writesAtOnce ?? adapterWritesAtOnce();
    if (!(n >= 1)) throw new TypeError(`writesAtOnce must be 1 or more, got ${n}`);
    this.#writes = new Slots(n);
    this.#volumes = serverVolumes(cfg);
  }

  /** The loaded model's folder (its `loras/` come first); a new model forgets what was resolved. */
  setModelDir(dir: string): void {
    if (this.#modelDir !== undefined && path.resolve(dir) === path.resolve(this.#modelDir)) return;
    this.#modelDir = dir;
    this.#files.clear();
    this.#found.clear();
    this.#mounts = null;
  }

  /** The local file of every adapter, or one 400 naming every adapter that was not found. */
  async resolve(loras: readonly LoraRequest[], signal?: AbortSignal): Promise<AdapterRef[]> {
    const got = await Promise.allSettled(loras.map((l) => this.#file(l.name, signal)));
    const missing: string[] = [];
    const other: RuntimeError[] = [];
    got.forEach((g, i) => {
      if (g.status === 'fulfilled') return;
      const err = g.reason as unknown;
      if (isRuntimeError(err) && err.code === 'NOT_FOUND') missing.push(loras[i]!.name);
      else if (isRuntimeError(err) && err.code === 'CACHE_STUCK') other.push(new RuntimeError(err.code, `adapter "${loras[i]!.name}": ${err.message}`, { cause: err, retryAfter: err.retryAfter }));
      else other.push(isRuntimeError(err) ? err : new RuntimeError('INTERNAL', `adapter "${loras[i]!.name}": ${(err as Error)?.message ?? String(err)}`));
    });
    if (missing.length > 0) {
      const where = ['the model\'s loras/ folder', ...(this.cfg.loraUri !== undefined ? ['LORA_URI'] : [])].join(' or ');
      throw new RuntimeError('INVALID_INPUT', `unknown LoRA adapter${missing.length > 1 ? 's' : ''} ${missing.map((n) => `"${n}"`).join(', ')}: not found in ${where}${await this.#known()}`);
    }
    if (other.length > 0) throw other[0]!;
    return loras.map((l, i) => ({ name: l.name, scale: l.scale, file: (got[i] as PromiseFulfilledResult<string>).value }));
  }

  /**
   * What a request that stops waiting for `loras` at its deadline (`signal`) is told while their look-up goes on for
   * others (the engine's, for the requests joined to its generation): TIMEOUT naming the adapter whose fetch S3 was
   * throttling, as a request that stops the look-up is told (#file); undefined otherwise.
   */
  stopped(loras: readonly LoraRequest[], signal: AbortSignal): RuntimeError | undefined {
    for (const l of loras) {
      const stopped = this.#files.get(l.name)?.throttling.stopped(signal, 'its fetch from LORA_URI');
      if (stopped !== undefined) return new RuntimeError('TIMEOUT', `adapter "${l.name}": ${stopped}`);
    }
    return undefined;
  }

  /**
   * The server stops (after its grace period): the requests still waiting are answered 503, and every fetch stops and
   * is waited for, so none outlives the process holding its cache entry's lock (the next process would wait for the
   * lock's heartbeat to go stale: it has this one's host name, and in a container often its pid).
   */
  async close(): Promise<void> {
    this.#closed.abort();
    const running = [...this.#running];
    for (const l of running) l.stop.abort();
    await Promise.allSettled(running.map((l) => l.file));
  }

  /**
   * Looks at the cache's folder through the gate until `signal` aborts, telling `onStuck` each time the volume does not
   * answer: for the requests waiting for an adapter set's build (the engine's), whose calls on the volume are not gated.
   */
  watch(signal: AbortSignal, onStuck: (err: RuntimeError) => void): void {
    watchVolume(this.#gateOf(this.cfg.cacheDir), this.cfg.cacheDir, signal, onStuck);
  }

  /**
   * The gate of the volume `file` lies on: its mount's device, from the mount table (a stat of the file would tell it
   * too, but on a volume that stopped answering that stat hangs). One gate for all answered a request that needs a
   * healthy volume CACHE_STUCK while a call on another one hung (the gate's slot held, past its wait); a gate for each
   * folder the server reads adapters from (MODEL_CACHE_DIR, a local LORA_URI, the model's own folder) shared one of
   * them with a volume mounted inside it (a LORA_URI folder mounted under MODEL_CACHE_DIR's), and gave two of them on
   * one volume a pool thread each when it hung. Without a mount table (not Linux), the deepest of those folders that
   * holds the file.
   */
  #gateOf(file: string): VolumeGate {
    if (this.#mounts === null) this.#mounts = readMounts();
    const m = this.#mounts && mountOf(this.#mounts, file);
    let key: string;
    if (m) key = `dev ${m.dev}`;
    else {
      const folders = [this.cfg.cacheDir, this.#localLoraDir(), this.#modelDir].filter((d) => d !== undefined);
      key = `folder ${path.resolve(deepestHolding(folders, (d) => d, file) ?? path.dirname(file))}`;
    }
    let g = this.#gates.get(key);
    if (!g) this.#gates.set(key, (g = createVolumeGate({ volumes: this.#volumes, log: this.log })));
    return g;
  }

  /** LORA_URI's folder where it is local (undefined: unset, on S3, or not valid: #lookup says why). */
  #localLoraDir(): string | undefined {
    if (this.cfg.loraUri === undefined) return undefined;
    try {
      const src = parseStorageUri(this.cfg.loraUri);
      return src.kind === 'local' ? src.path : undefined;
    } catch {
      return undefined;
    }
  }

  /** The adapters of the model's own folder, for the 400 (LORA_URI is not listed: it may hold thousands). */
  async #known(): Promise<string> {
    const names = this.#modelDir ? await localNames(this.#gateOf(this.#modelDir), path.join(this.#modelDir, 'loras')) : [];
    return names.length > 0 ? `; the model has ${names.slice(0, 20).join(', ')}${names.length > 20 ? ', …' : ''}` : '';
  }

  async #file(name: string, signal?: AbortSignal): Promise<string> {
    if (!LORA_NAME.test(name)) throw new RuntimeError('INVALID_INPUT', `adapter name ${JSON.stringify(name)} is not valid`);
    // Adapter entries take no lease (a server may use thousands): one evicted to make room is fetched again. (Asked
    // without blocking: on a cache volume that stopped answering a stat waits for good.)
    const found = this.#found.get(name);
    if (found !== undefined && !(await isFile(this.#gateOf(found), found, signal)) && this.#found.get(name) === found) {
      this.log.info({ adapter: name }, 'LoRA adapter no longer in the cache (evicted); fetching it again');
      this.#files.delete(name);
      this.#found.delete(name);
    }
    if (signal?.aborted) throw new RuntimeError('CANCELLED', 'the client left');
    if (this.#closed.signal.aborted) throw shuttingDown();
    const lookup = this.#files.get(name) ?? this.#begin(name);
    // Stopped (every request waiting for it left) and not ended yet: this request takes it up again (#begin).
    if (lookup.waiting === 0 && lookup.stop.signal.aborted && this.#running.has(lookup)) {
      this.log.info({ adapter: name }, 'LoRA adapter asked for again before its stopped fetch ended: the request waits for that fetch, and the adapter is fetched again from where it stopped if the stop cut it short');
    }
    lookup.waiting++;
    return new Promise<string>((resolve, reject) => {
      let waits = true;
      const stopWaiting = () => {
        const was = waits;
        waits = false;
        signal?.removeEventListener('abort', left);
        this.#closed.signal.removeEventListener('abort', closed);
        if (was) lookup.waiting--;
        return was;
      };
      const closed = () => stopWaiting() && reject(shuttingDown());
      const left = () => {
        if (!stopWaiting()) return;
        // Its deadline, while S3 throttled the fetch: TIMEOUT saying so (generation.ts says which deadline, and adds this).
        const stopped = lookup.throttling.stopped(signal, 'its fetch from LORA_URI');
        reject(stopped !== undefined ? new RuntimeError('TIMEOUT', `adapter "${name}": ${stopped}`) : new RuntimeError('CANCELLED', 'the client left'));
        // Others still wait for it, or it has settled (no longer running): nothing to stop.
        if (lookup.waiting > 0 || !this.#running.has(lookup)) return;
        // Nobody waits for it any more: the fetch stops. It stays the name's lookup until it ends, so that a request
        // for the name meanwhile waits for it rather than fetching beside it (#begin).
        lookup.stop.abort();
      };
      signal?.addEventListener('abort', left, { once: true });
      this.#closed.signal.addEventListener('abort', closed, { once: true });
      lookup.file.then(
        (f) => stopWaiting() && resolve(f),
        (err: unknown) => stopWaiting() && reject(err),
      );
    });
  }

  /**
   * A lookup of `name`, registered. Stopped, every request waiting for it gone, it ends as the stop leaves it; a request
   * for the name that comes before that end waits for it (#file) instead of starting a second fetch beside it, which
   * listed the adapter again and, the cache entry's lock still held, waited for the stopped one to let it go. The
   * stopped fetch's file serves that request if the stop came too late to cut it; if it did cut it, the adapter is
   * fetched again at once, resumed from the partial files and journal the stopped fetch left (its lock released): one
   * fetch after the other.
   */
  #begin(name: string): Lookup {
    // An S3 fetch meets throttling as a model's fill does (storage/throttle.ts), this note listening.
    const lookup = { waiting: 0, throttling: new ThrottleNote(this.onThrottled) } as Lookup;
    const attempt = (): Promise<string> => {
      const stop = (lookup.stop = new AbortController());
      return this.#lookup(name, stop.signal, lookup.throttling, () => lookup.waiting > 0).catch((err: unknown) => {
        // A volume that stopped answering is the request's answer (CACHE_STUCK): the stopped fetch may still hang there.
        const again = stop.signal.aborted && lookup.waiting > 0 && !this.#closed.signal.aborted && !(isRuntimeError(err) && err.code === 'CACHE_STUCK');
        if (!again) throw err;
        return attempt();
      });
    };
    lookup.file = attempt();
    this.#files.set(name, lookup);
    this.#running.add(lookup);
    this.#found.delete(name);
    lookup.file.then((f) => {
      this.#running.delete(lookup);
      if (this.#files.get(name) === lookup) this.#found.set(name, f);
    }, () => {
      this.#running.delete(lookup);
      if (this.#files.get(name) === lookup) this.#files.delete(name);
    });
    return lookup;
  }

  /** `waited`: whether a request waits for this lookup now (a volume that stops answering is told to those only). */
  async #lookup(name: string, signal: AbortSignal, throttling: ThrottleNote, waited: () => boolean): Promise<string> {
    const local = this.#modelDir ? await inFolder(this.#gateOf(this.#modelDir), path.join(this.#modelDir, 'loras'), name) : undefined;
    if (local) return local;
    if (this.cfg.loraUri === undefined) throw new RuntimeError('NOT_FOUND', name);
    // Read as STORAGE_URI is: s3://bucket/prefix, file:///path (percent-decoded) or a path.
    let src: ReturnType<typeof parseStorageUri>;
    try {
      src = parseStorageUri(this.cfg.loraUri);
    } catch (err) {
      throw new RuntimeError('INVALID_INPUT', `LORA_URI: ${(err as Error).message.replace(/^STORAGE_URI /, '')}`);
    }
    if (src.kind === 'local') {
      const f = await inFolder(this.#gateOf(src.path), src.path, name);
      if (f) return f;
      throw new RuntimeError('NOT_FOUND', name);
    }
    // The fetch's own calls on the cache (its lock, journal, writes) are many and not gated (they go in #writes): it
    // starts only once a look at the cache's folder has answered, so that one adapter after another does not leave
    // fetches stuck there.
    const cacheDir = this.cfg.cacheDir;
    const gate = this.#gateOf(cacheDir);
    await gate.run('stat', cacheDir, () => stat(cacheDir)).catch((err: unknown) => {
      if (isRuntimeError(err)) throw err;
    });
    const t0 = performance.now();
    const { resolveModel } = await import('../storage/fetch.js');
    // Stopped while the cache was looked at: a listener added now would never hear it, and the fetch would go on for nobody.
    if (signal.aborted) throw new RuntimeError('CANCELLED', `the fetch of adapter "${name}" was stopped before it began`);
    let dir: string;
    // The fetch's calls are watched through the gate: once the volume stops answering, its requests are answered
    // CACHE_STUCK (its writes, each a pool thread kept, are bounded by #writes), and the fetch stops, as when every
    // request waiting for it has left; its files are partials, committed only whole, resumed by the next fetch. The
    // watch lasts until the fetch ends, its stop included: a stopped fetch held by the volume may be waited for again (#begin).
    const fetching = new AbortController();
    const watching = new AbortController();
    const stopFetching = () => fetching.abort();
    signal.addEventListener('abort', stopFetching, { once: true });
    let stuck!: (err: RuntimeError) => void;
    const stuckAnswer = new Promise<never>((_, reject) => (stuck = reject));
    watchVolume(gate, cacheDir, watching.signal, (err) => {
      // Told to the requests waiting for it. With none (every one left, or the server stops: close() answered them), the
      // fetch is still running, its lock held: it stays the name's lookup, and close() waits for it, until it ends. Ended
      // here, close() no longer waited for it and the process exited with its lock left; the look goes on, and tells a
      // request that takes it up (#begin) within a second.
      if (!waited() || this.#closed.signal.aborted) return;
      stuck(new RuntimeError('CACHE_STUCK', `its fetch from LORA_URI onto the cache is stopped: ${err.message}`, { cause: err, retryAfter: err.retryAfter }));
      fetching.abort();
      watching.abort();
    });
    const write = this.#writes;
    try {
      const fetched = resolveModel(`s3://${src.bucket}/${src.prefix}${name}/`, {
        cfg: this.cfg, log: this.log, signal: fetching.signal, throttleWatch: throttling, ...(this.#requests ? { requests: this.#requests } : {}),
        // Its other calls on the cache too (its lock's creation, looks, heartbeats and release, its journal, its
        // partials' open, syncs and close, its commit, its removal of the entry's older versions): each fetch stuck at
        // once kept one or a few of those beside the bound, so that several filled the pool
        // (test/lora-stuck-volume.test.ts). A lock's go ahead of the queued writes (fetch.ts, lockBound).
        io: { write: (fh, bufs, len, at) => write.run(() => defaultIo.write(fh, bufs, len, at)), other: (call, o) => write.run(call, o) },
      });
      fetched.catch(() => undefined);
      const r = await Promise.race([fetched, stuckAnswer]);
      dir = r.dir;
      this.log.info({ adapter: name, fromCache: r.fromCache, bytes: r.bytes, ms: Math.round(performance.now() - t0) }, 'LoRA adapter fetched');
    } catch (err) {
      if (isRuntimeError(err) && err.code === 'CACHE_STUCK') throw err;
      if (isRuntimeError(err) && err.code === 'STORAGE_MISSING' && adapterAbsent(err)) throw new RuntimeError('NOT_FOUND', name);
      // Not the store's fault, and over once descriptors are free: the request is answered 503, the next one fetches.
      if (isRuntimeError(err) && err.code === 'TOO_MANY_OPEN_FILES') {
        throw new RuntimeError(err.code, `adapter "${name}" could not be fetched from LORA_URI: ${err.message}`, { cause: err, retryAfter: SHORTAGE_RETRY_AFTER });
      }
      // The cache volume full or failing is the operator's to fix, not S3's: its own code (500, as storage outcomes are
      // answered), with fetch.ts's message, which names MODEL_CACHE_DIR and never its local path.
      if (isRuntimeError(err) && (err.code === 'NO_SPACE' || err.code === 'CACHE_IO')) {
        throw new RuntimeError(err.code, `adapter "${name}" from LORA_URI could not be stored: ${err.message}`, { cause: err });
      }
      // A key in the adapter's folder that the cache cannot store as a file (a name over the filesystem's limit, a name
      // the cache reserves): nothing failed upstream, and every request for it would fail alike, as for a folder
      // holding several .safetensors files. The message names the key and the limit.
      // An adapter encrypted with a customer-provided key: every request for it fails alike until it is stored otherwise.
      if (isRuntimeError(err) && err.code === 'STORAGE_SSE_C') {
        throw new RuntimeError(err.code, `adapter "${name}" on LORA_URI cannot be read: ${err.message}`, { cause: err });
      }
      if (isRuntimeError(err) && (err.code === 'STORAGE_KEY_TOO_LONG' || err.code === 'INVALID_INPUT')) {
        throw new RuntimeError('INVALID_INPUT', `adapter "${name}" on LORA_URI cannot be cached: ${err.message}`, { cause: err });
      }
      const why = isRuntimeError(err) ? err.message : String((err as Error)?.message ?? err);
      throw new RuntimeError('UPSTREAM', `adapter "${name}" could not be fetched from LORA_URI: ${why}`, { cause: err });
    } finally {
      signal.removeEventListener('abort', stopFetching);
      // The watch ends with the fetch (aborting an answered fetch stops nothing).
      fetching.abort();
      watching.abort();
    }
    const f = await single(gate, dir, name);
    if (!f) throw new RuntimeError('INVALID_INPUT', `adapter "${name}" on LORA_URI holds no .safetensors file (or several: keep one per adapter folder)`);
    return f;
  }
}

/**
 * Whether a STORAGE_MISSING from the fetch says the adapter's own folder is not there: nothing listed under it (the
 * fetch says so with no S3 error behind it), or a listed file gone before it was read (NoSuchKey). A missing bucket, or
 * an S3 error of no known kind, is LORA_URI's or the store's problem: answering "unknown adapter" would hide it.
 */
const adapterAbsent = (err: RuntimeError): boolean => err.cause === undefined || s3Code(err.cause) === 'NoSuchKey';

/**
 * Positional writes of the LORA_URI fetches at once, all together (with their other calls on the cache: their locks'
 * creation, looks, heartbeats and release, their journals' writes and syncs, their partials' open, syncs and close,
 * their commits), for libuv's pool of `pool` threads. A fetch has up
 * to S3_MAX_CONCURRENCY ranges in flight, each writing to the cache: on a volume that stops answering each write keeps
 * a pool thread for good, and 24 of them filled the image's pool of 16, sharp's encoding of every other request
 * included. The writes get what POOL_KEPT leaves: 8 of the image's 16 (a healthy fetch as fast as unbounded, within
 * noise: docs/BENCHMARKS.md, "LoRA adapter fetch: writes at once"), 1 of the default 4, where a stuck fetch's other
 * calls alone fill the pool.
 */
export function adapterWritesAtOnce(pool = threadPoolSize()): number {
  return Math.max(1, pool - POOL_KEPT);
}

/**
 * Pool threads the writes leave: the gates' looks (one a volume), the leases' heartbeats (2: the model's entry, the
 * adapter sets' folder), and 2 for the rest of the server (sharp's encoding, dns.lookup). A fetch's calls on the
 * cache go in the writes' bound (before, each fetch stuck at once kept 1 to 4 more beside it, from its lock's
 * creation or a waiter's look to its final sync: test/lora-stuck-volume.test.ts).
 */
const POOL_KEPT = 8;

/**
 * libuv's pool size, read as libuv reads UV_THREADPOOL_SIZE when it starts the pool (atoi() into an unsigned int): 4
 * unset, 1 for 0 or no number, at most 1024, which a negative value wraps past.
 */
export function threadPoolSize(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.UV_THREADPOOL_SIZE;
  if (v === undefined) return 4;
  const n = Number.parseInt(v, 10);
  if (!Number.isFinite(n) || n === 0) return 1;
  return n < 0 ? 1024 : Math.min(n, 1024);
}

const shuttingDown = () => new RuntimeError('SHUTTING_DOWN', 'the server shut down while the request waited for a LoRA adapter\'s fetch; retry', { retryAfter: 1 });

interface Lookup {
  file: Promise<string>;
  /** Requests waiting for it. */
  waiting: number;
  /** Stops its fetch now under way (a fetch again after a stop has its own). */
  stop: AbortController;
  /** Whether S3 throttles its fetch now. */
  throttling: ThrottleNote;
}

/** `<dir>/<name>.safetensors`, or the one .safetensors file of `<dir>/<name>/`. */
async function inFolder(gate: VolumeGate, dir: string, name: string): Promise<string | undefined> {
  const file = path.join(dir, `${name}.safetensors`);
  if (await isFile(gate, file)) return file;
  const sub = path.join(dir, name);
  return single(gate, sub, name);
}

async function single(gate: VolumeGate, dir: string, name: string): Promise<string | undefined> {
  let files: string[];
  try {
    const names = (await gate.run('readdir', dir, () => readdir(dir))).filter((f) => f.endsWith('.safetensors'));
    const kept = await Promise.all(names.map((f) => isFile(gate, path.join(dir, f))));
    files = names.filter((_, i) => kept[i]);
  } catch (err) {
    // The gate's answers (the volume not answering) are the request's, not a missing adapter.
    if (isRuntimeError(err)) throw err;
    // A folder that could not be read for want of a descriptor is not a missing adapter.
    const why = shortage(err);
    if (why) throw shortageError(`adapter "${name}" could not be looked up`, why, REQUEST_ADVICE, err);
    return undefined;
  }
  if (files.length === 1) return path.join(dir, files[0]!);
  // diffusers' save_lora_weights name wins when a folder holds several.
  if (files.includes('pytorch_lora_weights.safetensors')) return path.join(dir, 'pytorch_lora_weights.safetensors');
  if (files.length > 1) throw new RuntimeError('INVALID_INPUT', `adapter "${name}" is a folder with ${files.length} .safetensors files; keep one per adapter`);
  return undefined;
}

async function localNames(gate: VolumeGate, dir: string): Promise<string[]> {
  try {
    return (await gate.run('readdir', dir, () => readdir(dir))).map((f) => (f.endsWith('.safetensors') ? f.slice(0, -'.safetensors'.length) : f)).filter((n) => LORA_NAME.test(n)).sort();
  } catch {
    return [];
  }
}

/**
 * Asked without blocking, as every look at the adapters' files: they lie on the cache volume (the model's loras/, the
 * LORA_URI entries), and a stat there on the event loop would hold it, and every signal, for good if the volume stops
 * answering. Through the gate, one at a time, so that such a volume keeps one pool thread, not one a request; its
 * CACHE_STUCK (and CANCELLED) are the request's answer, not a missing file. Recorded: a stop waits for the running
 * look-ups (close()) and names what is left.
 */
async function isFile(gate: VolumeGate, p: string, signal?: AbortSignal): Promise<boolean> {
  try {
    return (await gate.run('stat', p, () => stat(p), signal)).isFile();
  } catch (err) {
    if (isRuntimeError(err)) throw err;
    return false;
  }
}
