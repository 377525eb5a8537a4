/**
 * The engine's scheduling against a scripted worker (no ORT): what it sends and when, driven by the messages a
 * pipeline worker sends back. The real worker is covered end to end by the serving tests.
 */
import { EventEmitter } from 'node:events';
import type { Worker } from 'node:worker_threads';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { loadConfig } from '../src/config.js';
import { httpStatus, type RuntimeError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { createMetrics } from '../src/metrics.js';
import type { FromWorker, ToWorker } from '../src/pipeline/protocol.js';
import { pipelineClassDefaults } from '../src/pipeline/pipeline.js';
import { Engine, type EngineEvents, type TaskResult } from '../src/runtime/engine.js';
import { createGeneration } from '../src/runtime/generation.js';
import type { RequestS3 } from '../src/storage/request-s3.js';
import type { GenerationRequest } from '../src/runtime/request.js';
import type { SpawnedWorker } from '../src/runtime/workers.js';
import { until } from './helpers/server.js';

/** A worker that records what it is sent and replies only when the test says so. */
class ScriptedWorker extends EventEmitter {
  readonly sent: ToWorker[] = [];
  reply: (m: FromWorker) => void = () => undefined;
  postMessage(m: ToWorker): void {
    this.sent.push(m);
    if (m.t === 'close') setImmediate(() => this.emit('exit', 0));
  }
  terminate(): Promise<number> {
    this.emit('exit', 1);
    return Promise.resolve(1);
  }
  generations(): Array<Extract<ToWorker, { t: 'generate' }>> {
    return this.sent.filter((m): m is Extract<ToWorker, { t: 'generate' }> => m.t === 'generate');
  }
}

function spawned(w: ScriptedWorker): SpawnedWorker {
  return {
    worker: w as unknown as Worker,
    attach(onMessage, onError, onExit) {
      w.reply = onMessage;
      w.on('error', onError);
      w.on('exit', onExit);
    },
  };
}

const request = (prompt: string): GenerationRequest => ({
  shape: { steps: 2, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0 },
  items: [{ prompt, negativePrompt: undefined, seed: 1, numImages: 1 }],
  seedsGiven: true,
  output: { format: 'png', quality: undefined, uri: undefined },
  previewEvery: 0,
});

const tick = () => new Promise((r) => setImmediate(r));
const image = { rgb: new Uint8Array(64 * 64 * 3).buffer, width: 64, height: 64, seed: 1 };
const times = { textEncoderMs: 1, denoiseMs: 2, vaeMs: 3, steps: 2 };

/** A model folder with two adapter files (the engine only looks them up; the worker here is scripted). */
const modelDir = mkdtempSync(path.join(os.tmpdir(), 'engine-test-'));
mkdirSync(path.join(modelDir, 'loras'));
for (const n of ['style-x', 'style-y']) writeFileSync(path.join(modelDir, 'loras', `${n}.safetensors`), '');
afterAll(() => rmSync(modelDir, { recursive: true, force: true }));

async function loadedEngine(env: Record<string, string> = {}, events: EngineEvents = {}): Promise<{ engine: Engine; w: ScriptedWorker; metrics: ReturnType<typeof createMetrics> }> {
  const w = new ScriptedWorker();
  const metrics = createMetrics();
  const engine = new Engine(loadConfig({ MAX_BATCH_SIZE: '1', ...env }), createLogger('silent'), metrics, events);
  engine.start([spawned(w)]);
  const loaded = engine.load(modelDir);
  w.reply({ t: 'loaded', defaults: { ...pipelineClassDefaults('StableDiffusionPipeline', false), steps: 2, height: 64, width: 64, scheduler: 'PNDMScheduler' }, tokenizerDirs: [], providers: {}, optimize: [] });
  await loaded;
  return { engine, w, metrics };
}

describe('engine', () => {
  it("logs an image the encoder refuses (beneath the request's checks: a 16384-wide WebP), and tells the client its reason", async () => {
    const lines: Array<Record<string, unknown>> = [];
    const w = new ScriptedWorker();
    const engine = new Engine(loadConfig({ MAX_BATCH_SIZE: '1' }), createLogger('info', 'engine-test', { write: (s: string) => void lines.push(JSON.parse(s)) }), createMetrics());
    engine.start([spawned(w)]);
    const loaded = engine.load(modelDir);
    w.reply({ t: 'loaded', defaults: { ...pipelineClassDefaults('StableDiffusionPipeline', false), steps: 2, height: 64, width: 64, scheduler: 'PNDMScheduler' }, tokenizerDirs: [], providers: {}, optimize: [] });
    await loaded;
    const wide = request('a');
    wide.shape = { ...wide.shape, height: 64, width: 16384 };
    wide.output = { format: 'webp', quality: 90, uri: undefined };
    const result = engine.submit(wide).then(() => 'encoded', (e: RuntimeError) => [e.code, e.message]);
    await tick();
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [{ rgb: new Uint8Array(16384 * 64 * 3).buffer, width: 16384, height: 64, seed: 1 }], times });
    expect(await result).toEqual(['INTERNAL', 'the generated images could not be encoded: Processed image is too large for the WebP format']);
    expect(lines.filter((l) => l.level === 'error')).toEqual([expect.objectContaining({
      msg: 'the generated images could not be encoded', height: 64, width: 16384, formats: ['webp'],
      err: expect.objectContaining({ message: 'Processed image is too large for the WebP format', stack: expect.any(String) }),
    })]);
    await engine.close();
  });

  it('hands the next batch to a worker whose last batch is decoding, one decode ahead at most', async () => {
    const { engine, w } = await loadedEngine();
    const results = ['a', 'b', 'c'].map((p) => engine.submit(request(p)).then((r) => r.images.length, (e: Error) => e.message));
    await tick();
    expect(w.generations().map((g) => g.job.items[0]!.prompt)).toEqual(['a']);
    w.reply({ t: 'denoised', id: w.generations()[0]!.id });
    await tick();
    // b's UNet steps start while a decodes; c waits: a and b would both be decoding once b is denoised.
    expect(w.generations().map((g) => g.job.items[0]!.prompt)).toEqual(['a', 'b']);
    const idB = w.generations()[1]!.id;
    w.reply({ t: 'denoised', id: idB });
    await tick();
    expect(w.generations()).toHaveLength(2);
    expect(engine.busy).toBe(1);
    // a's result frees a decode slot: c goes out.
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [image], times });
    await tick();
    expect(w.generations().map((g) => g.job.items[0]!.prompt)).toEqual(['a', 'b', 'c']);
    w.reply({ t: 'result', id: idB, images: [image], times });
    w.reply({ t: 'error', id: w.generations()[2]!.id, code: 'INVALID_INPUT', message: 'no' });
    expect(await Promise.all(results)).toEqual([1, 1, 'no']);
    await engine.idle();
    expect(engine.busy).toBe(0);
    await engine.close();
  });

  it('a client that leaves while its batch decodes still stops the worker (a decode can wait for a VAE still downloading)', async () => {
    const { engine, w } = await loadedEngine();
    const gone = new AbortController();
    const result = engine.submit(request('a'), { signal: gone.signal }).then(() => 'ok', (e: Error) => e.message);
    await tick();
    const id = w.generations()[0]!.id;
    w.reply({ t: 'denoised', id });
    await tick();
    gone.abort();
    expect(await result).toBe('the request was abandoned while generating');
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([{ t: 'cancel', id }]);
    w.reply({ t: 'error', id, code: 'CANCELLED', message: 'generation cancelled' });
    await engine.idle();
    await engine.close();
  });

  it('a worker that dies fails both the batch it was stepping and the one it was decoding', async () => {
    const { engine, w } = await loadedEngine();
    const results = ['a', 'b'].map((p) => engine.submit(request(p)).then(() => 'ok', (e: Error) => e.message));
    await tick();
    w.reply({ t: 'denoised', id: w.generations()[0]!.id });
    await tick();
    expect(w.generations()).toHaveLength(2);
    w.emit('exit', 1);
    expect(await Promise.all(results)).toEqual([0, 1].map(() => expect.stringMatching(/^the generation failed: the pipeline worker running it stopped/)));
    await engine.close(); // before the replacement worker the engine starts would load anything
  });

  it('with its one worker dead during the drain, a request admitted before SIGTERM is refused SHUTTING_DOWN at once, not queued for nobody', async () => {
    const serving: Array<[boolean, string]> = [];
    const { engine, w, metrics } = await loadedEngine({}, { onServing: (now, reason) => void serving.push([now, reason]) });
    engine.stopAccepting();
    w.emit('exit', 1);
    await engine.idle();
    // Before, the reason said "starting it again", which the drain does not.
    expect(serving).toEqual([[false, 'pipeline worker 0 stopped (exit code 1); not started again: the server is shutting down']]);
    // In flight at the signal (reading its input images), it comes to the queue now: no worker will take it.
    const late = await engine.submit(request('late'), { admitted: true }).then(() => undefined, (e: RuntimeError) => [e.code, e.message, e.retryAfter]);
    expect(late).toEqual(['SHUTTING_DOWN', 'the server is shutting down', 1]);
    expect([engine.queueDepth, (await metrics.rejected.get()).values.find((v) => v.labels.reason === 'shutting_down')?.value]).toEqual([0, 1]);
    expect(w.sent.filter((m) => m.t === 'load')).toHaveLength(1); // the boot's: not started again
    await engine.close();
  });
});

