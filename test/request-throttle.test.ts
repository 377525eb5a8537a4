/**
 * Throttling (503 SlowDown) beyond the model's fill: an output_uri upload, an s3:// input image's read and a LORA_URI
 * adapter's fetch wait a storm out as the fill does (storage/throttle.ts) instead of spending their attempts on it, and
 * a request's deadline bounds those waits: the request is answered 504 TIMEOUT saying that S3 was throttling, and what,
 * and nothing more is sent for it. The fault proxy answers S3's 503 SlowDown in front of a real s3rver on loopback; the
 * deadlines are a real runtime's (in this process), over HTTP; s3_throttled_responses_total counts the answers.
 */
import { readdirSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { silentLogger } from '../src/log.js';
import { AdapterSource } from '../src/runtime/adapters.js';
import type { EncodedImage } from '../src/runtime/engine.js';
import { createImageSource } from '../src/runtime/image-source.js';
import { createLogger } from '../src/log.js';
import { createOutputStore } from '../src/runtime/output.js';
import { createRequestS3 } from '../src/storage/request-s3.js';
import { fixtureModel } from './fixtures/index.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, until } from './helpers/server.js';
import { CREDS, cleanUpS3, detBytes, type FaultProxy, putFolder, rejection, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';

const MiB = 1 << 20;
let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
let pic: Buffer;
const adapter = detBytes(3_000, 7);

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'request-throttle-'));
  ({ s3, proxy } = await startS3WithProxy());
  const px = Buffer.alloc(64 * 64 * 3);
  for (let i = 0; i < px.length; i++) px[i] = (i * 7) % 251;
  pic = await sharp(px, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
  await s3.put('models', 'in/cat.png', pic);
  await s3.put('models', 'loras/style/pytorch_lora_weights.safetensors', adapter);
});

cleanUpS3(() => ({ s3, proxy, tmp }));

const object = async (key: string) => Buffer.from(await (await s3.client.send(new GetObjectCommand({ Bucket: 'models', Key: key }))).Body!.transformToByteArray());
const png = (seed: number, bytes: number): EncodedImage => {
  const b = detBytes(bytes, seed);
  return { data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, seed, width: 8, height: 8, format: 'png' };
};
/** Every throttled answer a component heard, by code. */
const heard = () => {
  const codes: string[] = [];
  return { codes, count: (code: string) => void codes.push(code) };
};

