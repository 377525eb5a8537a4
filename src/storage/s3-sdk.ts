/**
 * @module The AWS SDK's S3 client, configured the way KServe's storage initializer reads its environment (endpoint,
 * path-style, TLS), with a socket pool sized to the download, and the default transport of a fetch built on it.
 * The same client serves uploads (output_uri, the warm-up CLI's push). Errors are classified in s3-errors.ts.
 */
import http from 'node:http';
import https from 'node:https';
import type { Readable } from 'node:stream';
import { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, S3Client, type _Object } from '@aws-sdk/client-s3';
import type { S3Settings } from '../config.js';
import { silentLogger, type Logger } from '../log.js';
import { addListed, nextToken, notAListing, sortListing } from './s3-compat.js';
import { checksumFrom } from './checksums.js';
import type { LostCreatesOutcome } from './multipart.js';
import { retryUploads, UPLOAD_ATTEMPTS } from './upload-retry.js';
import { boundSilence } from './upload-stall.js';
import { countRequest, type CountedRequest } from './s3-requests.js';
import { agentOptions, encryptionOf, tlsOptions, type GetRequest, type ObjectBody, type HeadAnswer, type HeadRequest, type RemoteObject, type S3Transport } from './transport.js';

export { classify, errorStatus, permanentError, type ErrorKind } from './s3-errors.js';

export interface S3Handle {
  readonly client: S3Client;
  /** Closes the agents' sockets, those of requests in flight too (http.Agent.destroy); logs the uploads' throttling not told yet. */
  destroy(): void;
}

/**
 * One client per download: keep-alive agents with maxSockets = concurrency, so the pool never queues
 * ranged GETs behind each other (the SDK default is 50 sockets, but an unsized pool hides the limit).
 * The SDK's own retries are off: the reader retries ranges itself and resumes from the bytes it has. Upload requests
 * (output_uri, push) are retried by upload-retry.ts, only they.
 */
export function createS3(s: Readonly<S3Settings>, concurrency = s.maxConcurrency, onLostCreates?: (o: LostCreatesOutcome) => void, log: Logger = silentLogger()): S3Handle {
  const sockets = concurrency + 4; // a few spare for LIST/HEAD while every range is in flight
  // Upload requests are cut after S3_STALL_TIMEOUT_S of silence (upload-stall.ts); downloads keep their own watchdog.
  const httpAgent = boundSilence(new http.Agent(agentOptions(sockets)));
  const httpsAgent = boundSilence(new https.Agent({ ...agentOptions(sockets), ...tlsOptions(s) }));
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
  // `onLostCreates` hears what became of the uploads that unanswered CreateMultipartUploads made (multipart.ts); `log`,
  // that S3 throttles an upload.
  const flushThrottleLog = retryUploads(client, s.stallTimeoutS * 1000, { timeoutMs: s.throttleTimeoutS * 1000, log }, UPLOAD_ATTEMPTS, onLostCreates);
  let destroyed = false;
  countRequests(client, () => destroyed);
  return {
    client,
    destroy() {
      destroyed = true;
      flushThrottleLog();
      client.destroy();
      httpAgent.destroy();
      httpsAgent.destroy();
    },
  };
}

interface Handler {
  handle(request: object, options?: { abortSignal?: AbortSignal }): Promise<{ response: { statusCode: number; body?: unknown } }>;
}

/**
 * Counts each HTTP request `client` sends (s3-requests.ts), below its middleware, so each attempt of a retried upload
 * request and each page of a listing counts: the request handler, which each attempt reaches with its abort signal,
 * counts a failure without an answer; an answer is counted once the deserializer has read it, so that one the SDK
 * makes an error is one (an error's code tells throttling apart; S3 may fail a CompleteMultipartUpload in a 200, which
 * the SDK reads as a 503), and a body left to its reader (a GET's) once that reader is done. `stopped`: the client was
 * destroyed, which cuts what is in flight.
 */
function countRequests(client: S3Client, stopped: () => boolean): void {
  const handler = client.config.requestHandler as unknown as Handler;
  const handle = handler.handle.bind(handler);
  // Answers the handler passed on, by the request they answer, for the middleware below.
  const answered = new WeakMap<object, { counted: CountedRequest; body?: Readable }>();
  handler.handle = async (request, options) => {
    const counted = countRequest(options?.abortSignal, stopped);
    if (counted === undefined) return handle(request, options);
    let out: Awaited<ReturnType<Handler['handle']>>;
    try {
      out = await handle(request, options);
    } catch (e) {
      counted.failed(e);
      throw e;
    }
    const { statusCode, body } = out.response;
    const streams = statusCode >= 200 && statusCode < 300 && body !== null && typeof body === 'object' && typeof (body as Readable).once === 'function';
    answered.set(request, streams ? { counted, body: body as Readable } : { counted });
    return out;
  };
  client.middlewareStack.add((next) => async (args) => {
    try {
      const out = await next(args);
      const a = answered.get(args.request as object);
      // A body the deserializer did not read is the caller's to read (GetObject's).
      if (a?.body && !a.body.readableEnded) a.counted.streamed(a.body);
      else a?.counted.ended('ok');
      return out;
    } catch (e) {
      answered.get(args.request as object)?.counted.failed(e);
      throw e;
    }
  }, { step: 'deserialize', priority: 'high', name: 'countAnswers' });
}