describe('engine close', () => {
  it('leaves inference_queue_depth and worker_busy at 0: the batch it cut and the requests it refused are answered', async () => {
    const { engine, w, metrics } = await loadedEngine();
    const gauge = async (m: { get(): Promise<{ values: Array<{ value: number }> }> }) => (await m.get()).values.map((v) => v.value);
    const running = engine.submit(request('running')).catch((e: RuntimeError) => e.code);
    const queued = engine.submit(request('queued')).catch((e: RuntimeError) => e.code);
    await tick();
    expect([await gauge(metrics.queueDepth), await gauge(metrics.workerBusy)]).toEqual([[1], [1]]);
    await engine.close();
    expect([await running, await queued]).toEqual(['SHUTTING_DOWN', 'SHUTTING_DOWN']);
    // Before, both kept the values they had at the close.
    expect([await gauge(metrics.queueDepth), await gauge(metrics.workerBusy)]).toEqual([[0], [0]]);
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([{ t: 'cancel', id: w.generations()[0]!.id }]);
  });
});

describe('engine batching (MAX_BATCH_SIZE > 1)', () => {
  const shaped = (prompt: string, over: Partial<GenerationRequest['shape']> = {}, numImages = 1): GenerationRequest => {
    const r = request(prompt);
    return { ...r, shape: { ...r.shape, ...over }, items: [{ ...r.items[0]!, numImages }] };
  };
  const batches = (w: ScriptedWorker) => w.generations().map((g) => g.job.items.map((i) => `${i.prompt}×${i.numImages}`));
  const seeded = (seed: number) => ({ ...image, seed });
  /** Polls (bounded) until the engine has sent `n` generations: the batch window's timer is the engine's own. */
  const sent = async (w: ScriptedWorker, n: number) => {
    for (let i = 0; i < 1000 && w.generations().length < n; i++) await new Promise((r) => setTimeout(r, 5));
    expect(w.generations()).toHaveLength(n);
  };
  // Some tests run the batch window on their own clock (a faked performance.now): the real one is back even after a failure.
  afterEach(() => {
    vi.useRealTimers();
  });

  it('holds a lone request for its window, then sends it with the compatible one that arrives: one job, results split back', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const a = engine.submit(request('a'));
    await tick();
    expect(w.generations()).toHaveLength(0); // waiting for company, well inside its window
    const b = engine.submit(request('b'));
    await tick();
    // Full at two images: sent at once, without waiting out the window.
    expect(batches(w)).toEqual([['a×1', 'b×1']]);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [seeded(11), seeded(22)], times });
    const [ra, rb] = await Promise.all([a, b]);
    expect([ra.images.map((i) => i.seed), ra.batchSize]).toEqual([[11], 2]);
    expect([rb.images.map((i) => i.seed), rb.batchSize]).toEqual([[22], 2]);
    await engine.close();
  });

  it('a full batch of another shape goes at once past a request waiting out its window, which then goes with the company it waited for', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const wide = (prompt: string) => shaped(prompt, { width: 128 });
    const a = engine.submit(request('a'));
    await tick();
    const full = [engine.submit(wide('b')), engine.submit(wide('c'))];
    await tick();
    // Before, b and c waited behind a for its whole window (the worker idle), then ran after a.
    expect(batches(w)).toEqual([['b×1', 'c×1']]);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [seeded(2), seeded(3)], times });
    expect((await Promise.all(full)).map((r) => r.images[0]!.seed)).toEqual([2, 3]);
    expect(w.generations()).toHaveLength(1); // a still waits for company, inside its window
    const d = engine.submit(request('d'));
    await tick();
    expect(batches(w)).toEqual([['b×1', 'c×1'], ['a×1', 'd×1']]);
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [seeded(1), seeded(4)], times });
    expect([(await a).images[0]!.seed, (await d).images[0]!.seed]).toEqual([1, 4]);
    await engine.close();
  });

  it('a full queue\'s Retry-After counts the batches its requests make, not the requests', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '4', MAX_QUEUE: '8', BATCH_WINDOW_MS: '10000' });
    const running = Array.from({ length: 4 }, (_, i) => engine.submit(request(`run-${i}`)).catch(() => undefined));
    await tick();
    expect(w.generations()).toHaveLength(1);
    // Queued behind it: six of one shape (two batches of four) and two of another (one batch).
    const queued = [...Array.from({ length: 6 }, (_, i) => shaped(`a-${i}`)), ...Array.from({ length: 2 }, (_, i) => shaped(`b-${i}`, { width: 128 }))]
      .map((r) => engine.submit(r).catch(() => undefined));
    await tick();
    expect(engine.queueDepth).toBe(8);
    const refused = await engine.submit(request('late')).then(() => undefined, (e: RuntimeError) => e);
    // Three batches queued and the one running, at the 5 s a generation is taken to last before one has been timed.
    expect([refused?.code, refused?.retryAfter]).toEqual(['BUSY', 20]);
    await engine.close();
    await Promise.all([...running, ...queued]);
  });

  it('sends a partial batch when its window ends', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '30' });
    const a = engine.submit(request('a'));
    await sent(w, 1);
    expect(batches(w)).toEqual([['a×1']]);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [seeded(5)], times });
    expect((await a).images.map((i) => i.seed)).toEqual([5]);
    await engine.close();
  });

  it('batches only requests of one shape, counting images (not requests) against MAX_BATCH_SIZE; each encoded in its own format', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '3', BATCH_WINDOW_MS: '30' });
    // The window runs on the test's clock (only performance.now is faked): the burst of submits below is one instant,
    // and the window ends when the test says. On the wall clock a loaded machine closed it between two submits.
    vi.useFakeTimers({ toFake: ['performance'] });
    const results = [
      engine.submit(shaped('a', {}, 2)),
      engine.submit(shaped('big', { width: 128 })),
      engine.submit(shaped('two', {}, 2)), // 2 + 2 > 3: waits for the next batch
      engine.submit({ ...shaped('jpeg'), output: { format: 'jpeg', quality: 60, uri: undefined } }), // fills the first batch: 2 + 1 = 3
      engine.submit(shaped('c')),
    ];
    await tick();
    expect(batches(w)).toEqual([['a×2', 'jpeg×1']]);
    // The worker takes the next batch while this one decodes: the full one of the first shape, past the older request
    // alone in its shape, which waits out its window.
    w.reply({ t: 'denoised', id: w.generations()[0]!.id });
    await tick();
    expect(batches(w)).toEqual([['a×2', 'jpeg×1'], ['two×2', 'c×1']]);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [seeded(1), seeded(2), seeded(3)], times });
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [seeded(5), seeded(6), seeded(7)], times });
    await tick();
    expect(w.generations()).toHaveLength(2);
    vi.advanceTimersByTime(30);
    await sent(w, 3);
    w.reply({ t: 'result', id: w.generations()[2]!.id, images: [seeded(4)], times });
    const out = await Promise.all(results);
    expect(batches(w)).toEqual([['a×2', 'jpeg×1'], ['two×2', 'c×1'], ['big×1']]);
    expect(out.map((r) => r.images.map((i) => i.seed))).toEqual([[1, 2], [4], [5, 6], [3], [7]]);
    // the bytes are what each request asked for: PNG's signature, JPEG's SOI marker
    const magic = (i: { data: ArrayBuffer }) => Buffer.from(i.data).subarray(0, 2).toString('hex');
    expect(out.map((r) => r.images.map((i) => [i.format, magic(i)]))).toEqual([
      [['png', '8950'], ['png', '8950']], [['png', '8950']], [['png', '8950'], ['png', '8950']], [['jpeg', 'ffd8']], [['png', '8950']],
    ]);
    expect(w.generations()[2]!.job.shape.width).toBe(128);
    await engine.close();
  });

  it('stops a batch only when all its clients have left; one that stays gets its image', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const goneA = new AbortController();
    const goneB = new AbortController();
    const a = engine.submit(request('a'), { signal: goneA.signal }).then((r) => r.images.length, (e: Error) => e.message);
    const b = engine.submit(request('b'), { signal: goneB.signal }).then((r) => r.images.length, (e: Error) => e.message);
    const c = engine.submit(request('c')).then((r) => r.images.map((i) => i.seed), (e: Error) => e.message);
    const d = engine.submit(request('d'));
    await tick();
    expect(batches(w)).toEqual([['a×1', 'b×1']]);
    goneA.abort();
    expect(await a).toBe('the request was abandoned while generating');
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([]); // b still waits for it
    goneB.abort();
    expect(await b).toBe('the request was abandoned while generating');
    const first = w.generations()[0]!.id;
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([{ t: 'cancel', id: first }]);
    w.reply({ t: 'error', id: first, code: 'CANCELLED', message: 'generation cancelled' });
    await tick();
    // The next batch: c stays, d is a plain request; a worker error fails the whole batch, a result serves it.
    expect(batches(w)).toEqual([['a×1', 'b×1'], ['c×1', 'd×1']]);
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [seeded(8), seeded(9)], times });
    expect(await c).toEqual([8]);
    expect((await d).images.map((i) => i.seed)).toEqual([9]);
    await engine.idle();
    await engine.close();
  });

  it('counts each client that leaves a running batch once, and cancels the batch once', async () => {
    const { engine, w, metrics } = await loadedEngine({ MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '10000' });
    const cancelled = async () => (await metrics.cancelled.get()).values.reduce((n, v) => n + v.value, 0);
    // One client with three generations (a V1 request of three instances shares one signal), and one that stays.
    const gone = new AbortController();
    const left = ['a', 'b', 'c'].map((p) => engine.submit(request(p), { signal: gone.signal }).then(() => 'ok', (e: Error) => e.message));
    const stays = new AbortController();
    const kept = engine.submit(request('d'), { signal: stays.signal });
    await tick();
    expect(batches(w)).toEqual([['a×1', 'b×1', 'c×1', 'd×1']]);
    gone.abort();
    expect(await Promise.all(left)).toEqual(Array(3).fill('the request was abandoned while generating'));
    // Three generations whose client left, though their batch runs on for d.
    expect(await cancelled()).toBe(3);
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([]);
    const id = w.generations()[0]!.id;
    w.reply({ t: 'result', id, images: [seeded(1), seeded(2), seeded(3), seeded(4)], times });
    expect((await kept).images.map((i) => i.seed)).toEqual([4]);
    expect(await cancelled()).toBe(3);

    // A batch whose only client (four generations, one signal) leaves: stopped once, each generation counted once.
    const gone2 = new AbortController();
    const all = ['e', 'f', 'g', 'h'].map((p) => engine.submit(request(p), { signal: gone2.signal }).then(() => 'ok', (e: Error) => e.message));
    await sent(w, 2);
    gone2.abort();
    await Promise.all(all);
    const second = w.generations()[1]!.id;
    expect(w.sent.filter((m) => m.t === 'cancel')).toEqual([{ t: 'cancel', id: second }]);
    expect(await cancelled()).toBe(7);
    w.reply({ t: 'error', id: second, code: 'CANCELLED', message: 'generation cancelled' });
    await engine.idle();
    await engine.close();
  });

  it('counts the steps and images of a generation that finished after its clients left (the cancel came too late): the device made them', async () => {
    const { engine, w, metrics } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const sum = async (m: { get(): Promise<{ values: Array<{ value: number }> }> }) => (await m.get()).values.reduce((n, v) => n + v.value, 0);
    const counts = async () => [await sum(metrics.steps), await sum(metrics.images), await sum(metrics.workerImages)];
    // A batch of two whose clients both leave.
    const gone = new AbortController();
    const left = ['a', 'b'].map((p) => engine.submit(request(p), { signal: gone.signal }).then(() => 'ok', (e: Error) => e.message));
    await sent(w, 1);
    gone.abort();
    expect(await Promise.all(left)).toEqual(Array(2).fill('the request was abandoned while generating'));
    // The worker had finished before the cancel reached it: its result arrives for nobody.
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [image, image], times });
    await engine.idle();
    // As a batch that one of its clients left counts all its images (below): the images are the device's work, as the steps.
    expect(await counts()).toEqual([times.steps, 2, 2]);
    // A batch of two whose one client leaves.
    const going = new AbortController();
    const c = engine.submit(request('c'), { signal: going.signal }).catch(() => undefined);
    const d = engine.submit(request('d'));
    await sent(w, 2);
    going.abort();
    await c;
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [image, image], times });
    expect((await d).images).toHaveLength(1);
    expect(await counts()).toEqual([2 * times.steps, 4, 4]);
    await engine.close();
  });

  it('a worker error fails every request of the batch with its code', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const results = ['a', 'b'].map((p) => engine.submit(request(p)).then(() => 'ok', (e: RuntimeError) => [e.code, e.message]));
    await tick();
    w.reply({ t: 'error', id: w.generations()[0]!.id, code: 'INVALID_INPUT', message: 'bad latents' });
    expect(await Promise.all(results)).toEqual([['INVALID_INPUT', 'bad latents'], ['INVALID_INPUT', 'bad latents']]);
    await engine.close();
  });

  it('runs a batch that ran out of memory again one request at a time, ahead of the queue; only a request alone fails', async () => {
    const { engine, w, metrics } = await loadedEngine({ MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '30' });
    // As above: a, b and c fill one batch however slow the machine; d's window ends when the test says.
    vi.useFakeTimers({ toFake: ['performance'] });
    const outcome = (p: Promise<unknown>) => p.then(() => 'ok', (e: RuntimeError) => [e.code, httpStatus(e.code), e.message]);
    const gone = new AbortController();
    const steps: number[] = [];
    const a = outcome(engine.submit(shaped('a', {}, 2), { onProgress: (p) => steps.push(p.step) }));
    const b = outcome(engine.submit(shaped('b'), { signal: gone.signal }));
    const c = outcome(engine.submit(shaped('c')));
    await tick();
    const d = outcome(engine.submit(shaped('d')));
    expect(batches(w)).toEqual([['a×2', 'b×1', 'c×1']]);
    // b's client leaves: the batch runs on for a and c, and b is not run again.
    gone.abort();
    const oom = (i: number) => w.reply({ t: 'error', id: w.generations()[i]!.id, code: 'OUT_OF_MEMORY', message: 'the generation ran out of memory', detail: 'Failed to allocate memory for requested buffer of size 1' });
    // A step of the batch that runs out: its progress, handed out once a runs again alone, is not a's any more.
    w.reply({ t: 'progress', id: w.generations()[0]!.id, step: 7, of: 20 });
    oom(0);
    // Before d, each in a batch of its own (c and d would fit together), without waiting for company.
    await sent(w, 2);
    w.reply({ t: 'progress', id: w.generations()[1]!.id, step: 1, of: 20 });
    oom(1);
    expect(await a).toEqual(['OUT_OF_MEMORY', 507, "out of memory: 2 images of 64x64 (height x width) do not fit in this server's memory, even run alone; ask for a smaller height and width or fewer images (num_images_per_prompt), or use a server with a bigger GPU"]);
    await sent(w, 3);
    w.reply({ t: 'result', id: w.generations()[2]!.id, images: [seeded(3)], times });
    vi.advanceTimersByTime(30);
    await sent(w, 4);
    w.reply({ t: 'result', id: w.generations()[3]!.id, images: [seeded(4)], times });
    expect(await Promise.all([b, c, d])).toEqual([['CANCELLED', 499, 'the request was abandoned while generating'], 'ok', 'ok']);
    expect(batches(w)).toEqual([['a×2', 'b×1', 'c×1'], ['a×2'], ['c×1'], ['d×1']]);
    expect(steps).toEqual([1]);
    const counted = Object.fromEntries((await metrics.outOfMemory.get()).values.map((v) => [v.labels.outcome, v.value]));
    expect(counted).toEqual({ split: 1, failed: 1 });
    await engine.close();
  });
});

