/**
 * @module A small S3-compatible store on loopback that answers as one particular store does: an in-memory bucket whose
 * every request is checked against its SigV4 signature (sigv4-reference.ts, from the bytes on the socket), with
 * switches for the ways real stores' answers differ from AWS's and from s3rver's. Each switch names the store whose
 * behaviour it reproduces; docs/DESIGN.md ("S3-compatible stores") lists the sources.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import { listenLoopback } from './loopback.js';
import { verifySigV4 } from './sigv4-reference.js';

export interface Dialect {
  /**
   * How `encoding-type=url` is answered. `aws`: keys url-encoded as AWS S3 and MinIO do (form encoding: a space is
   * '+', '/' kept) and `<EncodingType>url</EncodingType>` echoed; `ignore`: raw keys, nothing echoed (s3rver, and
   * stores that do not implement the parameter).
   */
  encoding?: 'aws' | 'ignore';
  /**
   * How raw keys are written into the XML. `refs` (default): the five entities, and character references for what
   * XML 1.0 text cannot hold (a carriage return as `&#13;`, as AWS S3 writes it); `entities`: the five entities only,
   * control characters raw (s3rver does this; an XML parser then reads a carriage return as a line feed).
   */
  escape?: 'refs' | 'entities';
  /** Most keys per page, whatever max-keys asks (every store caps it; small here to force pages). */
  pageSize?: number;
  /** IsTruncated without NextContinuationToken (Ceph RGW builds without ListObjectsV2, Huawei OBS; see DESIGN.md). */
  truncatedWithoutToken?: boolean;
  /** Every page answers the first page again with the same token: a store or proxy that drops continuation-token. */
  ignoreToken?: boolean;
  /** ETags in the listing without their quotes (NetApp ONTAP S3, some Ceph RGW versions); GET headers keep them. */
  bareListEtags?: boolean;
  /** ETags without their quotes in GET answers too (with bareListEtags: a store that never quotes them). */
  bareGetEtags?: boolean;
  /** A UTF-8 byte-order mark before the listing's XML. */
  bom?: boolean;
  /** Ranged GETs answered 200 with the whole object (a proxy that drops Range; GCS decompressive transcoding). */
  ignoreRange?: boolean;
  /** Ranged GETs answered 206 with another range than the one asked for. */
  wrongRange?: boolean;
  /** The bucket's region: a request signed for another is answered as `wrongRegion` says. */
  region?: string;
  /** `aws`: 301 PermanentRedirect with x-amz-bucket-region (AWS S3's global endpoint); `minio`: 400 AuthorizationHeaderMalformed with <Region>. */
  wrongRegion?: 'aws' | 'minio';
  /** Served under this path of the endpoint (`/s3`): a store behind a path-routing gateway. */
  basePath?: string;
}

export interface DialectStore {
  readonly endpoint: string;
  readonly port: number;
  dialect: Dialect;
  readonly objects: Map<string, Buffer>;
  /** Every request as it arrived: method, raw URL, whether its signature verified, its Range. */
  readonly seen: Array<{ method: string; url: string; signed: boolean; why?: string; range?: string }>;
  put(key: string, body: Buffer | string): void;
  close(): Promise<void>;
}

export const DIALECT_CREDS = { AWS_ACCESS_KEY_ID: 'DIALECTKEY', AWS_SECRET_ACCESS_KEY: 'dialect/secret+key' } as const;

const entities = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&apos;');
const xml = (s: string) => entities(s).replace(/[\r\x00-\x08\x0b\x0c\x0e-\x1f]/g, (c) => `&#${c.charCodeAt(0)};`);
/** AWS S3's url encoding of listed keys: form encoding (space as '+'), '/' kept. */
const awsUrlEncode = (s: string) => encodeURIComponent(s).replace(/%20/g, '+').replace(/%2F/g, '/').replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
const etagOf = (b: Buffer) => `"${createHash('md5').update(b).digest('hex')}"`;
const errorXml = (code: string, extra = '') => `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>from the dialect store</Message>${extra}<RequestId>1</RequestId></Error>`;

