/**
 * Several pipeline workers (one per GPU on a GPU node; here CPU workers with the same dispatch): every worker warms
 * up before ready, requests spread over them, and each serves the same pixels for the same request.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson } from './helpers/server.js';

let srv: RuntimeHandle;
beforeAll(async () => {
  srv = await startRuntime({ WORKERS: '2', MAX_BATCH_SIZE: '1', RESULT_CACHE_MB: '0', EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1' }, { ready: true });
}, 120_000);
afterAll(async () => {
  await srv?.stop();
});

const perWorker = async (): Promise<Record<string, number>> => {
  const text = await (await fetch(`${srv.url}/metrics`)).text();
  return Object.fromEntries([...text.matchAll(/^worker_images_total\{[^}]*worker="(\d+)"[^}]*\} (\d+)$/gm)].map((m) => [m[1]!, Number(m[2])]));
};

describe('several workers', () => {
  it('each worker ran its own warm-up before ready', () => {
    const order = srv.events.filter((e) => e.name === 'warmup-done' || e.name === 'ready');
    expect(order.map((e) => e.name)).toEqual(['warmup-done', 'warmup-done', 'ready']);
    expect(srv.all('warmup-done').map((w) => w.worker).sort()).toEqual([0, 1]);
  });

  it('concurrent requests go to both workers, and the same request gives the same pixels on either', async () => {
    const before = await perWorker();
    const body = { instances: [{ prompt: 'two workers', num_inference_steps: 2, height: 64, width: 64, seed: 5 }] };
    const replies = await Promise.all(Array.from({ length: 4 }, () => postJson(`${srv.url}/v1/models/model:predict`, body)));
    expect(replies.map((r) => r.status)).toEqual([200, 200, 200, 200]);
    const images = new Set(replies.map((r) => (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64));
    expect(images.size).toBe(1);
    const after = await perWorker();
    expect(Object.keys(after).sort()).toEqual(['0', '1']);
    for (const w of ['0', '1']) expect(after[w]! - (before[w] ?? 0)).toBeGreaterThanOrEqual(1);
  });
});
