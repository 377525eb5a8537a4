/**
 * @module The S3 seam: the two calls the fetch engine makes (list a prefix, GET a range) as one interface, and the
 * requests and answers they speak. Two transports implement it, the AWS SDK (s3-sdk.ts) and the SDK-free reader
 * (s3-lite.ts); choose-transport.ts picks one per fetch. Both share the socket and TLS settings below.
 */
import { readFileSync } from 'node:fs';
import type http from 'node:http';
import type { Readable } from 'node:stream';
import type { S3Settings } from '../config.js';
import type { ChecksumAnswer } from './checksums.js';

/** One object of a listing. */
export interface RemoteObject {
  /** Full S3 key. */
  readonly key: string;
  /** Path relative to the prefix, '/'-separated. */
  readonly rel: string;
  readonly size: number;
  readonly etag: string;
}

export interface ListRequest {
  /** '' or ends with '/'. */
  prefix: string;
  signal: AbortSignal;
}

/** A GET as the reader (download.ts) asks for it. */
export interface GetRequest {
  key: string;
  /** An HTTP Range value (`bytes=a-b`); absent: the whole object. */
  range?: string;
  ifMatch?: string;
  signal: AbortSignal;
}

/** The answer the reader streams: a 200/206 body, unread, and the headers it checks. */
export interface ObjectBody {
  body: Readable;
  etag: string | undefined;
  contentLength: number | undefined;
  /** 200 or 206: a store or proxy that ignores Range answers a ranged GET 200, with the whole object. */
  status?: number | undefined;
  /** The Content-Range header of a 206 (`bytes a-b/size`), where the store sent one. */
  contentRange?: string;
  /**
   * How the store says the object is encrypted at rest: x-amz-server-side-encryption (`AES256`, `aws:kms`, …), or
   * `SSE-C` for a customer key. With KMS or a customer key, S3's ETag is not the MD5 of the content (content-check.ts).
   */
  encryption?: string;
}

/**
 * A HEAD, for the content check: of one part of a multipart upload (`?partNumber=`), where S3 and most compatible
 * stores give the part's size; or of the object with `x-amz-checksum-mode: ENABLED`, for its additional checksum.
 */
export interface HeadRequest {
  key: string;
  partNumber?: number;
  checksums?: boolean;
  ifMatch?: string;
  signal: AbortSignal;
}

export interface HeadAnswer {
  /** The part's size (Content-Length), or the object's. */
  contentLength: number | undefined;
  /** x-amz-mp-parts-count; absent where the store ignored partNumber and described the whole object. */
  partsCount: number | undefined;
  etag: string | undefined;
  encryption?: string;
  /** The object's checksum, where asked for and the store keeps one (checksums.ts). */
  checksum?: ChecksumAnswer;
}

/** The `encryption` of an answer, from S3's headers (both transports), to spread into it. */
export function encryptionOf(sse: string | undefined, customerAlgorithm: string | undefined): { encryption?: string } {
  const encryption = customerAlgorithm ? 'SSE-C' : sse || undefined;
  return encryption !== undefined ? { encryption } : {};
}

export type TransportName = 'sdk' | 'lite';

/** S3 as the fetch engine sees it, for one bucket. Errors are shaped so that s3-errors.ts classifies both transports alike. */
export interface S3Transport {
  readonly name: TransportName;
  /** Every object under the prefix (paginated), directory markers skipped, sorted by `rel`. */
  list(r: ListRequest): Promise<RemoteObject[]>;
  /** One GET: an error answer rejects, a 200 or 206 resolves with its body unread. */
  get(r: GetRequest): Promise<ObjectBody>;
  /** One HEAD: the content check's way to learn a multipart upload's part size, or an object's checksum. */
  head(r: HeadRequest): Promise<HeadAnswer>;
  /** Closes idle keep-alive sockets; requests in flight go on. */
  destroy(): void;
}

/**
 * Whether an error is an answer the transport says another one might not get (a signature complaint, a redirect, a 400
 * from the SDK-free reader): not retried, and the fetch starts over through the SDK (fetch.ts).
 */
export function sdkMightDiffer(err: unknown): boolean {
  return (err as { sdkMightDiffer?: unknown } | undefined)?.sdkMightDiffer === true;
}

export interface TlsOptions {
  rejectUnauthorized: boolean;
  ca?: Buffer;
}

/** TLS for the S3 endpoint, the same for both transports. */
export function tlsOptions(s: Pick<S3Settings, 'verifySsl' | 'caBundle'>): TlsOptions {
  // S3_VERIFY_SSL=0 is KServe's switch for self-signed MinIO/ODF endpoints.
  return { rejectUnauthorized: s.verifySsl, ...(s.caBundle !== undefined ? { ca: readFileSync(s.caBundle) } : {}) };
}

/** Keep-alive agent settings for S3: `sockets` sized so that no range waits for one. */
export function agentOptions(sockets: number): http.AgentOptions {
  return { keepAlive: true, maxSockets: sockets, keepAliveMsecs: 10_000, scheduling: 'lifo' };
}
