/**
 * A LoRA adapter's fetch (LORA_URI on S3) and an adapter set's build on a cache volume that stops answering for real
 * (test/native/stuck-fs: every call on it then waits, a stat included): their calls are not gated one by one, and their
 * requests used to wait for them up to REQUEST_TIMEOUT_S. A real server process, s3rver on loopback, real HTTP.
 */
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { createLogger } from '../src/log.js';
import { defaultIo } from '../src/storage/download.js';
import { resolveModel, type StorageIo } from '../src/storage/fetch.js';
import { cacheKey, parseStorageUri } from '../src/storage/uri.js';
import { fixtureModel } from './fixtures/index.js';
import { putStyleAdapter } from './helpers/big-adapter.js';
import { CREDS, destroyS3, startFaultProxy, startS3, testConfig, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable, type StuckFs, type StuckFsOptions } from './helpers/stuck-fs.js';

const tmp = tempDir('lora-stuck-volume-');
const MANY = ['style-a', 'style-b', 'style-c', 'style-d'];
let s3: S3Server;
let model: string;
const noFuse = stuckFsUnavailable();

beforeAll(async () => {
  // For the fetches made in this process.
  Object.assign(process.env, CREDS);
  model = await fixtureModel();
  s3 = await startS3(['loras']);
  // A valid kohya adapter of ~3 MB (also kept as tmp.dir/style.safetensors: a local LORA_URI).
  await putStyleAdapter(s3, model, tmp.dir);
  // The same under other names: fetches of several adapters at once.
  for (const n of MANY) await s3.put('loras', `adapters/${n}/pytorch_lora_weights.safetensors`, readFileSync(path.join(tmp.dir, 'style.safetensors')));
}, 60_000);

afterAll(async () => {
  if (s3) await destroyS3(s3);
  tmp.cleanup();
});

const body = (loras?: unknown[]) => ({ instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 1, ...(loras ? { loras } : {}) }] });
const predict = (srv: ServerHandle, loras?: unknown[]) => postJson(`${srv.url}/v1/models/model:predict`, body(loras),
  // Without an answer from the server the client gives up: before, these requests waited up to REQUEST_TIMEOUT_S.
  { signal: AbortSignal.timeout(40_000) }).catch((e: Error) => ({ status: 0, json: { error: e.message } as Record<string, unknown>, headers: new Headers() }));
const style = [{ name: 'style', scale: 0.5 }];

