/**
 * @module The multipart uploads an S3 client starts and has not finished, so that a push which stops part-way can
 * abort them: an upload neither completed nor aborted keeps its parts, billed, until a lifecycle rule removes them,
 * and no listing of the prefix shows it. And those that a CreateMultipartUpload carried out but left unanswered made,
 * whose UploadId nobody learnt: looked for and aborted.
 */
import type { S3Client } from '@aws-sdk/client-s3';
import { deadline } from '../deadline.js';
import { type Logger, silentLogger } from '../log.js';
import { retryTransient, s3Code, throttled } from './s3-errors.js';
import { Throttle, ThrottledTries, type ThrottleWatch } from './throttle.js';
import { noteMultipart } from './upload-signal.js';

export interface UploadTracker {
  /** Uploads the store created and that were neither completed nor aborted through this client: key by UploadId. */
  readonly open: ReadonlyMap<string, string>;
  /**
   * From now on the client sends nothing (a request fails before it is sent, so no part follows); resolves once no
   * CreateMultipartUpload is in flight, whose UploadId would otherwise be unknown, or after `ms`.
   */
  stop(ms: number): Promise<void>;
}

export function trackUploads(client: S3Client): UploadTracker {
  const open = new Map<string, string>();
  let stopped = false;
  let creating = 0;
  let idle: (() => void) | undefined;
  client.middlewareStack.add((next, context) => async (args) => {
    if (stopped) throw Object.assign(new Error('the upload was stopped'), { name: 'AbortError' });
    const input = args.input as { Key?: string; UploadId?: string };
    const create = context.commandName === 'CreateMultipartUploadCommand';
    if (create) creating++;
    try {
      const out = await next(args);
      noteMultipart(open, context.commandName, input, { output: out.output });
      return out;
    } catch (error) {
      // NoSuchUpload (a retried Complete whose first answer was lost, which upload-retry.ts may take as done): nothing
      // left to abort, nor to name as aborted.
      noteMultipart(open, context.commandName, input, { error });
      throw error;
    } finally {
      if (create && --creating === 0) idle?.();
    }
  }, { step: 'initialize', name: 'trackMultipartUploads' });
  return {
    open,
    stop(ms) {
      stopped = true;
      if (creating === 0) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const t = setTimeout(resolve, ms);
        idle = () => {
          clearTimeout(t);
          resolve();
        };
      });
    },
  };
}

/**
 * One attempt of a request, cut after `attemptMs` unanswered or when `within` ends. A cut attempt fails with its
 * TimeoutError, which retryTransient tries again; the SDK's AbortError would end the retries.
 */
async function cutAttempt<T>(within: AbortSignal, attemptMs: number, send: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const one = deadline(within, attemptMs);
  try {
    return await send(one.signal);
  } catch (e) {
    if (one.timedOut) throw one.signal.reason;
    throw e;
  } finally {
    one.clear();
  }
}

/** Where a cleanup's throttled answers go: its Throttle's log lines (none without a log), and the metric. */
export interface CleanupThrottling {
  log?: Logger;
  watch?: ThrottleWatch;
}

/** Cleanup requests S3 kept throttling until the cleanup's bound (cleanupReason says so). */
const throttledOut = new WeakSet<object>();

/**
 * A cleanup's Throttle: its requests (an abort per upload, a look for lost ones) slow down together as an upload's do,
 * and it gives up once throttled for all of `totalMs` (the cleanup's bound, never S3_THROTTLE_TIMEOUT_S: a request's
 * answer or a stop waits for it).
 */
const cleanupThrottle = (concurrency: number, totalMs: number, t: CleanupThrottling) => new Throttle({
  concurrency: Math.max(1, concurrency), timeoutMs: totalMs, log: t.log ?? silentLogger(), what: 'abort', bound: 'the cleanup\'s bound', ...(t.watch ? { watch: t.watch } : {}),
});

