/**
 * An upload request the store accepts and never answers (a PutObject, UploadPart, CreateMultipartUpload or
 * CompleteMultipartUpload read to its end, then silence): each attempt is cut once nothing has been sent or received for
 * S3_STALL_TIMEOUT_S, and sent again, so the warm-up CLI's push and an output_uri request finish. A store that never
 * answers fails with the stalled request and the bound named. A Complete that S3 keeps alive with whitespace is not cut,
 * however long it takes. A real CLI process and a real server process, s3rver on loopback behind the fault proxy.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { fixtureModel } from './fixtures/index.js';
import { CREDS, detBytes, destroyS3, type FaultProxy, s3Env, type S3Server, startFaultProxy, startS3, unfinishedUploads } from './helpers/s3.js';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';
import { runWarmupCli } from './helpers/warmup-cli.js';
import { multipartEtag, UPLOAD_ATTEMPTS } from '../src/storage/upload-retry.js';

const MiB = 1 << 20;
/** The bound in these tests (S3_STALL_TIMEOUT_S); 20 s by default. */
const STALL_S = 1;
let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
let local: string;
let srv: ServerHandle | undefined;
/** One file of three 5 MiB parts (5, 5, 1 MiB) and one small enough for a single PutObject. */
const FILES: Record<string, Buffer> = { 'a.bin': detBytes(11 * MiB, 21), 'c.json': detBytes(1000, 22) };

beforeAll(async () => {
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'upload-stall-'));
  local = path.join(tmp, 'export');
  await fsp.mkdir(local);
  for (const [f, b] of Object.entries(FILES)) await fsp.writeFile(path.join(local, f), b);
  s3 = await startS3(['models']);
  proxy = await startFaultProxy(s3.port);
});

afterAll(async () => {
  await srv?.stop();
  await proxy?.close();
  if (s3) await destroyS3(s3);
  if (tmp) await fsp.rm(tmp, { recursive: true, force: true });
});

/**
 * The push with S3_STALL_TIMEOUT_S=1, killed if it still runs after `limitMs` (a request left unanswered held it for
 * good). S3_MAX_CONCURRENCY=4: one file at a time, a.bin's three parts in flight together.
 */
function push(prefix: string, limitMs = 30_000, { dir = local, env = {}, args = [] }: { dir?: string; env?: Record<string, string>; args?: string[] } = {}) {
  let kill!: (s: NodeJS.Signals) => void;
  const run = runWarmupCli(['push', ...args, dir, `s3://models/${prefix}`], s3Env(proxy.endpoint, path.join(tmp, 'unused'), {
    S3_MAX_CONCURRENCY: '4', S3_PART_SIZE: String(5 * MiB), S3_STALL_TIMEOUT_S: String(STALL_S), ...env,
  }), (k) => (kill = k));
  const timer = setTimeout(() => kill('SIGKILL'), limitMs);
  return run.finally(() => clearTimeout(timer));
}

const object = async (key: string) => Buffer.from(await (await s3.client.send(new GetObjectCommand({ Bucket: 'models', Key: key }))).Body!.transformToByteArray());
const left = (prefix: string) => Object.values(unfinishedUploads(proxy)).filter((k) => k.startsWith(prefix));
type Command = keyof FaultProxy['stats']['uploads'];
/** Requests of `command` the proxy received, and those it left unanswered (counted over the whole file). */
const sent = (command: Command) => proxy.stats.uploads[command] ?? 0;
const unanswered = (command: Command) => proxy.stats.unanswered[command] ?? 0;

async function expectPushed(prefix: string) {
  for (const [f, b] of Object.entries(FILES)) expect((await object(prefix + f)).equals(b), f).toBe(true);
  expect(left(prefix)).toEqual([]);
}

