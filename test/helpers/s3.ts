/** @module Test helpers: a real s3rver on loopback (ephemeral port, temp dir) and a fault-injecting proxy in front of it. */
import type { RuntimeError } from '../../src/errors.js';
import { createHash } from 'node:crypto';
import { mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import http from 'node:http';
import { afterAll, afterEach } from 'vitest';
import { listenLoopback } from './loopback.js';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { createRequire } from 'node:module';
import { loadConfig, type Config } from '../../src/config.js';

interface S3rverInstance {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
}
type S3rverCtor = new (o: Record<string, unknown>) => S3rverInstance;
// s3rver ships no types; this is the part of its API the tests use.
const S3rver = createRequire(import.meta.url)('s3rver') as S3rverCtor;

export const CREDS = { AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1' } as const;

export interface S3Server {
  readonly port: number;
  readonly endpoint: string;
  readonly dir: string;
  readonly client: S3Client;
  put(bucket: string, key: string, body: Buffer | string): Promise<void>;
  stop(): Promise<void>;
  /** Starts again on the same port and data dir after stop(). */
  restart(): Promise<void>;
}

/** Uploads the files `rels` (paths relative to `dir`, as a model folder lists them) to `bucket` under `prefix`. */
export async function putFolder(s3: S3Server, bucket: string, prefix: string, dir: string, rels: readonly string[]): Promise<void> {
  for (const rel of rels) await s3.put(bucket, prefix + rel, await fsp.readFile(path.join(dir, rel)));
}

/**
 * `serviceEndpoint`: the domain s3rver reads virtual-hosted requests under (`<bucket>.s3.<serviceEndpoint>`; its default
 * is amazonaws.com). Path-style requests to 127.0.0.1 work either way.
 */
export async function startS3(buckets: readonly string[] = ['models'], opts: { serviceEndpoint?: string } = {}): Promise<S3Server> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 's3rver-'));
  let server: S3rverInstance;
  let port = 0;
  const boot = async () => {
    server = new S3rver({ address: '127.0.0.1', port, silent: true, directory: dir, configureBuckets: buckets.map((name) => ({ name })),
      ...(opts.serviceEndpoint !== undefined ? { serviceEndpoint: opts.serviceEndpoint } : {}) });
    const addr = await server.run();
    port = addr.port;
  };
  await boot();
  const endpoint = `http://127.0.0.1:${port}`;
  const client = new S3Client({
    endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
    requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
  });
  return {
    port, endpoint, dir, client,
    async put(bucket, key, body) {
      await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: body }));
    },
    async stop() {
      await server.close().catch(() => undefined);
    },
    restart: boot,
  };
}

export async function destroyS3(s: S3Server): Promise<void> {
  s.client.destroy();
  await s.stop();
  rmSync(s.dir, { recursive: true, force: true });
}

