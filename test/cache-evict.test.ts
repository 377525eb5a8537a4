// The cache's entries, leases and eviction: real files in a temp dir, a real S3 (s3rver), real child processes for
// leases held by another process. A "full disk" is the fetch's own free-space seam (io.freeBytes) and write seam
// (io.write) measuring what the cache folder really occupies against a capacity.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { silentLogger } from '../src/log.js';
import { resolveBoot } from '../src/runtime/boot-sequence.js';
import { MANIFEST } from '../src/storage/cache.js';
import { emptyOrphanLeases, listEntries, makeRoom, removeEntry } from '../src/storage/entries.js';
import { committedEntry, resolveModel, type ResolveOptions } from '../src/storage/fetch.js';
import { LAST_USED, leaseEntry, leasesDir, sweepUnleased } from '../src/storage/lease.js';
import { acquireLock, pidAlive as alive } from '../src/storage/lock.js';
import { cacheKey, parseStorageUri } from '../src/storage/uri.js';
import { cleanUpS3, CREDS, detBytes, rejection, type S3Server, startS3, testConfig } from './helpers/s3.js';
import { pidBehindLast } from './helpers/pidns.js';
import { until } from './helpers/server.js';
import { buildIfStale, evictInChild, LEASE_JS, leaseInChild, skewedHolder } from './helpers/lease-child.js';

let s3: S3Server;
let tmp: string;
const log = silentLogger();
const MB = 1_000_000;

beforeAll(async () => {
  // The child processes run the built lease module: build it when it is missing or older than its sources.
  buildIfStale();
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'cache-evict-'));
  s3 = await startS3();
  for (const v of [1, 2, 3, 4]) {
    await s3.put('models', `sd/v${v}/model_index.json`, '{}');
    await s3.put('models', `sd/v${v}/unet/model.onnx`, detBytes(MB, v));
  }
  await s3.put('models', 'sd/v5/model_index.json', '{}');
  await s3.put('models', 'sd/v5/unet/model.onnx', detBytes(2.5 * MB, 5));
});

cleanUpS3(() => ({ s3, tmp }));

/** What the folder occupies on disk (allocated blocks, as the eviction counts them; a file linked under several names once). */
async function used(dir: string): Promise<number> {
  const seen = new Set<number>();
  let n = 0;
  for (const rel of await fsp.readdir(dir, { recursive: true }).catch(() => [] as string[])) {
    const st = await fsp.lstat(path.join(dir, String(rel))).catch(() => undefined);
    if (st?.isFile() && !seen.has(st.ino)) n += st.blocks * 512;
    if (st) seen.add(st.ino);
  }
  return n;
}

/** A volume of `capacity` bytes holding the cache folder: statfs's answer is what the folder leaves free. */
const disk = (cache: string, capacity: number): NonNullable<ResolveOptions['io']> => ({ freeBytes: async () => Math.max(0, capacity - (await used(cache))) });

const keyOf = (v: number) => cacheKey(parseStorageUri(`s3://models/sd/v${v}`) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, s3.endpoint);
const cfgFor = (cache: string, extra: Record<string, string> = {}) => testConfig(s3.endpoint, cache, { S3_PART_SIZE: '262144', S3_MAX_CONCURRENCY: '4', ...extra });

async function fill(cache: string, v: number, o: Partial<ResolveOptions> & { env?: Record<string, string> } = {}) {
  return resolveModel(`s3://models/sd/v${v}`, { cfg: cfgFor(cache, o.env), log, ...o });
}

/** Sets when an entry was last used, as an entry made before leases existed records it: its manifest's mtime. */
async function usedAt(cache: string, v: number, minutesAgo: number): Promise<void> {
  const t = new Date(Date.now() - minutesAgo * 60_000);
  await fsp.utimes(path.join(cache, keyOf(v), MANIFEST), t, t);
}

/** A cache with v1..vn committed, v1 the least recently used. */
async function cacheWith(n: number): Promise<string> {
  const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
  for (let v = 1; v <= n; v++) {
    await fill(cache, v);
    await usedAt(cache, v, 60 - v);
  }
  return cache;
}

/** Whether this machine lets an unprivileged user namespace own a new pid namespace (it may not, in a container). */
function canUnshare(): boolean {
  return process.platform === 'linux' && spawnSync('unshare', ['-r', '--pid', '--fork', '--mount-proc', 'sh', '-c', 'echo 99 > /proc/sys/kernel/ns_last_pid'], { stdio: 'ignore', timeout: 5_000 }).status === 0;
}

/**
 * What a server killed on another node (the OOM killer, a lost node) leaves on an entry: its lease, never released,
 * its last heartbeat `minutesAgo` old; its pid says nothing on this host.
 */
async function killedPodLease(cache: string, v: number, minutesAgo: number): Promise<string> {
  const dir = leasesDir(path.join(cache, keyOf(v)));
  await fsp.mkdir(dir, { recursive: true });
  const token = `dead${v}`.padEnd(16, '0');
  const file = path.join(dir, `pod-gone-${v}-7-${token}.lease`);
  await fsp.writeFile(file, JSON.stringify({ pid: 7, host: `pod-gone-${v}`, token, since: '' }));
  const then = new Date(Date.now() - minutesAgo * 60_000);
  await fsp.utimes(file, then, then);
  return file;
}

