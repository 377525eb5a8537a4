/**
 * Replicas starting together on one empty cache (Knative scaling from zero, a rollout after the cache was wiped): real
 * server processes (`node dist/src/main.js`) on one MODEL_CACHE_DIR, one s3:// model in s3rver behind a throttling
 * front that counts the body bytes it sends per object. One process downloads under the entry's lock; the others show
 * that they wait and with what progress, start their sessions from the files the holder has finished, and serve the
 * same pixels once it commits. A holder killed mid-download is taken over by one waiter, which resumes from the
 * journal; a holder stopped by SIGTERM releases the lock at once.
 */
import { spawnSync } from 'node:child_process';
import { Writable } from 'node:stream';
import pino from 'pino';
import { existsSync, promises as fsp, readdirSync, readFileSync, unlinkSync, utimesSync, watch } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, type DemoManifest } from '../src/demo/index.js';
import { CREDS, destroyS3, settledCount, startFaultProxy, startS3, testConfig, type FaultProxy, type S3Server, putFolder } from './helpers/s3.js';
import { resolveModel, cacheKey, containedPath, parseStorageUri, type FetchProgress } from '../src/storage/fetch.js';
import { pidBehindLast } from './helpers/pidns.js';
import { alive, postJson, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';
import { acquireLock, PID_NS } from '../src/storage/lock.js';

const BUCKET = 'models';
const PREFIX = 'burst/';
// ~10 MB in 1 MiB parts over 4 connections paced at 4 MB/s each. "Mid-download" is made by holding ranges at the
// front (gate()), never by timing: the tests wait for bytes and states, not for time.
const PAD_BYTES = 2e6;
const LINK_BPS = 4e6;
const LINK = { S3_MAX_CONCURRENCY: '4', S3_PART_SIZE: String(1 << 20), EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off', WARMUP_STEPS: '1' };

let s3: S3Server;
let proxy: FaultProxy;
let model: DemoManifest;
const dirs: Array<() => void> = [];

/** The inodes this process's inotify instances watch (/proc/self/fdinfo). */
function inotifyWatched(): Set<number> {
  const out = new Set<number>();
  for (const fd of readdirSync('/proc/self/fd')) {
    let info: string;
    try {
      info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
    } catch {
      continue; // closed meanwhile
    }
    for (const m of info.matchAll(/^inotify wd:\d+ ino:([0-9a-f]+) /gm)) out.add(parseInt(m[1]!, 16));
  }
  return out;
}
const live: ServerHandle[] = [];

beforeAll(async () => {
  const m = tempDir('dr-burst-model-');
  dirs.push(m.cleanup);
  model = await buildDemoModel(m.dir, { padBytes: PAD_BYTES });
  s3 = await startS3([BUCKET]);
  await putFolder(s3, BUCKET, PREFIX, model.dir, model.files.map((f) => f.path));
  proxy = await startFaultProxy(s3.port, { bytesPerSecond: LINK_BPS, exactPace: true });
}, 60_000);

afterEach(async () => {
  await Promise.all(live.splice(0).map((s) => s.stop('SIGKILL')));
  proxy.faults = { bytesPerSecond: LINK_BPS, exactPace: true };
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

/** Whether this machine lets an unprivileged user namespace own a new pid namespace (it may not, in a container). */
function canUnshare(): boolean {
  return process.platform === 'linux' && spawnSync('unshare', ['-r', '--pid', '--fork', '--mount-proc', 'sh', '-c', 'echo 99 > /proc/sys/kernel/ns_last_pid'], { stdio: 'ignore', timeout: 5_000 }).status === 0;
}


/**
 * A server in a pid namespace of its own on this host, as another pod on the shared PVC is (same host name when the
 * pods share the node's network or a pod template names them alike). Its pid there is one no process here has, so
 * a waiter here that judged it as its own would find it dead at once. Returns the server and its pid as seen here.
 */
async function podServer(cache: string): Promise<{ srv: ServerHandle; hostPid: () => number }> {
  const pid = pidBehindLast();
  const srv = await startServer(cacheEnv(cache), {
    prefix: ['unshare', '-r', '--pid', '--fork', '--kill-child', '--mount-proc', 'sh', '-c', `echo ${pid} > /proc/sys/kernel/ns_last_pid; "$0" "$1"`],
  });
  live.push(srv);
  // unshare → sh → node: the node process is the one whose command line runs the entry.
  const hostPid = () => {
    const kids = (p: number): number[] => readFileSync(`/proc/${p}/task/${p}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    for (let todo = [srv.proc.pid!]; todo.length > 0;) {
      const p = todo.shift()!;
      if (readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0')[0] === process.execPath) return p;
      todo.push(...kids(p));
    }
    throw new Error('no server process under unshare');
  };
  return { srv, hostPid };
}

const lockFile = (cache: string) => path.join(cache, readdirSync(cache).find((n) => n.endsWith('.lock'))!);
const lockInfo = (cache: string): { pid: number; pidns?: string; token: string } | undefined => {
  try {
    return JSON.parse(readFileSync(lockFile(cache), 'utf8')) as { pid: number; pidns?: string; token: string };
  } catch {
    return undefined;
  }
};

/**
 * Holds every range of a weights file from `fromMiB` MiB on at the front until the returned function is called (or a
 * later gate replaces this one): a holder stops mid-download (the small files and the first parts sent, about half the
 * model at 1 MiB) for as long as a test needs to look at its waiters, however loaded the machine.
 */
function gate(fromMiB = 1): () => void {
  let open!: () => void;
  const release = new Promise<void>((r) => (open = r));
  proxy.faults = { ...proxy.faults, hold: { keys: /onnx_data/, range: (r) => Number(/bytes=(\d+)-/.exec(r ?? '')?.[1] ?? 0) >= fromMiB << 20, release } };
  return () => {
    if (proxy.faults.hold?.release === release) {
      const { hold: _, ...rest } = proxy.faults;
      proxy.faults = rest;
    }
    open();
  };
}

/**
 * Resumed, not restarted: of the `atKill` bytes S3 had sent the killed holder (about a quarter of the model or more),
 * the next holder kept most (a restart would fetch the whole model again), so the total stays well under twice the model.
 */
function expectResumed(atKill: number, total: number): void {
  expect(atKill).toBeGreaterThanOrEqual(0.2 * model.totalBytes);
  expect(total - atKill, `${atKill} bytes sent before the kill, ${total - atKill} after, for a ${model.totalBytes}-byte model`)
    .toBeLessThan(model.totalBytes - 0.75 * atKill);
  expect(total).toBeLessThan(1.5 * model.totalBytes);
}

const exitOf = (srv: ServerHandle) => new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
  const p = srv.proc;
  if (p.exitCode !== null || p.signalCode !== null) resolve({ code: p.exitCode, signal: p.signalCode });
  else p.once('exit', (code, signal) => resolve({ code, signal }));
});

/** The committed entry holds every file of the model, byte for byte. */
async function expectModelFiles(cache: string): Promise<void> {
  const dir = entryDir(cache);
  expect(existsSync(path.join(dir, '.complete.json'))).toBe(true);
  for (const f of model.files) expect((await fsp.readFile(path.join(dir, f.path))).equals(await fsp.readFile(path.join(model.dir, f.path))), f.path).toBe(true);
}

const entryDir = (cache: string) => path.join(cache, readdirSync(cache).find((n) => !n.startsWith('.') && !n.endsWith('.lock'))!);

describe('replicas starting together on one empty cache', () => {
  it('one downloads, the others show that they wait and then serve the same pixels; S3 sends the model once', async () => {
    const cache = tempDir('dr-burst-cache-');
    dirs.push(cache.cleanup);
    const before = bytesByFile();
    const lists = proxy.stats.lists;
    const held = proxy.stats.held;
    const open1 = gate(1);
    const srvs = await burst(3, cache.dir);
    // The holder is the process the lock names; the others wait. While the holder downloads, a waiter's model endpoint
    // says so and shows the bytes on disk growing; it is live and not ready.
    await until(() => lockHolder(cache.dir) !== undefined, 20_000);
    const holder = srvs.find((s) => s.proc.pid === lockHolder(cache.dir))!;
    expect(holder).toBeDefined();
    const waiters = srvs.filter((s) => s !== holder);
    // Held at 1 MiB of each weights file: the waiters show the holder's bytes on disk and start the sessions of the
    // component it has made whole (the VAE decoder's, under 1 MiB); then at 2 MiB: their progress grows.
    const progress = async (w: ServerHandle) => {
      const { status, body } = await modelBody(w);
      expect(status).toBe(503);
      expect([body.state, body.progress?.phase]).toEqual(['fetching', 'waiting']);
      expect(body.progress!.bytesTotal).toBe(model.totalBytes);
      expect((await fetch(`${w.url}/v2/health/live`)).status).toBe(200);
      expect((await fetch(`${w.url}/v2/health/ready`)).status).toBe(503);
      return body.progress!.bytesDone;
    };
    const first = new Map<ServerHandle, number>();
    await until(() => proxy.stats.held > held, 20_000, 20);
    for (const w of waiters) {
      await until(async () => (await modelBody(w)).body.progress?.phase === 'waiting' && (await progress(w)) > 0, 20_000, 50);
      first.set(w, await progress(w));
      await w.waitFor('session', (e) => e.component === 'vae_decoder', 20_000);
      expect(w.events('files-ready')).toEqual([]);
    }
    const open2 = gate(2);
    open1();
    for (const w of waiters) await until(async () => (await progress(w)) > first.get(w)!, 20_000, 50);
    expect(lockHolder(cache.dir)).toBe(holder.proc.pid);
    open2();
    await Promise.all(srvs.map((s) => s.waitReady(30_000)));
    // One commit: the holder fetched, the waiters took its entry; S3 sent each object's bytes once.
    const files = srvs.map((s) => s.events('files-ready')[0]!);
    expect(files.map((f) => f.fromCache)).toEqual(srvs.map((s) => s !== holder));
    expect(new Set(files.map((f) => f.dir)).size).toBe(1);
    // Every byte was received by a server that is now ready, so the front's counts are final.
    const after = bytesByFile();
    for (const f of model.files) expect(after.get(f.path)! - before.get(f.path)!, f.path).toBe(f.bytes);
    // One listing per server, plus the holder's check after its last byte; a waiter lists nothing after the commit.
    expect(proxy.stats.lists - lists).toBe(srvs.length + 1);
    expect(existsSync(path.join(entryDir(cache.dir), '.complete.json'))).toBe(true);
    const pixels = await Promise.all(srvs.map(image));
    expect(new Set(pixels).size).toBe(1);
  }, 60_000);
  it('the holder killed (SIGKILL) mid-download: a waiter takes over at once, resumes from the journal, both survivors serve', async () => {
    const cache = tempDir('dr-burst-kill-');
    dirs.push(cache.cleanup);
    const before = sentTotal();
    const held = proxy.stats.held;
    const open = gate();
    const srvs = await burst(3, cache.dir);
    await until(() => lockHolder(cache.dir) !== undefined, 20_000);
    const holder = srvs.find((s) => s.proc.pid === lockHolder(cache.dir))!;
    const waiters = srvs.filter((s) => s !== holder);
    await until(() => proxy.stats.held > held, 20_000, 20);
    for (const w of waiters) await until(async () => (await modelBody(w)).body.progress?.phase === 'waiting', 20_000, 20);
    const atKill = await settledCount(sentTotal) - before;
    await holder.stop('SIGKILL');
    open();
    // Its pid is dead in this pid namespace: no heartbeat has to go stale (that would take 30 s, past this test's end).
    await until(() => waiters.some((w) => w.proc.pid === lockHolder(cache.dir)), 10_000, 5);
    await Promise.all(waiters.map((w) => w.waitReady(30_000)));
    const files = waiters.map((w) => w.events('files-ready')[0]!);
    expect(files.map((f) => f.fromCache).sort()).toEqual([false, true]);
    const pixels = await Promise.all(waiters.map(image));
    expect(pixels[0]).toBe(pixels[1]);
    await expectModelFiles(cache.dir);
    const total = sentTotal() - before;
    expectResumed(atKill, total);
  }, 60_000);

  const ns = canUnshare();
  /** The waiter took the lock and finished the download (no cache hit), fetching only what was missing (bytes counted from `before`); the files are whole. */
  async function expectTakenOver(dir: string, waiter: ServerHandle, atKill: number, before: number, withinMs = 10_000): Promise<void> {
    // Seen holding the lock, or saying it took it: a quick fill can commit and let go between two polls of a busy machine.
    const tookOver = () => lockInfo(dir)?.pid === waiter.proc.pid || waiter.logs.some((l) => l.msg === 'the other process left the cache entry unfinished; this one fills it');
    await until(tookOver, withinMs, 5).catch((e: Error) => {
      throw new Error(`${e.message} for the takeover; the waiter's last lines: ${JSON.stringify(waiter.logs.slice(-6).map((l) => l.msg))}`);
    });
    await waiter.waitReady(30_000);
    expect(waiter.events('files-ready')[0]!.fromCache).toBe(false);
    expectResumed(atKill, sentTotal() - before);
    await expectModelFiles(dir);
  }

  /** A holder in a pid namespace of its own (another pod) filling a fresh cache, its ranges held, and one server waiting on it. */
  async function podAndWaiter(prefix: string) {
    const cache = tempDir(prefix);
    dirs.push(cache.cleanup);
    const before = sentTotal();
    const held = proxy.stats.held;
    const open = gate();
    const pod = await podServer(cache.dir);
    await until(() => lockInfo(cache.dir) !== undefined, 20_000);
    const theirs = lockInfo(cache.dir)!;
    const waiter = (await burst(1, cache.dir))[0]!;
    await until(() => proxy.stats.held > held, 20_000, 20);
    await until(async () => (await modelBody(waiter)).body.progress?.phase === 'waiting', 10_000, 20);
    return { cache, before, open, pod, theirs, waiter };
  }

  it.skipIf(!ns)('a holder in another pid namespace (another pod) stopped by SIGTERM releases the lock: the waiter takes over at once', async () => {
    const { cache, before, open, pod, theirs, waiter } = await podAndWaiter('dr-burst-term-');
    // The holder's pid means nothing here: its lock names a pid namespace that is not this one, and a pid dead here.
    expect(theirs.pidns).toBeDefined();
    expect(theirs.pidns).not.toBe(PID_NS);
    expect(alive(theirs.pid)).toBe(false);
    const atKill = (await settledCount(sentTotal)) - before;
    process.kill(pod.hostPid(), 'SIGTERM');
    // unshare exits with its child's status (signalling unshare itself would kill the server at once).
    expect(await exitOf(pod.srv)).toEqual({ code: 0, signal: null });
    open();
    await expectTakenOver(cache.dir, waiter, atKill, before);
  }, 60_000);

  it.skipIf(!ns)('a holder in another pid namespace killed (SIGKILL): the waiter waits for its heartbeat to go stale, then takes over and resumes', async () => {
    const { cache, before, open, pod, theirs, waiter } = await podAndWaiter('dr-burst-podkill-');
    process.kill(pod.hostPid(), 'SIGKILL');
    await exitOf(pod.srv);
    open();
    // A dead pid of another namespace is not judged here: for two polls (and more) the waiter keeps waiting on the lock.
    const sentAtKill = await settledCount(sentTotal);
    await new Promise((r) => setTimeout(r, 1_000));
    expect(lockInfo(cache.dir)?.token).toBe(theirs.token);
    expect(sentTotal()).toBe(sentAtKill);
    const atKill = sentAtKill - before;
    const { body } = await modelBody(waiter);
    expect([body.state, body.progress?.phase]).toEqual(['fetching', 'waiting']);
    // 30 s later its heartbeat is stale: the lock's mtime set back by that much plays the wait. That is a move of the
    // heartbeat, which the waiter then watches stand still for 10 s (a third of 30 s) before it takes over.
    const old = new Date(Date.now() - 31_000);
    utimesSync(lockFile(cache.dir), old, old);
    await expectTakenOver(cache.dir, waiter, atKill, before, 25_000);
  }, 60_000);
});


describe('the wait, in one process', () => {
  const capture = () => {
    const lines: Array<Record<string, unknown>> = [];
    const sink = new Writable({ write(c, _e, cb) { for (const l of String(c).split('\n').filter(Boolean)) lines.push(JSON.parse(l) as Record<string, unknown>); cb(); } });
    return { log: pino({ level: 'info' }, sink), lines };
  };

  /** A lock held in a fresh folder, and a second acquireLock waiting on it (stopped by `stop`), its polls counted. */
  async function heldAndWaiting(prefix: string, pollMs: number) {
    const { dir, cleanup } = tempDir(prefix);
    dirs.push(cleanup);
    const file = path.join(dir, 'entry.lock');
    const held = (await acquireLock(file))!;
    const stop = new AbortController();
    const w = { dir, held, stop, polls: 0, waiting: undefined as unknown as ReturnType<typeof acquireLock> };
    w.waiting = acquireLock(file, { pollMs, signal: stop.signal, onWait: () => void w.polls++ });
    w.waiting.catch(() => undefined);
    return w;
  }

  it('a waiter writes nothing while the lock stands (no new lock file per poll)', async () => {
    const w0 = await heldAndWaiting('dr-burst-lock-', 10);
    const { dir, held, stop } = w0;
    // Its first look tries to create the lock (and finds it taken); the polls after it only read.
    await until(() => w0.polls >= 1, 10_000, 2);
    const created: string[] = [];
    const w = watch(dir, (type, f) => {
      if (type === 'rename' && f !== null) created.push(f.toString());
    });
    try {
      const from = w0.polls;
      await until(() => w0.polls >= from + 10, 10_000, 2);
      expect(created).toEqual([]);
    } finally {
      w.close();
      stop.abort();
      await held.release();
    }
  });

  it('the release ends a wait at once on this host (inotify), without waiting for the next poll', async () => {
    // A poll a minute: within this test only the release, seen through inotify, can end the wait.
    const w = await heldAndWaiting('dr-burst-wake-', 60_000);
    const { held, stop, waiting } = w;
    try {
      await until(() => w.polls >= 1, 10_000, 2);
      // The watch is on the lock's folder itself (set through the folder's descriptor, /proc/self/fd/N).
      const folder = (await fsp.stat(w.dir)).ino;
      await until(() => inotifyWatched().has(folder), 10_000, 2);
      await held.release();
      const got = await Promise.race([waiting, new Promise<'none'>((r) => setTimeout(() => r('none'), 10_000))]);
      expect(got).not.toBe('none');
      await (got as Awaited<typeof waiting>)?.release();
      expect(w.polls).toBe(1);
    } finally {
      stop.abort();
    }
  });

  it('a release made before the waiter has set its watch (after its look found the lock) still ends the wait at once', async () => {
    // The watch is set once a stat of the lock answered (the loop stays free on a stuck volume): a release between the
    // waiter's look and its watch raises no event it sees. A poll a minute: only a look after the watch ends the wait.
    const { dir, cleanup } = tempDir('dr-burst-early-');
    dirs.push(cleanup);
    const file = path.join(dir, 'entry.lock');
    const held = (await acquireLock(file))!;
    const stop = new AbortController();
    let polls = 0;
    // The holder's release, made as the waiter starts to wait (its onWait comes before the stat's answer can).
    const waiting = acquireLock(file, { pollMs: 60_000, signal: stop.signal, onWait: () => void (polls++ === 0 && unlinkSync(file)) });
    waiting.catch(() => undefined);
    try {
      const got = await Promise.race([waiting, new Promise<'none'>((r) => setTimeout(() => r('none'), 10_000))]);
      expect(got).not.toBe('none');
      await (got as Awaited<typeof waiting>)?.release();
      expect(polls).toBe(1);
    } finally {
      stop.abort();
      await held.release();
    }
  });

  it('a waiter logs its progress as the holder writes, then uses the commit; the holder logs its own', async () => {
    const cache = tempDir('dr-burst-inproc-');
    dirs.push(cache.cleanup);
    const uri = `s3://${BUCKET}/${PREFIX}`;
    const cfg = testConfig(proxy.endpoint, cache.dir, { S3_MAX_CONCURRENCY: '4', S3_PART_SIZE: String(1 << 20) });
    Object.assign(process.env, CREDS);
    const a = capture();
    const b = capture();
    const seenB: FetchProgress[] = [];
    const held = proxy.stats.held;
    const open = gate();
    const stop = new AbortController();
    const ra = resolveModel(uri, { cfg, log: a.log, progressLogMs: 1, signal: stop.signal });
    const rb = until(() => proxy.stats.held > held, 20_000, 5)
      .then(() => resolveModel(uri, { cfg, log: b.log, progressLogMs: 1, signal: stop.signal, onProgress: (p) => seenB.push(p) }));
    let resA, resB;
    try {
      await until(() => seenB.some((p) => p.phase === 'waiting' && p.bytesDone > 0), 20_000, 5);
      open();
      [resA, resB] = await Promise.all([ra, rb]);
    } finally {
      stop.abort();
      open();
      await Promise.allSettled([ra, rb]);
    }
    expect([resA.fromCache, resB.fromCache]).toEqual([false, true]);
    const entry = containedPath(cache.dir, cacheKey(parseStorageUri(uri) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, cfg.s3.endpoint));
    expect(resB.dir).toBe(entry);
    // The waiter's lines: who holds the entry, then the bytes it has on disk out of the model's, growing.
    const waits = b.lines.filter((l) => typeof l.waitedS === 'number');
    expect(waits.length).toBeGreaterThanOrEqual(1);
    expect(waits[0]).toMatchObject({ holder: `${os.hostname()}/${process.pid}`, mbTotal: +(model.totalBytes / 1e6).toFixed(1), filesTotal: model.files.length });
    expect((waits.at(-1)!.mbDone as number) > 0).toBe(true);
    // The holder's own progress lines while it downloads.
    const downloads = a.lines.filter((l) => typeof l.mbDone === 'number');
    expect(downloads.length).toBeGreaterThanOrEqual(1);
    expect(downloads[0]).toMatchObject({ mbTotal: +(model.totalBytes / 1e6).toFixed(1), filesTotal: model.files.length });
  }, 30_000);
});