export interface Faults {
  /** Destroy the socket after this many body bytes of a 2xx GET, for the next `resets` GETs. */
  resetAfterBytes?: number;
  resets?: number;
  /** Stop sending (socket left open) after this many body bytes, for the next `stalls` GETs. */
  stallAfterBytes?: number;
  stalls?: number;
  /** Answer every request 403 AccessDenied. */
  deny?: boolean;
  /**
   * Objects whose key matches, stored with a customer-provided key (SSE-C), as S3 answers a read that gives none: a GET
   * 400 InvalidRequest with S3's message, a HEAD a bare 400 (s3rver has no SSE-C). Counted in stats.refusals.
   */
  customerKey?: RegExp;
  /** Rewrites ListObjectsV2 response bodies (e.g. to inject hostile keys). */
  rewriteList?: (xml: string) => string;
  /** Slow every GET body to about this many bytes per second per connection. */
  bytesPerSecond?: number;
  /**
   * Hold bytesPerSecond exactly: without it a socket that drains resumes the body before its pacing delay is over,
   * so on loopback the rate is only a rough brake (several times faster); the tests written against that keep it.
   */
  exactPace?: boolean;
  /** Hold every ListObjectsV2 request this long before forwarding it. */
  listDelayMs?: number;
  /** Hold every ListObjectsV2 request until this settles. */
  holdLists?: Promise<unknown>;
  /** Answer the next `count` ListObjectsV2 requests with this status and S3 error code (e.g. 403 SignatureDoesNotMatch). */
  failLists?: { count: number; status: number; code: string };
  /**
   * The ListObjectsV2 requests answered in order as scripted: the first step answers each LIST while its `until`
   * (Date.now() ms) is ahead, for `forMs` from the first LIST it answers (however late that comes on a loaded machine),
   * or, without either, the next `count` (1 by default), then the next step; 'slowDown' as
   * faults.slowDown answers, a status with an S3 error code, or 'stall' (read, never answered); `delayMs`: each answer
   * that long after the request was read (a store slow to answer). Once the script is spent, LISTs go to the store.
   * Counted in stats.lists (and a 'slowDown' in stats.slowDowns).
   */
  listScript?: Array<{ answer: 'slowDown' | 'stall' | { status: number; code: string }; until?: number; forMs?: number; count?: number; delayMs?: number }>;
  /** Leave the next `count` ListObjectsV2 requests unanswered (a store that reads a request and hangs). */
  stallLists?: { count: number };
  /**
   * Answer every ListObjectsV2 200 at once, then only whitespace every `everyMs`, never the listing: a store whose
   * socket never falls silent, yet whose listing never ends. Counted in stats.lists; the sockets close with the client.
   */
  trickleLists?: { everyMs: number };
  /** The same for the next `count` GetObject requests (with `keys`, of the objects whose key matches). */
  failGets?: { count: number; status: number; code: string; keys?: RegExp };
  /**
   * A SlowDown storm: every GetObject (and with `lists`, every ListObjectsV2) answered 503 with S3's XML error body
   * `<Code>SlowDown</Code>` (and `retryAfter` as a Retry-After header, as MinIO sends one) until the time `until`
   * (Date.now() ms; never without it), or for `forMs` from the first request it answers: a storm as long whenever the
   * client's first request comes (a loaded machine took over a second to send it). With `heads`, every HEAD too, a bare 503 as S3 answers a HEAD (no body). Counted
   * in stats.slowDowns. With `gets: false`, GETs are served (a storm on the HEADs alone). With `uploads`, every
   * PutObject, UploadPart, CreateMultipartUpload and CompleteMultipartUpload too, with the same 503 and body. With
   * `deletes`, every DeleteObject and DeleteObjects; with `aborts`, every AbortMultipartUpload (faults.abortUploads) and
   * ListMultipartUploads (faults.listUploads). `count`: only the next that many requests it matches, then it ends.
   */
  slowDown?: { until?: number; forMs?: number; count?: number; retryAfter?: string; lists?: boolean; heads?: boolean; gets?: boolean; uploads?: boolean; deletes?: boolean; aborts?: boolean };
  /**
   * Hold GETs (or requests of `method`, e.g. PUT for uploaded parts) whose URL matches `keys` (and, with `range`, whose
   * Range header it accepts) until `release` settles.
   */
  hold?: { keys: RegExp; range?: (range: string | undefined) => boolean; release: Promise<unknown>; method?: string };
  /**
   * Damage the body of the next `count` 2xx GETs of keys matching `keys` (a link that damages data): one byte of each
   * body's first chunk is flipped, the n-th damage flipping byte n - 1, so no two damaged bodies are alike. `perKey`:
   * `count` is each matching key's own, so which bodies are damaged does not hang on the order the answers come in.
   */
  corrupt?: { keys: RegExp; count: number; perKey?: boolean; done?: Map<string, number> };
  /**
   * Objects served as a store that keeps multipart uploads would: by key, the ETag listings, GETs and HEADs carry, and
   * the size of each part, which a HEAD with partNumber=k answers (`partSizes` undefined: the store ignores partNumber
   * and describes the whole object, as s3rver does).
   */
  objects?: Record<string, { etag: string; partSizes?: number[] }>;
  /**
   * 2xx GETs of keys matching `keys` answered with a Content-Length `by` bytes less than the store's, and the body cut
   * to it: a proxy in front of the store that shortens answers.
   */
  shortBodies?: { keys: RegExp; by: number };
  /** Headers added to every 2xx GET and HEAD answer (e.g. x-amz-server-side-encryption). */
  addHeaders?: Record<string, string>;
  /**
   * Checksum headers (x-amz-checksum-crc64nvme, x-amz-checksum-type, …) by key, added to a 2xx answer to a HEAD of the
   * object with `x-amz-checksum-mode: ENABLED`, as S3 answers only those.
   */
  checksums?: Record<string, Record<string, string>>;
  /** Never answer a HEAD with checksum mode (a store that hangs on it); the sockets close with the proxy. */
  holdChecksumHeads?: boolean;
  /**
   * Answer every UploadPart of a key matching `keys` with this status and S3 error code (a store failing one file's
   * upload), once `after` settles.
   */
  failParts?: { keys: RegExp; status: number; code: string; after?: Promise<unknown> };
  /**
   * Answer AbortMultipartUpload 204 as S3 does, counted in stats.multipart (s3rver has no such route: it answers 405).
   * Its parts stay in s3rver's folder, which no listing shows.
   */
  abortUploads?: boolean;
  /**
   * Answer ListMultipartUploads (GET /<bucket>?uploads) as S3 does, from the uploads the proxy saw the store create and
   * neither completed nor aborted (stats.multipart): s3rver answers it 501 NotImplemented. Initiated is given in whole
   * seconds and the Date header is the proxy's, as S3's are. Counted in stats.uploadListings.
   */
  listUploads?: boolean;
  /**
   * The next `count` CreateMultipartUploads of keys matching `keys` are carried out by the store, then their sockets
   * destroyed unanswered (an answer lost to a reset): the upload exists, and its UploadId reaches nobody.
   */
  loseCreates?: { keys: RegExp; count: number };
  /**
   * With abortUploads: answer the next `count` AbortMultipartUpload requests 500 InternalError first (a store in
   * trouble), or with this status and S3 error code (503 SlowDown: the aborts alone throttled, not the listings).
   */
  failAborts?: { count: number; status?: number; code?: string };
  /**
   * Answer the next `count` DeleteObject requests (a single object's DELETE, not an abort) with this status and S3 error
   * code (503 ServiceUnavailable: a store in trouble), then let them through to the store (s3rver answers 204).
   */
  failDeletes?: { count: number; status: number; code: string };
  /** With abortUploads: leave the next `count` AbortMultipartUpload requests of keys matching `keys` unanswered (a store that hangs). */
  stallAborts?: { keys: RegExp; count: number };
  /**
   * PUTs of objects and parts whose key matches `keys`, numbered from 1 as they arrive (retries too): the n-th is
   * answered as `at[n]` says, every one as `every` says: a status with an S3 error code, or 'reset' (the body read,
   * then the socket destroyed without an answer). Counted in stats.puts and stats.putFaults. A status's `after`: answered
   * once it settles, after the body was read (a store slow to refuse).
   */
  failPuts?: { keys: RegExp; at?: Record<number, PutFault>; every?: PutFault };
  /**
   * The next `count` CompleteMultipartUploads are carried out by the store, then their sockets destroyed unanswered (a
   * Complete of an upload already completed is always answered 404 NoSuchUpload, as S3 does).
   */
  loseCompletes?: { count: number };
  /**
   * The next `count` requests of `commands` whose key matches `keys` are read to the end and never answered (a store
   * that accepts a request and hangs), counted in stats.unanswered; `forward`: the store carries each out first, and
   * only its answer is withheld (a Complete sent again for an upload completed is answered 404 NoSuchUpload, as S3
   * does). Their sockets stay open until the client closes them or the proxy stops.
   */
  stallUploads?: { commands: readonly UploadCommand[]; keys: RegExp; count: number; forward?: boolean };
  /**
   * The next `count` CompleteMultipartUploads are answered 200 at once, then for `ms` only whitespace every `everyMs`
   * (as S3 answers a Complete that takes long), then the store's answer.
   */
  slowCompletes?: { count: number; ms: number; everyMs: number };
  /**
   * The next `count` CompleteMultipartUploads are answered 200 with an S3 error body of `code` (as S3 may fail one that
   * it took long over: its status is sent before it knows), not carried out by the store.
   */
  errorCompletes?: { count: number; code: string };
  /** PUT bodies of keys matching `keys` read at about `bytesPerSecond` (a slow link up to the store). */
  slowPuts?: { keys: RegExp; bytesPerSecond: number };
}

