/** @module One error class for the whole runtime: a stable code, the HTTP status derived from it. */

const STATUS = {
  INVALID_INPUT: 400,
  MODEL_NOT_FOUND: 404,
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  BODY_TOO_LARGE: 413,
  UNSUPPORTED: 501,
  MODEL_NOT_READY: 503,
  /** No pipeline worker can run a generation while one that died is started again. */
  WORKER_RESTARTING: 503,
  BUSY: 503,
  SHUTTING_DOWN: 503,
  CANCELLED: 499,
  TIMEOUT: 504,
  UPSTREAM: 502,
  INTERNAL: 500,
  /** The pipeline worker running a generation died; the generation is lost (the worker is started again). */
  WORKER_DIED: 500,
  // Storage / boot outcomes (never sent as HTTP statuses of a request, but mapped for completeness).
  CONFIG: 500,
  STORAGE_DENIED: 500,
  STORAGE_MISSING: 500,
  STORAGE_TRANSIENT: 500,
  /** An object key the cache cannot store as a file name (longer than the filesystem allows). */
  STORAGE_KEY_TOO_LONG: 500,
  /** A listing that names one key twice, or one key both as an object and as a folder of others. */
  STORAGE_KEY_DUPLICATE: 500,
  /** A listing that returned a key outside the prefix it was asked for. */
  STORAGE_KEY_OUTSIDE_PREFIX: 500,
  /** S3 refused the request time, and no Date from S3 could correct the clock offset. */
  STORAGE_CLOCK_SKEW: 500,
  /** Listed files were still missing or short after every download round. */
  STORAGE_INCOMPLETE: 500,
  /** The cache volume refused a read or write (permissions, I/O error, read-only); never a local path in the message. */
  CACHE_IO: 500,
  NO_SPACE: 500,
  MODEL_FORMAT: 500,
  PROVIDER: 500,
} as const;

export type ErrorCode = keyof typeof STATUS;

const BRAND = Symbol.for('diffusers-runtime.RuntimeError');

export class RuntimeError extends Error {
  readonly status: number;
  readonly [BRAND] = true;
  /** Seconds a client should wait before retrying (503s). */
  retryAfter?: number;

  constructor(readonly code: ErrorCode, message: string, options?: ErrorOptions & { retryAfter?: number }) {
    super(message, options);
    this.name = 'RuntimeError';
    this.status = STATUS[code];
    if (options?.retryAfter !== undefined) this.retryAfter = options.retryAfter;
  }

  // Keeps instanceof true across duplicate module copies (worker bundles, dist vs src in tests).
  static override [Symbol.hasInstance](x: unknown): boolean {
    return typeof x === 'object' && x !== null && (x as Record<symbol, unknown>)[BRAND] === true;
  }
}

export const isRuntimeError = (x: unknown): x is RuntimeError => x instanceof RuntimeError;