/** Listens on `::1` (the endpoint an IPv6 literal) instead of 127.0.0.1 where `ipv6`. */
export async function startDialectStore(bucket: string, dialect: Dialect = {}, ipv6 = false): Promise<DialectStore> {
  const objects = new Map<string, Buffer>();
  const seen: DialectStore['seen'] = [];
  const store = { dialect, objects, seen, put: (k: string, b: Buffer | string) => void objects.set(k, Buffer.from(b)) } as DialectStore & { port: number; endpoint: string; close(): Promise<void> };
  const server = http.createServer((req, res) => {
    req.resume();
    const d = store.dialect;
    const check = verifySigV4(req, DIALECT_CREDS.AWS_SECRET_ACCESS_KEY);
    seen.push({ method: req.method!, url: req.url!, signed: check.ok, ...(check.why ? { why: check.why } : {}), ...(req.headers.range ? { range: String(req.headers.range) } : {}) });
    const send = (status: number, body: string | Buffer, headers: Record<string, string> = {}) => {
      res.writeHead(status, { 'content-type': 'application/xml', 'content-length': String(Buffer.byteLength(body)), ...headers }).end(body);
    };
    if (!check.ok) return send(403, errorXml('SignatureDoesNotMatch'));
    const signedRegion = /Credential=[^/]+\/\d{8}\/([^/]+)\//.exec(String(req.headers.authorization))?.[1];
    if (d.region !== undefined && signedRegion !== d.region) {
      if (d.wrongRegion === 'minio') return send(400, errorXml('AuthorizationHeaderMalformed', `<Region>${d.region}</Region>`));
      return send(301, errorXml('PermanentRedirect', `<Endpoint>${bucket}.s3.${d.region}.amazonaws.com</Endpoint><Bucket>${bucket}</Bucket>`), { 'x-amz-bucket-region': d.region });
    }
    const q = req.url!.indexOf('?');
    let p = q < 0 ? req.url! : req.url!.slice(0, q);
    const base = d.basePath ?? '';
    if (!p.startsWith(`${base}/${bucket}`)) return send(404, errorXml('NoSuchBucket'));
    p = p.slice(base.length + bucket.length + 1);
    const params = new URLSearchParams(q < 0 ? '' : req.url!.slice(q + 1));
    if (p === '' || p === '/') {
      if (params.get('list-type') !== '2') return send(400, errorXml('InvalidArgument'));
      const prefix = params.get('prefix') ?? '';
      const max = Math.min(Number(params.get('max-keys') ?? 1000), d.pageSize ?? 1000);
      const token = d.ignoreToken ? null : params.get('continuation-token');
      const keys = [...objects.keys()].filter((k) => k.startsWith(prefix)).sort();
      const from = token === null ? 0 : keys.findIndex((k) => k > Buffer.from(token, 'base64').toString('utf8'));
      const page = from < 0 ? [] : keys.slice(from, from + max);
      const truncated = from >= 0 && from + max < keys.length;
      const url = d.encoding !== 'ignore' && params.get('encoding-type') === 'url';
      const enc = (k: string) => (url ? awsUrlEncode(k) : d.escape === 'entities' ? entities(k) : xml(k));
      const contents = page.map((k) => {
        const etag = d.bareListEtags ? etagOf(objects.get(k)!).slice(1, -1) : etagOf(objects.get(k)!);
        return `<Contents><Key>${enc(k)}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>${xml(etag)}</ETag><Size>${objects.get(k)!.length}</Size><StorageClass>STANDARD</StorageClass></Contents>`;
      }).join('');
      const next = truncated && !d.truncatedWithoutToken ? `<NextContinuationToken>${Buffer.from(page.at(-1)!).toString('base64')}</NextContinuationToken>` : '';
      const body = `<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>${bucket}</Name><Prefix>${enc(prefix)}</Prefix>`
        + `<KeyCount>${page.length}</KeyCount><MaxKeys>${max}</MaxKeys>${url ? '<EncodingType>url</EncodingType>' : ''}<IsTruncated>${truncated}</IsTruncated>${next}${contents}</ListBucketResult>`;
      return send(200, d.bom ? Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(body)]) : body, { 'content-type': 'application/xml; charset=utf-8' });
    }
    let key: string;
    try {
      key = p.slice(1).split('/').map(decodeURIComponent).join('/');
    } catch {
      return send(400, errorXml('InvalidURI'));
    }
    if (req.method === 'PUT' && !params.has('uploadId') && !params.has('partNumber')) {
      const parts: Buffer[] = [];
      req.removeAllListeners('data');
      req.on('data', (c: Buffer) => parts.push(c));
      req.on('end', () => {
        objects.set(key, Buffer.concat(parts));
        res.writeHead(200, { etag: etagOf(objects.get(key)!), 'content-length': '0' }).end();
      });
      req.resume();
      return;
    }
    const obj = objects.get(key);
    if (req.method !== 'GET' || obj === undefined) return send(404, errorXml('NoSuchKey'));
    const etag = d.bareGetEtags ? etagOf(obj).slice(1, -1) : etagOf(obj);
    const m = /^bytes=(\d+)-(\d+)$/.exec(String(req.headers.range ?? ''));
    if (m === null || d.ignoreRange) {
      res.writeHead(200, { 'content-length': String(obj.length), etag, 'content-type': 'application/octet-stream' }).end(obj);
      return;
    }
    let start = Number(m[1]);
    let end = Math.min(Number(m[2]), obj.length - 1);
    if (start >= obj.length) return send(416, errorXml('InvalidRange'));
    if (d.wrongRange && start > 0) {
      end -= start;
      start = 0;
    }
    res.writeHead(206, { 'content-length': String(end - start + 1), 'content-range': `bytes ${start}-${end}/${obj.length}`, etag, 'content-type': 'application/octet-stream' })
      .end(obj.subarray(start, end + 1));
  });
  if (ipv6) {
    const sockets = new Set<import('node:net').Socket>();
    server.on('connection', (c) => {
      sockets.add(c);
      c.on('close', () => sockets.delete(c));
    });
    await new Promise<void>((r) => server.listen(0, '::1', r));
    const port = (server.address() as import('node:net').AddressInfo).port;
    Object.assign(store, {
      port, endpoint: `http://[::1]:${port}`,
      close: () => new Promise<void>((r) => {
        for (const c of sockets) c.destroy();
        server.close(() => r());
      }),
    });
  } else Object.assign(store, await listenLoopback(server));
  if (store.dialect.basePath) Object.defineProperty(store, 'endpoint', { value: `${store.endpoint}${store.dialect.basePath}` });
  return store;
}
