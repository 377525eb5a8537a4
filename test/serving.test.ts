/**
 * Serving behaviour over a real socket (the runtime in-process): dynamic batching (and its byte-equality with unbatched runs),
 * the bounded queue, cancellation of queued work, output formats, the result cache, output_uri to S3.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { GetObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { putStyleAdapter } from './helpers/big-adapter.js';
import { CREDS, destroyS3, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { lanes, metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, tempDir, until } from './helpers/server.js';
import { fixtureModel } from './fixtures/index.js';

type Pred = { image: { b64?: string; uri?: string }; seed: number; format: string; width: number; height: number };
const preds = (j: Record<string, unknown>) => j.predictions as Pred[];
type Served = Pick<RuntimeHandle, 'url'>;
const predict = (s: Served, inst: Record<string, unknown>, init: RequestInit = {}) => postJson(`${s.url}/v1/models/model:predict`, { instances: [inst] }, init);

/** A raw HTTP request whose socket we can drop at will. */
function rawPredict(port: number, inst: Record<string, unknown>): net.Socket {
  const body = JSON.stringify({ instances: [inst] });
  const s = net.connect(port, '127.0.0.1', () => {
    s.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  });
  s.on('error', () => undefined);
  return s;
}

const b64 = (r: { json: Record<string, unknown> }) => preds(r.json)[0]!.image.b64;

/** Sends a and b at once: one batch, and each image byte-equal to its request's run alone. */
async function oneBatchAsAloneOn(srv: RuntimeHandle, a: Record<string, unknown>, b: Record<string, unknown>) {
  const count0 = await metric(srv, 'inference_batch_size_count');
  const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
  expect([ra.status, rb.status]).toEqual([200, 200]);
  expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(1);
  expect(b64(ra) === b64(await predict(srv, a))).toBe(true);
  expect(b64(rb) === b64(await predict(srv, b))).toBe(true);
  return [ra, rb] as const;
}

/** Sends a and b at once: two batches, each a 200. */
async function twoBatchesOn(srv: RuntimeHandle, a: Record<string, unknown>, b: Record<string, unknown>) {
  const count0 = await metric(srv, 'inference_batch_size_count');
  const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
  expect([ra.status, rb.status]).toEqual([200, 200]);
  expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(2);
  return [ra, rb] as const;
}

/** Batches run, images generated, result-cache hits and clients counted as left, on `srv`. */
async function leftCounts(srv: RuntimeHandle) {
  return {
    batches: await metric(srv, 'inference_batch_size_count'), images: await metric(srv, 'images_generated_total'),
    hits: await metric(srv, 'result_cache_hits_total'), left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }),
  };
}

/** Each count's change from `before` to `after`. */
const since = <T extends Record<string, number>>(before: T, after: T) => Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - before[k]!]));

/**
 * Each describe starts a runtime of its own and shares nothing with the others: they run side by side, two at a time
 * (lane), the longest first, while the cases of one run in order (it.sequential), as they read deltas of their
 * runtime's metrics.
 */
const lane = lanes(2);