/**
 * One request of a cleanup, tried again if transient (`attempts` in all), throttled answers costing none of them, all
 * within `total`; each attempt cut after `attemptMs` unanswered. A failure while S3 was throttling it (its bound ran
 * out meanwhile, or the Throttle gave up) is marked for cleanupReason. Where the bound ran out in the try after a
 * throttled answer (a slow answer, or a wait for a place), that answer is the failure, not the cut.
 */
async function cleanupRequest<T>(throttle: Throttle, total: AbortSignal, attempts: number, attemptMs: number, send: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const tries = new ThrottledTries(throttle);
  try {
    return await retryTransient(() => tries.attempt(total, () => cutAttempt(total, attemptMs, send)), attempts, total, undefined, tries.onThrottled);
  } catch (e) {
    const failure = total.aborted && tries.throttledBy !== undefined ? tries.throttledBy : e;
    if ((tries.gaveUp || throttled(failure)) && typeof failure === 'object' && failure !== null) throttledOut.add(failure);
    throw failure;
  } finally {
    tries.done();
  }
}

/**
 * Why a cleanup request failed, for the line that names what it left: the store's code (NotImplemented, AccessDenied,
 * …), and where S3 kept throttling it until the cleanup's bound, that too.
 */
export function cleanupReason(e: unknown, totalMs: number): string {
  const code = s3Code(e);
  return typeof e === 'object' && e !== null && throttledOut.has(e) ? `${code}: S3 kept throttling the cleanup for its ${totalMs / 1000} s` : code;
}

/**
 * Aborts these multipart uploads (UploadId, key) of `bucket`: each attempt cut after `attemptMs` unanswered, a transient
 * refusal or a cut attempt tried again (8 tries; a throttled answer costs none, throttle.ts), all within `totalMs`. One
 * the store no longer knows (NoSuchUpload: completed, or aborted already) counts as aborted. One result per upload, in
 * order.
 */
export async function abortUploads(client: S3Client, bucket: string, uploads: readonly (readonly [string, string])[], totalMs: number,
  attemptMs = 5_000, throttling: CleanupThrottling = {}): Promise<PromiseSettledResult<void>[]> {
  const total = deadline(undefined, totalMs);
  try {
    return await abortWithin(client, bucket, uploads, total.signal, attemptMs, cleanupThrottle(uploads.length, totalMs, throttling));
  } finally {
    total.clear();
  }
}

/** The inputs of the AbortMultipartUploads sent here, whose throttled answers their cleanup's Throttle hears (ownAbort). */
const ownAborts = new WeakSet<object>();

/**
 * Whether an AbortMultipartUpload's input is one of this module's, not lib-storage's own abort: a client middleware
 * sees both (upload-retry.ts), and counts the throttled answers of lib-storage's alone, so that none counts twice.
 */
export const ownAbort = (input: object): boolean => ownAborts.has(input);

async function abortWithin(client: S3Client, bucket: string, uploads: readonly (readonly [string, string])[], total: AbortSignal, attemptMs: number,
  throttle: Throttle): Promise<PromiseSettledResult<void>[]> {
  // Loaded here: the warm-up CLI imports this module, and with S3_TRANSPORT=lite a fill never loads the AWS SDK.
  const { AbortMultipartUploadCommand } = await import('@aws-sdk/client-s3');
  return Promise.allSettled(uploads.map(async ([UploadId, Key]) => {
    try {
      await cleanupRequest(throttle, total, 8, attemptMs, (abortSignal) => {
        const command = new AbortMultipartUploadCommand({ Bucket: bucket, Key, UploadId });
        ownAborts.add(command.input);
        return client.send(command, { abortSignal });
      });
    } catch (e) {
      if ((e as Error)?.name !== 'NoSuchUpload') throw e;
    }
  }));
}

/** A key whose CreateMultipartUpload went unanswered: when (performance.now()) the first such attempt began and the last ended. */
export interface LostCreates {
  readonly bucket: string;
  readonly key: string;
  readonly from: number;
  readonly to: number;
}

