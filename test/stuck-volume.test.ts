/**
 * SIGTERM while the cache volume does not answer (an NFS server gone away on a hard mount: every call on it blocks for
 * good). A FIFO stands in for a file of that volume: opening it blocks until a writer comes, as any call on such a
 * mount does; a stat of it still answers, which a hung NFS mount's would not. Real processes (the built server on the
 * demo model, from a local cache or from s3rver; the warm-up CLI), as the kubelet stops them: the process must exit
 * within its bounds, with one line naming what did not finish, and not be left to the SIGKILL at the end of the grace.
 * Where FUSE can be mounted, the cache is also put on test/native/stuck-fs, which stops answering for real: every call
 * waits, a stat included, so a synchronous one on the event loop holds it (and every signal) for good.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { closeSync, constants, cpSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { freePort } from '../scripts/bench-common.js';
import { buildDemoModel, ensureDemoModel } from '../src/demo/index.js';
import { JOURNAL, LORA_SETS } from '../src/storage/cache.js';
import { LAST_USED, leaseEntry, LEASES, leasesDir } from '../src/storage/lease.js';
import { pendingIo } from '../src/storage/pending-io.js';
import { cacheKey, parseStorageUri } from '../src/storage/uri.js';
import { CREDS, destroyS3, putFolder, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { ENTRY, postJson, sharedCacheDir, startServer, tempDir, until, type LogLine, type ServerHandle } from './helpers/server.js';
import { mountStuckFs, stuckFsUnavailable, type StuckFs } from './helpers/stuck-fs.js';
import { runWarmupCli } from './helpers/warmup-cli.js';

const tmp = tempDir('dr-stuck-');
let s3: S3Server;
let proxy: FaultProxy;
let slow: FaultProxy;
const PREFIX = 'demo/';

beforeAll(async () => {
  const m = path.join(tmp.dir, 'model');
  const model = await buildDemoModel(m);
  s3 = await startS3(['models']);
  await putFolder(s3, 'models', PREFIX, model.dir, model.files.map((f) => f.path));
  proxy = await startFaultProxy(s3.port);
  slow = await startFaultProxy(s3.port, { bytesPerSecond: 200e3 });
}, 60_000);

afterAll(async () => {
  await proxy?.close();
  await slow?.close();
  if (s3) await destroyS3(s3);
  tmp.cleanup();
});

/**
 * The tests run side by side (each mostly waits out the 15 s cleanup bound): what one starts is ended at its own end,
 * in the reverse order of its start (onTestFinished runs last registered first), so a server goes before the FIFO or
 * the mount it waits on.
 */
type Finished = Pick<TestContext, 'onTestFinished'>;

/** Replaces `file` by a FIFO: every open of it blocks until a writer comes (the test's end lets its reader go). */
function stick(t: Finished, file: string): void {
  rmSync(file, { force: true });
  mkdirSync(path.dirname(file), { recursive: true });
  execFileSync('mkfifo', [file]);
  t.onTestFinished(() => {
    // A reader still blocked on the FIFO is let go: a writer opens it (without blocking: ENXIO when no reader is left).
    try {
      closeSync(openSync(file, constants.O_WRONLY | constants.O_NONBLOCK));
    } catch {
      // no reader left
    }
    rmSync(file, { force: true });
  });
}

/** startServer, the server SIGKILLed at the test's end if it still runs. */
async function serverFor(t: Finished, ...args: Parameters<typeof startServer>): Promise<ServerHandle> {
  const srv = await startServer(...args);
  t.onTestFinished(async () => {
    await srv.stop('SIGKILL');
  });
  return srv;
}

/** SIGTERM, then the exit, or SIGKILL after `ms` (the kubelet's at the end of the grace period). */
async function terminate(srv: ServerHandle, ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null; seconds: number }> {
  const t0 = performance.now();
  const r = await srv.stop('SIGTERM', ms);
  return { ...r, seconds: (performance.now() - t0) / 1000 };
}

const stopLine = (logs: readonly LogLine[]) => logs.find((l) => l.level === 'error' && String(l.msg).startsWith('shutdown did not finish'));

/**
 * One call of a held lease's heartbeat (lock.ts hold: a read of the lease file, then a utimes; every 30 s), as a stop
 * line names it (a pattern): the model entry's lease (`key`: a server on S3) or the adapter sets' folder's (every
 * server with a cache). A stop line lists every call pending, and a beat in flight at that instant is one.
 */
const leaseBeat = (key?: string) => `(?:read|utimes) ${key === undefined ? `${LORA_SETS.replace(/[.]/g, '\\.')}/\\.leases/[^/; ]+` : `\\.leases/${key}`}/[^/; ]+\\.lease still pending after \\d+ s`;

