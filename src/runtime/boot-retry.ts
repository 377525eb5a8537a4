/**
 * @module Which failed boots are tried again, and when. A transient failure (S3 unreachable or failing past the fetch's
 * own retries, a read that stalled, a cache volume's passing error, the process out of file descriptors) is tried again
 * after a capped exponential backoff with jitter; a permanent one (a wrong bucket, credentials or configuration, a
 * missing or unsupported model, no space) never is: it fails the boot, loud and stable.
 */
import { isRuntimeError, type OutcomeCode } from '../errors.js';

export const BOOT_RETRY = Object.freeze({
  /** Outcomes a later attempt can end otherwise: the store or the link recovers, descriptors free up. */
  codes: Object.freeze(['STORAGE_TRANSIENT', 'STORAGE_STALL', 'STORAGE_SHORT_READ', 'TOO_MANY_OPEN_FILES', 'CACHE_IO'] as const satisfies readonly OutcomeCode[]),
  /**
   * CACHE_IO only for these errnos: a volume's passing trouble (an NFS server away, a busy device). Refusals (EACCES,
   * EPERM, EROFS) are a mount or permission mistake that no wait fixes.
   */
  cacheErrnos: Object.freeze(['EIO', 'EAGAIN', 'EBUSY', 'ESTALE', 'ETIMEDOUT', 'EINTR', 'ENOTCONN']),
  /** The first wait; each failed attempt doubles it, up to BOOT_RETRY_MAX_S. */
  firstMs: 5_000,
});

export type RetriedCode = (typeof BOOT_RETRY.codes)[number];

/** The code of a boot failure that is tried again, or undefined for one that fails the boot. */
export function retriedCode(err: unknown): RetriedCode | undefined {
  if (!isRuntimeError(err) || !(BOOT_RETRY.codes as readonly string[]).includes(err.code)) return undefined;
  if (err.code === 'CACHE_IO' && !BOOT_RETRY.cacheErrnos.includes(String((err.cause as NodeJS.ErrnoException | undefined)?.code))) return undefined;
  return err.code as RetriedCode;
}

/**
 * The wait before attempt `failed + 1`: firstMs doubled per failure, capped at `maxMs`, of which a random half is taken
 * off (equal jitter), so that pods failed by one outage do not all come back to the store at the same moment, and no
 * wait is near zero.
 */
export function retryDelayMs(failed: number, maxMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, BOOT_RETRY.firstMs * 2 ** Math.min(failed - 1, 30));
  return ceiling / 2 + (ceiling / 2) * random();
}
