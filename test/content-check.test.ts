import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { newDigest, type Algorithm } from '../src/storage/checksums.js';
import { Hasher, partSizeFrom, type Hashing } from '../src/storage/content-check.js';
import { resolveModel } from '../src/storage/fetch.js';
import { readManifest } from '../src/storage/cache.js';
import { cleanUpS3, detBytes, evenParts, type FaultProxy, multipartEtag, rejection, type S3Server, startModelStore, testConfig } from './helpers/s3.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;

const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
const oneDigest = (alg: Algorithm, b: Buffer) => {
  const d = newDigest(alg);
  d.update(b);
  return d.digest();
};

const BIG = 2 * 1024 * 1024 + 777;
const files: Record<string, Buffer> = {
  'unet/model.onnx_data': detBytes(BIG, 21),
  'unet/model.onnx': detBytes(30_000, 22),
  'model_index.json': Buffer.from('{"_class_name":"StableDiffusionPipeline"}'),
  'empty.txt': Buffer.alloc(0),
};
const PART = 512 * 1024 + 3; // not a power of two: the hasher's part boundaries do not fall on its read blocks

/** A logger whose lines the test reads. */
function recorder() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      for (const l of String(chunk).split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { log: createLogger('info', 'test', stream), lines, line: (msg: string | RegExp) => lines.find((l) => (typeof msg === 'string' ? l.msg === msg : msg.test(String(l.msg)))) };
}

async function expectSame(dir: string): Promise<void> {
  for (const [rel, body] of Object.entries(files)) expect((await fsp.readFile(path.join(dir, rel))).equals(body), rel).toBe(true);
}

const newCache = () => fsp.mkdtemp(path.join(tmp, 'cache-'));

beforeAll(async () => {
  ({ s3, proxy, tmp } = await startModelStore('content-check-', files));
});

cleanUpS3(() => ({ s3, proxy, tmp }));