describe('a short SlowDown storm is waited out', () => {
  it('output_uri: a storm on the uploads longer than their attempts\' backoff; both images stored byte for byte, a multipart one included', async () => {
    // S3_THROTTLE_TIMEOUT_S=8: waits of 2 s at most, and a storm of 4.5 s ends 3.5 s before the give-up.
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp, { S3_THROTTLE_TIMEOUT_S: '8' }).s3);
    const { codes, count } = heard();
    try {
      const before = proxy.stats.slowDowns;
      // Longer than the backoff of an upload request's 5 attempts (3 s at most), by 1.5 s: before, each failed after
      // them, STORAGE_TRANSIENT "output_uri: upload to s3://models/out/storm-0.png failed (SlowDown)", unless a pause of
      // the process outlasted the rest of the storm (timed from the first request it answers).
      proxy.faults = { slowDown: { forMs: 4_500, uploads: true, gets: false } };
      const images = [png(1, 3_000), png(2, 11 * MiB)];
      expect(await createOutputStore(requestS3, silentLogger(), count).upload('s3://models/out/storm.png', images))
        .toEqual(['s3://models/out/storm-0.png', 's3://models/out/storm-1.png']);
      expect((await object('out/storm-0.png')).equals(Buffer.from(images[0]!.data))).toBe(true);
      expect((await object('out/storm-1.png')).equals(Buffer.from(images[1]!.data))).toBe(true);
      // Each image's first request, at least, was answered SlowDown; every such answer was heard.
      expect(proxy.stats.slowDowns - before).toBeGreaterThanOrEqual(2);
      expect(codes).toEqual(Array(proxy.stats.slowDowns - before).fill('SlowDown'));
    } finally {
      requestS3.destroy();
    }
  }, 30_000);

  it('output_uri: four uploads throttled at once log one warn line between them, not one each; every answer is still heard', async () => {
    const lines: Array<Record<string, unknown>> = [];
    const log = createLogger('info', 'test', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp, { S3_THROTTLE_TIMEOUT_S: '8' }).s3, 8, log);
    const { codes, count } = heard();
    try {
      const before = proxy.stats.slowDowns;
      // The four PUTs go out together, within the storm's first 1.5 s however the process is paused after them (one
      // alone throttled would log one line before too); the give-up is 6.5 s past its end.
      proxy.faults = { slowDown: { forMs: 1_500, uploads: true, gets: false } };
      const images = [png(11, 3_000), png(12, 3_000), png(13, 3_000), png(14, 3_000)];
      expect(await createOutputStore(requestS3, log, count).upload('s3://models/out/quiet.png', images)).toHaveLength(4);
      expect(proxy.stats.slowDowns - before).toBeGreaterThanOrEqual(4);
      expect(codes).toHaveLength(proxy.stats.slowDowns - before);
      // Before: one 'S3 is throttling the upload' line per image (and one 'no longer throttles' each).
      expect(lines.filter((l) => /^S3 is throttling the upload/.test(String(l.msg)))).toHaveLength(1);
      expect(lines.filter((l) => /^S3 no longer throttles the upload/.test(String(l.msg))).length).toBeLessThanOrEqual(1);
      // The others are summed up once the client goes (a stop, a push's end), not lost with the summary's timer.
      requestS3.destroy();
      expect(lines.filter((l) => /^S3 also throttled [1-3] other uploads? \(\d+ throttled answers?\) in the last \d+ s/.test(String(l.msg)))).toHaveLength(1);
    } finally {
      requestS3.destroy();
    }
  }, 30_000);

  it('an s3:// input image: read in full once the storm ends, where its one attempt used to be the request\'s 502', async () => {
    const cfg = testConfig(proxy.endpoint, tmp, { INPUT_URI_PREFIXES: 's3://models/in/', S3_THROTTLE_TIMEOUT_S: '4' });
    const requestS3 = createRequestS3(cfg.s3);
    const { codes, count } = heard();
    try {
      const before = proxy.stats.slowDowns;
      // Two GETs answered SlowDown, counted rather than timed: waits of 1 s at most, 3 s short of the give-up.
      proxy.faults = { slowDown: { count: 2 } };
      // Before: UPSTREAM "instances[0].image: reading s3://models/in/cat.png failed (SlowDown); retry later" at once.
      const got = await createImageSource(requestS3, cfg, count).read('s3://models/in/cat.png', 'instances[0].image', 1_000_000);
      expect(got.equals(pic)).toBe(true);
      expect(proxy.stats.slowDowns - before).toBe(2);
      expect(codes).toEqual(Array(proxy.stats.slowDowns - before).fill('SlowDown'));
    } finally {
      requestS3.destroy();
    }
  });

  it('a LORA_URI adapter: its fetch waits the storm out, as a fill does, and each throttled answer is counted', async () => {
    const { codes, count } = heard();
    const src = new AdapterSource(testConfig(proxy.endpoint, path.join(tmp, 'lora-cache'), { LORA_URI: 's3://models/loras/', S3_MAX_ATTEMPTS: '2', S3_THROTTLE_TIMEOUT_S: '4' }),
      silentLogger(), count);
    const before = proxy.stats.slowDowns;
    // Its LIST answered SlowDown twice, counted rather than timed: a storm of 1.5 s from the first answer missed the
    // second LIST where a pause of 0.5 s came in the wait (up to 1 s) between them.
    proxy.faults = { slowDown: { count: 2, lists: true } };
    const [ref] = await src.resolve([{ name: 'style', scale: 1 }]);
    expect((await fsp.readFile(ref!.file)).equals(adapter)).toBe(true);
    // The fetch rode storms out before too (it is a fill); what it heard of them reached no metric.
    expect(proxy.stats.slowDowns - before).toBe(2);
    expect(codes).toEqual(Array(proxy.stats.slowDowns - before).fill('SlowDown'));
  });
});

