/**
 * Replicas starting together on one empty cache (Knative scaling from zero, a rollout after the cache was wiped): real
 * server processes (`node dist/src/main.js`) on one MODEL_CACHE_DIR, one s3:// model in s3rver behind a throttling
 * front that counts the body bytes it sends per object. One process downloads under the entry's lock; the others show
 * that they wait and with what progress, start their sessions from the files the holder has finished, and serve the
 * same pixels once it commits. A holder killed mid-download is taken over by one waiter, which resumes from the
 * journal; a holder stopped by SIGTERM releases the lock at once.
 */
import { spawn } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, type DemoManifest } from '../src/demo/index.js';
import { CREDS, destroyS3, settledCount, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';

const BUCKET = 'models';
const PREFIX = 'burst/';
// ~10 MB in 1 MiB parts over 4 connections paced at 1 MB/s each: the download takes ~2.5 s, long enough to be caught
// in the middle (tests wait for bytes, never for time), short enough for a 2-core CI box.
const PAD_BYTES = 2e6;
const LINK_BPS = 1e6;
const LINK = { S3_MAX_CONCURRENCY: '4', S3_PART_SIZE: String(1 << 20), EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off', WARMUP_STEPS: '2' };

let s3: S3Server;
let proxy: FaultProxy;
let model: DemoManifest;
const dirs: Array<() => void> = [];
const live: ServerHandle[] = [];

beforeAll(async () => {
  const m = tempDir('dr-burst-model-');
  dirs.push(m.cleanup);
  model = await buildDemoModel(m.dir, { padBytes: PAD_BYTES });
  s3 = await startS3([BUCKET]);
  for (const f of model.files) await s3.put(BUCKET, PREFIX + f.path, await fsp.readFile(path.join(model.dir, f.path)));
  proxy = await startFaultProxy(s3.port, { bytesPerSecond: LINK_BPS, exactPace: true });
}, 60_000);

afterEach(async () => {
  await Promise.all(live.splice(0).map((s) => s.stop('SIGKILL')));
});

afterAll(async () => {
  await proxy?.close();
  if (s3) await destroyS3(s3);
  for (const c of dirs) c();
});

/** S3 body bytes sent so far for each of the model's objects (by its path in the model). */
function bytesByFile(): Map<string, number> {
  const out = new Map<string, number>();
  for (const f of model.files) out.set(f.path, proxy.stats.bytesByPath[`/${BUCKET}/${PREFIX}${f.path}`] ?? 0);
  return out;
}
const sentTotal = () => [...bytesByFile().values()].reduce((a, b) => a + b, 0);

function cacheEnv(cache: string): Record<string, string> {
  return { ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, MODEL_CACHE_DIR: cache, ...LINK };
}

/** `n` servers spawned at the same moment on one cache. */
async function burst(n: number, cache: string): Promise<ServerHandle[]> {
  const srvs = await Promise.all(Array.from({ length: n }, () => startServer(cacheEnv(cache))));
  live.push(...srvs);
  return srvs;
}

interface ModelBody { state?: string; progress?: { phase: string; bytesDone: number; bytesTotal: number; filesDone: number; filesTotal: number } }
async function modelBody(srv: ServerHandle): Promise<{ status: number; body: ModelBody }> {
  const r = await fetch(`${srv.url}/v1/models/model`);
  return { status: r.status, body: (await r.json()) as ModelBody };
}

/** The lock file of the one entry in `cache`, and the pid it names (undefined: no lock now). */
function lockHolder(cache: string): number | undefined {
  const lock = readdirSync(cache).find((n) => n.endsWith('.lock'));
  if (lock === undefined) return undefined;
  try {
    return (JSON.parse(readFileSync(path.join(cache, lock), 'utf8')) as { pid: number }).pid;
  } catch {
    return undefined;
  }
}

/** A fixed-seed generation; PNG is lossless and deterministic, so equal pixels give equal bytes. */
async function image(srv: ServerHandle): Promise<string> {
  const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a lighthouse at dusk', seed: 1234, num_inference_steps: 2 }] });
  expect(r.status).toBe(200);
  return (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;
}

const entryDir = (cache: string) => path.join(cache, readdirSync(cache).find((n) => !n.startsWith('.') && !n.endsWith('.lock'))!);

describe('replicas starting together on one empty cache', () => {
  it('one downloads, the others show that they wait and then serve the same pixels; S3 sends the model once', async () => {
    const cache = tempDir('dr-burst-cache-');
    dirs.push(cache.cleanup);
    const before = bytesByFile();
    const srvs = await burst(3, cache.dir);
    // The holder is the process the lock names; the others wait. While the holder downloads, a waiter's model endpoint
    // says so and shows the bytes on disk growing, and its liveness answers.
    await until(() => lockHolder(cache.dir) !== undefined, 20_000);
    const holder = srvs.find((s) => s.proc.pid === lockHolder(cache.dir))!;
    expect(holder).toBeDefined();
    const waiters = srvs.filter((s) => s !== holder);
    const seen = new Map<ServerHandle, number[]>(waiters.map((w) => [w, []]));
    await until(async () => {
      for (const w of waiters) {
        const { status, body } = await modelBody(w);
        if (status === 200) return true;
        expect(status).toBe(503);
        if (body.state === 'fetching' && body.progress?.phase === 'waiting') seen.get(w)!.push(body.progress.bytesDone);
        expect((await fetch(`${w.url}/v2/health/live`)).status).toBe(200);
        expect((await fetch(`${w.url}/v2/health/ready`)).status).toBe(503);
      }
      return false;
    }, 30_000, 50);
    for (const [w, bytes] of seen) {
      expect(new Set(bytes).size, `waiter ${w.proc.pid} waiting progress: ${bytes.join(',')}`).toBeGreaterThanOrEqual(2);
      expect(bytes).toEqual([...bytes].sort((a, b) => a - b));
    }
    await Promise.all(srvs.map((s) => s.waitReady(30_000)));
    // One commit: the holder fetched, the waiters took its entry; S3 sent each object's bytes once.
    const files = srvs.map((s) => s.events('files-ready')[0]!);
    expect(files.map((f) => f.fromCache)).toEqual(srvs.map((s) => s !== holder));
    expect(new Set(files.map((f) => f.dir)).size).toBe(1);
    await settledCount(sentTotal);
    const after = bytesByFile();
    for (const f of model.files) expect(after.get(f.path)! - before.get(f.path)!, f.path).toBe(f.bytes);
    expect(existsSync(path.join(entryDir(cache.dir), '.complete.json'))).toBe(true);
    const pixels = await Promise.all(srvs.map(image));
    expect(new Set(pixels).size).toBe(1);
    const readyAt = srvs.map((s) => s.spawnedAt + (s.events('ready')[0]!.seconds as number) * 1000);
    console.log('ready gaps (ms)', readyAt.map((t) => Math.round(t - readyAt[srvs.indexOf(holder)]!)));
  }, 60_000);
});