/** Lists every object under the prefix (paginated), skipping directory markers. */
export async function listPrefix(client: S3Client, bucket: string, prefix: string, signal?: AbortSignal): Promise<RemoteObject[]> {
  const out: RemoteObject[] = [];
  const seen = new Set<string>();
  let token: string | undefined;
  do {
    // encoding-type=url: XML 1.0 cannot carry every character a key may hold, and the SDK's XML parser turns a raw
    // carriage return into a line feed (what s3rver and stores that only XML-escape keys send).
    const page = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token, MaxKeys: 1000, EncodingType: 'url' }),
      signal ? { abortSignal: signal } : {});
    // Every store speaking S3's API names the bucket and says whether the page is the last.
    if (page.Name === undefined && page.IsTruncated === undefined && page.KeyCount === undefined && page.Contents === undefined) throw notAListing(page.$metadata.httpStatusCode);
    const objects = (page.Contents ?? ([] as _Object[])).flatMap((o) => (o.Key === undefined ? [] : [{ key: o.Key, size: o.Size ?? NaN, etag: o.ETag ?? '' }]));
    addListed(out, objects, page.EncodingType?.toLowerCase() === 'url', prefix);
    token = nextToken(`s3://${bucket}/${prefix}`, page.IsTruncated === true, page.NextContinuationToken, seen);
  } while (token !== undefined);
  return sortListing(out);
}

/** A ranged GET through the SDK, answered in the transport's terms. */
export async function getObject(client: S3Client, bucket: string, r: GetRequest): Promise<ObjectBody> {
  const res = await client.send(new GetObjectCommand({
    Bucket: bucket, Key: r.key, ...(r.range !== undefined ? { Range: r.range } : {}), ...(r.ifMatch !== undefined ? { IfMatch: r.ifMatch } : {}),
  }), { abortSignal: r.signal });
  return {
    body: res.Body as Readable, etag: res.ETag, contentLength: res.ContentLength, status: res.$metadata.httpStatusCode,
    ...(res.ContentRange !== undefined ? { contentRange: res.ContentRange } : {}),
    ...encryptionOf(res.ServerSideEncryption, res.SSECustomerAlgorithm),
  };
}

/** A HEAD through the SDK: of a part, or of the object with its checksum. */
export async function headObject(client: S3Client, bucket: string, r: HeadRequest): Promise<HeadAnswer> {
  const res = await client.send(new HeadObjectCommand({
    Bucket: bucket, Key: r.key, ...(r.partNumber !== undefined ? { PartNumber: r.partNumber } : {}), ...(r.checksums ? { ChecksumMode: 'ENABLED' } : {}),
    ...(r.ifMatch !== undefined ? { IfMatch: r.ifMatch } : {}),
  }), { abortSignal: r.signal });
  const checksum = checksumFrom({
    crc64nvme: res.ChecksumCRC64NVME, crc32c: res.ChecksumCRC32C, crc32: res.ChecksumCRC32, sha256: res.ChecksumSHA256, sha1: res.ChecksumSHA1,
  }, res.ChecksumType);
  return {
    contentLength: res.ContentLength, partsCount: res.PartsCount, etag: res.ETag, ...encryptionOf(res.ServerSideEncryption, res.SSECustomerAlgorithm),
    ...(checksum ? { checksum } : {}),
  };
}

/**
 * The SDK transport for one fetch of `bucket`. The SDK's signer corrects its clock from S3's answers itself
 * (RequestTimeTooSkewed is retried by the fetch engine, signed with S3's time).
 */
export function createSdkTransport(s: Readonly<S3Settings>, bucket: string): S3Transport {
  const handle = createS3(s);
  return {
    name: 'sdk',
    list: (r) => listPrefix(handle.client, bucket, r.prefix, r.signal),
    get: (r) => getObject(handle.client, bucket, r),
    head: (r) => headObject(handle.client, bucket, r),
    destroy: () => handle.destroy(),
  };
}
