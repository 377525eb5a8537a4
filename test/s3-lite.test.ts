/**
 * The SDK-free listing (src/storage/s3-lite.ts): its SigV4 signature against AWS's documented example and against the
 * SDK's own signer, its XML reading, when it steps aside for the SDK, and its listings of s3rver next to the SDK's.
 * Also: a cache hit it checked never loads the AWS SDK, and an answer it may have caused moves the listing to the SDK.
 */
import { execFile } from 'node:child_process';
import { createHash, createHmac } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { SignatureV4 } from '@smithy/signature-v4';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger, type Logger } from '../src/log.js';
import { resolveModel } from '../src/storage/index.js';
import { createS3, listPrefix } from '../src/storage/s3.js';
import { LiteHttpError, liteTarget, listPrefixLite, objectPath, parseListPage, sdkMightDiffer, signV4, updateClock, xmlText } from '../src/storage/s3-lite.js';
import { CREDS, destroyS3, type FaultProxy, rejection, type S3Server, startFaultProxy, startS3, testConfig } from './helpers/s3.js';

/** The Sha256 constructor @smithy/signature-v4 takes, on node:crypto. */
class Sha256 {
  readonly #h;
  constructor(secret?: string | ArrayBuffer | ArrayBufferView) {
    this.#h = secret === undefined ? createHash('sha256') : createHmac('sha256', typeof secret === 'string' ? secret : Buffer.from(secret as ArrayBuffer));
  }
  update(d: string | ArrayBuffer | ArrayBufferView): void {
    this.#h.update(typeof d === 'string' ? d : ArrayBuffer.isView(d) ? Buffer.from(d.buffer, d.byteOffset, d.byteLength) : Buffer.from(d));
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#h.digest());
  }
}

