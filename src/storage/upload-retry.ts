/**
 * @module Retries of the requests an upload sends (PutObject, CreateMultipartUpload, UploadPart,
 * CompleteMultipartUpload) after a transient S3 error: a 5xx, a reset, or S3_STALL_TIMEOUT_S of silence
 * (upload-stall.ts). The client's own retries stay off (s3-sdk.ts: the download retries ranges itself, from the bytes
 * it has), so one 500 on one part of a multi-GB push would otherwise fail the push, and one request the store left
 * unanswered would hold it for good. Throttling (503 SlowDown, 429, …) costs no attempt: an upload's requests slow
 * down together as a fill's ranges do (throttle.ts), until S3_THROTTLE_TIMEOUT_S without a request accepted.
 */
import { createHash } from 'node:crypto';
import { HeadObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { abortLostCreates, ownAbort, type LostCreatesOutcome } from './multipart.js';
import { classify, errorStatus, retryTransient, s3Code, throttled as isThrottled } from './s3-errors.js';
import { Throttle, ThrottledTries, ThrottleLog } from './throttle.js';
import { currentUpload, inUploadScope, noteMultipart, type UploadScope } from './upload-signal.js';
import { stallError, boundedAttempt } from './upload-stall.js';
import { countingRequests } from './s3-requests.js';

/** Attempts per upload request: a transient error clears within them or the upload fails (about 3 s of backoff at most). */
export const UPLOAD_ATTEMPTS = 5;

const UPLOAD_COMMANDS: ReadonlySet<string> = new Set(['PutObjectCommand', 'CreateMultipartUploadCommand', 'UploadPartCommand', 'CompleteMultipartUploadCommand']);

interface CompleteInput { Bucket?: string; Key?: string; UploadId?: string; PartNumber?: number; MultipartUpload?: { Parts?: { ETag?: string }[] } }

/**
 * S3's ETag of an object completed from these parts: the MD5 of their MD5s, then `-` and their count. Undefined where a
 * part's ETag is no MD5 (SSE-KMS, some stores).
 */
export function multipartEtag(partEtags: readonly (string | undefined)[]): string | undefined {
  const md5s = partEtags.map((e) => e?.replace(/"/g, '').toLowerCase());
  if (md5s.length === 0 || md5s.some((m) => m === undefined || !/^[0-9a-f]{32}$/.test(m))) return undefined;
  const h = createHash('md5');
  for (const m of md5s) h.update(Buffer.from(m!, 'hex'));
  return `"${h.digest('hex')}-${md5s.length}"`;
}

/** How an upload's requests meet throttling: S3_THROTTLE_TIMEOUT_S in ms, and where the throttle's lines go. */
export interface UploadThrottling {
  timeoutMs: number;
  log: Logger;
}

/**
 * Makes `client` send each upload request up to `attempts` times, with the fill's full-jitter backoff; every other
 * command keeps its single attempt. Only errors classify() calls transient are retried: a denial or a missing bucket
 * fails at once. Throttled answers count no attempt: the requests of one upload (one uploadingUntil scope) take places
 * of one Throttle (`throttling`), as a fill's ranges do, and it gives up once throttled for its timeout without a
 * request accepted (STORAGE_TRANSIENT `cannot upload s3://…: S3 kept throttling the upload …`). Each attempt, and an
 * AbortMultipartUpload (lib-storage awaits its own before it reports a failure), is cut after `stallMs` of silence. It
 * wraps every other middleware of the initialize step, so each attempt is signed afresh and passes trackUploads
 * (multipart.ts), whose stop ends the retries too, as does the signal of uploadingUntil (upload-signal.ts): lib-storage
 * gives its commands none. A CreateMultipartUpload with an attempt left unanswered is followed by a look for the upload
 * that attempt may have made (multipart.ts abortLostCreates), whose outcome `onLostCreates` hears. The throttled answers
 * to that look and to lib-storage's own abort go to the upload scope's cleanupWatch. Returns what logs the summary of
 * throttled spells not logged yet (ThrottleLog.flush).
 */
export function retryUploads(client: S3Client, stallMs: number, throttling: UploadThrottling, attempts = UPLOAD_ATTEMPTS, onLostCreates?: (o: LostCreatesOutcome) => void): () => void {
  // What each multipart upload failed with, by UploadId, until lib-storage aborts it: an abort that fails (cut by the
  // bound, a 500, …) then fails with that, which is what the caller has to fix (lib-storage reports its abort's error
  // in its place; the upload stays tracked as unfinished, multipart.ts).
  const failed = new Map<string, unknown>();
  // The multipart uploads this client created and has not completed or aborted (UploadId → key), and its
  // CreateMultipartUpload attempts in flight by key: what a look for uploads whose create went unanswered leaves alone.
  const mine = new Map<string, string>();
  const creating = new Map<string, Set<Promise<unknown>>>();
  // Each upload's Throttle, made with its first request. A request outside any upload's scope has one of its own.
  const throttles = new WeakMap<UploadScope, Throttle>();
  // One line at a time for the uploads S3 throttles, not one per upload.
  const gate = new ThrottleLog(throttling.log, 'upload');
  const throttleOf = (scope: UploadScope | undefined, uri: string) => {
    let t = scope && throttles.get(scope);
    if (t === undefined) {
      t = new Throttle({ concurrency: scope?.concurrency ?? 1, timeoutMs: throttling.timeoutMs, log: throttling.log, what: 'upload', fields: { uri }, gate,
        ...(scope?.watch ? { watch: scope.watch } : {}) });
      if (scope) throttles.set(scope, t);
    }
    return t;
  };
  client.middlewareStack.add((next, context) => async (args) => {
    const command = context.commandName ?? '';
    const input = args.input as CompleteInput;
    // Within an upload's scope (output.ts), each of its requests, attempts and aborts included, counts in flight.
    return inUploadScope(command, input, async () => {
      const part = input.PartNumber !== undefined ? ` (part ${input.PartNumber})` : '';
      const bounded = <T>(attempt: number, tries: number, fn: () => Promise<T>, what = `${command.replace(/Command$/, '')}${part}`) =>
        boundedAttempt(stallMs, fn, (cause) => stallError(what, stallMs, attempt, tries, cause));
      if (command === 'AbortMultipartUploadCommand') {
        const failure = failed.get(input.UploadId ?? '');
        failed.delete(input.UploadId ?? '');
        return countingRequests(currentUpload()?.cleanupRequests, () => bounded(0, 1, () => next(args))).then((out) => {
          noteMultipart(mine, command, input, { output: out.output });
          return out;
        }, (e: unknown) => {
          noteMultipart(mine, command, input, { error: e });
          // lib-storage's own abort has one attempt and no Throttle, so its throttled answer is counted here (what it
          // leaves open is aborted again, with retries: output.ts abortLeft).
          if (isThrottled(e) && !ownAbort(input)) currentUpload()?.cleanupWatch?.throttled(s3Code(e));
          throw failure ?? e;
        });
      }
      if (!UPLOAD_COMMANDS.has(command)) return next(args);
      const scope = currentUpload();
      const signal = scope?.signal;
      if (signal?.aborted) throw Object.assign(new Error('the upload was cancelled'), { name: 'AbortError' });
      const remember = (e: unknown) => {
        if (input.UploadId !== undefined) failed.set(input.UploadId, e);
        throw e;
      };
      // When the first CreateMultipartUpload attempt that got no answer began, and the last one ended.
      let unanswered: { from: number; to: number } | undefined;
      const key = input.Key ?? '';
      const send = async (attempt: number) => {
        const at = performance.now();
        const sent = bounded(attempt, attempts, () => next(args));
        const inFlight = command === 'CreateMultipartUploadCommand' ? creating.get(key) ?? creating.set(key, new Set()).get(key)! : undefined;
        inFlight?.add(sent);
        try {
          const out = await sent;
          noteMultipart(mine, command, input, { output: out.output });
          return out;
        } catch (e) {
          noteMultipart(mine, command, input, { error: e });
          if (inFlight !== undefined && answerLost(e)) unanswered = { from: unanswered?.from ?? at, to: performance.now() };
          throw e;
        } finally {
          inFlight?.delete(sent);
          if (inFlight?.size === 0) creating.delete(key);
        }
      };
      const uri = `s3://${input.Bucket ?? ''}/${key}`;
      const throttle = new ThrottledTries(throttleOf(scope, uri));
      try {
        return await retryTransient(async (attempt) => {
          try {
            return await throttle.attempt(signal, () => send(attempt));
          } catch (e) {
            // A Complete that S3 carried out but whose answer was lost: the retry finds the upload gone.
            if (attempt > 0 && command === 'CompleteMultipartUploadCommand' && (e as Error)?.name === 'NoSuchUpload') {
              return { output: await bounded(attempt, attempts, () => completedAlready(client, input, e), 'HeadObject after CompleteMultipartUpload'), response: undefined };
            }
            throw e;
          }
        }, attempts, signal, undefined, throttle.onThrottled).catch((e: unknown) => remember(throttle.gaveUp ? throttle.throttle.gaveUp(`upload ${uri}`, e) : e));
      } finally {
        throttle.done();
        // A create the store carried out whose answer never came made an upload no one else will end: looked for and
        // aborted before the upload goes on (or reports its failure), once, whatever the last attempt did.
        if (unanswered !== undefined) {
          const settle = () => Promise.allSettled([...creating.get(key) ?? []]);
          const cleanup = { log: throttling.log, ...(scope?.cleanupWatch ? { watch: scope.cleanupWatch } : {}) };
          const lost = { bucket: input.Bucket ?? '', key, ...unanswered };
          const outcome = await countingRequests(scope?.cleanupRequests, () => abortLostCreates(client, lost, mine, settle, undefined, undefined, cleanup)).catch((e: unknown) => (
            { bucket: input.Bucket ?? '', key, aborted: [], failed: (e as Error)?.name ?? 'Error' }));
          onLostCreates?.(outcome);
        }
      }
    });
  }, { step: 'initialize', priority: 'high', name: 'retryUploads' });
  // For the client's destroy(): the summary of the uploads' throttled spells held, logged before the client goes.
  return () => gate.flush();
}

/**
 * Whether a failed attempt may have been carried out though its answer never came: no HTTP answer (a reset, a cut
 * after S3_STALL_TIMEOUT_S), and not stopped before it was sent.
 */
const answerLost = (e: unknown) => errorStatus(e) === undefined && classify(e) !== 'aborted';

/**
 * The object a retried Complete found gone, if the first attempt made it: its ETag is the one S3 gives an object
 * completed from these parts. Otherwise (another ETag, or parts whose ETags are no MD5) the upload may or may not be
 * the object now there, and the caller is told to upload again.
 */
async function completedAlready(client: S3Client, input: CompleteInput, err: unknown) {
  const expected = multipartEtag((input.MultipartUpload?.Parts ?? []).map((p) => p.ETag));
  const head = expected === undefined ? undefined
    : await client.send(new HeadObjectCommand({ Bucket: input.Bucket, Key: input.Key })).catch(() => undefined);
  if (head?.ETag !== undefined && head.ETag === expected) {
    return { $metadata: head.$metadata, Bucket: input.Bucket, Key: input.Key, ETag: head.ETag };
  }
  throw new RuntimeError('STORAGE_INCOMPLETE', `s3://${input.Bucket}/${input.Key}: CompleteMultipartUpload was retried after an answer was lost, and S3 no longer `
    + 'knows the upload (NoSuchUpload) nor holds an object of its parts; upload it again', { cause: err });
}