const exited = (c: ChildProcess) => new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r(undefined) : c.once('exit', r)));

function capture() {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({ write(c, _e, cb) { for (const l of String(c).split('\n').filter(Boolean)) lines.push(JSON.parse(l)); cb(); } });
  return { log: pino({ level: 'info' }, sink), lines };
}

/** Nothing half: every folder under the cache is a whole committed entry or the leases' folder; no trash is left. */
async function expectNoHalfEntry(cache: string): Promise<void> {
  for (const n of readdirSync(cache)) {
    expect(n.startsWith('.evicting-'), n).toBe(false);
    if (n === '.leases' || n.endsWith('.lock')) continue;
    const c = await committedEntry(`s3://models/sd/v${/-sd-v(\d)-/.exec(n)![1]}`, cfgFor(cache));
    expect(c, `${n} is committed with every file`).toBeDefined();
  }
}

/** `n` files `name(i)` holding `content` in `dir`, written 256 at a time (one by one they took seconds). */
async function writeMany(dir: string, n: number, name: (i: number) => string, content: string): Promise<void> {
  for (let k = 0; k < n; k += 256) await Promise.all(Array.from({ length: Math.min(256, n - k) }, (_, j) => fsp.writeFile(path.join(dir, name(k + j)), content)));
}

/**
 * Stops `child` (an evictor on a clock 5 min behind) 20 ms after its lock on `dir` appears, stamps that lock as its
 * heartbeat would have, leases `dir` (taking the lock over once it stood still), then lets `child` go on.
 */
async function leaseWhileStopped(child: ChildProcess, dir: string): Promise<Awaited<ReturnType<typeof leaseEntry>>> {
  // A bound on waiting only: the sweep's child reads its 10,000 leases once before it locks (21-23 s under load 15).
  await until(() => existsSync(`${dir}.lock`), 120_000, 1);
  await new Promise((r) => setTimeout(r, 20));
  child.kill('SIGSTOP');
  // What its heartbeat, had it run, stamps with its clock (it ran its lock's first 2 s here with this one).
  const behind = new Date(Date.now() - 300_000);
  await fsp.utimes(`${dir}.lock`, behind, behind);
  const lease = await leaseEntry(dir, { pollMs: 10 });
  child.kill('SIGCONT');
  return lease;
}