/** The request predict() sends, on a raw socket the test drops to have its client leave. */
function leavingPredict(srv: ServerHandle, loras: unknown[]): net.Socket {
  const json = JSON.stringify(body(loras));
  const s = net.connect(srv.port, '127.0.0.1', () => {
    s.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(json)}\r\n\r\n${json}`);
  });
  s.on('error', () => undefined);
  return s;
}

/** Retried as its client would after Retry-After, until it is answered 200 (the volume answers again). */
async function servedOnceAnswering(srv: ServerHandle): Promise<void> {
  let last: Awaited<ReturnType<typeof predict>> | undefined;
  await until(async () => (last = await predict(srv, style)).status === 200, 90_000, 500).catch(() => {
    throw new Error(`not served once the volume answered: ${JSON.stringify(last?.json)}`);
  });
}

type Finished = Pick<TestContext, 'onTestFinished'>;

/**
 * A stuck-fs mount released at the end of its own test (the tests run side by side: an afterEach releasing every
 * mount would release the others' under them), after the server the test stops in its finally.
 */
async function mountFor(t: Finished, ...args: Parameters<typeof mountStuckFs>): Promise<StuckFs> {
  const fs = await mountStuckFs(...args);
  t.onTestFinished(() => fs.release());
  return fs;
}

const stuckCount = async (srv: ServerHandle) => Number(/^cache_stuck_requests_total\{model_name="model"\} (\d+)$/m.exec(await (await fetch(`${srv.url}/metrics`)).text())?.[1]);
const inFlight = async (srv: ServerHandle) => Number(/^inference_requests_in_flight\{model_name="model"\} (\d+)$/m.exec(await (await fetch(`${srv.url}/metrics`)).text())?.[1]);

/**
 * A server on `model` whose MODEL_CACHE_DIR is on a stuck-fs mount (`name`, with `opts`), fetching adapters from an S3
 * LORA_URI: the image's pool (the writes get 8 of its 16 threads), ranges of 64 KiB (a ~3 MB adapter has
 * S3_MAX_CONCURRENCY, 24, ranges in flight).
 */
async function s3LorasOnStuckFs(t: Finished, name: string, opts: StuckFsOptions, endpoint = s3.endpoint) {
  const backing = path.join(tmp.dir, `${name}-backing`);
  mkdirSync(path.join(backing, 'cache'), { recursive: true });
  const fs = await mountFor(t, backing, path.join(tmp.dir, name), opts);
  const srv = await startServer({
    ...CREDS, AWS_ENDPOINT_URL: endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: path.join(fs.dir, 'cache'),
    EXECUTION_PROVIDER: 'cpu', LORA_URI: 's3://loras/adapters/', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    UV_THREADPOOL_SIZE: '16', S3_PART_SIZE: '65536',
  }, { ready: true });
  return { fs, srv, backing };
}

// Side by side: each test has its own server, mount and folders (s3rver and the adapter are only read), and mostly waits.
describe.skipIf(noFuse).concurrent('a LoRA adapter\'s fetch and set build on a cache volume that stops answering', () => {
  // Alone, before the others: paced by its volume's late answers, its four fetches took over 40 s to begin under the
  // others' load on a loaded machine, and its request's client gave up first.
  it.sequential('several fetches stuck at once: their journals\' writes and syncs and their locks\' heartbeats go in the writes\' bound, a plain request served meanwhile', async (t) => {
    // Each answer late: the four fetches are all writing when the volume stops answering.
    const { fs, srv, backing } = await s3LorasOnStuckFs(t, 'many', { delayMs: 10 });
    try {
      const many = predict(srv, MANY.map((name) => ({ name, scale: 0.25 })));
      // Every fetch has its partial (opened once its lock and journal are): it is downloading (or, on a fast machine, done).
      const partials = (dir: string): number => readdirSync(dir, { withFileTypes: true }).reduce((n, e) => n + (e.isDirectory() ? partials(path.join(dir, e.name)) : e.name.startsWith('pytorch_lora_weights.safetensors') ? 1 : 0), 0);
      await until(() => partials(path.join(backing, 'cache')) >= MANY.length, 60_000, 20);
      await fs.hang();
      const r = await many;
      expect([r.status, r.json.code], JSON.stringify(r.json)).toEqual([503, 'CACHE_STUCK']);
      // Before, each stuck fetch kept its journal's write and sync and its lock's heartbeat beside the 8 writes: four
      // of them held every thread of the pool, and this request's encoding waited behind them until its client left.
      const plain = await predict(srv);
      expect(plain.status, JSON.stringify(plain.json)).toBe(200);
      // The calls queued in the bound go once the volume answers: the fetches resume, and serve.
      fs.answer();
      let last: Awaited<ReturnType<typeof predict>> | undefined;
      await until(async () => (last = await predict(srv, MANY.map((name) => ({ name, scale: 0.25 })))).status === 200, 120_000, 500).catch(() => {
        throw new Error(`not served once the volume answered: ${JSON.stringify(last?.json)}`);
      });
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 300_000);

  it('the fetch from LORA_URI: 503 CACHE_STUCK, a plain request served meanwhile, counted; once the volume answers, served from a whole file', async (t) => {
    // The first data write of the adapter answered, then nothing.
    const { fs, srv, backing } = await s3LorasOnStuckFs(t, 'fetch', { hangAfter: 'write:pytorch_lora_weights.safetensors.partial' });
    try {
      expect(await stuckCount(srv)).toBe(0);
      // Before, the request waited for the fetch until its client gave up.
      const r = await predict(srv, style);
      expect([r.status, r.json.code, r.headers.get('retry-after')]).toEqual([503, 'CACHE_STUCK', '10']);
      expect(r.json.error).toMatch(/^adapter "style": its fetch from LORA_URI onto the cache is stopped: the cache volume \(MODEL_CACHE_DIR\) is not answering: \w+ \S+ still pending after \d+ s; /);
      expect(r.json.error).not.toContain(fs.dir);
      // By then every range in flight has tried its write. Before, each write kept a pool thread: the 24 ranges filled
      // the pool, and sharp's encoding of this image waited behind them.
      const plain = await predict(srv);
      expect(plain.status, JSON.stringify(plain.json)).toBe(200);
      expect(await stuckCount(srv)).toBe(1);
      fs.answer();
      await servedOnceAnswering(srv);
      // Nothing half-written was taken as whole: the cached adapter is S3's, byte for byte.
      const entry = readdirSync(path.join(backing, 'cache')).find((d) => d.startsWith('s3-loras-adapters-style-'))!;
      const cached = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? cached(path.join(dir, e.name)) : e.name.endsWith('.safetensors') ? [path.join(dir, e.name)] : []));
      const files = cached(path.join(backing, 'cache', entry));
      expect(files).toHaveLength(1);
      expect(readFileSync(files[0]!).equals(readFileSync(path.join(tmp.dir, 'style.safetensors')))).toBe(true);
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 240_000);

  it('several fetches waiting for another node\'s locks when the volume stops answering: their looks go in the writes\' bound, a plain request served meanwhile', async (t) => {
    const backing = path.join(tmp.dir, 'locked-backing');
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'locked'));
    // libuv's default pool (4 threads): the bound is 1.
    const srv = await startServer({
      ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: path.join(fs.dir, 'cache'),
      EXECUTION_PROVIDER: 'cpu', LORA_URI: 's3://loras/adapters/', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1', UV_THREADPOOL_SIZE: '4',
    }, { ready: true });
    try {
      // Each adapter's entry is being filled by another node (its lock's heartbeat fresh, written now: a lock that old
      // is taken over after 30 s): these fetches wait, looking at the lock and the cache every poll, outside their
      // download.
      const since = new Date().toISOString();
      for (const [i, n] of MANY.entries()) {
        const key = cacheKey(parseStorageUri(`s3://loras/adapters/${n}/`) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, s3.endpoint);
        writeFileSync(path.join(backing, 'cache', `${key}.lock`), JSON.stringify({ pid: 1, host: 'another-node', token: `feedface0000000${i}`, since }));
      }
      const many = predict(srv, MANY.map((name) => ({ name, scale: 0.25 })));
      await until(() => srv.logs.filter((l) => l.msg === 'another process is filling this cache entry; waiting for it').length === MANY.length, 60_000, 20);
      await fs.hang();
      const r = await many;
      expect([r.status, r.json.code], JSON.stringify(r.json)).toEqual([503, 'CACHE_STUCK']);
      // Before, each waiting fetch's next look (the entry's versions, the lock) kept a pool thread beside the bound: the
      // four held the pool, and this request's encoding waited behind them until its client left.
      const plain = await predict(srv);
      expect(plain.status, JSON.stringify(plain.json)).toBe(200);
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 240_000);

  it('a request identical to one that left while its adapter\'s fetch was ending (committed, the volume slow to let it go) is served by that fetch: the adapter is looked up once', async (t) => {
    const proxy = await startFaultProxy(s3.port);
    // The fetch has committed the entry and removed its journal; the release of its lock waits for the volume.
    const { fs, srv } = await s3LorasOnStuckFs(t, 'ending', { hangAfter: 'unlink:.progress.jsonl' }, proxy.endpoint);
    try {
      const first = leavingPredict(srv, style);
      await fs.hung;
      const lists = proxy.stats.lists;
      // Every request waiting for the fetch gone: it is told to stop, and cannot, held where nothing stops it.
      first.destroy();
      await until(async () => (await inFlight(srv)) === 0, 20_000, 20);
      const again = predict(srv, style);
      await until(async () => (await inFlight(srv)) === 1, 20_000, 20);
      // Answered well within the 5 s after which the look at the volume kept through the fetch's end says it is stuck.
      fs.answer();
      const r = await again;
      expect([r.status, r.json.code], JSON.stringify(r.json)).toEqual([200, undefined]);
      // Before, the stopped lookup was forgotten at once: this request's own listed the adapter again (lists + 1), and
      // waited for the stopped fetch's lock to find the entry it had committed.
      expect(proxy.stats.lists - lists).toBe(0);
      expect(proxy.stats.bytesByPath['/loras/adapters/style/pytorch_lora_weights.safetensors']).toBe(readFileSync(path.join(tmp.dir, 'style.safetensors')).length);
    } finally {
      await srv.stop('SIGKILL');
      await proxy.close();
    }
  }, 240_000);

  it('a request that takes up a stopped fetch the volume holds is answered CACHE_STUCK, as its own fetch would have been; once the volume answers, served', async (t) => {
    const { fs, srv } = await s3LorasOnStuckFs(t, 'taken-up', { hangAfter: 'write:pytorch_lora_weights.safetensors.partial' });
    try {
      const first = leavingPredict(srv, style);
      await fs.hung;
      first.destroy();
      await until(async () => (await inFlight(srv)) === 0, 20_000, 20);
      // It waits for the stopped fetch, which waits for the volume: the look at the volume goes on until the fetch ends
      // (before it ended with the stop, and this request waited until its client gave up).
      const r = await predict(srv, style);
      expect([r.status, r.json.code, r.headers.get('retry-after')], JSON.stringify(r.json)).toEqual([503, 'CACHE_STUCK', '10']);
      // The fetch's watch says so (a request with a fetch of its own, before: the look that begins one).
      expect(r.json.error).toMatch(/^adapter "style": (its fetch from LORA_URI onto the cache is stopped: )?the cache volume \(MODEL_CACHE_DIR\) is not answering: \w+ \S+ still pending after \d+ s; /);
      fs.answer();
      await servedOnceAnswering(srv);
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 240_000);

  /**
   * SIGTERM once the fetch of `style` is held by the volume (`stopFirst`: after every request waiting for it left, and
   * its look at the volume found it silent): the stop waits for the fetch, which the volume holds, within its bound,
   * and once the volume answers the fetch ends, its cache entry's lock released, and the process exits 0.
   */
  const stopWhileHeld = async (t: Finished, name: string, stopFirst: boolean) => {
    const { fs, srv, backing } = await s3LorasOnStuckFs(t, name, { hangAfter: 'write:pytorch_lora_weights.safetensors.partial' });
    // The volume's silence seen by the fetch's look at it (the gate's warning), or, without that look, past its wait.
    let hungAt = Infinity;
    const silent = () => srv.logs.some((l) => /^the cache volume is not answering: /.test(String(l.msg))) || performance.now() - hungAt > 8_000;
    const shutDown = () => srv.logs.some((l) => l.msg === 'shut down');
    try {
      let waiting: ReturnType<typeof predict> | undefined;
      if (stopFirst) {
        const first = leavingPredict(srv, style);
        await fs.hung;
        hungAt = performance.now();
        first.destroy();
        await until(async () => (await inFlight(srv)) === 0, 20_000, 20);
        // The stopped fetch's look at the volume has been answered CACHE_STUCK, and nobody waits to be told.
        await until(silent, 30_000, 20);
      } else {
        waiting = predict(srv, style);
        await fs.hung;
        hungAt = performance.now();
      }
      const stopped = srv.stop('SIGTERM', 60_000);
      await until(silent, 30_000, 20);
      // The stop's bound is 15 s from the end of the 1 s grace period: 3 s past the look's CACHE_STUCK is well within it.
      // Before, that CACHE_STUCK ended the adapter's lookup as if its fetch had ended: the stop no longer waited for
      // it, and the process went on to exit while the fetch still held its lock.
      await until(shutDown, 3_000, 20).catch(() => undefined);
      expect(shutDown()).toBe(false);
      fs.answer();
      expect(await stopped).toEqual({ code: 0, signal: null });
      if (waiting) expect((await waiting).json.code).toBe('SHUTTING_DOWN');
      expect(readdirSync(path.join(backing, 'cache')).filter((f) => f.endsWith('.lock'))).toEqual([]);
      expect(srv.logs.filter((l) => /shutdown did not finish/.test(String(l.msg)))).toEqual([]);
    } finally {
      await srv.stop('SIGKILL');
    }
  };

  it('a stop while a request waits for an adapter\'s fetch the volume holds waits for that fetch: once the volume answers, it ends and releases its lock, exit 0', async (t) => {
    await stopWhileHeld(t, 'stop-waited', false);
  }, 240_000);

  it('a stop after every request for an adapter left while the volume held its fetch waits for that fetch too: once the volume answers, it ends and releases its lock, exit 0', async (t) => {
    await stopWhileHeld(t, 'stop-stopped', true);
  }, 240_000);

  it('the adapter set\'s build: 503 CACHE_STUCK, a plain request served meanwhile; once the volume answers, the set serves', async (t) => {
    const backing = path.join(tmp.dir, 'build-backing');
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'build'));
    // The adapter and the model are local: only the merged graphs (MODEL_CACHE_DIR/.lora-sets) are on the volume. The
    // adapter in a folder of its own: tmp.dir holds the other tests' mounts, which may be hung.
    const loras = path.join(tmp.dir, 'build-loras');
    mkdirSync(loras);
    copyFileSync(path.join(tmp.dir, 'style.safetensors'), path.join(loras, 'style.safetensors'));
    const srv = await startServer({
      STORAGE_URI: model, MODEL_CACHE_DIR: path.join(fs.dir, 'cache'), EXECUTION_PROVIDER: 'cpu', LORA_URI: loras,
      WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1', UV_THREADPOOL_SIZE: '16',
    }, { ready: true });
    try {
      await fs.hang();
      const r = await predict(srv, style);
      expect([r.status, r.json.code, r.headers.get('retry-after')]).toEqual([503, 'CACHE_STUCK', '10']);
      expect(r.json.error).toMatch(/^the LoRA adapter set \S+ waits on its build: the cache volume \(MODEL_CACHE_DIR\) is not answering: stat \. still pending after \d+ s; /);
      expect(r.json.error).not.toContain(fs.dir);
      const plain = await predict(srv);
      expect(plain.status, JSON.stringify(plain.json)).toBe(200);
      expect(await stuckCount(srv)).toBe(1);
      fs.answer();
      await servedOnceAnswering(srv);
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 240_000);
});