/** The requests a push sends to write: its uploads, and the DeleteObjects of `--replace` (its key is ''). */
export type UploadCommand = 'PutObject' | 'UploadPart' | 'CreateMultipartUpload' | 'CompleteMultipartUpload' | 'DeleteObjects';

/** Which upload request this is, by method and query, as S3 tells them apart. */
function uploadCommand(method: string | undefined, url: string): UploadCommand | undefined {
  const uploadId = /[?&]uploadId=/.test(url);
  if (method === 'PUT') return uploadId ? 'UploadPart' : 'PutObject';
  if (method === 'POST') {
    if (uploadId) return 'CompleteMultipartUpload';
    return /[?&]uploads(=|&|$)/.test(url) ? 'CreateMultipartUpload' : /[?&]delete(=|&|$)/.test(url) ? 'DeleteObjects' : undefined;
  }
  return undefined;
}

export type PutFault = { status: number; code: string; after?: Promise<unknown> } | 'reset';

export interface FaultProxy {
  readonly port: number;
  readonly endpoint: string;
  readonly stats: {
    /** Every request the proxy received, whatever its method or fate. */
    requests: number;
    gets: number; rangedGets: number; lists: number;
    /** When each ListObjectsV2 request arrived (Date.now()). */
    listAt: number[];
    bodyBytes: number; resets: number; stalls: number; maxConcurrent: number; open: number; held: number; sdkGets: number;
    /** Stalled answers whose client closed the connection (it gave up on the range). */
    stallsCut: number;
    /** 2xx GET body bytes sent, by request path (`/<bucket>/<key>`, URL-decoded). */
    bytesByPath: Record<string, number>;
    /**
     * 2xx GET body bytes sent, by the request's number (`requests` before it came): a run's own, without what the
     * proxy still sends on the connections of a process killed before it, which it reads from S3 to the end.
     */
    bytesByRequest: number[];
    /** HEAD requests with a partNumber, answered by the proxy from `faults.objects`. */
    partHeads: number;
    /** HEAD requests of an object with checksum mode. */
    checksumHeads: number;
    /** Bodies damaged by `faults.corrupt`. */
    damaged: number;
    getPaths: { sdk: string[]; lite: string[] };
    /** Answers from the store by S3 error code (403 RequestTimeTooSkewed → 'RequestTimeTooSkewed'), 2xx not counted. */
    refusals: Record<string, number>;
    /**
     * Multipart uploads: every UploadId the store created (with its key, and when: Date.now()), and those completed or
     * aborted (a 2xx answer). One created and neither completed nor aborted is what ListMultipartUploads would still show.
     */
    multipart: { created: Record<string, string>; completed: string[]; aborted: string[]; initiated: Record<string, number> };
    /** ListMultipartUploads requests answered by faults.listUploads. */
    uploadListings: number;
    /** PUTs matched by faults.failPuts, and those it failed. */
    puts: number; putFaults: number;
    /** Every upload request received, by command, and those left unanswered by faults.stallUploads. */
    uploads: Partial<Record<UploadCommand, number>>;
    unanswered: Partial<Record<UploadCommand, number>>;
    /** CompleteMultipartUploads answered slowly by faults.slowCompletes. */
    slowCompletes: number;
    /** Requests answered 503 SlowDown by faults.slowDown. */
    slowDowns: number;
  };
  faults: Faults;
  close(): Promise<void>;
}

const DENIED = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>1</RequestId></Error>';
/** An S3 error body; StringToSign stands for the fields S3 echoes that must never reach a message or log. */
const s3Error = (code: string) => `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>from the fault proxy</Message><StringToSign>AWS4-HMAC-SHA256 echoed-secret</StringToSign></Error>`;

