/** @module Pure planning for the parallel reader: byte ranges per file, the retry policy as data, backoff. */

/** An inclusive byte range, as in an HTTP Range header. */
export interface Part {
  readonly start: number;
  readonly end: number;
}

/**
 * Splits `[0, size)` into contiguous ranges of at most `partBytes` bytes. `size = 0` gives `[]`.
 * The last range takes the remainder, so there are `ceil(size / partBytes)` parts.
 */
export function planParts(size: number, partBytes: number): Part[] {
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`size must be a non-negative safe integer, got ${size}`);
  if (!Number.isSafeInteger(partBytes) || partBytes < 1) throw new RangeError(`partBytes must be a positive integer, got ${partBytes}`);
  const parts: Part[] = [];
  // Ranges are inclusive, so a 10-byte object is bytes=0-9.
  for (let start = 0; start < size; start += partBytes) parts.push({ start, end: Math.min(size, start + partBytes) - 1 });
  return parts;
}

/** When to retry: statuses and error codes that a fresh attempt can fix; everything else is permanent. */
export const RETRY = Object.freeze({
  statuses: Object.freeze([408, 429, 500, 502, 503, 504]),
  codes: Object.freeze(['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ENOTFOUND', 'ENETUNREACH', 'EHOSTUNREACH',
    'ECONNABORTED', 'UND_ERR_SOCKET', 'ERR_STREAM_PREMATURE_CLOSE', 'TimeoutError', 'RequestTimeout', 'SlowDown', 'InternalError',
    'ServiceUnavailable', 'Throttling', 'ThrottlingException', 'RequestTimeTooSkewed']),
  /** S3 error names that retrying cannot fix; they become STORAGE_DENIED / STORAGE_MISSING. */
  denied: Object.freeze(['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'InvalidToken', 'ExpiredToken', 'AllAccessDisabled',
    'AccountProblem', 'InvalidBucketName', 'CredentialsProviderError', 'Forbidden']),
  missing: Object.freeze(['NoSuchBucket', 'NoSuchKey', 'NotFound']),
  /**
   * KMS's answers that S3 passes on for an SSE-KMS object (400 KMS.ThrottlingException: every GET of such an object is
   * a kms:Decrypt, unless the bucket uses an S3 Bucket Key): retried. Any other `KMS.` code is the key refusing to
   * decrypt (disabled, deleted, pending deletion, not allowed): denied.
   */
  kmsTransient: Object.freeze(['KMS.ThrottlingException', 'KMS.DependencyTimeoutException', 'KMS.KMSInternalException', 'KMS.KeyUnavailableException']),
  /** The request time was refused (S3 allows 15 minutes of skew): retried once the clock offset is corrected. */
  skew: Object.freeze(['RequestTimeTooSkewed', 'RequestExpired', 'RequestInTheFuture']),
  baseMs: 200,
  maxMs: 5_000,
  factor: 2,
});

/**
 * How a throttled fill backs off (throttle.ts), after the AWS SDK's standard retry strategy: a throttling answer waits
 * from a larger base than other errors (its THROTTLING_RETRY_DELAY_BASE) up to 20 s (its MAXIMUM_RETRY_DELAY), never
 * more than a quarter of S3_THROTTLE_TIMEOUT_S so the fill asks again several times before it gives up; a Retry-After
 * lengthens one wait by at most `hintExtraMs`, as the SDK lets it.
 */
export const THROTTLE = Object.freeze({
  /**
   * S3 error names that ask the client to send fewer requests: S3's 503 SlowDown, the SDKs' throttling codes, MinIO's
   * SlowDownRead/SlowDownWrite (which it also sends while it lacks a read or write quorum of drives), and KMS's
   * throttling of an SSE-KMS object's decrypts. A 429 is throttling whatever its code.
   */
  codes: Object.freeze(['SlowDown', 'SlowDownRead', 'SlowDownWrite', 'Throttling', 'ThrottlingException', 'ThrottledException', 'RequestThrottled',
    'RequestThrottledException', 'RequestLimitExceeded', 'TooManyRequestsException', 'BandwidthLimitExceeded', 'KMS.ThrottlingException']),
  baseMs: 1_000,
  maxMs: 20_000,
  hintExtraMs: 5_000,
  factor: 2,
});

/** Full-jitter exponential backoff: uniform in [0, min(max, base * factor^attempt)], at least 20 ms. */
export function backoffMs(attempt: number, random: () => number = Math.random, policy: { baseMs: number; maxMs: number; factor: number } = RETRY): number {
  const cap = Math.min(policy.maxMs, policy.baseMs * policy.factor ** Math.max(0, attempt));
  return Math.max(20, Math.floor(random() * cap));
}

/** What one range in flight may hold open: its socket, and its file (each file is opened once, but ranges may be of as many files). */
export const DESCRIPTORS_PER_RANGE = 2;
/**
 * Descriptors a download leaves the rest of the process: code loading on first use, ONNX Runtime reading the model while
 * it arrives, the journal, lock and lease, a listing's socket, probes. A server booting from S3 used some 35 at most
 * with one range in flight (demo model, measured).
 */
export const DESCRIPTOR_RESERVE = 32;

/**
 * Ranges in flight: `wanted` (S3_MAX_CONCURRENCY), fewer where the open-file limit leaves no room for them beside the
 * `open` descriptors and the reserve; at least 1. `wanted` where the limit or the count is unknown.
 */
export function rangesInFlight(wanted: number, limit: number | undefined, open: number | undefined): number {
  if (limit === undefined || open === undefined) return wanted;
  return Math.max(1, Math.min(wanted, Math.floor((limit - open - DESCRIPTOR_RESERVE) / DESCRIPTORS_PER_RANGE)));
}