describe('eviction when a download finds too little space', () => {
  it('removes the least recently used entry, only as many as needed, and logs and reports each', async () => {
    const cache = await cacheWith(3);
    const cap = (await used(cache)) + 0.5 * MB; // room for half a model
    const { log: cap_log, lines } = capture();
    const evicted: string[] = [];
    const r = await fill(cache, 4, { log: cap_log, io: disk(cache, cap), onEvicted: (e) => evicted.push(e.name) });
    expect(r.fromCache).toBe(false);
    expect(evicted).toEqual([keyOf(1)]);
    expect(existsSync(path.join(cache, keyOf(1)))).toBe(false);
    expect((await listEntries(cache)).map((e) => e.name).sort()).toEqual([keyOf(2), keyOf(3), keyOf(4)].sort());
    const line = lines.find((l) => l.msg === 'cache entry evicted')!;
    expect(line).toMatchObject({ entry: keyOf(1), lastUsed: expect.stringMatching(/^\d{4}-/), for: keyOf(4) });
    expect(line.bytes as number).toBeGreaterThanOrEqual(MB);
    expect(JSON.stringify(lines)).not.toContain(tmp);
    await expectNoHalfEntry(cache);
  });

  it('LRU order follows leases: an entry a server used recently outlives one committed later but never used', async () => {
    const cache = await cacheWith(2);
    // v1 is older by its manifest, but a server held it until a moment ago.
    const lease = await leaseEntry(path.join(cache, keyOf(1)));
    await lease.release();
    expect(existsSync(path.join(leasesDir(path.join(cache, keyOf(1))), LAST_USED))).toBe(true);
    const order = (await listEntries(cache)).map((e) => e.name);
    expect(order).toEqual([keyOf(2), keyOf(1)]);
    expect((await makeRoom(cache, 1, { exclude: keyOf(3) })).evicted.map((e) => e.name)).toEqual([keyOf(2)]);
    // The entry a download is for is never a candidate, even unlocked and least recently used.
    await fill(cache, 2);
    await usedAt(cache, 2, 300);
    expect((await makeRoom(cache, 1, { exclude: keyOf(2) })).evicted.map((e) => e.name)).toEqual([keyOf(1)]);
  });

  it('never removes an entry a live process leases, nor one a live filler locks; a dead or silent holder does not count', async () => {
    const cache = await cacheWith(3);
    const child = await leaseInChild(path.join(cache, keyOf(1)));
    const filler = await acquireLock(path.join(cache, `${keyOf(2)}.lock`));
    try {
      const cap = (await used(cache)) + 0.5 * MB;
      const evicted: string[] = [];
      await fill(cache, 4, { io: disk(cache, cap), onEvicted: (e) => evicted.push(e.name) });
      expect(evicted).toEqual([keyOf(3)]); // v1 and v2 are older, but in use
      const listed = await listEntries(cache);
      expect(listed.find((e) => e.name === keyOf(1))).toMatchObject({ users: [`${os.hostname()}/${child.pid}`] });
      expect(listed.find((e) => e.name === keyOf(2))!.locked).toBe(`${os.hostname()}/${process.pid}`);
    } finally {
      await filler!.release();
    }
    // Killed without releasing: its lease file stays, but its pid is dead on this host.
    child.kill('SIGKILL');
    await exited(child);
    expect(readdirSync(leasesDir(path.join(cache, keyOf(1)))).filter((n) => n.endsWith('.lease'))).toHaveLength(1);
    expect((await removeEntry(cache, keyOf(1))).removed).toBe(true);
    // A lease from another host whose heartbeat stopped minutes ago does not count either (once watched a third of the
    // lease's staleMs without moving: 3 s here, not 3 minutes, for the test's sake); a fresh one does.
    const dir = leasesDir(path.join(cache, keyOf(2)));
    await fsp.mkdir(dir, { recursive: true });
    const other = path.join(dir, 'pod-b-7-abc.lease');
    await fsp.writeFile(other, JSON.stringify({ pid: 7, host: 'pod-b', token: 'abc', since: '' }));
    expect(await removeEntry(cache, keyOf(2), { leaseStaleMs: 3_000 })).toEqual({ removed: false, why: 'in use' });
    const old = new Date(Date.now() - 10 * 60_000);
    await fsp.utimes(other, old, old);
    expect(await removeEntry(cache, keyOf(2), { leaseStaleMs: 3_000 })).toMatchObject({ removed: true });
    expect(existsSync(dir)).toBe(false);
  });

  // Pods on nodes whose clocks are behind stamp their heartbeats in the evictor's past: a fill's lock 40 s, a server's
  // lease 10 minutes (past the lease's staleMs, 3 s here). Both heartbeats move, so neither entry is taken for unused.
  it('never removes an entry a server or a filler whose clock is behind holds', async () => {
    const cache = await cacheWith(3);
    const staleMs = 3_000;
    const server = await skewedHolder('lease', path.join(cache, keyOf(1)), -600_000, staleMs / 15);
    const filler = await skewedHolder('lock', path.join(cache, `${keyOf(2)}.lock`), -40_000, staleMs / 15);
    try {
      const cap = (await used(cache)) + 0.5 * MB;
      const evicted: string[] = [];
      await fill(cache, 4, { io: disk(cache, cap), onEvicted: (e) => evicted.push(e.name), leaseStaleMs: staleMs, lockStaleMs: staleMs });
      const opts = { leaseStaleMs: staleMs, lockStaleMs: staleMs };
      const removals = [await removeEntry(cache, keyOf(1), opts), await removeEntry(cache, keyOf(2), opts)];
      // v2 is older than v3 (v1's lease heartbeat, on its clock, made it the most recently used), but in use, as v1 is.
      expect({ evicted, removals }).toEqual({ evicted: [keyOf(3)], removals: [{ removed: false, why: 'in use' }, { removed: false, why: 'locked' }] });
      expect((await listEntries(cache, opts)).find((e) => e.name === keyOf(2))!.locked).toBe(`${os.hostname()}/${filler.child.pid}`);
    } finally {
      server.child.kill('SIGKILL');
      filler.child.kill('SIGKILL');
    }
  });

  // Entries whose only leases are servers' killed on other nodes look, on this clock, as those of live servers whose
  // clocks are 10 minutes behind: only watching them tells (a minute at the defaults; 1 s here, leaseStaleMs 3 s).
  // Before, a download watched them one after the other, each under its lock, least recently used first, even where an
  // entry that needed no watching would have made the room.
  it('a download evicts first the entries that need no watching, and watches nothing when they are enough', async () => {
    const cache = await cacheWith(3);
    await usedAt(cache, 3, 5); // v3, leased by nobody, was used more recently than v1 and v2
    const leases = [await killedPodLease(cache, 1, 11), await killedPodLease(cache, 2, 10)];
    const { log: l, lines } = capture();
    const evicted: string[] = [];
    await fill(cache, 4, { log: l, io: disk(cache, (await used(cache)) + 0.5 * MB), onEvicted: (e) => evicted.push(e.name), leaseStaleMs: 3_000 });
    expect(evicted).toEqual([keyOf(3)]);
    expect(lines.filter((x) => x.msg === 'cache eviction watched heartbeats that look old on this clock')).toEqual([]);
    for (const f of leases) expect(existsSync(f)).toBe(true);
    await expectNoHalfEntry(cache);
  });

  it('when they are not enough, it watches the others once, all together, and keeps the entry of a live server whose clock is behind', async () => {
    const cache = await cacheWith(4);
    await usedAt(cache, 4, 5);
    await killedPodLease(cache, 1, 11);
    await killedPodLease(cache, 2, 10);
    const staleMs = 3_000;
    const server = await skewedHolder('lease', path.join(cache, keyOf(3)), -600_000, staleMs / 15);
    try {
      // v5 is 2.5 MB: v4 alone (1 MB) is not enough.
      const { log: l, lines } = capture();
      const evicted: string[] = [];
      await fill(cache, 5, { log: l, io: disk(cache, (await used(cache)) + 0.2 * MB), onEvicted: (e) => evicted.push(e.name), leaseStaleMs: staleMs });
      // The one that needed no watching first, then the others least recently used first.
      expect(evicted).toEqual([keyOf(4), keyOf(1), keyOf(2)]);
      const watches = lines.filter((x) => x.msg === 'cache eviction watched heartbeats that look old on this clock');
      expect(watches).toHaveLength(1);
      expect(watches[0]).toMatchObject({ for: keyOf(5) });
      expect([...watches[0]!.entries as string[]].sort()).toEqual([keyOf(1), keyOf(2), keyOf(3)].sort());
      expect(existsSync(server.file)).toBe(true);
      expect((await listEntries(cache, { leaseStaleMs: staleMs })).map((e) => e.name).sort()).toEqual([keyOf(3), keyOf(5)].sort());
    } finally {
      server.child.kill('SIGKILL');
    }
  });

  // The entries that needed no watching were enough when listed, but one is leased before its turn: what is left to
  // watch goes only if it makes the room. Before, the killed pod's entry was removed though the download failed anyway.
  it('when an entry that needed no watching is leased before its turn, the watched ones go only if they are enough', async () => {
    const cache = await cacheWith(2);
    await fill(cache, 5);
    await usedAt(cache, 5, 10);
    const dead = await killedPodLease(cache, 1, 11);
    const flag = path.join(tmp, `leased-${path.basename(cache)}`);
    // A server starting on v5 as soon as v2 is gone, while the eviction waits in its onEvicted.
    const server = await leaseInChild(path.join(cache, keyOf(5)), { gone: path.join(cache, keyOf(2)), flag });
    try {
      const evicted: string[] = [];
      const sleeper = new Int32Array(new SharedArrayBuffer(4));
      const r = await makeRoom(cache, 3 * MB, {
        exclude: 'none', leaseStaleMs: 3_000,
        onEvicted: (e) => {
          evicted.push(e.name);
          const t0 = Date.now();
          while (e.name === keyOf(2) && !existsSync(flag) && Date.now() - t0 < 20_000) Atomics.wait(sleeper, 0, 0, 5);
        },
      });
      expect(existsSync(flag)).toBe(true);
      // v2 (1 MB) and v5 (2.5 MB) would have made the 3 MB; v2 and the killed pod's v1 (2 MB) cannot.
      expect(evicted).toEqual([keyOf(2)]);
      expect(r.freed).toBeLessThan(3 * MB);
      expect(existsSync(path.join(cache, keyOf(1)))).toBe(true);
      expect(existsSync(dead)).toBe(true);
    } finally {
      server.kill('SIGKILL');
      await exited(server);
    }
  });

  // Two containers on one host see the same hostname (hostNetwork pods share the node's; a pod template's `hostname`
  // names every replica alike) but number their processes each in their own pid namespace: a server's pid there may be
  // dead here. Its lease must count by its heartbeat. A real process in a new pid namespace (unshare, where allowed).
  it.skipIf(!canUnshare())('keeps an entry a server in another pid namespace on this host leases, though its pid is dead here', async () => {
    const cache = await cacheWith(1);
    const script = `const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); await leaseEntry(process.argv[1]);
      process.stdout.write('leased ' + process.pid + '\\n'); setInterval(() => {}, 60_000);`;
    // Its pid in its namespace: one that no process of this namespace has (pidBehindLast). Should one take it meanwhile
    // all the same, another is tried.
    const start = async () => {
      const pid = pidBehindLast();
      const c = spawn('unshare', ['-r', '--pid', '--fork', '--kill-child', '--mount-proc', 'sh', '-c', `echo ${pid} > /proc/sys/kernel/ns_last_pid; "$0" --input-type=module -e "$1" "$2"`,
        process.execPath, script, path.join(cache, keyOf(1))], { stdio: ['ignore', 'pipe', 'inherit'] });
      const inner = await new Promise<number>((resolve, reject) => {
        c.stdout!.on('data', (d) => { const m = /leased (\d+)/.exec(String(d)); if (m) resolve(Number(m[1])); });
        c.on('exit', (code) => reject(new Error(`lease child exited ${code}`)));
      });
      return { child: c, inner };
    };
    let { child, inner } = await start();
    for (let tries = 1; alive(inner) && tries < 5; tries++) {
      child.kill('SIGKILL');
      await exited(child);
      // Its lease goes with it: the entry is to show the next one's alone.
      await fsp.rm(leasesDir(path.join(cache, keyOf(1))), { recursive: true, force: true });
      ({ child, inner } = await start());
    }
    try {
      expect(alive(inner)).toBe(false);
      expect((await listEntries(cache))[0]).toMatchObject({ name: keyOf(1), users: [`${os.hostname()}/${inner}`] });
      expect(await removeEntry(cache, keyOf(1))).toEqual({ removed: false, why: 'in use' });
    } finally {
      child.kill('SIGKILL');
      await exited(child);
    }
  });

  it('never evicts the entry being downloaded, even when its abandoned partial is the oldest', async () => {
    const cache = await cacheWith(2);
    // An earlier fill of v3 killed halfway: a journal and a partial file, older than everything else.
    const dir = path.join(cache, keyOf(3));
    await fsp.mkdir(path.join(dir, 'unet'), { recursive: true });
    await fsp.writeFile(path.join(dir, '.progress.jsonl'), '');
    await fsp.writeFile(path.join(dir, 'unet/model.onnx.partial'), detBytes(300_000, 9));
    const t = new Date(Date.now() - 120 * 60_000);
    await fsp.utimes(path.join(dir, '.progress.jsonl'), t, t);
    expect((await listEntries(cache))[0]).toMatchObject({ name: keyOf(3), state: 'partial' });
    const cap = (await used(cache)) + 0.4 * MB;
    const evicted: string[] = [];
    const r = await fill(cache, 3, { io: disk(cache, cap), onEvicted: (e) => evicted.push(e.name) });
    expect(r.dir).toBe(dir);
    expect(evicted).toEqual([keyOf(1)]);
    expect(await committedEntry('s3://models/sd/v3', cfgFor(cache))).toBeDefined();
  });

  it('a NO_SPACE eviction cannot cure names every entry (size, last use, in use), removes nothing and shows no local path', async () => {
    const cache = await cacheWith(2);
    const child = await leaseInChild(path.join(cache, keyOf(2)));
    try {
      // v5 is 2.5 MB: removing v1 (the only entry not in use, 1 MB) would not make room.
      const cap = (await used(cache)) + 0.2 * MB;
      const { log: l, lines } = capture();
      const err = await rejection(fill(cache, 5, { log: l, io: disk(cache, cap) }));
      expect(err.code).toBe('NO_SPACE');
      expect(err.message).toMatch(new RegExp(`^not enough space in the model cache \\(MODEL_CACHE_DIR\\): need 2\\.5 MB more, 0\\.2 MB free; the cache also holds `
        + `${keyOf(1)} \\(1\\.\\d MB, last used \\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\dZ\\), ${keyOf(2)} \\(1\\.\\d MB, last used [^)]*, in use\\) `
        + `\\(removing every entry not in use would free only 1\\.\\d MB, so none was\\); enlarge the PVC or remove entries not in use \\(warmup cache prune\\)$`));
      expect(err.message).not.toContain(tmp);
      expect(lines.find((x) => x.msg === 'model cache full')).toMatchObject({ entry: keyOf(5), entries: [{ entry: keyOf(1), inUse: false }, { entry: keyOf(2), inUse: true }] });
      expect((await listEntries(cache)).filter((e) => e.state === 'committed').map((e) => e.name)).toEqual([keyOf(1), keyOf(2)]);
      // With CACHE_EVICT=off nothing is evicted even where it would help, and the message says why.
      const off = await rejection(fill(cache, 3, { env: { CACHE_EVICT: 'off' }, io: disk(cache, (await used(cache)) + 0.5 * MB) }));
      expect(off.message).toMatch(/ \(CACHE_EVICT=off\); enlarge the PVC/);
      expect((await listEntries(cache)).filter((e) => e.state === 'committed').map((e) => e.name)).toEqual([keyOf(1), keyOf(2)]);
    } finally {
      child.kill('SIGTERM');
      await exited(child);
    }
    // A clean exit releases the lease.
    expect(readdirSync(leasesDir(path.join(cache, keyOf(2))))).toEqual([LAST_USED]);
  });

  it('a write the volume refuses although statfs said there was room: evicts what is left to fetch and finishes', async () => {
    const cache = await cacheWith(2);
    const cap = (await used(cache)) + 0.5 * MB;
    const evicted: string[] = [];
    const r = await fill(cache, 3, {
      onEvicted: (e) => evicted.push(e.name),
      io: {
        freeBytes: async () => Number.MAX_SAFE_INTEGER,
        write: async (fh, bufs, len, pos) => {
          if ((await used(cache)) + len > cap) throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
          return fh.writev(bufs, pos);
        },
      },
    });
    expect(evicted).toEqual([keyOf(1)]);
    expect(r.fromCache).toBe(false);
    await expectNoHalfEntry(cache);
  });
});