describe('push', () => {
  it.each([
    ['UploadPart', 'a.bin'], ['CreateMultipartUpload', 'a.bin'], ['CompleteMultipartUpload', 'a.bin'], ['PutObject', 'c.json'],
  ] as const)('a %s of %s left unanswered once: sent again after the bound, and the push succeeds', async (command, file) => {
    const prefix = `sd/once-${command}/`;
    proxy.faults = { abortUploads: true, stallUploads: { commands: [command], keys: new RegExp(`^${prefix}${file.replace('.', '\\.')}$`), count: 1 } };
    const [before, cut] = [sent(command), unanswered(command)];
    const r = await push(prefix);
    // Before: the push never ended (killed here after 30 s, exit null).
    expect(r.code, r.stderr).toBe(0);
    expect(unanswered(command) - cut).toBe(1);
    // The request left unanswered, and once more; one part each for the two others of a.bin. At least: on a loaded
    // machine a live request may stay silent for the 1 s bound too, and go again.
    expect(sent(command) - before).toBeGreaterThanOrEqual({ UploadPart: 4, CreateMultipartUpload: 2, CompleteMultipartUpload: 2, PutObject: 2 }[command]);
    expect(r.ms).toBeGreaterThan(STALL_S * 1000);
    expect(r.ms).toBeLessThan(15_000);
    await expectPushed(prefix);
  }, 60_000);

  it("a Complete the store carried out, whose answer never comes: the retry's NoSuchUpload is taken as done (the object has the parts' ETag)", async () => {
    const prefix = 'sd/complete-kept/';
    const parts = (b: Buffer) => [b.subarray(0, 5 * MiB), b.subarray(5 * MiB, 10 * MiB), b.subarray(10 * MiB)].map((p) => `"${createHash('md5').update(p).digest('hex')}"`);
    proxy.faults = {
      abortUploads: true, stallUploads: { commands: ['CompleteMultipartUpload'], keys: new RegExp(`^${prefix}`), count: 1, forward: true },
      // s3rver gives a completed object the MD5 of its bytes; S3 gives the MD5 of the parts' MD5s with their count.
      objects: { [`${prefix}a.bin`]: { etag: multipartEtag(parts(FILES['a.bin']!))! } },
    };
    const cut = unanswered('CompleteMultipartUpload');
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(unanswered('CompleteMultipartUpload') - cut).toBe(1);
    await expectPushed(prefix);
  }, 60_000);

  it('a CreateMultipartUpload the store carried out, whose answer never comes: the retry creates another, and the first is aborted once the push goes on', async () => {
    const prefix = 'sd/create-kept/';
    proxy.faults = { abortUploads: true, listUploads: true, stallUploads: { commands: ['CreateMultipartUpload'], keys: new RegExp(`^${prefix}a\\.bin$`), count: 1, forward: true } };
    const cut = unanswered('CreateMultipartUpload');
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(unanswered('CreateMultipartUpload') - cut).toBe(1);
    expect(Object.values(proxy.stats.multipart.created).filter((k) => k === `${prefix}a.bin`)).toHaveLength(2);
    // Before: the first upload stayed, with no part, listed until a lifecycle rule removed it.
    await expectPushed(prefix);
    expect(r.stderr).toContain('push: aborted 1 multipart upload(s) of a.bin that CreateMultipartUploads left unanswered made\n');
  }, 60_000);

  it('a store that never answers a part: fails after the bounded attempts, naming the request and the bound, and leaves no upload', async () => {
    const prefix = 'sd/never/';
    proxy.faults = { abortUploads: true, stallUploads: { commands: ['UploadPart'], keys: new RegExp(`^${prefix}a\\.bin$`), count: 1000 } };
    const cut = unanswered('UploadPart');
    const r = await push(prefix, 45_000);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`warmup: STORAGE_STALL: cannot upload s3://models/${prefix}a\\.bin: UploadPart \\(part [123]\\) stalled: nothing sent or received for 1 s \\(S3_STALL_TIMEOUT_S\\) `
      + `on attempt ${UPLOAD_ATTEMPTS} of ${UPLOAD_ATTEMPTS}; check the link to S3, or raise S3_STALL_TIMEOUT_S for a store that answers slowly\\n`));
    // Each of the three parts in flight, UPLOAD_ATTEMPTS times.
    expect(unanswered('UploadPart') - cut).toBe(3 * UPLOAD_ATTEMPTS);
    // 5 attempts of 1 s and the backoff between them (3 s at most), then the aborts.
    expect(r.ms).toBeLessThan(25_000);
    expect(left(prefix)).toEqual([]);
  }, 60_000);

  it("a part refused 403 and the SDK's own abort of its upload left unanswered: the push ends naming the denial, and aborts the upload again", async () => {
    const prefix = 'sd/abort-stalled/';
    proxy.faults = {
      abortUploads: true, stallAborts: { keys: new RegExp(`^${prefix}a\\.bin$`), count: 1 },
      failPuts: { keys: new RegExp(`^${prefix}a\\.bin$`), every: { status: 403, code: 'AccessDenied' } },
    };
    const r = await push(prefix);
    // Before: lib-storage awaits its abort before done() rejects, and the push never ended (killed after 30 s).
    expect(r.code, r.stderr).toBe(1);
    expect(proxy.faults.stallAborts?.count).toBe(0);
    expect(r.stderr).toContain(`warmup: STORAGE_DENIED: access denied to upload s3://models/${prefix}a.bin (AccessDenied)`);
    expect(r.stderr).toContain('push: aborted the unfinished multipart uploads of 1 file(s) (a.bin)\n');
    expect(left(prefix)).toEqual([]);
    expect(r.ms).toBeLessThan(15_000);
  }, 60_000);

  it("the push's own LIST left unanswered once: sent again after the bound, and the push succeeds; never answered: STORAGE_STALL naming it", async () => {
    const prefix = 'sd/list-once/';
    proxy.faults = { stallLists: { count: 1 } };
    const lists = proxy.stats.lists;
    const r = await push(prefix);
    // Before: the push never ended (killed here after 30 s, exit null), its one LIST waiting for good.
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.faults.stallLists?.count).toBe(0);
    expect(proxy.stats.lists - lists).toBeGreaterThanOrEqual(2);
    expect(r.ms).toBeGreaterThan(STALL_S * 1000);
    await expectPushed(prefix);

    proxy.faults = { stallLists: { count: 1000 } };
    const never = await push('sd/list-never/');
    expect(never.code, never.stderr).toBe(1);
    expect(never.stderr).toContain('warmup: STORAGE_STALL: cannot list s3://models/sd/list-never/: ListObjectsV2 stalled: nothing sent or received for 1 s '
      + `(S3_STALL_TIMEOUT_S) on attempt 5 of 5; check the link to S3, or raise S3_STALL_TIMEOUT_S for a store that answers slowly\n`);
    // 5 tries of 1 s and the backoff between them (3 s at most).
    expect(never.ms).toBeLessThan(20_000);
  }, 60_000);

  it('--replace: a DeleteObjects left unanswered once is sent again after the bound, and the stale object is deleted', async () => {
    const prefix = 'sd/replace-stall/';
    await s3.put('models', `${prefix}old.bin`, detBytes(100, 24));
    proxy.faults = { stallUploads: { commands: ['DeleteObjects'], keys: /^$/, count: 1 } };
    const cut = unanswered('DeleteObjects');
    const r = await push(prefix, 30_000, { args: ['--replace'] });
    // Before: the push uploaded everything, then never ended (killed here after 30 s), the stale object still there.
    expect(r.code, r.stderr).toBe(0);
    expect(unanswered('DeleteObjects') - cut).toBe(1);
    expect(sent('DeleteObjects') - cut).toBeGreaterThanOrEqual(2);
    expect(r.stderr).toContain('push: deleted 1 object(s) the export does not have\n');
    await expectPushed(prefix);
    await expect(object(`${prefix}old.bin`)).rejects.toMatchObject({ name: 'NoSuchKey' });
  }, 60_000);

  it('a PutObject the store reads slowly, for longer than the bound, is not cut: sent once', async () => {
    const prefix = 'sd/slow-put/';
    const dir = path.join(tmp, 'slow-put');
    const big = detBytes(16 * MiB, 23);
    await fsp.mkdir(dir, { recursive: true });
    await fsp.writeFile(path.join(dir, 'big.bin'), big);
    // 4 s at 4 MiB/s. The kernel's buffers on loopback hold about 4 MB of it, whose last bytes drain for about 1 s
    // after the CLI wrote them: 3 s is the bound here, not 1.
    proxy.faults = { slowPuts: { keys: new RegExp(`^${prefix}`), bytesPerSecond: 4 * MiB } };
    const before = sent('PutObject');
    const r = await push(prefix, 30_000, { dir, env: { S3_PART_SIZE: String(32 * MiB), S3_STALL_TIMEOUT_S: '3' } });
    expect(r.code, r.stderr).toBe(0);
    expect(sent('PutObject') - before).toBe(1);
    expect(r.ms).toBeGreaterThan(3_500);
    expect((await object(`${prefix}big.bin`)).equals(big)).toBe(true);
  }, 60_000);

  it('a Complete that S3 keeps alive with whitespace for three times the bound is not cut: sent once, and the push succeeds', async () => {
    const prefix = 'sd/slow-complete/';
    proxy.faults = { abortUploads: true, slowCompletes: { count: 1, ms: 3 * STALL_S * 1000, everyMs: 100 } };
    const before = sent('CompleteMultipartUpload');
    const slow = proxy.stats.slowCompletes;
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.stats.slowCompletes - slow).toBe(1);
    expect(sent('CompleteMultipartUpload') - before).toBe(1);
    expect(r.ms).toBeGreaterThan(3 * STALL_S * 1000);
    await expectPushed(prefix);
  }, 60_000);
});

