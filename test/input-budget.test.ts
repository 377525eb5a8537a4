/**
 * INPUT_IMAGES_MB through the real server: an image costs its decoded pixels, not its encoded size (a lossless WebP of
 * a few KB decodes to tens of MB), so what the input images of all requests in flight hold is bounded. A request that
 * alone needs more is a 400 naming the limit; one that meets others holding it is a 503 BUSY with Retry-After; what a
 * request held is given back when it ends, the client's leaving included, or, where its generation runs on after the
 * client left (for an identical request joined to it, or the rest of its batch), once that generation ends. Reading the
 * images is part of the request: counted in flight on every route, and bounded by V2's parameters.timeout.
 */
import net from 'node:net';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { parseInstances } from '../src/runtime/request.js';
import { parseContext, readImages, type ServerContext } from '../src/server/context.js';
import { decodesRunning } from '../src/runtime/decode-client.js';
import { bmp, gif1x1 } from './helpers/images.js';
import { CREDS, destroyS3, rejection, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, until } from './helpers/server.js';

const MB = 1024 * 1024;
/** A flat lossless WebP of `side`² pixels, one pixel set to `n` so that each is a distinct input. */
async function flat(side: number, n: number): Promise<string> {
  const px = Buffer.alloc(side * side * 3, 128);
  px[0] = n;
  return (await sharp(px, { raw: { width: side, height: side, channels: 3 } }).webp({ lossless: true, effort: 0 }).toBuffer()).toString('base64');
}

let s3: S3Server;
let proxy: FaultProxy;
let rt: RuntimeHandle;
const predict = (instances: Array<Record<string, unknown>>, init: RequestInit = {}) => postJson(`${rt.url}/v1/models/model:predict`, { instances }, init);
const inst = (image: string) => ({ prompt: 'p', image, height: 64, width: 64, num_inference_steps: 1, seed: 1 });

beforeAll(async () => {
  s3 = await startS3(['inputs']);
  await s3.put('inputs', 'big.webp', Buffer.alloc(40 * MB, 1));
  proxy = await startFaultProxy(s3.port);
  // The served demo (no STORAGE_URI) has a vae_encoder.
  rt = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', INPUT_IMAGES_MB: '64', ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', INPUT_URI_PREFIXES: 's3://inputs' }, { ready: true });
}, 120_000);

afterAll(async () => {
  await rt?.stop();
  await proxy?.close();
  if (s3) await destroyS3(s3);
});