/** A proxy in front of s3rver that injects deterministic faults: resets and stalls mid-body, 403s, slow links. */
export async function startFaultProxy(upstreamPort: number, faults: Faults = {}): Promise<FaultProxy> {
  const stats = { requests: 0, gets: 0, rangedGets: 0, lists: 0, listAt: [] as number[], bodyBytes: 0, resets: 0, stalls: 0, stallsCut: 0, maxConcurrent: 0, open: 0, held: 0, sdkGets: 0, bytesByPath: {} as Record<string, number>, bytesByRequest: [] as number[], partHeads: 0, checksumHeads: 0, damaged: 0, getPaths: { sdk: [] as string[], lite: [] as string[] }, refusals: {} as Record<string, number>, multipart: { created: {} as Record<string, string>, completed: [] as string[], aborted: [] as string[], initiated: {} as Record<string, number> }, uploadListings: 0, puts: 0, putFaults: 0, uploads: {} as Partial<Record<UploadCommand, number>>, unanswered: {} as Partial<Record<UploadCommand, number>>, slowCompletes: 0, slowDowns: 0 };
  let concurrent = 0;
  const p: FaultProxy = { port: 0, endpoint: '', stats, faults, close: async () => undefined };
  const created = (id: string, key: string) => {
    stats.multipart.created[id] = key;
    stats.multipart.initiated[id] = Date.now();
  };
  const server = http.createServer((req, res) => {
    const seq = stats.requests++;
    const f = p.faults;
    if (f.deny) {
      req.resume();
      res.writeHead(403, { 'content-type': 'application/xml' }).end(DENIED);
      return;
    }
    const isList = req.method === 'GET' && /[?&]list-type=2/.test(req.url ?? '');
    const isGet = req.method === 'GET' && !isList;
    // `/<bucket>/<key>` → key, as `faults.objects` names it.
    const objectKey = decodeURIComponent((req.url ?? '').split('?')[0]!).split('/').slice(2).join('/');
    if (f.customerKey && (isGet || req.method === 'HEAD') && f.customerKey.test(objectKey)) {
      req.resume();
      if (isGet) stats.gets++;
      stats.refusals.InvalidRequest = (stats.refusals.InvalidRequest ?? 0) + 1;
      if (req.method === 'HEAD') return void res.writeHead(400).end();
      res.writeHead(400, { 'content-type': 'application/xml' }).end('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidRequest</Code>'
        + '<Message>The object was stored using a form of Server Side Encryption. The correct parameters must be provided to retrieve the object.</Message>'
        + '<RequestId>1</RequestId><HostId>h</HostId></Error>');
      return;
    }
    const query = new URLSearchParams((req.url ?? '').split('?')[1] ?? '');
    const storm = f.slowDown && (f.slowDown.until === undefined || Date.now() < f.slowDown.until) && (f.slowDown.count ?? 1) > 0 ? f.slowDown : undefined;
    /** Answers the request 503 SlowDown for the storm (the bare 503 of a HEAD), counting it. */
    const slowedDown = () => {
      if (storm!.forMs !== undefined) storm!.until ??= Date.now() + storm!.forMs;
      stats.slowDowns++;
      if (storm!.count !== undefined) storm!.count--;
      req.resume();
      const hint = storm!.retryAfter !== undefined ? { 'retry-after': storm!.retryAfter } : {};
      if (req.method === 'HEAD') res.writeHead(503, hint).end();
      else res.writeHead(503, { 'content-type': 'application/xml', ...hint }).end(s3Error('SlowDown'));
    };
    const isUploadListing = req.method === 'GET' && query.has('uploads') && objectKey === '';
    const isAbort = req.method === 'DELETE' && query.has('uploadId');
    if (storm && ((storm.aborts && (isAbort || isUploadListing)) || (storm.deletes && ((req.method === 'DELETE' && !isAbort) || uploadCommand(req.method, req.url ?? '') === 'DeleteObjects')))) {
      slowedDown();
      return;
    }
    if (f.failDeletes && f.failDeletes.count > 0 && req.method === 'DELETE' && !isAbort) {
      f.failDeletes.count--;
      req.resume();
      res.writeHead(f.failDeletes.status, { 'content-type': 'application/xml' }).end(s3Error(f.failDeletes.code));
      return;
    }
    if (f.listUploads && isUploadListing) {
      req.resume();
      stats.uploadListings++;
      res.writeHead(200, { 'content-type': 'application/xml' }).end(uploadsListing(p, decodeURIComponent((req.url ?? '').split('?')[0]!).split('/')[1]!, query));
      return;
    }
    if (storm?.heads && req.method === 'HEAD') {
      slowedDown();
      return;
    }
    const stormed = storm?.uploads ? uploadCommand(req.method, req.url ?? '') : undefined;
    if (stormed !== undefined && stormed !== 'DeleteObjects') {
      slowedDown();
      return;
    }
    const sim = f.objects?.[objectKey];
    const partNumber = Number(/[?&]partNumber=(\d+)/.exec(req.url ?? '')?.[1] ?? 0);
    if (req.method === 'HEAD' && partNumber > 0 && sim?.partSizes !== undefined) {
      stats.partHeads++;
      req.resume();
      const size = sim.partSizes[partNumber - 1];
      if (size === undefined) res.writeHead(416).end();
      else res.writeHead(206, { etag: sim.etag, 'content-length': String(size), 'x-amz-mp-parts-count': String(sim.partSizes.length), ...f.addHeaders }).end();
      return;
    }
    const wantsChecksum = req.method === 'HEAD' && partNumber === 0 && req.headers['x-amz-checksum-mode'] === 'ENABLED';
    if (wantsChecksum) {
      stats.checksumHeads++;
      if (f.holdChecksumHeads) {
        req.resume();
        return;
      }
    }
    if (isList) {
      stats.lists++;
      stats.listAt.push(Date.now());
    }
    const uploadId = /[?&]uploadId=([^&]*)/.exec(req.url ?? '')?.[1];
    const isCreate = req.method === 'POST' && /[?&]uploads(=|&|$)/.test(req.url ?? '');
    if (uploadId !== undefined && req.method === 'DELETE' && f.abortUploads) {
      req.resume();
      if (f.failAborts && f.failAborts.count > 0) {
        f.failAborts.count--;
        res.writeHead(f.failAborts.status ?? 500, { 'content-type': 'application/xml' }).end(s3Error(f.failAborts.code ?? 'InternalError'));
        return;
      }
      if (f.stallAborts && f.stallAborts.count > 0 && f.stallAborts.keys.test(objectKey)) {
        f.stallAborts.count--;
        return;
      }
      stats.multipart.aborted.push(decodeURIComponent(uploadId));
      res.writeHead(204).end();
      return;
    }
    const command = uploadCommand(req.method, req.url ?? '');
    if (command !== undefined) stats.uploads[command] = (stats.uploads[command] ?? 0) + 1;
    const stall = f.stallUploads;
    if (command !== undefined && stall && stall.count > 0 && stall.commands.includes(command) && stall.keys.test(objectKey)) {
      stall.count--;
      stats.unanswered[command] = (stats.unanswered[command] ?? 0) + 1;
      if (!stall.forward) {
        req.resume();
        return;
      }
      // Carried out by the store; what it answers is read and dropped.
      const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
        const ok = (upRes.statusCode ?? 500) < 300;
        if (ok && command === 'CompleteMultipartUpload') stats.multipart.completed.push(decodeURIComponent(uploadId!));
        const body: Buffer[] = [];
        upRes.on('data', (c: Buffer) => body.push(c));
        upRes.on('end', () => {
          const id = ok && command === 'CreateMultipartUpload' ? /<UploadId>([^<]*)<\/UploadId>/.exec(Buffer.concat(body).toString('utf8'))?.[1] : undefined;
          if (id !== undefined) created(id, objectKey);
        });
      });
      up.on('error', () => undefined);
      req.pipe(up);
      return;
    }
    const lose = f.loseCreates;
    if (isCreate && lose && lose.count > 0 && lose.keys.test(objectKey)) {
      lose.count--;
      const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
        const body: Buffer[] = [];
        upRes.on('data', (c: Buffer) => body.push(c));
        upRes.on('end', () => {
          const id = (upRes.statusCode ?? 500) < 300 ? /<UploadId>([^<]*)<\/UploadId>/.exec(Buffer.concat(body).toString('utf8'))?.[1] : undefined;
          if (id !== undefined) created(id, objectKey);
          req.socket.destroy();
        });
      });
      up.on('error', () => req.socket.destroy());
      req.pipe(up);
      return;
    }
    if (command === 'CompleteMultipartUpload' && f.errorCompletes && f.errorCompletes.count > 0) {
      f.errorCompletes.count--;
      req.resume();
      res.writeHead(200, { 'content-type': 'application/xml' }).end(s3Error(f.errorCompletes.code));
      return;
    }
    const slow = f.slowCompletes;
    if (command === 'CompleteMultipartUpload' && slow && slow.count > 0) {
      slow.count--;
      stats.slowCompletes++;
      res.writeHead(200, { 'content-type': 'application/xml' });
      res.write('<?xml version="1.0" encoding="UTF-8"?>\n');
      const beat = setInterval(() => res.write(' '), slow.everyMs);
      res.on('close', () => clearInterval(beat));
      const parts: Buffer[] = [];
      req.on('data', (c: Buffer) => parts.push(c));
      // The whitespace goes on while the store works too, as S3's does.
      req.on('end', () => setTimeout(() => {
        const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
          const body: Buffer[] = [];
          upRes.on('data', (c: Buffer) => body.push(c));
          upRes.on('end', () => {
            clearInterval(beat);
            if ((upRes.statusCode ?? 500) < 300) stats.multipart.completed.push(decodeURIComponent(uploadId!));
            // The declaration went first; S3 sends an error that comes late in the same 200 (the SDK reads it as one).
            res.end(Buffer.concat(body).toString('utf8').replace(/^<\?xml[^>]*\?>\s*/, ''));
          });
        });
        up.on('error', () => res.destroy());
        up.end(Buffer.concat(parts));
      }, slow.ms));
      return;
    }
    const failPart = uploadId !== undefined && req.method === 'PUT' && f.failParts?.keys.test(objectKey) ? f.failParts : undefined;
    if (failPart) {
      req.resume();
      void Promise.resolve(failPart.after).finally(() => res.writeHead(failPart.status, { 'content-type': 'application/xml' }).end(s3Error(failPart.code)));
      return;
    }
    const putFault = req.method === 'PUT' && f.failPuts?.keys.test(objectKey) ? (f.failPuts.at?.[stats.puts + 1] ?? f.failPuts.every) : undefined;
    if (req.method === 'PUT' && f.failPuts?.keys.test(objectKey)) stats.puts++;
    if (putFault !== undefined) {
      stats.putFaults++;
      if (putFault === 'reset') req.resume().on('end', () => req.socket.destroy());
      else {
        const { status, code, after: held } = putFault;
        const answer = () => void res.writeHead(status, { 'content-type': 'application/xml' }).end(s3Error(code));
        if (held !== undefined) req.resume().on('end', () => void held.finally(answer));
        else {
          req.resume();
          answer();
        }
      }
      return;
    }
    // A Complete sent again for an upload completed: as S3 answers it (s3rver fails reading the parts it removed: 500
    // InternalError). Not only where a fault withheld the first answer: a loaded test process can be slow enough to
    // finish one that the client's silence bound cuts it and sends it again.
    if (uploadId !== undefined && req.method === 'POST' && stats.multipart.completed.includes(decodeURIComponent(uploadId))) {
      req.resume();
      res.writeHead(404, { 'content-type': 'application/xml' }).end(s3Error('NoSuchUpload'));
      return;
    }
    if (isList && f.listScript) {
      const spent = (s: NonNullable<Faults['listScript']>[number]) => (s.until !== undefined ? Date.now() >= s.until : s.forMs === undefined && (s.count ?? 1) <= 0);
      while (f.listScript.length > 0 && spent(f.listScript[0]!)) f.listScript.shift();
      const step = f.listScript[0];
      if (step !== undefined) {
        if (step.forMs !== undefined) step.until ??= Date.now() + step.forMs;
        else if (step.until === undefined) step.count = (step.count ?? 1) - 1;
        req.resume();
        if (step.answer === 'stall') return;
        if (step.answer === 'slowDown') stats.slowDowns++;
        const { status, code } = step.answer === 'slowDown' ? { status: 503, code: 'SlowDown' } : step.answer;
        const answer = () => void res.writeHead(status, { 'content-type': 'application/xml' }).end(s3Error(code));
        if (step.delayMs !== undefined) setTimeout(answer, step.delayMs);
        else answer();
        return;
      }
    }
    if (isList && f.stallLists && f.stallLists.count > 0) {
      f.stallLists.count--;
      req.resume();
      return;
    }
    if (isList && f.trickleLists) {
      req.resume();
      res.writeHead(200, { 'content-type': 'application/xml' });
      res.write('<?xml version="1.0" encoding="UTF-8"?>\n');
      const beat = setInterval(() => res.write(' '), f.trickleLists.everyMs);
      res.on('close', () => clearInterval(beat));
      return;
    }
    if (isList && f.failLists && f.failLists.count > 0) {
      f.failLists.count--;
      req.resume();
      res.writeHead(f.failLists.status, { 'content-type': 'application/xml' }).end(s3Error(f.failLists.code));
      return;
    }
    if (storm && ((isGet && storm.gets !== false) || (isList && storm.lists))) {
      if (isGet) stats.gets++;
      slowedDown();
      return;
    }
    if (isGet && f.failGets && f.failGets.count > 0 && (f.failGets.keys?.test(objectKey) ?? true)) {
      f.failGets.count--;
      stats.gets++;
      req.resume();
      res.writeHead(f.failGets.status, { 'content-type': 'application/xml' }).end(s3Error(f.failGets.code));
      return;
    }
    if (isGet) {
      stats.gets++;
      // The AWS SDK names itself; s3-lite sends no user agent.
      const sdk = /aws-sdk/.test(req.headers['user-agent'] ?? '');
      if (sdk) stats.sdkGets++;
      stats.getPaths[sdk ? 'sdk' : 'lite'].push((req.url ?? '').split('?')[0]!);
      if (req.headers.range) stats.rangedGets++;
      stats.open = ++concurrent;
      stats.maxConcurrent = Math.max(stats.maxConcurrent, concurrent);
      res.on('close', () => (stats.open = --concurrent));
    }
    // The store's part numbers are the proxy's to answer (above): s3rver would describe the whole object.
    const reading = sim !== undefined && (req.method === 'GET' || req.method === 'HEAD');
    const upPath = reading ? (req.url ?? '').replace(/[?&]partNumber=\d+/, '') : req.url;
    const answer = (upRes: http.IncomingMessage): void => {
      const ok = (upRes.statusCode ?? 500) < 300;
      if (ok && uploadId !== undefined && req.method === 'POST') stats.multipart.completed.push(decodeURIComponent(uploadId));
      if (ok && uploadId !== undefined && req.method === 'POST' && f.loseCompletes && f.loseCompletes.count > 0) {
        f.loseCompletes.count--;
        upRes.resume().on('end', () => res.socket?.destroy());
        return;
      }
      if (ok && isCreate) {
        const parts: Buffer[] = [];
        upRes.on('data', (c: Buffer) => parts.push(c));
        upRes.on('end', () => {
          const body = Buffer.concat(parts);
          const id = /<UploadId>([^<]*)<\/UploadId>/.exec(body.toString('utf8'))?.[1];
          if (id !== undefined) created(id, objectKey);
          res.writeHead(upRes.statusCode ?? 502, upRes.headers).end(body);
        });
        return;
      }
      if (isList && (f.rewriteList || f.objects)) {
        const parts: Buffer[] = [];
        upRes.on('data', (c: Buffer) => parts.push(c));
        upRes.on('end', () => {
          let xml = Buffer.concat(parts).toString('utf8');
          for (const [key, o] of Object.entries(f.objects ?? {})) {
            xml = xml.replace(new RegExp(`(<Key>${key}</Key>(?:(?!</Contents>)[\\s\\S])*?<ETag>)[^<]*(</ETag>)`), `$1${o.etag.replace(/"/g, '&quot;')}$2`);
          }
          if (f.rewriteList) xml = f.rewriteList(xml);
          const headers = { ...upRes.headers, 'content-length': String(Buffer.byteLength(xml)) };
          res.writeHead(upRes.statusCode ?? 502, headers).end(xml);
        });
        return;
      }
      if ((upRes.statusCode ?? 502) >= 300) {
        // Only the error's Code is kept; the body is forwarded untouched.
        const parts: Buffer[] = [];
        upRes.on('data', (c: Buffer) => parts.push(c));
        upRes.on('end', () => {
          const body = Buffer.concat(parts);
          const code = /<Code>([^<]*)<\/Code>/.exec(body.toString('utf8'))?.[1] ?? `HTTP${upRes.statusCode}`;
          stats.refusals[code] = (stats.refusals[code] ?? 0) + 1;
          res.writeHead(upRes.statusCode ?? 502, upRes.headers).end(body);
        });
        return;
      }
      const body = isGet && ok;
      const shorten = body && f.shortBodies?.keys.test(objectKey) && upRes.headers['content-length'] !== undefined ? f.shortBodies.by : 0;
      res.writeHead(upRes.statusCode ?? 502, {
        ...upRes.headers, ...(ok && reading ? { etag: sim.etag } : {}), ...(ok ? f.addHeaders : {}), ...(ok && wantsChecksum ? f.checksums?.[objectKey] : {}),
        ...(shorten > 0 ? { 'content-length': String(Math.max(0, Number(upRes.headers['content-length']) - shorten)) } : {}),
      });
      const c = f.corrupt;
      const damage = body && c !== undefined && c.keys.test(objectKey) && (c.perKey ? (c.done?.get(objectKey) ?? 0) < c.count : c.count > 0);
      if (damage && c.perKey) (c.done ??= new Map()).set(objectKey, (c.done.get(objectKey) ?? 0) + 1);
      else if (damage) c.count--;
      let damaged = false;
      // A fault is armed only on bodies long enough to reach it, so counts in tests are exact.
      const length = Number(upRes.headers['content-length'] ?? 0);
      const reset = body && (f.resets ?? 0) > 0 && f.resetAfterBytes !== undefined && length > f.resetAfterBytes;
      const stall = body && !reset && (f.stalls ?? 0) > 0 && f.stallAfterBytes !== undefined && length > f.stallAfterBytes;
      if (reset) f.resets!--;
      if (stall) f.stalls!--;
      let sent = 0;
      /** The body was cut by a reset or a stall. */
      let cut = false;
      let pacing = false;
      let draining = false;
      const t0 = Date.now();
      const limit = shorten > 0 ? Math.max(0, Number(upRes.headers['content-length']) - shorten) : Infinity;
      upRes.on('data', (chunk: Buffer) => {
        if (sent + chunk.length > limit) chunk = chunk.subarray(0, Math.max(0, limit - sent));
        if (reset && sent + chunk.length > f.resetAfterBytes!) {
          res.write(chunk.subarray(0, Math.max(0, f.resetAfterBytes! - sent)));
          stats.resets++;
          upRes.destroy();
          cut = true;
          setTimeout(() => res.socket?.destroy(), 5);
          return;
        }
        if (stall && sent + chunk.length > f.stallAfterBytes!) {
          res.write(chunk.subarray(0, Math.max(0, f.stallAfterBytes! - sent)));
          stats.stalls++;
          cut = true;
          upRes.destroy(); // the client sees an open socket that never sends another byte
          res.once('close', () => stats.stallsCut++);
          return;
        }
        if (damage && !damaged && chunk.length > 0) {
          damaged = true;
          chunk = Buffer.from(chunk);
          const at = stats.damaged++ % chunk.length;
          chunk[at] = chunk[at]! ^ 0xff;
        }
        sent += chunk.length;
        if (body) {
          stats.bodyBytes += chunk.length;
          const key = decodeURIComponent((req.url ?? '').split('?')[0]!);
          stats.bytesByPath[key] = (stats.bytesByPath[key] ?? 0) + chunk.length;
          stats.bytesByRequest[seq] = (stats.bytesByRequest[seq] ?? 0) + chunk.length;
        }
        if (!res.write(chunk)) {
          upRes.pause();
          draining = true;
          res.once('drain', () => {
            draining = false;
            if (!pacing || !f.exactPace) upRes.resume();
          });
        }
        if (body && f.bytesPerSecond) {
          const due = t0 + (sent / f.bytesPerSecond) * 1000 - Date.now();
          if (due > 0) {
            upRes.pause();
            pacing = true;
            setTimeout(() => {
              pacing = false;
              if (!draining || !f.exactPace) upRes.resume();
            }, due);
          }
        }
      });
      upRes.on('end', () => {
        // Not after a cut: the store's body may have ended in the chunk that was cut, and ending the answer there would
        // leave a short body on a kept-alive connection, which the client waits on until the keep-alive timeout (5 s).
        if (!cut && (!upRes.destroyed || sent > 0)) res.end();
      });
    };
    // The request to s3rver starts when the client's is passed on, not before: held on a pooled keep-alive socket, it
    // sent nothing, and s3rver closed that socket after its 5 s keep-alive timeout, cutting the client's request.
    let gone = false;
    res.on('close', () => (gone = true));
    const forward = (send: (up: http.ClientRequest) => void = (up) => req.pipe(up)) => {
      // Nothing to pass on for a client that left while its request was held.
      if (gone) return;
      const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: upPath, headers: req.headers }, answer);
      up.on('error', () => res.destroy());
      res.on('close', () => up.destroy());
      send(up);
    };
    if (isList && f.holdLists) void f.holdLists.finally(() => forward());
    else if (isList && f.listDelayMs) setTimeout(() => forward(), f.listDelayMs);
    else if (f.hold && !isList && req.method === (f.hold.method ?? 'GET') && f.hold.keys.test(decodeURIComponent(req.url ?? '')) && (f.hold.range?.(req.headers.range) ?? true)) {
      stats.held++;
      void f.hold.release.finally(() => forward());
    } else if (f.slowPuts && req.method === 'PUT' && f.slowPuts.keys.test(objectKey)) {
      const { bytesPerSecond } = f.slowPuts;
      forward((up) => {
        let read = 0;
        const t0 = Date.now();
        req.on('data', (chunk: Buffer) => {
          read += chunk.length;
          up.write(chunk);
          const due = t0 + (read / bytesPerSecond) * 1000 - Date.now();
          if (due > 0) {
            req.pause();
            setTimeout(() => req.resume(), due);
          }
        });
        req.on('end', () => up.end());
      });
    } else forward();
  });
  return Object.assign(p, await listenLoopback(server));
}

