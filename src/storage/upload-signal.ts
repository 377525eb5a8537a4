/**
 * @module The upload an async context belongs to: its signal, how throttling slows it down (upload-retry.ts), and the
 * multipart uploads its requests left open.
 * lib-storage's Upload passes no signal to the commands it sends (its abort() only rejects done() and stops it starting
 * parts), so upload-retry.ts reads it from here to end their retries; and its done() rejects on a cancel while its
 * parts are still in flight, aborting the upload (one attempt) only once they end, so output.ts learns here which
 * upload is still open, and when nothing of it is in flight any more. Free of the AWS SDK, so that importing it loads
 * nothing.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { RequestTally } from './s3-requests.js';
import type { ThrottleWatch } from './throttle.js';

export interface UploadScope {
  readonly signal: AbortSignal | undefined;
  /** The upload's requests in flight at most (lib-storage's queueSize): what throttling cuts (upload-retry.ts). */
  readonly concurrency: number;
  /** Hears the throttled answers to the upload's requests (throttle.ts). */
  readonly watch: ThrottleWatch | undefined;
  /**
   * Hears the throttled answers to what is sent to clean up after them: lib-storage's own AbortMultipartUpload, and the
   * look for the upload an unanswered CreateMultipartUpload made (ListMultipartUploads) with its aborts (upload-retry.ts).
   */
  readonly cleanupWatch: ThrottleWatch | undefined;
  /** Hears how each HTTP request of that cleanup ended (s3-requests.ts); the upload's own go to the context it runs in. */
  readonly cleanupRequests: RequestTally | undefined;
  /** Multipart uploads the store created for requests of this scope, neither completed nor aborted since: key by UploadId. */
  readonly open: ReadonlyMap<string, string>;
  /** Resolves once none of the scope's requests is in flight, or after `ms`. */
  idle(ms: number): Promise<void>;
}

interface Scope extends UploadScope {
  readonly open: Map<string, string>;
  busy: number;
  readonly waiters: Array<() => void>;
}

const current = new AsyncLocalStorage<Scope>();

/** lib-storage's default queueSize: the parts of an upload in flight at once. */
export const UPLOAD_QUEUE = 4;

/** A scope for one upload, its retries ending when `signal` aborts. */
export function uploadScope(signal?: AbortSignal, o: { concurrency?: number; watch?: ThrottleWatch; cleanupWatch?: ThrottleWatch; cleanupRequests?: RequestTally } = {}): UploadScope {
  const scope: Scope = {
    signal, concurrency: o.concurrency ?? UPLOAD_QUEUE, watch: o.watch, cleanupWatch: o.cleanupWatch, cleanupRequests: o.cleanupRequests, open: new Map(), busy: 0, waiters: [],
    idle(ms) {
      if (scope.busy === 0) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const t = setTimeout(resolve, ms);
        // Bounds a wait that the requests in flight keep alive: never the process's only reason to stay.
        t.unref();
        scope.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    },
  };
  return scope;
}

/**
 * Runs `fn` (an Upload's done()) so that the retries of the requests it sends end when the signal aborts: no attempt
 * starts after the abort, and a backoff wait ends at once. The attempt in flight is left to finish, and what an Upload
 * sends as it stops (AbortMultipartUpload) goes as usual. A scope (uploadScope) also records what those requests did.
 */
export function uploadingUntil<T>(signal: AbortSignal | UploadScope | undefined, fn: () => Promise<T>): Promise<T> {
  if (signal === undefined) return fn();
  return current.run(signal instanceof AbortSignal ? uploadScope(signal) as Scope : signal as Scope, fn);
}

/** The scope of the uploadingUntil() this runs under, if any. */
export function currentUpload(): UploadScope | undefined {
  return current.getStore();
}

/**
 * What a multipart request did to the set of open uploads (`open`, UploadId → key): a Create adds its UploadId, a
 * Complete or an Abort that succeeded removes it, as does one answered NoSuchUpload (the store no longer knows it: a
 * retried Complete whose first answer was lost, or an abort sent twice).
 */
export function noteMultipart(open: Map<string, string>, command: string | undefined, input: { Key?: string; UploadId?: string },
  outcome: { output: unknown } | { error: unknown }): void {
  const ends = command === 'CompleteMultipartUploadCommand' || command === 'AbortMultipartUploadCommand';
  if ('error' in outcome) {
    if (ends && input.UploadId !== undefined && (outcome.error as Error)?.name === 'NoSuchUpload') open.delete(input.UploadId);
    return;
  }
  const created = command === 'CreateMultipartUploadCommand' ? (outcome.output as { UploadId?: string } | undefined)?.UploadId : undefined;
  if (created !== undefined) open.set(created, input.Key ?? '');
  else if (ends && input.UploadId !== undefined) open.delete(input.UploadId);
}

/** Sends one request (all its attempts) of the current scope, if any: counted in flight, its outcome noted. */
export async function inUploadScope<T extends { output: unknown }>(command: string | undefined, input: { Key?: string; UploadId?: string },
  send: () => Promise<T>): Promise<T> {
  const scope = current.getStore();
  if (scope === undefined) return send();
  scope.busy++;
  try {
    const out = await send();
    noteMultipart(scope.open, command, input, { output: out.output });
    return out;
  } catch (error) {
    noteMultipart(scope.open, command, input, { error });
    throw error;
  } finally {
    if (--scope.busy === 0) for (const w of scope.waiters.splice(0)) w();
  }
}