describe('eviction against a start of the same entry at that moment', () => {
  it('a server starting on the entry either keeps it whole or finds it gone, never half', async () => {
    const cache = await cacheWith(1);
    const dir = path.join(cache, keyOf(1));
    const outcomes = { kept: 0, gone: 0 };
    for (let i = 0; i < 25; i++) {
      if (!existsSync(dir)) await fill(cache, 1);
      // The server's order (boot-sequence planBoot): lease first, then look at the entry.
      const server = (async () => {
        await new Promise((r) => setTimeout(r, i % 5));
        const lease = await leaseEntry(dir, { pollMs: 5 });
        return { lease, entry: await committedEntry('s3://models/sd/v1', cfgFor(cache)) };
      })();
      const [{ lease, entry }, evicted] = await Promise.all([server, removeEntry(cache, keyOf(1))]);
      if (entry) {
        // What the server found stays there, every file of it, while it holds its lease.
        expect(evicted.removed, `round ${i}`).toBe(false);
        for (const f of entry.manifest.files) expect(existsSync(path.join(dir, f.path))).toBe(true);
        expect((await removeEntry(cache, keyOf(1))).removed).toBe(false);
        outcomes.kept++;
      } else {
        expect(evicted.removed, `round ${i}`).toBe(true);
        expect(existsSync(dir)).toBe(false);
        outcomes.gone++;
      }
      await lease.release();
      await expectNoHalfEntry(cache);
    }
    expect(outcomes.kept + outcomes.gone).toBe(25);
  });

  it('a lease that meets an eviction under way withdraws and waits for it; an eviction under way sees a lease taken before it', async () => {
    const cache = await cacheWith(1);
    const dir = path.join(cache, keyOf(1));
    // The moment between an evictor's lock and its rename, held open: the evictor's side of the handshake.
    const evictor = await acquireLock(`${dir}.lock`, { purpose: 'evict' });
    let leased = false;
    // The lease's poll runs on the test's clock (only setTimeout is faked, while it runs): its timer armed is the event
    // that it has written its lease, seen the evictor's lock and withdrawn. A fixed 200 ms stood for that, and a poll
    // of the folder could pass between the folder's creation and the lease's first write.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    let lease: Awaited<ReturnType<typeof leaseEntry>>;
    try {
      const taking = leaseEntry(dir, { pollMs: 1_000 }).then((l) => ((leased = true), l));
      while (vi.getTimerCount() === 0 && !leased) await new Promise((r) => setImmediate(r));
      expect(readdirSync(leasesDir(dir)).filter((n) => n.endsWith('.lease'))).toEqual([]);
      expect(leased).toBe(false);
      await evictor!.release();
      await vi.advanceTimersByTimeAsync(1_000);
      lease = await taking;
    } finally {
      vi.useRealTimers();
    }
    expect(readdirSync(leasesDir(dir)).filter((n) => n.endsWith('.lease'))).toHaveLength(1);
    // A fill's lock does not hold a lease back: a server may start on an entry another pod refreshes.
    const filler = await acquireLock(`${dir}.lock`);
    const second = await leaseEntry(dir, { pollMs: 10 });
    await filler!.release();
    expect(await removeEntry(cache, keyOf(1))).toEqual({ removed: false, why: 'in use' });
    await lease.release();
    await second.release();
    expect((await removeEntry(cache, keyOf(1))).removed).toBe(true);
  });

  // This test and the next each wait out a lock's 10 s watch, on entries of their own: they run side by side.
  it.concurrent("an eviction's lock its evictor left (killed on another node, 10 min ago): the first lease watches it, takes it over and removes it, so no later start watches it", async () => {
    const cache = await cacheWith(1);
    const dir = path.join(cache, keyOf(1));
    await fsp.writeFile(`${dir}.lock`, JSON.stringify({ pid: 7, host: 'pod-gone', token: 'evictor', since: '', purpose: 'evict' }));
    const then = new Date(Date.now() - 10 * 60_000);
    await fsp.utimes(`${dir}.lock`, then, then);
    const first = await leaseEntry(dir, { pollMs: 10 });
    // Before: judged abandoned for this start alone, and left for every later start to watch 10 s again.
    expect(existsSync(`${dir}.lock`)).toBe(false);
    const second = await leaseEntry(dir, { pollMs: 10 });
    expect(readdirSync(leasesDir(dir)).filter((n) => n.endsWith('.lease'))).toHaveLength(2);
    await first.release();
    await second.release();
  }, 60_000);

  // A live evictor whose clock is 5 min behind: its lock looks old here, so a starting server watches it 10 s. An
  // evictor that stands still that long (stopped here: a stuck volume, a frozen node) between its read of the leases
  // and its rename loses its lock to that server; before, it renamed the entry away all the same, under the lease
  // (with clocks that agree, a stall of 40 s does the same: 30 s its lock looks live, then the 10 s watch).
  it.concurrent('an evictor whose lock a server took over while it stood still, after it read the leases, leaves the entry that server leased', async () => {
    const cache = await cacheWith(1);
    const dir = path.join(cache, keyOf(1));
    // Files enough that its count of what the removal frees (between its read of the leases and its rename) lasts.
    await writeMany(dir, 10_000, (i) => `pad-${i}`, '');
    const evictor = evictInChild(cache, keyOf(1), -300_000);
    try {
      const lease = await leaseWhileStopped(evictor.child, dir);
      // locked: it found its lock taken (in use, had it been stopped before its read of the leases).
      expect(await evictor.outcome).toMatchObject({ removed: false });
      expect(existsSync(path.join(dir, MANIFEST))).toBe(true);
      expect(existsSync(lease.path)).toBe(true);
      await lease.release();
    } finally {
      evictor.child.kill('SIGKILL');
    }
    // Bounds on waiting (the takeover's 10 s watch, the child's count of 10,000 files): 29-67 s under load 16-19.
  }, 240_000);

  it('a lease judged stale and removed by an eviction tells its holder, which learns whether the entry went', async () => {
    const cache = await cacheWith(1);
    const dir = path.join(cache, keyOf(1));
    const lease = await leaseEntry(dir, { heartbeatMs: 50 });
    const told: boolean[] = [];
    lease.onLost((gone) => told.push(gone));
    // Any heartbeat counts as stale here, even one just written (a 1 ms limit is not: a delayed timer can land the
    // eviction's look within 1 ms of a 50 ms heartbeat): as if this process had missed its heartbeats for minutes.
    await new Promise((r) => setTimeout(r, 20));
    expect((await removeEntry(cache, keyOf(1), { leaseStaleMs: -60_000 })).removed).toBe(true);
    await until(() => told.length > 0, 5_000, 10);
    expect(told).toEqual([true]);
    await lease.release();
  });

  it('an evicted entry whose trash cannot be deleted yet still counts as removed; a later eviction deletes it', async () => {
    const cache = await cacheWith(1);
    const stuck = path.join(cache, keyOf(1), 'model_index.json');
    // An undeletable file stands for an NFS client's .nfs file of a file still open (root on ext4 can pin one).
    if (spawnSync('chattr', ['+i', stuck]).status !== 0) return;
    try {
      expect(await removeEntry(cache, keyOf(1))).toMatchObject({ removed: true });
      expect(existsSync(path.join(cache, keyOf(1)))).toBe(false);
      expect(readdirSync(cache).filter((n) => n.startsWith('.evicting-'))).toHaveLength(1);
    } finally {
      for (const n of readdirSync(cache).filter((x) => x.startsWith('.evicting-'))) spawnSync('chattr', ['-i', path.join(cache, n, 'model_index.json')]);
    }
    await makeRoom(cache, 1, { exclude: 'none' });
    expect(readdirSync(cache).filter((n) => n.startsWith('.evicting-'))).toEqual([]);
  });

  it('a fill of the same entry racing an eviction ends with the entry whole', async () => {
    const cache = await cacheWith(1);
    for (let i = 0; i < 10; i++) {
      const [r] = await Promise.all([fill(cache, 1), removeEntry(cache, keyOf(1))]);
      const c = await committedEntry('s3://models/sd/v1', cfgFor(cache));
      if (c) expect(c.dir).toBe(r.dir);
      else expect(existsSync(r.dir)).toBe(false); // evicted after the fill committed: gone whole
      await expectNoHalfEntry(cache);
    }
  });
});

