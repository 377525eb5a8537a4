/**
 * @module Calls on the cache volume still in flight, and how a stop ends a process that some never return to. An NFS
 * server gone away on a hard mount blocks every open, read, stat or unlink on the volume for good, each in one of
 * libuv's thread-pool threads (UV_THREADPOOL_SIZE, 4 by default): a stop that awaits one never ends, and neither does
 * process.exit(), which joins those threads (and the worker threads) first. The calls a stop makes on the cache (a
 * lease's or lock's release, their heartbeats) are recorded here, so that it can say which did not finish. The pool is
 * the process's, and so is this record (as descriptors.ts's count of open files).
 */
import { constants as fsConstants } from 'node:fs';
import { access, mkdir } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { deepestHolding, within } from '../files.js';
import { fileURLToPath } from 'node:url';
import { KSERVE_MODEL_DIR, PVC_CACHE_DIR, tmpCacheDir } from '../config.js';
import type { Logger } from '../log.js';
import { parseStorageUri } from './uri.js';

export interface PendingIo {
  /** The call: `writeFile`, `unlink`, `utimes`, `read`. */
  readonly op: string;
  readonly file: string;
  /** When it began (performance.now()). */
  readonly since: number;
}

const pending = new Set<PendingIo>();

/**
 * What a stop gives, in all, to what follows the server's drain (the workers' close, 5 s before they are terminated;
 * output uploads' aborts, 10 s; the fetch's stop; the lease's release), or to the warm-up's stop: past it, what has not
 * finished is left, and named.
 */
export const CLEANUP_MS = 15_000;

/** Runs `call` (one call on `file`), recorded as pending until it settles. */
export function trackIo<T>(op: string, file: string, call: () => Promise<T>): Promise<T> {
  const p: PendingIo = { op, file, since: performance.now() };
  pending.add(p);
  return call().finally(() => pending.delete(p));
}

/**
 * MODEL_CACHE_DIR's default where it is not set (config.ts: /mnt/cache where writable, else a folder of the temp dir),
 * looked for in libuv's pool, by the server and the warm-up CLI once their signal handlers are in place. /mnt/cache is
 * the PVC's mount: on a volume that does not answer, a synchronous look held the main thread for good, and a SIGTERM
 * with it (no handler runs on a thread held in a system call, Node's own one for SIGTERM included; a PID 1 gets no
 * other). Recorded, so that a stop names it. Not looked for where MODEL_CACHE_DIR is set (nor used; or the config
 * refuses it).
 */
export async function lookForDefaultCacheDir(env: NodeJS.ProcessEnv): Promise<string> {
  if (env.MODEL_CACHE_DIR?.trim()) return PVC_CACHE_DIR;
  if (await trackIo('access', PVC_CACHE_DIR, () => access(PVC_CACHE_DIR, fsConstants.W_OK)).then(() => true, () => false)) return PVC_CACHE_DIR;
  const dir = tmpCacheDir();
  // Made now, as before: if it cannot be, the cache's first use says why.
  await trackIo('mkdir', dir, () => mkdir(dir, { recursive: true })).catch(() => undefined);
  return dir;
}

/** The recorded calls not settled yet, oldest first. */
export function pendingIo(): PendingIo[] {
  return [...pending].sort((a, b) => a.since - b.since);
}

/**
 * File system requests of this process not answered yet, recorded or not (Node's own count of them). A file handle's
 * close is listed apart (CloseReq): on a volume that stopped answering it waits for good too (a written file's flush).
 */
export function fsRequestsPending(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'FSReqCallback' || r === 'FSReqPromise' || r === 'CloseReq').length;
}

/** `file` as the cache names it (relative to `cacheDir`, `.` for the cache's own folder), or as given when it lies outside. */
export function cacheRelative(cacheDir: string, file: string): string {
  const rel = within(cacheDir, file);
  return rel === undefined ? file : rel === '' ? '.' : rel;
}

/** A folder the server reads, and how its lines name the volume under it. */
export interface Volume {
  readonly dir: string;
  /** `the cache volume`, `the model volume (/mnt/models)`, `the LoRA volume (LORA_URI)`. */
  readonly name: string;
  /** The cache's: its files are named relative to `dir` (MODEL_CACHE_DIR), the others' whole. */
  readonly cache?: true;
}

