/**
 * @module One error class for the whole runtime, with a stable code. Two kinds of code: what a request is answered
 * with (each has its HTTP status, which the server's error boundary applies) and how the boot, the fetch engine and
 * the cache end when they fail (reported in the boot's failed state, the warm-up CLI's exit line and the log).
 */

/** Errors a request is answered with, and their HTTP status (docs/OPERATIONS.md "Error codes" lists each). */
export const HTTP_STATUS = {
  INVALID_INPUT: 400,
  /**
   * An s3:// input image or a LORA_URI adapter is encrypted with a customer-provided key (SSE-C), which this runtime
   * does not read: every request for it fails alike until the object is stored otherwise. Also how a fill ends on one.
   */
  STORAGE_SSE_C: 400,
  /** A WebSocket handshake from a browser page of an origin neither this server's host nor CORS_ALLOW_ORIGINS lists. */
  ORIGIN_NOT_ALLOWED: 403,
  MODEL_NOT_FOUND: 404,
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  /** The client did not send its whole request in time. */
  REQUEST_TIMEOUT: 408,
  BODY_TOO_LARGE: 413,
  /** A request body in a content coding the server does not decode. */
  UNSUPPORTED_ENCODING: 415,
  /** A plain HTTP request to a path served only as a WebSocket (the stream). */
  UPGRADE_REQUIRED: 426,
  HEADERS_TOO_LARGE: 431,
  CANCELLED: 499,
  INTERNAL: 500,
  /** The pipeline worker running a generation died; the generation is lost (the worker is started again). */
  WORKER_DIED: 500,
  UNSUPPORTED: 501,
  UPSTREAM: 502,
  MODEL_NOT_READY: 503,
  /** No pipeline worker can run a generation while one that died is started again. */
  WORKER_RESTARTING: 503,
  BUSY: 503,
  SHUTTING_DOWN: 503,
  /** The process ran out of file descriptors (EMFILE, ENFILE); also how a boot, a fill or a push ends for it. */
  TOO_MANY_OPEN_FILES: 503,
  /**
   * A call the request needs on the cache volume (a LoRA adapter's look-up) has not answered in 5 s, or waits behind
   * one that has not: the volume is not answering (storage/volume-gate.ts).
   */
  CACHE_STUCK: 503,
  /** The generation outlived REQUEST_TIMEOUT_S. */
  TIMEOUT: 504,
  /**
   * The generation ran out of device (or host) memory even alone. 507: the server lacks the room this request needs,
   * and the same request would fail again here; not 503, whose retries would repeat it, nor a 4xx, as it is valid.
   */
  OUT_OF_MEMORY: 507,
} as const;

/**
 * How the boot, the fetch engine and the cache fail. A request that meets one (an output upload) is answered 500, except
 * TOO_MANY_OPEN_FILES, a request code too (503).
 */
export const OUTCOMES = [
  'CONFIG',
  'STORAGE_DENIED',
  'STORAGE_MISSING',
  'STORAGE_TRANSIENT',
  /** The TLS handshake with the S3 endpoint failed for a reason retrying cannot fix (an untrusted certificate, plain HTTP). */
  'STORAGE_TLS',
  /** A ranged read that received no byte for S3_STALL_TIMEOUT_S (retried). */
  'STORAGE_STALL',
  /** A ranged read whose length differs from the range it asked for (retried). */
  'STORAGE_SHORT_READ',
  /** An object key the cache cannot store as a file name (longer than the filesystem allows). */
  'STORAGE_KEY_TOO_LONG',
  /** A listing that names one key twice, or one key both as an object and as a folder of others. */
  'STORAGE_KEY_DUPLICATE',
  /** A listing that returned a key outside the prefix it was asked for. */
  'STORAGE_KEY_OUTSIDE_PREFIX',
  /** S3 refused the request time, and no Date from S3 could correct the clock offset. */
  'STORAGE_CLOCK_SKEW',
  /** Listed files were still missing or short after every download round. */
  'STORAGE_INCOMPLETE',
  /** A file's content differed from its ETag's MD5 in two downloads, or files kept arriving damaged (S3_VERIFY_CONTENT). */
  'STORAGE_CORRUPT',
  /** An object is encrypted with a customer-provided key (SSE-C), which this runtime does not read (a request's code too: HTTP_STATUS). */
  'STORAGE_SSE_C',
  /** The store answers in a way no retry changes and the cache cannot use (a listing that cannot be paged, a Range ignored). */
  'STORAGE_UNSUPPORTED',
  /** The cache volume refused a read or write (permissions, I/O error, read-only); never a local path in the message. */
  'CACHE_IO',
  'NO_SPACE',
  /** The process ran out of file descriptors while filling the cache (the message names the limit and what to change). */
  'TOO_MANY_OPEN_FILES',
  'MODEL_FORMAT',
  /** A session could not be created for want of memory (a request's code too: HTTP_STATUS). */
  'OUT_OF_MEMORY',
  'PROVIDER',
] as const;

export type HttpErrorCode = keyof typeof HTTP_STATUS;
export type OutcomeCode = (typeof OUTCOMES)[number];
export type ErrorCode = HttpErrorCode | OutcomeCode;

/**
 * The HTTP status a request is answered with when an error of `code` reaches it: the request error's own, 500 for a
 * boot or storage outcome, and 500 for a code this build does not know (one sent by a worker of another build).
 */
export function httpStatus(code: string): number {
  return Object.hasOwn(HTTP_STATUS, code) ? HTTP_STATUS[code as HttpErrorCode] : 500;
}

const BRAND = Symbol.for('diffusers-runtime.RuntimeError');

export interface RuntimeErrorOptions extends ErrorOptions {
  /** Seconds a client should wait before retrying (503s). */
  retryAfter?: number;
  /** Fields an HTTP answer carries beside `error` and `code` (the model endpoint's boot state and progress). */
  fields?: Record<string, unknown>;
  /** A 405's methods the path does take, for its `Allow` header (RFC 9110 15.5.6). */
  allow?: readonly string[];
}

export class RuntimeError extends Error {
  readonly [BRAND] = true;
  retryAfter?: number;
  fields?: Record<string, unknown>;
  allow?: readonly string[];

  constructor(readonly code: ErrorCode, message: string, options?: RuntimeErrorOptions) {
    super(message, options);
    this.name = 'RuntimeError';
    if (options?.retryAfter !== undefined) this.retryAfter = options.retryAfter;
    if (options?.fields !== undefined) this.fields = options.fields;
    if (options?.allow !== undefined) this.allow = options.allow;
  }

  // Keeps instanceof true across duplicate module copies (worker bundles, dist vs src in tests).
  static override [Symbol.hasInstance](x: unknown): boolean {
    return typeof x === 'object' && x !== null && (x as Record<symbol, unknown>)[BRAND] === true;
  }
}

export const isRuntimeError = (x: unknown): x is RuntimeError => x instanceof RuntimeError;

/**
 * `: <what it was waiting for>` for a TIMEOUT's message, from the error of the work the deadline stopped, where that
 * says: a TIMEOUT of its own (S3 throttling an upload, an input image's read or an adapter's fetch: the work names what
 * storage/throttle.ts ThrottleNote noted); else ''.
 */
export function stoppedWhile(err: unknown): string {
  return err instanceof RuntimeError && err.code === 'TIMEOUT' ? `: ${err.message}` : '';
}
