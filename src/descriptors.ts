/**
 * @module The process's open-file limit (RLIMIT_NOFILE): what it is, how many descriptors are in use, and the error an
 * operator reads when they run out — EMFILE (this process's limit) or ENFILE (the system's file table). The connection
 * cap (server/base.ts), the download's ranges in flight (storage/download.ts) and code loaded on first use (firstUse)
 * keep within it. Imports only fs and the error codes: the listening socket's module reads the limit too.
 */
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { RuntimeError } from './errors.js';

/** What the process ran out of: its own descriptor limit, or the system's file table. */
export type Shortage = 'EMFILE' | 'ENFILE';

/** What an operator does about a shortage met while downloading or uploading (the model, an adapter, a push). */
export const S3_ADVICE = "raise the pod's open-file limit (nofile) or lower S3_MAX_CONCURRENCY";
/** What a client does about a shortage met by its request; the operator's part after it. */
export const REQUEST_ADVICE = "retry in a few seconds; if it persists, raise the pod's open-file limit (nofile) or lower MAX_CONNECTIONS";
/** What to do where neither knob above is the cause: code that could not be loaded, a worker thread that could not start. */
export const LIMIT_ADVICE = "if it persists, raise the pod's open-file limit (nofile)";
/** Seconds a request refused for a shortage is told to wait: other requests and connections end and free theirs. */
export const SHORTAGE_RETRY_AFTER = 5;

/**
 * /proc/self/limits, read when this module loads (in each thread that loads it): later, out of descriptors, there may be
 * none to read it with. Node has raised the soft limit to the hard one by then.
 */
const LIMITS = (() => {
  try {
    return readFileSync('/proc/self/limits', 'utf8');
  } catch {
    return undefined;
  }
})();

/** RLIMIT_NOFILE's soft value, from /proc/self/limits (Linux; `text` for tests); undefined elsewhere or when unlimited. */
export function descriptorLimit(text: string | undefined = LIMITS): number | undefined {
  const m = text === undefined ? null : /^Max open files\s+(\d+|unlimited)\s/m.exec(text);
  return m && m[1] !== 'unlimited' ? Number(m[1]) : undefined;
}

/** Descriptors this process has open (Linux: /proc/self/fd, less the one reading it); undefined when unknown. */
export function openDescriptors(): number | undefined {
  try {
    return readdirSync('/proc/self/fd').length - 1;
  } catch {
    return undefined;
  }
}

/** EMFILE or ENFILE, where `e` (or an error it wraps) is one; undefined for any other error. */
export function shortage(e: unknown): Shortage | undefined {
  for (let x = e as (Error & { code?: unknown }) | undefined, depth = 0; x !== undefined && x !== null && depth < 5; x = x.cause as typeof x, depth++) {
    if (x.code === 'EMFILE' || x.code === 'ENFILE') return x.code;
    // A worker thread whose event loop could not be made: Node gives the errno only in the message.
    if (x.code === 'ERR_WORKER_INIT_FAILED') return /\bENFILE\b/.test(x.message) ? 'ENFILE' : /\bEMFILE\b/.test(x.message) ? 'EMFILE' : undefined;
  }
  return undefined;
}

/**
 * TOO_MANY_OPEN_FILES: `what` failed, why (the limit, when known), and `advice`. Never Node's own message, which
 * carries the local path of the file it could not open.
 */
export function shortageError(what: string, why: Shortage, advice: string, cause?: unknown): RuntimeError {
  const limit = descriptorLimit();
  const where = why === 'ENFILE' ? "the node's file table is full" : `the process is at its open-file limit (${limit ?? 'unknown'})`;
  return new RuntimeError('TOO_MANY_OPEN_FILES', `${what}: too many open files (${why}): ${where}; ${advice}`,
    { retryAfter: SHORTAGE_RETRY_AFTER, ...(cause !== undefined ? { cause } : {}) });
}

/** `e` as TOO_MANY_OPEN_FILES (`what` failed) when it is a shortage Node reported; any other error unchanged. */
export function asShortage(e: unknown, what: string, advice: string): unknown {
  const why = e instanceof RuntimeError ? undefined : shortage(e);
  return why ? shortageError(what, why, advice, e) : e;
}

/** The shortage `n` more descriptors would meet now, if any: each is opened (on /dev/null) and closed again. */
export function spareShortage(n: number): Shortage | undefined {
  const fds: number[] = [];
  try {
    for (let i = 0; i < n; i++) fds.push(openSync('/dev/null', 'r'));
    return undefined;
  } catch (e) {
    return shortage(e);
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}

/** The first code firstUse could not load for good in this process: liveness then fails, so the pod is restarted. */
let unloaded: string | undefined;
/** What could not be loaded for good (and needs a restart of the process), if anything. */
export const unloadedCode = (): string | undefined => unloaded;

/** Free descriptors firstUse wants before it loads code: importing the AWS SDK kept 2 files open at once (measured). */
const SPARE_FOR_CODE = 8;

/**
 * `load` (a dynamic import) on the first call, its module on every later one. Node keeps an import that failed for the
 * life of the process (its module map, and the package.json it could not read), so code first needed while the process
 * is out of descriptors would never load again: it is not tried then, and the call fails with TOO_MANY_OPEN_FILES
 * (the caller's request is answered 503 and the next one tries again). An import that runs out anyway (another thread
 * took the last descriptors meanwhile) cannot be retried: that error says to restart.
 */
export function firstUse<T>(what: string, load: () => Promise<T>): () => Promise<T> {
  let loaded: Promise<T> | undefined;
  return () => {
    if (loaded) return loaded;
    const short = spareShortage(SPARE_FOR_CODE);
    if (short) return Promise.reject(shortageError(`${what} could not be loaded`, short, LIMIT_ADVICE));
    loaded = load().catch((e: unknown) => {
      const why = shortage(e);
      if (why === undefined) throw e;
      unloaded ??= what;
      throw new RuntimeError('INTERNAL', `${what} could not be loaded: the process ran out of descriptors (${why}) while loading it, and Node does not load it again; restart the server`, { cause: e });
    });
    return loaded;
  };
}
