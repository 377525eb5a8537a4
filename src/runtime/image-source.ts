/**
 * @module Input images named by `s3://bucket/key` (img2img `image`, inpainting `mask_image`): read through the AWS SDK
 * client of src/storage/s3-sdk.ts (same endpoint, path-style and TLS settings as the model download and output_uri), capped
 * in size, with errors that name the field and the object, never the credentials.
 */
import type { Readable } from 'node:stream';
import type { S3Settings } from '../config.js';
import { RuntimeError } from '../errors.js';
import type { S3Handle } from '../storage/s3-sdk.js';
import { parseS3Object } from '../storage/uri.js';

type StorageS3 = typeof import('../storage/s3-sdk.js');

export interface ImageSource {
  /** The object's bytes; `field` names the request field in errors (`instances[0].image`). */
  read(uri: string, field: string, maxBytes: number, signal?: AbortSignal): Promise<Buffer>;
  destroy(): void;
}

/** One S3 client for the runtime's lifetime, created on the first s3:// input (the SDK loads then, not at boot). */
export function createImageSource(s3: Readonly<S3Settings>): ImageSource {
  let handle: S3Handle | undefined;
  let mods: Promise<[StorageS3, typeof import('@aws-sdk/client-s3')]> | undefined;
  return {
    async read(uri, field, maxBytes, signal) {
      const loc = parseS3Object(uri);
      if (!loc) throw new RuntimeError('INVALID_INPUT', `${field} must look like s3://bucket/key, got ${JSON.stringify(uri.slice(0, 200))}`);
      const [storage, { GetObjectCommand }] = await (mods ??= Promise.all([import('../storage/s3-sdk.js'), import('@aws-sdk/client-s3')]));
      handle ??= storage.createS3(s3, 8);
      const where = `s3://${loc.bucket}/${loc.key}`;
      try {
        const res = await handle.client.send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key }), signal ? { abortSignal: signal } : {});
        if (res.ContentLength !== undefined && res.ContentLength > maxBytes) {
          (res.Body as Readable | undefined)?.destroy();
          throw new RuntimeError('INVALID_INPUT', `${field}: ${where} is ${res.ContentLength} bytes; input images may have at most ${maxBytes}`);
        }
        return await readCapped(res.Body as Readable, maxBytes, field, where);
      } catch (err) {
        if (err instanceof RuntimeError) throw err;
        throw readError(storage, err, field, where, loc.bucket);
      }
    },
    destroy() {
      handle?.destroy();
      handle = undefined;
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
function readError({ classify, errorStatus }: StorageS3, err: unknown, field: string, where: string, bucket: string): RuntimeError {
  const e = (err ?? {}) as { name?: string; code?: string };
  const s3code = e.name && e.name !== 'Error' ? e.name : (e.code ?? `HTTP ${errorStatus(err) ?? '?'}`);
  switch (classify(err)) {
    case 'missing':
      return new RuntimeError('INVALID_INPUT', `${field}: ${s3code === 'NoSuchBucket' ? `bucket "${bucket}" does not exist` : `${where} does not exist`} (${s3code})`, { cause: err });
    case 'denied':
      return new RuntimeError('INVALID_INPUT', `${field}: the server's S3 credentials may not read ${where} (${s3code})`, { cause: err });
    case 'aborted':
      return new RuntimeError('CANCELLED', `${field}: reading ${where} was cancelled`, { cause: err });
    default:
      return new RuntimeError('UPSTREAM', `${field}: reading ${where} failed (${s3code}); retry later`, { cause: err });
  }
}