/** How many threads of this process wait on a FUSE mount (a stuck-fs call not answered). */
const waitingOnFuse = () => readdirSync('/proc/self/task').filter((t) => {
  try {
    return readFileSync(`/proc/self/task/${t}/wchan`, 'utf8') === 'request_wait_answer';
  } catch {
    return false; // the thread ended
  }
}).length;

/** The cache key of the adapter `name` under LORA_URI s3://loras/adapters/. */
const adapterKey = (name: string) => cacheKey(parseStorageUri(`s3://loras/adapters/${name}/`) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, s3.endpoint);

/**
 * Version 1 of the adapter `style`'s entry, committed in `cache` (a backing folder) from an older upload (another ETag)
 * and leased by a live process on another node (its heartbeat written now): a fill of it writes a version 2 beside it
 * (versions.ts), with files of that upload beside the weights (a removal takes a folder's names one by one). Returns that
 * lease's file: removed, the lease is gone, as its process's release leaves it.
 */
function leasedOlderVersion(cache: string): string {
  const key = adapterKey('style');
  const old = Buffer.alloc(1000, 1);
  mkdirSync(path.join(cache, key), { recursive: true });
  writeFileSync(path.join(cache, key, 'pytorch_lora_weights.safetensors'), old);
  for (const n of ['README.md', 'adapter_config.json', 'sample-1.png', 'sample-2.png', 'sample-3.png']) writeFileSync(path.join(cache, key, n), n);
  writeFileSync(path.join(cache, key, '.complete.json'), JSON.stringify({
    version: 1, uri: 's3://loras/adapters/style/', bytes: old.length, completedAt: new Date(Date.now() - 3_600_000).toISOString(),
    files: [{ path: 'pytorch_lora_weights.safetensors', size: old.length, etag: '"0123456789abcdef0123456789abcdef"' }],
  }));
  const leases = path.join(cache, '.leases', key);
  mkdirSync(leases, { recursive: true });
  const lease = path.join(leases, 'another-node-1-feedface00000001.lease');
  writeFileSync(lease, JSON.stringify({ pid: 1, host: 'another-node', token: 'feedface00000001', since: new Date().toISOString() }));
  return lease;
}