describe('INPUT_IMAGES_MB', () => {
  it('a request whose images alone decode past the budget is a 400 naming it, and holds nothing after', async () => {
    // Three 3000² images: 27 MB each decoded (81 MB), from about 2 KB each of WebP.
    const images = await Promise.all([1, 2, 3].map((n) => flat(3000, n)));
    expect(images.every((b) => b.length < 64 * 1024)).toBe(true);
    const r = await predict(images.map(inst));
    expect(r.status).toBe(400);
    expect(r.json).toMatchObject({ code: 'INVALID_INPUT', error: expect.stringMatching(/^instances\[\d\]\.image: this request's input images need \d+ MB .* over the 64 MB .*\(INPUT_IMAGES_MB\)/) });
    expect(rt.rt.inputBudget.used).toBe(0);
  }, 60_000);

  it('a GIF, a TIFF and a BMP cost their decoded pixels too, counted from their headers', async () => {
    // 3000² each (27 MB decoded, 81 MB together), from a few KB: a 1x1 GIF frame on a 3000x3000 screen (Pillow's canvas),
    // a flat LZW TIFF, an RLE8 BMP of runs of 250.
    const row = Buffer.concat([...Array.from({ length: 12 }, () => Buffer.from([250, 1])), Buffer.from([0, 0])]);
    const files = [
      await gif1x1({ screen: [3000, 3000] }),
      await sharp(Buffer.alloc(3000 * 3000, 60), { raw: { width: 3000, height: 3000, channels: 1 } }).tiff({ compression: 'lzw' }).toBuffer(),
      bmp(3000, 3000, 8, Buffer.concat(Array.from({ length: 3000 }, () => row)), 1),
    ];
    expect(files.every((f) => f.length < 100 * 1024)).toBe(true);
    const r = await predict(files.map((f) => inst(f.toString('base64'))));
    expect(r.status).toBe(400);
    expect(r.json).toMatchObject({ code: 'INVALID_INPUT', error: expect.stringMatching(/^instances\[\d\]\.image: this request's input images need \d+ MB .* over the 64 MB .*\(INPUT_IMAGES_MB\)/) });
    expect(rt.rt.inputBudget.used).toBe(0);
    // Alone, each is served.
    for (const f of files) expect((await predict([inst(f.toString('base64'))])).status).toBe(200);
    expect(rt.rt.inputBudget.used).toBe(0);
  }, 60_000);

  it('a request meeting others that fill the budget is a 503 BUSY; once they end it is served', async () => {
    // A: a 40 MB s3:// input whose body stalls after its first bytes: its size is held while it is read.
    proxy.faults.stallAfterBytes = 1024;
    proxy.faults.stalls = 1;
    const gone = new AbortController();
    const a = predict([inst('s3://inputs/big.webp')], { signal: gone.signal }).catch((err: Error) => err);
    await until(() => rt.rt.inputBudget.used >= 40 * MB, 20_000);
    const before = await metric(rt, 'inference_rejected_total', { reason: 'input_budget' });
    const b = await flat(3000, 9);
    const busy = await predict([inst(b)]);
    expect(busy.status).toBe(503);
    expect(busy.headers.get('retry-after')).toBe('5');
    expect(busy.json).toMatchObject({ code: 'BUSY', error: expect.stringContaining('INPUT_IMAGES_MB') });
    expect(await metric(rt, 'inference_rejected_total', { reason: 'input_budget' })).toBe(before + 1);
    // The client of A leaves: its read is cancelled and what it held is given back.
    gone.abort();
    expect(await a).toBeInstanceOf(Error);
    await until(() => rt.rt.inputBudget.used === 0, 20_000);
    const ok = await predict([inst(b)]);
    expect(ok.status).toBe(200);
    expect(rt.rt.inputBudget.used).toBe(0);
  }, 60_000);

  it('REQUEST_TIMEOUT_S bounds reading the input images: an s3:// input the store stalls gives its share back, a 504', async () => {
    // Before, only the generation counted: a read stalled after its headers held its 40 MB for as long as the client
    // waited, and a few such requests left every later image request a 503.
    proxy.faults.stallAfterBytes = 1024;
    proxy.faults.stalls = 1;
    const r = rt.rt;
    const ctx = { cfg: { ...r.cfg, requestTimeoutS: 1 }, images: r.images, inputBudget: r.inputBudget, metrics: r.metrics, engine: r.engine, randomSeed: () => 1 } as unknown as ServerContext;
    const reqs = parseInstances([inst('s3://inputs/big.webp')], parseContext(ctx), 'instances');
    const hung = new Promise<never>((_, no) => setTimeout(() => no(new Error('still reading after 15 s')), 15_000).unref());
    const err = await rejection(Promise.race([readImages(ctx, reqs), hung]));
    expect(err.code).toBe('TIMEOUT');
    expect(err.message).toMatch(/REQUEST_TIMEOUT_S=1s/);
    await until(() => r.inputBudget.used === 0, 10_000);
  }, 30_000);

  it('a request that ends while its BMP decodes on its thread gives its share back at once, and the thread ends', async () => {
    const r = rt.rt;
    const ctx = { cfg: r.cfg, images: r.images, inputBudget: r.inputBudget, metrics: r.metrics, engine: r.engine, randomSeed: () => 1 } as unknown as ServerContext;
    // 3000² of 24 bits: 27 MB of pixels and the thread's 27 MB copy of the file reserved.
    const file = bmp(3000, 3000, 24, Buffer.alloc(3000 * 3000 * 3, 7));
    const reqs = parseInstances([inst(file.toString('base64'))], parseContext(ctx), 'instances');
    const gone = new AbortController();
    const reading = readImages(ctx, reqs, gone.signal);
    await until(() => decodesRunning() === 1, 10_000, 1);
    expect(r.inputBudget.used).toBe(2 * 3000 * 3000 * 3 + 54);
    gone.abort();
    expect((await rejection(reading)).code).toBe('CANCELLED');
    expect(r.inputBudget.used).toBe(0);
    await until(() => decodesRunning() === 0, 10_000);
  }, 30_000);
});

describe('a generation that runs on after its client left (RESULT_CACHE_MB=4, MAX_BATCH_SIZE=2, BATCH_WINDOW_MS=10000)', () => {
  let own: RuntimeHandle;
  beforeAll(async () => {
    own = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '4', MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' }, { ready: true });
  }, 120_000);
  afterAll(async () => void (await own?.stop()));

  /** A 512² input: its decoded RGB, the share its request holds. */
  const share = 512 * 512 * 3;
  /** Long enough that the clients leave while it runs. */
  const long = { height: 512, width: 512, num_inference_steps: 500, strength: 1 };
  const send = (i: Record<string, unknown>) => {
    const gone = new AbortController();
    const answer = postJson(`${own.url}/v1/models/model:predict`, { instances: [i] }, { signal: gone.signal }).catch(() => 'left');
    return { leave: () => gone.abort(), answer };
  };
  const inFlight = (n: number) => until(async () => (await metric(own, 'inference_requests_in_flight')) === n, 20_000, 5);
  const running = async (batches: number) => until(async () => (await metric(own, 'inference_batch_size_count')) > batches, 20_000, 5);

  it("holds its request's share while it runs on for an identical request joined to it, and gives it back once it stops", async () => {
    // Two images: a full batch of its own, dispatched at once.
    const mine = { prompt: 'kept for another', image: await flat(512, 21), seed: 5, num_images_per_prompt: 2, ...long };
    const batches = await metric(own, 'inference_batch_size_count');
    const first = send(mine);
    let joined: ReturnType<typeof send> | undefined;
    try {
      await running(batches);
      const read = await metric(own, 'request_preprocess_seconds_count');
      joined = send(mine);
      // Its images read (KServe's preprocess ends there), it joins the generation in the same turn: nothing queued.
      await until(async () => (await metric(own, 'request_preprocess_seconds_count')) > read, 20_000, 5);
      expect([own.rt.inputBudget.used, await metric(own, 'inference_queue_depth')]).toEqual([2 * share, 0]);
      first.leave();
      expect(await first.answer).toBe('left');
      await inFlight(1);
      // Before, the share was given back with the answer while the generation held the images: `share`.
      expect(own.rt.inputBudget.used).toBe(2 * share);
    } finally {
      // The joined request leaves too: the generation stops, and its images are given back with it.
      first.leave();
      joined?.leave();
    }
    await until(async () => own.rt.inputBudget.used === 0 && (await metric(own, 'worker_busy')) === 0, 20_000, 25);
  }, 60_000);

  it("holds its request's share while its batch runs on for the other request in it, and gives it back once it stops", async () => {
    const image = await flat(512, 22);
    const batches = await metric(own, 'inference_batch_size_count');
    const a = send({ prompt: 'leaves its batch', image, seed: 6, ...long });
    const b = send({ prompt: 'stays in its batch', image, seed: 7, ...long });
    // One batch of the two: it waits for company (BATCH_WINDOW_MS) until both are queued.
    try {
      await running(batches);
      expect(own.rt.inputBudget.used).toBe(2 * share);
      a.leave();
      await inFlight(1);
      // Before, `share`, as above.
      expect(own.rt.inputBudget.used).toBe(2 * share);
    } finally {
      a.leave();
      b.leave();
    }
    await until(async () => own.rt.inputBudget.used === 0 && (await metric(own, 'worker_busy')) === 0, 20_000, 25);
  }, 60_000);
});

describe('reading the input images', () => {
  const pic = () => sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 80, b: 40 } } }).png().toBuffer();
  const fields = { prompt: 'p', seed: 1, num_inference_steps: 1 };
  const status = async (res: Response) => (await res.text(), res.status);
  const v2 = (image: string, parameters: Record<string, unknown> = {}) => postJson(`${rt.url}/v2/models/model/infer`, {
    inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['p'] }, { name: 'image', datatype: 'BYTES', shape: [1], data: [image] }],
    parameters: { seed: 1, num_inference_steps: 1, height: 64, width: 64, ...parameters },
  });
  /** The WebSocket's answer as the HTTP status its close code stands for (1000: 200). */
  const viaWs = (inst: Record<string, unknown>) => new Promise<number>((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${rt.port}/v1/models/model/stream`);
    ws.on('open', () => ws.send(JSON.stringify(inst)));
    ws.on('error', () => undefined);
    ws.on('close', (code) => resolve(code === 1000 ? 200 : code - 4000));
  });
  /** GETs of `key` held by the proxy until the returned function is called. */
  const holdGets = (key: RegExp): (() => void) => {
    let release!: () => void;
    proxy.faults.hold = { keys: key, release: new Promise<void>((r) => (release = r)) };
    return () => {
      proxy.faults.hold = undefined;
      release();
    };
  };

  beforeAll(async () => {
    await s3.put('inputs', 'pic.png', await pic());
  });

  it('is counted in flight on every route: V1, V2, an OpenAI edit and the WebSocket, while an s3:// input is read', async () => {
    const image = 's3://inputs/pic.png';
    const edit = () => {
      const f = new FormData();
      for (const [k, v] of Object.entries({ ...fields, image, size: '64x64' })) f.append(k, String(v));
      return fetch(`${rt.url}/openai/v1/images/edits`, { method: 'POST', body: f }).then(status);
    };
    const routes: Array<[string, () => Promise<number>]> = [
      ['V1', async () => (await predict([{ ...fields, image, height: 64, width: 64 }])).status],
      ['V2', async () => (await v2(image)).status],
      ['OpenAI edit', edit],
      ['WebSocket', () => viaWs({ ...fields, image, height: 64, width: 64 })],
    ];
    // Per route: the gauge and the drain's count while the input is read, then the answer and the gauge after it.
    const seen: Array<[string, number, number]> = [];
    for (const [route, send] of routes) {
      const release = holdGets(/\/pic\.png/);
      const held = proxy.stats.held;
      const answer = send();
      try {
        await until(() => proxy.stats.held > held, 20_000);
        seen.push([route, await metric(rt, 'inference_requests_in_flight'), rt.rt.generation.inflight]);
      } finally {
        release();
      }
      seen.push([route, await answer, await metric(rt, 'inference_requests_in_flight')]);
    }
    // Before, 0 until the request was queued: a pod busy fetching (or decoding) large inputs showed nothing in flight.
    expect(seen).toEqual(routes.flatMap(([route]) => [[route, 1, 1], [route, 200, 0]]));
  }, 60_000);

  it('is part of a request in flight at SIGTERM: the drain waits for it, and the request is served', async () => {
    const own = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', INPUT_URI_PREFIXES: 's3://inputs' }, { ready: true });
    const release = holdGets(/\/pic\.png/);
    try {
      const held = proxy.stats.held;
      const answer = postJson(`${own.url}/v1/models/model:predict`, { instances: [{ ...fields, image: 's3://inputs/pic.png', height: 64, width: 64 }] });
      await until(() => proxy.stats.held > held, 20_000);
      const stopped = own.stop(30_000);
      expect((await own.waitFor('draining')).inflight).toBe(1);
      release();
      // Before, it was refused once read, 503 SHUTTING_DOWN, as a request that arrived after the signal is.
      const r = await answer;
      expect([r.status, r.json.error]).toEqual([200, undefined]);
      await stopped;
      expect(own.all('shut-down')).toEqual([{ drained: true }]);
    } finally {
      release();
      await own.stop();
    }
  }, 60_000);

  it('is not begun for a request whose body came after SIGTERM: refused 503 at once, its input never fetched', async () => {
    const own = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', INPUT_URI_PREFIXES: 's3://inputs' }, { ready: true });
    const release = holdGets(/\/pic\.png/);
    const sock = net.connect(own.port, '127.0.0.1');
    try {
      let got = '';
      sock.on('data', (c: Buffer) => (got += c.toString()));
      const body = JSON.stringify({ instances: [{ ...fields, image: 's3://inputs/pic.png', height: 64, width: 64 }] });
      // The head is taken (its 100 Continue says the checks before the body passed) before the signal; the body after.
      sock.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nexpect: 100-continue\r\n\r\n`);
      await until(() => got.startsWith('HTTP/1.1 100 '));
      const stopped = own.stop(30_000);
      await own.waitFor('draining');
      const held = proxy.stats.held;
      sock.write(body);
      const answered = () => /\r\n\r\n[^]*\r\n\r\n\{[^]*\}$/.test(got);
      await until(() => answered() || proxy.stats.held > held, 20_000);
      // Before, its input was fetched after the signal (the drain waiting on the store) only for the engine to refuse it.
      expect(proxy.stats.held).toBe(held);
      expect(got).toMatch(/\r\n\r\nHTTP\/1\.1 503 [^]*"code":"SHUTTING_DOWN"/);
      await stopped;
      expect(own.all('shut-down')).toEqual([{ drained: true }]);
    } finally {
      release();
      sock.destroy();
      await own.stop();
    }
  }, 60_000);

  it("V2's parameters.timeout bounds it, with the 504 a generation that outlives it gets, and gives its share back", async () => {
    // The 40 MB input's body stalls after its first bytes: its size is held from its headers on. Before, only
    // REQUEST_TIMEOUT_S (600 s here) bounded the read.
    proxy.faults.stallAfterBytes = 1024;
    proxy.faults.stalls = 1;
    const stalls = proxy.stats.stalls;
    const hung = new Promise<never>((_, no) => setTimeout(() => no(new Error('still reading after 15 s')), 15_000).unref());
    const r = await Promise.race([v2('s3://inputs/big.webp', { timeout: 1_000_000 }), hung]);
    expect([r.status, r.json]).toEqual([504, { code: 'TIMEOUT', error: 'the request took longer than its parameters.timeout (1000000 µs) and was stopped' }]);
    expect(proxy.stats.stalls).toBe(stalls + 1);
    expect(rt.rt.generation.inflight).toBe(0);
    await until(() => rt.rt.inputBudget.used === 0, 10_000);
  }, 30_000);
});
