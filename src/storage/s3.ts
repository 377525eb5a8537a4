/** @module The S3 client (socket pool sized to the concurrency, KServe-style endpoint settings), listing, and error classification. */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { HeadObjectCommand, ListObjectsV2Command, S3Client, type _Object } from '@aws-sdk/client-s3';
import type { S3Settings } from '../config.js';
import { RuntimeError } from '../errors.js';
import { RETRY } from './plan.js';

export interface S3Handle {
  readonly client: S3Client;
  /** Closes idle keep-alive sockets; in-flight requests are not interrupted. */
  destroy(): void;
}

/**
 * One client per download: keep-alive agents with maxSockets = concurrency, so the pool never queues
 * ranged GETs behind each other (the SDK default is 50 sockets, but an unsized pool hides the limit).
 * The SDK's own retries are off: the reader retries ranges itself and resumes from the bytes it has.
 */
export function createS3(s: Readonly<S3Settings>, concurrency = s.maxConcurrency): S3Handle {
  const sockets = concurrency + 4; // a few spare for LIST/HEAD while every range is in flight
  const httpAgent = new http.Agent({ keepAlive: true, maxSockets: sockets, keepAliveMsecs: 10_000, scheduling: 'lifo' });
  const httpsAgent = new https.Agent({
    keepAlive: true, maxSockets: sockets, keepAliveMsecs: 10_000, scheduling: 'lifo',
    // S3_VERIFY_SSL=0 is KServe's switch for self-signed MinIO/ODF endpoints.
    rejectUnauthorized: s.verifySsl,
    ...(s.caBundle !== undefined ? { ca: readFileSync(s.caBundle) } : {}),
  });
  const client = new S3Client({
    region: s.region,
    ...(s.endpoint !== undefined ? { endpoint: s.endpoint } : {}),
    forcePathStyle: s.forcePathStyle,
    maxAttempts: 1,
    // S3-compatible stores often do not speak the newer flexible-checksum trailers; ranged GETs are not checksummed anyway.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    requestHandler: { httpAgent, httpsAgent, connectionTimeout: 10_000 },
  });
  return {
    client,
    destroy() {
      client.destroy();
      httpAgent.destroy();
      httpsAgent.destroy();
    },
  };
}

export type ErrorKind = 'denied' | 'missing' | 'changed' | 'transient' | 'aborted' | 'fatal';

interface SdkLikeError {
  name?: string;
  code?: string;
  Code?: string;
  $metadata?: { httpStatusCode?: number };
  $response?: { statusCode?: number };
  cause?: unknown;
}

export function errorStatus(err: unknown): number | undefined {
  const e = err as SdkLikeError | undefined;
  return e?.$metadata?.httpStatusCode ?? e?.$response?.statusCode;
}

/** Sorts an error into what the reader does next. Callers branch on the kind, never on message text. */
export function classify(err: unknown): ErrorKind {
  if (err instanceof RuntimeError) {
    if (err.code === 'STORAGE_DENIED') return 'denied';
    if (err.code === 'STORAGE_MISSING') return 'missing';
    if (err.code === 'STORAGE_TRANSIENT') return 'transient';
    if (err.code === 'CANCELLED') return 'aborted';
    return 'fatal';
  }
  const e = (err ?? {}) as SdkLikeError;
  const name = e.name ?? '';
  const code = e.code ?? e.Code ?? '';
  const status = errorStatus(err);
  if (name === 'AbortError' || code === 'ABORT_ERR') return 'aborted';
  if (status === 412 || name === 'PreconditionFailed' || code === 'ETAG_CHANGED') return 'changed';
  if (status === 403 || RETRY.denied.includes(name) || RETRY.denied.includes(code)) return 'denied';
  if ((status === 404 && name !== 'RequestTimeout') || RETRY.missing.includes(name) || RETRY.missing.includes(code)) return 'missing';
  if ((status !== undefined && RETRY.statuses.includes(status)) || RETRY.codes.includes(name) || RETRY.codes.includes(code)) return 'transient';
  if (status !== undefined && status >= 400 && status < 500) return 'fatal';
  // No HTTP status: a socket-level failure (reset, refused, TLS hiccup) that a new connection may fix.
  return 'transient';
}

/** A RuntimeError naming bucket and key (never credentials) for an error that retrying cannot fix. */
export function permanentError(err: unknown, bucket: string, key: string | undefined, action: string): RuntimeError {
  const e = (err ?? {}) as SdkLikeError;
  const kind = classify(err);
  const where = key === undefined ? `bucket "${bucket}"` : `s3://${bucket}/${key}`;
  const s3code = e.name && e.name !== 'Error' ? e.name : e.code ?? `HTTP ${errorStatus(err) ?? '?'}`;
  if (kind === 'denied') {
    const hint = s3code === 'InvalidAccessKeyId' || s3code === 'SignatureDoesNotMatch'
      ? 'check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the data connection secret)'
      : 'check the credentials and the bucket policy';
    return new RuntimeError('STORAGE_DENIED', `access denied to ${action} ${where} (${s3code}); ${hint}`, { cause: err });
  }
  if (kind === 'missing') {
    const what = s3code === 'NoSuchBucket' ? `bucket "${bucket}" does not exist` : `${where} does not exist`;
    return new RuntimeError('STORAGE_MISSING', `cannot ${action}: ${what} (${s3code})`, { cause: err });
  }
  if (kind === 'transient') return new RuntimeError('STORAGE_TRANSIENT', `cannot ${action} ${where}: ${s3code} (gave up after retries)`, { cause: err });
  return new RuntimeError('STORAGE_MISSING', `cannot ${action} ${where}: ${s3code}`, { cause: err });
}

export interface RemoteObject {
  /** Full S3 key. */
  readonly key: string;
  /** Path relative to the prefix, '/'-separated. */
  readonly rel: string;
  readonly size: number;
  readonly etag: string;
}

/** Lists every object under the prefix (paginated), skipping directory markers. */
export async function listPrefix(client: S3Client, bucket: string, prefix: string, signal?: AbortSignal): Promise<RemoteObject[]> {
  const out: RemoteObject[] = [];
  let token: string | undefined;
  do {
    const page = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token, MaxKeys: 1000 }),
      signal ? { abortSignal: signal } : {});
    for (const o of page.Contents ?? ([] as _Object[])) {
      if (o.Key === undefined || o.Key.endsWith('/')) continue;
      out.push({ key: o.Key, rel: o.Key.slice(prefix.length), size: o.Size ?? 0, etag: o.ETag ?? '' });
    }
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token !== undefined);
  out.sort((a, b) => (a.rel < b.rel ? -1 : a.rel > b.rel ? 1 : 0));
  return out;
}

export async function headObject(client: S3Client, bucket: string, key: string, signal?: AbortSignal): Promise<{ size: number; etag: string }> {
  const h = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }), signal ? { abortSignal: signal } : {});
  return { size: h.ContentLength ?? 0, etag: h.ETag ?? '' };
}