describe('the hashing', () => {
  it('takes a part size from a HEAD of part 1 only where it fits the object', () => {
    expect(partSizeFrom({ contentLength: 8, partsCount: 3, etag: undefined }, 20, 3)).toBe(8);
    expect(partSizeFrom({ contentLength: 10, partsCount: 2, etag: undefined }, 20, 2)).toBe(10);
    // The store ignored partNumber and described the whole object.
    expect(partSizeFrom({ contentLength: 20, partsCount: undefined, etag: undefined }, 20, 3)).toBeUndefined();
    expect(partSizeFrom({ contentLength: 5, partsCount: 3, etag: undefined }, 20, 3)).toBeUndefined(); // 3 × 5 < 20
    expect(partSizeFrom({ contentLength: 10, partsCount: 3, etag: undefined }, 20, 3)).toBeUndefined(); // 2 × 10 = 20: two parts
    expect(partSizeFrom({ contentLength: 20, partsCount: 1, etag: undefined }, 20, 1)).toBe(20);
  });

  it('hashes a file as it is written, in any order of writes: a whole object by its prefix or in CRC pieces, a multipart one part by part', async () => {
    const body = detBytes(3 * 1024 * 1024 + 5, 3);
    const file = path.join(tmp, 'hash-me');
    const fh = await fsp.open(file, 'w+');
    await fh.truncate(body.length);
    // Two threads, so parts go to both; CRC pieces that do not fall on the writes' blocks either.
    const hasher = new Hasher(2, 700_001);
    let spans: Array<[number, number]> = [];
    const add = (s: number, e: number) => {
      spans = [...spans, [s, e] as [number, number]].sort((x, y) => x[0] - y[0])
        .reduce<Array<[number, number]>>((out, sp) => {
          const last = out.at(-1);
          if (last && sp[0] <= last[1]) last[1] = Math.max(last[1], sp[1]);
          else out.push([sp[0], sp[1]]);
          return out;
        }, []);
    };
    const write = async (hs: Hashing[], at: number, n: number) => {
      await fh.write(body, at, n, at);
      add(at, at + n);
      for (const h of hs) h.written(at, at + n);
      // Time for the threads to read what they were told of: one that read past it would hash zeros.
      await new Promise((r) => setTimeout(r, 3));
    };
    const block = 300_001;
    // What each plan must give: the digest in one pass, or the digest of the parts' digests.
    const plans: Array<{ alg: Algorithm; partSize: number }> = [
      { alg: 'md5', partSize: 0 }, { alg: 'md5', partSize: PART }, { alg: 'crc64nvme', partSize: 0 }, { alg: 'crc32', partSize: 0 },
      { alg: 'crc32c', partSize: 0 }, { alg: 'sha256', partSize: 0 }, { alg: 'crc32', partSize: PART }, { alg: 'sha1', partSize: PART },
    ];
    const want = plans.map(({ alg, partSize }) => {
      if (partSize === 0) return oneDigest(alg, body);
      return oneDigest(alg, Buffer.concat(evenParts(body.length, partSize).map((_, k) => oneDigest(alg, body.subarray(k * partSize, (k + 1) * partSize)))));
    });
    expect(want[1]!.toString('hex')).toBe(multipartEtag(body, PART).slice(1, -3));
    for (const order of ['back to front', 'front to back', 'odd blocks first'] as const) {
      await fh.truncate(0);
      await fh.truncate(body.length);
      spans = [];
      const hs = plans.map((plan) => hasher.open(fh.fd, body.length, plan, () => spans));
      const starts = Array.from({ length: Math.ceil(body.length / block) }, (_, i) => i * block);
      const seq = order === 'back to front' ? [...starts].reverse() : order === 'front to back' ? starts : [...starts.filter((_, i) => i % 2), ...starts.filter((_, i) => !(i % 2))];
      for (const at of seq) await write(hs, at, Math.min(block, body.length - at));
      for (const [k, h] of hs.entries()) expect((await h.digest()).toString('hex'), `${order}: ${JSON.stringify(plans[k])}`).toBe(want[k]!.toString('hex'));
    }
    await fh.close();
    // An empty file, and a one-part upload (the MD5 of one MD5).
    for (const [body1, partSize] of [[Buffer.alloc(0), 0], [body.subarray(0, 1000), 1000]] as const) {
      await fsp.writeFile(file, body1);
      const f1 = await fsp.open(file, 'r');
      const d = (await hasher.open(f1.fd, body1.length, { alg: 'md5', partSize }, () => [[0, body1.length]]).digest()).toString('hex');
      expect(partSize === 0 ? d : `"${d}-1"`).toBe(partSize === 0 ? md5(body1) : multipartEtag(body1, partSize));
      await f1.close();
    }
    await hasher.close();
    // Closed: a new file's digest is refused, never thrown at the writer that told of its bytes.
    const late = hasher.open(0, 10, { alg: 'md5', partSize: 4 }, () => [[0, 10]]);
    late.written(0, 10);
    await expect(late.digest()).rejects.toThrow(/closed/);
  });
});