describe('a storm past S3_THROTTLE_TIMEOUT_S fails naming throttling', () => {
  it('output_uri: STORAGE_TRANSIENT naming the object, the code and what to do', async () => {
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp, { S3_THROTTLE_TIMEOUT_S: '2' }).s3);
    try {
      proxy.faults = { slowDown: { uploads: true, gets: false } };
      const err = await rejection(createOutputStore(requestS3).upload('s3://models/out/never.png', [png(3, 3_000)]));
      // Before: "output_uri: upload to s3://models/out/never.png failed (SlowDown); …" after 5 attempts.
      expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', expect.stringMatching(new RegExp('^output_uri: cannot upload s3://models/out/never\\.png: '
        + 'S3 kept throttling the upload \\(SlowDown, \\d+ throttled answers\\) for 2 s \\(S3_THROTTLE_TIMEOUT_S\\) without a request accepted; the store is asked '
        + 'for more than it serves: send fewer uploads at once \\(a push: lower S3_MAX_CONCURRENCY\\), or raise S3_THROTTLE_TIMEOUT_S to wait longer '
        + '\\(on MinIO or Ceph, check the server\'s load and its request limits\\); the images were generated but not stored$'))]);
      expect(err.message).not.toMatch(/S3RVER|echoed-secret/);
    } finally {
      requestS3.destroy();
    }
  }, 20_000);

  it('an s3:// input image: a 502 naming the field, the object and the code', async () => {
    const cfg = testConfig(proxy.endpoint, tmp, { INPUT_URI_PREFIXES: 's3://models/in/', S3_THROTTLE_TIMEOUT_S: '2' });
    const requestS3 = createRequestS3(cfg.s3);
    try {
      proxy.faults = { slowDown: {} };
      const err = await rejection(createImageSource(requestS3, cfg).read('s3://models/in/cat.png', 'instances[0].image', 1_000_000));
      expect([err.code, err.message]).toEqual(['UPSTREAM', expect.stringMatching(new RegExp('^instances\\[0\\]\\.image: reading s3://models/in/cat\\.png failed: '
        + 'S3 kept throttling the read \\(SlowDown, \\d+ throttled answers\\) for 2 s \\(S3_THROTTLE_TIMEOUT_S\\) without a byte received; the store is asked '
        + 'for more than it serves: retry later, or raise S3_THROTTLE_TIMEOUT_S to wait longer'))]);
    } finally {
      requestS3.destroy();
    }
  }, 20_000);
});