describe.concurrent('identical requests joined to a generation while its LoRA adapters are looked up (LORA_URI behind the fault proxy, MAX_QUEUE=1, RESULT_CACHE_MB=4)', () => {
  lane();
  const tmp = tempDir('serving-lora-');
  let s3: S3Server;
  let proxy: FaultProxy;
  let srv: RuntimeHandle;
  beforeAll(async () => {
    const model = await fixtureModel();
    s3 = await startS3(['loras']);
    await putStyleAdapter(s3, model, tmp.dir);
    // The same adapter under other names: a name is looked up (listed) once per process, and each case holds its lookup.
    for (const name of ['rejoin', 'left', 'refused', 'gone', 'throttled', 'throttled-joined', 'drain']) await s3.put('loras', `adapters/${name}/pytorch_lora_weights.safetensors`, readFileSync(path.join(tmp.dir, 'style.safetensors')));
    proxy = await startFaultProxy(s3.port);
    srv = await startRuntime({ STORAGE_URI: model, MODEL_CACHE_DIR: path.join(tmp.dir, 'cache'), LORA_URI: 's3://loras/adapters/', ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', RESULT_CACHE_MB: '4', MAX_QUEUE: '1' }, { ready: true });
  }, 120_000);
  afterAll(async () => {
    await srv?.stop();
    await proxy?.close();
    if (s3) await destroyS3(s3);
    tmp.cleanup();
  });

  /** ListObjectsV2 requests, and so the adapters' lookups, held until the returned function is called. */
  const holdLists = (): (() => void) => {
    let answer!: () => void;
    proxy.faults.holdLists = new Promise<void>((r) => (answer = r));
    return () => {
      delete proxy.faults.holdLists;
      answer();
    };
  };

  it.sequential('a generation whose client left while its adapters were looked up goes on for the requests joined to it: its look-up is not stopped, and they get its images', async () => {
    const counts = async () => ({ images: await metric(srv, 'images_generated_total'), hits: await metric(srv, 'result_cache_hits_total'), left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }) });
    const inst = { prompt: 'a fox in style', seed: 41, num_inference_steps: 2, height: 64, width: 64, loras: [{ name: 'rejoin', scale: 0.5 }] };
    const before = await counts();
    const release = holdLists();
    let joined: Array<ReturnType<typeof predict>> = [];
    try {
      const lists = proxy.stats.lists;
      const first = rawPredict(srv.port, inst);
      await until(() => proxy.stats.lists > lists);
      joined = [predict(srv, inst), predict(srv, inst)];
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 3, 20_000, 5);
      first.destroy();
      // Its client is answered at once (no longer in flight), and the look-up goes on, held, for the two.
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
    } finally {
      release();
    }
    const rs = await Promise.all(joined);
    expect(rs.map((r) => [r.status, r.json.code ?? preds(r.json)[0]!.seed])).toEqual([[200, 41], [200, 41]]);
    expect(b64(rs[0]!) === b64(rs[1]!)).toBe(true);
    // The first's generation, theirs: before, its look-up stopped with its client, the generation was cancelled, and
    // the first of them back looked the adapter up afresh for a generation of its own (one hit, the other's).
    const after = await counts();
    // Its client's leaving counted once (before, not at all: it was neither queued nor in a batch).
    expect({ images: after.images - before.images, hits: after.hits - before.hits, left: after.left - before.left }).toEqual({ images: 1, hits: 2, left: 1 });
  }, 60_000);

  it.sequential('clients that leave while their generations\' adapters are looked up, none joined to them, are counted in inference_cancelled_total{reason="client_left"}', async () => {
    const left = () => metric(srv, 'inference_cancelled_total', { reason: 'client_left' });
    const inst = { prompt: 'a fox that left', num_inference_steps: 2, height: 64, width: 64, loras: [{ name: 'left', scale: 0.5 }] };
    const before = await left();
    const release = holdLists();
    try {
      const lists = proxy.stats.lists;
      // Seeded (a generation others could join) and not.
      const clients = [rawPredict(srv.port, { ...inst, seed: 57 }), rawPredict(srv.port, inst)];
      await until(() => proxy.stats.lists > lists);
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
      for (const c of clients) c.destroy();
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0, 20_000, 5);
    } finally {
      release();
    }
    // Before: 0, where leaving the queue or a batch is counted.
    expect((await left()) - before).toBe(2);
  }, 60_000);

  /** The worker busy with a long generation (`seed`) and the queue (MAX_QUEUE=1) full behind it; ended by the returned call. */
  const fullQueue = async (seed: number) => {
    const long = { num_inference_steps: 500, height: 512, width: 512 };
    const blocker = rawPredict(srv.port, { prompt: 'blocker', seed, ...long });
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 20_000, 10);
    const queued = rawPredict(srv.port, { prompt: 'queued', seed: seed + 1, ...long });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 20_000, 5);
    return () => {
      blocker.destroy();
      queued.destroy();
    };
  };

  it.sequential('counts each request joined to a generation refused once its adapters were looked up (the queue full) in inference_rejected_total, once', async () => {
    const rejected = () => metric(srv, 'inference_rejected_total', { reason: 'queue_full' });
    const unblock = await fullQueue(51);
    const inst = { prompt: 'a fox refused', seed: 53, num_inference_steps: 2, height: 64, width: 64, loras: [{ name: 'refused', scale: 0.5 }] };
    const before = await rejected();
    const release = holdLists();
    let rs: Array<Awaited<ReturnType<typeof predict>>>;
    try {
      const lists = proxy.stats.lists;
      const first = predict(srv, inst);
      await until(() => proxy.stats.lists > lists);
      // Joined to it: a request, and one of two identical instances (both join it).
      const joined = [predict(srv, inst), postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst, inst] })];
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 5, 20_000, 5);
      release();
      rs = await Promise.all([first, ...joined]);
    } finally {
      release();
      unblock();
    }
    expect(rs.map((r) => [r.status, r.json.code])).toEqual([[503, 'BUSY'], [503, 'BUSY'], [503, 'BUSY']]);
    // Before, only the first: the others got its 503 uncounted.
    expect((await rejected()) - before).toBe(3);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
  }, 60_000);

  it.sequential('a generation whose client left while its adapters were looked up, refused once they were (the queue full): counted for the request joined to it, not for the one that left', async () => {
    const rejected = () => metric(srv, 'inference_rejected_total', { reason: 'queue_full' });
    const unblock = await fullQueue(54);
    const inst = { prompt: 'a fox gone', seed: 56, num_inference_steps: 2, height: 64, width: 64, loras: [{ name: 'gone', scale: 0.5 }] };
    const before = await rejected();
    const release = holdLists();
    let r: Awaited<ReturnType<typeof predict>>;
    try {
      const lists = proxy.stats.lists;
      const first = rawPredict(srv.port, inst);
      await until(() => proxy.stats.lists > lists);
      const joined = predict(srv, inst);
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 4, 20_000, 5);
      first.destroy();
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 3, 20_000, 5);
      release();
      r = await joined;
    } finally {
      release();
      unblock();
    }
    expect([r.status, r.json.code]).toEqual([503, 'BUSY']);
    // Before: 2, the request whose client had left (answered 499 then) counted as refused too.
    expect((await rejected()) - before).toBe(1);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
  }, 60_000);

  /**
   * Two identical V2 requests for adapter `name` while S3 throttles the LIST of its look-up: the generation's own,
   * then one joined to it once S3 has throttled (V2, for a deadline of its own: parameters.timeout is no part of the
   * result-cache key). `stopped`, the one with a 3 s deadline, gets a 504 naming the throttling; the other, once the
   * storm ends, the images.
   */
  const throttledLookup = async (name: string, stopped: 'owner' | 'joined') => {
    const infer = (deadline: boolean) => postJson(`${srv.url}/v2/models/model/infer`, { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: [`a fox ${name}`] }],
      parameters: { num_inference_steps: 2, height: 64, width: 64, seed: 46, loras: JSON.stringify([{ name, scale: 0.5 }]), ...(deadline ? { timeout: 3_000_000 } : {}) } });
    const slowDowns = proxy.stats.slowDowns;
    proxy.faults.slowDown = { lists: true };
    let other: ReturnType<typeof infer> | undefined;
    let timedOut: Awaited<ReturnType<typeof infer>>;
    try {
      const owner = infer(stopped === 'owner');
      await until(() => proxy.stats.slowDowns > slowDowns);
      const joined = infer(stopped === 'joined');
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
      [timedOut, other] = stopped === 'owner' ? [await owner, joined] : [await joined, owner];
    } finally {
      delete proxy.faults.slowDown;
    }
    // Both answered before any check: a failing case leaves no generation in flight for the next.
    const served = await other!;
    expect([timedOut.status, timedOut.json.code]).toEqual([504, 'TIMEOUT']);
    expect(timedOut.json.error).toMatch(new RegExp(`^the request took longer than its parameters\\.timeout \\(3000000 µs\\) and was stopped: adapter "${name}": S3 was throttling its fetch from LORA_URI \\(SlowDown, \\d+ throttled answers? in \\d+(\\.\\d)? s\\)$`));
    expect([served.status, served.json.code]).toEqual([200, undefined]);
  };

  it.sequential('a request stopped at its deadline while S3 throttles its adapter\'s look-up, which an identical request waits for: its 504 names the throttling, and the other gets the images', async () => {
    // Before: "… its parameters.timeout (3000000 µs) and was stopped", no word of S3: its look-up went on for the other,
    // and its client was told only that it left.
    await throttledLookup('throttled', 'owner');
  }, 60_000);

  it.sequential('a request joined to a generation whose adapter\'s look-up S3 throttles, stopped at its own deadline: its 504 names the throttling, and the generation\'s own request gets the images', async () => {
    // Before: "… its parameters.timeout (3000000 µs) and was stopped", no word of S3: it was told only that it left.
    await throttledLookup('throttled-joined', 'joined');
  }, 60_000);

  // Last: it stops the server.
  it.sequential('SIGTERM while a request waits for the generation of one whose client left while its adapter was looked up: served within the drain, one generation', async () => {
    // Read off the registry: the listener is closed by the time the drain ends.
    const images = async () => (await srv.rt.metrics.images.get()).values.reduce((n, v) => n + v.value, 0);
    const images0 = await images();
    const inst = { prompt: 'a fox at the stop', seed: 44, num_inference_steps: 2, height: 64, width: 64, loras: [{ name: 'drain', scale: 0.5 }] };
    const release = holdLists();
    let stopped: Promise<void> | undefined;
    let got: Awaited<ReturnType<typeof predict>> | undefined;
    try {
      const lists = proxy.stats.lists;
      const first = rawPredict(srv.port, inst);
      await until(() => proxy.stats.lists > lists);
      const joined = predict(srv, inst);
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
      first.destroy();
      await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1, 20_000, 5);
      stopped = srv.stop(30_000);
      await until(() => srv.rt.stopping);
      // In flight at the signal: the drain waits for it, and for the generation it waits for, queued after the signal.
      expect(srv.rt.generation.inflight).toBe(1);
      release();
      got = await joined;
    } finally {
      release();
    }
    await stopped;
    expect([got.status, preds(got.json)[0]?.seed]).toEqual([200, 44]);
    expect(srv.all('shut-down')).toEqual([{ drained: true }]);
    expect((await images()) - images0).toBe(1);
  }, 60_000);
});

