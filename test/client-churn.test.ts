/**
 * What a long-running server meets from its clients, kept short, on the built server process (its stderr is what a
 * pod's log shows): a request with more instances than Node's default listener limit must not print a
 * MaxListenersExceededWarning, which reads as a leak.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';

describe('a request of many instances (MAX_IMAGES_PER_REQUEST=16)', () => {
  let srv: ServerHandle;
  beforeAll(async () => {
    srv = await startServer({ STORAGE_URI: undefined, MAX_IMAGES_PER_REQUEST: '16', MAX_BATCH_SIZE: '4', RESULT_CACHE_MB: '0' }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  it('answers 16 instances, each its own seed, twice, without a MaxListenersExceededWarning', async () => {
    for (const round of [0, 1]) {
      const instances = Array.from({ length: 16 }, (_, i) => ({ prompt: `many ${i}`, num_inference_steps: 1, height: 64, width: 64, seed: 100 * round + i }));
      const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances });
      expect(r.status).toBe(200);
      expect((r.json.predictions as Array<{ seed: number }>).map((p) => p.seed)).toEqual(instances.map((i) => i.seed));
    }
    // A warning is written on a later tick than the answer; the liveness round trip gives it time to arrive.
    await fetch(`${srv.url}/`);
    await new Promise((res) => setTimeout(res, 100));
    expect(srv.stderr.join('')).not.toContain('MaxListenersExceededWarning');
  });
});