describe('output_uri', () => {
  beforeAll(async () => {
    srv = await startServer({
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: await fixtureModel(), MODEL_CACHE_DIR: path.join(tmp, 'cache'),
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', REQUEST_TIMEOUT_S: '30', S3_STALL_TIMEOUT_S: String(STALL_S),
    }, { ready: true });
  }, 120_000);

  const predict = (seed: number, uri: string) => postJson(`${srv!.url}/v1/models/model:predict`,
    { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed, output_uri: uri }] });

  it('a PUT left unanswered once: answered 200 after the retry, long before REQUEST_TIMEOUT_S', async () => {
    proxy.faults = { stallUploads: { commands: ['PutObject'], keys: /^out\/once\//, count: 1 } };
    const [before, cut] = [sent('PutObject'), unanswered('PutObject')];
    const t0 = performance.now();
    const r = await predict(1, 's3://models/out/once/fox.png');
    const ms = performance.now() - t0;
    // Before: 504 TIMEOUT once REQUEST_TIMEOUT_S (30 s here, 600 by default) had passed.
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect(JSON.stringify(r.json)).toContain('s3://models/out/once/fox.png');
    expect(unanswered('PutObject') - cut).toBe(1);
    // The one left unanswered, and once more; at least, as in the push's: on a loaded machine the live retry may stay
    // silent for the 1 s bound too, and go again.
    expect(sent('PutObject') - before).toBeGreaterThanOrEqual(2);
    expect(ms).toBeLessThan(10_000);
    expect((await object('out/once/fox.png')).subarray(1, 4).toString()).toBe('PNG');
  }, 60_000);

  it('a store that never answers the PUT: 500 STORAGE_STALL naming the request and the bound, after the bounded attempts', async () => {
    proxy.faults = { stallUploads: { commands: ['PutObject'], keys: /^out\/never\//, count: 1000 } };
    const before = sent('PutObject');
    const r = await predict(2, 's3://models/out/never/fox.png');
    expect([r.status, r.json]).toEqual([500, {
      code: 'STORAGE_STALL',
      error: 'output_uri: upload to s3://models/out/never/fox.png failed: PutObject stalled: nothing sent or received for 1 s (S3_STALL_TIMEOUT_S) '
        + `on attempt ${UPLOAD_ATTEMPTS} of ${UPLOAD_ATTEMPTS}; the images were generated but not stored`,
    }]);
    expect(sent('PutObject') - before).toBe(UPLOAD_ATTEMPTS);
  }, 60_000);
});