describe.concurrent('dynamic batching', () => {
  lane();
  let srv: RuntimeHandle;
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined, MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '200', RESULT_CACHE_MB: '0' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  const oneBatchAsAlone = (a: Record<string, unknown>, b: Record<string, unknown>) => oneBatchAsAloneOn(srv, a, b);

  it.sequential('runs two concurrent compatible requests as ONE batch, each image byte-equal to its unbatched run', async () => {
    const a = { prompt: 'a red fox in the snow', negative_prompt: 'blurry', num_inference_steps: 12, height: 128, width: 128, seed: 41 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 12, height: 128, width: 128, seed: 42 };
    const count0 = await metric(srv, 'inference_batch_size_count');
    const sum0 = await metric(srv, 'inference_batch_size_sum');
    const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
    expect([ra.status, rb.status]).toEqual([200, 200]);
    // One generation of two requests: count +1, sum +2.
    expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(1);
    expect((await metric(srv, 'inference_batch_size_sum')) - sum0).toBe(2);
    expect(preds(ra.json)[0]!.seed).toBe(41);
    expect(preds(rb.json)[0]!.seed).toBe(42);

    // Unbatched, one after the other (each waits out the window alone): batch size 1 each.
    const sa = await predict(srv, a);
    const sb = await predict(srv, b);
    expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(3);
    expect((await metric(srv, 'inference_batch_size_sum')) - sum0).toBe(4);
    // Booleans, not strings: a failure should not print two base64 PNGs.
    const b64 = (r: { json: Record<string, unknown> }) => preds(r.json)[0]!.image.b64;
    expect(b64(ra) === b64(sa)).toBe(true);
    expect(b64(rb) === b64(sb)).toBe(true);
    expect(b64(ra) === b64(rb)).toBe(false);
  });

  it.sequential('batches requests of other guidance scales together (each image guided by its own), not with and without an unconditional pass', async () => {
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, height: 64, width: 64, seed: 45, guidance_scale: 7.5 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 4, height: 64, width: 64, seed: 46, guidance_scale: 4 };
    await oneBatchAsAlone(a, b);
    // guidance 1 has no unconditional pass: its own batch
    const count1 = await metric(srv, 'inference_batch_size_count');
    const [rc, rd] = await Promise.all([predict(srv, { ...a, seed: 47 }), predict(srv, { ...b, seed: 48, guidance_scale: 1 })]);
    expect([rc.status, rd.status]).toEqual([200, 200]);
    expect((await metric(srv, 'inference_batch_size_count')) - count1).toBe(2);
  });

  it.sequential('batches requests of other guidance_rescale values together (each image rescaled by its own, per image as diffusers does), each byte-equal to its run alone', async () => {
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, height: 64, width: 64, seed: 49, guidance_rescale: 0.7 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 4, height: 64, width: 64, seed: 50, guidance_scale: 4 };
    const [ra, rb] = await oneBatchAsAlone(a, b);
    // the rescale changes the image, so each image of the batch did take its own value (b: none)
    expect(b64(ra) === b64(await predict(srv, { ...a, guidance_rescale: 0 }))).toBe(false);
    expect(b64(rb) === b64(await predict(srv, { ...b, guidance_rescale: 0.7 }))).toBe(false);
    await oneBatchAsAlone({ ...a, guidance_rescale: 0.3 }, { ...b, guidance_rescale: 1 });
  });

  it.sequential("batches requests of other etas together where their scheduler ignores eta (the model's own, euler_a), not for ddim, whose step takes it", async () => {
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, height: 64, width: 64, seed: 51, eta: 0.5 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 4, height: 64, width: 64, seed: 52 };
    await oneBatchAsAlone(a, b);
    await oneBatchAsAlone({ ...a, scheduler: 'euler_a' }, { ...b, scheduler: 'euler_a', eta: 1 });
    const [ra] = await twoBatchesOn(srv, { ...a, scheduler: 'ddim' }, { ...b, scheduler: 'ddim' });
    expect(b64(ra) === b64(await predict(srv, { ...a, scheduler: 'ddim', eta: 0 }))).toBe(false);
  });

  it.sequential('batches requests of other output formats together, each image encoded as its request asked', async () => {
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, height: 64, width: 64, seed: 43, output_format: 'jpeg', quality: 70 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 4, height: 64, width: 64, seed: 44 };
    const count0 = await metric(srv, 'inference_batch_size_count');
    const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
    expect([ra.status, rb.status]).toEqual([200, 200]);
    expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(1);
    const meta = async (r: { json: Record<string, unknown> }) => (await sharp(Buffer.from(preds(r.json)[0]!.image.b64!, 'base64')).metadata()).format;
    expect([preds(ra.json)[0]!.format, await meta(ra), preds(rb.json)[0]!.format, await meta(rb)]).toEqual(['jpeg', 'jpeg', 'png', 'png']);
    // the PNG is the one its request makes alone
    expect(preds(rb.json)[0]!.image.b64 === preds((await predict(srv, b)).json)[0]!.image.b64).toBe(true);
  });

  it.sequential('serves the added schedulers (unipc, lms_karras, deis, heun, dpmpp_2s_karras; ddpm, dpmpp_2m_sde_karras, dpmpp_3m_sde, dpm2_a_karras and sa_solver: noise per image; dpmpp_sde_karras: a Brownian tree per image) batched, each image byte-equal to its run alone', async () => {
    for (const scheduler of ['unipc', 'lms_karras', 'ddpm', 'deis', 'dpmpp_2m_sde_karras', 'dpmpp_3m_sde', 'heun', 'dpm2_a_karras', 'dpmpp_2s_karras', 'dpmpp_sde_karras', 'sa_solver']) {
      const a = { prompt: 'a red fox in the snow', num_inference_steps: 9, height: 64, width: 64, seed: 5, scheduler };
      const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 9, height: 64, width: 64, seed: 6, scheduler };
      const count0 = await metric(srv, 'inference_batch_size_count');
      const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
      expect([ra.status, rb.status], scheduler).toEqual([200, 200]);
      expect((await metric(srv, 'inference_batch_size_count')) - count0, scheduler).toBe(1);
      const b64 = (r: { json: Record<string, unknown> }) => preds(r.json)[0]!.image.b64;
      expect(b64(ra) === b64(await predict(srv, a)), scheduler).toBe(true);
      expect(b64(rb) === b64(await predict(srv, b)), scheduler).toBe(true);
      expect(b64(ra) === b64(await predict(srv, { ...a, scheduler: 'pndm' })), scheduler).toBe(false);
    }
  });

  it.sequential("serves tcd with eta 0.3 (its gamma: noise per image) batched, each image byte-equal to its run alone; eta 0 is another image", async () => {
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, guidance_scale: 1.5, height: 64, width: 64, seed: 5, scheduler: 'tcd', eta: 0.3 };
    const b = { ...a, prompt: 'a lighthouse at dusk', seed: 6 };
    const [ra] = await oneBatchAsAlone(a, b);
    expect(b64(ra) === b64(await predict(srv, { ...a, eta: 0 }))).toBe(false);
    const over = await predict(srv, { ...a, num_inference_steps: 51 });
    expect([over.status, over.json]).toEqual([400, { error: 'instances[0].num_inference_steps must be from 1 to 50 for scheduler tcd (original_inference_steps is 50), got 51', code: 'INVALID_INPUT' }]);
  });

  it.sequential('a client that leaves a running batch is counted once and freed; the batch runs on, and the other image is byte-equal to its run alone', async () => {
    // Long enough that the client leaves while the batch runs, not after.
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 500, height: 384, width: 384, seed: 61 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 500, height: 384, width: 384, seed: 62 };
    const before = { count: await metric(srv, 'inference_batch_size_count'), sum: await metric(srv, 'inference_batch_size_sum'), steps: await metric(srv, 'denoising_steps_total'),
      left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }), cancelled: await metric(srv, 'inference_cancelled_total'), gone: await metric(srv, 'inference_request_count', { protocol: 'v1', status: '499' }) };
    const leaves = rawPredict(srv.port, a);
    const stays = predict(srv, b);
    await until(async () => (await metric(srv, 'inference_batch_size_count')) - before.count === 1, 20_000, 5);
    leaves.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1, 20_000, 5);
    const r = await stays;
    expect(r.status).toBe(200);
    // One batch of both, not stopped for b: its UNet ran every step, as b's run alone does (a batched step counts once).
    expect([(await metric(srv, 'inference_batch_size_count')) - before.count, (await metric(srv, 'inference_batch_size_sum')) - before.sum]).toEqual([1, 2]);
    const batchSteps = (await metric(srv, 'denoising_steps_total')) - before.steps;
    expect((await metric(srv, 'inference_cancelled_total', { reason: 'client_left' })) - before.left).toBe(1);
    expect((await metric(srv, 'inference_cancelled_total')) - before.cancelled).toBe(1);
    await until(async () => (await metric(srv, 'inference_request_count', { protocol: 'v1', status: '499' })) - before.gone === 1, 2_000);
    expect([await metric(srv, 'inference_requests_in_flight'), await metric(srv, 'inference_queue_depth'), await metric(srv, 'worker_busy')]).toEqual([0, 0, 0]);
    const steps0 = await metric(srv, 'denoising_steps_total');
    expect(b64(r) === b64(await predict(srv, b))).toBe(true);
    expect((await metric(srv, 'denoising_steps_total')) - steps0).toBe(batchSteps);
  });

  it.sequential('does not batch requests of different shapes together', async () => {
    const count0 = await metric(srv, 'inference_batch_size_count');
    const sum0 = await metric(srv, 'inference_batch_size_sum');
    const [x, y] = await Promise.all([
      predict(srv, { prompt: 'x', num_inference_steps: 3, height: 64, width: 64, seed: 1 }),
      predict(srv, { prompt: 'y', num_inference_steps: 4, height: 64, width: 64, seed: 1 }),
    ]);
    expect([x.status, y.status]).toEqual([200, 200]);
    expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(2);
    expect((await metric(srv, 'inference_batch_size_sum')) - sum0).toBe(2);
  });
});

