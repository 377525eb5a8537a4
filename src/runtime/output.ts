/**
 * @module `output_uri`: encoded images go to S3 (lib-storage Upload) instead of base64 in the reply.
 * One image is written to the key as given; several go to `<stem>-<i>.<ext>` (i from 0, the key's own
 * extension dropped), e.g. `s3://b/out/fox.png` with 2 images → `out/fox-0.png`, `out/fox-1.png`.
 */
import { firstUse, REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EncodedImage } from './engine.js';
import { outputKeys } from './request.js';
import type { RequestS3 } from '../storage/request-s3.js';
import { atEndpoint, bucketRegion, classify, s3Code } from '../storage/s3-errors.js';
import { countingRequests, type RequestTally } from '../storage/s3-requests.js';
import { abortUploads, cleanupReason } from '../storage/multipart.js';
import { ThrottleNote } from '../storage/throttle.js';
import { UPLOAD_QUEUE, uploadingUntil, uploadScope, type UploadScope } from '../storage/upload-signal.js';
import { parseS3Object, type S3Url } from '../storage/uri.js';

export interface OutputStore {
  /** Uploads each image and returns its `s3://` URI, in order. */
  upload(uri: string, images: readonly EncodedImage[], signal?: AbortSignal): Promise<string[]>;
  /** Resolves once the aborts of failed uploads' multipart uploads (below) have ended, or after `ms`. */
  settled(ms: number): Promise<void>;
}

/** How long a failed upload's parts in flight may take to end before its multipart upload is aborted anyway. */
const PARTS_END_MS = 30_000;
/** How long the abort of a failed upload's multipart upload may take, its retries and throttled waits included. */
const ABORT_MS = 10_000;

const CONTENT_TYPE: Record<EncodedImage['format'], string> = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' };

/** output_uri as an object to write: an s3:// URL with a key (storage/uri.ts reads every s3:// URL). */
export function parseOutputUri(uri: string): S3Url {
  const u = parseS3Object(uri);
  if (u === undefined) throw new RuntimeError('INVALID_INPUT', `output_uri must look like s3://bucket/key, got ${JSON.stringify(uri)}`);
  return u;
}

const loadUpload = firstUse('the S3 uploader (AWS SDK lib-storage)', () => import('@aws-sdk/lib-storage'));

/**
 * Uploads through the runtime's request client (created on the first upload or s3:// input); lib-storage loads then.
 * `log` hears of multipart uploads that a failed or cancelled upload left and that were aborted, or could not be;
 * `onThrottled` of each answer that throttled an upload (the store's code), `onCleanupThrottled` of each that throttled
 * its cleanup: the abort of a failed one (lib-storage's own, and abortLeft's), the look for an upload that an unanswered
 * CreateMultipartUpload made and its abort. `requests` hears how each HTTP request of the uploads, and of that cleanup,
 * ended (storage/s3-requests.ts).
 */
export function createOutputStore(s3: RequestS3, log?: Logger, onThrottled?: (code: string) => void, onCleanupThrottled?: (code: string) => void,
  requests: { upload?: RequestTally; cleanup?: RequestTally } = {}): OutputStore {
  const aborting = new Set<Promise<void>>();
  return {
    settled(ms) {
      if (aborting.size === 0) return Promise.resolve();
      let timer: NodeJS.Timeout | undefined;
      return Promise.race([Promise.all(aborting).then(() => undefined), new Promise<void>((r) => (timer = setTimeout(r, ms)))]).finally(() => clearTimeout(timer));
    },
    async upload(uri, images, signal) {
      const { bucket, key } = parseOutputUri(uri);
      const keys = outputKeys(key, images.length, images[0]?.format ?? 'png');
      const note = s3.addressing(bucket, 'output_uri');
      const client = await s3.client();
      const { Upload } = await loadUpload();
      // Every upload settles before the answer: one that failed first used to leave the others retrying after it, so
      // objects appeared after the error said none were stored (and could replace what a retried request wrote).
      let first: { err: unknown; key: string; throttled: string | undefined } | undefined;
      const settled = await Promise.allSettled(
        images.map(async (img, i) => {
          const up = new Upload({
            client,
            queueSize: UPLOAD_QUEUE,
            params: { Bucket: bucket, Key: keys[i]!, Body: Buffer.from(img.data), ContentType: CONTENT_TYPE[img.format] },
          });
          const onAbort = () => void up.abort().catch(() => undefined);
          signal?.addEventListener('abort', onAbort, { once: true });
          // Whether S3 was throttling the upload when the request's deadline stopped it, for the error to say so.
          const throttling = new ThrottleNote(onThrottled);
          const scope = uploadScope(signal, {
            concurrency: UPLOAD_QUEUE, watch: throttling, ...(onCleanupThrottled ? { cleanupWatch: { throttled: onCleanupThrottled } } : {}),
            ...(requests.cleanup ? { cleanupRequests: requests.cleanup } : {}),
          });
          try {
            // up.abort() alone stops no retry of a request already sent (upload-signal.ts).
            await countingRequests(requests.upload, () => uploadingUntil(scope, () => up.done()));
          } catch (err) {
            const done = countingRequests(requests.cleanup, () => abortLeft(client, bucket, scope, log, onCleanupThrottled)).catch(() => undefined).finally(() => aborting.delete(done));
            aborting.add(done);
            first ??= { err, key: keys[i]!, throttled: throttling.stopped(signal, `the upload to s3://${bucket}/${keys[i]!}`) };
            throw err;
          } finally {
            signal?.removeEventListener('abort', onAbort);
          }
        }),
      );
      if (first !== undefined) {
        const stored = keys.filter((_, i) => settled[i]!.status === 'fulfilled').map((k) => `s3://${bucket}/${k}`);
        // TIMEOUT, as the request's deadline ends it (generation.ts says which, and adds this).
        const err = first.throttled !== undefined
          ? new RuntimeError('TIMEOUT', `output_uri: ${first.throttled}; the images were generated but not stored`, { cause: first.err })
          : uploadError(first.err, bucket, first.key, note, s3.endpoint(bucket));
        throw withWritten(err, stored, 'images');
      }
      return keys.map((k) => `s3://${bucket}/${k}`);
    },
  };
}

