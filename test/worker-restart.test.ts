/**
 * A pipeline worker that dies after ready (issue 16, defect 6): the generation it held fails at once with a clear
 * 500, waiting requests with a 503 and Retry-After, readiness answers 503 while no worker can run, and the worker is
 * started again with its sessions, serving the same pixels as before. In-process (the built runtime from dist/, so
 * the worker threads are the real ones), with the embedded demo model on the CPU; the test ends a worker thread the
 * way a crash would, from outside, through the Worker it handed to the runtime.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Runtime as RuntimeType } from '../src/runtime/runtime.js';
import type { SpawnedWorker } from '../src/runtime/workers.js';
import { holdWorker, metric, startRuntime } from './helpers/runtime.js';
import { postJson, until } from './helpers/server.js';

const dist = (p: string) => path.resolve('dist/src', p);
let tmp: string;

interface Started {
  rt: RuntimeType;
  workers: SpawnedWorker[];
  url: string;
}

/**
 * A runtime on the embedded demo model, ready. `hold`: its one worker is test/helpers/hold-worker.mjs (holds every
 * generation, so one can die holding it); a worker started again is always a real one.
 */
async function start(workers: number, o: { hold?: boolean } = {}): Promise<Started> {
  const { loadConfig } = (await import(dist('config.js'))) as typeof import('../src/config.js');
  const { spawnWorkers } = (await import(dist('runtime/workers.js'))) as typeof import('../src/runtime/workers.js');
  const env = {
    MODEL_CACHE_DIR: tmp, EXECUTION_PROVIDER: 'cpu', WORKERS: String(workers), LOG_LEVEL: 'silent', ORT_OPTIMIZED_CACHE: 'off', REQUEST_TIMEOUT_S: '120',
    STORAGE_URI: undefined, ...(o.hold ? { WARMUP_STEPS: '0' } : {}),
  };
  const spawned = o.hold ? [holdWorker()] : spawnWorkers(loadConfig(env));
  const h = await startRuntime(env, { ready: true, workers: spawned });
  return { rt: h.rt, workers: spawned, url: h.url };
}

const ready = async (url: string) => (await fetch(`${url}/v2/health/ready`)).status;
const predict = (url: string, body: Record<string, unknown>) => postJson(`${url}/v1/models/model:predict`, { instances: [{ prompt: 'a lighthouse at dusk', seed: 7, ...body }] });
const image = (r: Awaited<ReturnType<typeof predict>>) => (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

beforeAll(async () => {
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'worker-restart-'));
});

afterAll(async () => {
  await fsp.rm(tmp, { recursive: true, force: true });
});