describe.concurrent('dynamic batching on an LCM-distilled UNet (guidance embedded, no unconditional pass)', () => {
  lane();
  let srv: RuntimeHandle;
  beforeAll(async () => {
    const dir = await fixtureModel({ family: 'lcm' });
    srv = await startRuntime({ STORAGE_URI: dir, MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '200', RESULT_CACHE_MB: '0' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  const all = (r: { json: Record<string, unknown> }) => preds(r.json).map((p) => p.image.b64);

  it.sequential('batches guidance 1 with guidance 8.5 (each image its own w embedding), each image byte-equal to its run alone', async () => {
    // Two images each: the UNet runs at batch 2 alone as well. ONNX Runtime's CPU MatMul without weight pre-packing
    // (onnx.ts sessionOptions) rounds a batch-1 run otherwise than a larger one, on this UNet even for equal guidance.
    const a = { prompt: 'a red fox in the snow', num_inference_steps: 4, height: 64, width: 64, seed: 53, guidance_scale: 8.5, num_images_per_prompt: 2 };
    const b = { prompt: 'a lighthouse at dusk', num_inference_steps: 4, height: 64, width: 64, seed: 55, guidance_scale: 1, num_images_per_prompt: 2 };
    const count0 = await metric(srv, 'inference_batch_size_count');
    const [ra, rb] = await Promise.all([predict(srv, a), predict(srv, b)]);
    expect([ra.status, rb.status]).toEqual([200, 200]);
    expect((await metric(srv, 'inference_batch_size_count')) - count0).toBe(1);
    expect(all(ra).join() === all(await predict(srv, a)).join()).toBe(true);
    expect(all(rb).join() === all(await predict(srv, b)).join()).toBe(true);
    // the scale still guides each image
    expect(all(ra)[0] === all(await predict(srv, { ...a, guidance_scale: 1 }))[0]).toBe(false);
  });
});

describe.concurrent('bounded queue and cancellation (MAX_QUEUE=1)', () => {
  lane();
  let srv: RuntimeHandle;
  const long = { prompt: 'long', num_inference_steps: 200, height: 1024, width: 1024, seed: 1 };
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined, MAX_QUEUE: '1', MAX_IMAGE_SIZE: '1024', RESULT_CACHE_MB: '0' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));
  /**
   * Until the worker holds the long generation, out of the queue (it waits there up to BATCH_WINDOW_MS for company):
   * a fixed 100 ms stood for it, and a request sent while it still waited found the queue full.
   */
  const onWorker = () => until(async () => (await metric(srv, 'worker_busy')) === 1, 10_000, 25);

  it.sequential('answers 503 with Retry-After when the queue is full, and keeps serving', async () => {
    const running = predict(srv, long);
    await onWorker();
    const queued = predict(srv, { ...long, seed: 2, num_inference_steps: 2, height: 64, width: 64 });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 10_000, 25);
    const refused = await predict(srv, { prompt: 'third', num_inference_steps: 2, height: 64, width: 64 });
    expect(refused.status).toBe(503);
    expect(refused.json).toEqual({ error: expect.stringMatching(/queue is full \(1 waiting\)/), code: 'BUSY' });
    expect(Number(refused.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(await metric(srv, 'inference_rejected_total', { reason: 'queue_full' })).toBe(1);
    // A step count its scheduler cannot take is refused when the body is parsed: a 400, not a queue slot (or a 503).
    const lcm = await predict(srv, { prompt: 'lcm', scheduler: 'lcm', num_inference_steps: 51, height: 64, width: 64 });
    expect([lcm.status, lcm.json]).toEqual([400, { error: 'instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 51', code: 'INVALID_INPUT' }]);
    expect((await running).status).toBe(200);
    expect((await queued).status).toBe(200);
  });

  it.sequential('queues a request of several instances as one: served on an idle server, waiting in one place behind another', async () => {
    const small = (i: number) => ({ prompt: `part ${i}`, num_inference_steps: 2, height: 64, width: 64, seed: 20 + i });
    const many = (from: number) => postJson(`${srv.url}/v1/models/model:predict`, { instances: [small(from), small(from + 1), small(from + 2)] });
    // The first instance runs at once, the other two wait: each used to take a place, so the third was refused "queue
    // full" on an idle server, however long its client waited to retry.
    const idle = await many(0);
    expect([idle.status, idle.json.error]).toEqual([200, undefined]);
    expect(preds(idle.json).map((p) => p.seed)).toEqual([20, 21, 22]);
    const running = predict(srv, long);
    await onWorker();
    const waiting = many(3);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 10_000, 25);
    expect(await metric(srv, 'inference_queue_depth')).toBe(1);
    const refused = await predict(srv, small(6));
    expect([refused.status, refused.json.code]).toEqual([503, 'BUSY']);
    expect((await running).status).toBe(200);
    const served = await waiting;
    expect([served.status, preds(served.json).map((p) => p.seed)]).toEqual([200, [23, 24, 25]]);
  });

  it.sequential('counts a refused request of several instances once in inference_rejected_total, as the 503 it gets', async () => {
    const running = predict(srv, long);
    await onWorker();
    const queued = predict(srv, { prompt: 'queued', num_inference_steps: 2, height: 64, width: 64, seed: 30 });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 10_000, 25);
    const rejected0 = await metric(srv, 'inference_rejected_total', { reason: 'queue_full' });
    const small = (i: number) => ({ prompt: `refused ${i}`, num_inference_steps: 2, height: 64, width: 64, seed: 40 + i });
    const refused = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [small(0), small(1), small(2)] });
    expect([refused.status, refused.json.code]).toEqual([503, 'BUSY']);
    expect((await metric(srv, 'inference_rejected_total', { reason: 'queue_full' })) - rejected0).toBe(1);
    expect([(await running).status, (await queued).status]).toEqual([200, 200]);
  });

  it.sequential('removes a queued request whose client left: cancelled counted, depth back to 0, never generated', async () => {
    const images0 = await metric(srv, 'images_generated_total');
    const cancelled0 = await metric(srv, 'inference_cancelled_total');
    const left0 = await metric(srv, 'inference_cancelled_total', { reason: 'client_left' });
    const running = predict(srv, long);
    await onWorker();
    // A queued request as long as the running one: if it were not removed, the next request would wait for it.
    const sock = rawPredict(srv.port, { ...long, seed: 9 });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 10_000, 25);
    sock.destroy();
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 0, 2_000);
    expect((await metric(srv, 'inference_cancelled_total')) - cancelled0).toBe(1);
    expect((await metric(srv, 'inference_cancelled_total', { reason: 'client_left' })) - left0).toBe(1);
    // Counted and logged as a 499 (client closed the request), as the WebSocket counts a client that leaves.
    await until(async () => (await metric(srv, 'inference_request_count', { protocol: 'v1', status: '499' })) === 1, 2_000);
    expect(srv.logs.filter((l) => l.msg === 'inference request' && l.status === 499)).toHaveLength(1);
    const next = predict(srv, { prompt: 'next', num_inference_steps: 2, height: 64, width: 64, seed: 3 });
    const [first, n] = await Promise.all([running, next]);
    expect([first.status, n.status]).toEqual([200, 200]);
    // Two images: the running one's and "next"'s; the cancelled one was never generated.
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(2);
  });

  it.sequential('a request whose own timeout passes while it is queued leaves the queue: 504, counted as a timeout, never generated', async () => {
    const images0 = await metric(srv, 'images_generated_total');
    const timeouts0 = await metric(srv, 'inference_cancelled_total', { reason: 'timeout' });
    const cancelled0 = await metric(srv, 'inference_cancelled_total');
    // Held until the test lets it go, so the V2 request below waits in the queue for all of its 1.5 s.
    const blocker = rawPredict(srv.port, { ...long, num_inference_steps: 500, seed: 12 });
    await onWorker();
    const v2 = postJson(`${srv.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['queued too long'] }], parameters: { num_inference_steps: 2, height: 64, width: 64, seed: 13, timeout: 1_500_000 },
    });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 10_000, 25);
    const r = await v2;
    expect([r.status, r.json.code, r.json.error]).toEqual([504, 'TIMEOUT', 'the request took longer than its parameters.timeout (1500000 µs) and was stopped']);
    expect(await metric(srv, 'inference_queue_depth')).toBe(0);
    expect((await metric(srv, 'inference_cancelled_total', { reason: 'timeout' })) - timeouts0).toBe(1);
    blocker.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
    // The blocker, stopped when its client left, and the V2 request: neither made an image.
    expect((await metric(srv, 'inference_cancelled_total')) - cancelled0).toBe(2);
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(0);
  });
});

describe.concurrent('mixed traffic (MAX_BATCH_SIZE=4): shapes, schedulers, step counts and identical requests at once, then clients that leave and a timeout', () => {
  lane();
  let srv: RuntimeHandle;
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined, MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '100', RESULT_CACHE_MB: '4' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  it.sequential('answers each as it should, counts each once, and leaves in flight, queue depth and worker_busy at 0', async () => {
    const counter = async () => ({
      left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }), timeout: await metric(srv, 'inference_cancelled_total', { reason: 'timeout' }),
      failed: await metric(srv, 'inference_cancelled_total', { reason: 'request_failed' }), hits: await metric(srv, 'result_cache_hits_total'),
      rejected: await metric(srv, 'inference_rejected_total'),
    });
    const before = await counter();
    // Pairs alike in everything a batch must share, and pairs that differ in one thing a batch must share.
    const mixed = [
      { height: 64, width: 64, num_inference_steps: 3 }, { height: 64, width: 64, num_inference_steps: 3 },
      { height: 64, width: 128, num_inference_steps: 3 }, { height: 64, width: 64, num_inference_steps: 4 },
      { height: 64, width: 64, num_inference_steps: 3, scheduler: 'euler_a' }, { height: 64, width: 64, num_inference_steps: 3, scheduler: 'ddim', eta: 0.5 },
      { height: 64, width: 64, num_inference_steps: 3, guidance_scale: 1 }, { height: 64, width: 64, num_inference_steps: 3, num_images_per_prompt: 2 },
    ].map((f, i) => ({ prompt: `mixed ${i}`, seed: 300 + i, ...f }));
    const same = { prompt: 'same', num_inference_steps: 6, height: 64, width: 64, seed: 400 };
    const rs = await Promise.all([...mixed, same, same, same].map((inst) => predict(srv, inst)));
    expect(rs.map((r) => r.status)).toEqual(rs.map(() => 200));
    for (const [i, inst] of mixed.entries()) {
      expect(preds(rs[i]!.json).map((p) => [p.seed, p.width, p.height])).toEqual(Array.from({ length: inst.num_images_per_prompt ?? 1 }, (_, k) => [inst.seed + k, inst.width, inst.height]));
    }
    expect(new Set(rs.slice(mixed.length).map(b64)).size).toBe(1);
    // Then long generations of one shape (a batch of their own, stopped once its clients have all left: they leave once
    // in the engine, queued or running) and one past its parameters.timeout, each long enough that none ends first.
    const batches0 = await metric(srv, 'inference_batch_size_count');
    const long = { prompt: 'leaves', num_inference_steps: 500, height: 512, width: 512 };
    const leavers = [0, 1, 2].map((i) => rawPredict(srv.port, { ...long, seed: 500 + i }));
    const late = postJson(`${srv.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['too slow'] }], parameters: { num_inference_steps: 500, height: 768, width: 768, seed: 600, timeout: 1_000_000 },
    });
    // All four in flight, then a batch window past: every one of them is queued or running.
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 4, 20_000, 5);
    await until(async () => (await metric(srv, 'inference_batch_size_count')) > batches0, 20_000, 5);
    for (const sock of leavers) sock.destroy();
    const t = await late;
    expect([t.status, t.json.code]).toEqual([504, 'TIMEOUT']);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'inference_queue_depth')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
    const after = await counter();
    // Each client that left and the timeout once; nothing refused; two of the three identical requests served by the
    // generation of the first.
    expect({ left: after.left - before.left, timeout: after.timeout - before.timeout, failed: after.failed - before.failed, hits: after.hits - before.hits, rejected: after.rejected - before.rejected })
      .toEqual({ left: 3, timeout: 1, failed: 0, hits: 2, rejected: 0 });
    expect((await predict(srv, { prompt: 'after', num_inference_steps: 2, height: 64, width: 64 })).status).toBe(200);
  });

  // Here, where a batch's window is 100 ms: a request alone waits it out before its batch runs (10 s among the batches
  // that run while others wait).
  it.sequential('a lone client leaving its running batch does not stop it while an identical request is joined to it: that one gets the image, none is generated again', async () => {
    const before = await leftCounts(srv);
    const mine = { prompt: 'a heron that leaves alone', seed: 710, num_inference_steps: 500, height: 512, width: 512 };
    const leaver = rawPredict(srv.port, mine);
    // Its batch (of it alone) running, then the identical request in flight beside it: joined to it, nothing queued.
    await until(async () => (await metric(srv, 'inference_batch_size_count')) > before.batches, 20_000, 5);
    const joined = predict(srv, mine);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
    expect(await metric(srv, 'inference_queue_depth')).toBe(0);
    leaver.destroy();
    const j = await joined;
    expect([j.status, preds(j.json)[0]!.seed]).toEqual([200, 710]);
    // Before, the leaving stopped the batch (nobody else was in it), and the joined request ran its own from the start.
    const again = await predict(srv, mine);
    expect(b64(again) === b64(j)).toBe(true);
    expect(since(before, await leftCounts(srv))).toEqual({ batches: 1, images: 1, hits: 2, left: 1 });
  });
});