describe.skipIf(noFuse)('a LORA_URI fetch\'s own calls on a cache volume that stops answering (in this process)', () => {
  // One at a time (waitingOnFuse counts this process's threads waiting on any mount), after the tests above.
  stuckFsForTests();
  // The adapters give a fetch a bound on its calls on the cache (adapters.ts: io.write, io.other); here one without a
  // limit, counting the calls in it. Each point is the last request the volume answers; the fetch's next call on it,
  // whatever it is, waits for good. Before, these calls were made beside the bound: each fetch stuck in one kept one
  // more pool thread, whatever the bound.
  /**
   * A fetch of `style` on a mount that stops answering after `stuck.hangAfter` (`<v1>` in it: the entry's version 1's
   * name): once it is held, every thread left waiting on the volume is a call in its bound. `prepare` makes what the
   * cache (its backing folder) holds before, and resolves to more options of the fetch (`io`'s beside the bound's, `env`:
   * the fetch's configuration's).
   */
  let mounts = 0;
  const heldInBound = async (stuck: StuckFsOptions & { hangAfter: string }, prepare?: (cache: string) => Partial<Parameters<typeof resolveModel>[1]> & { env?: Record<string, string> }) => {
    const at = stuck.hangAfter.replace('<v1>', adapterKey('style'));
    // Numbered: cases may stop at the same point.
    const backing = path.join(tmp.dir, `own-${++mounts}-${stuck.hangAfter.replace(/\W+/g, '-')}-backing`);
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    const { io: moreIo, env, ...more } = prepare?.(path.join(backing, 'cache')) ?? {};
    const fs = await mountStuckFs(backing, `${backing}-mnt`, { ...stuck, hangAfter: at });
    let inBound = 0;
    const counted = async <T>(call: () => Promise<T>): Promise<T> => {
      inBound++;
      try {
        return await call();
      } finally {
        inBound--;
      }
    };
    const io: Partial<StorageIo> = { ...moreIo, write: (fh, bufs, len, at) => counted(() => defaultIo.write(fh, bufs, len, at)), other: counted };
    const stop = new AbortController();
    // No content check (its threads read the partial back: not pool threads), and within the test no lock heartbeat
    // and no periodic sync (whose datasync of the partial would wait for the file's lock behind a stuck sync of it, not
    // on the volume, uncounted).
    const cfg = testConfig(s3.endpoint, path.join(fs.dir, 'cache'), { S3_VERIFY_CONTENT: '0', ...env });
    const fetched = resolveModel('s3://loras/adapters/style/', { cfg, log: createLogger('silent'), signal: stop.signal, io, lockStaleMs: 600_000, syncMs: 600_000, ...more });
    fetched.catch(() => undefined);
    try {
      await Promise.race([fs.hung, fetched.then(() => {
        throw new Error(`the fetch ended and the volume never stopped answering (after ${stuck.hangAfter})`);
      })]);
      // Settled: the calls under way have reached the volume, and nothing moves for a second.
      let last = '';
      let since = performance.now();
      await until(() => {
        const now = `${waitingOnFuse()}/${inBound}`;
        if (now !== last) [last, since] = [now, performance.now()];
        return waitingOnFuse() > 0 && performance.now() - since > 1_000;
      }, 30_000, 50);
      const [waiting, held] = last.split('/').map(Number);
      expect(waiting, `${waiting} threads wait on the volume, ${held} calls in the bound`).toBeLessThanOrEqual(held!);
      return backing;
    } finally {
      stop.abort();
      // Its calls fail (ENOTCONN) once the mount is released: the fetch ends.
      await fs.release();
      await fetched.catch(() => undefined);
    }
  };

  it.for<[string, string]>([
    ['its lock\'s creation', 'create:*'],
    ['its partial\'s open', 'create:pytorch_lora_weights.safetensors.partial'],
    ['its final sync', 'getattr:pytorch_lora_weights.safetensors.partial'],
  ])('hanging at %s: every call left waiting on the volume is one in the bound', { timeout: 60_000 }, async ([, at]) => {
    await heldInBound({ hangAfter: at });
  });

  // The entry's version 1 was leased by another process when the fill began: the fill wrote version 2 beside it, and
  // once served from that removes version 1, whose lease has gone meanwhile. Each point is met only in that removal
  // (`<v1>`'s rename; the rmdir of its leases' folder, the folder itself being renamed), named by the call it stops.
  it.for<[string, StuckFsOptions & { hangAfter: string }]>([
    ['its measure of what it frees', { hangAfter: 'access:.complete.json' }],
    ['its sync of the cache folder', { hangAfter: 'rename:<v1>' }],
    ['its lock\'s release', { hangAfter: 'rmdir:<v1>' }],
    ['the removal of its trash', { hangAfter: 'unlink:pytorch_lora_weights.safetensors' }],
    // The second look at a name of it (the first is its measure): fs.rm looks at all of a folder's names at once.
    ['its deletion\'s look at a name in the trash', { hangAfter: 'getattr:README.md', hangAfterTimes: 2 }],
  ])('a second version served, the first one\'s removal hanging at %s: every call left waiting on the volume is one in the bound', { timeout: 60_000 }, async ([, stuck]) => {
    const backing = await heldInBound(stuck, (cache) => {
      const lease = leasedOlderVersion(cache);
      // Once the fill writes version 2 (its listing announced): the other process has ended its lease.
      return { onListing: () => rmSync(lease) };
    });
    // The fill committed version 2 and began removing version 1.
    expect(readdirSync(path.join(backing, 'cache', `${adapterKey('style')}@2`))).toContain('.complete.json');
  });

  // The volume is full (its free space says 0 bytes): before its download the fill makes room (makeRoom), and empties
  // first the trash of an eviction that died midway and an adapter set no process leases, then lists the entries and
  // evicts another one, unused: each point is met only there, named by the call it stops.
  it.for<[string, StuckFsOptions & { hangAfter: string }, { env?: Record<string, string>; oldLease?: true }?]>([
    ['the trash\'s measure', { hangAfter: 'getattr:trash-1' }],
    ['the trash\'s removal', { hangAfter: 'unlink:trash-1' }],
    // The second look at a name of it (the first is its measure): fs.rm looks at all of a folder's names at once.
    ['the trash\'s removal\'s look at a name', { hangAfter: 'getattr:trash-1', hangAfterTimes: 2 }],
    ['the adapter set\'s removal', { hangAfter: 'unlink:set-1.onnx' }],
    ['the adapter set\'s removal\'s look at a name', { hangAfter: 'getattr:set-1.onnx', hangAfterTimes: 2 }],
    ['its look at the other entry', { hangAfter: 'getattr:other.bin' }],
    ['its measure of what the other entry frees', { hangAfter: 'getattr:other.bin', hangAfterTimes: 2 }],
    ['the other entry\'s removal', { hangAfter: 'rename:other-entry' }],
    ['the deletion of the other entry\'s trash', { hangAfter: 'unlink:other.bin' }],
    // CACHE_EVICT=off: the entries are listed for the NO_SPACE message only.
    ['its listing for NO_SPACE (CACHE_EVICT=off)', { hangAfter: 'getattr:other.bin' }, { env: { CACHE_EVICT: 'off' } }],
    // The other entry's lease looks an hour old on this clock: it is watched before the entry goes, and the watch's
    // first look (the second open of the lease: the listing's was the first) is the last call answered.
    ['its watch of a lease that looks old', { hangAfter: `open:${OLD_LEASE}`, hangAfterTimes: 2 }, { oldLease: true }],
  ])('a full volume, the room for the fill\'s download hanging at %s: every call left waiting on the volume is one in the bound', { timeout: 60_000 }, async ([, stuck, room]) => {
    await heldInBound(stuck, (cache) => ({ ...roomToMake(cache, room), ...(room?.env ? { env: room.env } : {}) }));
  });
});