export interface LostCreatesOutcome {
  readonly bucket: string;
  readonly key: string;
  /** Uploads of the key that those creates made, aborted (none: the store had carried none of them out). */
  readonly aborted: readonly string[];
  /** The S3 code of a listing or an abort that failed (NotImplemented, AccessDenied, …): an upload may be left. */
  readonly failed?: string;
}

/**
 * Aborts what CreateMultipartUploads of `lost.key` carried out but never answered (a reset, a cut after
 * S3_STALL_TIMEOUT_S) left: an upload whose UploadId nobody learnt, so nothing sends it a part, completes or aborts it,
 * yet ListMultipartUploads lists it until a lifecycle rule removes it. S3 has no token that makes a create idempotent,
 * so they are looked for: ListMultipartUploads of the key (as prefix; its own uploads sort first), those of exactly the
 * key that this client did not create (`mine`, or a create of the key in flight when the listing came, which
 * `settle` waits for), initiated between the first lost attempt's start and the last one's end. S3's clock is read
 * from the listing answer's Date, as the SDK-free reader learns it (s3-lite.ts); Initiated is in whole seconds. An
 * upload another client made of the same key within those seconds would be aborted too: two writers of one key at
 * the same moment, one of whose objects S3 would have replaced anyway. Each request is cut after `attemptMs` and
 * retried if transient, all within `totalMs`.
 */
export async function abortLostCreates(client: S3Client, lost: LostCreates, mine: ReadonlyMap<string, string>, settle: () => Promise<unknown>,
  totalMs = 10_000, attemptMs = 5_000, throttling: CleanupThrottling = {}): Promise<LostCreatesOutcome> {
  const { ListMultipartUploadsCommand } = await import('@aws-sdk/client-s3');
  const { bucket, key } = lost;
  const total = deadline(undefined, totalMs);
  const throttle = cleanupThrottle(1, totalMs, throttling);
  try {
    let listed;
    try {
      let date: string | undefined;
      let sentAt = 0;
      const page = await cleanupRequest(throttle, total.signal, 3, attemptMs, (abortSignal) => {
        const command = new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: key, MaxUploads: 1000 });
        command.middlewareStack.add((next) => async (args) => {
          const out = await next(args);
          date = (out.response as { headers?: Record<string, string> } | undefined)?.headers?.date;
          return out;
        }, { step: 'deserialize', name: 'listingDate' });
        sentAt = performance.now();
        return client.send(command, { abortSignal });
      });
      listed = { page, date, sentAt, receivedAt: performance.now() };
    } catch (e) {
      return { bucket, key, aborted: [], failed: cleanupReason(e, totalMs) };
    }
    const known = new Set(mine.keys());
    await settle();
    for (const id of mine.keys()) known.add(id);
    const { page, date, sentAt, receivedAt } = listed;
    // S3 stamped the answer's Date (whole seconds) between our send and its receipt; without one, our own clock.
    const d = Date.parse(date ?? '');
    const [stamp, earliest, latest] = Number.isNaN(d) ? [Date.now(), performance.now(), performance.now()] : [d, receivedAt, sentAt];
    const from = Math.floor((stamp - (earliest - lost.from)) / 1000) * 1000;
    const to = stamp + 1000 - (latest - lost.to);
    const theirs = (page.Uploads ?? []).filter((u) => {
      const at = u.Initiated?.getTime();
      return u.Key === key && u.UploadId !== undefined && !known.has(u.UploadId) && at !== undefined && at >= from && at <= to;
    }).map((u) => u.UploadId!);
    if (theirs.length === 0) return { bucket, key, aborted: [] };
    const got = await abortWithin(client, bucket, theirs.map((id) => [id, key] as const), total.signal, attemptMs, throttle);
    const refused = got.find((g): g is PromiseRejectedResult => g.status === 'rejected');
    return { bucket, key, aborted: theirs.filter((_, i) => got[i]!.status === 'fulfilled'), ...(refused ? { failed: cleanupReason(refused.reason, totalMs) } : {}) };
  } finally {
    total.clear();
  }
}