/** What a file on none of the volumes the server knows lies on. */
export const OTHER_VOLUME = 'a volume the server reads';

/**
 * The volumes the server reads from, by the folders its configuration names: MODEL_CACHE_DIR (or, before it is known,
 * the folders its default is looked for in, named whole), a local STORAGE_URI, /mnt/models (KServe's; looked at when
 * STORAGE_URI is not set), a local LORA_URI. A model fetched from S3 lies in the cache.
 */
export function serverVolumes(cfg: { cacheDir?: string | undefined; storageUri?: string | undefined; loraUri?: string | undefined } = {}): Volume[] {
  const local = (uri: string | undefined): string | undefined => {
    if (uri === undefined) return undefined;
    try {
      const src = parseStorageUri(uri);
      return src.kind === 'local' ? src.path : undefined;
    } catch {
      return undefined; // the config says what is wrong with it
    }
  };
  const model = local(cfg.storageUri);
  const lora = local(cfg.loraUri);
  return [
    ...(cfg.cacheDir !== undefined ? [{ dir: cfg.cacheDir, name: 'the cache volume', cache: true as const }] : []),
    // The default's candidates: a look at them comes before the config.
    { dir: PVC_CACHE_DIR, name: 'the cache volume' },
    { dir: tmpCacheDir(), name: 'the cache volume' },
    ...(model !== undefined ? [{ dir: model, name: 'the model volume (STORAGE_URI)' }] : []),
    { dir: KSERVE_MODEL_DIR, name: `the model volume (${KSERVE_MODEL_DIR})` },
    ...(lora !== undefined ? [{ dir: lora, name: 'the LoRA volume (LORA_URI)' }] : []),
  ];
}

/**
 * The volume `file` lies on among `volumes`, by path: the one of the deepest folder that holds it (a LORA_URI folder
 * under MODEL_CACHE_DIR's is the LoRA volume), the first listed of those as deep; undefined for none.
 */
export function volumeOf(volumes: readonly Volume[], file: string): Volume | undefined {
  return deepestHolding(volumes, (v) => v.dir, file);
}

/** `file` as a line names it on `v`: relative to the cache's folder (`.` for the folder itself), whole otherwise. */
export function nameOn(v: Volume | undefined, file: string): string {
  return v?.cache ? cacheRelative(v.dir, file) : file;
}

/** `op file still pending after N s`: a call on volume `v` as the stop lines and CACHE_STUCK name it. */
export function pendingCall(p: { op: string; file: string; since: number }, v: Volume | undefined, now = performance.now()): string {
  return `${p.op} ${nameOn(v, p.file)} still pending after ${Math.round((now - p.since) / 1000)} s`;
}

/** `op file` for each recorded call still pending, with its age, oldest first (the cache's files named relative to it). */
export function describePending(volumes: readonly Volume[], now = performance.now()): string[] {
  return pendingIo().map((p) => pendingCall(p, volumeOf(volumes, p.file), now));
}

/**
 * What a stop's line names: `<volume> did not answer: <call>; <call>` for each volume with recorded calls still
 * pending (the volume of the oldest first). A look at /mnt/models is the model volume's, not the cache's.
 */
export function pendingByVolume(volumes: readonly Volume[], now = performance.now()): string[] {
  const by = new Map<string, string[]>();
  for (const p of pendingIo()) {
    const v = volumeOf(volumes, p.file);
    const name = v?.name ?? OTHER_VOLUME;
    const calls = by.get(name) ?? [];
    calls.push(pendingCall(p, v, now));
    by.set(name, calls);
  }
  return [...by].map(([name, calls]) => `${name} did not answer: ${calls.join('; ')}`);
}

/**
 * Resolves once no file system request of the process is pending, or at `until` (performance.now()) with the number
 * still pending. A volume that answers slowly (seconds a call) is waited for; one that stopped answering is not.
 */
