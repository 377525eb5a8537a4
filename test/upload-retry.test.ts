/**
 * Uploads ride out a transient S3 error (a 500, a 503 SlowDown, a reset) on one of their requests: the warm-up CLI's
 * push (a real CLI process) and output_uri (the runtime's request client and output store), through the fault proxy in
 * front of a real s3rver on loopback, which counts every PUT. Refusals still fail at once, a store that keeps failing
 * fails after a bounded number of attempts, an upload cancelled mid-retry sends nothing more (test/upload-cancel.test.ts
 * has the server's side), and downloads (an s3:// input image) keep their single attempt.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CreateMultipartUploadCommand, GetObjectCommand } from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import type { EncodedImage } from '../src/runtime/engine.js';
import { createLogger } from '../src/log.js';
import { createImageSource } from '../src/runtime/image-source.js';
import { createOutputStore } from '../src/runtime/output.js';
import { trackUploads } from '../src/storage/multipart.js';
import { createRequestS3 } from '../src/storage/request-s3.js';
import { createS3 } from '../src/storage/s3-sdk.js';
import { multipartEtag, UPLOAD_ATTEMPTS } from '../src/storage/upload-retry.js';
import { CREDS, cleanUpS3, detBytes, type FaultProxy, rejection, s3Env, type S3Server, startS3WithProxy, testConfig, unfinishedUploads } from './helpers/s3.js';
import { startRuntime } from './helpers/runtime.js';
import { postJson, until } from './helpers/server.js';
import { runWarmupCli } from './helpers/warmup-cli.js';

const MiB = 1 << 20;
let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
let local: string;
const saved: Record<string, string | undefined> = {};
/** Two files of three 5 MiB parts (5, 5, 1 MiB) and one small enough for a single PutObject. */
const FILES: Record<string, Buffer> = { 'a.bin': detBytes(11 * MiB, 1), 'b.bin': detBytes(11 * MiB, 2), 'c.json': detBytes(1000, 3) };

const cli = runWarmupCli;

beforeAll(async () => {
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'upload-retry-'));
  local = path.join(tmp, 'export');
  await fsp.mkdir(local);
  for (const [f, b] of Object.entries(FILES)) await fsp.writeFile(path.join(local, f), b);
  ({ s3, proxy } = await startS3WithProxy());
  // The request client (output_uri, input images) takes its credentials from the environment, as in a pod.
  for (const [k, v] of Object.entries(CREDS)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
});