describe('a request\'s deadline in the try after a throttled answer (S3 throttled it, then left the next try unanswered)', () => {
  // The deadline may land in a throttled wait or in the try that follows it: either way S3 was throttling the work, and
  // the error says so. Before, a try the deadline cut counted as an answer, which ended the throttled spell the error
  // looks at: "reading … was cancelled", or the upload's own failure, where the deadline came while a try was in flight.
  /** A signal aborted as a request's deadline aborts it (a TimeoutError), once `reached`: the try after the SlowDown is held. */
  const deadlineOnce = (reached: () => boolean) => {
    const ac = new AbortController();
    until(reached, 20_000).then(() => ac.abort(new DOMException('The operation was aborted due to timeout', 'TimeoutError')), () => undefined);
    return ac.signal;
  };
  it('an s3:// input image: TIMEOUT naming the throttled read', async () => {
    const cfg = testConfig(proxy.endpoint, tmp, { INPUT_URI_PREFIXES: 's3://models/in/' });
    const requestS3 = createRequestS3(cfg.s3);
    let release!: () => void;
    try {
      const held = proxy.stats.held;
      proxy.faults = { slowDown: { count: 1 }, hold: { keys: /\/models\/in\/cat\.png/, release: new Promise<void>((r) => (release = r)) } };
      const signal = deadlineOnce(() => proxy.stats.held > held);
      const err = await rejection(createImageSource(requestS3, cfg).read('s3://models/in/cat.png', 'instances[0].image', 1_000_000, signal));
      expect(proxy.faults.slowDown!.count).toBe(0);
      expect(proxy.stats.held - held).toBe(1);
      // Before: CANCELLED "instances[0].image: reading s3://models/in/cat.png was cancelled".
      expect([err.code, err.message]).toEqual(['TIMEOUT', expect.stringMatching(/^instances\[0\]\.image: S3 was throttling the read of s3:\/\/models\/in\/cat\.png \(SlowDown, 1 throttled answer in \d+(\.\d)? s\)$/)]);
    } finally {
      proxy.faults = {};
      release();
      requestS3.destroy();
    }
  }, 20_000);

  it('output_uri: TIMEOUT naming the throttled upload', async () => {
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp).s3);
    try {
      proxy.faults = { slowDown: { count: 1, uploads: true, gets: false }, stallUploads: { commands: ['PutObject'], keys: /^out\/cut\.png$/, count: 1 } };
      const signal = deadlineOnce(() => proxy.faults.stallUploads!.count === 0);
      const err = await rejection(createOutputStore(requestS3).upload('s3://models/out/cut.png', [png(4, 3_000)], signal));
      expect(proxy.faults.slowDown!.count).toBe(0);
      expect(proxy.faults.stallUploads!.count).toBe(0);
      // Before: the cut try's failure, without a word of throttling.
      expect([err.code, err.message]).toEqual(['TIMEOUT', expect.stringMatching(/^output_uri: S3 was throttling the upload to s3:\/\/models\/out\/cut\.png \(SlowDown, 1 throttled answer in \d+(\.\d)? s\); the images were generated but not stored$/)]);
    } finally {
      proxy.faults = {};
      requestS3.destroy();
    }
  }, 20_000);
});