describe.concurrent('batches that run while others wait (MAX_BATCH_SIZE=2, BATCH_WINDOW_MS=10000, RESULT_CACHE_MB=4)', () => {
  lane();
  let srv: RuntimeHandle;
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined, MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000', RESULT_CACHE_MB: '4' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  it.sequential('sends a full batch of another shape at once, past a request waiting out its window, which then goes with the company it waited for', async () => {
    const batches0 = await metric(srv, 'inference_batch_size_count');
    const sum0 = await metric(srv, 'inference_batch_size_sum');
    const order: string[] = [];
    const send = (name: string, inst: Record<string, unknown>) => predict(srv, inst).then((r) => (order.push(name), r));
    const square = { num_inference_steps: 2, height: 64, width: 64 };
    const wide = { num_inference_steps: 2, height: 64, width: 128 };
    const a = send('a', { prompt: 'waits for company', seed: 800, ...square });
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 20_000, 5);
    // Before, these two waited behind a for its whole window, the worker idle, then ran after it.
    const [b, c] = await Promise.all([send('b', { prompt: 'wide one', seed: 801, ...wide }), send('c', { prompt: 'wide two', seed: 802, ...wide })]);
    expect([b.status, c.status]).toEqual([200, 200]);
    expect(await metric(srv, 'inference_queue_depth')).toBe(1);
    const [ra, rd] = await Promise.all([a, send('d', { prompt: 'the company', seed: 803, ...square })]);
    expect([ra.status, rd.status, preds(ra.json)[0]!.seed, preds(rd.json)[0]!.seed]).toEqual([200, 200, 800, 803]);
    expect([order.slice(0, 2).sort(), order.slice(2).sort()]).toEqual([['b', 'c'], ['a', 'd']]);
    // Two full batches: b and c, then a and d.
    expect([(await metric(srv, 'inference_batch_size_count')) - batches0, (await metric(srv, 'inference_batch_size_sum')) - sum0]).toEqual([2, 4]);
  });

  it.sequential('leaves the image its batch still makes to the identical request joined to its generation and to the result cache: none is generated again', async () => {
    const before = await leftCounts(srv);
    // Long enough that the client leaves while the batch runs (its leaving is counted only then).
    const shape = { num_inference_steps: 500, height: 512, width: 512 };
    const mine = { prompt: 'a fox that leaves', seed: 700, ...shape };
    const leaver = rawPredict(srv.port, mine);
    const partner = predict(srv, { prompt: 'a lighthouse that stays', seed: 701, ...shape });
    // Their batch running, then the identical request in flight beside them: joined to it, nothing queued.
    await until(async () => (await metric(srv, 'inference_batch_size_count')) > before.batches, 20_000, 5);
    const joined = predict(srv, mine);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 3, 20_000, 5);
    expect(await metric(srv, 'inference_queue_depth')).toBe(0);
    leaver.destroy();
    const [p, j] = await Promise.all([partner, joined]);
    expect([p.status, j.status, preds(j.json)[0]!.seed]).toEqual([200, 200, 700]);
    // Before, the image was dropped with its client: the joined request ran a generation of its own, and only that
    // one reached the cache.
    const again = await predict(srv, mine);
    expect(b64(again) === b64(j)).toBe(true);
    expect(since(before, await leftCounts(srv))).toEqual({ batches: 1, images: 2, hits: 2, left: 1 });
  });
});

