/**
 * @module The SDK-free S3 transport, an opt-in (S3_TRANSPORT=lite): ListObjectsV2 and ranged GetObject over node:http(s),
 * signed by the AWS SDK's own SigV4 signer (@smithy/signature-v4) but without the SDK's client, whose import costs
 * ~250 ms of CPU and whose heap makes every garbage collection of a download dearer (docs/BENCHMARKS.md has what it
 * saves). Static keys from the environment only.
 *
 * It covers the common case only. `liteDeclines` names why, and the SDK does the work, whenever the SDK might sign or
 * route differently: credentials from a profile, a web identity, pod identity or an instance role; an AWS config file;
 * FIPS or dual-stack endpoints; a custom endpoint addressed virtual-hosted or with a base path; AWS bucket names that
 * are not plain DNS labels, directory (S3 Express) and Object Lambda buckets; China and ISO regions. An answer that may
 * be this module's own doing (a signature complaint, a redirect, a 400) carries `sdkMightDiffer`, and the fetch starts
 * over through the SDK (fetch.ts), so a difference shows up as a slower start, never as a wrong answer.
 */
import { createHash, createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { S3Settings } from '../config.js';
import { firstUse } from '../descriptors.js';
import { addListed, nextToken, sortListing } from './s3-compat.js';
import { DNS_LABEL_BUCKET } from './addressing.js';
import { CHECKSUM_HEADERS, checksumFrom } from './checksums.js';
import { boundRequest } from './upload-stall.js';
import { counting, countRequest } from './s3-requests.js';
import { CUSTOMER_KEY_MESSAGE } from './s3-errors.js';
import { THROTTLE } from './plan.js';
import { agentOptions, encryptionOf, tlsOptions, type GetRequest, type ObjectBody, type HeadAnswer, type HeadRequest, type RemoteObject, type S3Transport, type TlsOptions } from './transport.js';

export { sdkMightDiffer } from './transport.js';

export interface LiteCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** Where and how to send listings for one bucket. */
export interface LiteTarget {
  /** scheme://host[:port] */
  origin: string;
  bucket: string;
  /** The bucket's path under the origin: `/bucket` (path-style) or '' (virtual-hosted). */
  bucketPath: string;
  region: string;
  credentials: LiteCredentials;
  tls: TlsOptions;
  /** S3's time minus this host's, learnt from S3's Date header; shared by every request to the target. */
  clock: ClockOffset;
}

export interface ClockOffset {
  offsetMs: number;
}

/** A skew this large is corrected (what the AWS SDK's isClockSkewed checks; S3 itself refuses past 15 minutes). */
const SKEW_CORRECT_MS = 5 * 60_000;

/**
 * Learns S3's clock from a response's Date header, as the AWS SDK does (@aws-sdk/core, AwsSdkSigV4Signer and
 * getUpdatedSystemClockOffset): once local time plus the offset is 5 minutes or more off, the offset becomes S3's
 * time minus now. Skipped behind a cache (an Age header) and for answers that took over 15 minutes.
 */
export function updateClock(clock: ClockOffset, date: string | undefined, age: string | undefined, sentAt: number, now = Date.now()): void {
  if (date === undefined || age !== undefined || now - sentAt > 900_000) return;
  const server = Date.parse(date);
  if (Number.isNaN(server)) return;
  if (Math.abs(now + clock.offsetMs - server) >= SKEW_CORRECT_MS) clock.offsetMs = server - now;
}

/** The time to sign with: this host's, corrected by what S3's clock said. */
export const signingTime = (clock: ClockOffset) => new Date(Date.now() + clock.offsetMs);

/** Variables that change how the SDK picks credentials or endpoints: with any of them set, the SDK serves the fetch. */
const SDK_ONLY_ENV = ['AWS_PROFILE', 'AWS_CONFIG_FILE', 'AWS_USE_FIPS_ENDPOINT', 'AWS_USE_DUALSTACK_ENDPOINT', 'AWS_ENDPOINT_URL_S3', 'AWS_S3_US_EAST_1_REGIONAL_ENDPOINT'];
/** Directory (S3 Express) and Object Lambda buckets have endpoints and auth of their own. */
const SPECIAL_BUCKET = /--(x|ol)-s3$/;
const REGION = /^[a-z]{2}(-[a-z]+)+-\d+$/;
/** China and the ISO partitions are not under amazonaws.com. */
const OTHER_PARTITION = /^cn-|-iso[a-z]?-/;

/**
 * Why the SDK must serve `bucket` rather than this module (see the module comment), or undefined when this module
 * covers it. The reasons name variables and settings, never a value of them.
 */
export function liteDeclines(s: Readonly<S3Settings>, bucket: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  // The SDK's default chain takes these two first, unless AWS_PROFILE is set (below); without them it goes on to
  // web identity (IRSA), pod identity, container and instance metadata: always the SDK's.
  if (!env.AWS_ACCESS_KEY_ID || !env.AWS_SECRET_ACCESS_KEY) return 'no static keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY';
  const set = SDK_ONLY_ENV.find((k) => (env[k] ?? '') !== '');
  if (set !== undefined) return `${set} is set`;
  // A config file may set endpoints or FIPS for the SDK; this module does not read it.
  if (env.HOME && existsSync(`${env.HOME}/.aws/config`)) return '~/.aws/config exists';
  if (SPECIAL_BUCKET.test(bucket)) return 'a directory or Object Lambda bucket';
  if (s.endpoint !== undefined) {
    const u = new URL(s.endpoint);
    if (!s.forcePathStyle) return 'the endpoint is addressed virtual-hosted';
    if ((u.pathname !== '/' && u.pathname !== '') || u.search !== '' || u.username !== '') return 'the endpoint has a path, a query or user info';
    return undefined;
  }
  if (!REGION.test(s.region) || OTHER_PARTITION.test(s.region)) return `region ${JSON.stringify(s.region)} is outside the standard AWS partition`;
  // One DNS label, so `bucket.s3.region.amazonaws.com` matches AWS's wildcard certificate.
  if (!s.forcePathStyle && !DNS_LABEL_BUCKET.test(bucket)) return 'the bucket name is not one DNS label';
  return undefined;
}

/** The target for `bucket`, or undefined when the SDK must serve it (liteDeclines). Throws when AWS_CA_BUNDLE cannot be read. */
export function liteTarget(s: Readonly<S3Settings>, bucket: string, env: NodeJS.ProcessEnv = process.env): LiteTarget | undefined {
  if (liteDeclines(s, bucket, env) !== undefined) return undefined;
  const credentials: LiteCredentials = {
    accessKeyId: env.AWS_ACCESS_KEY_ID!, secretAccessKey: env.AWS_SECRET_ACCESS_KEY!, ...(env.AWS_SESSION_TOKEN ? { sessionToken: env.AWS_SESSION_TOKEN } : {}),
  };
  let origin: string;
  let bucketPath: string;
  if (s.endpoint !== undefined) {
    origin = new URL(s.endpoint).origin;
    bucketPath = `/${encodeRfc3986(bucket)}`;
  } else if (s.forcePathStyle) {
    origin = `https://s3.${s.region}.amazonaws.com`;
    bucketPath = `/${encodeRfc3986(bucket)}`;
  } else {
    origin = `https://${bucket}.s3.${s.region}.amazonaws.com`;
    bucketPath = '';
  }
  return { origin, bucket, bucketPath, region: s.region, credentials, tls: tlsOptions(s), clock: { offsetMs: 0 } };
}

/** RFC 3986 percent-encoding, as SigV4 wants it: everything but A-Z a-z 0-9 - _ . ~ */
export function encodeRfc3986(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** SHA-256 of an empty body: what a GET signs as its payload. */
export const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** The hash constructor the signer takes (the SDK's own is @smithy/hash-node, not a dependency of ours): node:crypto. */
class Sha256 {
  readonly #h;
  constructor(secret?: string | ArrayBuffer | ArrayBufferView) {
    this.#h = secret === undefined ? createHash('sha256') : createHmac('sha256', typeof secret === 'string' ? secret : bytes(secret));
  }
  update(d: string | ArrayBuffer | ArrayBufferView): void {
    this.#h.update(typeof d === 'string' ? d : bytes(d));
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#h.digest());
  }
}
const bytes = (d: ArrayBuffer | ArrayBufferView) => (ArrayBuffer.isView(d) ? Buffer.from(d.buffer, d.byteOffset, d.byteLength) : Buffer.from(d));

/** The SDK's SigV4 signer, imported on first use (~100 ms of CPU), so that choosing a transport costs nothing. */
export const loadSigner = firstUse('the S3 request signer', () => import('@smithy/signature-v4'));

export interface SignInput {
  method: string;
  /** Host header value: host[:port], the port only when it is not the scheme's default. */
  host: string;
  /** The request path, already percent-encoded (S3 signs it as sent, without encoding it twice). */
  path: string;
  query: ReadonlyArray<readonly [string, string]>;
  region: string;
  service?: string;
  credentials: LiteCredentials;
  now: Date;
  payloadHash?: string;
  /** Headers to sign and send beside those signV4 adds (lower-case names). */
  headers?: Readonly<Record<string, string>>;
}

/**
 * AWS Signature Version 4 headers for a request with no body (the SigV4 "header-based auth" of S3's docs), by the SDK's
 * own signer. Signed: host, x-amz-content-sha256, x-amz-date, a session token and `headers`; Range and If-Match travel unsigned,
 * as SigV4 allows. Returns the headers to send, Authorization included, and the query string the path must carry, in
 * the encoding the signature covers.
 */
export async function signV4(r: SignInput): Promise<{ headers: Record<string, string>; query: string }> {
  const { SignatureV4 } = await loadSigner();
  const signer = new SignatureV4({ credentials: r.credentials, region: r.region, service: r.service ?? 's3', sha256: Sha256, uriEscapePath: false });
  const query = Object.fromEntries(r.query);
  const signed = await signer.sign(
    { method: r.method, protocol: 'https:', hostname: r.host, path: r.path || '/', query, headers: { ...r.headers, host: r.host, 'x-amz-content-sha256': r.payloadHash ?? EMPTY_SHA256 } },
    { signingDate: r.now },
  );
  const qs = Object.keys(query).map((k) => [encodeRfc3986(k), encodeRfc3986(query[k]!)] as const)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`)
    .join('&');
  return { headers: signed.headers as Record<string, string>, query: qs };
}

/** Answers that may come from how this module signed or addressed the request, which the SDK might not get. */
const SDK_MIGHT_DIFFER = new Set(['SignatureDoesNotMatch', 'AuthorizationHeaderMalformed', 'PermanentRedirect', 'TemporaryRedirect', 'InvalidRequest', 'MalformedListing', 'ListingTooLarge']);

/**
 * An error response, shaped like the SDK's service errors so s3-errors.ts classifies both transports alike. A redirect,
 * a 400 or a signature complaint may be this module's doing: `sdkMightDiffer` (transport.ts) sends the fetch to the
 * SDK. Denied credentials, a missing bucket or a 5xx the SDK would meet as well: those are final.
 */
export class LiteHttpError extends Error {
  readonly $metadata: { httpStatusCode: number };
  /** The one header of the answer that s3-errors.ts reads (retryAfterMs), where the store sent it, as the SDK's errors keep theirs. */
  readonly $response?: { statusCode: number; headers: { 'retry-after': string } };
  readonly sdkMightDiffer: boolean;
  /** The S3 error code the store sent, as the SDK's errors carry it; absent where the answer had none (not S3's). */
  readonly Code?: string;
  /**
   * `customerKey`: a read refused because the object is encrypted with a customer-provided key (SSE-C; s3-errors.ts
   * customerKeyRequired), which the SDK would meet as well. `retryAfter`: the answer's Retry-After header.
   */
  constructor(status: number, code: string | undefined, readonly what: 'listing' | 'read' = 'listing', readonly customerKey = false, retryAfter?: string) {
    // The code comes from the server: only a short identifier goes into messages and logs.
    const safe = code !== undefined && /^[A-Za-z0-9.]{1,64}$/.test(code) ? code : undefined;
    super(`S3 answered HTTP ${status}${safe ? ` ${safe}` : ''} to the ${what}`);
    this.name = safe ?? `HTTP${status}`;
    if (safe !== undefined) this.Code = safe;
    this.$metadata = { httpStatusCode: status };
    if (retryAfter !== undefined) this.$response = { statusCode: status, headers: { 'retry-after': retryAfter } };
    // KMS's answer for an SSE-KMS object (400 KMS.ThrottlingException), and throttling sent with a 400, are the
    // store's, whoever signed the request.
    this.sdkMightDiffer = !customerKey && (status === 301 || status === 307 || (status === 400 && !this.name.startsWith('KMS.') && !THROTTLE.codes.includes(this.name))
      || SDK_MIGHT_DIFFER.has(this.name));
  }
}

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };
/** The five XML entities and numeric character references, as an XML parser would decode them. */
export function xmlText(s: string): string {
  return s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|amp|lt|gt|quot|apos);/g, (_, e: string) => {
    if (e[0] !== '#') return ENTITIES[e]!;
    const cp = e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
    if (!(cp >= 0 && cp <= 0x10ffff)) throw new LiteHttpError(200, 'MalformedListing');
    return String.fromCodePoint(cp);
  });
}

/**
 * The text of the first `<name>…</name>` at or after `from`, and where it ends. By indexOf, not a lazy regex: a regex
 * scans to the end of the page from every unclosed `<name>`, and a page of 200,000 of them held the event loop minutes.
 */
function between(xml: string, name: string, from = 0): { text: string; end: number } | undefined {
  const open = xml.indexOf(`<${name}>`, from);
  if (open < 0) return undefined;
  const start = open + name.length + 2;
  const close = xml.indexOf(`</${name}>`, start);
  return close < 0 ? undefined : { text: xml.slice(start, close), end: close + name.length + 3 };
}

const tag = (xml: string, name: string): string | undefined => {
  const m = between(xml, name);
  return m ? xmlText(m.text) : undefined;
};

export interface ListPage {
  /** Keys as the page wrote them: url-encoded where `urlEncoded` (s3-compat.ts addListed decodes them). */
  objects: Array<{ key: string; size: number; etag: string }>;
  truncated: boolean;
  /** The page says `<EncodingType>url</EncodingType>`: the store url-encoded its keys as asked. */
  urlEncoded: boolean;
  nextToken: string | undefined;
}

/**
 * A page whose body ended before its closing tag: cut on the way (a body delimited by its connection's end reads a cut
 * as the end), not the store's format. Retried as a reset is (s3-errors.ts classify: no error status), where a page
 * read as it is would list fewer objects, or none (STORAGE_MISSING), and the SDK's XML parser refuses it the same way.
 */
const TRUNCATED_PAGE = 'TruncatedListingPage';

/** One ListBucketResult page. S3 writes it flat (no CDATA, no nested Contents), which is all this reads. */
export function parseListPage(xml: string): ListPage {
  if (!/<ListBucketResult[\s>]/.test(xml)) throw new LiteHttpError(200, 'MalformedListing');
  if (!/<\/ListBucketResult>\s*$/.test(xml)) throw new LiteHttpError(200, TRUNCATED_PAGE);
  const objects: ListPage['objects'] = [];
  for (let from = 0; ;) {
    const c = between(xml, 'Contents', from);
    if (c === undefined) break;
    from = c.end;
    const key = tag(c.text, 'Key');
    if (key === undefined) continue;
    // Digits only: Number() reads '' as 0, which would list a file as empty (addListed refuses NaN).
    const size = tag(c.text, 'Size')?.trim() ?? '';
    objects.push({ key, size: /^\d+$/.test(size) ? Number(size) : NaN, etag: tag(c.text, 'ETag') ?? '' });
  }
  // What the SDK's parser reads: `true` in any case is true, anything else false. Only `true`/`false` are read here: any
  // other value (`1`, `yes`, ` true`) makes the SDK list instead (MalformedListing), so the two never read a page apart.
  const isTruncated = tag(xml, 'IsTruncated')?.toLowerCase();
  if (isTruncated !== undefined && isTruncated !== 'true' && isTruncated !== 'false') throw new LiteHttpError(200, 'MalformedListing');
  const truncated = isTruncated === 'true';
  const urlEncoded = tag(xml, 'EncodingType')?.toLowerCase() === 'url';
  return { objects, truncated, urlEncoded, nextToken: truncated ? tag(xml, 'NextContinuationToken') : undefined };
}

/** Largest listing page read (1000 keys take ~300 KB). */
const MAX_PAGE_BYTES = 16 * 1024 * 1024;

/** Where a request to the target goes: the signed Host header, and the socket's address and port. */
function endpoint(t: Pick<LiteTarget, 'origin'>): { secure: boolean; host: string; hostname: string; port: string | number } {
  const u = new URL(t.origin);
  const secure = u.protocol === 'https:';
  // URL keeps an IPv6 literal's brackets; the socket wants the bare address.
  return { secure, host: u.host, hostname: u.hostname.replace(/^\[(.*)\]$/, '$1'), port: u.port || (secure ? 443 : 80) };
}

async function getPage(t: LiteTarget, query: Array<[string, string]>, signal: AbortSignal | undefined): Promise<string> {
  const { secure, host, hostname, port } = endpoint(t);
  const { headers, query: qs } = await signV4({ method: 'GET', host, path: t.bucketPath || '/', query, region: t.region, credentials: t.credentials, now: signingTime(t.clock) });
  const sentAt = Date.now();
  const opts: https.RequestOptions = {
    method: 'GET', hostname, port, path: `${t.bucketPath || '/'}?${qs}`, headers,
    ...(signal ? { signal } : {}),
    ...(secure ? t.tls : {}),
  };
  const counted = countRequest(signal);
  return counting(counted, new Promise<string>((resolve, reject) => {
    const req = (secure ? https : http).request(opts, (res) => {
      updateClock(t.clock, res.headers.date, res.headers.age as string | undefined, sentAt);
      const chunks: Buffer[] = [];
      let bytes = 0;
      res.on('data', (c: Buffer) => {
        bytes += c.length;
        if (bytes > MAX_PAGE_BYTES) req.destroy(new LiteHttpError(res.statusCode ?? 0, 'ListingTooLarge'));
        else chunks.push(c);
      });
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        const status = res.statusCode ?? 0;
        if (status === 200) resolve(body);
        // The error's Code only: its other fields may echo the string that was signed.
        else reject(new LiteHttpError(status, tag(body, 'Code'), 'listing', false, res.headers['retry-after']));
      });
      res.on('error', reject);
    });
    // Each page is cut after S3_STALL_TIMEOUT_S of silence when the fetch lists under that bound (fetch.ts listing).
    boundRequest(req);
    req.on('error', reject);
    req.end();
  }));
}

/** Every object under `prefix` (paginated), directory markers skipped, sorted by path: what the SDK transport lists. */
export async function listPrefixLite(t: LiteTarget, prefix: string, signal?: AbortSignal, pageSize = 1000): Promise<RemoteObject[]> {
  const out: RemoteObject[] = [];
  const seen = new Set<string>();
  let token: string | undefined;
  do {
    // encoding-type=url: XML 1.0 cannot carry every character a key may hold (AWS's ListObjectsV2 reference).
    const query: Array<[string, string]> = [['list-type', '2'], ['encoding-type', 'url'], ['max-keys', String(pageSize)], ['prefix', prefix]];
    if (token !== undefined) query.push(['continuation-token', token]);
    const page = parseListPage(await getPage(t, query, signal));
    addListed(out, page.objects, page.urlEncoded, prefix);
    token = nextToken(`s3://${t.bucket}/${prefix}`, page.truncated, page.nextToken, seen);
  } while (token !== undefined);
  return sortListing(out);
}

/** Keep-alive sockets for one fetch's requests: `sockets` = the ranges in flight plus a few, so none waits for one. */
export function liteAgent(t: LiteTarget, sockets: number): http.Agent {
  return t.origin.startsWith('https:') ? new https.Agent({ ...agentOptions(sockets), ...t.tls }) : new http.Agent(agentOptions(sockets));
}

/** Largest error body read (S3's are a few hundred bytes). */
const MAX_ERROR_BYTES = 64 * 1024;

/** An object's request path: S3 signs the key as sent, each segment encoded once, the slashes kept. */
export function objectPath(t: Pick<LiteTarget, 'bucketPath'>, key: string): string {
  return `${t.bucketPath}/${key.split('/').map(encodeRfc3986).join('/')}`;
}

/**
 * GetObject without the SDK's client. An error answer rejects with a LiteHttpError carrying S3's Code (classified in
 * s3-errors.ts like the SDK's); a 200 or 206 resolves with the body unread.
 */
export async function getObjectLite(t: LiteTarget, agent: http.Agent, r: GetRequest): Promise<ObjectBody> {
  const { secure, host, hostname, port } = endpoint(t);
  const keyPath = objectPath(t, r.key);
  const { headers } = await signV4({ method: 'GET', host, path: keyPath, query: [], region: t.region, credentials: t.credentials, now: signingTime(t.clock) });
  if (r.range !== undefined) headers.range = r.range;
  if (r.ifMatch !== undefined) headers['if-match'] = r.ifMatch;
  const sentAt = Date.now();
  const opts: https.RequestOptions = { method: 'GET', hostname, port, path: keyPath, headers, agent, signal: r.signal };
  const counted = countRequest(r.signal);
  return new Promise<ObjectBody>((resolve, reject) => {
    const req = (secure ? https : http).request(opts, (res) => {
      updateClock(t.clock, res.headers.date, res.headers.age as string | undefined, sentAt);
      const status = res.statusCode ?? 0;
      if (status === 200 || status === 206) {
        counted?.streamed(res);
        const len = res.headers['content-length'];
        const range = res.headers['content-range'];
        resolve({
          body: res, etag: res.headers.etag, contentLength: len !== undefined ? Number(len) : undefined, status,
          ...(range !== undefined ? { contentRange: range } : {}), ...encryptionHeader(res.headers),
        });
        return;
      }
      const chunks: Buffer[] = [];
      let bytes = 0;
      res.on('data', (c: Buffer) => {
        bytes += c.length;
        if (bytes <= MAX_ERROR_BYTES) chunks.push(c);
      });
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        const code = tag(body, 'Code');
        // The message is read for one thing only, and goes nowhere.
        const customerKey = status === 400 && (code === 'InvalidRequest' || code === 'InvalidArgument') && CUSTOMER_KEY_MESSAGE.test(tag(body, 'Message') ?? '');
        reject(new LiteHttpError(status, code, 'read', customerKey, res.headers['retry-after']));
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  }).catch((e: unknown) => {
    counted?.failed(e);
    throw e;
  });
}

const encryptionHeader = (h: http.IncomingHttpHeaders) =>
  encryptionOf(h['x-amz-server-side-encryption'] as string | undefined, h['x-amz-server-side-encryption-customer-algorithm'] as string | undefined);

/**
 * HeadObject without the SDK's client: of one part (`?partNumber=`), or with the object's checksum (the checksum mode
 * header is signed, as S3 wants every x-amz-* header). An error answer rejects as getObjectLite's do.
 */
export async function headObjectLite(t: LiteTarget, agent: http.Agent, r: HeadRequest): Promise<HeadAnswer> {
  const { secure, host, hostname, port } = endpoint(t);
  const keyPath = objectPath(t, r.key);
  const { headers, query } = await signV4({
    method: 'HEAD', host, path: keyPath, query: r.partNumber !== undefined ? [['partNumber', String(r.partNumber)]] : [], region: t.region,
    credentials: t.credentials, now: signingTime(t.clock), ...(r.checksums ? { headers: { 'x-amz-checksum-mode': 'ENABLED' } } : {}),
  });
  if (r.ifMatch !== undefined) headers['if-match'] = r.ifMatch;
  const sentAt = Date.now();
  const opts: https.RequestOptions = { method: 'HEAD', hostname, port, path: query ? `${keyPath}?${query}` : keyPath, headers, agent, signal: r.signal };
  const counted = countRequest(r.signal);
  return counting(counted, new Promise<HeadAnswer>((resolve, reject) => {
    const req = (secure ? https : http).request(opts, (res) => {
      updateClock(t.clock, res.headers.date, res.headers.age as string | undefined, sentAt);
      res.resume();
      const status = res.statusCode ?? 0;
      // A HEAD carries no error body: the status alone says what went wrong.
      if (status !== 200 && status !== 206) return reject(new LiteHttpError(status, undefined, 'read', false, res.headers['retry-after']));
      const h = res.headers;
      const num = (v: string | string[] | undefined) => (typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : undefined);
      const str = (v: string | string[] | undefined) => (typeof v === 'string' ? v : undefined);
      const checksum = r.checksums ? checksumFrom(Object.fromEntries(CHECKSUM_HEADERS.map(([alg, name]) => [alg, str(h[name])])), str(h['x-amz-checksum-type'])) : undefined;
      resolve({
        contentLength: num(h['content-length']), partsCount: num(h['x-amz-mp-parts-count']), etag: h.etag, ...encryptionHeader(h),
        ...(checksum ? { checksum } : {}),
      });
    });
    req.on('error', reject);
    req.end();
  }));
}

/**
 * The SDK-free transport for one fetch: keep-alive sockets for its GETs, one per range in flight, and a few spare for
 * the content check's HEADs, so that none waits behind the ranges (listings use Node's global agent, each page bounded
 * on its own: getPage); and its target's clock offset shared by every request.
 */
export function createLiteTransport(t: LiteTarget, s: Pick<S3Settings, 'maxConcurrency'>): S3Transport {
  const agent = liteAgent(t, s.maxConcurrency + 4);
  return {
    name: 'lite',
    list: (r) => listPrefixLite(t, r.prefix, r.signal),
    get: (r) => getObjectLite(t, agent, r),
    head: (r) => headObjectLite(t, agent, r),
    destroy: () => agent.destroy(),
  };
}