const xmlEscape = (v: string) => v.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** ListMultipartUploads of `bucket` as S3 answers it (prefix and max-uploads read), from what `p` saw: faults.listUploads. */
function uploadsListing(p: FaultProxy, bucket: string, query: URLSearchParams): string {
  const prefix = query.get('prefix') ?? '';
  const max = Number(query.get('max-uploads') ?? 1000);
  const { initiated } = p.stats.multipart;
  const open = Object.entries(unfinishedUploads(p)).filter(([, key]) => key.startsWith(prefix))
    .sort(([a, ka], [b, kb]) => (ka < kb ? -1 : ka > kb ? 1 : initiated[a]! - initiated[b]!));
  const shown = open.slice(0, max);
  // S3 gives Initiated in whole seconds.
  const uploads = shown.map(([id, key]) => `<Upload><Key>${xmlEscape(key)}</Key><UploadId>${xmlEscape(id)}</UploadId><Initiator><ID>S3RVER</ID>`
    + `<DisplayName>S3RVER</DisplayName></Initiator><Owner><ID>S3RVER</ID><DisplayName>S3RVER</DisplayName></Owner><StorageClass>STANDARD</StorageClass>`
    + `<Initiated>${new Date(Math.floor(initiated[id]! / 1000) * 1000).toISOString()}</Initiated></Upload>`).join('');
  const last = shown.at(-1);
  return `<?xml version="1.0" encoding="UTF-8"?>\n<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>${xmlEscape(bucket)}</Bucket>`
    + `<KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker><NextKeyMarker>${xmlEscape(last?.[1] ?? '')}</NextKeyMarker><NextUploadIdMarker>${xmlEscape(last?.[0] ?? '')}</NextUploadIdMarker>`
    + `<Prefix>${xmlEscape(prefix)}</Prefix><MaxUploads>${max}</MaxUploads><IsTruncated>${open.length > max}</IsTruncated>${uploads}</ListMultipartUploadsResult>`;
}