describe.concurrent('the server, SIGTERM with the cache volume stuck', () => {
  it('while the boot reads a model file: probes answer, and it exits 143 within the cleanup bound, naming the file', async (t) => {
    const cache = path.join(tmp.dir, 'cache-a');
    cpSync(await ensureDemoModel(sharedCacheDir()), path.join(cache, path.basename(await ensureDemoModel(sharedCacheDir()))), { recursive: true });
    const entry = readdirSync(cache)[0]!;
    stick(t, path.join(cache, entry, 'unet', 'model.onnx'));
    const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: cache, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1' });
    await srv.waitFor('state', (d) => d.state === 'loading');
    // Liveness and readiness never touch the volume: answered while a worker is stuck on it.
    expect((await fetch(`${srv.url}/v2/health/live`)).status).toBe(200);
    expect((await fetch(`${srv.url}/v2/health/ready`)).status).toBe(503);
    // Before, the close waited for the worker for good: the kubelet's SIGKILL (here after 40 s) ended it.
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    const line = stopLine(srv.logs);
    expect(line?.msg).toMatch(new RegExp(`the pipeline workers did not stop \\(still creating sessions from [^)]*${entry}/unet/model\\.onnx`));
    expect(line?.msg).toMatch(/exit 143\)$/);
    expect(line?.msg).not.toContain(cache);
    expect(srv.events('shut-down')).toMatchObject([{ unfinished: ['the pipeline workers'] }]);
  }, 90_000);

  it('while serving from S3 with the lease folder stuck: the lease release is named, the exit is 143, the next start serves', async (t) => {
    const cache = path.join(tmp.dir, 'cache-b');
    const env = {
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://models/${PREFIX}`, MODEL_CACHE_DIR: cache,
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    };
    // A first run fills the entry and stops cleanly: exit 0, its lease released (the entry's last use written).
    const first = await serverFor(t, env, { ready: true });
    expect(await terminate(first, 40_000)).toMatchObject({ code: 0, signal: null });
    expect(stopLine(first.logs)).toBeUndefined();
    const key = cacheKey(parseStorageUri(env.STORAGE_URI) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, proxy.endpoint);
    const lastUsed = path.join(leasesDir(path.join(cache, key)), LAST_USED);
    expect(existsSync(lastUsed)).toBe(true);
    stick(t, lastUsed);
    const srv = await serverFor(t, env, { ready: true });
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    const line = stopLine(srv.logs);
    // The release's write first (oldest); the leases' heartbeats go on while it waits (the entry's and the adapter
    // sets' folder's, every 30 s): one in flight at that instant on a loaded machine is named after it, pending too.
    const beats = `(?:; (?:${leaseBeat(key)}|${leaseBeat()}))*`;
    expect(line?.msg).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: writeFile \\.leases/${key}/last-used still pending after \\d+ s${beats}; exiting without waiting for it \\(exit 143\\)$`));
    expect(JSON.stringify(srv.logs)).not.toContain(CREDS.AWS_SECRET_ACCESS_KEY);
    expect(srv.events('shut-down')).toMatchObject([{ unfinished: ['the model fetch and the cache entry lease'] }]);
    // Nothing a later start misreads: the volume answers again, and the entry is served as committed.
    const next = await serverFor(t, env, { ready: true });
    expect(next.events('files-ready')).toMatchObject([{ fromCache: true }]);
  }, 180_000);
});

/** How many threads of process `pid` sleep in the kernel function `wchan`. */
const waitingThreads = (pid: number, wchan: string) => readdirSync(`/proc/${pid}/task`).filter((t) => {
  try {
    return readFileSync(`/proc/${pid}/task/${t}/wchan`, 'utf8') === wchan;
  } catch {
    return false; // the thread ended
  }
}).length;
/** Whether a thread of process `pid` sleeps in the kernel function `wchan`. */
const waitsIn = (pid: number, wchan: string) => waitingThreads(pid, wchan) > 0;
/** Whether a thread of process `pid` is blocked opening a FIFO, waiting for its other end. */
const opensFifo = (pid: number) => waitsIn(pid, 'wait_for_partner');

/**
 * A server on the demo model whose adapter-set folder's lease (.lora-sets/, taken at start, never released: it goes
 * stale with the process) becomes a FIFO, SIGTERMed while its heartbeat (every 30 s) is blocked reading it: a call
 * on the volume no stop step awaits, still pending once the cleanup is over. `answerMs` after the cleanup's end, a
 * writer gives the read the file's own content (a slow volume's call); without `answerMs`, none comes (a stuck one).
 */
async function heartbeatPendingAtStop(t: Finished, name: string, answerMs?: number) {
  const cache = path.join(tmp.dir, name);
  const model = await ensureDemoModel(sharedCacheDir());
  cpSync(model, path.join(cache, path.basename(model)), { recursive: true });
  const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: cache, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1' }, { ready: true });
  const leases = path.join(cache, LORA_SETS, LEASES);
  const [work] = readdirSync(leases);
  const [lease] = readdirSync(path.join(leases, work!)).filter((f) => f.endsWith('.lease'));
  const file = path.join(leases, work!, lease!);
  const content = readFileSync(file);
  stick(t, file);
  await until(() => opensFifo(srv.proc.pid!), 45_000, 100);
  const stopped = terminate(srv, 40_000);
  if (answerMs !== undefined) {
    await srv.waitFor('shut-down');
    await new Promise((r) => setTimeout(r, answerMs));
    // A reader blocked in its open counts: a non-blocking open for writing lets it go. None (ENXIO): the process did
    // not wait for the call, and the assertions say how it ended.
    try {
      const fd = openSync(file, constants.O_WRONLY | constants.O_NONBLOCK);
      writeSync(fd, content);
      closeSync(fd);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENXIO') throw e;
    }
  }
  return { srv, rel: `${LORA_SETS}/${LEASES}/${work}/${lease}`, r: await stopped };
}

describe.concurrent('the server, SIGTERM with a call on the cache volume pending after the cleanup', () => {
  // Two servers side by side: each waits up to 30 s for its heartbeat to reach the FIFO.
  it('answered 1.5 s after the cleanup (a slow volume): the stop ends as a clean one, exit 0; never answered: 143 when the cleanup\'s 15 s run out, naming the read', async (t) => {
    const [slowStop, stuckStop] = await Promise.all([heartbeatPendingAtStop(t, 'cache-slow', 1_500), heartbeatPendingAtStop(t, 'cache-slow-stuck')]);
    // Before, a call still pending half a second after the cleanup was judged stuck: exit 143, naming the read.
    expect(stopLine(slowStop.srv.logs)?.msg).toBeUndefined();
    expect(slowStop.r).toMatchObject({ code: 0, signal: null });
    expect(slowStop.srv.events('shut-down')).toMatchObject([{ drained: true }]);
    expect(slowStop.srv.events('shut-down')[0]).not.toHaveProperty('unfinished');

    expect(stuckStop.r).toMatchObject({ code: null, signal: 'SIGTERM' });
    expect(stopLine(stuckStop.srv.logs)?.msg).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: read ${stuckStop.rel.replace(/[.]/g, '\\.')} still pending after \\d+ s; exiting without waiting for it \\(exit 143\\)$`));
  }, 150_000);
});

