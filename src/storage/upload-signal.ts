/**
 * @module The signal of the upload an async context belongs to. lib-storage's Upload passes no signal to the commands
 * it sends (its abort() only rejects done() and stops it starting parts), so upload-retry.ts reads it from here to end
 * their retries. Free of the AWS SDK, so that importing it loads nothing.
 */
import { AsyncLocalStorage } from 'node:async_hooks';

const current = new AsyncLocalStorage<AbortSignal>();

/**
 * Runs `fn` (an Upload's done()) so that the retries of the requests it sends end when `signal` aborts: no attempt
 * starts after the abort, and a backoff wait ends at once. The attempt in flight is left to finish, and what an Upload
 * sends as it stops (AbortMultipartUpload) goes as usual.
 */
export function uploadingUntil<T>(signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
  return signal === undefined ? fn() : current.run(signal, fn);
}

/** The signal of the uploadingUntil() this runs under, if any. */
export function uploadSignal(): AbortSignal | undefined {
  return current.getStore();
}