describe('engine with several workers (one per GPU)', () => {
  async function twoWorkers(): Promise<{ engine: Engine; ws: ScriptedWorker[]; metrics: ReturnType<typeof createMetrics> }> {
    const ws = [new ScriptedWorker(), new ScriptedWorker()];
    const metrics = createMetrics();
    const engine = new Engine(loadConfig({ MAX_BATCH_SIZE: '1', WORKERS: '2', GPUS: '2', EXECUTION_PROVIDER: 'cuda' }), createLogger('silent'), metrics);
    engine.start(ws.map(spawned));
    const loaded = engine.load('/model');
    for (const w of ws) w.reply({ t: 'loaded', defaults: { ...pipelineClassDefaults('StableDiffusionPipeline', false), steps: 2, height: 64, width: 64, scheduler: 'PNDMScheduler' }, tokenizerDirs: [], providers: {}, optimize: [] });
    await loaded;
    return { engine, ws, metrics };
  }
  const prompts = (w: ScriptedWorker) => w.generations().map((g) => g.job.items[0]!.prompt);

  it('sends each batch to the least busy worker and counts per device', async () => {
    const { engine, ws, metrics } = await twoWorkers();
    const results = ['a', 'b'].map((p) => engine.submit(request(p)).then((r) => r.images.length));
    await tick();
    expect(ws.map(prompts)).toEqual([['a'], ['b']]);
    const busy = async () => (await metrics.workerBusy.get()).values.map((v) => [v.labels.device, v.value]).sort();
    expect(await busy()).toEqual([['cuda:0', 1], ['cuda:1', 1]]);
    // Worker 0 is decoding a, worker 1 is done with b: both could take c, worker 1 is the less busy.
    const [a, b] = ws.map((w) => w.generations()[0]!.id);
    ws[0]!.reply({ t: 'denoised', id: a! });
    ws[1]!.reply({ t: 'denoised', id: b! });
    ws[1]!.reply({ t: 'result', id: b!, images: [image], times });
    await tick();
    results.push(engine.submit(request('c')).then((r) => r.images.length));
    await tick();
    expect(ws.map(prompts)).toEqual([['a'], ['b', 'c']]);
    ws[0]!.reply({ t: 'result', id: a!, images: [image], times });
    ws[1]!.reply({ t: 'result', id: ws[1]!.generations()[1]!.id, images: [image], times });
    expect(await Promise.all(results)).toEqual([1, 1, 1]);
    const images = (await metrics.workerImages.get()).values.map((v) => [v.labels.device, v.value]).sort();
    expect(images).toEqual([['cuda:0', 1], ['cuda:1', 2]]);
    expect(await busy()).toEqual([['cuda:0', 0], ['cuda:1', 0]]);
    await engine.close();
  });

  it('a task pinned to a worker (the warm-up) runs there and alone, and lets other work pass it', async () => {
    const { engine, ws } = await twoWorkers();
    const pinned = engine.submit(request('warm-1'), { worker: 1 });
    const other = engine.submit(request('free'));
    await tick();
    expect(ws.map(prompts)).toEqual([['free'], ['warm-1']]);
    for (const w of ws) w.reply({ t: 'result', id: w.generations()[0]!.id, images: [image], times });
    await Promise.all([pinned, other]);
    await engine.close();
  });
});