/** Whether this machine lets an unprivileged user namespace own a new pid namespace (it may not, in a container). */
const canUnshare = process.platform === 'linux' && spawnSync('unshare', ['-r', '--pid', '--fork', '--mount-proc', 'true'], { stdio: 'ignore', timeout: 5_000 }).status === 0;

/**
 * The server as PID 1 of a pid namespace of its own (under unshare), booting on a cache whose UNet graph is stuck: its
 * node process, to signal as the kubelet does (not through unshare, which would take it down with it), and its exit.
 */
async function stuckAsPid1(t: Finished, name: string): Promise<{ srv: ServerHandle; node: number; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> }> {
  const cache = path.join(tmp.dir, name);
  const model = await ensureDemoModel(sharedCacheDir());
  cpSync(model, path.join(cache, path.basename(model)), { recursive: true });
  stick(t, path.join(cache, readdirSync(cache)[0]!, 'unet', 'model.onnx'));
  const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: cache, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1' }, {
    prefix: ['unshare', '-r', '--pid', '--fork', '--kill-child', '--mount-proc'],
  });
  await srv.waitFor('state', (d) => d.state === 'loading');
  const [node] = readFileSync(`/proc/${srv.proc.pid}/task/${srv.proc.pid}/children`, 'utf8').trim().split(/\s+/).map(Number);
  expect(readFileSync(`/proc/${node}/status`, 'utf8')).toMatch(/^NSpid:\s+\d+\s+1$/m);
  // unshare exits as its child did; the test's SIGKILL at 40 s stands for the kubelet's at the end of the grace period.
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => {
    const timer = setTimeout(() => srv.proc.kill('SIGKILL'), 40_000);
    srv.proc.once('exit', (code, signal) => {
      clearTimeout(timer);
      r({ code, signal });
    });
  });
  return { srv, node: node!, exited };
}

describe.concurrent('the server as PID 1 (the image has no init: node is its container\'s first process)', () => {
  // PID 1 of a pid namespace is not ended by a signal it has no handler for, sent by itself or by anyone in the
  // namespace (the kubelet's SIGKILL comes from outside it): a stop that ended itself by SIGTERM's default action
  // was left running until the end of the grace period.
  it.skipIf(!canUnshare)('a worker stuck on the volume: SIGTERM still ends it within the cleanup bound, exit 143', async (t) => {
    const { srv, node, exited } = await stuckAsPid1(t, 'cache-pid1');
    process.kill(node, 'SIGTERM');
    // 143, never the test's SIGKILL at 40 s.
    expect(await exited).toEqual({ code: 143, signal: null });
    expect(stopLine(srv.logs)?.msg).toMatch(/the pipeline workers did not stop .* \(exit 143\)$/);
  }, 90_000);

  it.skipIf(!canUnshare)('a third signal ends it at once, as SIGKILL would (137), though SIGKILL sent to itself does not reach PID 1', async (t) => {
    const { srv, node, exited } = await stuckAsPid1(t, 'cache-pid1-third');
    // Three signals, each past the second in which a repeat counts as the same one: a signal is sent once the server has
    // said it took the one before, as a loaded machine may run the handler of one late and of the next at once.
    const said = (msg: RegExp) => until(() => srv.logs.some((l) => msg.test(String(l.msg))), 30_000, 20);
    process.kill(node, 'SIGTERM');
    await said(/^signal received$/);
    await new Promise((r) => setTimeout(r, 1_200));
    process.kill(node, 'SIGTERM');
    await said(/^second signal: /);
    await new Promise((r) => setTimeout(r, 1_200));
    process.kill(node, 'SIGTERM');
    // Before: the third signal's SIGKILL was dropped, and the stop ran out its cleanup bound (143).
    expect(await exited).toEqual({ code: 137, signal: null });
  }, 90_000);
});

/**
 * The warm-up CLI resuming a fill whose journal does not answer (the fill stops at reading it), given SHUTDOWN_GRACE_S
 * `graceS`: the entry's key, a way to signal it, and its end (SIGKILLed once `signals` has run and `killAfterMs` more
 * have passed, as the kubelet's at the end of the grace period).
 */
