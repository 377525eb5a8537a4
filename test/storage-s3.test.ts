import { promises as fsp, existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/log.js';
import { defaultIo } from '../src/storage/download.js';
import { type FetchProgress, RATE_WINDOW_MIN_MS, resolveModel } from '../src/storage/fetch.js';
import { unusedFiles } from '../src/pipeline/model.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, rejection, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';
import { until } from './helpers/server.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
const log = silentLogger();

const small: Record<string, Buffer> = {};
const BIG = 3 * 1024 * 1024 + 12_345; // 49 ranges of 64 KiB
const big: Record<string, Buffer> = {
  'unet/model.onnx_data': detBytes(BIG, 7),
  'unet/model.onnx': detBytes(10_000, 8),
  'model_index.json': Buffer.from('{"_class_name":"StableDiffusionPipeline"}'),
  'scheduler/empty.txt': Buffer.alloc(0),
};

async function seed(prefix: string, files: Record<string, Buffer>): Promise<void> {
  for (const [rel, body] of Object.entries(files)) await s3.put('models', prefix + rel, body);
}

async function expectSame(dir: string, files: Record<string, Buffer>): Promise<void> {
  for (const [rel, body] of Object.entries(files)) expect((await fsp.readFile(path.join(dir, rel))).equals(body), rel).toBe(true);
  const leftovers = (await fsp.readdir(dir, { recursive: true })).filter((f) => f.endsWith('.partial') || f.includes('.tmp.'));
  expect(leftovers).toEqual([]);
}

const newCache = () => fsp.mkdtemp(path.join(tmp, 'cache-'));
const cfgForAny = (cache: string, extra: Record<string, string> = {}) => testConfig(proxy.endpoint, cache, { S3_PART_SIZE: '65536', S3_MAX_CONCURRENCY: '8', ...extra });

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'storage-s3-'));
  ({ s3, proxy } = await startS3WithProxy());
  for (let i = 0; i < 40; i++) small[`tokenizer/${i % 3}/deep/${i % 2 ? 'x' : 'y'}/f${i}.json`] = detBytes(100 + i * 37, i + 1);
  small['model_index.json'] = Buffer.from('{}');
  await seed('nested/sd/', small);
  await seed('big/', big);
});

cleanUpS3(() => ({ s3, proxy, tmp }));

