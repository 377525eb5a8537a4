/**
 * A boot that fails for a reason that can pass is tried again by itself (runtime/boot-retry.ts), over real sockets: the
 * built server as a child process, s3rver on loopback behind the fault proxy (test/helpers/s3.ts). S3 failing one file
 * for the first attempt, then recovering: ready without a restart, the retry logged, counted and shown on the model
 * endpoint, and no file fetched twice. A missing bucket is failed, not retried. SIGTERM during the wait exits 0 at once,
 * its lease released. A lease an eviction removed as stale during the wait is taken again by the attempt that fills the entry.
 * A cache volume that fails the workers' reads of the model with EIO (test/native/stuck-fs.c) is retried as CACHE_IO;
 * a corrupt graph fails MODEL_FORMAT.
 */
import { cpSync, promises as fsp, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import ort from 'onnxruntime-node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, ensureDemoModel, type DemoManifest } from '../src/demo/index.js';
import { RuntimeError } from '../src/errors.js';
import { loadError } from '../src/pipeline/failures.js';
import { retriedCode, retryDelayMs } from '../src/runtime/boot-retry.js';
import { CREDS, destroyS3, putFolder, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { metric } from './helpers/runtime.js';
import { postJson, sharedCacheDir, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const BUCKET = 'models';
const PREFIX = 'retry/';
/**
 * The smallest weights: fetched last (small files first, then weights largest first), and with one range in flight
 * (S3_MAX_CONCURRENCY=1) every other file is whole when its failures end the first attempt: none is cut mid-body,
 * where the bytes in the socket's buffers at the cut would be sent twice.
 */
const FAILING = 'vae_decoder/model.onnx';

let s3: S3Server;
let model: DemoManifest;
const dirs: Array<() => void> = [];

beforeAll(async () => {
  const m = tempDir('dr-boot-retry-model-');
  dirs.push(m.cleanup);
  model = await buildDemoModel(m.dir);
  s3 = await startS3([BUCKET]);
  await putFolder(s3, BUCKET, PREFIX, model.dir, model.files.map((f) => f.path));
}, 60_000);

afterAll(async () => {
  if (s3) await destroyS3(s3);
  for (const c of dirs) c();
});

/**
 * The servers the tests of the calling describe start, killed after each of them. The describes below the first run
 * side by side (the lease's case waits out a 30 s heartbeat), so each kills only its own.
 */
function liveServers(): ServerHandle[] {
  const live: ServerHandle[] = [];
  afterEach(async () => {
    for (const s of live.splice(0)) await s.stop('SIGKILL');
  });
  return live;
}

/**
 * A fault proxy of the calling describe's own (its faults and counts are no other test's), and a server booting from
 * `uri` through it, on a cache of its own; S3 gives up on a file after 2 attempts.
 */
function s3Suite(): { proxy: () => FaultProxy; server: (uri: string, env?: Record<string, string>) => Promise<ServerHandle> } {
  let proxy: FaultProxy;
  const live = liveServers();
  beforeAll(async () => {
    proxy = await startFaultProxy(s3.port);
  });
  afterEach(() => {
    proxy.faults = {};
  });
  afterAll(async () => {
    await proxy?.close();
  });
  return {
    proxy: () => proxy,
    server: async (uri, env = {}) => {
      const cache = tempDir('dr-boot-retry-cache-');
      dirs.push(cache.cleanup);
      const s = await startServer({
        ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: uri, MODEL_CACHE_DIR: cache.dir,
        EXECUTION_PROVIDER: 'cpu', S3_MAX_ATTEMPTS: '2', ...env,
      });
      live.push(s);
      return s;
    },
  };
}

async function json(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** Every file under `dir` whose name ends with `ext`, relative to it. */
async function filesEnding(dir: string, ext: string): Promise<string[]> {
  const all = (await fsp.readdir(dir, { recursive: true })) as string[];
  return all.filter((f) => f.endsWith(ext)).map((f) => f.split(path.sep).join('/'));
}

describe('which failures are tried again, and when', () => {
  const ioError = (code: string) => Object.assign(new Error(code), { code, syscall: 'open' });
  it('transient codes are, permanent ones and crashes are not; CACHE_IO only for a passing errno', () => {
    const codes = (['STORAGE_TRANSIENT', 'STORAGE_STALL', 'STORAGE_SHORT_READ', 'TOO_MANY_OPEN_FILES', 'STORAGE_DENIED', 'STORAGE_MISSING', 'CONFIG', 'NO_SPACE', 'STORAGE_TLS', 'MODEL_FORMAT'] as const)
      .map((c) => retriedCode(new RuntimeError(c, 'x')));
    expect(codes).toEqual(['STORAGE_TRANSIENT', 'STORAGE_STALL', 'STORAGE_SHORT_READ', 'TOO_MANY_OPEN_FILES', undefined, undefined, undefined, undefined, undefined, undefined]);
    expect(retriedCode(new RuntimeError('CACHE_IO', 'x', { cause: ioError('EIO') }))).toBe('CACHE_IO');
    expect(retriedCode(new RuntimeError('CACHE_IO', 'x', { cause: ioError('EACCES') }))).toBeUndefined();
    expect(retriedCode(new RuntimeError('CACHE_IO', 'x'))).toBeUndefined();
    expect(retriedCode(new Error('boom'))).toBeUndefined();
  });

  it('the wait doubles from 5 s up to the cap, less a random half at most', () => {
    const bounds = (failed: number, maxMs: number) => [retryDelayMs(failed, maxMs, () => 0), retryDelayMs(failed, maxMs, () => 1)];
    expect([1, 2, 3, 7, 8, 1_000].map((n) => bounds(n, 300_000))).toEqual([[2_500, 5_000], [5_000, 10_000], [10_000, 20_000], [150_000, 300_000], [150_000, 300_000], [150_000, 300_000]]);
    expect(bounds(1, 1_000)).toEqual([500, 1_000]);
  });
});

describe.concurrent('a boot failed by S3 for a moment', () => {
  const { proxy, server } = s3Suite();
  it('is tried again after a backoff and gets ready by itself, without fetching again what the first attempt had', async () => {
    proxy().faults.failGets = { keys: new RegExp(`${FAILING}$`), count: 1_000, status: 500, code: 'InternalError' };
    // The first wait is 2.5-5 s (5 s less a random half, under a cap of 10): time for the test to look at the state
    // (four requests, beside the other cases' boots), then let S3 recover.
    const srv = await server(`s3://${BUCKET}/${PREFIX}`, { BOOT_RETRY_MAX_S: '10', S3_MAX_CONCURRENCY: '1' });
    const retrying = await srv.waitFor('state', (s) => s.state === 'retrying', 60_000);
    expect(retrying).toMatchObject({ level: 'warn', previous: 'fetching', attempt: 1, reason: expect.stringMatching(/^STORAGE_TRANSIENT: cannot read .*vae_decoder\/model\.onnx/) });
    expect(retrying.msg).toMatch(new RegExp(`^boot attempt 1 failed; trying again in ${retrying.retryInSeconds} s: STORAGE_TRANSIENT: `));
    expect(retrying.retryInSeconds).toBeGreaterThanOrEqual(2.5);
    expect(retrying.retryInSeconds).toBeLessThanOrEqual(5);

    const m = await json(`${srv.url}/v1/models/model`);
    expect(m.status).toBe(503);
    expect(m.body).toMatchObject({ ready: false, state: 'retrying', reason: retrying.reason, retry: { attempts: 1, nextAttemptInSeconds: expect.any(Number), nextAttemptAt: expect.any(String) } });
    const r = await json(`${srv.url}/v2/health/ready`);
    expect(r).toMatchObject({ status: 503, body: { ready: false, state: 'retrying', reason: retrying.reason, retry: { attempts: 1 } } });
    const p = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a' }] });
    expect([p.status, p.json.code, p.json.error]).toEqual([503, 'MODEL_NOT_READY', expect.stringMatching(/^Model with name model is not ready\. Boot attempt failed, trying again in [\d.]+ s: STORAGE_TRANSIENT: /)]);
    expect(Number(p.headers.get('retry-after'))).toBeGreaterThanOrEqual(5);
    expect(await metric(srv, 'boot_retries_total', { code: 'STORAGE_TRANSIENT' })).toBe(1);

    const failed = proxy().stats.gets;
    proxy().faults.failGets = undefined;
    await srv.waitReady();
    expect(proxy().stats.gets).toBeGreaterThan(failed);
    const states = srv.events('state').map((s) => s.state);
    expect(states.slice(states.indexOf('retrying'))).toEqual(['retrying', 'fetching', 'loading', 'warming', 'ready']);
    expect(await metric(srv, 'boot_retries_total')).toBe(1);
    // Each file's bytes came once, over both attempts: the second resumed from the journal of the first.
    const fetched = Object.fromEntries(model.files.map((f) => [f.path, proxy().stats.bytesByPath[`/${BUCKET}/${PREFIX}${f.path}`] ?? 0]));
    expect(fetched).toEqual(Object.fromEntries(model.files.map((f) => [f.path, f.bytes])));
    const [files] = srv.events('files-ready');
    expect(files).toMatchObject({ fromCache: false, files: model.files.length });
    expect((await fetch(`${srv.url}/v1/models/model`)).status).toBe(200);
  }, 120_000);
});

describe.concurrent('a boot failed for good', () => {
  const { proxy, server } = s3Suite();
  it('a missing bucket is failed at once, and not tried again', async () => {
    const srv = await server('s3://no-such-bucket/sd/', { BOOT_RETRY_MAX_S: '1' });
    const failed = await srv.waitFor('state', (s) => s.state === 'failed', 60_000);
    expect(failed.reason).toMatch(/^STORAGE_MISSING: /);
    const lists = proxy().stats.lists;
    // Longer than the first wait a transient failure would have had.
    await new Promise((r) => setTimeout(r, 1_500));
    expect(srv.events('state').map((s) => s.state)).not.toContain('retrying');
    expect(proxy().stats.lists).toBe(lists);
    expect(await json(`${srv.url}/v1/models/model`)).toMatchObject({ status: 503, body: { state: 'failed', reason: failed.reason } });
    expect((await json(`${srv.url}/v1/models/model`)).body).not.toHaveProperty('retry');
    // Exported at 0 for every code that is retried, and still 0.
    const page = await (await fetch(`${srv.url}/metrics`)).text();
    expect(page).toMatch(/^boot_retries_total\{model_name="model",code="STORAGE_TRANSIENT"\} 0$/m);
    expect(await metric(srv, 'boot_retries_total')).toBe(0);
  }, 60_000);
});

describe.concurrent('SIGTERM while a boot waits to be tried again', () => {
  const { proxy, server } = s3Suite();
  it('exits 0 at once, its lease on the cache entry released, without another attempt', async () => {
    proxy().faults.failLists = { count: 1_000, status: 503, code: 'ServiceUnavailable' };
    // The first wait is 2.5-5 s (BOOT_RETRY_MAX_S at its default).
    const srv = await server(`s3://${BUCKET}/${PREFIX}`);
    const retrying = await srv.waitFor('state', (s) => s.state === 'retrying', 60_000);
    expect(retrying.reason).toMatch(/^STORAGE_TRANSIENT: /);
    // The failed attempt let go of the entry's lock; the lease, taken before it, is kept for the next one.
    expect(await filesEnding(srv.cacheDir, '.lock')).toEqual([]);
    const leases = path.join(srv.cacheDir, '.leases');
    expect(await filesEnding(leases, '.lease')).toHaveLength(1);
    expect(await srv.stop('SIGTERM')).toEqual({ code: 0, signal: null });
    // The wait ended with the stop: no attempt began after it.
    expect(srv.events('state').map((s) => s.state).slice(-2)).toEqual(['retrying', 'stopping']);
    expect(srv.events('shut-down')).toHaveLength(1);
    expect(await filesEnding(leases, '.lease')).toEqual([]);
  }, 60_000);
});

describe.concurrent('a lease lost while the boot waits to be tried again', () => {
  const { proxy, server } = s3Suite();
  it('the attempt that fills the entry leases it again: an eviction elsewhere cannot remove what the pod serves', async () => {
    proxy().faults.failLists = { count: 1_000_000, status: 503, code: 'ServiceUnavailable' };
    const srv = await server(`s3://${BUCKET}/${PREFIX}`, { BOOT_RETRY_MAX_S: '2' });
    await srv.waitFor('state', (s) => s.state === 'retrying', 60_000);
    // What an eviction on another pod does to a lease whose heartbeat it judged stale (a cache volume away for minutes
    // on this node): the lease goes. The entry is not there yet (nothing listed), so this one is not taken again.
    const leases = path.join(srv.cacheDir, '.leases');
    const [lease] = await filesEnding(leases, '.lease');
    await fsp.unlink(path.join(leases, lease!));
    // The lease's next heartbeat (30 s) finds it gone.
    await until(() => srv.logs.some((l) => l.entryGone === true), 45_000, 100);
    proxy().faults.failLists = undefined;
    await srv.waitReady(60_000);
    const [files] = srv.events('files-ready');
    expect(files).toMatchObject({ fromCache: false });
    // Before: none; the entry filled by the retry was served unleased.
    expect(await filesEnding(leases, '.lease')).toHaveLength(1);
  }, 120_000);
});

describe.concurrent('a read error of the cache volume while the workers load the model', () => {
  // One at a time (each loads the model), beside the describes above.
  const live = liveServers();
  stuckFsForTests();
  /** The served demo model (the shared cache's build) copied into a cache folder of its own; its entry's name. */
  const copy = async () => {
    const model = await ensureDemoModel(sharedCacheDir());
    const cache = tempDir('dr-boot-retry-demo-');
    dirs.push(cache.cleanup);
    cpSync(model, path.join(cache.dir, path.basename(model)), { recursive: true });
    return { dir: cache.dir, entry: path.basename(model) };
  };

  it.skipIf(stuckFsUnavailable()).sequential.each([
    // ORT says only "Protobuf parsing failed" of such a read: the runtime reads the graph again to learn why.
    ['a graph', 'model.onnx', /^CACHE_IO: (text_encoder|unet|vae_decoder|vae_encoder)\/model\.onnx could not be read: read failed with EIO /],
    ['a tokenizer file', 'vocab.json', /^CACHE_IO: tokenizer: tokenizer\/vocab\.json could not be read: read failed with EIO /],
  ])('of %s is CACHE_IO naming the file, and tried again: ready once the volume reads again', async (_, name, reason) => {
    const backing = await copy();
    const mnt = `${backing.dir}-mnt`;
    dirs.push(() => rmSync(mnt, { recursive: true, force: true }));
    // Every read of the file fails until answer(): the first and any made again to learn why.
    const fs = await mountStuckFs(backing.dir, mnt, { eio: `read:${name}`, eioTimes: 1_000_000 });
    const srv = await startServer({ MODEL_CACHE_DIR: fs.dir, STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '4' }, { ready: false });
    live.push(srv);
    const retrying = await srv.waitFor('state', (s) => s.state === 'retrying', 60_000);
    fs.answer();
    // Named as what it is, inside the model, never by the mount's path.
    expect(retrying).toMatchObject({ previous: 'loading', attempt: 1, reason: expect.stringMatching(reason) });
    expect(retrying.reason).not.toContain(fs.dir);
    expect(retrying.reason).not.toMatch(/Protobuf|MODEL_FORMAT/);
    await srv.waitReady(60_000);
    const states = srv.events('state').map((s) => s.state);
    expect(states.slice(states.indexOf('retrying'))).toEqual(['retrying', 'resolving', 'loading', 'warming', 'ready']);
    expect(await metric(srv, 'boot_retries_total', { code: 'CACHE_IO' })).toBe(1);
    const p = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a', num_inference_steps: 1 }] });
    expect(p.status).toBe(200);
  }, 120_000);

  it.skipIf(stuckFsUnavailable()).sequential('a corrupt graph beside a file the volume cannot read, which ORT never opens, is still MODEL_FORMAT', async () => {
    const backing = await copy();
    writeFileSync(path.join(backing.dir, backing.entry, 'vae_decoder', 'model.onnx'), Buffer.alloc(4096, 0xff));
    writeFileSync(path.join(backing.dir, backing.entry, 'vae_decoder', 'notes.txt'), 'a stray file');
    const mnt = `${backing.dir}-mnt`;
    dirs.push(() => rmSync(mnt, { recursive: true, force: true }));
    const fs = await mountStuckFs(backing.dir, mnt, { eio: 'read:notes.txt', eioTimes: 1_000_000 });
    const srv = await startServer({ MODEL_CACHE_DIR: fs.dir, STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '1' }, { ready: false });
    live.push(srv);
    const failed = await srv.waitFor('state', (s) => s.state === 'failed', 60_000);
    // Before: "CACHE_IO: vae_decoder/notes.txt could not be read: read failed with EIO", ORT's own error hidden.
    expect(failed.reason).toMatch(/^MODEL_FORMAT: vae_decoder\/model\.onnx could not be loaded: /);
  }, 60_000);

  it.skipIf(stuckFsUnavailable()).sequential('a graph ORT parses but rejects (an operator it does not know) reads none of its weights again: MODEL_FORMAT with its text, not the volume\'s error', async () => {
    const backing = await copy();
    const vae = path.join(backing.dir, backing.entry, 'vae_decoder');
    const graph = onnxProto.onnx.ModelProto.decode(readFileSync(path.join(vae, 'model.onnx')));
    graph.graph!.node![0]!.opType = 'NoSuchOp';
    writeFileSync(path.join(vae, 'model.onnx'), onnxProto.onnx.ModelProto.encode(graph).finish());
    // Stands in for gigabytes of weights beside it: read again, its EIO would be found and blamed.
    writeFileSync(path.join(vae, 'weights.bin'), Buffer.alloc(4096));
    const mnt = `${backing.dir}-mnt`;
    dirs.push(() => rmSync(mnt, { recursive: true, force: true }));
    const fs = await mountStuckFs(backing.dir, mnt, { eio: 'read:weights.bin', eioTimes: 1_000_000 });
    const srv = await startServer({ MODEL_CACHE_DIR: fs.dir, STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '1' }, { ready: false });
    live.push(srv);
    const failed = await srv.waitFor('state', (s) => s.state === 'failed' || s.state === 'retrying', 60_000);
    // Before: "retrying" with "CACHE_IO: vae_decoder/weights.bin could not be read: read failed with EIO", tried again
    // for ever for a graph no retry mends, after reading every weights file of the component.
    expect([failed.state, failed.reason]).toEqual(['failed', expect.stringMatching(/^MODEL_FORMAT: vae_decoder\/model\.onnx could not be loaded: .*No Op registered for NoSuchOp/)]);
  }, 60_000);

  it.skipIf(stuckFsUnavailable()).sequential('weights the volume cannot stat (EIO as ORT resolves their path) are CACHE_IO naming the file, which a boot tries again', async () => {
    const backing = tempDir('dr-boot-retry-weights-');
    dirs.push(backing.cleanup);
    await buildDemoModel(path.join(backing.dir, 'model'), { externalData: true });
    const mnt = `${backing.dir}-mnt`;
    dirs.push(() => rmSync(mnt, { recursive: true, force: true }));
    const fs = await mountStuckFs(backing.dir, mnt, { eio: 'getattr:model.onnx_data', eioTimes: 1_000_000 });
    // Real ORT in this process (the server's own stat of the file would meet the EIO before ORT does).
    const graph = path.join(fs.dir, 'model', 'unet', 'model.onnx');
    const err = await ort.InferenceSession.create(graph).then(() => undefined, (e: unknown) => loadError('unet', graph, e));
    // ORT: "External data path validation failed for initializer: … Failed to get the weakly canonical path: … -
    // Input/output error". Before: MODEL_FORMAT with that text, a boot failed for good by a volume's passing fault.
    expect([(err as RuntimeError).code, (err as RuntimeError).message, retriedCode(err)])
      .toEqual(['CACHE_IO', expect.stringMatching(/^unet\/model\.onnx_data could not be read: \w+ failed with EIO /), 'CACHE_IO']);
    expect((err as RuntimeError).message).not.toContain(fs.dir);
  }, 60_000);

  it.skipIf(stuckFsUnavailable()).sequential.each([
    // The folder's listing gives each file's size (resolveLocal), the model folder is looked at first.
    ['a file of it', 'getattr:vocab.json', /^CACHE_IO: tokenizer\/vocab\.json could not be read: stat failed with EIO /],
    ['the folder itself', 'getattr:model', /^CACHE_IO: the model folder STORAGE_URI names could not be read: stat failed with EIO /],
  ])('a local model folder the volume fails to look into (%s) is CACHE_IO naming it inside the model, and tried again: ready once the volume answers', async (_, eio, reason) => {
    const backing = tempDir('dr-boot-retry-local-');
    dirs.push(backing.cleanup);
    await buildDemoModel(path.join(backing.dir, 'model'));
    const mnt = `${backing.dir}-mnt`;
    dirs.push(() => rmSync(mnt, { recursive: true, force: true }));
    const fs = await mountStuckFs(backing.dir, mnt, { eio, eioTimes: 1_000_000 });
    const srv = await startServer({ STORAGE_URI: path.join(fs.dir, 'model'), EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '4' }, { ready: false });
    live.push(srv);
    const retrying = await srv.waitFor('state', (s) => s.state === 'failed' || s.state === 'retrying', 60_000);
    fs.answer();
    // Before: failed for good, "unexpected error: EIO: i/o error, stat '<the mount>/model/tokenizer/vocab.json'" (or
    // STORAGE_MISSING "does not exist" for the folder itself).
    expect([retrying.state, retrying.reason]).toEqual(['retrying', expect.stringMatching(reason)]);
    expect(retrying.reason).not.toContain(fs.dir);
    await srv.waitReady(60_000);
    expect(await metric(srv, 'boot_retries_total', { code: 'CACHE_IO' })).toBe(1);
  }, 120_000);

  it.sequential('a corrupt graph is MODEL_FORMAT, and not tried again', async () => {
    const cache = await copy();
    writeFileSync(path.join(cache.dir, cache.entry, 'vae_decoder', 'model.onnx'), Buffer.alloc(4096, 0xff));
    const srv = await startServer({ MODEL_CACHE_DIR: cache.dir, STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '1' }, { ready: false });
    live.push(srv);
    const failed = await srv.waitFor('state', (s) => s.state === 'failed', 60_000);
    expect(failed.reason).toMatch(/^MODEL_FORMAT: vae_decoder\/model\.onnx could not be loaded: /);
    // Longer than the first wait a transient failure would have had.
    await new Promise((r) => setTimeout(r, 1_500));
    expect(srv.events('state').map((s) => s.state)).not.toContain('retrying');
  }, 60_000);
});