/** An s3rver with the fault proxy in front of it, for one test file. */
export async function startS3WithProxy(): Promise<{ s3: S3Server; proxy: FaultProxy }> {
  const s3 = await startS3(['models']);
  return { s3, proxy: await startFaultProxy(s3.port) };
}

/**
 * A test file's model store, for its beforeAll: the credentials in the environment, a temp folder (`<tmpPrefix>XXXXXX`,
 * which cleanUpS3 removes), s3rver with the fault proxy in front, and `files` put under s3://models/sd/.
 */
export async function startModelStore(tmpPrefix: string, files: Record<string, Buffer>): Promise<{ s3: S3Server; proxy: FaultProxy; tmp: string }> {
  Object.assign(process.env, CREDS);
  const tmp = await fsp.mkdtemp(path.join(os.tmpdir(), tmpPrefix));
  const { s3, proxy } = await startS3WithProxy();
  for (const [rel, body] of Object.entries(files)) await s3.put('models', `sd/${rel}`, body);
  return { s3, proxy, tmp };
}

/** UploadIds the store created that were neither completed nor aborted (what ListMultipartUploads would list), with their keys. */
export function unfinishedUploads(p: FaultProxy): Record<string, string> {
  const { created, completed, aborted } = p.stats.multipart;
  return Object.fromEntries(Object.entries(created).filter(([id]) => !completed.includes(id) && !aborted.includes(id)));
}