async function stuckWarmup(t: Finished, name: string, graceS: number, signals: (kill: (s: NodeJS.Signals) => void) => Promise<void>, killAfterMs: number) {
  const cache = path.join(tmp.dir, name);
  const uri = `s3://models/${PREFIX}`;
  const key = cacheKey(parseStorageUri(uri) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, slow.endpoint);
  mkdirSync(path.join(cache, key), { recursive: true });
  stick(t, path.join(cache, key, JOURNAL));
  let kill!: (s: NodeJS.Signals) => void;
  let pid!: number;
  const job = runWarmupCli([], { ...CREDS, AWS_ENDPOINT_URL: slow.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: uri, MODEL_CACHE_DIR: cache, SHUTDOWN_GRACE_S: String(graceS) }, (k, p) => {
    kill = k;
    pid = p;
  });
  // Signalled once the fill waits on the journal: a signal before it (a loaded machine's slow start) ends a fill that
  // waits on nothing, a clean exit 143.
  await until(() => opensFifo(pid), 45_000, 100);
  await signals(kill);
  const timer = setTimeout(() => kill('SIGKILL'), killAfterMs);
  const r = await job;
  clearTimeout(timer);
  return { cache, key, r };
}

describe.concurrent('the warm-up CLI, SIGTERM with the cache volume stuck', () => {
  it('while the fill reads the entry\'s journal: exits within SHUTDOWN_GRACE_S with a line naming what did not finish', async (t) => {
    // Before, the stop waited for the fill, and the fill for the journal: only SIGKILL ended it (a second signal too
    // waited, in process.exit()).
    const { cache, key, r } = await stuckWarmup(t, 'cache-c', 2, async (kill) => kill('SIGTERM'), 30_000);
    expect({ code: r.code, signal: r.signal }).toEqual({ code: null, signal: 'SIGTERM' });
    expect(r.stderr).toMatch(/warmup: SIGTERM received; stopping/);
    // The journal's read first (oldest); the fill's lock heartbeat (a read, then a utimes, every 2 s) may be in flight
    // at that instant on a loaded machine, and is named after it: it is pending too.
    const heartbeat = `(?:; (?:read|utimes) ${key}\\.lock still pending after \\d+ s)?`;
    expect(r.stderr).toMatch(new RegExp(`^warmup: the stop did not finish within SHUTDOWN_GRACE_S \\(2 s\\): the cache volume did not answer: readFile ${key}/\\.progress\\.jsonl still pending after \\d+ s${heartbeat}; exiting without waiting for them \\(exit 143\\)$`, 'm'));
    expect(r.stderr).not.toContain(cache);
  }, 90_000);

  it('a second signal while the stop is held ends it at once, as its signal does (process.exit() would wait for the stuck call)', async (t) => {
    // A grace longer than the test waits: only the second signal can end it in time.
    const { r } = await stuckWarmup(t, 'cache-c2', 120, async (kill) => {
      kill('SIGTERM');
      await new Promise((res) => setTimeout(res, 1_000));
      kill('SIGINT');
    }, 20_000);
    expect({ code: r.code, signal: r.signal }).toEqual({ code: null, signal: 'SIGINT' });
  }, 90_000);
});

const noFuse = stuckFsUnavailable();

/**
 * A stuck-fs mount, released at the test's end after the servers started on it (a stuck call lets its process die but
 * not the mount be released under it).
 */
async function mountFor(t: Finished, ...args: Parameters<typeof mountStuckFs>): Promise<StuckFs> {
  const fs = await mountStuckFs(...args);
  t.onTestFinished(() => fs.release());
  return fs;
}
/**
 * Once `fs` has hung (and 2 s on): liveness, readiness (not ready) and the model's state (`state`) still answer, and
 * SIGTERM ends `srv` by the signal. Its stop line.
 */
async function liveThenTerminated(srv: ServerHandle, fs: StuckFs, state: string): Promise<string | undefined> {
  await fs.hung;
  await new Promise((r) => setTimeout(r, 2_000));
  const answer = (route: string) => fetch(`${srv.url}${route}`, { signal: AbortSignal.timeout(10_000) });
  expect((await answer('/v2/health/live')).status).toBe(200);
  expect((await answer('/v2/health/ready')).status).toBe(503);
  const model = await answer('/v1/models/model');
  expect([model.status, ((await model.json()) as { state?: string }).state]).toEqual([503, state]);
  expect(await terminate(srv, 40_000)).toMatchObject({ code: null, signal: 'SIGTERM' });
  return stopLine(srv.logs)?.msg;
}

/** A copy of the demo model's cache on a stuck-fs mount (`hangAfter`: see StuckFsOptions); the entry's folder name. */
async function demoOnMount(t: Finished, name: string, hangAfter?: (entry: string) => string): Promise<{ fs: StuckFs; entry: string }> {
  const model = await ensureDemoModel(sharedCacheDir());
  const entry = path.basename(model);
  const backing = path.join(tmp.dir, `${name}-backing`);
  cpSync(model, path.join(backing, entry), { recursive: true });
  return { fs: await mountFor(t, backing, path.join(tmp.dir, name), { hangAfter: hangAfter?.(entry) }), entry };
}

/**
 * The server with no MODEL_CACHE_DIR, whose default (/mnt/cache when writable, else a folder of the temp dir) lies on
 * `fs`, hung: TMPDIR is its mount, and there is no /mnt/cache here. SIGTERMed (at its node process: under unshare, the
 * child) once a call of it waits on the mount; SIGKILLed at 30 s.
 */