/** The lease file of another node's process on `other-entry` (roomToMake's `oldLease`). */
const OLD_LEASE = 'another-node-1-feedface00000002.lease';

/**
 * What a fill makes room from in `cache` (a backing folder): the trash of an eviction that died midway, an adapter set
 * no process leases, and another committed entry (`other-entry`, 4 MB, more than the adapter) nobody uses, each of a few
 * names (a removal takes them one by one); `oldLease`: that entry leased by another node's process whose heartbeat
 * looks an hour old on this clock. With a free space of 0 bytes, the options for the fetch.
 */
function roomToMake(cache: string, o: { oldLease?: true } = {}): Partial<Parameters<typeof resolveModel>[1]> {
  const names = (dir: string, files: string[]) => {
    mkdirSync(dir, { recursive: true });
    for (const n of files) writeFileSync(path.join(dir, n), n);
  };
  names(path.join(cache, '.evicting-gone-entry-0123abcd'), ['trash-1', 'trash-2', 'trash-3']);
  names(path.join(cache, '.lora-sets', 'set-of-a-server-gone'), ['set-1.onnx', 'set-2.onnx', 'set-3.onnx']);
  const other = path.join(cache, 'other-entry');
  names(other, ['a.json', 'b.json', 'c.json']);
  const weights = Buffer.alloc(4 << 20, 1);
  writeFileSync(path.join(other, 'other.bin'), weights);
  writeFileSync(path.join(other, '.complete.json'), JSON.stringify({
    version: 1, uri: 's3://models/other/', bytes: weights.length, completedAt: new Date(Date.now() - 3_600_000).toISOString(),
    files: [{ path: 'other.bin', size: weights.length, etag: '"0123456789abcdef0123456789abcdef"' }],
  }));
  if (o.oldLease) {
    const lease = path.join(cache, '.leases', 'other-entry', OLD_LEASE);
    mkdirSync(path.dirname(lease), { recursive: true });
    writeFileSync(lease, JSON.stringify({ pid: 1, host: 'another-node', token: 'feedface00000002', since: new Date(Date.now() - 7_200_000).toISOString() }));
    const hourAgo = new Date(Date.now() - 3_600_000);
    utimesSync(lease, hourAgo, hourAgo);
  }
  return { io: { freeBytes: async () => 0 } };
}