describe('engine with LoRA adapter sets', () => {
  const withLoras = (prompt: string, loras?: Array<{ name: string; scale: number }>): GenerationRequest => ({ ...request(prompt), ...(loras ? { loras } : {}) });
  const prompts = (w: ScriptedWorker) => w.generations().map((g) => g.job.items.map((i) => i.prompt).join('+'));

  it('never batches different adapter sets together, and serves the base model while a set is built', async () => {
    const { engine, w } = await loadedEngine({ MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '0' });
    const x = [{ name: 'style-x', scale: 0.8 }];
    const y = [{ name: 'style-y', scale: 1 }];
    const results = [
      engine.submit(withLoras('x1', x)),
      engine.submit(withLoras('base1')),
      engine.submit(withLoras('x2', x)),
      engine.submit(withLoras('y1', y)),
      engine.submit(withLoras('base2')),
    ].map((p) => p.then((r) => r.images.length, (e: Error) => e.message));
    // Each request naming adapters first looks at their files (in libuv's pool: as many turns as its load takes).
    await until(() => w.sent.filter((m) => m.t === 'adapters').length >= 2);
    await tick();
    // Both sets are being built; the base model serves meanwhile.
    expect(w.sent.filter((m) => m.t === 'adapters').map((m) => (m as { key: string }).key)).toEqual(['style-x:0.8', 'style-y:1']);
    expect(prompts(w)).toEqual(['base1']);
    expect(w.generations()[0]!.adapters).toBeUndefined();
    const ready = (key: string) => w.reply({ t: 'adapters-ready', key, ms: { read: 1, merge: 1, sessions: 1, total: 3 }, bytes: 10, patchedBytes: 1, components: ['unet'], formats: {} });
    const finish = async (n: number) => {
      const g = w.generations()[n]!;
      w.reply({ t: 'result', id: g.id, images: g.job.items.map(() => image), times });
      await tick();
    };
    ready('style-y:1');
    await finish(0);
    // base2 arrived before the adapter lookups of the others had finished: it is next in the queue.
    expect(prompts(w)).toEqual(['base1', 'base2']);
    await finish(1);
    // y is ready, x is not: y1 goes ahead of x1 and x2 (earlier in the queue), alone, with its set.
    expect(prompts(w)).toEqual(['base1', 'base2', 'y1']);
    expect(w.generations()[2]!.adapters?.key).toBe('style-y:1');
    expect(w.generations()[2]!.adapters?.refs.map((r) => [r.name, r.scale, path.basename(r.file)])).toEqual([['style-y', 1, 'style-y.safetensors']]);
    ready('style-x:0.8');
    await finish(2);
    expect(prompts(w)).toEqual(['base1', 'base2', 'y1', 'x1+x2']);
    expect(w.generations()[3]!.adapters?.key).toBe('style-x:0.8');
    await finish(3);
    expect(await Promise.all(results)).toEqual([1, 1, 1, 1, 1]);
  });

  it('answers 400 for unknown adapters before queueing, and fails the requests of a set that cannot be built', async () => {
    const { engine, w } = await loadedEngine();
    await expect(engine.submit(withLoras('a', [{ name: 'nope', scale: 1 }, { name: 'style-x', scale: 1 }]))).rejects.toThrow(/unknown LoRA adapter "nope": not found in the model's loras\/ folder; the model has style-x, style-y/);
    expect(w.sent.filter((m) => m.t === 'adapters')).toEqual([]);
    const r = engine.submit(withLoras('b', [{ name: 'style-x', scale: 1 }])).then(() => 'ok', (e: RuntimeError) => [httpStatus(e.code), e.message]);
    await until(() => w.sent.some((m) => m.t === 'adapters'));
    w.reply({ t: 'adapters-failed', key: 'style-x:1', code: 'INVALID_INPUT', message: 'adapter "style-x" has keys that match nothing in this model: unet.foo' });
    expect(await r).toEqual([400, 'adapter "style-x" has keys that match nothing in this model: unet.foo']);
    expect(w.generations()).toEqual([]);
    await engine.idle();
  });

  it('builds an evicted set again when a request needs it', async () => {
    const { engine, w } = await loadedEngine();
    const ready: FromWorker = { t: 'adapters-ready', key: 'style-x:1', ms: { read: 1, merge: 1, sessions: 1, total: 3 }, bytes: 10, patchedBytes: 1, components: ['unet'], formats: {} };
    const one = engine.submit(withLoras('a', [{ name: 'style-x', scale: 1 }]));
    await until(() => w.sent.some((m) => m.t === 'adapters'));
    w.reply(ready);
    await tick();
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [image], times });
    await one;
    w.reply({ t: 'adapters-evicted', key: 'style-x:1' });
    const two = engine.submit(withLoras('b', [{ name: 'style-x', scale: 1 }]));
    await until(() => w.sent.filter((m) => m.t === 'adapters').length >= 2);
    await tick();
    expect(w.sent.filter((m) => m.t === 'adapters')).toHaveLength(2);
    expect(w.generations()).toHaveLength(1);
    w.reply(ready);
    await tick();
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [image], times });
    expect((await two).images).toHaveLength(1);
  });
});