async function defaultCacheHung(t: Finished, name: string, prefix: readonly string[] = []) {
  const backing = path.join(tmp.dir, `${name}-backing`);
  mkdirSync(backing);
  const fs = await mountFor(t, backing, path.join(tmp.dir, name));
  await fs.hang();
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, HOST: '127.0.0.1', PORT: '0', LOG_LEVEL: 'info', TMPDIR: fs.dir, MODEL_CACHE_DIR: undefined, STORAGE_URI: undefined })) {
    if (v !== undefined) env[k] = v;
  }
  const [file, ...args] = [...prefix, process.execPath, ENTRY];
  const proc = spawn(file!, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  t.onTestFinished(() => void proc.kill('SIGKILL'));
  let stderr = '';
  proc.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
  proc.stdout!.resume();
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  let node = proc.pid!;
  if (prefix.length > 0) {
    await until(() => readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, 'utf8').trim() !== '', 10_000, 20);
    node = Number(readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, 'utf8').trim().split(/\s+/)[0]);
  }
  await until(() => waitsIn(node, 'request_wait_answer'), 20_000, 20);
  process.kill(node, 'SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
  const r = await exited;
  clearTimeout(timer);
  return { ...r, stderr };
}

describe.skipIf(noFuse).concurrent('the server on a cache volume that stops answering for real (stuck-fs: a stat waits too)', () => {
  // Each point is the last request answered; the next call on the volume, whatever it is, waits for good. Before, the
  // boot made these next calls synchronously on the event loop (the demo model's check, the listing of its folders,
  // whether a folder holds a graph or a tokenizer): the loop stopped there, no signal was handled, and only the
  // kubelet's SIGKILL (here after 40 s) ended the server.
  it.for<[string, string, (entry: string) => string]>([
    ['the demo model\'s check', 'model', (entry: string) => `lookup:${entry}`],
    ['the listing of the model\'s folders', 'listing', () => 'access:model_index.json'],
    ['a look at a tokenizer\'s files', 'tokenizer', () => 'access:vocab.json'],
  ])('hanging at %s: the probes answer, and SIGTERM ends it by the signal within the cleanup bound, naming what did not finish', { timeout: 90_000 }, async ([, name, at], t) => {
    const { fs } = await demoOnMount(t, `cache-fuse-boot-${name}`, at);
    const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: fs.dir, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1' });
    await fs.hung;
    // The event loop turns: liveness answers (and readiness says not ready) while the boot waits on the volume.
    expect((await fetch(`${srv.url}/v2/health/live`, { signal: AbortSignal.timeout(10_000) })).status).toBe(200);
    expect((await fetch(`${srv.url}/v2/health/ready`, { signal: AbortSignal.timeout(10_000) })).status).toBe(503);
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    expect(stopLine(srv.logs)?.msg).toMatch(/^shutdown did not finish: .*\(exit 143\)$/);
    expect(stopLine(srv.logs)?.msg).not.toContain(fs.dir);
  });

  it('a request naming a LoRA adapter once the volume stops answering: the probes answer, and SIGTERM exits 143 naming the adapter\'s stat', async (t) => {
    const { fs, entry } = await demoOnMount(t, 'cache-fuse-lora');
    const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: fs.dir, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1' }, { ready: true });
    const body = { instances: [{ prompt: 'a cat', num_inference_steps: 1, width: 64, height: 64, loras: ['demo-style'] }] };
    expect((await postJson(`${srv.url}/v1/models/model:predict`, body)).status).toBe(200);
    await fs.hang();
    // Each request looks again whether the adapter's file is still there (an eviction may have taken it). Before, that
    // look was a synchronous stat: the event loop stopped at it, and the server with it, signals included.
    void postJson(`${srv.url}/v1/models/model:predict`, body).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 1_000));
    expect((await fetch(`${srv.url}/v2/health/live`, { signal: AbortSignal.timeout(10_000) })).status).toBe(200);
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    // The adapter's stat is named; only the adapter sets' folder's lease heartbeat (every 30 s), stuck too, may come
    // before it (oldest first: a beat that began between the volume's hang and the request's stat).
    expect(stopLine(srv.logs)?.msg).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: (?:${leaseBeat()}; )*stat ${entry}/loras/demo-style\\.safetensors still pending after \\d+ s; .*\\(exit 143\\)$`));
  }, 120_000);

  it('requests naming a LoRA adapter once the volume stops answering: answered 503 CACHE_STUCK naming the stat, while a plain request is served', async (t) => {
    const { fs, entry } = await demoOnMount(t, 'cache-fuse-pool');
    // libuv's default pool (4 threads), as the test's own servers have; the image has 16.
    const srv = await serverFor(t, { STORAGE_URI: undefined, MODEL_CACHE_DIR: fs.dir, SHUTDOWN_GRACE_S: '1', WARMUP_STEPS: '1', UV_THREADPOOL_SIZE: '4' }, { ready: true });
    const plain = { instances: [{ prompt: 'a cat', num_inference_steps: 1, width: 64, height: 64 }] };
    const lora = { instances: [{ ...plain.instances[0], loras: ['demo-style'] }] };
    const url = `${srv.url}/v1/models/model:predict`;
    expect((await postJson(url, lora)).status).toBe(200);
    await fs.hang();
    // Six, more than the pool has threads. Before, each request's stat of the adapter's file held a pool thread for
    // good, and once four did, sharp's encoder (whose work runs in the pool) waited behind them: the plain request below
    // never got its image (its client gave up at 20 s), nor did these.
    const loras = Array.from({ length: 6 }, () => postJson(url, lora, { signal: AbortSignal.timeout(30_000) }).catch((e: Error) => ({ status: 0, json: { error: e.message } as Record<string, unknown>, headers: new Headers() })));
    await new Promise((r) => setTimeout(r, 1_000));
    const served = await postJson(url, plain, { signal: AbortSignal.timeout(20_000) });
    expect(served.status).toBe(200);
    const stat = new RegExp(`^adapter "demo-style": the cache volume \\(MODEL_CACHE_DIR\\) is not answering: stat ${entry}/loras/demo-style\\.safetensors still pending after \\d+ s; `);
    for (const r of await Promise.all(loras)) {
      expect([r.status, r.json.code, r.headers.get('retry-after')]).toEqual([503, 'CACHE_STUCK', expect.stringMatching(/^\d+$/)]);
      expect(r.json.error).toMatch(stat);
      expect(r.json.error).not.toContain(fs.dir);
    }
    // One call of the server waits on the mount (a lease's heartbeat, every 30 s, may add one): fewer than the pool's 4.
    expect(waitingThreads(srv.proc.pid!, 'request_wait_answer')).toBeLessThan(4);
    // Readiness stays: the server serves what does not need the volume (docs/FAULTS.md says why).
    expect((await fetch(`${srv.url}/v2/health/live`, { signal: AbortSignal.timeout(10_000) })).status).toBe(200);
    expect((await fetch(`${srv.url}/v2/health/ready`, { signal: AbortSignal.timeout(10_000) })).status).toBe(200);
    expect(srv.logs.filter((l) => l.level === 'warn' && String(l.msg).startsWith('the cache volume is not answering'))).toHaveLength(1);
    // The one call left in the pool is named by the stop; a lease heartbeat stuck before it, older, comes first.
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    expect(stopLine(srv.logs)?.msg).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: (?:${leaseBeat()}; )*stat ${entry}/loras/demo-style\\.safetensors still pending after \\d+ s; .*\\(exit 143\\)$`));
  }, 120_000);

  it('the boot\'s fill from S3 when the volume stops answering mid-download: the probes answer, and SIGTERM exits 143', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-fill-backing');
    mkdirSync(backing);
    // The first data write answered, then nothing: the next (and the journal line that records a write) waits. Before,
    // that line was written synchronously: the event loop stopped at it (the liveness call below timed out).
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-fill'), { hangAfter: 'write:model.onnx.partial' });
    const srv = await serverFor(t, {
      ...CREDS, AWS_ENDPOINT_URL: slow.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://models/${PREFIX}`, MODEL_CACHE_DIR: fs.dir,
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    });
    // The stuck writes (one per range in flight), the journal's line and the lock's heartbeat hold all of libuv's pool:
    // the routes answer, their code loaded before the fetch began (before, it loaded once S3 first answered, and its
    // files, read in the pool, could wait behind the stuck writes: no 'listening' line, only liveness answered).
    const line = await liveThenTerminated(srv, fs, 'fetching');
    // The journal line that records the answered write is named; only the lock's or a lease's heartbeat, stuck too, may
    // come before it (oldest first: a beat that began between the volume's hang and that write, on a loaded machine).
    // A lease beats by a read and a utimes of its file; its last-used is written only by its release, at the stop.
    const key = cacheKey(parseStorageUri(`s3://models/${PREFIX}`) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, slow.endpoint);
    const beats = `(?:(?:read|utimes) ${key}\\.lock still pending after \\d+ s; |${leaseBeat(key)}; |${leaseBeat()}; )*`;
    expect(line).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: ${beats}write ${key}/\\.progress\\.jsonl still pending after \\d+ s; .*\\(exit 143\\)$`));
    expect(JSON.stringify(srv.logs)).not.toContain(CREDS.AWS_SECRET_ACCESS_KEY);
  }, 120_000);

  // MODEL_CACHE_DIR a folder of the volume (mounted above it): a look at it goes to the server, as one at a mount's root
  // does not. The entry's lock is another node's, with a fresh heartbeat: the fill waits for it. The lock is looked at
  // twice (read, whose fstat is a getattr, then stat): after the fourth getattr the waiter watches the lock's folder for
  // a release. fs.watch is set synchronously and looks its path up: a lookup the volume held kept the event loop for
  // good, and the liveness call below timed out. That was the next call at first; then the watch came once a stat of
  // the lock (the fifth getattr) had answered, and a volume stopping right after that answer still held the loop. Now
  // the folder is opened in the pool and watched through its descriptor, which needs no lookup.
  // The open is named; only a lease's heartbeat (the entry's, the adapter sets' folder's: every 30 s), stuck too, may
  // come before it (oldest first: a beat that began between the volume's hang and the open).
  it.for<[string, number, (key: string) => RegExp]>([
    ['as the waiter is about to watch the lock\'s folder', 4, (key) => new RegExp(`^shutdown did not finish: the cache volume did not answer: (?:${leaseBeat(key)}; |${leaseBeat()}; )*open \\. still pending after \\d+ s; .*\\(exit 143\\)$`)],
    ['right after a look at the lock', 5, () => /^shutdown did not finish: .*\(exit 143\)$/],
  ])('a fill waiting for another node\'s lock, the volume stopping %s: the probes answer, and SIGTERM exits 143', { timeout: 120_000 }, async ([, times, stop], t) => {
    const uri = `s3://models/${PREFIX}`;
    const key = cacheKey(parseStorageUri(uri) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, proxy.endpoint);
    const backing = path.join(tmp.dir, `cache-fuse-wait-${times}-backing`);
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    writeFileSync(path.join(backing, 'cache', `${key}.lock`), JSON.stringify({ pid: 1, host: 'another-node', token: 'feedfacefeedface', since: new Date().toISOString() }));
    const fs = await mountFor(t, backing, path.join(tmp.dir, `cache-fuse-wait-${times}`), { hangAfter: `getattr:${key}.lock`, hangAfterTimes: times });
    const srv = await serverFor(t, {
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: uri, MODEL_CACHE_DIR: path.join(fs.dir, 'cache'),
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    });
    const line = await liveThenTerminated(srv, fs, 'fetching');
    expect(line).toMatch(stop(key));
    expect(line).not.toContain(fs.dir);
  });

  it('the volume stopped answering before the server started (S3): the routes come, and SIGTERM exits 143 naming the boot\'s first look at the cache', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-dead-backing');
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-dead'));
    await fs.hang();
    const cache = path.join(fs.dir, 'cache');
    // Before, the boot's plan (its lease, a look for a committed entry) was made before the logger and the runtime
    // loaded: held by the volume, no 'listening' line came, no route but liveness, and a SIGTERM's exit waited for the
    // call for good (the SIGKILL at 40 s ended it).
    const srv = await serverFor(t, {
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://models/${PREFIX}`, MODEL_CACHE_DIR: cache,
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    }, { timeoutMs: 30_000 });
    const line = await liveThenTerminated(srv, fs, 'resolving');
    expect(line).toMatch(/^shutdown did not finish: the cache volume did not answer: readdir \. still pending after \d+ s; exiting without waiting for it \(exit 143\)$/);
    expect(srv.events('shut-down')).toMatchObject([{ unfinished: ['the model fetch and the cache entry lease'] }]);
  }, 120_000);

  it('serving from S3, then the volume stops answering: the lease release is named, the exit is 143, the next start serves', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-s3-backing');
    mkdirSync(backing);
    const env = {
      ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://models/${PREFIX}`,
      EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1',
    };
    const key = cacheKey(parseStorageUri(env.STORAGE_URI) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, proxy.endpoint);
    // The fill through the mount, then a stop while it answers: exit 0.
    let fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-s3'));
    const first = await serverFor(t, { ...env, MODEL_CACHE_DIR: fs.dir }, { ready: true });
    expect(await terminate(first, 40_000)).toMatchObject({ code: 0, signal: null });
    const srv = await serverFor(t, { ...env, MODEL_CACHE_DIR: fs.dir }, { ready: true });
    expect(srv.events('files-ready')).toMatchObject([{ fromCache: true }]);
    await fs.hang();
    // Serving goes on: nothing of a generation touches the volume.
    expect((await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a cat', num_inference_steps: 1, width: 64, height: 64 }] })).status).toBe(200);
    const r = await terminate(srv, 40_000);
    expect(r).toMatchObject({ code: null, signal: 'SIGTERM' });
    // The release's write is named; only a lease's heartbeat (the entry's, the adapter sets' folder's: every 30 s), stuck
    // too, may come before it (oldest first: a beat that began between the volume's hang and the stop).
    expect(stopLine(srv.logs)?.msg).toMatch(new RegExp(`^shutdown did not finish: the cache volume did not answer: (?:${leaseBeat(key)}; |${leaseBeat()}; )*writeFile \\.leases/${key}/last-used still pending after \\d+ s; .*\\(exit 143\\)$`));
    // The server answering again on the same folder serves the entry as committed.
    await fs.release();
    fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-s3'));
    const next = await serverFor(t, { ...env, MODEL_CACHE_DIR: fs.dir }, { ready: true });
    expect(next.events('files-ready')).toMatchObject([{ fromCache: true }]);
  }, 240_000);

  // Before, the look was synchronous, on the main thread, before the server's signal handlers: SIGTERM did not end the
  // process, not by its default action either (Node installs a handler of its own for it, which cannot run while the
  // thread waits in the system call, and the kernel ends such a wait only for a fatal signal), as PID 1 or not: only
  // the SIGKILL at 30 s did, with no line saying why.
  const defaultLookLine = /^diffusers-runtime: shutdown did not finish: the cache volume did not answer: mkdir \/\S+\/diffusers-runtime-cache still pending after \d+ s; exiting without waiting for it \(exit 143\)$/m;

  it('with no MODEL_CACHE_DIR, its default on the volume (looked for before the config): SIGTERM ends it by the signal, naming the look', async (t) => {
    const r = await defaultCacheHung(t, 'cache-fuse-default');
    expect({ code: r.code, signal: r.signal }).toEqual({ code: null, signal: 'SIGTERM' });
    expect(r.stderr).toMatch(defaultLookLine);
  }, 60_000);

  it.skipIf(!canUnshare)('the same as PID 1 of its pid namespace: SIGTERM ends it, exit 143, naming the look', async (t) => {
    const r = await defaultCacheHung(t, 'cache-fuse-default-pid1', ['unshare', '-r', '--pid', '--fork', '--kill-child', '--mount-proc']);
    expect({ code: r.code, signal: r.signal }).toEqual({ code: 143, signal: null });
    expect(r.stderr).toMatch(defaultLookLine);
  }, 60_000);
});

