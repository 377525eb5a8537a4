/**
 * SIGTERM while a request waits for an adapter's S3 fetch (LORA_URI) that outlasts the grace period: the fetch stops
 * before the process exits, its cache lock released (a fetch of the same adapter by the next process, which has this
 * one's host name and often its pid, takes it at once rather than after 30 s of stale heartbeat), and the request is
 * answered 503 SHUTTING_DOWN, as a generation cut by the grace is. A real server process, s3rver behind the fault proxy.
 */
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { fixtureModel } from './fixtures/index.js';
import { putStyleAdapter } from './helpers/big-adapter.js';
import { CREDS, destroyS3, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, until } from './helpers/server.js';

const tmp = tempDir('lora-shutdown-');
let s3: S3Server;
let proxy: FaultProxy;
let model: string;
let release!: () => void;

beforeAll(async () => {
  model = await fixtureModel();
  s3 = await startS3(['loras']);
  await putStyleAdapter(s3, model, tmp.dir);
  proxy = await startFaultProxy(s3.port, { hold: { keys: /adapters\/style\//, release: new Promise<void>((r) => (release = r)) } });
}, 60_000);

afterAll(async () => {
  release?.();
  await proxy?.close();
  if (s3) await destroyS3(s3);
  tmp.cleanup();
});

it('SIGTERM during an adapter fetch past the grace: the fetch stops and its lock goes before the exit; the request gets 503', async () => {
  const cache = path.join(tmp.dir, 'cache');
  const srv = await startServer({
    ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: cache,
    EXECUTION_PROVIDER: 'cpu', LORA_URI: 's3://loras/adapters/', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
  }, { ready: true });
  const locks = () => readdirSync(cache).filter((f) => f.startsWith('s3-loras-adapters-style-') && f.endsWith('.lock'));
  const answer = postJson(`${srv.url}/v1/models/model:predict`,
    { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 1, loras: [{ name: 'style', scale: 0.5 }] }] })
    .catch((err: unknown) => ({ status: 0, json: { error: String(err) } as Record<string, unknown> }));
  await until(() => proxy.stats.held > 0);
  expect(locks()).toHaveLength(1);
  const { code } = await srv.stop('SIGTERM');
  expect(code).toBe(0);
  // Nothing of the fetch outlives the process: the lock is gone (the entry stays uncommitted and resumable).
  expect(locks()).toEqual([]);
  const r = await answer;
  expect([r.status, r.json.code]).toEqual([503, 'SHUTTING_DOWN']);
}, 120_000);