describe('generation of a request of several instances', () => {
  it('a generation refused (an unknown adapter) takes its queued siblings out of the queue: none runs for nobody', async () => {
    const { engine, w, metrics } = await loadedEngine({ RESULT_CACHE_MB: '0' });
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '0' }), createMetrics(), engine, {} as RequestS3);
    const running = engine.submit(request('running'));
    await tick();
    expect(w.generations()).toHaveLength(1);
    // a and b wait (one request: one place in the queue), c names an adapter the model lacks: the request is answered 400 …
    const c = { ...request('c'), loras: [{ name: 'missing', scale: 1 }] };
    const refused = await gen.generate([request('a'), request('b'), c], new AbortController().signal).then(() => 'ok', (e: RuntimeError) => e.code);
    expect(refused).toBe('INVALID_INPUT');
    // … and a and b are no longer waiting, counted as taken out for their request's failure.
    expect(engine.queueDepth).toBe(0);
    const cancelled = (await metrics.cancelled.get()).values;
    expect(Object.fromEntries(cancelled.map((v) => [v.labels.reason, v.value]))).toEqual({ client_left: 0, timeout: 0, request_failed: 2 });
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [image], times });
    await running;
    await engine.idle();
    expect(w.generations().map((g) => g.job.items[0]!.prompt)).toEqual(['running']);
    await engine.close();
  });
});