afterAll(() => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

cleanUpS3(() => ({ s3, proxy, tmp }));
beforeEach(() => {
  proxy.stats.puts = 0;
  proxy.stats.putFaults = 0;
});

// S3_MAX_CONCURRENCY=4: one file at a time, its three 5 MiB parts in flight together.
const push = (prefix: string) => cli(['push', local, `s3://models/${prefix}`], s3Env(proxy.endpoint, path.join(tmp, 'unused'), { S3_MAX_CONCURRENCY: '4', S3_PART_SIZE: String(5 * MiB) }));
const object = async (key: string) => Buffer.from(await (await s3.client.send(new GetObjectCommand({ Bucket: 'models', Key: key }))).Body!.transformToByteArray());
const left = (prefix: string) => Object.values(unfinishedUploads(proxy)).filter((k) => k.startsWith(prefix));
const png = (seed: number, bytes = 3000): EncodedImage => {
  const b = detBytes(bytes, seed);
  return { data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, seed, width: 8, height: 8, format: 'png' };
};

describe('push', () => {
  it('two parts answered 500 and one reset, once each: the push succeeds and every object equals its file', async () => {
    const prefix = 'sd/flaky/';
    proxy.faults = { abortUploads: true, failPuts: { keys: new RegExp(`^${prefix}`), at: { 2: { status: 500, code: 'InternalError' }, 5: 'reset', 6: { status: 500, code: 'InternalError' } } } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.stats.putFaults).toBe(3);
    // Three parts of each .bin and c.json's PutObject, each once, and one more for each failure.
    expect(proxy.stats.puts).toBe(3 + 3 + 1 + 3);
    for (const [f, b] of Object.entries(FILES)) expect((await object(prefix + f)).equals(b), f).toBe(true);
    expect(left(prefix)).toEqual([]);
  }, 60_000);

  it('a store that answers every part 500: fails naming the file after the bounded attempts, leaving no upload unfinished', async () => {
    const prefix = 'sd/down/';
    proxy.faults = { abortUploads: true, failPuts: { keys: new RegExp(`^${prefix}a\\.bin$`), every: { status: 500, code: 'InternalError' } } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain(`warmup: STORAGE_TRANSIENT: cannot upload s3://models/${prefix}a.bin: InternalError (gave up after retries)`);
    // Each of the three parts in flight tried UPLOAD_ATTEMPTS times at most. Counted, not timed (a bound of 20 s stood for
    // it): between tries is the fill's full-jitter backoff, whose cap storage-plan.test checks.
    expect(proxy.stats.puts).toBeGreaterThanOrEqual(UPLOAD_ATTEMPTS);
    expect(proxy.stats.puts).toBeLessThanOrEqual(3 * UPLOAD_ATTEMPTS);
    expect(left(prefix)).toEqual([]);
    expect(r.stderr).not.toContain('echoed-secret');
  }, 60_000);

  it('a part refused 403: fails at once (no part sent twice) with the denial named', async () => {
    const prefix = 'sd/denied/';
    proxy.faults = { abortUploads: true, failPuts: { keys: new RegExp(`^${prefix}`), every: { status: 403, code: 'AccessDenied' } } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toContain(`warmup: STORAGE_DENIED: access denied to upload s3://models/${prefix}a.bin (AccessDenied); check the credentials and the bucket policy`);
    expect(proxy.stats.puts).toBeGreaterThanOrEqual(1);
    expect(proxy.stats.puts).toBeLessThanOrEqual(3);
    expect(left(prefix)).toEqual([]);
  }, 60_000);

  it("a part refused 403 and the SDK's own abort of its upload answered 500: the push names the denial, not the abort's error, and aborts the upload again", async () => {
    const prefix = 'sd/denied-abort/';
    proxy.faults = { abortUploads: true, failAborts: { count: 1 }, failPuts: { keys: new RegExp(`^${prefix}a\\.bin$`), every: { status: 403, code: 'AccessDenied' } } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(1);
    expect(proxy.faults.failAborts?.count).toBe(0);
    // Before: lib-storage reports its abort's error in place of the part's, "STORAGE_TRANSIENT: … InternalError (gave up after retries)".
    expect(r.stderr).toContain(`warmup: STORAGE_DENIED: access denied to upload s3://models/${prefix}a.bin (AccessDenied)`);
    expect(r.stderr).toContain('push: aborted the unfinished multipart uploads of 1 file(s) (a.bin)\n');
    expect(left(prefix)).toEqual([]);
  }, 60_000);

  it("a Complete carried out whose answer is lost: the retry's NoSuchUpload is taken as done when the object has the parts' ETag, else the push fails saying so", async () => {
    const prefix = 'sd/lost/';
    // s3rver gives a completed object the MD5 of its bytes; S3 gives the MD5 of the parts' MD5s with their count.
    const parts = (b: Buffer) => [b.subarray(0, 5 * MiB), b.subarray(5 * MiB, 10 * MiB), b.subarray(10 * MiB)].map((p) => `"${createHash('md5').update(p).digest('hex')}"`);
    proxy.faults = { abortUploads: true, loseCompletes: { count: 1 }, objects: { [`${prefix}a.bin`]: { etag: multipartEtag(parts(FILES['a.bin']!))! } } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.faults.loseCompletes!.count).toBe(0);
    for (const [f, b] of Object.entries(FILES)) expect((await object(prefix + f)).equals(b), f).toBe(true);

    const other = 'sd/lost-plain/';
    proxy.faults = { abortUploads: true, loseCompletes: { count: 1 } };
    const failed = await push(other);
    expect(failed.code, failed.stderr).toBe(1);
    expect(failed.stderr).toContain(`warmup: STORAGE_INCOMPLETE: s3://models/${other}a.bin: CompleteMultipartUpload was retried after an answer was lost, and S3 no longer knows the upload (NoSuchUpload) nor holds an object of its parts; upload it again`);
  }, 60_000);

  it('a CreateMultipartUpload carried out whose answer is lost (a reset): the push succeeds, and the upload that create made is aborted', async () => {
    const prefix = 'sd/lost-create/';
    proxy.faults = { abortUploads: true, listUploads: true, loseCreates: { keys: new RegExp(`^${prefix}a\\.bin$`), count: 1 } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.faults.loseCreates!.count).toBe(0);
    // The store made two uploads of a.bin: the lost answer's, and its retry's.
    expect(Object.values(proxy.stats.multipart.created).filter((k) => k === `${prefix}a.bin`)).toHaveLength(2);
    for (const [f, b] of Object.entries(FILES)) expect((await object(prefix + f)).equals(b), f).toBe(true);
    // Before: the first stayed, listed by ListMultipartUploads until a lifecycle rule removed it.
    expect(left(prefix)).toEqual([]);
    expect(r.stderr).toContain('push: aborted 1 multipart upload(s) of a.bin that CreateMultipartUploads left unanswered made\n');
  }, 60_000);

  it('every CreateMultipartUpload of a file carried out and its answer lost: the push fails, and none of the uploads they made is left', async () => {
    const prefix = 'sd/lost-creates/';
    proxy.faults = { abortUploads: true, listUploads: true, loseCreates: { keys: new RegExp(`^${prefix}a\\.bin$`), count: UPLOAD_ATTEMPTS } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(1);
    expect(Object.values(proxy.stats.multipart.created).filter((k) => k === `${prefix}a.bin`)).toHaveLength(UPLOAD_ATTEMPTS);
    expect(left(prefix)).toEqual([]);
    expect(r.stderr).toContain(`push: aborted ${UPLOAD_ATTEMPTS} multipart upload(s) of a.bin that CreateMultipartUploads left unanswered made\n`);
  }, 60_000);

  it('a store that does not list multipart uploads (s3rver: 501 NotImplemented): the push succeeds and says which upload may be left, and how to remove it', async () => {
    const prefix = 'sd/lost-create-unlisted/';
    proxy.faults = { abortUploads: true, loseCreates: { keys: new RegExp(`^${prefix}a\\.bin$`), count: 1 } };
    const r = await push(prefix);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain('push: a CreateMultipartUpload of a.bin was left unanswered, and the multipart upload it may have made could not be looked for or '
      + 'aborted (NotImplemented); it holds no part, but ListMultipartUploads shows it until aborted (aws s3api list-multipart-uploads, abort-multipart-upload) '
      + 'or a lifecycle rule (AbortIncompleteMultipartUpload) removes it\n');
    expect(left(prefix)).toHaveLength(1);
  }, 60_000);

  it('a Complete taken as done after its answer was lost is no longer counted unfinished, so a push stopped later does not name it as aborted', async () => {
    const key = 'sd/lost-tracked/a.bin';
    const parts = [FILES['a.bin']!.subarray(0, 5 * MiB), FILES['a.bin']!.subarray(5 * MiB, 10 * MiB), FILES['a.bin']!.subarray(10 * MiB)];
    proxy.faults = { loseCompletes: { count: 1 }, objects: { [key]: { etag: multipartEtag(parts.map((p) => `"${createHash('md5').update(p).digest('hex')}"`))! } } };
    // The client the push makes: retried uploads (createS3), and the tracker of what it has left unfinished.
    const s3h = createS3(testConfig(proxy.endpoint, tmp).s3);
    try {
      const tracker = trackUploads(s3h.client);
      await new Upload({ client: s3h.client, partSize: 5 * MiB, queueSize: 2, params: { Bucket: 'models', Key: key, Body: FILES['a.bin']! } }).done();
      expect(proxy.faults.loseCompletes!.count).toBe(0);
      expect(Object.values(proxy.stats.multipart.created)).toContain(key);
      expect([...tracker.open.values()]).toEqual([]);
    } finally {
      s3h.destroy();
    }
  }, 60_000);
});

describe('output_uri', () => {
  const store = () => {
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp).s3);
    return { requestS3, out: createOutputStore(requestS3) };
  };

  it('a PUT answered 500 once, another 503 SlowDown once: both images are stored', async () => {
    const { requestS3, out } = store();
    try {
      proxy.faults = { failPuts: { keys: /^out\/ok/, at: { 1: { status: 500, code: 'InternalError' }, 2: { status: 503, code: 'SlowDown' } } } };
      const images = [png(1), png(2)];
      expect(await out.upload('s3://models/out/ok.png', images)).toEqual(['s3://models/out/ok-0.png', 's3://models/out/ok-1.png']);
      expect(proxy.stats.puts).toBe(4);
      expect((await object('out/ok-0.png')).equals(Buffer.from(images[0]!.data))).toBe(true);
      expect((await object('out/ok-1.png')).equals(Buffer.from(images[1]!.data))).toBe(true);
    } finally {
      requestS3.destroy();
    }
  });

  it('a store that keeps answering 500 fails after the bounded attempts; a 403 at once', async () => {
    const { requestS3, out } = store();
    try {
      proxy.faults = { failPuts: { keys: /^out\/down/, every: { status: 500, code: 'InternalError' } } };
      const down = await rejection(out.upload('s3://models/out/down.png', [png(3)]));
      expect([down.code, down.message]).toEqual(['STORAGE_TRANSIENT', 'output_uri: upload to s3://models/out/down.png failed (InternalError); the images were generated but not stored']);
      // Counted, not timed (a bound of 10 s stood for it): the backoff between tries is capped (storage-plan.test).
      expect(proxy.stats.puts).toBe(UPLOAD_ATTEMPTS);

      proxy.faults = { failPuts: { keys: /^out\/denied/, every: { status: 403, code: 'AccessDenied' } } };
      proxy.stats.puts = 0;
      const denied = await rejection(out.upload('s3://models/out/denied.png', [png(4)]));
      expect(denied.code).toBe('STORAGE_DENIED');
      expect(proxy.stats.puts).toBe(1);
    } finally {
      requestS3.destroy();
    }
  });

  it('one image refused while another is still on its way: the error waits for that one and names it as written', async () => {
    const { requestS3, out } = store();
    try {
      // The first image crosses a slow link (256 KiB at 256 KiB/s); the second is refused at once.
      proxy.faults = { slowPuts: { keys: /^out\/pair-0/, bytesPerSecond: 256 * 1024 }, failPuts: { keys: /^out\/pair-1/, every: { status: 403, code: 'AccessDenied' } } };
      const images = [png(6, 256 * 1024), png(7)];
      const err = await rejection(out.upload('s3://models/out/pair.png', images));
      expect([err.code, err.message]).toEqual(['STORAGE_DENIED', "output_uri: access denied writing s3://models/out/pair-1.png (AccessDenied); check the server's S3 credentials and the bucket policy; of the request's other images, s3://models/out/pair-0.png was written"]);
      // Written before the answer: it used to land after it, under an error that said no image was stored.
      expect((await object('out/pair-0.png')).equals(Buffer.from(images[0]!.data))).toBe(true);
    } finally {
      requestS3.destroy();
    }
  });

  it("instances of one request: one refused while another's image is on its way, the error waits for it and names it as written", async () => {
    // The runtime, its demo model generating both instances in one batch; the first instance's PUT held at the proxy.
    const srv = await startRuntime({ STORAGE_URI: undefined, ...s3Env(proxy.endpoint, path.join(tmp, 'unused')), LOG_LEVEL: 'info', RESULT_CACHE_MB: '0', MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '200' }, { ready: true });
    let release!: () => void;
    proxy.faults = { hold: { keys: /\/out\/inst-a\.png/, method: 'PUT', release: new Promise<void>((r) => (release = r)) }, failPuts: { keys: /^out\/inst-b/, every: { status: 403, code: 'AccessDenied' } } };
    try {
      const one = { prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 5 };
      const answer = postJson(`http://127.0.0.1:${srv.port}/v1/models/model:predict`, { instances: [
        { ...one, output_uri: 's3://models/out/inst-a.png' }, { ...one, output_uri: 's3://models/out/inst-b.png' }] });
      await until(() => proxy.stats.putFaults >= 1, 60_000, 5);
      release();
      const r = await answer;
      expect([r.status, r.json.error]).toEqual([500, "output_uri: access denied writing s3://models/out/inst-b.png (AccessDenied); check the server's S3 credentials and the bucket policy; of the request's other instances' images, s3://models/out/inst-a.png was written"]);
      // Written before the answer: the refusal used to cancel it, its PUT already sent landing after the error.
      expect((await object('out/inst-a.png')).subarray(1, 4).toString()).toBe('PNG');
    } finally {
      release();
      await srv.stop(0);
    }
  }, 120_000);

  it('an upload cancelled while its parts are retried: it fails CANCELLED, no part is sent again, and its multipart upload is aborted', async () => {
    const { requestS3, out } = store();
    try {
      // 11 MiB: lib-storage sends it as three 5 MiB parts (5, 5, 1), all in flight at once.
      proxy.faults = { abortUploads: true, failPuts: { keys: /^out\/big/, every: { status: 500, code: 'InternalError' } } };
      const ac = new AbortController();
      const failed = rejection(out.upload('s3://models/out/big.png', [png(5, 11 * MiB)], ac.signal));
      await until(() => proxy.stats.puts >= 3, 20_000, 2);
      ac.abort();
      const cancelled = proxy.stats.puts;
      const err = await failed;
      expect([err.code, err.message]).toEqual(['CANCELLED', 'output_uri: upload to s3://models/out/big.png cancelled']);
      await until(() => Object.values(proxy.stats.multipart.created).includes('out/big.png') && left('out/big').length === 0, 10_000);
      // Longer than the backoff of the attempts left (3 s at most): a part still due would be sent within it.
      await sleep(3_500);
      // At most one part each of the three may have been on its way as the upload was cancelled.
      expect(proxy.stats.puts - cancelled).toBeLessThanOrEqual(3);
    } finally {
      requestS3.destroy();
    }
  });

  it("an 11 MiB image whose CreateMultipartUpload is carried out but its answer lost: stored, that create's upload aborted; others' of the key and beside it kept", async () => {
    const lines: Array<Record<string, unknown>> = [];
    const log = createLogger('info', 'test', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp).s3, 8, log);
    // Another client's uploads: one of the same key made seconds before this request (S3 gives Initiated in whole
    // seconds), one of a key beside it made just before.
    const other = createS3(testConfig(proxy.endpoint, tmp).s3);
    try {
      proxy.faults = { abortUploads: true, listUploads: true };
      const before = (await other.client.send(new CreateMultipartUploadCommand({ Bucket: 'models', Key: 'out/lost.png' }))).UploadId!;
      await sleep(3_000);
      const beside = (await other.client.send(new CreateMultipartUploadCommand({ Bucket: 'models', Key: 'out/lost.png.1' }))).UploadId!;
      proxy.faults = { abortUploads: true, listUploads: true, loseCreates: { keys: /^out\/lost\.png$/, count: 1 } };
      const image = png(8, 11 * MiB);
      expect(await createOutputStore(requestS3, log).upload('s3://models/out/lost.png', [image])).toEqual(['s3://models/out/lost.png']);
      expect(proxy.faults.loseCreates!.count).toBe(0);
      expect((await object('out/lost.png')).equals(Buffer.from(image.data))).toBe(true);
      // Before: three, the lost answer's upload among them.
      expect(Object.keys(unfinishedUploads(proxy)).filter((id) => proxy.stats.multipart.created[id]!.startsWith('out/lost')).sort()).toEqual([before, beside].sort());
      expect(lines.filter((l) => String(l.msg).startsWith('output_uri:')).map((l) => [l.level, l.msg, l.uri, l.uploads]))
        .toEqual([['info', 'output_uri: aborted the multipart upload that a CreateMultipartUpload left unanswered made', 's3://models/out/lost.png', 1]]);
    } finally {
      requestS3.destroy();
      other.destroy();
    }
  });

  it('a multipart upload that fails (a part refused 403) and whose abort the store answers 500: aborted again, none left', async () => {
    const { requestS3, out } = store();
    try {
      proxy.faults = { abortUploads: true, failAborts: { count: 1 }, failPuts: { keys: /^out\/orphan/, every: { status: 403, code: 'AccessDenied' } } };
      const err = await rejection(out.upload('s3://models/out/orphan.png', [png(6, 11 * MiB)]));
      expect([err.code, err.message]).toEqual(['STORAGE_DENIED', "output_uri: access denied writing s3://models/out/orphan.png (AccessDenied); check the server's S3 credentials and the bucket policy"]);
      // lib-storage's own abort was refused: the store would keep the upload's parts, billed, until a lifecycle rule.
      await until(() => proxy.faults.failAborts?.count === 0 && Object.values(proxy.stats.multipart.created).includes('out/orphan.png'), 10_000);
      await out.settled(15_000);
      expect(left('out/orphan')).toEqual([]);
    } finally {
      requestS3.destroy();
    }
  });

  it('an upload cancelled mid-part whose abort the store answers 500 twice: aborted once its parts in flight end, none left', async () => {
    const { requestS3, out } = store();
    try {
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      proxy.faults = { abortUploads: true, failAborts: { count: 2 }, hold: { keys: /\/out\/gone\.png\?/, method: 'PUT', release: held } };
      const ac = new AbortController();
      const failed = rejection(out.upload('s3://models/out/gone.png', [png(7, 11 * MiB)], ac.signal));
      await until(() => Object.values(proxy.stats.multipart.created).includes('out/gone.png'), 10_000);
      ac.abort();
      expect((await failed).code).toBe('CANCELLED');
      // The parts were still on their way when the request was answered; the abort comes once they end.
      release();
      await out.settled(15_000);
      expect(proxy.faults.failAborts?.count).toBe(0);
      expect(left('out/gone')).toEqual([]);
    } finally {
      requestS3.destroy();
    }
  });

  it('an s3:// input image keeps its single attempt: a 500 is the request\'s error at once', async () => {
    await s3.put('models', 'in/cat.png', detBytes(500, 9));
    const cfg = testConfig(proxy.endpoint, tmp, { INPUT_URI_PREFIXES: 's3://models/in/' });
    const requestS3 = createRequestS3(cfg.s3);
    try {
      proxy.faults = { failGets: { count: 1, status: 500, code: 'InternalError' } };
      const gets = proxy.stats.gets;
      const err = await rejection(createImageSource(requestS3, cfg).read('s3://models/in/cat.png', 'instances[0].image', 1_000_000));
      expect(err.code).toBe('UPSTREAM');
      expect(proxy.stats.gets - gets).toBe(1);
    } finally {
      requestS3.destroy();
    }
  });
});