describe.each(['lite', 'sdk'] as const)('the content check of a fill (S3_TRANSPORT=%s)', (transport) => {
  const cfgFor = (cache: string, extra: Record<string, string> = {}) =>
    testConfig(proxy.endpoint, cache, { S3_PART_SIZE: '65536', S3_MAX_CONCURRENCY: '8', S3_TRANSPORT: transport, ...extra });
  const multipart = (): Record<string, { etag: string; partSizes?: number[] }> => Object.fromEntries(Object.entries(files).filter(([, b]) => b.length > PART)
    .map(([rel, b]) => [`sd/${rel}`, { etag: multipartEtag(b, PART), partSizes: evenParts(b.length, PART) }]));
  const ALL_BUT_EMPTY = { contentChecked: 3, contentNotChecked: { empty: 1 } };

  it('checks every file whose ETag is an MD5, and says so when it commits', async () => {
    const r = recorder();
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log });
    await expectSame(res.dir);
    // The empty file has nothing to check.
    expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
  });

  it('fetches a file whose bytes were damaged on the way again, and commits only the right bytes', async () => {
    const r = recorder();
    const before = proxy.stats.bodyBytes;
    proxy.faults = { corrupt: { keys: /onnx_data$/, count: 1 } };
    const damaged: string[] = [];
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log, onDamaged: (rel) => damaged.push(rel) });
    await expectSame(res.dir);
    expect(damaged).toEqual(['unet/model.onnx_data']);
    expect(r.line(/differs from its ETag; fetching the file again/)).toMatchObject({ level: 'warn', file: 'unet/model.onnx_data' });
    expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
    // The damaged file once more; the others were not fetched again.
    const sum = Object.values(files).reduce((n, b) => n + b.length, 0);
    expect(proxy.stats.bodyBytes - before).toBeGreaterThan(sum + BIG - 1);
    expect(proxy.stats.bodyBytes - before).toBeLessThan(sum + BIG + 8 * 65_536);
  });

  it('two files damaged in one round are both fetched again', async () => {
    const r = recorder();
    // Each is one range: the first GET of each is damaged. Per key: a count shared by both could fall twice on one
    // file when a loaded machine answers the other's GET after the round was stopped (then STORAGE_CORRUPT, rightly).
    proxy.faults = { corrupt: { keys: /(model\.onnx|model_index\.json)$/, count: 1, perKey: true } };
    const before = proxy.stats.damaged;
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log });
    await expectSame(res.dir);
    expect(proxy.stats.damaged - before).toBe(2);
    expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
  });

  it('fails with STORAGE_CORRUPT, naming the object and committing nothing, when every download is damaged differently', async () => {
    const cache = await newCache();
    // The 30 kB graph is one range: both of its downloads are damaged, each at another byte.
    proxy.faults = { corrupt: { keys: /model\.onnx$/, count: 2 } };
    const damaged: string[] = [];
    const err = await rejection(resolveModel('s3://models/sd', { cfg: cfgFor(cache), log: recorder().log, onDamaged: (rel) => damaged.push(rel) }));
    expect(damaged).toEqual(['unet/model.onnx', 'unet/model.onnx']);
    expect(err.code).toBe('STORAGE_CORRUPT');
    expect(err.message).toMatch(/^s3:\/\/models\/sd\/unet\/model\.onnx: the content differed from the object's ETag \(MD5 [0-9a-f]{32}\) in two downloads/);
    expect(err.message).not.toContain(cache);
    const entries = (await fsp.readdir(cache)).filter((x) => !x.endsWith('.lock'));
    for (const e of entries) expect(await readManifest(path.join(cache, e))).toBeUndefined();
  });

  it('with S3_VERIFY_CONTENT=0 the damage goes through: the check is what catches it', async () => {
    const r = recorder();
    proxy.faults = { corrupt: { keys: /model_index\.json$/, count: 1 } };
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache(), { S3_VERIFY_CONTENT: '0' }), log: r.log });
    const got = await fsp.readFile(path.join(res.dir, 'model_index.json'));
    const want = files['model_index.json']!;
    expect(got.length).toBe(want.length);
    expect([...got].filter((x, i) => x !== want[i]).length).toBe(1);
    expect(r.line('model cached')).toMatchObject({ contentCheck: 'off' });
  });

  it('checks multipart ETags by the part size a HEAD of part 1 gives, and catches damage in them', async () => {
    const r = recorder();
    const heads = proxy.stats.partHeads;
    proxy.faults = { objects: multipart(), corrupt: { keys: /onnx_data$/, count: 1 } };
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log });
    await expectSame(res.dir);
    expect(r.line(/differs from its ETag/)).toMatchObject({ file: 'unet/model.onnx_data', against: 'ETag', expected: `MD5 ${multipartEtag(files['unet/model.onnx_data']!, PART).slice(1, -1)}` });
    expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
    // Its first and last parts, for each of the big file's two downloads; nothing else is multipart.
    expect(proxy.stats.partHeads - heads).toBe(4);
  });

  it('leaves a multipart file unchecked where the store gives no part size, and objects encrypted with KMS', async () => {
    const r = recorder();
    proxy.faults = { objects: Object.fromEntries(Object.entries(multipart()).map(([k, o]) => [k, { etag: o.etag }])) };
    await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log })).dir);
    expect(r.line('model cached')).toMatchObject({ contentChecked: 2, contentNotChecked: { 'the store gave no part size (HEAD partNumber=1); the store gave no checksum': 1, empty: 1 } });

    // SSE-KMS: the ETag is not the content's MD5 (here: no MD5 of anything), and nothing is fetched twice for it.
    const k = recorder();
    const before = proxy.stats.bodyBytes;
    proxy.faults = { objects: { 'sd/model_index.json': { etag: `"${'0'.repeat(32)}"` } }, addHeaders: { 'x-amz-server-side-encryption': 'aws:kms' } };
    await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: k.log })).dir);
    expect(k.line('model cached')).toMatchObject({ contentChecked: 0, contentNotChecked: { 'encrypted (aws:kms): its ETag is not an MD5; the store gave no checksum': 3, empty: 1 } });
    expect(proxy.stats.bodyBytes - before).toBe(Object.values(files).reduce((n, b) => n + b.length, 0));
  });

  it('multipart uploads whose parts are not all of one size: a last part that says so is not checked; inner ones are served after two downloads agree', async () => {
    const big = files['unet/model.onnx_data']!;
    const even = evenParts(big.length, PART);
    // The last part is not what parts of PART bytes leave: seen from the HEADs, nothing fetched twice.
    const lastOff = [...even.slice(0, -2), even.at(-2)! - 1000, even.at(-1)! + 1000];
    const r = recorder();
    const before = proxy.stats.bodyBytes;
    proxy.faults = { objects: { 'sd/unet/model.onnx_data': { etag: multipartEtag(big, lastOff), partSizes: lastOff } } };
    await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log })).dir);
    expect(r.line('model cached')).toMatchObject({ contentChecked: 2, contentNotChecked: { 'its parts are not all of one size; the store gave no checksum': 1, empty: 1 } });
    expect(proxy.stats.bodyBytes - before).toBe(Object.values(files).reduce((n, b) => n + b.length, 0));

    // Inner parts of other sizes, the first and last as even parts would be: the ETag differs from the digest of even
    // parts, the file is fetched again, both downloads agree, and it is served unchecked with a warning.
    const innerOff = [even[0]!, even[1]! - 1000, even[2]! + 1000, ...even.slice(3)];
    const w = recorder();
    proxy.faults = { objects: { 'sd/unet/model.onnx_data': { etag: multipartEtag(big, innerOff), partSizes: innerOff } } };
    const damaged: string[] = [];
    await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: w.log, onDamaged: (rel) => damaged.push(rel) })).dir);
    // Intact data: not counted as damage (model_download_damaged_files_total), though it was fetched twice.
    expect(damaged).toEqual([]);
    expect(w.line(/agree with each other but not with its multipart ETag/)).toMatchObject({ level: 'warn', file: 'unet/model.onnx_data' });
    expect(w.line('model cached')).toMatchObject({ contentChecked: 2, contentNotChecked: { 'its parts are not all of one size': 1, empty: 1 } });
  });

  it('content that differs from its ETag the same way twice is refused too, with the way to serve it unchecked', async () => {
    const cache = await newCache();
    proxy.faults = { objects: { 'sd/unet/model.onnx': { etag: `"${'a'.repeat(32)}"` } } };
    const damaged: string[] = [];
    const err = await rejection(resolveModel('s3://models/sd', { cfg: cfgFor(cache), log: recorder().log, onDamaged: (rel) => damaged.push(rel) }));
    // Nothing was damaged on the way: the store serves this content every time.
    expect(damaged).toEqual([]);
    expect([err.code, err.message]).toEqual(['STORAGE_CORRUPT', expect.stringMatching(
      /^s3:\/\/models\/sd\/unet\/model\.onnx: two downloads agree with each other but not with the object's ETag \(MD5 a{32}\).*S3_VERIFY_CONTENT=0/)]);
    // With the check off, the same store serves.
    proxy.faults = { objects: { 'sd/unet/model.onnx': { etag: `"${'a'.repeat(32)}"` } } };
    await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(cache, { S3_VERIFY_CONTENT: '0' }), log: recorder().log })).dir);
  });

  describe('by the checksum a HEAD with checksum mode gives, where the ETag is no MD5', () => {
    const KMS = { 'x-amz-server-side-encryption': 'aws:kms' };
    const b64 = (alg: Algorithm, b: Buffer) => oneDigest(alg, b).toString('base64');
    const nonEmpty = () => Object.entries(files).filter(([, b]) => b.length > 0);
    /** Every file's full-object CRC64NVME, the checksum S3 keeps for objects uploaded without one. */
    const fullCrc = () => Object.fromEntries(nonEmpty().map(([rel, b]) => [`sd/${rel}`, { 'x-amz-checksum-crc64nvme': b64('crc64nvme', b), 'x-amz-checksum-type': 'FULL_OBJECT' }]));
    /** ETags as KMS makes them: 32 hex digits, no MD5 of the content. */
    const kmsEtags = () => Object.fromEntries(Object.keys(files).map((rel, i) => [`sd/${rel}`, { etag: `"${'0123456789'[i]!.repeat(32)}"` }]));
    const total = Object.values(files).reduce((n, b) => n + b.length, 0);

    /**
     * A cache where a first run on a KMS bucket received every byte and stopped before any rename: its checksum HEADs
     * went unanswered (10 s stall timeout, so a stop that never comes fails the run rather than the test's time).
     */
    const leftWhole = async () => {
      const cache = await newCache();
      const ac = new AbortController();
      proxy.faults = { objects: kmsEtags(), addHeaders: KMS, holdChecksumHeads: true };
      let got = 0;
      await rejection(resolveModel('s3://models/sd', {
        cfg: cfgFor(cache, { S3_STALL_TIMEOUT_S: '10' }), log: recorder().log, signal: ac.signal,
        onDownloaded: (n) => {
          got += n;
          if (got >= total && !ac.signal.aborted) setTimeout(() => ac.abort(), 50);
        },
      }));
      return cache;
    };

    it('checks objects encrypted with KMS by their CRC64NVME, and catches damage in them', async () => {
      const r = recorder();
      const [heads, before] = [proxy.stats.checksumHeads, proxy.stats.bodyBytes];
      proxy.faults = { objects: kmsEtags(), addHeaders: KMS, checksums: fullCrc(), corrupt: { keys: /onnx_data$/, count: 1 } };
      const damaged: string[] = [];
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log, onDamaged: (rel) => damaged.push(rel) })).dir);
      expect(r.line(/differs from its checksum; fetching the file again/)).toMatchObject({
        level: 'warn', file: 'unet/model.onnx_data', against: 'checksum', expected: `CRC64NVME ${b64('crc64nvme', files['unet/model.onnx_data']!)}`,
      });
      expect(damaged).toEqual(['unet/model.onnx_data']);
      expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
      // One HEAD per file and download: the three files, then the damaged one again.
      expect(proxy.stats.checksumHeads - heads).toBe(4);
      expect(proxy.stats.bodyBytes - before).toBe(total + BIG);
    });

    it('content damaged on the way twice is STORAGE_CORRUPT, naming the checksum', async () => {
      proxy.faults = { objects: kmsEtags(), addHeaders: KMS, checksums: fullCrc(), corrupt: { keys: /model\.onnx$/, count: 2 } };
      const err = await rejection(resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: recorder().log }));
      expect([err.code, err.message]).toEqual(['STORAGE_CORRUPT', expect.stringMatching(
        /^s3:\/\/models\/sd\/unet\/model\.onnx: the content differed from the object's checksum \(CRC64NVME [A-Za-z0-9+/]{11}=\) in two downloads, and differently each time/)]);
    });

    it('ETags of no MD5 (a directory bucket\'s, a store\'s own): full-object CRC32C, and a multipart upload\'s COMPOSITE CRC32 by its part size', async () => {
      const big = files['unet/model.onnx_data']!;
      const sizes = evenParts(big.length, PART);
      const composite = b64('crc32', Buffer.concat(sizes.map((n, k) => oneDigest('crc32', big.subarray(k * PART, k * PART + n)))));
      const checksums: Record<string, Record<string, string>> = Object.fromEntries(nonEmpty().map(([rel, b]) => [`sd/${rel}`, rel === 'unet/model.onnx_data'
        ? { 'x-amz-checksum-crc32': `${composite}-${sizes.length}`, 'x-amz-checksum-type': 'COMPOSITE' }
        : { 'x-amz-checksum-crc32c': b64('crc32c', b), 'x-amz-checksum-type': 'FULL_OBJECT' }] as [string, Record<string, string>]));
      const objects = Object.fromEntries(Object.keys(files).map((rel, i) => [`sd/${rel}`, rel === 'unet/model.onnx_data'
        ? { etag: `"opaque-${i}"`, partSizes: sizes } : { etag: `"opaque-${i}"` }]));
      const r = recorder();
      const parts = proxy.stats.partHeads;
      proxy.faults = { objects, checksums, corrupt: { keys: /onnx_data$/, count: 1 } };
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log })).dir);
      expect(r.line(/differs from its checksum/)).toMatchObject({ file: 'unet/model.onnx_data', expected: `CRC32 ${composite}-${sizes.length}` });
      expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
      // Its first and last parts, for each of its two downloads.
      expect(proxy.stats.partHeads - parts).toBe(4);

      // A store that keeps no checksum: nothing to check these against.
      const n = recorder();
      proxy.faults = { objects };
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: n.log })).dir);
      expect(n.line('model cached')).toMatchObject({ contentChecked: 0, contentNotChecked: { 'its ETag is not an MD5; the store gave no checksum': 3, empty: 1 } });
    });

    it('a multipart upload encrypted with KMS: its COMPOSITE checksum by the part sizes its HEADs gave, each asked once', async () => {
      const big = files['unet/model.onnx_data']!;
      const sizes = evenParts(big.length, PART);
      const composite = b64('sha256', Buffer.concat(sizes.map((n, k) => oneDigest('sha256', big.subarray(k * PART, k * PART + n)))));
      const r = recorder();
      const [parts, heads] = [proxy.stats.partHeads, proxy.stats.checksumHeads];
      proxy.faults = {
        // A KMS multipart ETag: `<32 hex>-<parts>`, no MD5 of anything.
        objects: { 'sd/unet/model.onnx_data': { etag: `"${'7'.repeat(32)}-${sizes.length}"`, partSizes: sizes } },
        addHeaders: KMS,
        checksums: { ...fullCrc(), 'sd/unet/model.onnx_data': { 'x-amz-checksum-sha256': `${composite}-${sizes.length}`, 'x-amz-checksum-type': 'COMPOSITE' } },
      };
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache()), log: r.log })).dir);
      expect(r.line('model cached')).toMatchObject(ALL_BUT_EMPTY);
      expect([proxy.stats.partHeads - parts, proxy.stats.checksumHeads - heads]).toEqual([2, 3]);
    });

    it('a store that leaves HEADs for checksums unanswered costs one file\'s two tries, not every file\'s', async () => {
      // One range at a time: each file is opened after the one before it is finished.
      const r = recorder();
      const heads = proxy.stats.checksumHeads;
      proxy.faults = { objects: kmsEtags(), addHeaders: KMS, holdChecksumHeads: true };
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(await newCache(), { S3_MAX_CONCURRENCY: '1', S3_STALL_TIMEOUT_S: '0.5' }), log: r.log })).dir);
      expect(proxy.stats.checksumHeads - heads).toBe(2);
      expect(r.line(/did not answer a HEAD for an object's checksum/)).toMatchObject({ level: 'warn', file: 'model_index.json', stallTimeoutS: 0.5 });
      expect(r.line('model cached')).toMatchObject({
        contentChecked: 0, contentNotChecked: { 'encrypted (aws:kms): its ETag is not an MD5; the store did not answer a HEAD for its checksum': 3, empty: 1 },
      });
    });

    it('a file an earlier run left whole on disk, encrypted with KMS, is checked by its checksum rather than fetched again', async () => {
      const cache = await leftWhole();
      const [entry] = (await fsp.readdir(cache)).filter((x) => !x.endsWith('.lock'));
      expect(await fsp.stat(path.join(cache, entry!, 'unet/model.onnx_data.partial'))).toBeDefined();
      const r = recorder();
      const before = proxy.stats.bodyBytes;
      proxy.faults = { objects: kmsEtags(), addHeaders: KMS, checksums: fullCrc() };
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(cache), log: r.log })).dir);
      expect(proxy.stats.bodyBytes - before).toBe(0);
      expect(r.line(/differs from its/)).toBeUndefined();
      // The empty file was committed by the first run.
      expect(r.line('model cached')).toMatchObject({ contentChecked: 3 });
      expect(r.line('model cached')).not.toHaveProperty('contentNotChecked');
    });

    it('files an earlier run left whole, whose checksum HEADs go unanswered, are all fetched again in one round, not one a round', async () => {
      const cache = await leftWhole();
      // No HEAD says they are encrypted: each differs from its ETag, and is fetched again. With four such files the
      // rounds ran out, one file a round, as STORAGE_CORRUPT.
      const r = recorder();
      const before = proxy.stats.bodyBytes;
      let restarts = 0;
      await expectSame((await resolveModel('s3://models/sd', { cfg: cfgFor(cache, { S3_STALL_TIMEOUT_S: '0.5' }), log: r.log, onRestart: () => restarts++ })).dir);
      expect(restarts).toBe(1);
      expect(proxy.stats.bodyBytes - before).toBe(total);
      expect(r.line('model cached')).toMatchObject({
        contentChecked: 0, contentNotChecked: { 'encrypted (aws:kms): its ETag is not an MD5; the store did not answer a HEAD for its checksum': 3 },
      });
    });
  });

  it('hashes what an earlier run left on disk: damage in a resumed partial is caught and fetched again', async () => {
    const cache = await newCache();
    const ac = new AbortController();
    // Slow the big file down and stop the fill once about half of it is on disk.
    proxy.faults = { bytesPerSecond: 400_000, exactPace: true };
    let got = 0;
    await rejection(resolveModel('s3://models/sd', {
      cfg: cfgFor(cache), log: recorder().log, signal: ac.signal,
      onDownloaded: (n) => {
        got += n;
        if (got > BIG / 2) ac.abort();
      },
    }));
    proxy.faults = {};
    const [entry] = (await fsp.readdir(cache)).filter((x) => !x.endsWith('.lock'));
    const partial = path.join(cache, entry!, 'unet/model.onnx_data.partial');
    // Damage the first byte of the partial, which the journal records as written (the first range is done by now).
    const fh = await fsp.open(partial, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, 0);
    await fh.write(Buffer.from([b[0]! ^ 0xff]), 0, 1, 0);
    await fh.close();
    const r = recorder();
    const res = await resolveModel('s3://models/sd', { cfg: cfgFor(cache), log: r.log });
    await expectSame(res.dir);
    expect(r.line(/resuming partly downloaded files/)).toBeDefined();
    expect(r.line(/differs from its ETag; fetching the file again/)).toMatchObject({ file: 'unet/model.onnx_data' });
  });
});
