/**
 * @module Input images named by `s3://bucket/key` (img2img `image`, inpainting `mask_image`), under INPUT_URI_PREFIXES:
 * read through the runtime's request client (storage/request-s3.ts: same endpoint, path-style and TLS settings as the
 * model download), capped in size, with errors that name the field and the object, never the credentials.
 */
import type { Readable } from 'node:stream';
import type { Config } from '../config.js';
import { REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import type { RequestS3 } from '../storage/request-s3.js';
import { atEndpoint, bucketRegion, classify, customerKeyAdvice, customerKeyRequired, retryTransient, s3Code } from '../storage/s3-errors.js';
import { countingRequests, type RequestTally } from '../storage/s3-requests.js';
import { ThrottledTries, ThrottleNote } from '../storage/throttle.js';
import { parseS3Object } from '../storage/uri.js';
import { inputRefusal } from './input-uris.js';

/** A request's share of the input images' budget (image-request.ts InputBudget). */
export interface InputHold {
  readonly bytes: number;
  /** Reserves `n` more bytes for `field`: INVALID_INPUT when the request alone cannot fit, BUSY when others fill it now. */
  take(n: number, field: string): void;
  release(): void;
}

export interface ImageSource {
  /** The object's bytes; `field` names the request field in errors (`instances[0].image`). */
  /** `hold`: the object's size is taken from the request's InputBudget before its body is read. */
  read(uri: string, field: string, maxBytes: number, signal?: AbortSignal, hold?: InputHold): Promise<Buffer>;
}

/**
 * Reads through the runtime's request client (created on the first s3:// input or upload), only what `cfg` allows
 * (input-uris.ts): requests are checked when parsed, and again here so that no path reaches S3 unchecked. A read has
 * one attempt, but throttling (503 SlowDown, 429, …) costs none: it is waited out as a fill's range waits it out
 * (throttle.ts), until the request's deadline or S3_THROTTLE_TIMEOUT_S. `onThrottled` hears each throttled answer,
 * `requests` how each GET ended (storage/s3-requests.ts).
 */
export function createImageSource(s3: RequestS3, cfg: Partial<Pick<Config, 'inputUriPrefixes' | 'storageUri' | 'loraUri'>>,
  onThrottled?: (code: string) => void, requests?: RequestTally): ImageSource {
  return {
    async read(uri, field, maxBytes, signal, hold) {
      const loc = parseS3Object(uri);
      if (!loc) throw new RuntimeError('INVALID_INPUT', `${field} must look like s3://bucket/key, got ${JSON.stringify(uri.slice(0, 200))}`);
      const refused = inputRefusal(loc, JSON.stringify(uri.slice(0, 200)), cfg);
      if (refused !== undefined) throw new RuntimeError('INVALID_INPUT', `${field}: ${refused}`);
      const note = s3.addressing(loc.bucket, field);
      // The client first: it loads the SDK (never while the process is out of descriptors), so the command's import
      // below reads no file.
      const client = await s3.client();
      const { GetObjectCommand } = await import('@aws-sdk/client-s3');
      const where = `s3://${loc.bucket}/${loc.key}`;
      // Whether S3 was throttling the read when the request's deadline stopped it, for the error to say so.
      const throttling = new ThrottleNote(onThrottled);
      const tries = new ThrottledTries(s3.throttle('read', { fields: { uri: where }, watch: throttling }));
      try {
        const get = () => client.send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key }), signal ? { abortSignal: signal } : {});
        const res = await retryTransient(() => tries.attempt(signal, () => countingRequests(requests, get)), 1, signal, undefined, tries.onThrottled).finally(() => tries.done());
        if (res.ContentLength !== undefined && res.ContentLength > maxBytes) {
          (res.Body as Readable | undefined)?.destroy();
          throw new RuntimeError('INVALID_INPUT', `${field}: ${where} is ${res.ContentLength} bytes; input images may have at most ${maxBytes}`);
        }
        try {
          hold?.take(res.ContentLength ?? maxBytes, field);
        } catch (err) {
          (res.Body as Readable | undefined)?.destroy();
          throw err;
        }
        return await readCapped(res.Body as Readable, maxBytes, field, where);
      } catch (err) {
        if (err instanceof RuntimeError) throw err;
        // TIMEOUT, as the request's deadline ends it (context.ts or generation.ts says which, and adds this).
        const stopped = throttling.stopped(signal, `the read of ${where}`);
        if (stopped !== undefined) throw new RuntimeError('TIMEOUT', `${field}: ${stopped}`, { cause: err });
        // Stopped in a throttled wait, which ends with the store's last answer, not an abort.
        if (signal?.aborted) throw new RuntimeError('CANCELLED', `${field}: reading ${where} was cancelled`, { cause: err });
        if (tries.gaveUp) throw new RuntimeError('UPSTREAM', `${field}: reading ${where} failed: ${tries.throttle.giveUp(s3Code(err))}`, { cause: err });
        throw readError(err, field, where, loc.bucket, note, s3.endpoint(loc.bucket));
      }
    },
  };
}

async function readCapped(body: Readable, maxBytes: number, field: string, where: string): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const chunk of body) {
    n += (chunk as Buffer).length;
    if (n > maxBytes) {
      body.destroy();
      throw new RuntimeError('INVALID_INPUT', `${field}: ${where} is larger than ${maxBytes} bytes, the most an input image may have`);
    }
    parts.push(chunk as Buffer);
  }
  return Buffer.concat(parts, n);
}

/** The client named the object: missing or unreadable is their input to fix (400); a flaky store is a 502. */
function readError(err: unknown, field: string, where: string, bucket: string, note: string, endpoint: string): RuntimeError {
  const s3code = s3Code(err);
  const kind = classify(err);
  const short = shortage(err);
  if (short) return shortageError(`${field}: reading ${where} failed`, short, REQUEST_ADVICE, err);
  // A bucket in another region: a retry meets the same answer, so it is the request's to fix.
  // A 400 for a key the request lacks: it was answered as a store that cannot serve the object now (502, retry later).
  if (customerKeyRequired(err)) {
    return new RuntimeError('STORAGE_SSE_C', `${field}: ${where} is encrypted with a customer-provided key (SSE-C; S3 answered ${s3code}); ${customerKeyAdvice(where)}`, { cause: err });
  }
  const region = kind === 'fatal' ? bucketRegion(err) : undefined;
  if (region !== undefined) return new RuntimeError('INVALID_INPUT', `${field}: bucket "${bucket}" is in region ${region}, and this server reads S3 in another (AWS_REGION); use a bucket in the server's region (${s3code})`, { cause: err });
  switch (kind) {
    case 'missing':
      return new RuntimeError('INVALID_INPUT', `${field}: ${s3code === 'NoSuchBucket' ? `bucket "${bucket}" does not exist` : `${where} does not exist`} (${s3code})${note}`, { cause: err });
    case 'denied':
      return new RuntimeError('INVALID_INPUT', `${field}: the server's S3 credentials may not read ${where} (${s3code})${note}`, { cause: err });
    case 'aborted':
      return new RuntimeError('CANCELLED', `${field}: reading ${where} was cancelled`, { cause: err });
    default:
      return new RuntimeError('UPSTREAM', `${field}: reading ${where} failed (${s3code}${atEndpoint(err, endpoint)}); retry later`, { cause: err });
  }
}
