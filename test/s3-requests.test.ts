/**
 * s3_requests_total: every HTTP request the runtime sends to S3, retries and pages included, counted once by how it
 * ended. A real runtime (in this process) reads a real s3rver on loopback through the fault proxy, which counts every
 * request it receives: the metric, read over HTTP from /metrics, must add up to exactly that, by operation, and each
 * fault the proxy makes must show as its outcome (a SlowDown as throttled, as many as s3_throttled_responses_total
 * counts; a reset as network; a stall as stalled; a 403 as client_error; a request's deadline as cancelled). Both
 * transports (S3_TRANSPORT=sdk and lite) read the model and LoRA adapters; input images and uploads go through the SDK.
 */
import { readdirSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/log.js';
import type { EncodedImage } from '../src/runtime/engine.js';
import { createOutputStore } from '../src/runtime/output.js';
import { createRequestS3 } from '../src/storage/request-s3.js';
import { fixtureModel } from './fixtures/index.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson } from './helpers/server.js';
import { CREDS, cleanUpS3, detBytes, type FaultProxy, putFolder, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';

const OUTCOMES = ['ok', 'throttled', 'client_error', 'server_error', 'network', 'stalled', 'cancelled'] as const;
type Outcome = (typeof OUTCOMES)[number];
type Counts = Record<string, Record<Outcome, number>>;

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
/** The model's files. */
let modelFiles = 0;

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 's3-requests-'));
  ({ s3, proxy } = await startS3WithProxy());
  const model = await fixtureModel({ withVaeEncoder: true });
  const files = readdirSync(model, { recursive: true, withFileTypes: true }).filter((d) => d.isFile()).map((d) => `${d.parentPath}/${d.name}`.slice(model.length + 1));
  await putFolder(s3, 'models', 'sd/', model, files);
  modelFiles = files.length;
  const px = Buffer.alloc(64 * 64 * 3);
  for (let i = 0; i < px.length; i++) px[i] = (i * 7) % 251;
  await s3.put('models', 'in/cat.png', await sharp(px, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer());
  await s3.put('models', 'loras/style/pytorch_lora_weights.safetensors', detBytes(3_000, 7));
}, 120_000);

cleanUpS3(() => ({ s3, proxy, tmp }));

/** s3_requests_total from /metrics, by operation and outcome. */
async function requestCounts(rt: RuntimeHandle): Promise<Counts> {
  const text = await (await fetch(`${rt.url}/metrics`)).text();
  const out: Counts = {};
  for (const m of text.matchAll(/^s3_requests_total\{([^}]*)\} (\d+)$/gm)) {
    const op = /operation="([a-z_]+)"/.exec(m[1]!)![1]!;
    const outcome = /outcome="([a-z_]+)"/.exec(m[1]!)![1]! as Outcome;
    (out[op] ??= Object.fromEntries(OUTCOMES.map((o) => [o, 0])) as Record<Outcome, number>)[outcome] = Number(m[2]);
  }
  return out;
}

const throttledCount = async (rt: RuntimeHandle, operation: string) => {
  const m = new RegExp(`^s3_throttled_responses_total\\{[^}]*operation="${operation}"[^}]*\\} (\\d+)$`, 'm').exec(await (await fetch(`${rt.url}/metrics`)).text());
  return Number(m![1]);
};

const total = (c: Record<Outcome, number>) => OUTCOMES.reduce((n, o) => n + c[o], 0);
const diff = (a: Counts, b: Counts): Counts => Object.fromEntries(Object.keys(a).map((op) => [op, Object.fromEntries(OUTCOMES.map((o) => [o, a[op]![o] - (b[op]?.[o] ?? 0)]))])) as Counts;
const only = (c: Partial<Record<Outcome, number>>): Record<Outcome, number> => ({ ...Object.fromEntries(OUTCOMES.map((o) => [o, 0])), ...c }) as Record<Outcome, number>;
const none = only({});

/**
 * The counts' change since `before` once every request the proxy received since `sent` has been counted (a request
 * counts when it ends, which may be a moment after the answer that used it): waited for, with a generous bound.
 */
