/**
 * The SDK-free transport (src/storage/s3-lite.ts, S3_TRANSPORT=lite): its SigV4 signature against AWS's documented
 * example and, on the wire, against an independent reading of the SigV4 spec; its XML reading, when it steps aside for
 * the SDK, and its listings of s3rver next to the SDK's. Also: a cache hit it checked never loads the AWS SDK, and an
 * answer it may have caused sends the fetch to the SDK. The cases both transports must pass are s3-transport.test.ts.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { beforeAll, describe, expect, it } from 'vitest';
import { silentLogger, type Logger } from '../src/log.js';
import { chooseTransport } from '../src/storage/choose-transport.js';
import { resolveModel } from '../src/storage/fetch.js';
import { createS3, listPrefix } from '../src/storage/s3-sdk.js';
import { getObjectLite, LiteHttpError, liteTarget, listPrefixLite, parseListPage, sdkMightDiffer, signV4, updateClock, xmlText } from '../src/storage/s3-lite.js';
import { cleanUpS3, CREDS, type FaultProxy, rejection, type S3Server, startS3WithProxy, testConfig as s3Config } from './helpers/s3.js';
import { verifySigV4 } from './helpers/sigv4-reference.js';

/** Every fetch of this file goes through the SDK-free transport, unless the SDK must serve it. */
const testConfig = (endpoint: string, cache: string, extra: Record<string, string> = {}) => s3Config(endpoint, cache, { S3_TRANSPORT: 'lite', ...extra });