describe.skipIf(noFuse).concurrent('the warm-up CLI on a cache volume that stops answering for real', () => {
  /** The warm-up CLI filling `uri` onto `fs`, SIGTERMed 1 s after it hung: ended by the signal, before a SIGKILL at 30 s. */
  async function warmupTerminated(uri: string, fs: StuckFs) {
    let kill!: (s: NodeJS.Signals) => void;
    const job = runWarmupCli([], { ...CREDS, AWS_ENDPOINT_URL: slow.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: uri, MODEL_CACHE_DIR: fs.dir, SHUTDOWN_GRACE_S: '2' }, (k) => (kill = k));
    await fs.hung;
    await new Promise((r) => setTimeout(r, 1_000));
    kill('SIGTERM');
    const timer = setTimeout(() => kill('SIGKILL'), 30_000);
    const r = await job;
    clearTimeout(timer);
    expect({ code: r.code, signal: r.signal }).toEqual({ code: null, signal: 'SIGTERM' });
    return r;
  }

  it('hanging as the fill reads the entry\'s journal: SIGTERM ends it within SHUTDOWN_GRACE_S, naming the read', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-warmup-backing');
    const uri = `s3://models/${PREFIX}`;
    const key = cacheKey(parseStorageUri(uri) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, slow.endpoint);
    mkdirSync(path.join(backing, key), { recursive: true });
    writeFileSync(path.join(backing, key, JOURNAL), '');
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-warmup'), { hangAfter: `lookup:${JOURNAL}` });
    const r = await warmupTerminated(uri, fs);
    expect(r.stderr).toMatch(/^warmup: the stop did not finish within SHUTDOWN_GRACE_S \(2 s\): .*\(exit 143\)$/m);
  }, 60_000);

  it('with no MODEL_CACHE_DIR, its default on the volume: SIGTERM ends it within SHUTDOWN_GRACE_S, naming the look', async (t) => {
    // TMPDIR on the hung mount, and no /mnt/cache here: the default is the temp dir's folder, made when looked for.
    const backing = path.join(tmp.dir, 'cache-fuse-warmup-default-backing');
    mkdirSync(backing);
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-warmup-default'));
    await fs.hang();
    let kill!: (s: NodeJS.Signals) => void;
    let pid!: number;
    const job = runWarmupCli([], { ...CREDS, AWS_ENDPOINT_URL: slow.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: `s3://models/${PREFIX}`, TMPDIR: fs.dir, SHUTDOWN_GRACE_S: '2' }, (k, p) => ((kill = k), (pid = p)));
    await until(() => waitsIn(pid, 'request_wait_answer'), 20_000, 20);
    kill('SIGTERM');
    const timer = setTimeout(() => kill('SIGKILL'), 30_000);
    const r = await job;
    clearTimeout(timer);
    // Before, the look was synchronous (loadConfig's): the signal was never handled, and the test's SIGKILL ended it.
    expect({ code: r.code, signal: r.signal }).toEqual({ code: null, signal: 'SIGTERM' });
    expect(r.stderr).toMatch(/^warmup: the stop did not finish within SHUTDOWN_GRACE_S \(2 s\): the cache volume did not answer: mkdir \/\S+\/diffusers-runtime-cache still pending after \d+ s; exiting without waiting for them \(exit 143\)$/m);
  }, 60_000);

  it('hanging mid-download: SIGTERM ends it within SHUTDOWN_GRACE_S, naming the journal line not written', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-warmup-fill-backing');
    mkdirSync(backing);
    const uri = `s3://models/${PREFIX}`;
    const key = cacheKey(parseStorageUri(uri) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, slow.endpoint);
    // Before, the journal's line for the answered write was written synchronously: the event loop stopped at it, the
    // signal was never handled, and the test's SIGKILL ended the fill.
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-warmup-fill'), { hangAfter: 'write:model.onnx.partial' });
    const r = await warmupTerminated(uri, fs);
    // The journal line that records the answered write is named; only the fill's lock heartbeat (a read, then a utimes,
    // every 2 s), stuck too, may come before it (oldest first: a beat that began between the volume's hang and that write).
    const beats = `(?:(?:read|utimes) ${key}\\.lock still pending after \\d+ s; )*`;
    expect(r.stderr).toMatch(new RegExp(`^warmup: the stop did not finish within SHUTDOWN_GRACE_S \\(2 s\\): the cache volume did not answer: ${beats}write ${key}/\\.progress\\.jsonl still pending after \\d+ s; .*\\(exit 143\\)$`, 'm'));
    expect(r.stderr).not.toContain(fs.dir);
  }, 60_000);
});