async function settled(rt: RuntimeHandle, before: Counts, sent: number): Promise<Counts> {
  const until = Date.now() + 20_000;
  for (;;) {
    const d = diff(await requestCounts(rt), before);
    const n = Object.values(d).reduce((x, c) => x + total(c), 0);
    if (n >= proxy.stats.requests - sent || Date.now() > until) return d;
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe.each(['sdk', 'lite'] as const)('S3_TRANSPORT=%s', (transport) => {
  let rt: RuntimeHandle | undefined;
  const cacheDir = () => path.join(tmp, `cache-${transport}`);
  // A stall bound of 3 s, not 1: the runtime runs in this process beside the proxy, and on a loaded machine an event
  // loop held past the bound fires a range's watchdog before its waiting bytes are read, a real stall (68 of them once
  // under load ~19, each counted and read again), which the exact counts below would read as a miscount.
  const env = () => ({
    ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: 's3://models/sd/', MODEL_CACHE_DIR: cacheDir(), S3_TRANSPORT: transport,
    S3_STALL_TIMEOUT_S: '3', LORA_URI: 's3://models/loras/', INPUT_URI_PREFIXES: 's3://models/in/', REQUEST_TIMEOUT_S: '5', RESULT_CACHE_MB: '0',
    EXECUTION_PROVIDER: 'cpu',
  });
  afterAll(() => rt?.stop());

  it('a fill: its LIST, ranges and HEADs count ok; a SlowDown throttled (as s3_throttled_responses_total counts it), a reset network, a stall stalled', async () => {
    const sent = proxy.stats.requests;
    const cuts = proxy.stats.resets + proxy.stats.stalls;
    // The first GET answered 503 SlowDown, the next cut mid-body, the one after left silent past S3_STALL_TIMEOUT_S.
    proxy.faults = { failGets: { count: 1, status: 503, code: 'SlowDown' }, resetAfterBytes: 100, resets: 1, stallAfterBytes: 100, stalls: 1 };
    rt = await startRuntime(env(), { ready: true });
    const zero = Object.fromEntries(['model_download', 'cache_check', 'lora_download', 'output_upload', 'output_cleanup', 'input_read'].map((op) => [op, none])) as Counts;
    const c = await settled(rt, zero, sent);
    expect(proxy.stats.resets + proxy.stats.stalls - cuts).toBe(2);
    // Every request the proxy received, and nothing else: before, there was no such metric.
    expect(c).toEqual({ ...zero, model_download: only({ ok: proxy.stats.requests - sent - 3, throttled: 1, network: 1, stalled: 1 }) });
    expect(await throttledCount(rt, 'model_download')).toBe(1);
    // The LIST and a GET of every file, at the least.
    expect(c.model_download!.ok).toBeGreaterThanOrEqual(1 + modelFiles);
  }, 120_000);

  it('a restart on the committed entry: the cache check\'s LIST, alone', async () => {
    await rt!.stop();
    rt = undefined;
    const sent = proxy.stats.requests;
    rt = await startRuntime(env(), { ready: true });
    const c = await settled(rt, {}, sent);
    expect(proxy.stats.requests - sent).toBe(1);
    expect(c.cache_check).toEqual(only({ ok: 1 }));
    expect(c.model_download).toEqual(none);
  }, 120_000);

  it('a LORA_URI adapter whose GET is refused 403: its LIST ok, its GET client_error', async () => {
    const before = await requestCounts(rt!);
    const sent = proxy.stats.requests;
    proxy.faults = { failGets: { count: 1, status: 403, code: 'AccessDenied', keys: /loras\// } };
    const r = await postJson(`${rt!.url}/v1/models/model:predict`, { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, loras: [{ name: 'style', scale: 1 }] }] });
    expect(r.status).toBeGreaterThanOrEqual(400);
    const c = await settled(rt!, before, sent);
    expect(c.lora_download).toEqual(only({ ok: proxy.stats.requests - sent - 1, client_error: 1 }));
    expect(c.lora_download!.ok).toBeGreaterThanOrEqual(1);
    expect(total(c.model_download!) + total(c.input_read!) + total(c.output_upload!)).toBe(0);
  }, 60_000);

  // Input images and uploads go through the SDK whatever S3_TRANSPORT says: once is enough.
  it.runIf(transport === 'sdk')('an s3:// input: a 403 is client_error; a SlowDown is throttled, as s3_throttled_responses_total counts them, then ok', async () => {
    const predict = (inst: Record<string, unknown>) => postJson(`${rt!.url}/v1/models/model:predict`,
      { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 3, image: 's3://models/in/cat.png', strength: 0.5, ...inst }] });
    let before = await requestCounts(rt!);
    let sent = proxy.stats.requests;
    proxy.faults = { failGets: { count: 1, status: 403, code: 'AccessDenied', keys: /in\// } };
    expect((await predict({})).status).toBe(400);
    expect((await settled(rt!, before, sent)).input_read).toEqual(only({ client_error: 1 }));

    before = await requestCounts(rt!);
    sent = proxy.stats.requests;
    const throttled = await throttledCount(rt!, 'input_read');
    proxy.faults = { slowDown: { count: 1 } };
    expect((await predict({ seed: 4 })).status).toBe(200);
    expect(proxy.stats.requests - sent).toBe(2);
    expect((await settled(rt!, before, sent)).input_read).toEqual(only({ throttled: 1, ok: 1 }));
    expect(await throttledCount(rt!, 'input_read') - throttled).toBe(1);
  }, 60_000);

  it.runIf(transport === 'sdk')('an s3:// input the store holds past REQUEST_TIMEOUT_S: cancelled', async () => {
    const before = await requestCounts(rt!);
    const sent = proxy.stats.requests;
    let release!: () => void;
    proxy.faults = { hold: { keys: /in\//, release: new Promise<void>((r) => (release = r)) } };
    try {
      const r = await postJson(`${rt!.url}/v1/models/model:predict`,
        { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 5, image: 's3://models/in/cat.png', strength: 0.5 }] });
      expect(r.status).toBe(504);
      expect((await settled(rt!, before, sent)).input_read).toEqual(only({ cancelled: 1 }));
    } finally {
      release();
    }
  }, 60_000);

  it.runIf(transport === 'sdk')('output_uri: an upload reset once counts network, then ok for the retry', async () => {
    const before = await requestCounts(rt!);
    const sent = proxy.stats.requests;
    proxy.faults = { failPuts: { keys: /^out\//, at: { [proxy.stats.puts + 1]: 'reset' } } };
    const r = await postJson(`${rt!.url}/v1/models/model:predict`,
      { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 6, output_uri: `s3://models/out/${transport}.png` }] });
    expect(r.status).toBe(200);
    expect(proxy.stats.putFaults).toBeGreaterThanOrEqual(1);
    expect((await settled(rt!, before, sent)).output_upload).toEqual(only({ network: 1, ok: 1 }));
  }, 60_000);
});

describe('a multipart upload', () => {
  /**
   * Uploads `mib` MiB (seeded by `seed`) to s3://models/<key> through the output store, with `faults` set once the
   * proxy's counts before it are taken: how each of its requests ended, and what the proxy received.
   */
  async function upload(key: string, mib: number, seed: number, faults: () => FaultProxy['faults']) {
    const counts: Record<string, number> = {};
    const tally = (o: string) => void (counts[o] = (counts[o] ?? 0) + 1);
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp).s3);
    const b = detBytes(mib << 20, seed);
    const img: EncodedImage = { data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, seed, width: 8, height: 8, format: 'png' };
    try {
      const sent = proxy.stats.requests;
      const uploads = { ...proxy.stats.uploads };
      proxy.faults = faults();
      expect(await createOutputStore(requestS3, silentLogger(), undefined, undefined, { upload: tally, cleanup: tally }).upload(`s3://models/${key}`, [img]))
        .toEqual([`s3://models/${key}`]);
      const sentOf = (c: 'CreateMultipartUpload' | 'UploadPart' | 'CompleteMultipartUpload') => (proxy.stats.uploads[c] ?? 0) - (uploads[c] ?? 0);
      return { counts, requests: proxy.stats.requests - sent, sent: [sentOf('CreateMultipartUpload'), sentOf('UploadPart'), sentOf('CompleteMultipartUpload')] };
    } finally {
      requestS3.destroy();
    }
  }

  it('counts each of its requests (create, every part, complete) once, and each retried attempt', async () => {
    // The second part's PUT is cut after its body was read: retried.
    const r = await upload('out/big.png', 11, 9, () => ({ failPuts: { keys: /^out\/big/, at: { [proxy.stats.puts + 2]: 'reset' } } }));
    // CreateMultipartUpload, 3 parts of 5 MiB at most, one part again, CompleteMultipartUpload.
    expect(r.sent).toEqual([1, 4, 1]);
    expect(r.requests).toBe(6);
    expect(r.counts).toEqual({ ok: 5, network: 1 });
  }, 60_000);

  it('a CompleteMultipartUpload S3 fails in a 200 is no ok: server_error, then ok for the one sent again', async () => {
    const r = await upload('out/late.png', 6, 10, () => ({ errorCompletes: { count: 1, code: 'InternalError' } }));
    expect(r.sent).toEqual([1, 2, 2]);
    // Before: ok 5 (the failed Complete's 200 was counted when its body had been read).
    expect(r.counts).toEqual({ ok: 4, server_error: 1 });
  }, 60_000);
});