const DOC_CREDS = { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' };

describe('SigV4 signing', () => {
  it("matches AWS's documented example (S3 API reference, header-based auth, GET Bucket (List Objects))", async () => {
    const { headers, query } = await signV4({
      method: 'GET', host: 'examplebucket.s3.amazonaws.com', path: '/', query: [['max-keys', '2'], ['prefix', 'J']],
      region: 'us-east-1', credentials: DOC_CREDS, now: new Date('2013-05-24T00:00:00Z'),
    });
    expect(query).toBe('max-keys=2&prefix=J');
    expect(headers.authorization).toBe('AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, '
      + 'SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7');
  });

  it('what it sends verifies on the wire: odd prefixes and keys, continuation tokens, session tokens, ports, Range unsigned', async () => {
    // A store that recomputes each request's signature from what arrived (test/helpers/sigv4-reference.ts, the HMAC
    // chain of AWS's docs written out), so the path and query sent must be the ones signed.
    const seen: Array<{ url: string; check: ReturnType<typeof verifySigV4>; range?: string; token?: string }> = [];
    const server = http.createServer((req, res) => {
      seen.push({
        url: req.url!, check: verifySigV4(req, DOC_CREDS.secretAccessKey),
        ...(req.headers.range ? { range: String(req.headers.range) } : {}),
        ...(req.headers['x-amz-security-token'] ? { token: String(req.headers['x-amz-security-token']) } : {}),
      });
      const u = new URL(req.url!, 'http://x');
      if (u.searchParams.get('list-type') === '2') {
        const token = u.searchParams.get('continuation-token');
        res.writeHead(200).end(token === null
          ? '<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>1/ab+cd==&amp;x</NextContinuationToken></ListBucketResult>'
          : '<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>');
      } else res.writeHead(206, { 'content-length': '2', etag: '"e"' }).end('ab');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const port = (server.address() as AddressInfo).port;
      const env = { AWS_ACCESS_KEY_ID: DOC_CREDS.accessKeyId, AWS_SECRET_ACCESS_KEY: DOC_CREDS.secretAccessKey };
      const s3 = s3Config(`http://127.0.0.1:${port}`, '/tmp/unused', { S3_TRANSPORT: 'lite' }).s3;
      for (const extra of [{}, { AWS_SESSION_TOKEN: 'FwoGZXIvYXdzE//token+with/slashes=' }]) {
        const t = liteTarget(s3, 'my.models', { ...env, ...extra })!;
        await listPrefixLite(t, "sd 1.5/ünï&co+x=y~(1)*!'/", undefined, 1);
        const agent = new http.Agent();
        const got = await getObjectLite(t, agent, { key: "sd 1.5/ünï&co+x=y~(1)*!'/per%cent/a b", range: 'bytes=0-1', signal: AbortSignal.timeout(5_000) });
        got.body.resume();
        agent.destroy();
      }
      expect(seen).toHaveLength(6);
      for (const x of seen) expect(x.check.ok, `${x.url}: ${x.check.why}`).toBe(true);
      // host, the payload hash and the date are signed, and the session token where there is one; Range is not.
      expect(seen.map((x) => x.check.signed.join(';'))).toEqual([
        ...Array(3).fill('host;x-amz-content-sha256;x-amz-date'), ...Array(3).fill('host;x-amz-content-sha256;x-amz-date;x-amz-security-token'),
      ]);
      expect(seen.filter((x) => x.token === 'FwoGZXIvYXdzE//token+with/slashes=')).toHaveLength(3);
      expect(seen.filter((x) => x.url.includes('continuation-token=1%2Fab%2Bcd%3D%3D%26x'))).toHaveLength(2);
      expect(seen.filter((x) => x.range === 'bytes=0-1')).toHaveLength(2);
    } finally {
      server.close();
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
    expect(parseListPage('<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>')).toEqual({ objects: [], truncated: false, urlEncoded: false, nextToken: undefined });
    expect(xmlText('&amp;lt;')).toBe('&lt;');
  });

  it('reads a page of unclosed tags in one pass (200,000 unclosed <Contents> held the event loop ~3 minutes: a lazy regex scanned to the end from each)', async () => {
    // In a process of its own, with a time limit: the old reading would hold this test's event loop too.
    const script = `import { parseListPage } from ${JSON.stringify(new URL('../dist/src/storage/s3-lite.js', import.meta.url).href)};
      const page = parseListPage('<ListBucketResult><Contents><Key>a</Key><Size>1</Size></Contents><IsTruncated>' + '<Contents><Key>b'.repeat(200000) + '</ListBucketResult>');
      process.stdout.write(JSON.stringify(page));`;
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { timeout: 30_000 });
    expect(JSON.parse(stdout)).toEqual({ objects: [{ key: 'a', size: 1, etag: '' }], truncated: false, urlEncoded: false });
  });

  it('reads IsTruncated as the SDK does (`true` in any case), and hands a page whose IsTruncated is neither true nor false to the SDK', () => {
    const page = (v: string) => parseListPage(`<ListBucketResult><IsTruncated>${v}</IsTruncated><NextContinuationToken>t</NextContinuationToken></ListBucketResult>`);
    // Before: only exactly `true` was read as true, so a store writing `True` was listed one page long by this reader.
    for (const v of ['true', 'True', 'TRUE']) expect(page(v).truncated, v).toBe(true);
    for (const v of ['false', 'False']) expect(page(v).truncated, v).toBe(false);
    // Before: read as false, the listing cut after this page, where the SDK's own reading decides instead.
    for (const v of ['1', 'yes', ' true', '']) {
      let err: unknown;
      try {
        page(v);
      } catch (e) {
        err = e;
      }
      expect([err instanceof LiteHttpError && err.name, sdkMightDiffer(err)], JSON.stringify(v)).toEqual(['MalformedListing', true]);
    }
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

  it('is chosen only on S3_TRANSPORT=lite, and says why it steps aside, naming no value', () => {
    const lite = { ...base, transport: 'lite' as const };
    expect(chooseTransport({ ...base, transport: 'sdk' }, 'models', env)).toEqual({ name: 'sdk' });
    expect(chooseTransport(lite, 'models', env)).toMatchObject({ name: 'lite', target: { bucketPath: '/models' } });
    expect(chooseTransport(lite, 'models', {})).toEqual({ name: 'sdk', declined: 'no static keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY' });
    expect(chooseTransport(lite, 'models', { ...env, AWS_PROFILE: 'prod-secret-profile' })).toEqual({ name: 'sdk', declined: 'AWS_PROFILE is set' });
    expect(chooseTransport({ ...aws, transport: 'lite' }, 'my.bucket', env)).toEqual({ name: 'sdk', declined: 'the bucket name is not one DNS label' });
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
    ({ s3, proxy } = await startS3WithProxy());
    for (const [i, k] of KEYS.entries()) await s3.put('models', k, Buffer.alloc(i * 7, i));
  });
  cleanUpS3(() => ({ s3, proxy, tmp }));

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
      import { resolveModel } from './dist/src/storage/fetch.js';
      const r = await resolveModel('s3://models/sd/', { cfg: loadConfig(process.env), log: silentLogger() });
      const sdk = Object.keys(createRequire(import.meta.url).cache).some((k) => k.includes('@aws-sdk/client-s3'));
      console.log(JSON.stringify({ fromCache: r.fromCache, stale: r.stale ?? false, sdk }));`;
    const env = { ...process.env, ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache, S3_TRANSPORT: 'lite' };
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
  });
});