const DOC_CREDS = { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' };

describe('SigV4 signing', () => {
  it("matches AWS's documented example (S3 API reference, header-based auth, GET Bucket (List Objects))", () => {
    const { headers, query } = signV4({
      method: 'GET', host: 'examplebucket.s3.amazonaws.com', path: '/', query: [['max-keys', '2'], ['prefix', 'J']],
      region: 'us-east-1', credentials: DOC_CREDS, now: new Date('2013-05-24T00:00:00Z'),
    });
    expect(query).toBe('max-keys=2&prefix=J');
    expect(headers.authorization).toBe('AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, '
      + 'SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7');
  });

  it("signs what the SDK's own signer signs: odd prefixes, continuation tokens, session tokens, ports", async () => {
    const cases: Array<{ host: string; path: string; query: Array<[string, string]>; region: string; token?: string }> = [
      { host: '127.0.0.1:9000', path: '/models', query: [['list-type', '2'], ['max-keys', '1000'], ['prefix', 'sd 1.5/ünï&co+x=y~(1)*!\'/']], region: 'us-east-1' },
      { host: 'bucket-1.s3.eu-west-3.amazonaws.com', path: '/', query: [['list-type', '2'], ['max-keys', '1000'], ['prefix', ''], ['continuation-token', '1/ab+cd==']], region: 'eu-west-3', token: 'FwoGZXIvYXdzE//token+with/slashes=' },
      { host: 's3.us-west-2.amazonaws.com', path: '/my.bucket', query: [['prefix', 'a%b'], ['list-type', '2']], region: 'us-west-2' },
      // A GetObject of an odd key, as getObjectLite addresses it.
      { host: '127.0.0.1:9000', path: objectPath({ bucketPath: '/models' }, "sd 1.5/ünï&co+x=y~(1)*!'/per%cent"), query: [], region: 'us-east-1' },
    ];
    const now = new Date('2026-11-26T12:34:56Z');
    for (const c of cases) {
      const credentials = { ...DOC_CREDS, ...(c.token ? { sessionToken: c.token } : {}) };
      const mine = signV4({ method: 'GET', host: c.host, path: c.path, query: c.query, region: c.region, credentials, now });
      const sdk = new SignatureV4({ credentials, region: c.region, service: 's3', sha256: Sha256, uriEscapePath: false });
      const signed = await sdk.sign({
        method: 'GET', protocol: 'https:', hostname: c.host.split(':')[0]!, path: c.path, query: Object.fromEntries(c.query),
        headers: { host: c.host, 'x-amz-content-sha256': mine.headers['x-amz-content-sha256']! },
      }, { signingDate: now });
      expect(mine.headers.authorization, c.host).toBe(signed.headers.authorization);
      if (c.token) expect(mine.headers['x-amz-security-token']).toBe(c.token);
    }
  });
});

describe('reading ListBucketResult', () => {
  it('decodes entities, reads sizes and ETags, follows truncation', () => {
    const page = parseListPage(`<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount>
<IsTruncated>true</IsTruncated><NextContinuationToken>tok&amp;en/1=</NextContinuationToken>
<Contents><Key>p/a &amp; b&lt;c&gt;.bin</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>&quot;abc&quot;</ETag><Size>42</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>p/&#252;n&#xEF;.json</Key><Size>0</Size></Contents></ListBucketResult>`);
    expect(page.objects).toEqual([{ key: 'p/a & b<c>.bin', size: 42, etag: '"abc"' }, { key: 'p/ünï.json', size: 0, etag: '' }]);
    expect(page.nextToken).toBe('tok&en/1=');
    expect(parseListPage('<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>')).toEqual({ objects: [], nextToken: undefined });
    expect(xmlText('&amp;lt;')).toBe('&lt;');
  });

  it('anything but a listing is an error the SDK gets to retry', () => {
    const err = (() => {
      try {
        parseListPage('<html>captive portal</html>');
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(LiteHttpError);
    expect(sdkMightDiffer(err)).toBe(true);
    expect(sdkMightDiffer(new LiteHttpError(403, 'AccessDenied'))).toBe(false);
    expect(sdkMightDiffer(new LiteHttpError(403, 'SignatureDoesNotMatch'))).toBe(true);
    expect(sdkMightDiffer(new LiteHttpError(301, 'PermanentRedirect'))).toBe(true);
    expect(sdkMightDiffer(new LiteHttpError(503, 'SlowDown'))).toBe(false);
    expect(sdkMightDiffer(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }))).toBe(false);
  });
});

describe('when the SDK lists instead', () => {
  const base = testConfig('http://127.0.0.1:9000', '/tmp/unused').s3;
  const env = { AWS_ACCESS_KEY_ID: 'AK', AWS_SECRET_ACCESS_KEY: 'SK' };
  const aws = { ...base, endpoint: undefined, forcePathStyle: false, region: 'eu-west-3' };

  it('covers static credentials with a path-style endpoint and AWS with a plain bucket name', () => {
    expect(liteTarget(base, 'models', env)).toMatchObject({ origin: 'http://127.0.0.1:9000', bucketPath: '/models', region: base.region });
    expect(liteTarget(aws, 'models', { ...env, AWS_SESSION_TOKEN: 'T' })).toMatchObject({
      origin: 'https://models.s3.eu-west-3.amazonaws.com', bucketPath: '', credentials: { accessKeyId: 'AK', secretAccessKey: 'SK', sessionToken: 'T' },
    });
    expect(liteTarget({ ...aws, forcePathStyle: true }, 'my.bucket', env)).toMatchObject({ origin: 'https://s3.eu-west-3.amazonaws.com', bucketPath: '/my.bucket' });
  });

  it('leaves profiles, roles, FIPS, virtual-hosted custom endpoints, dotted buckets and China to the SDK', () => {
    expect(liteTarget(base, 'models', {})).toBeUndefined(); // IRSA, instance role, …
    expect(liteTarget(base, 'models', { ...env, AWS_PROFILE: 'p' })).toBeUndefined();
    expect(liteTarget(base, 'models', { ...env, AWS_USE_FIPS_ENDPOINT: 'true' })).toBeUndefined();
    expect(liteTarget({ ...base, forcePathStyle: false }, 'models', env)).toBeUndefined();
    expect(liteTarget({ ...base, endpoint: 'http://127.0.0.1:9000/base' }, 'models', env)).toBeUndefined();
    expect(liteTarget(aws, 'my.bucket', env)).toBeUndefined();
    expect(liteTarget({ ...aws, region: 'cn-north-1' }, 'models', env)).toBeUndefined();
    expect(liteTarget({ ...aws, region: 'us-iso-east-1' }, 'models', env)).toBeUndefined();
    expect(liteTarget(aws, 'data--usw2-az1--x-s3', env)).toBeUndefined();
    expect(liteTarget(base, 'models', { ...env, AWS_CONFIG_FILE: '/etc/aws/config' })).toBeUndefined();
  });
});

describe('against s3rver', () => {
  let s3: S3Server;
  let proxy: FaultProxy;
  let tmp: string;
  const KEYS = ['sd/a b.txt', 'sd/x&y<z>.bin', 'sd/ünï/çødé.json', 'sd/plus+sign=1', 'sd/per%cent', "sd/quote'\"s", 'sd/dir/', 'sd/deep/er/f.onnx', 'sdx/other'];

  beforeAll(async () => {
    Object.assign(process.env, CREDS);
    tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 's3-lite-'));
    s3 = await startS3(['models']);
    proxy = await startFaultProxy(s3.port);
    for (const [i, k] of KEYS.entries()) await s3.put('models', k, Buffer.alloc(i * 7, i));
  });
  afterAll(async () => {
    await proxy?.close();
    if (s3) await destroyS3(s3);
    await fsp.rm(tmp, { recursive: true, force: true });
  });

  it('lists exactly what the SDK lists, page by page', async () => {
    const cfg = testConfig(proxy.endpoint, tmp);
    const t = liteTarget(cfg.s3, 'models')!;
    expect(t).toBeDefined();
    const sdk = createS3(cfg.s3);
    try {
      const want = await listPrefix(sdk.client, 'models', 'sd/');
      expect(want.map((o) => o.rel)).toContain('ünï/çødé.json');
      expect(await listPrefixLite(t, 'sd/')).toEqual(want);
    } finally {
      sdk.destroy();
    }
  });

  it('follows continuation tokens, each page signed with its token', async () => {
    // s3rver answers 500 to paged listings (the SDK's too), so a two-page store on a real socket stands in.
    const seen: Array<{ query: URLSearchParams; auth: string }> = [];
    const server = http.createServer((req, res) => {
      const u = new URL(req.url!, 'http://x');
      seen.push({ query: u.searchParams, auth: String(req.headers.authorization) });
      const token = u.searchParams.get('continuation-token');
      const body = token === null
        ? '<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>p2/+=</NextContinuationToken><Contents><Key>sd/b</Key><Size>2</Size><ETag>&quot;b&quot;</ETag></Contents></ListBucketResult>'
        : '<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>sd/a</Key><Size>1</Size><ETag>&quot;a&quot;</ETag></Contents></ListBucketResult>';
      res.writeHead(200, { 'content-type': 'application/xml' }).end(body);
    });
    // On IPv6 loopback: the URL's brackets must not reach the socket.
    await new Promise<void>((r) => server.listen(0, '::1', r));
    try {
      const port = (server.address() as AddressInfo).port;
      const t = liteTarget(testConfig(`http://[::1]:${port}`, tmp).s3, 'models')!;
      expect(await listPrefixLite(t, 'sd/', undefined, 1)).toEqual([
        { key: 'sd/a', rel: 'a', size: 1, etag: '"a"' }, { key: 'sd/b', rel: 'b', size: 2, etag: '"b"' },
      ]);
      expect(seen.map((s) => [s.query.get('max-keys'), s.query.get('continuation-token')])).toEqual([['1', null], ['1', 'p2/+=']]);
      for (const s of seen) expect(s.auth).toMatch(/^AWS4-HMAC-SHA256 Credential=S3RVER\/\d{8}\/us-east-1\/s3\/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=[0-9a-f]{64}$/);
      expect(seen[0]!.auth).not.toBe(seen[1]!.auth);
    } finally {
      server.close();
    }
  });

  it('a clock off by 20 minutes: S3 refuses the request time, its Date header corrects the offset, the next request passes', async () => {
    const cfg = testConfig(proxy.endpoint, tmp);
    for (const skewMs of [20 * 60_000, -20 * 60_000]) {
      const t = liteTarget(cfg.s3, 'models')!;
      // As if this host's clock were skewMs off: every request is signed that far from S3's time.
      t.clock.offsetMs = skewMs;
      const refused = await listPrefixLite(t, 'sd/').then(() => undefined, (e: unknown) => e as LiteHttpError);
      expect([refused?.name, refused?.$metadata.httpStatusCode]).toEqual(['RequestTimeTooSkewed', 403]);
      expect(Math.abs(t.clock.offsetMs)).toBeLessThan(2_000);
      expect((await listPrefixLite(t, 'sd/')).length).toBeGreaterThan(0);
    }
  });

  it('learns the offset as the AWS SDK does: only past 5 minutes, never from a cached or very late answer', () => {
    const now = Date.parse('2030-01-01T00:00:00Z');
    const clock = { offsetMs: 0 };
    updateClock(clock, new Date(now + 60_000).toUTCString(), undefined, now - 100, now);
    expect(clock.offsetMs).toBe(0); // a minute: within what S3 accepts, left alone
    updateClock(clock, new Date(now + 20 * 60_000).toUTCString(), '12', now - 100, now);
    expect(clock.offsetMs).toBe(0); // from a cache (Age)
    updateClock(clock, new Date(now + 20 * 60_000).toUTCString(), undefined, now - 16 * 60_000, now);
    expect(clock.offsetMs).toBe(0); // the answer took longer than the skew it would correct
    updateClock(clock, 'not a date', undefined, now - 100, now);
    expect(clock.offsetMs).toBe(0);
    updateClock(clock, new Date(now - 20 * 60_000).toUTCString(), undefined, now - 100, now);
    expect(clock.offsetMs).toBe(-20 * 60_000);
    updateClock(clock, new Date(now - 20 * 60_000 + 1_000).toUTCString(), undefined, now - 100, now);
    expect(clock.offsetMs).toBe(-20 * 60_000); // corrected already: a second of Date granularity is no reason to move
  });

  it('maps error answers as the SDK does, without the credentials', async () => {
    const cfg = testConfig(proxy.endpoint, tmp);
    const wrong = liteTarget(cfg.s3, 'models', { AWS_ACCESS_KEY_ID: 'WRONGKEY', AWS_SECRET_ACCESS_KEY: 'sekrit-value-123' })!;
    const denied = await listPrefixLite(wrong, 'sd/').then(() => undefined, (e: unknown) => e as LiteHttpError);
    expect([denied?.name, denied?.$metadata.httpStatusCode]).toEqual(['InvalidAccessKeyId', 403]);
    expect(String(denied?.message)).not.toMatch(/sekrit|WRONGKEY/);
    const missing = await listPrefixLite(liteTarget(cfg.s3, 'nope')!, 'sd/').then(() => undefined, (e: unknown) => e as LiteHttpError);
    expect([missing?.name, missing?.$metadata.httpStatusCode]).toEqual(['NoSuchBucket', 404]);
    expect(sdkMightDiffer(denied)).toBe(false);
  });

  it('a miss it downloads and a cache hit it checks never load the AWS SDK', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'hit-'));
    // Each resolution in its own process, so the SDK loaded by this test file does not count.
    const script = `
      import { createRequire } from 'node:module';
      import { loadConfig } from './dist/src/config.js';
      import { silentLogger } from './dist/src/log.js';
      import { resolveModel } from './dist/src/storage/index.js';
      const r = await resolveModel('s3://models/sd/', { cfg: loadConfig(process.env), log: silentLogger() });
      const sdk = Object.keys(createRequire(import.meta.url).cache).some((k) => k.includes('@aws-sdk/client-s3'));
      console.log(JSON.stringify({ fromCache: r.fromCache, stale: r.stale ?? false, sdk }));`;
    const env = { ...process.env, ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache };
    const run = async () => JSON.parse((await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { env, cwd: process.cwd() })).stdout) as Record<string, unknown>;
    expect(await run()).toEqual({ fromCache: false, stale: false, sdk: false });
    expect(await run()).toEqual({ fromCache: true, stale: false, sdk: false });
  }, 30_000);

  it('an answer it may have caused (a signature complaint, a redirect) moves the listing to the SDK at once', async () => {
    const infos: Array<[Record<string, unknown>, string]> = [];
    const log = { ...silentLogger(), info: (o: Record<string, unknown>, msg?: string) => void infos.push([o, String(msg)]) } as unknown as Logger;
    for (const [status, code] of [[403, 'SignatureDoesNotMatch'], [301, 'PermanentRedirect']] as const) {
      const cfg = testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'fallback-')));
      proxy.faults = { failLists: { count: 1, status, code } };
      const lists = proxy.stats.lists;
      const r = await resolveModel('s3://models/sd/', { cfg, log });
      expect(r.fromCache).toBe(false);
      const said = infos.filter(([, m]) => m === 'S3 refused the SDK-free listing; listing through the AWS SDK');
      expect(said).toHaveLength(status === 403 ? 1 : 2);
      // Its reason names the answer, never what S3 echoed of the request.
      expect(String(said.at(-1)![0].reason)).toContain(code);
      expect(JSON.stringify(said)).not.toMatch(/echoed-secret|S3RVER/);
      // The refused one (not retried), the SDK's, and the SDK's again after the download (s3-lite is not asked again).
      expect(proxy.stats.lists - lists, code).toBe(3);
      expect((await fsp.readFile(path.join(r.dir, 'deep/er/f.onnx'))).length).toBe(KEYS.indexOf('sd/deep/er/f.onnx') * 7);
    }
    // A denial is final: the SDK is not asked to list again.
    proxy.faults = { deny: true };
    const err = await rejection(resolveModel('s3://models/sd/', { cfg: testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'deny-'))), log }));
    expect(err.code).toBe('STORAGE_DENIED');
    expect(infos.filter(([, m]) => m.startsWith('S3 refused the SDK-free listing'))).toHaveLength(2);
    proxy.faults = {};
  });

  it('asks for each object by the path the SDK asks for it, odd keys included', async () => {
    const paths = proxy.stats.getPaths;
    paths.sdk.length = 0;
    paths.lite.length = 0;
    await resolveModel('s3://models/sd/', { cfg: testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'paths-lite-'))), log: silentLogger() });
    process.env.AWS_CONFIG_FILE = path.join(tmp, 'aws-config');
    await fsp.writeFile(process.env.AWS_CONFIG_FILE, '');
    try {
      await resolveModel('s3://models/sd/', { cfg: testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'paths-sdk-'))), log: silentLogger() });
    } finally {
      delete process.env.AWS_CONFIG_FILE;
    }
    expect(paths.lite.length).toBe(6);
    expect([...paths.lite].sort()).toEqual([...paths.sdk].sort());
  });

  it('a GET it may have caused to fail moves that range and the rest of the download to the SDK', async () => {
    const infos: Array<[Record<string, unknown>, string]> = [];
    const log = { ...silentLogger(), info: (o: Record<string, unknown>, msg?: string) => void infos.push([o, String(msg)]) } as unknown as Logger;
    // One range at a time, so every GET after the refused one is sent after the switch.
    const cfg = testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'get-fallback-')), { S3_MAX_CONCURRENCY: '1' });
    proxy.faults = { failGets: { count: 1, status: 403, code: 'SignatureDoesNotMatch' } };
    const { gets, sdkGets } = proxy.stats;
    const r = await resolveModel('s3://models/sd/', { cfg, log });
    expect(r.fromCache).toBe(false);
    const objs = KEYS.filter((k) => k.startsWith('sd/') && !k.endsWith('/'));
    for (const k of objs) expect((await fsp.readFile(path.join(r.dir, k.slice('sd/'.length)))).length, k).toBe(KEYS.indexOf(k) * 7);
    const said = infos.filter(([, m]) => m === 'S3 refused an SDK-free GET; downloading through the AWS SDK');
    expect(said).toHaveLength(1);
    expect(String(said[0]![0].reason)).toContain('SignatureDoesNotMatch');
    expect(JSON.stringify(said)).not.toMatch(/echoed-secret|S3RVER/);
    // The refused GET plus one per object, every one of those through the SDK (empty objects need no GET).
    const nonEmpty = objs.filter((k) => KEYS.indexOf(k) > 0).length;
    expect(proxy.stats.gets - gets).toBe(nonEmpty + 1);
    expect(proxy.stats.sdkGets - sdkGets).toBe(nonEmpty);

    // Denied for real: final, with the same error the SDK would give.
    proxy.faults = { failGets: { count: 100, status: 403, code: 'AccessDenied' } };
    const err = await rejection(resolveModel('s3://models/sd/', { cfg: testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'get-denied-'))), log }));
    expect(err.code).toBe('STORAGE_DENIED');
    expect(err.message).toMatch(/access denied to read s3:\/\/models\/sd\/.* \(AccessDenied\)/);
    proxy.faults = {};
  });
});