describe.skipIf(noFuse)('a lease held on a cache volume that stops answering for real (stuck-fs, in this process)', () => {
  // A server's lease beats every 30 s (LEASE_HEARTBEAT_MS), longer than a test waits for the stop of a server; its
  // beats are the lock's (lock.ts hold), here every 50 ms. Only calls in libuv's pool touch the hung mount from this
  // process, and its release fails them (ENOTCONN): the thread they held is free again.
  it('one heartbeat waits and the later ones are skipped: one call pending, not one a period', async (t) => {
    const backing = path.join(tmp.dir, 'cache-fuse-lease-backing');
    mkdirSync(backing);
    const fs = await mountFor(t, backing, path.join(tmp.dir, 'cache-fuse-lease'));
    const lease = await leaseEntry(path.join(fs.dir, 'entry'), { heartbeatMs: 50 });
    await fs.hang();
    // A beat has reached the hung mount (a loaded machine may start it late), then twenty periods more pass.
    await until(() => pendingIo().some((p) => p.file === lease.path), 10_000);
    await new Promise((r) => setTimeout(r, 1_000));
    // Before the beats went one at a time, each period started one more, each holding a pool thread for good.
    expect(pendingIo().filter((p) => p.file === lease.path).map((p) => p.op)).toEqual(['read']);
    // The release waits for the mount's (its calls then fail): not left to onTestFinished, which ends the mount last.
    await fs.release();
    await lease.release();
    // A beat begun just before the release may still be settling.
    await until(() => pendingIo().length === 0, 5_000);
  }, 30_000);
});