// Every case runs through both transports: the AWS SDK (the default, and what profiles and roles always get) and the
// opt-in SDK-free one (S3_TRANSPORT=lite with static keys).
describe.each(['lite', 'sdk'] as const)('resolveModel from S3 (S3_TRANSPORT=%s)', (client) => {
  const cfgFor = (cache: string, extra: Record<string, string> = {}) => cfgForAny(cache, { S3_TRANSPORT: client, ...extra });

  it('an entry committed with objects the runtime never reads (before the listing left them out) is a hit as it is: no refill, its optimized copies kept', async () => {
    const prefix = `with-extras-${client}/`;
    await seed(prefix, { ...big, 'README.md': Buffer.from('# a model card'), 'unet/diffusion_pytorch_model.safetensors': detBytes(2000, 3) });
    const cache = await newCache();
    const first = await resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(cache), log });
    expect([first.fromCache, first.files]).toEqual([false, 6]);
    const committed = await fsp.readFile(path.join(first.dir, '.complete.json'), 'utf8');
    const opt = path.join(first.dir, 'unet', 'model.1.22.0.cpu.opt.onnx');
    await fsp.writeFile(opt, 'an optimized copy');
    const again = await resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(cache), log, unused: unusedFiles });
    expect([again.fromCache, again.dir]).toEqual([true, first.dir]);
    expect(await fsp.readFile(path.join(first.dir, '.complete.json'), 'utf8')).toBe(committed);
    expect(existsSync(opt)).toBe(true);
  });

  it('downloads nested prefixes with many small files; each file is whole when announced; a second call is a hit', async () => {
    const sdkGets = proxy.stats.sdkGets;
    const cache = await newCache();
    const ready: string[] = [];
    const phases = new Set<string>();
    // S3's first answer to a GET comes once, before any file is whole.
    const answers: number[] = [];
    const r = await resolveModel('s3://models/nested/sd', {
      cfg: cfgFor(cache), log,
      onProgress: (p: FetchProgress) => phases.add(p.phase),
      onFirstResponse: () => answers.push(ready.length),
      onFileReady: (rel, abs) => {
        ready.push(rel);
        expect(abs.endsWith('.partial')).toBe(false);
        expect(readFileSync(abs).equals(small[rel]!)).toBe(true);
      },
    });
    expect(r).toMatchObject({ fromCache: false, files: 41, source: 's3', bytes: Object.values(small).reduce((s, b) => s + b.length, 0) });
    expect(ready.sort()).toEqual(Object.keys(small).sort());
    expect([...phases]).toEqual(expect.arrayContaining(['resolving', 'listing', 'downloading', 'verifying', 'done']));
    await expectSame(r.dir, small);
    const manifest = JSON.parse(await fsp.readFile(path.join(r.dir, '.complete.json'), 'utf8'));
    expect(manifest.files).toHaveLength(41);
    expect(answers).toEqual([0]);
    const gets = proxy.stats.gets;
    const again = await resolveModel('s3://models/nested/sd/', { cfg: cfgFor(cache), log, onFirstResponse: () => answers.push(-1) });
    expect(again).toMatchObject({ fromCache: true, dir: r.dir, files: 41 });
    expect(answers).toEqual([0]);
    expect(proxy.stats.gets).toBe(gets);
    // The GETs went through the client this case is about.
    expect(proxy.stats.sdkGets - sdkGets).toBe(client === 'sdk' ? 41 : 0);
  });

  it('splits a large file into many ranges with bounded concurrency', async () => {
    const cache = await newCache();
    // This download's own peak, above what the proxy still counts open from an earlier case's aborted ranges.
    const open = proxy.stats.open;
    proxy.stats.maxConcurrent = open;
    const before = { ...proxy.stats };
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache), log });
    await expectSame(r.dir, big);
    expect(proxy.stats.rangedGets - before.rangedGets).toBe(Math.ceil(BIG / 65536));
    expect(proxy.stats.maxConcurrent - open).toBeLessThanOrEqual(8);
    expect(proxy.stats.bodyBytes - before.bodyBytes).toBe(Object.values(big).reduce((s, b) => s + b.length, 0));
  });

  it('survives connection resets mid-range, resuming from the bytes already written', async () => {
    const cache = await newCache();
    // Past writeBytes into a range: the resumed request starts after bytes that were already written.
    proxy.faults = { resetAfterBytes: 50_000, resets: 12 };
    const before = { ...proxy.stats };
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache), log, writeBytes: 16_384 });
    await expectSame(r.dir, big);
    expect(proxy.stats.resets - before.resets).toBe(12);
    // Resumed, not restarted: at most a little more than the model crosses the wire.
    expect(proxy.stats.bodyBytes - before.bodyBytes).toBeLessThan(BIG + 10_000 + 100 + 12 * 65536);
  });

  it('a reset one byte before the end of every range: each range resumed once, the file whole', async () => {
    const cache = await newCache();
    // Every full 64 KiB range is cut after 65,535 bytes; the ranges that resume them are too short to be cut.
    proxy.faults = { resetAfterBytes: 65_535, resets: 1_000 };
    const before = { ...proxy.stats };
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache), log, writeBytes: 16_384 });
    proxy.faults = {};
    await expectSame(r.dir, big);
    const cuts = Math.floor(BIG / 65536);
    expect(proxy.stats.resets - before.resets).toBe(cuts);
    // One GET per range (the empty file has none) and one per cut.
    expect(proxy.stats.gets - before.gets).toBe(Math.ceil(BIG / 65536) + 2 + cuts);
  });

  it('retries many ranges at once without a MaxListenersExceededWarning on stderr', async () => {
    const cache = await newCache();
    // 24 ranges in flight, all answered 503 once: 24 backoff waits on the download's one abort signal at a time.
    proxy.faults = { failGets: { count: 24, status: 503, code: 'SlowDown' } };
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.name);
    process.on('warning', onWarning);
    try {
      const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache, { S3_MAX_CONCURRENCY: '24' }), log });
      await expectSame(r.dir, big);
      await new Promise((r) => setImmediate(r));
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings).not.toContain('MaxListenersExceededWarning');
  });

  it('aborts and retries a stalled range', async () => {
    const cache = await newCache();
    proxy.faults = { stallAfterBytes: 10_000, stalls: 2 };
    const { stalls, stallsCut } = proxy.stats;
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache, { S3_STALL_TIMEOUT_S: '0.4' }), log });
    await expectSame(r.dir, big);
    // Both stalled ranges given up by the client (each connection closed), their bytes read again: counted, not timed
    // (a bound of 15 s stood for it; a range never given up holds the download past the test's timeout).
    expect(proxy.stats.stalls - stalls).toBe(2);
    await until(() => proxy.stats.stallsCut - stallsCut === 2);
  });

  it('a cache volume slower to write than S3_STALL_TIMEOUT_S is not a stall: no range given up, no byte read twice', async () => {
    const cache = await newCache();
    const { stallsCut, bodyBytes } = proxy.stats;
    // Each data write takes twice the stall bound (a slow NFS volume): the loop does not pull meanwhile, so S3 sends nothing.
    // A bound of 1 s, not 0.3: this process serves the proxy too, and on a loaded machine a real pause of 0.3 s between
    // its answers was a real stall (a range read twice), which is not what this case is about.
    const io = { ...defaultIo, write: async (...a: Parameters<typeof defaultIo.write>) => (await sleep(2_000), defaultIo.write(...a)) };
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache, { S3_PART_SIZE: '8388608', S3_STALL_TIMEOUT_S: '1', S3_MAX_ATTEMPTS: '2' }), log, io, writeBytes: 256 * 1024 });
    await expectSame(r.dir, big);
    expect(proxy.stats.stallsCut - stallsCut).toBe(0);
    expect(proxy.stats.bodyBytes - bodyBytes).toBe(Object.values(big).reduce((n, b) => n + b.length, 0));
  }, 60_000);

  it('a range that stalls on every attempt (no answer, or headers and no byte) fails as STORAGE_STALL, not as a missing object', async () => {
    await seed('stalled/', { 'a.bin': detBytes(5_000, 43) });
    let release!: () => void;
    const gets = proxy.stats.gets;
    const faults = [{ hold: { keys: /\/stalled\/a\.bin/, release: new Promise<void>((r) => (release = r)) } }, { stallAfterBytes: 0, stalls: 1_000 }];
    try {
      for (const f of faults) {
        proxy.faults = f;
        const err = await rejection(resolveModel('s3://models/stalled', { cfg: cfgFor(await newCache(), { S3_STALL_TIMEOUT_S: '0.3', S3_MAX_ATTEMPTS: '2' }), log }));
        // Before: STORAGE_MISSING "cannot read (2 attempts) s3://models/stalled/a.bin: AbortError".
        expect([err.code, err.message]).toEqual(['STORAGE_STALL',
          'cannot read (2 attempts) s3://models/stalled/a.bin: no bytes received for 0.3 s (S3_STALL_TIMEOUT_S); gave up after retries']);
      }
      expect(proxy.stats.gets - gets).toBe(4);
    } finally {
      release();
    }
  });

  it('serves a committed entry with S3 down, and refetches only what changed when the ETag moves', async () => {
    const cache = await newCache();
    await seed('etag/', { 'a.bin': detBytes(70_000, 1), 'b.bin': detBytes(50_000, 2) });
    const first = await resolveModel('s3://models/etag', { cfg: cfgFor(cache), log });
    expect(first.fromCache).toBe(false);

    await s3.stop();
    try {
      const lists = proxy.stats.lists;
      const ready: string[] = [];
      const hit = await resolveModel('s3://models/etag', { cfg: cfgFor(cache), log, onFileReady: (rel) => ready.push(rel) });
      expect(hit).toMatchObject({ fromCache: true, stale: true, dir: first.dir });
      expect(ready.sort()).toEqual(['a.bin', 'b.bin']);
      // Served after the hit check's two LIST tries, each refused at once, not the fill's S3_MAX_ATTEMPTS: counted, not
      // timed (a bound of 3 s stood for it).
      expect(proxy.stats.lists - lists).toBe(2);
    } finally {
      await s3.restart();
    }

    const changed = detBytes(90_000, 3);
    await s3.put('models', 'etag/a.bin', changed);
    const before = proxy.stats.bodyBytes;
    const r = await resolveModel('s3://models/etag', { cfg: cfgFor(cache), log });
    expect(r.fromCache).toBe(false);
    await expectSame(r.dir, { 'a.bin': changed, 'b.bin': detBytes(50_000, 2) });
    expect(proxy.stats.bodyBytes - before).toBe(90_000);
    expect((await resolveModel('s3://models/etag', { cfg: cfgFor(cache), log })).fromCache).toBe(true);
  });

  it('refuses object keys that would escape the cache directory', async () => {
    const cache = await newCache();
    proxy.faults = { rewriteList: (xml) => xml.replace('<Key>nested/sd/model_index.json</Key>', '<Key>nested/sd/../../escape.json</Key>') };
    const err = await rejection(resolveModel('s3://models/nested/sd', { cfg: cfgFor(cache), log }));
    expect(err.code).toBe('INVALID_INPUT');
    expect(err.message).toMatch(/\.\.\/\.\.\/escape\.json.*leave the cache/);
    expect(existsSync(path.join(cache, 'escape.json'))).toBe(false);
  });

  it('refuses listings the cache cannot hold as they are, with a named error that shows no local path and no credential', async () => {
    const cache = await newCache();
    const entry = (xml: string) => /<Contents>(?:(?!<\/Contents>)[\s\S])*?<Key>nested\/sd\/model_index\.json<\/Key>[\s\S]*?<\/Contents>/.exec(xml)![0];
    const long = `w${'e'.repeat(260)}.onnx`;
    const cases: Array<[string, (xml: string) => string, RegExp]> = [
      ['STORAGE_KEY_TOO_LONG', (xml) => xml.replace('<Key>nested/sd/model_index.json</Key>', `<Key>nested/sd/unet/${long}</Key>`),
        /^object key "nested\/sd\/unet\/wee+.*" cannot be cached: its name "wee+.*" has 266 bytes, and the cache stores names of up to 247 bytes; rename the object$/],
      ['STORAGE_KEY_DUPLICATE', (xml) => xml.replace(entry(xml), entry(xml) + entry(xml)),
        /^the listing of s3:\/\/models\/nested\/sd\/ names the key "nested\/sd\/model_index\.json" more than once/],
      ['STORAGE_KEY_DUPLICATE', (xml) => xml.replace('<Key>nested/sd/model_index.json</Key>', '<Key>nested/sd/tokenizer/0</Key>'),
        /^under s3:\/\/models\/nested\/sd\/, "nested\/sd\/tokenizer\/0" is an object and also a folder of "nested\/sd\/tokenizer\/0\/deep\/[xy]\/f\d+\.json"; a file and a folder cannot share a name in the cache$/],
      ['STORAGE_KEY_OUTSIDE_PREFIX', (xml) => xml.replace('<Key>nested/sd/model_index.json</Key>', '<Key>nested/other/model_index.json</Key>'),
        /^the listing of s3:\/\/models\/nested\/sd\/ returned the key "nested\/other\/model_index\.json", which is outside that prefix/],
      // A size that is no byte count: before, -5 failed with a TypeError, and no size at all could list a file as empty.
      ...['-5', '1.5', 'abc', null].map((size): [string, (xml: string) => string, RegExp] => ['STORAGE_UNSUPPORTED',
        (xml) => xml.replace(entry(xml), entry(xml).replace(/<Size>[^<]*<\/Size>/, size === null ? '' : `<Size>${size}</Size>`)),
        /^the listing gave the object "nested\/sd\/model_index\.json" (no readable size|the size -5|the size 1\.5), which is not a byte count; the store, or a proxy in front of it, answers ListObjectsV2 wrongly$/]),
    ];
    for (const [code, rewriteList, message] of cases) {
      proxy.faults = { rewriteList };
      const err = await rejection(resolveModel('s3://models/nested/sd', { cfg: cfgFor(cache), log }));
      expect([err.code, err.message]).toEqual([code, expect.stringMatching(message)]);
      expect(err.message).not.toContain(cache);
      expect(err.message).not.toContain(os.tmpdir());
      expect(err.message).not.toMatch(/S3RVER/);
    }
    expect((await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'))).toEqual([]);
  });

  it('a listing page cut short and yet ended (a body delimited by its connection, cut by the link) is listed again, never read as a shorter listing', async () => {
    for (const cut of [0.02, 0.1, 0.5]) {
      const cache = await newCache();
      let cuts = 0;
      proxy.faults = { rewriteList: (xml) => (cuts++ === 0 ? xml.slice(0, Math.floor(xml.length * cut)) : xml) };
      const listings: number[] = [];
      let restarts = 0;
      const r = await resolveModel('s3://models/nested/sd', {
        cfg: cfgFor(cache), log, onListing: (files) => listings.push(files.length), onRestart: () => restarts++,
      });
      proxy.faults = {};
      // The cut page's own listing was never used: one round, of every file.
      expect([r.files, listings, restarts], String(cut)).toEqual([41, [41], 0]);
      await expectSame(r.dir, small);
    }
  });

  it('answers shorter than their range (a proxy that cuts them, Content-Length included): retried, then STORAGE_TRANSIENT naming the lengths', async () => {
    const cache = await newCache();
    proxy.faults = { shortBodies: { keys: /^big\/unet\/model\.onnx$/, by: 1 } };
    const gets = proxy.stats.gets;
    const err = await rejection(resolveModel('s3://models/big', { cfg: cfgFor(cache, { S3_MAX_ATTEMPTS: '2' }), log }));
    proxy.faults = {};
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', 'cannot read (2 attempts) s3://models/big/unet/model.onnx: its answers were not of the length asked for '
      + '(the last: 10000 bytes asked for, Content-Length 9999); something between S3 and this pod (a proxy) cuts or rewrites them (gave up after retries)']);
    expect(proxy.stats.gets - gets).toBeGreaterThanOrEqual(2);
  });

  it('fails clearly, without retrying, on a missing bucket, a missing prefix, bad credentials and 403s', async () => {
    const cache = await newCache();
    const noBucket = await rejection(resolveModel('s3://nope/sd', { cfg: cfgFor(cache), log }));
    expect([noBucket.code, noBucket.message]).toEqual(['STORAGE_MISSING', expect.stringMatching(/bucket "nope" does not exist/)]);

    const noPrefix = await rejection(resolveModel('s3://models/absent/sd', { cfg: cfgFor(cache), log }));
    expect([noPrefix.code, noPrefix.message]).toEqual(['STORAGE_MISSING', 'no objects under s3://models/absent/sd/; check the bucket and prefix in STORAGE_URI']);
    // KServe's storage initializer unpacks an archive a storageUri names; this runtime reads the files, and says so.
    const archive = await rejection(resolveModel('s3://models/exports/sd15.tar.gz', { cfg: cfgFor(cache), log }));
    expect([archive.code, archive.message]).toEqual(['STORAGE_MISSING', expect.stringMatching(
      /^no objects under s3:\/\/models\/exports\/sd15\.tar\.gz\/: STORAGE_URI names an archive \(sd15\.tar\.gz\), which KServe's storage initializer unpacks and this runtime does not; upload the exported folder's files/)]);

    const saved = { ...process.env };
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: 'WRONGKEY', AWS_SECRET_ACCESS_KEY: 'sekrit-value-123' });
    try {
      const lists = proxy.stats.lists;
      const denied = await rejection(resolveModel('s3://models/big', { cfg: cfgFor(cache), log }));
      expect(denied.code).toBe('STORAGE_DENIED');
      expect(denied.message).toMatch(/InvalidAccessKeyId.*AWS_ACCESS_KEY_ID/);
      expect(denied.message).not.toMatch(/sekrit|WRONGKEY/);
      expect(proxy.stats.lists - lists).toBe(1);
    } finally {
      process.env.AWS_ACCESS_KEY_ID = saved.AWS_ACCESS_KEY_ID;
      process.env.AWS_SECRET_ACCESS_KEY = saved.AWS_SECRET_ACCESS_KEY;
    }

    proxy.faults = { deny: true };
    const forbidden = await rejection(resolveModel('s3://models/big', { cfg: cfgFor(cache), log }));
    expect([forbidden.code, forbidden.message]).toEqual(['STORAGE_DENIED', expect.stringMatching(/access denied to list s3:\/\/models\/big\/ \(AccessDenied\)/)]);
    expect(await fsp.readdir(cache)).toEqual([]);
  });

  it('SSE-KMS: GETs refused 400 KMS.ThrottlingException (KMS throttled) are retried; a key that cannot decrypt fails STORAGE_DENIED naming the key', async () => {
    // S3 answers a GET of an SSE-KMS object whose decrypt KMS throttles 400 KMS.ThrottlingException: every ranged GET is
    // a kms:Decrypt (without an S3 Bucket Key), so replicas filling a cold cache together meet it.
    const prefix = `kms-${client}/`;
    const files = { 'a.bin': detBytes(200_000, 51) };
    await seed(prefix, files);
    proxy.faults = { failGets: { count: 3, status: 400, code: 'KMS.ThrottlingException' } };
    const sdkGets = proxy.stats.sdkGets;
    const r = await resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(await newCache()), log });
    await expectSame(r.dir, files);
    expect(proxy.faults.failGets!.count).toBe(0);
    // Not taken for the SDK-free transport's own doing (a 400 may be): the same transport retries it.
    expect(proxy.stats.sdkGets - sdkGets).toBe(client === 'sdk' ? 4 : 0);

    for (const code of ['KMS.DisabledException', 'KMS.NotFoundException']) {
      proxy.faults = { failGets: { count: 1_000, status: 400, code } };
      const cache = await newCache();
      const gets = proxy.stats.gets;
      const err = await rejection(resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(cache), log }));
      expect([err.code, err.message]).toEqual(['STORAGE_DENIED', `access denied to read s3://models/${prefix}a.bin (${code}): the object is encrypted with SSE-KMS `
        + 'and its KMS key refused to decrypt it; the key must exist, be enabled, and allow kms:Decrypt to these credentials (key policy or IAM)']);
      expect(err.message).not.toContain('echoed-secret');
      // Never retried: a key disabled stays so for every range.
      expect(proxy.stats.gets - gets).toBeLessThanOrEqual(4);
      const [entry] = (await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'));
      expect(existsSync(path.join(cache, entry!, '.complete.json'))).toBe(false);
    }
    // A missing kms:Decrypt permission: AWS answers the GET a plain 403 AccessDenied, though the LIST was allowed.
    proxy.faults = { failGets: { count: 1_000, status: 403, code: 'AccessDenied' } };
    const denied = await rejection(resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(await newCache()), log }));
    expect([denied.code, denied.message]).toEqual(['STORAGE_DENIED', `access denied to read s3://models/${prefix}a.bin (AccessDenied); `
      + 'check the credentials and the bucket policy, and for an object encrypted with SSE-KMS kms:Decrypt on its key']);
  });

  it('SSE-C: an object stored with a customer-provided key fails the fill STORAGE_SSE_C, naming it and what to do; nothing is committed', async () => {
    const prefix = `sse-c-${client}/`;
    await seed(prefix, { 'a.bin': detBytes(200_000, 52), 'model_index.json': Buffer.from('{}') });
    proxy.faults = { customerKey: new RegExp(`^${prefix}a\\.bin$`) };
    const [sdkGets, refused] = [proxy.stats.sdkGets, proxy.stats.refusals.InvalidRequest ?? 0];
    const cache = await newCache();
    const err = await rejection(resolveModel(`s3://models/${prefix}`, { cfg: cfgFor(cache), log }));
    // Before: STORAGE_MISSING "cannot read s3://…/a.bin: InvalidRequest", as if the object were not there.
    expect([err.code, err.message]).toEqual(['STORAGE_SSE_C', `cannot read s3://models/${prefix}a.bin: the object is encrypted with a customer-provided key (SSE-C; `
      + 'S3 answered InvalidRequest); this runtime does not read SSE-C objects (it is given no customer key); store it with SSE-S3 or SSE-KMS instead, '
      + `e.g. aws s3 cp s3://models/${prefix}a.bin s3://models/${prefix}a.bin --sse-c-copy-source AES256 --sse-c-copy-source-key fileb://<key file> --sse aws:kms`]);
    // Never retried (one GET per range at most: 4 of 64 KiB), and not taken for the SDK-free transport's own doing: no
    // second fetch through the SDK.
    expect((proxy.stats.refusals.InvalidRequest ?? 0) - refused).toBeLessThanOrEqual(4);
    if (client === 'lite') expect(proxy.stats.sdkGets - sdkGets).toBe(0);
    const [entry] = (await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'));
    expect(existsSync(path.join(cache, entry!, '.complete.json'))).toBe(false);
  });

  it('retries a LIST that S3 answers 503 or 500, after a backoff; one that keeps failing gives up after S3_MAX_ATTEMPTS tries', async () => {
    await seed('listed/', { 'a.bin': detBytes(5_000, 41) });
    proxy.faults = { failLists: { count: 2, status: 503, code: 'SlowDown' } };
    let lists = proxy.stats.lists;
    const r = await resolveModel('s3://models/listed', { cfg: cfgFor(await newCache(), { S3_MAX_ATTEMPTS: '3' }), log });
    expect(r).toMatchObject({ fromCache: false, files: 1 });
    // Two refused, the third answered; then the listing after the download.
    expect(proxy.stats.lists - lists).toBe(4);
    // The backoff waits at least 20 ms (Date.now() rounds each stamp down).
    const at = proxy.stats.listAt.slice(lists, lists + 3);
    expect([at[1]! - at[0]!, at[2]! - at[1]!].every((gap) => gap >= 19), String(at)).toBe(true);

    proxy.faults = { failLists: { count: 1_000, status: 500, code: 'InternalError' } };
    lists = proxy.stats.lists;
    const err = await rejection(resolveModel('s3://models/listed', { cfg: cfgFor(await newCache(), { S3_MAX_ATTEMPTS: '3' }), log }));
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', 'cannot list (3 attempts) s3://models/listed/: InternalError (gave up after retries)']);
    expect(proxy.stats.lists - lists).toBe(3);
    const one = await rejection(resolveModel('s3://models/listed', { cfg: cfgFor(await newCache(), { S3_MAX_ATTEMPTS: '1' }), log }));
    expect(one.message).toMatch(/^cannot list \(1 attempt\) s3:\/\/models\/listed\/: InternalError/);
  });

  it('the ETag check of a committed entry: a LIST left unanswered is tried once more, then the entry is served as is', async () => {
    await seed('held/', { 'a.bin': detBytes(5_000, 42) });
    const cache = await newCache();
    await resolveModel('s3://models/held', { cfg: cfgFor(cache), log });
    let answer!: () => void;
    proxy.faults = { holdLists: new Promise<void>((r) => (answer = r)) };
    const lists = proxy.stats.lists;
    try {
      const hit = await resolveModel('s3://models/held', { cfg: cfgFor(cache), log, hitCheckTimeoutMs: 200 });
      expect(hit).toMatchObject({ fromCache: true, stale: true });
      expect(proxy.stats.lists - lists).toBe(2);
    } finally {
      answer();
    }
  });

  it('an abort between LIST retries ends the fetch as cancelled, with no LIST after it', async () => {
    await seed('listed/', { 'a.bin': detBytes(5_000, 41) });
    const cache = await newCache();
    proxy.faults = { failLists: { count: 1_000, status: 503, code: 'SlowDown' } };
    const lists = proxy.stats.lists;
    const ac = new AbortController();
    const p = rejection(resolveModel('s3://models/listed', { cfg: cfgFor(cache, { S3_MAX_ATTEMPTS: '100' }), log, signal: ac.signal }));
    await until(() => proxy.stats.lists - lists >= 3);
    ac.abort();
    const atAbort = proxy.stats.lists;
    const err = await p;
    expect([err.code, err.message]).toEqual(['CANCELLED', 'model fetch of s3://models/listed/ cancelled; the cache entry stays uncommitted and resumes next time']);
    expect(proxy.stats.lists).toBe(atAbort);
    expect((await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'))).toEqual([]);
  });

  it('a LIST S3 never answers: each try is cut after S3_STALL_TIMEOUT_S of silence and tried again, then STORAGE_TRANSIENT naming the bound; an abort while one waits is CANCELLED', async () => {
    await seed('listed/', { 'a.bin': detBytes(5_000, 41) });
    let answer!: () => void;
    proxy.faults = { holdLists: new Promise<void>((r) => (answer = r)) };
    const lists = proxy.stats.lists;
    const fill = async (extra: { signal?: AbortSignal; listTimeoutMs?: number }, env: Record<string, string> = {}) =>
      rejection(resolveModel('s3://models/listed', { cfg: cfgFor(await newCache(), { S3_MAX_ATTEMPTS: '3', ...env }), log, ...extra }));
    const silent = 'cannot list s3://models/listed/: S3 sent nothing for 0.3 s (S3_STALL_TIMEOUT_S) on';
    const hint = '; check the link to S3, or raise S3_STALL_TIMEOUT_S for a store slow to answer a LIST';
    try {
      // The 60 s cap of each try is far off: the silence bound cuts them. Before: each try waited its 60 s.
      let err = await fill({}, { S3_STALL_TIMEOUT_S: '0.3' });
      expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', `${silent} each of its 3 tries${hint}`]);
      expect(proxy.stats.lists - lists).toBe(3);

      // A 500 counts a try (a 503 SlowDown no longer does: storage-throttle.test.ts).
      proxy.faults.failLists = { count: 1, status: 500, code: 'InternalError' };
      err = await fill({}, { S3_STALL_TIMEOUT_S: '0.3' });
      expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', `${silent} 2 of its 3 tries, the last included${hint}`]);
      expect(proxy.stats.lists - lists).toBe(6);

      // A try's own cap below the silence bound (the hit check's 5 s under the default 20 s) cuts it first.
      err = await fill({ listTimeoutMs: 300 });
      expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', 'cannot list s3://models/listed/: S3 did not finish the LIST within 0.3 s on each of its 3 tries']);
      expect(proxy.stats.lists - lists).toBe(9);

      const ac = new AbortController();
      const p = fill({ signal: ac.signal, listTimeoutMs: 60_000 });
      await until(() => proxy.stats.lists - lists >= 10);
      ac.abort();
      err = await p;
      expect([err.code, err.message]).toEqual(['CANCELLED', 'model fetch of s3://models/listed/ cancelled; the cache entry stays uncommitted and resumes next time']);
      expect(proxy.stats.lists - lists).toBe(10);
    } finally {
      answer();
    }
  });

  it('a LIST that keeps sending yet never ends is not silent: each try runs to its own cap, then STORAGE_TRANSIENT naming the cap', async () => {
    await seed('listed/', { 'a.bin': detBytes(5_000, 41) });
    proxy.faults = { trickleLists: { everyMs: 50 } };
    const lists = proxy.stats.lists;
    const err = await rejection(resolveModel('s3://models/listed', {
      cfg: cfgFor(await newCache(), { S3_MAX_ATTEMPTS: '2', S3_STALL_TIMEOUT_S: '0.3' }), log, listTimeoutMs: 1_000,
    }));
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', 'cannot list s3://models/listed/: S3 did not finish the LIST within 1 s on each of its 2 tries']);
    expect(proxy.stats.lists - lists).toBe(2);
  });

  it('the download rate is told from a second of samples, not from the first 200 ms (an ETA of hours in the warm-up\'s line)', async () => {
    // 4 × 100 kB/s: the 3 MB take ~8 s, stopped after 1.6.
    proxy.faults = { bytesPerSecond: 100_000, exactPace: true };
    const ac = new AbortController();
    const seen: Array<[number, number]> = [];
    let first: number | undefined;
    await rejection(resolveModel('s3://models/big', {
      cfg: cfgFor(await newCache(), { S3_MAX_CONCURRENCY: '4' }), log, signal: ac.signal,
      onProgress: (p) => {
        const now = performance.now();
        first ??= now;
        seen.push([now - first, p.bytesPerSecond]);
        if (now - first > 1_600) ac.abort();
      },
    }));
    proxy.faults = {};
    const early = seen.filter(([at]) => at < RATE_WINDOW_MIN_MS - 50);
    expect(early.length).toBeGreaterThan(1);
    expect(early.map(([, rate]) => rate)).toEqual(early.map(() => 0));
    expect(seen.filter(([at]) => at > RATE_WINDOW_MIN_MS + 250).every(([, rate]) => rate > 0)).toBe(true);
  });

  it('an abort mid-download leaves no committed entry, and the next run resumes and completes', async () => {
    const cache = await newCache();
    proxy.faults = { bytesPerSecond: 1_000_000 };
    const ac = new AbortController();
    let ready = 0;
    const err = await rejection(resolveModel('s3://models/big', {
      cfg: cfgFor(cache, { S3_MAX_CONCURRENCY: '4' }), log, signal: ac.signal,
      onFileReady: () => ready++,
      onProgress: (p) => {
        if (p.bytesDone > 600_000) ac.abort();
      },
    }));
    expect(err.code).toBe('CANCELLED');
    const [entry] = (await fsp.readdir(cache)).filter((n) => !n.endsWith('.lock'));
    expect(existsSync(path.join(cache, entry!, '.complete.json'))).toBe(false);
    expect(existsSync(path.join(cache, entry!, 'unet/model.onnx_data'))).toBe(false);
    expect(existsSync(path.join(cache, `${entry}.lock`))).toBe(false);
    proxy.faults = {};
    const before = proxy.stats.bodyBytes;
    const r = await resolveModel('s3://models/big', { cfg: cfgFor(cache), log });
    await expectSame(r.dir, big);
    expect(proxy.stats.bodyBytes - before).toBeLessThan(BIG);
  });
});