describe('a server', () => {
  it('leases its entry at its first step, before it looks at it, and releases it when it stops', async () => {
    const cache = await cacheWith(1);
    const seq = await resolveBoot(cfgFor(cache, { STORAGE_URI: 's3://models/sd/v1' }), []);
    const leases = leasesDir(path.join(cache, keyOf(1)));
    expect(seq.plan).toMatchObject({ source: 's3', committed: { dir: path.join(cache, keyOf(1)) } });
    expect(readdirSync(leases).filter((n) => n.endsWith('.lease'))).toEqual([expect.stringMatching(new RegExp(`-${process.pid}-[0-9a-f]{16}\\.lease$`))]);
    expect(await removeEntry(cache, keyOf(1))).toEqual({ removed: false, why: 'in use' });
    await seq.stop();
    expect(readdirSync(leases)).toEqual([LAST_USED]);
    expect((await removeEntry(cache, keyOf(1))).removed).toBe(true);
  });
});

describe('adapter-set work folders (.lora-sets/)', () => {
  it('a server gone left a set hard-linking an idle entry\'s UNet: eviction removes the set first and counts what removing the entry really frees', async () => {
    const cache = await cacheWith(2);
    // As runtime/workers.ts lays them out: a patched file of the set's own, and a hard link to the entry's UNet data;
    // its server is gone (no live lease on its folder).
    const set = path.join(cache, '.lora-sets', 'pod-a-7-dead');
    await fsp.mkdir(path.join(set, 'w0', '1', 'unet'), { recursive: true });
    await fsp.writeFile(path.join(set, 'w0', '1', 'unet', 'lora.onnx_data'), Buffer.alloc(300_000, 2));
    await fsp.link(path.join(cache, keyOf(1), 'unet', 'model.onnx'), path.join(set, 'w0', '1', 'unet', 'model.onnx_data'));
    // v3 (1 MB) with 0.5 MB free: removing v1 frees its 1 MB UNet only once the set's link to it has gone too.
    const own = (await fsp.stat(path.join(set, 'w0', '1', 'unet', 'lora.onnx_data'))).blocks * 512;
    const capacity = (await used(cache)) + 0.5 * MB;
    const evicted: Array<{ name: string; bytes: number }> = [];
    const before = await used(cache);
    expect(await fill(cache, 3, { io: disk(cache, capacity), onEvicted: (e) => evicted.push({ name: e.name, bytes: e.bytes }) })).toMatchObject({ fromCache: false });
    expect(await used(cache)).toBeLessThanOrEqual(capacity);
    expect(evicted.map((e) => e.name)).toEqual([keyOf(1)]);
    expect(existsSync(set)).toBe(false);
    expect(existsSync(path.join(cache, keyOf(2)))).toBe(true);
    // What the eviction said it freed is what it freed: the set's own 0.3 MB went before it, and v3 came after it.
    const v3 = await used(path.join(cache, keyOf(3)));
    expect(before - ((await used(cache)) - v3)).toBe(evicted[0]!.bytes + own);
  });

  it('a sweep removes the folders no live process leases, keeps a leased one, and waits a day for folders named before leases', async () => {
    const base = await fsp.mkdtemp(path.join(tmp, 'lora-sets-'));
    const mk = async (name: string, file = 'lora.onnx_data') => {
      await fsp.mkdir(path.join(base, name, 'w0', '1'), { recursive: true });
      await fsp.writeFile(path.join(base, name, 'w0', '1', file), 'x');
    };
    // A live process elsewhere (its own pid, its own lease), as another pod on the volume.
    await mk('pod-a-100-aaaa');
    const child = await leaseInChild(path.join(base, 'pod-a-100-aaaa'));
    try {
      await mk('pod-b-1-bbbb'); // a crashed container's: its lease went stale, or it never had one
      const stale = await leaseEntry(path.join(base, 'pod-c-1-cccc'));
      await mk('pod-c-1-cccc');
      await stale.release(); // a released lease no longer counts
      await mk('node-a-1-w0'); // named before leases: recent, so perhaps a live older server's
      await mk('node-a-2-w0');
      const old = new Date(Date.now() - 2 * 86_400_000);
      await fsp.utimes(path.join(base, 'node-a-2-w0'), old, old);
      expect((await sweepUnleased(base)).sort()).toEqual(['node-a-2-w0', 'pod-b-1-bbbb', 'pod-c-1-cccc']);
      expect(readdirSync(base).filter((n) => !n.startsWith('.')).sort()).toEqual(['node-a-1-w0', 'pod-a-100-aaaa']);
      expect(existsSync(path.join(base, 'pod-a-100-aaaa', 'w0', '1', 'lora.onnx_data'))).toBe(true);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('a sweep keeps the folder of a server whose clock is 10 min behind, and removes one whose lease stopped 10 min ago', async () => {
    const base = await fsp.mkdtemp(path.join(tmp, 'lora-sets-'));
    for (const name of ['pod-d-1-dddd', 'pod-e-7-eeee']) await fsp.mkdir(path.join(base, name, 'w0'), { recursive: true });
    const server = await skewedHolder('lease', path.join(base, 'pod-d-1-dddd'), -600_000, 200);
    const stopped = path.join(leasesDir(path.join(base, 'pod-e-7-eeee')), 'pod-e-7-eeee.lease');
    await fsp.mkdir(path.dirname(stopped), { recursive: true });
    await fsp.writeFile(stopped, JSON.stringify({ pid: 7, host: 'pod-e', token: 'eeee', since: '' }));
    const old = new Date(Date.now() - 10 * 60_000);
    await fsp.utimes(stopped, old, old);
    try {
      // Both heartbeats look 10 minutes old here (the lease's staleMs is 3 s, for the test's sake): only one moves.
      expect(await sweepUnleased(base, { staleMs: 3_000 })).toEqual(['pod-e-7-eeee']);
      expect(readdirSync(base).filter((n) => !n.startsWith('.'))).toEqual(['pod-d-1-dddd']);
    } finally {
      server.child.kill('SIGKILL');
    }
  });
});

describe('lease folders of entries that are not there', () => {
  it('go when no live process leases them; a server leasing its entry before the fill keeps its own, even one taken at that moment', async () => {
    const cache = await cacheWith(1);
    const gone = path.join(cache, 's3-models-typo-0000'); // a STORAGE_URI with no objects: leased, never filled
    await (await leaseEntry(gone)).release();
    const present = await leaseEntry(path.join(cache, keyOf(1)));
    await present.release();
    const booting = await leaseInChild(path.join(cache, 's3-models-next-1111')); // a server before its fill begins
    try {
      expect(await emptyOrphanLeases(cache)).toBe(1);
      expect(readdirSync(path.join(cache, '.leases')).sort()).toEqual([keyOf(1), 's3-models-next-1111'].sort());
      expect(readdirSync(leasesDir(path.join(cache, keyOf(1))))).toEqual([LAST_USED]);
      // Leases taken while the folders are being cleaned: each one that returned is still there.
      for (let i = 0; i < 100; i++) {
        const entry = path.join(cache, `s3-models-race-${i}`);
        const [l] = await Promise.all([leaseEntry(entry, { pollMs: 5 }), emptyOrphanLeases(cache)]);
        expect(existsSync(l.path), `round ${i}`).toBe(true);
        await l.release();
      }
    } finally {
      booting.kill('SIGKILL');
    }
  });

  // The sweep's side of the handshake after a stall, as an eviction's (above): a server that took over the lock of a
  // sweep stopped after its read of the leases keeps its lease. Before, the sweep deleted it on resuming, and a lease
  // whose file goes while its entry is not there is not written again: the server ran unleased.
  it('a sweep whose lock a server took over while it stood still, after it read the leases, leaves that server\'s lease', async () => {
    const cache = await cacheWith(1);
    const entry = path.join(cache, 's3-models-next-2222');
    // Leases that name no holder (they count for nothing) enough that the sweep's read of them lasts.
    await fsp.mkdir(leasesDir(entry), { recursive: true });
    await writeMany(leasesDir(entry), 10_000, (i) => `x-${i}.lease`, '{}');
    const sweep = evictInChild(cache, '', -300_000, 'orphans');
    try {
      const lease = await leaseWhileStopped(sweep.child, entry);
      await sweep.outcome;
      expect(existsSync(lease.path)).toBe(true);
      await lease.release();
    } finally {
      sweep.child.kill('SIGKILL');
    }
    // Two reads of 10,000 leases by the child and the takeover's 10 s watch: 61-106 s under load 15-19 on two cores.
  }, 240_000);
});