describe("a request's deadline bounds the wait", () => {
  let rt: RuntimeHandle;
  const one = { prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 5 };
  const predict = (inst: Record<string, unknown>) => postJson(`${rt.url}/v1/models/model:predict`, { instances: [{ ...one, ...inst }] });
  const throttledCounts = async () => Object.fromEntries([...(await (await fetch(`${rt.url}/metrics`)).text())
    .matchAll(/^s3_throttled_responses_total\{[^}]*operation="([a-z_]+)"[^}]*\} (\d+)$/gm)].map((m) => [m[1]!, Number(m[2])]));
  /** What the proxy is asked once the answer is out: nothing of a wait that outlived its request. */
  const askedAfter = async () => {
    const n = proxy.stats.slowDowns;
    await sleep(2_500);
    return proxy.stats.slowDowns - n;
  };

  beforeAll(async () => {
    const model = await fixtureModel({ withVaeEncoder: true });
    const files = readdirSync(model, { recursive: true, withFileTypes: true }).filter((d) => d.isFile()).map((d) => `${d.parentPath}/${d.name}`.slice(model.length + 1));
    await putFolder(s3, 'models', 'sd/', model, files);
    // The boot's fill is throttled too (its LIST, twice): counted as model_download.
    proxy.faults = { failLists: { count: 2, status: 503, code: 'SlowDown' } };
    rt = await startRuntime({
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: 's3://models/sd/', MODEL_CACHE_DIR: path.join(tmp, 'cache'),
      LORA_URI: 's3://models/loras/', INPUT_URI_PREFIXES: 's3://models/in/', REQUEST_TIMEOUT_S: '4', RESULT_CACHE_MB: '0', EXECUTION_PROVIDER: 'cpu',
    }, { ready: true });
    proxy.faults = {};
    // A first generation, so that none of the requests below spends its deadline on the sessions' first run.
    expect((await predict({})).status).toBe(200);
  }, 120_000);
  afterAll(() => rt?.stop());

  it('counts the boot\'s throttled answers, and every operation from 0', async () => {
    const c = await throttledCounts();
    expect(Object.keys(c).sort()).toEqual(['cache_check', 'input_read', 'lora_download', 'model_download', 'output_cleanup', 'output_upload']);
    expect(c.model_download).toBe(2);
  });

  it('output_uri: a storm that never ends is answered 504 at REQUEST_TIMEOUT_S, naming the upload and the code; nothing sent after', async () => {
    proxy.faults = { slowDown: { uploads: true, gets: false } };
    const r = await predict({ output_uri: 's3://models/out/late.png' });
    // Before: 500 STORAGE_TRANSIENT "… failed (SlowDown)" after the attempts, or 504 without a word of throttling.
    expect([r.status, r.json.code]).toEqual([504, 'TIMEOUT']);
    expect(r.json.error).toMatch(/^the request took longer than REQUEST_TIMEOUT_S=4s and was stopped: output_uri: S3 was throttling the upload to s3:\/\/models\/out\/late\.png \(SlowDown, \d+ throttled answers? in \d+(\.\d)? s\); the images were generated but not stored$/);
    expect(r.json.error).not.toMatch(/S3RVER|echoed-secret/);
    expect(await askedAfter()).toBe(0);
    expect((await throttledCounts()).output_upload).toBeGreaterThanOrEqual(1);
  }, 30_000);

  it('a LORA_URI adapter of one instance, another still generating at REQUEST_TIMEOUT_S: the 504 names the throttled fetch all the same', async () => {
    proxy.faults = { slowDown: { lists: true } };
    // The first instance runs past the deadline (500 steps at 1024x1024) and is the first to answer it (its generation
    // stops: CANCELLED; it listens for the deadline first); the second waits for its adapter's lookup, which S3 throttles.
    const r = await postJson(`${rt.url}/v1/models/model:predict`, { instances: [
      { ...one, seed: 7, num_inference_steps: 500, height: 1024, width: 1024 },
      { ...one, seed: 6, loras: [{ name: 'late-too', scale: 1 }] },
    ] });
    expect([r.status, r.json.code]).toEqual([504, 'TIMEOUT']);
    // Before: "the request took longer than REQUEST_TIMEOUT_S=4s and was stopped", no word of S3.
    expect(r.json.error).toMatch(/^the request took longer than REQUEST_TIMEOUT_S=4s and was stopped: adapter "late-too": S3 was throttling its fetch from LORA_URI \(SlowDown, \d+ throttled answers? in \d+(\.\d)? s\)$/);
    expect(await askedAfter()).toBe(0);
  }, 30_000);

  it('an s3:// input image: answered 504 naming the field, the object and the code; nothing sent after', async () => {
    proxy.faults = { slowDown: {} };
    const r = await predict({ image: 's3://models/in/cat.png', strength: 0.5 });
    // Before: 502 UPSTREAM "… reading s3://models/in/cat.png failed (SlowDown); retry later" at the first answer.
    expect([r.status, r.json.code]).toEqual([504, 'TIMEOUT']);
    expect(r.json.error).toMatch(/^reading the input images took longer than REQUEST_TIMEOUT_S=4s and was stopped: instances\[0\]\.image: S3 was throttling the read of s3:\/\/models\/in\/cat\.png \(SlowDown, \d+ throttled answers? in \d+(\.\d)? s\)$/);
    expect(await askedAfter()).toBe(0);
    expect((await throttledCounts()).input_read).toBeGreaterThanOrEqual(1);
  }, 30_000);

  it('a LORA_URI adapter: answered 504 naming the adapter and the code; its fetch, which nobody waits for, stops', async () => {
    proxy.faults = { slowDown: { lists: true } };
    const r = await predict({ loras: [{ name: 'late', scale: 1 }] });
    // Before: 504 "the request took longer than REQUEST_TIMEOUT_S=4s and was stopped", no word of S3.
    expect([r.status, r.json.code]).toEqual([504, 'TIMEOUT']);
    expect(r.json.error).toMatch(/^the request took longer than REQUEST_TIMEOUT_S=4s and was stopped: adapter "late": S3 was throttling its fetch from LORA_URI \(SlowDown, \d+ throttled answers? in \d+(\.\d)? s\)$/);
    expect(await askedAfter()).toBe(0);
    expect((await throttledCounts()).lora_download).toBeGreaterThanOrEqual(1);
  }, 30_000);
});