/**
 * Aborts the multipart upload a failed or cancelled upload left open. lib-storage aborts it itself, once, and on a
 * cancel only after its parts in flight end (its done() has rejected by then): an abort refused (a 500), cut by
 * S3_STALL_TIMEOUT_S, or never sent (the process closing) left the parts stored, billed, and shown by no listing.
 * So once none of its requests is in flight, what is still open is aborted with retries.
 */
async function abortLeft(client: Parameters<typeof abortUploads>[0], bucket: string, scope: UploadScope, log: Logger | undefined,
  onThrottled: ((code: string) => void) | undefined): Promise<void> {
  await scope.idle(PARTS_END_MS);
  const open = [...scope.open];
  if (open.length === 0) return;
  // Throttled aborts wait, within ABORT_MS: a stop (settled) waits for them no longer than that.
  const got = await abortUploads(client, bucket, open, ABORT_MS, undefined, { ...(log ? { log } : {}), ...(onThrottled ? { watch: { throttled: onThrottled } } : {}) });
  got.forEach((g, i) => {
    const where = `s3://${bucket}/${open[i]![1]}`;
    if (g.status === 'fulfilled') log?.info({ uri: where }, 'output_uri: aborted the multipart upload of a failed upload');
    else {
      log?.warn({ uri: where, reason: cleanupReason(g.reason, ABORT_MS) }, 'output_uri: could not abort the multipart upload of a failed upload; its parts are billed until '
        + 'aborted (aws s3api list-multipart-uploads, abort-multipart-upload) or a lifecycle rule (AbortIncompleteMultipartUpload) removes them');
    }
  });
}

/**
 * `err` naming the objects of its request that were written though the request failed: `whose` are they, the
 * request's other `images` (this module) or its other `instances' images` (generation.ts). A copy: the error may be
 * shared with requests that waited for the same generation (generation.ts, joinRunning).
 */
export function withWritten(err: unknown, written: readonly string[], whose: string): unknown {
  if (written.length === 0 || !(err instanceof RuntimeError)) return err;
  const { retryAfter, fields, allow } = err;
  return new RuntimeError(err.code, `${err.message}; of the request's other ${whose}, ${written.join(', ')} ${written.length === 1 ? 'was' : 'were'} written`, {
    cause: err, ...(retryAfter !== undefined ? { retryAfter } : {}), ...(fields ? { fields } : {}), ...(allow ? { allow } : {}),
  });
}

/** Bucket, key and the S3 error code: never credentials, never the SDK's stack. */
function uploadError(err: unknown, bucket: string, key: string, note: string, endpoint: string): RuntimeError {
  const s3code = s3Code(err);
  const where = `s3://${bucket}/${key}`;
  const kind = classify(err);
  const short = shortage(err);
  if (short) return shortageError(`output_uri: upload to ${where} failed; the images were generated but not stored`, short, REQUEST_ADVICE, err);
  // Nothing sent or received for S3_STALL_TIMEOUT_S on the last attempt: the message names the request and the bound.
  if (err instanceof RuntimeError && err.code === 'STORAGE_STALL') return new RuntimeError('STORAGE_STALL', `output_uri: upload to ${where} failed: ${err.message}; the images were generated but not stored`, { cause: err });
  // Throttled for S3_THROTTLE_TIMEOUT_S (upload-retry.ts): the message names the object, the code and what to do.
  if (err instanceof RuntimeError && err.code === 'STORAGE_TRANSIENT') return new RuntimeError('STORAGE_TRANSIENT', `output_uri: ${err.message}; the images were generated but not stored`, { cause: err });
  // A bucket in another region: a retry meets the same answer, so it is the request's to fix.
  const region = kind === 'fatal' ? bucketRegion(err) : undefined;
  if (region !== undefined) return new RuntimeError('INVALID_INPUT', `output_uri: cannot write ${where}: bucket "${bucket}" is in region ${region}, and this server writes S3 in another (AWS_REGION); use a bucket in the server's region (${s3code})`, { cause: err });
  switch (kind) {
    case 'missing':
      // The client named the bucket: a missing one is their input to fix.
      return new RuntimeError('INVALID_INPUT', `output_uri: cannot write ${where}: bucket "${bucket}" does not exist (${s3code})${note}`, { cause: err });
    case 'denied':
      return new RuntimeError('STORAGE_DENIED', `output_uri: access denied writing ${where} (${s3code}); check the server's S3 credentials and the bucket policy${note}`, { cause: err });
    case 'aborted':
      return new RuntimeError('CANCELLED', `output_uri: upload to ${where} cancelled`, { cause: err });
    default:
      return new RuntimeError('STORAGE_TRANSIENT', `output_uri: upload to ${where} failed (${err instanceof RuntimeError ? err.message : s3code}${atEndpoint(err, endpoint)}); the images were generated but not stored`, { cause: err });
  }
}