describe.concurrent('formats, result cache, output_uri', () => {
  lane();
  let srv: RuntimeHandle;
  let s3: S3Server;
  beforeAll(async () => {
    s3 = await startS3(['out']);
    srv = await startRuntime({ STORAGE_URI: undefined, LORA_URI: 's3://out/loras/', ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', RESULT_CACHE_MB: '4' }, { ready: true });
  });
  afterAll(async () => {
    await srv?.stop();
    if (s3) await destroyS3(s3);
  });

  it.sequential('encodes jpeg and webp (decoded by sharp) and reports the format', async () => {
    for (const [fmt, want] of [['jpeg', 'jpeg'], ['jpg', 'jpeg'], ['webp', 'webp'], ['png', 'png']] as const) {
      const r = await predict(srv, { prompt: 'fmt', num_inference_steps: 3, height: 96, width: 64, seed: 5, output_format: fmt, quality: 70 });
      expect(r.status).toBe(200);
      const p = preds(r.json)[0]!;
      expect([p.format, p.width, p.height]).toEqual([want, 64, 96]);
      const meta = await sharp(Buffer.from(p.image.b64!, 'base64')).metadata();
      expect([meta.format, meta.width, meta.height]).toEqual([want, 64, 96]);
    }
  });

  it.sequential('answers a repeated seeded request from the result cache: identical bytes, no new generation', async () => {
    const inst = { prompt: 'cached fox', num_inference_steps: 5, height: 64, width: 64, seed: 77 };
    const first = await predict(srv, inst);
    const images0 = await metric(srv, 'images_generated_total');
    const hits0 = await metric(srv, 'result_cache_hits_total');
    expect(await metric(srv, 'result_cache_bytes')).toBeGreaterThan(0);
    const again = await predict(srv, inst);
    expect(preds(again.json)[0]!.image.b64 === preds(first.json)[0]!.image.b64).toBe(true);
    expect(await metric(srv, 'images_generated_total')).toBe(images0);
    expect((await metric(srv, 'result_cache_hits_total')) - hits0).toBe(1);
    // Any generation field (format here) is part of the key: a miss.
    const other = await predict(srv, { ...inst, output_format: 'webp' });
    expect(preds(other.json)[0]!.format).toBe('webp');
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(1);
    // Without a seed, never cached.
    const { seed: _, ...unseeded } = inst;
    await predict(srv, unseeded);
    await predict(srv, unseeded);
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(3);
    expect((await metric(srv, 'result_cache_hits_total')) - hits0).toBe(1);
    // What changes no byte changes no key: a quality with PNG (lossless), JPEG's default quality sent or not.
    const png = await predict(srv, { ...inst, quality: 40 });
    expect(preds(png.json)[0]!.image.b64 === preds(first.json)[0]!.image.b64).toBe(true);
    const jpeg = await predict(srv, { ...inst, output_format: 'jpeg' });
    const jpeg90 = await predict(srv, { ...inst, output_format: 'jpeg', quality: 90 });
    expect(preds(jpeg90.json)[0]!.image.b64 === preds(jpeg.json)[0]!.image.b64).toBe(true);
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(4);
    expect((await metric(srv, 'result_cache_hits_total')) - hits0).toBe(3);
    // Nor does a field the scheduler ignores: the model's PNDM takes no eta. What the hit serves is what a generation
    // with that eta gives (the scheduler named, so a miss, and generated).
    const eta = await predict(srv, { ...inst, eta: 0.7 });
    expect(preds(eta.json)[0]!.image.b64 === preds(first.json)[0]!.image.b64).toBe(true);
    expect((await metric(srv, 'result_cache_hits_total')) - hits0).toBe(4);
    const generated = await predict(srv, { ...inst, eta: 0.7, scheduler: 'pndm' });
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(5);
    expect(preds(generated.json)[0]!.image.b64 === preds(first.json)[0]!.image.b64).toBe(true);
    // Nor the negative prompt where no unconditional pass reads it (guidance ≤ 1): a hit, and what a generation gives.
    const plain = await predict(srv, { ...inst, guidance_scale: 1 });
    const hits1 = await metric(srv, 'result_cache_hits_total');
    const negative = await predict(srv, { ...inst, guidance_scale: 1, negative_prompt: 'blurry' });
    expect((await metric(srv, 'result_cache_hits_total')) - hits1).toBe(1);
    const made = await predict(srv, { ...inst, guidance_scale: 1, negative_prompt: 'blurry', scheduler: 'pndm' });
    expect((await metric(srv, 'result_cache_hits_total')) - hits1).toBe(1);
    expect(preds(negative.json)[0]!.image.b64 === preds(plain.json)[0]!.image.b64).toBe(true);
    expect(preds(made.json)[0]!.image.b64 === preds(negative.json)[0]!.image.b64).toBe(true);
  });

  it.sequential('runs one generation for identical seeded requests sent together: the others wait for its bytes, as result-cache hits', async () => {
    const inst = { prompt: 'together', num_inference_steps: 6, height: 64, width: 64, seed: 91 };
    const images0 = await metric(srv, 'images_generated_total');
    const hits0 = await metric(srv, 'result_cache_hits_total');
    // They came as a batch of three generations of the same image.
    const rs = await Promise.all([predict(srv, inst), predict(srv, inst), predict(srv, inst)]);
    expect(rs.map((r) => r.status)).toEqual([200, 200, 200]);
    expect(new Set(rs.map(b64)).size).toBe(1);
    expect((await metric(srv, 'images_generated_total')) - images0).toBe(1);
    expect((await metric(srv, 'result_cache_hits_total')) - hits0).toBe(2);
  });

  it.sequential('runs one generation for identical seeded instances of one request (V1 instances, V2 prompts): each answered in its place with the same bytes and seeds; unseeded ones each generate', async () => {
    const counts = async () => ({
      images: await metric(srv, 'images_generated_total'), hits: await metric(srv, 'result_cache_hits_total'), generations: await metric(srv, 'inference_batch_size_sum'),
    });
    const v1 = (instances: Array<Record<string, unknown>>) => postJson(`${srv.url}/v1/models/model:predict`, { instances });
    const a = { prompt: 'twice in one', num_inference_steps: 4, height: 64, width: 64, seed: 97, num_images_per_prompt: 2 };
    const b = { prompt: 'once in one', num_inference_steps: 4, height: 64, width: 64, seed: 90 };
    const before = await counts();
    const r = await v1([a, b, a, { ...a, output_format: 'jpeg' }]);
    expect(r.status).toBe(200);
    const p = preds(r.json);
    expect(p.map((x) => [x.seed, x.format])).toEqual([[97, 'png'], [98, 'png'], [90, 'png'], [97, 'png'], [98, 'png'], [97, 'jpeg'], [98, 'jpeg']]);
    expect([p[3]!.image.b64 === p[0]!.image.b64, p[4]!.image.b64 === p[1]!.image.b64]).toEqual([true, true]);
    // The third instance answered from the first's generation (before: its two images generated again: 7 images, 4
    // generations, no hit); the JPEG one is another key.
    const after = await counts();
    expect({ images: after.images - before.images, hits: after.hits - before.hits, generations: after.generations - before.generations }).toEqual({ images: 5, hits: 1, generations: 3 });
    // What a generation of that instance gives (the scheduler named: another key, so a generation).
    const alone = await v1([{ ...a, scheduler: 'pndm' }]);
    expect(preds(alone.json).map((x) => x.image.b64 === p[0]!.image.b64 || x.image.b64 === p[1]!.image.b64)).toEqual([true, true]);

    // V2: the same prompt twice with one parameters.seed.
    const v2before = await counts();
    const v2 = await postJson(`${srv.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', shape: [2], datatype: 'BYTES', data: ['twice in v2', 'twice in v2'] }], parameters: { num_inference_steps: 4, height: 64, width: 64, seed: 99 },
    });
    expect(v2.status).toBe(200);
    const out = (name: string) => (v2.json.outputs as Array<{ name: string; data: unknown[] }>).find((o) => o.name === name)!.data;
    expect([out('seed'), out('image')[0] === out('image')[1]]).toEqual([[99, 99], true]);
    const v2after = await counts();
    expect({ images: v2after.images - v2before.images, hits: v2after.hits - v2before.hits }).toEqual({ images: 1, hits: 1 });

    // Each to its own output_uri: one generation, its image written to both.
    const upBefore = await counts();
    const c = { prompt: 'twice to s3', num_inference_steps: 4, height: 64, width: 64, seed: 89 };
    const up = await v1([{ ...c, output_uri: 's3://out/twice/a.png' }, { ...c, output_uri: 's3://out/twice/b.png' }]);
    expect(preds(up.json).map((x) => [x.image.uri, x.seed])).toEqual([['s3://out/twice/a.png', 89], ['s3://out/twice/b.png', 89]]);
    const get = async (key: string) => Buffer.from(await (await s3.client.send(new GetObjectCommand({ Bucket: 'out', Key: key }))).Body!.transformToByteArray());
    expect((await get('twice/a.png')).equals(await get('twice/b.png'))).toBe(true);
    const upAfter = await counts();
    expect({ images: upAfter.images - upBefore.images, hits: upAfter.hits - upBefore.hits }).toEqual({ images: 1, hits: 1 });

    // Without a seed each instance draws its own: each is generated.
    const { seed: _, ...unseeded } = b;
    const random = await v1([unseeded, unseeded]);
    expect(random.status).toBe(200);
    expect(new Set(preds(random.json).map((x) => x.seed)).size).toBe(2);
    const last = await counts();
    expect({ images: last.images - upAfter.images, hits: last.hits - upAfter.hits }).toEqual({ images: 2, hits: 0 });
  });

  it.sequential('a request of identical seeded instances whose client leaves while it is queued leaves the queue whole: counted once, none made', async () => {
    const before = { images: await metric(srv, 'images_generated_total'), left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }) };
    const blocker = rawPredict(srv.port, { prompt: 'blocker', seed: 87, num_inference_steps: 500, height: 512, width: 512 });
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 20_000, 10);
    const inst = { prompt: 'twice and gone', num_inference_steps: 4, height: 64, width: 64, seed: 88 };
    const gone = new AbortController();
    const twice = postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst, inst] }, { signal: gone.signal }).catch(() => 'left');
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2 && (await metric(srv, 'inference_queue_depth')) === 1, 20_000, 5);
    gone.abort();
    expect(await twice).toBe('left');
    // The first instance's generation, which the second waited for, leaves the queue with both.
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1 && (await metric(srv, 'inference_queue_depth')) === 0, 20_000, 5);
    blocker.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
    // One generation queued for the two instances, and its leaving (the blocker's too).
    expect({ images: (await metric(srv, 'images_generated_total')) - before.images, left: (await metric(srv, 'inference_cancelled_total', { reason: 'client_left' })) - before.left }).toEqual({ images: 0, left: 2 });
  });

  it.sequential("an identical request waiting for a queued generation whose client leaves keeps that generation's place in the queue: served before those queued after it", async () => {
    const counts = async () => ({
      images: await metric(srv, 'images_generated_total'), hits: await metric(srv, 'result_cache_hits_total'),
      left: await metric(srv, 'inference_cancelled_total', { reason: 'client_left' }),
    });
    const before = await counts();
    const inst = { prompt: 'left alone', num_inference_steps: 40, height: 256, width: 256, seed: 92 };
    const long = { num_inference_steps: 500, height: 512, width: 512 };
    // The worker held by a long generation of its own until the end: the first request waits queued behind it, however
    // fast its 40 steps would run (~70 ms, which a loaded machine's metric polls could miss).
    const blocker = rawPredict(srv.port, { prompt: 'blocker', seed: 93, ...long });
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 20_000, 10);
    const first = rawPredict(srv.port, inst);
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 20_000, 5);
    // Another request queued behind it: a long one, which ends long after the first's generation would.
    const order: string[] = [];
    const behind = rawPredict(srv.port, { prompt: 'queued behind', seed: 94, ...long });
    behind.once('data', () => order.push('behind'));
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 2, 20_000, 5);
    const second = predict(srv, inst).then((r) => (order.push('second'), r));
    // Counted in flight as it joins the first's generation (in the same turn), which it waits for outside the queue.
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 4, 20_000, 5);
    expect(await metric(srv, 'inference_queue_depth')).toBe(2);
    first.destroy();
    // Answered (and counted) at once; its generation still queued, in its place, for the request joined to it.
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 3, 20_000, 5);
    expect(await metric(srv, 'inference_queue_depth')).toBe(2);
    blocker.destroy();
    const r = await second;
    expect(r.status).toBe(200);
    expect(preds(r.json)[0]).toMatchObject({ seed: 92, width: 256, height: 256 });
    // Before, the first's generation left the queue with its client: the joined request queued one of its own, behind
    // the long one, and was answered after it.
    expect(order).toEqual(['second']);
    behind.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'inference_queue_depth')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
    const after = await counts();
    // One image, made for the request that left and served to the one joined to it (a hit); the three that left, once each.
    expect({ images: after.images - before.images, hits: after.hits - before.hits, left: after.left - before.left }).toEqual({ images: 1, hits: 1, left: 3 });
    expect(b64(await predict(srv, inst)) === b64(r)).toBe(true);
  });

  it.sequential('a queued generation whose client left leaves the queue once the identical request joined to it leaves too: none is made for nobody', async () => {
    const images0 = await metric(srv, 'images_generated_total');
    const inst = { prompt: 'left by both', num_inference_steps: 40, height: 256, width: 256, seed: 95 };
    const blocker = rawPredict(srv.port, { prompt: 'blocker', seed: 96, num_inference_steps: 500, height: 512, width: 512 });
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 20_000, 10);
    const first = rawPredict(srv.port, inst);
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 1, 20_000, 5);
    const joined = rawPredict(srv.port, inst);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 3, 20_000, 5);
    first.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 5);
    expect(await metric(srv, 'inference_queue_depth')).toBe(1);
    joined.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1 && (await metric(srv, 'inference_queue_depth')) === 0, 20_000, 5);
    blocker.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0 && (await metric(srv, 'worker_busy')) === 0, 20_000, 25);
    expect(await metric(srv, 'images_generated_total')).toBe(images0);
  });

  it.sequential('uploads to output_uri and returns the URI instead of bytes (one key, or key-<i>.<ext> for several)', async () => {
    const inst = { prompt: 'to s3', num_inference_steps: 3, height: 64, width: 64, seed: 8 };
    const ref = await predict(srv, inst);
    const r = await predict(srv, { ...inst, output_uri: 's3://out/run/fox.png' });
    expect(r.status).toBe(200);
    expect(preds(r.json)[0]).toEqual({ image: { uri: 's3://out/run/fox.png' }, seed: 8, format: 'png', width: 64, height: 64 });
    const get = async (key: string) => Buffer.from(await (await s3.client.send(new GetObjectCommand({ Bucket: 'out', Key: key }))).Body!.transformToByteArray());
    expect((await get('run/fox.png')).toString('base64') === preds(ref.json)[0]!.image.b64).toBe(true);

    const many = await predict(srv, { ...inst, num_images_per_prompt: 2, output_format: 'webp', output_uri: 's3://out/run/many.webp' });
    expect(preds(many.json).map((p) => [p.image.uri, p.seed])).toEqual([['s3://out/run/many-0.webp', 8], ['s3://out/run/many-1.webp', 9]]);
    expect((await sharp(await get('run/many-1.webp')).metadata()).format).toBe('webp');
  });

  it.sequential('refuses instances that would write one object twice (the last upload replaced the first), V2 prompts that share parameters.output_uri too', async () => {
    const base = { num_inference_steps: 2, height: 64, width: 64, seed: 3 };
    const images0 = await metric(srv, 'images_generated_total');
    const same = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [
      { ...base, prompt: 'a', output_uri: 's3://out/same/a.png' },
      { ...base, prompt: 'b', output_uri: 'S3://out/same/a.png' },
    ] });
    expect([same.status, same.json.error]).toEqual([400, 'instances[0].output_uri and instances[1].output_uri both write s3://out/same/a.png; each image needs an object of its own']);
    // Several images go to <stem>-<i>: the second image of the first instance is the second instance's key.
    const numbered = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [
      { ...base, prompt: 'a', num_images_per_prompt: 2, output_uri: 's3://out/same/m.png' },
      { ...base, prompt: 'b', output_uri: 's3://out/same/m-1.png' },
    ] });
    expect([numbered.status, numbered.json.error]).toEqual([400, 'instances[0].output_uri and instances[1].output_uri both write s3://out/same/m-1.png; each image needs an object of its own']);
    const v2 = (output: Record<string, unknown>) => postJson(`${srv.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', shape: [2], datatype: 'BYTES', data: ['a', 'b'] }, ...('data' in output ? [output] : [])],
      parameters: { ...base, ...('data' in output ? {} : output) },
    });
    const shared = await v2({ output_uri: 's3://out/same/v2.png' });
    expect([shared.status, shared.json.error]).toEqual([400, 'parameters.output_uri writes s3://out/same/v2.png for both prompt[0] and prompt[1]; each image needs an object of its own: give one output_uri per prompt']);
    expect(await metric(srv, 'images_generated_total')).toBe(images0);
    const listed = async () => (await s3.client.send(new ListObjectsV2Command({ Bucket: 'out', Prefix: 'same/' }))).Contents?.map((c) => c.Key) ?? [];
    expect(await listed()).toEqual([]);
    // One key per prompt, as a BYTES input: each image its object.
    const each = await v2({ name: 'output_uri', shape: [2], datatype: 'BYTES', data: ['s3://out/same/v2-a.png', 's3://out/same/v2-b.png'] });
    expect(each.status).toBe(200);
    expect((each.json.outputs as Array<{ name: string; data: unknown[] }>).find((o) => o.name === 'image')!.data).toEqual(['s3://out/same/v2-a.png', 's3://out/same/v2-b.png']);
    expect(await listed()).toEqual(['same/v2-a.png', 'same/v2-b.png']);
  });

  it.sequential('refuses a key longer than S3 takes (1024 bytes of UTF-8) before generating, counting the -<i> of several images', async () => {
    const base = { prompt: 'long key', num_inference_steps: 2, height: 64, width: 64, seed: 5 };
    const images0 = await metric(srv, 'images_generated_total');
    // 518 characters, 1028 bytes.
    const accented = await predict(srv, { ...base, output_uri: `s3://out/run/${'é'.repeat(510)}.png` });
    expect([accented.status, accented.json.error]).toEqual([400, 'instances[0].output_uri: the key is 1028 bytes (UTF-8); S3 takes keys of at most 1024 bytes']);
    // 1024 bytes for one image; run/aaa…-0.png for two is 1026.
    const two = await predict(srv, { ...base, num_images_per_prompt: 2, output_uri: `s3://out/run/${'a'.repeat(1016)}.png` });
    expect([two.status, two.json.error]).toEqual([400, 'instances[0].output_uri: the key is 1026 bytes (UTF-8) with the -<i>.<ext> of 2 images; S3 takes keys of at most 1024 bytes']);
    expect(await metric(srv, 'images_generated_total')).toBe(images0);
  });

  it.sequential('never writes through a key with dot segments: s3rver resolves out/../loras/x to loras/x, an adapter of LORA_URI', async () => {
    const key = 'loras/style/pytorch_lora_weights.safetensors';
    await s3.put('out', key, 'ADAPTER');
    for (const uri of [`s3://out/run/../${key}`, `s3://out/run/./../${key}`]) {
      const r = await predict(srv, { prompt: 'x', num_inference_steps: 2, height: 64, width: 64, seed: 1, output_uri: uri });
      expect([r.status, r.json.error], uri).toEqual([400, "instances[0].output_uri: the key has an empty, '.' or '..' path segment; name the object by its plain key"]);
    }
    const kept = await s3.client.send(new GetObjectCommand({ Bucket: 'out', Key: key }));
    expect(await kept.Body!.transformToString()).toBe('ADAPTER');
  });

  it.sequential('answers a clear error without secrets when the upload fails', async () => {
    const r = await predict(srv, { prompt: 'x', num_inference_steps: 2, height: 64, width: 64, seed: 1, output_uri: 's3://no-such-bucket/a.png' });
    expect(r.status).toBe(400);
    expect(r.json.error).toMatch(/output_uri: cannot write s3:\/\/no-such-bucket\/a\.png: bucket "no-such-bucket" does not exist/);
    expect(JSON.stringify(r.json)).not.toContain(CREDS.AWS_SECRET_ACCESS_KEY);
    const bad = await predict(srv, { prompt: 'x', output_uri: 'http://elsewhere/a.png' });
    expect([bad.status, bad.json.error]).toEqual([400, expect.stringMatching(/output_uri must look like s3:\/\/bucket\/key/)]);
  });
});