/** After each test the proxy's faults are cleared; after the file, the proxy and s3rver stop and `tmp` goes. */
export function cleanUpS3(get: () => { s3?: S3Server; proxy?: FaultProxy; tmp?: string }): void {
  afterEach(() => {
    const { proxy } = get();
    if (proxy) proxy.faults = {};
  });
  afterAll(async () => {
    const { s3, proxy, tmp } = get();
    await proxy?.close();
    if (s3) await destroyS3(s3);
    if (tmp) await fsp.rm(tmp, { recursive: true, force: true });
  });
}

/** The environment of a warm-up run against an endpoint (also what child processes get). */
export function s3Env(endpoint: string, cacheDir: string, extra: Record<string, string> = {}): Record<string, string> {
  return { ...CREDS, AWS_ENDPOINT_URL: endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cacheDir, LOG_LEVEL: 'silent', ...extra };
}

export function testConfig(endpoint: string, cacheDir: string, extra: Record<string, string> = {}): Readonly<Config> {
  return loadConfig(s3Env(endpoint, cacheDir, extra));
}

/** Deterministic pseudo-random bytes (xorshift), so tests can compare downloads byte for byte. */
/** The sizes of the parts of an upload of `size` bytes in parts of `partSize` (the last one shorter). */
export const evenParts = (size: number, partSize: number) => Array.from({ length: Math.ceil(size / partSize) }, (_, i) => Math.min(partSize, size - i * partSize));
/** S3's ETag of a multipart upload (AWS's "Checking object integrity"): the MD5 of the parts' binary MD5s, then `-parts`. */
export function multipartEtag(body: Buffer, partSize: number | number[]): string {
  const sizes = typeof partSize === 'number' ? evenParts(body.length, partSize) : partSize;
  const digests: Buffer[] = [];
  let at = 0;
  for (const n of sizes) {
    digests.push(createHash('md5').update(body.subarray(at, at + n)).digest());
    at += n;
  }
  return `"${createHash('md5').update(Buffer.concat(digests)).digest('hex')}-${digests.length}"`;
}

export function detBytes(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let x = seed >>> 0 || 1;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  for (; i < n; i++) b[i] = i & 0xff;
  return b;
}

/** The error a promise rejects with (a test fails if it resolves). */
export async function rejection(p: Promise<unknown>): Promise<RuntimeError> {
  try {
    await p;
  } catch (e) {
    return e as RuntimeError;
  }
  throw new Error('expected a rejection');
}

/**
 * `count()` once it has stopped changing (checked every 300 ms, at most 10 s): a proxy or link still counts for a moment
 * what it was passing to a process that was just killed, and a re-run's bytes must be counted from after that.
 */
export async function settledCount(count: () => number): Promise<number> {
  for (let last = -1, t0 = performance.now(); count() !== last && performance.now() - t0 < 10_000; ) {
    last = count();
    await new Promise((r) => setTimeout(r, 300));
  }
  return count();
}