describe('a pipeline worker that dies after ready', () => {
  it('WORKERS=1, a worker dies holding a generation: 500 for it, 503 for the one queued, at once; not ready until one is back', async () => {
    const s = await start(1, { hold: true });
    try {
      const held = predict(s.url, { num_inference_steps: 3 });
      await until(() => s.rt.engine.busy === 1, 30_000);
      const queued = predict(s.url, { num_inference_steps: 3, seed: 8 });
      await until(() => s.rt.engine.queueDepth === 1, 30_000);
      const states: number[] = [];
      const watch = setInterval(() => void ready(s.url).then((c) => states.push(c)), 10);
      await s.workers[0]!.worker.terminate();
      const [h, q] = await Promise.all([held, queued]);
      // Answered when the worker died, not REQUEST_TIMEOUT_S (120 s) later: while the one started again is still not
      // ready (checked against that event, not a fixed 20 s), with the death's errors below, not the timeout's 504.
      expect(s.rt.boot.ready).toBe(false);
      expect([h.status, h.json]).toEqual([500, { error: 'the generation failed: the pipeline worker running it stopped (exit code 1); it is being started again', code: 'WORKER_DIED' }]);
      expect([q.status, q.json]).toEqual([503, { error: 'the pipeline worker stopped and is being started again; retry in a few seconds', code: 'WORKER_RESTARTING' }]);
      expect(q.headers.get('retry-after')).toBe('5');
      // While the worker started again imports onnxruntime and creates its sessions: not ready, and saying why.
      const during = await fetch(`${s.url}/v1/models/model`);
      expect(during.status).toBe(503);
      expect(await during.json()).toMatchObject({ state: 'loading', reason: 'pipeline worker 0 stopped (exit code 1); starting it again' });
      expect((await predict(s.url, { num_inference_steps: 3 })).status).toBe(503);
      await until(() => s.rt.boot.ready, 60_000);
      clearInterval(watch);
      expect(states).toContain(503);
      expect(await ready(s.url)).toBe(200);
      // The worker started again is a real one, with its sessions: it generates.
      const after = await predict(s.url, { num_inference_steps: 3 });
      expect(after.status).toBe(200);
      expect(image(after).length).toBeGreaterThan(100);
    } finally {
      await s.rt.close(0);
    }
  }, 180_000);

  it('WORKERS=1, a worker dies during the SIGTERM drain: 500 for its generation and 503 SHUTTING_DOWN for the one queued, at once; the drain ends', async () => {
    const s = await start(1, { hold: true });
    const events: Array<{ name: string; data: unknown }> = [];
    s.rt.events.on((e) => events.push(e));
    try {
      const held = predict(s.url, { num_inference_steps: 3 });
      await until(() => s.rt.engine.busy === 1, 30_000);
      const queued = predict(s.url, { num_inference_steps: 3, seed: 8 });
      await until(() => s.rt.engine.queueDepth === 1, 30_000);
      // A grace period the test outlasts: requests held to its end would be answered the grace's 503 instead.
      const closed = s.rt.close(20_000);
      await until(() => s.rt.boot.state === 'stopping', 5_000);
      await s.workers[0]!.worker.terminate();
      const [h, q] = await Promise.all([held, queued]);
      // Nothing starts the worker again now: the answers say so (no "being started again"); the one queued can retry
      // on another replica, as every request the stop refuses.
      expect([h.status, h.json]).toEqual([500, { error: 'the generation failed: the pipeline worker running it stopped (exit code 1)', code: 'WORKER_DIED' }]);
      expect([q.status, q.json, q.headers.get('retry-after')]).toEqual([503, { error: 'the server is shutting down', code: 'SHUTTING_DOWN' }, '1']);
      await closed;
      expect(events.filter((e) => e.name === 'shut-down').map((e) => e.data)).toEqual([{ drained: true }]);
      // The listener is closed now: the gauges from the runtime's registry.
      const gauge = async (name: string) => (await s.rt.metrics.registry.getSingleMetric(name)!.get()).values.reduce((n, v) => n + v.value, 0);
      expect([await gauge('inference_requests_in_flight'), await gauge('inference_queue_depth'), await gauge('worker_busy')]).toEqual([0, 0, 0]);
    } finally {
      await s.rt.close(0);
    }
  }, 120_000);

  it('WORKERS=1, an idle worker dies: started again with its sessions, it serves the same pixels as before', async () => {
    const s = await start(1);
    try {
      const before = await predict(s.url, { num_inference_steps: 3 });
      expect(before.status).toBe(200);
      const deaths = () => metric(s, 'worker_deaths_total', { worker: '0', device: 'cpu' });
      expect(await deaths()).toBe(0);
      await s.workers[0]!.worker.terminate();
      await until(() => !s.rt.boot.ready, 5_000);
      expect(await ready(s.url)).toBe(503);
      // Counted once, so an alert can see a worker that keeps crashing.
      expect(await deaths()).toBe(1);
      await until(() => s.rt.boot.ready, 60_000);
      const after = await predict(s.url, { num_inference_steps: 3 });
      expect(after.status).toBe(200);
      expect(image(after)).toBe(image(before));
    } finally {
      await s.rt.close(0);
    }
  }, 180_000);

  it('WORKERS=2: the other worker keeps serving and readiness stays up; the dead one comes back', async () => {
    const s = await start(2);
    try {
      const states: number[] = [];
      const watch = setInterval(() => void ready(s.url).then((c) => states.push(c)), 20);
      await s.workers[0]!.worker.terminate();
      expect((await predict(s.url, { num_inference_steps: 3 })).status).toBe(200);
      await until(() => s.rt.engine.loadedWorkers === 2, 60_000);
      // Worker 0 is back: ending worker 1 now still leaves one that can run.
      await s.workers[1]!.worker.terminate();
      expect((await predict(s.url, { num_inference_steps: 3 })).status).toBe(200);
      await until(() => s.rt.engine.loadedWorkers === 2, 60_000);
      clearInterval(watch);
      expect(states.length).toBeGreaterThan(10);
      expect(states.filter((c) => c !== 200)).toEqual([]);
    } finally {
      await s.rt.close(0);
    }
  }, 180_000);
});