describe('generation: the result cache and identical requests joined to a running generation', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('a request that leaves or times out while its images are encoded leaves them to the cache and to the requests joined to it, which do not generate them again', async () => {
    const { engine, w, metrics } = await loadedEngine();
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '1' }), metrics, engine, {} as RequestS3);
    const sum = async (m: { get(): Promise<{ values: Array<{ value: number; labels: Record<string, unknown> }> }> }) => (await m.get()).values.reduce((n, v) => n + v.value, 0);
    const outcome = (p: Promise<TaskResult[]>) => p.then((rs) => rs.map((r) => [r.cached === true, r.images.map((i) => i.seed)]), (e: RuntimeError) => e.code);
    const stays = () => new AbortController().signal;
    // Its client leaves once the worker has handed the image over: the batch is done on the device, its image being encoded.
    const gone = new AbortController();
    const a = outcome(gen.generate([request('a')], gone.signal));
    await tick();
    const joined = outcome(gen.generate([request('a')], stays()));
    await tick();
    expect(w.generations()).toHaveLength(1);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [{ ...image, seed: 1 }], times });
    gone.abort();
    expect(await a).toBe('CANCELLED');
    await tick();
    // Before, the image was dropped: the joined request generated it again, and the cache never had it.
    expect(w.generations()).toHaveLength(1);
    expect(await joined).toEqual([[true, [1]]]);
    expect(await outcome(gen.generate([request('a')], stays()))).toEqual([[true, [1]]]);

    // Its deadline (V2's parameters.timeout, a second) runs out at the same point.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const late = outcome(gen.generate([request('b')], stays(), { timeoutMs: 1000 }));
    await tick();
    const joinedLate = outcome(gen.generate([request('b')], stays()));
    await tick();
    expect(w.generations()).toHaveLength(2);
    w.reply({ t: 'result', id: w.generations()[1]!.id, images: [{ ...image, seed: 2 }], times });
    vi.advanceTimersByTime(1000);
    expect(await late).toBe('TIMEOUT');
    await tick();
    expect(w.generations()).toHaveLength(2);
    expect(await joinedLate).toEqual([[true, [2]]]);
    expect(await outcome(gen.generate([request('b')], stays()))).toEqual([[true, [2]]]);
    vi.useRealTimers();
    // Each that left counted once; two generations made two images; four answers from them without a generation.
    expect(Object.fromEntries((await metrics.cancelled.get()).values.map((v) => [v.labels.reason, v.value]))).toEqual({ client_left: 1, timeout: 1, request_failed: 0 });
    expect([await sum(metrics.images), await sum(metrics.resultCacheHits)]).toEqual([2, 4]);
    await engine.idle();
    await engine.close();
  });

  it('a lone client leaving its running batch does not stop it while an identical request joined to it waits: that one gets the images; it stops once both left', async () => {
    const { engine, w, metrics } = await loadedEngine();
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '1' }), metrics, engine, {} as RequestS3);
    const outcome = (p: Promise<TaskResult[]>) => p.then((rs) => rs.map((r) => [r.cached === true, r.images.map((i) => i.seed)]), (e: RuntimeError) => e.code);
    const cancels = () => w.sent.filter((m) => m.t === 'cancel');
    const gone = new AbortController();
    const a = outcome(gen.generate([request('a')], gone.signal));
    await tick();
    const joined = outcome(gen.generate([request('a')], new AbortController().signal));
    await tick();
    // Its batch is stepping (nothing back from the worker yet) when its one client leaves: answered at once, not stopped.
    gone.abort();
    expect(await a).toBe('CANCELLED');
    // Before, the batch was cancelled, and the joined request generated the image again from its first step.
    expect(cancels()).toEqual([]);
    w.reply({ t: 'result', id: w.generations()[0]!.id, images: [{ ...image, seed: 1 }], times });
    expect(await joined).toEqual([[true, [1]]]);
    expect(w.generations()).toHaveLength(1);

    // The client leaves, then the request joined to it: nobody waits for the images any more, and the batch stops.
    const left = [new AbortController(), new AbortController()];
    const b = outcome(gen.generate([request('b')], left[0]!.signal));
    await tick();
    const joinedB = outcome(gen.generate([request('b')], left[1]!.signal));
    await tick();
    left[0]!.abort();
    expect(await b).toBe('CANCELLED');
    expect(cancels()).toEqual([]);
    left[1]!.abort();
    expect(await joinedB).toBe('CANCELLED');
    expect(cancels()).toEqual([{ t: 'cancel', id: w.generations()[1]!.id }]);
    w.reply({ t: 'error', id: w.generations()[1]!.id, code: 'CANCELLED', message: 'generation cancelled' });
    expect(w.generations()).toHaveLength(2);
    await engine.idle();
    await engine.close();
  });

  it('a request identical to a batch told to stop (every party gone) that lands before it stopped revives it: no wait for the stop, no second generation; where the worker had stopped already, it queues its own', async () => {
    const { engine, w, metrics } = await loadedEngine();
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '1' }), metrics, engine, {} as RequestS3);
    const outcome = (p: Promise<TaskResult[]>) => p.then((rs) => rs.map((r) => [r.cached === true, r.images.map((i) => i.seed)]), (e: RuntimeError) => e.code);
    const told = (id: number) => w.sent.filter((m) => (m.t === 'cancel' || m.t === 'resume') && m.id === id).map((m) => m.t);
    // The worker's next step, as pipeline.ts takes it: it stops there if the last word it had for the generation was
    // `cancel` (worker.ts: Cancels), and otherwise runs to its image.
    const nextStep = (id: number, seed: number) =>
      w.reply(told(id).at(-1) === 'cancel' ? { t: 'error', id, code: 'CANCELLED', message: 'generation cancelled: every client left' } : { t: 'result', id, images: [{ ...image, seed }], times });

    const gone = new AbortController();
    const a = outcome(gen.generate([request('a')], gone.signal));
    await tick();
    const first = w.generations()[0]!.id;
    w.reply({ t: 'progress', id: first, step: 1, of: 2 });
    gone.abort();
    expect(await a).toBe('CANCELLED');
    expect(told(first)).toEqual(['cancel']);
    // Its worker is still in the step it was in (one of a second or more on a real model): an identical request lands.
    const joined = outcome(gen.generate([request('a')], new AbortController().signal));
    await tick();
    nextStep(first, 1);
    await tick();
    // Before, nothing was said to the worker: it stopped at that next step, and the request, told CANCELLED, queued
    // the same generation again from its first step, after waiting for the stop.
    expect(w.generations()).toHaveLength(1);
    expect(told(first)).toEqual(['cancel', 'resume']);
    expect(await joined).toEqual([[true, [1]]]);
    // Once more: the last client leaves again, and the batch is told to stop again.
    const again = new AbortController();
    const b = outcome(gen.generate([request('b')], again.signal));
    await tick();
    const second = w.generations()[1]!.id;
    again.abort();
    expect(await b).toBe('CANCELLED');

    // The worker had stopped the generation before its `resume` came (the CANCELLED was on its way back): the request
    // joined to it queues its own, at once.
    const late = outcome(gen.generate([request('b')], new AbortController().signal));
    await tick();
    expect(told(second)).toEqual(['cancel', 'resume']);
    w.reply({ t: 'error', id: second, code: 'CANCELLED', message: 'generation cancelled: every client left' });
    await until(() => w.generations().length === 3);
    const third = w.generations()[2]!.id;
    nextStep(third, 2);
    expect(await late).toEqual([[false, [2]]]);
    await engine.idle();
    await engine.close();
  });

  it('tells the worker to render previews only while a client of the generation or a request joined to it streams them, and encodes none it rendered for nobody', async () => {
    const { engine, w, metrics } = await loadedEngine();
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '1' }), metrics, engine, {} as RequestS3);
    const said = () => w.sent.flatMap((m) => (m.t === 'previews' ? [m.on] : []));
    const encoded = async () => (await metrics.previews.get()).values.reduce((n, v) => n + v.value, 0);
    const withPreviews = { ...request('c'), previewEvery: 1 };
    const stream = () => ({ onProgress: () => undefined });
    const gone = new AbortController();
    const a = gen.generate([withPreviews], gone.signal, stream()).catch((e: RuntimeError) => e.code);
    await tick();
    const id = w.generations()[0]!.id;
    const preview = () => w.reply({ t: 'progress', id, step: 1, of: 2, previews: [{ rgb: new Uint8Array(8 * 8 * 3).buffer, width: 8, height: 8 }] });
    preview();
    await until(async () => (await encoded()) === 1);
    // A request that streams steps alone joins; the client with previews leaves: nobody wants them.
    const steps = new AbortController();
    const b = gen.generate([request('c')], steps.signal, stream()).catch((e: RuntimeError) => e.code);
    await tick();
    expect(said()).toEqual([]);
    gone.abort();
    expect(await a).toBe('CANCELLED');
    expect(said()).toEqual([false]);
    // One the worker rendered before it heard: not encoded.
    preview();
    // One that streams previews joins: rendered again; it leaves: off again.
    const watcher = new AbortController();
    const c = gen.generate([withPreviews], watcher.signal, stream()).catch((e: RuntimeError) => e.code);
    await tick();
    expect(said()).toEqual([false, true]);
    preview();
    await until(async () => (await encoded()) === 2);
    watcher.abort();
    expect(await c).toBe('CANCELLED');
    expect(said()).toEqual([false, true, false]);
    w.reply({ t: 'result', id, images: [image], times });
    expect((await b as TaskResult[])[0]!.images).toHaveLength(1);
    expect(await encoded()).toBe(2);
    await engine.idle();
    await engine.close();
  });

  it('a batch kept running for one request joined to it that streams steps alone stops rendering previews once the last request that streamed them, joined to another of its generations, leaves', async () => {
    const { engine, w, metrics } = await loadedEngine({ MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '10000' });
    const gen = createGeneration(loadConfig({ RESULT_CACHE_MB: '1' }), metrics, engine, {} as RequestS3);
    const said = () => w.sent.flatMap((m) => (m.t === 'previews' ? [m.on] : []));
    const stream = () => ({ onProgress: () => undefined });
    const code = (p: Promise<unknown>) => p.catch((e: RuntimeError) => e.code);
    // Two generations with previews in one batch.
    const ownerA = new AbortController();
    const ownerB = new AbortController();
    const a = code(gen.generate([{ ...request('p'), previewEvery: 1 }], ownerA.signal, stream()));
    const b = code(gen.generate([{ ...request('q'), previewEvery: 1 }], ownerB.signal, stream()));
    await until(() => w.generations().length === 1);
    const id = w.generations()[0]!.id;
    expect(w.generations()[0]!.job.items).toHaveLength(2);
    // The first's joined request streams previews, the second's steps alone.
    const withPreviews = new AbortController();
    const ja = code(gen.generate([{ ...request('p'), previewEvery: 1 }], withPreviews.signal, stream()));
    const jb = gen.generate([request('q')], new AbortController().signal, stream());
    await tick();
    ownerA.abort();
    ownerB.abort();
    expect([await a, await b]).toEqual(['CANCELLED', 'CANCELLED']);
    expect(said()).toEqual([]);
    // The last to stream them leaves: the batch runs on for the second's joined request, which wants none.
    withPreviews.abort();
    expect(await ja).toBe('CANCELLED');
    expect(w.sent.some((m) => m.t === 'cancel')).toBe(false);
    expect(said()).toEqual([false]);
    w.reply({ t: 'result', id, images: [image, { ...image, seed: 2 }], times });
    expect((await jb)[0]!.images).toHaveLength(1);
    await engine.idle();
    await engine.close();
  });
});