export async function fsRequestsAnswered(until = Infinity): Promise<number> {
  for (;;) {
    const n = fsRequestsPending();
    if (n === 0) return 0;
    if (performance.now() >= until) {
      // A close's request stays listed until its callback returns, after the promise's reactions (its awaiters') ran: a
      // turn of the loop later, only the requests not answered are.
      await new Promise((r) => setImmediate(r));
      return fsRequestsPending();
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** What a stop does after the server's drain (or before the runtime exists), within one bound. */
export interface Cleanup {
  /** The names of the steps the bound ran out on, in order. */
  readonly unfinished: readonly string[];
  /**
   * Runs `work` until it settles or the bound runs out: false (and `name` is added to unfinished) when it runs out
   * first. A rejection counts as finished, as nothing of the step is left to wait for: it goes to `failed` and the stop
   * goes on.
   */
  step(name: string, work: () => Promise<unknown>): Promise<boolean>;
  /**
   * Once the steps are over: waits for the process's file system requests still pending, up to the bound (not at all
   * once a step was left), and resolves with those still pending then (0: none), which process.exit() would wait for
   * for good. A slow volume's are answered in time, and the stop ends as a clean one does.
   */
  unanswered(): Promise<number>;
}

/** startCleanup's `failed` for the server's stop: a warning, on stderr where there is no logger yet. */
export const warnStepFailed = (log: Logger | undefined) => (step: string, err: unknown): void => {
  const reason = (err as Error)?.message ?? String(err);
  if (log) log.warn({ step, reason }, `shutdown: ${step} failed`);
  else process.stderr.write(`diffusers-runtime: shutdown: ${step} failed: ${reason}\n`);
};

/** A stop's cleanup, bounded by `ms` from now; `failed` hears of each step that rejected. */
export function startCleanup(o: { ms?: number; failed?: (name: string, err: unknown) => void } = {}): Cleanup {
  const ms = o.ms ?? CLEANUP_MS;
  const ends = performance.now() + ms;
  const unfinished: string[] = [];
  const expired = new Promise<false>((r) => setTimeout(() => r(false), ms).unref());
  return {
    unfinished,
    async step(name, work) {
      const settled = Promise.resolve().then(work).then(() => true, (err: unknown) => (o.failed?.(name, err), true));
      // Past the bound, a step still gets a turn of the loop to finish: one with nothing to wait for is not left.
      const done = (await Promise.race([settled, expired])) || (await Promise.race([settled, new Promise<false>((r) => setImmediate(() => r(false)))]));
      if (!done) unfinished.push(name);
      return done;
    },
    // With a step left the bound is over: the line comes at once.
    unanswered: () => fsRequestsAnswered(unfinished.length > 0 ? 0 : ends),
  };
}

/**
 * Ends the process as `signal`'s default action does (exit status 128 + its number: 143 for SIGTERM), without joining
 * the threads that process.exit() would wait for. For a stop whose calls on the volume never returned.
 */
export function endBySignal(signal: NodeJS.Signals): never {
  // With no listener left Node gives the signal back its default action (libuv restores SIG_DFL).
  process.removeAllListeners(signal);
  process.kill(process.pid, signal);
  // A fatal signal ends every thread of the process before kill() returns to this one, except in PID 1 of a pid
  // namespace (node as its container's first process, the image's entrypoint), which no signal without a handler
  // reaches: there _exit() gives the status the signal would have.
  const status = 128 + (osConstants.signals[signal] ?? 0);
  exitNow(status);
  throw new Error(`${signal} did not end the process (PID ${process.pid}) and native/exit-now.node (not built?) could not end it with status ${status}`);
}

/**
 * Ends the process at once, as SIGKILL does (137), without waiting for anything: a third signal. SIGKILL sent to itself
 * does not reach PID 1 of a pid namespace either; there _exit(137) does the same.
 */
export function killNow(): never {
  process.kill(process.pid, 'SIGKILL');
  exitNow(128 + osConstants.signals.SIGKILL);
  throw new Error(`SIGKILL did not end the process (PID ${process.pid}) and native/exit-now.node (not built?) could not end it`);
}

/** native/exit-now.c, built by `npm run build` where a C compiler is installed (the image has it). */
const EXIT_NOW_MODULE = fileURLToPath(new URL('../../native/exit-now.node', import.meta.url));

/** _exit(status) through native/exit-now; returns only where the module is not built or does not load. */
function exitNow(status: number): void {
  try {
    const m = { exports: {} as { exit?: (status: number) => void } };
    process.dlopen(m, EXIT_NOW_MODULE);
    m.exports.exit?.(status);
  } catch {
    // Not built: the caller says so.
  }
}
