// Versions of a cache entry (src/storage/versions.ts): objects replaced under a prefix while another process leases
// the entry go into a new version beside it, and nothing the lease holder reads changes. Real files, a real S3
// (s3rver, behind the fault proxy for a fill held mid-download), the lease held and the fill killed in other processes.
import { type ChildProcess, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp, readdirSync, readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, type DemoManifest } from '../src/demo/index.js';
import { silentLogger } from '../src/log.js';
import { resolveBoot } from '../src/runtime/boot-sequence.js';
import { JOURNAL, MANIFEST, walk } from '../src/storage/cache.js';
import { describeEntries, listEntries, removeEntry } from '../src/storage/entries.js';
import { committedEntry, resolveModel } from '../src/storage/fetch.js';
import { leasesDir } from '../src/storage/lease.js';
import { cacheKey, parseStorageUri } from '../src/storage/uri.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, putFolder, rejection, s3Env, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';
import { type RuntimeHandle, startRuntime } from './helpers/runtime.js';
import { until } from './helpers/server.js';
import { runWarmupCli, WARMUP_CLI } from './helpers/warmup-cli.js';
import { LEASE_JS, leaseInChild } from './helpers/lease-child.js';

const MB = 1_000_000;
let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
const log = silentLogger();

beforeAll(async () => {
  // The children run the built modules: build them when missing or older than their sources.
  const age = (f: string) => (existsSync(f) ? statSync(f).mtimeMs : 0);
  const srcs = ['lease', 'lock', 'cache', 'fetch', 'versions', 'entries'].map((m) => age(path.resolve(`src/storage/${m}.ts`)));
  if (Math.min(age(LEASE_JS), age(WARMUP_CLI)) < Math.max(...srcs)) {
    spawnSync(process.execPath, [path.resolve('node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { stdio: 'ignore' });
  }
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'cache-versions-'));
  ({ s3, proxy } = await startS3WithProxy());
});

cleanUpS3(() => ({ s3, proxy, tmp }));

/** A model under `prefix`: its UNet's bytes from `unet`, the rest the same whatever `unet`. */
async function publish(prefix: string, unet: number): Promise<void> {
  await s3.put('models', `${prefix}/model_index.json`, '{}');
  await s3.put('models', `${prefix}/text_encoder/model.onnx`, detBytes(300_000, 2));
  await s3.put('models', `${prefix}/unet/model.onnx`, detBytes(MB, unet));
}

const uriOf = (prefix: string) => `s3://models/${prefix}`;
const keyOf = (prefix: string) => cacheKey(parseStorageUri(uriOf(prefix)) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, proxy.endpoint);
const cfgFor = (cache: string) => testConfig(proxy.endpoint, cache, { S3_PART_SIZE: '262144', S3_MAX_CONCURRENCY: '4' });
const fill = (cache: string, prefix: string) => resolveModel(uriOf(prefix), { cfg: cfgFor(cache), log });

/** Every file under `dir` with the SHA-256 of its bytes (the manifest and journal included). */
async function snapshot(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const rel of await walk(dir)) out[rel] = createHash('sha256').update(readFileSync(path.join(dir, rel))).digest('hex');
  return out;
}

/** What the cache folder (or the folders) occupies on disk: allocated blocks, a file linked under several names once. */
async function used(dirs: string | readonly string[]): Promise<number> {
  const seen = new Set<number>();
  let n = 0;
  for (const dir of typeof dirs === 'string' ? [dirs] : dirs) {
    for (const rel of await fsp.readdir(dir, { recursive: true })) {
      const st = await fsp.lstat(path.join(dir, String(rel))).catch(() => undefined);
      if (st?.isFile() && !seen.has(st.ino)) n += st.blocks * 512;
      if (st) seen.add(st.ino);
    }
  }
  return n;
}

const exited = (c: ChildProcess) => new Promise((r) => (c.exitCode !== null || c.signalCode !== null ? r(undefined) : c.once('exit', r)));
const ino = (f: string) => statSync(f).ino;

describe('objects replaced under a prefix while another process leases its entry', () => {
  it('the leased version stays byte for byte; the next start serves the new objects from a new version; prune removes the old one once unleased', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('a', 1);
    const first = await fill(cache, 'a');
    const old = path.join(cache, keyOf('a'));
    expect(first.dir).toBe(old);
    const before = await snapshot(old);
    const pod = await leaseInChild(old);
    try {
      // A re-upload to the same prefix (aws s3 sync of a new export): the UNet changes, the rest is the same.
      await publish('a', 9);
      const second = await fill(cache, 'a');
      expect(await snapshot(old)).toEqual(before);
      expect(second).toMatchObject({ dir: `${old}@2`, fromCache: false });
      expect(readFileSync(path.join(second.dir, 'unet/model.onnx')).equals(detBytes(MB, 9))).toBe(true);
      expect(readFileSync(path.join(old, 'unet/model.onnx')).equals(detBytes(MB, 1))).toBe(true);
      // Copy-on-write: the unchanged files are the same inodes, the changed one a new file.
      expect(ino(path.join(second.dir, 'text_encoder/model.onnx'))).toBe(ino(path.join(old, 'text_encoder/model.onnx')));
      expect(ino(path.join(second.dir, 'unet/model.onnx'))).not.toBe(ino(path.join(old, 'unet/model.onnx')));
      expect((await committedEntry(uriOf('a'), cfgFor(cache)))?.dir).toBe(second.dir);
      // The next start is a hit on the new version; the old one stays while leased.
      expect(await fill(cache, 'a')).toMatchObject({ dir: second.dir, fromCache: true });
      expect(await snapshot(old)).toEqual(before);
      const entries = await listEntries(cache);
      const byName = Object.fromEntries(entries.map((e) => [e.name, e]));
      expect(byName[keyOf('a')]).toMatchObject({ version: 1, superseded: true, users: [expect.stringMatching(new RegExp(`/${pod.pid}$`))] });
      expect(byName[`${keyOf('a')}@2`]).toMatchObject({ version: 2, superseded: false, users: [], shared: 0 });
      // The old version counts only what removing it frees: its UNet, not the files the new one links.
      expect(byName[keyOf('a')]!.shared).toBeGreaterThanOrEqual(300_000);
      expect(byName[keyOf('a')]!.bytes).toBeLessThan(MB + 300_000);
      const env = s3Env(proxy.endpoint, cache);
      const lines = (out: string) => out.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines((await runWarmupCli(['cache', 'list'], env)).stdout)).toEqual(expect.arrayContaining([
        expect.objectContaining({ entry: keyOf('a'), superseded: true, inUse: true, sharedBytes: byName[keyOf('a')]!.shared }),
        expect.objectContaining({ entry: `${keyOf('a')}@2`, version: 2, uri: `${uriOf('a')}/`, state: 'committed', inUse: false }),
      ]));
      // --keep-uri keeps the current version; the old one goes only once its lease has.
      const pruned = async () => lines((await runWarmupCli(['cache', 'prune', '--keep-uri', uriOf('a')], env)).stdout).map((l) => [l.entry, l.action, l.reason]).sort();
      expect(await pruned()).toEqual([[keyOf('a'), 'keep', 'in use'], [`${keyOf('a')}@2`, 'keep', 'kept']]);
      expect(await snapshot(old)).toEqual(before);
      pod.kill('SIGTERM');
      await exited(pod);
      expect(await pruned()).toEqual([[keyOf('a'), 'removed', undefined], [`${keyOf('a')}@2`, 'keep', 'kept']]);
      expect(existsSync(old)).toBe(false);
      expect(await snapshot(second.dir)).toMatchObject({ 'unet/model.onnx': createHash('sha256').update(detBytes(MB, 9)).digest('hex') });
    } finally {
      pod.kill('SIGKILL');
    }
  }, 60_000);

  it('unleased, the entry is refreshed in place; an older version no process leases goes at the next start', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('b', 1);
    const dir = (await fill(cache, 'b')).dir;
    await publish('b', 3);
    expect(await fill(cache, 'b')).toMatchObject({ dir, fromCache: false });
    expect(readFileSync(path.join(dir, 'unet/model.onnx')).equals(detBytes(MB, 3))).toBe(true);
    // A version left behind by a process that served it and is gone: the next start removes it.
    const pod = await leaseInChild(dir);
    await publish('b', 4);
    const next = await fill(cache, 'b');
    expect(next.dir).toBe(`${dir}@2`);
    pod.kill('SIGTERM');
    await exited(pod);
    expect(await fill(cache, 'b')).toMatchObject({ dir: next.dir, fromCache: true });
    expect(existsSync(dir)).toBe(false);
    // And version 2, unleased, is refreshed in place too.
    await publish('b', 5);
    expect(await fill(cache, 'b')).toMatchObject({ dir: next.dir, fromCache: false });
    expect(readFileSync(path.join(next.dir, 'unet/model.onnx')).equals(detBytes(MB, 5))).toBe(true);
  }, 60_000);

  it('a fill of the new version killed (SIGKILL) mid-download: the old version is served whole, the new one never half; the next fill resumes it', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('c', 1);
    const old = (await fill(cache, 'c')).dir;
    const before = await snapshot(old);
    const pod = await leaseInChild(old);
    try {
      await publish('c', 7);
      // The first range of the new UNet arrives, the others are held: the warm-up Job is killed mid-download.
      proxy.faults = { hold: { keys: /c\/unet\/model\.onnx/, range: (r) => r !== undefined && !r.startsWith('bytes=0-'), release: new Promise(() => undefined) } };
      let kill!: (s: NodeJS.Signals) => void;
      const job = runWarmupCli([], s3Env(proxy.endpoint, cache, { STORAGE_URI: uriOf('c'), S3_PART_SIZE: '262144', S3_MAX_CONCURRENCY: '4' }), (k) => (kill = k));
      const journal = path.join(`${old}@2`, JOURNAL);
      await until(() => existsSync(journal) && readFileSync(journal, 'utf8').includes('"f":"unet/model.onnx","add"'), 20_000, 20);
      kill('SIGKILL');
      expect((await job).signal).toBe('SIGKILL');
      expect(existsSync(path.join(`${old}@2`, MANIFEST))).toBe(false);
      expect(await snapshot(old)).toEqual(before);
      expect(await committedEntry(uriOf('c'), cfgFor(cache))).toMatchObject({ dir: old });
      // A prune that keeps the URI keeps its unfinished new version too, as it keeps an unfinished first one.
      const prune = await runWarmupCli(['cache', 'prune', '--keep-uri', uriOf('c')], s3Env(proxy.endpoint, cache));
      expect(prune.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>))
        .toEqual(expect.arrayContaining([expect.objectContaining({ entry: `${keyOf('c')}@2`, state: 'partial', action: 'keep', reason: 'kept' })]));
      proxy.faults = {};
      const fetched: number[] = [];
      const r = await resolveModel(uriOf('c'), { cfg: cfgFor(cache), log, onDownloaded: (n) => fetched.push(n) });
      expect(r).toMatchObject({ dir: `${old}@2`, fromCache: false });
      expect(readFileSync(path.join(r.dir, 'unet/model.onnx')).equals(detBytes(MB, 7))).toBe(true);
      // Resumed: the range on disk is not fetched again, nor the files linked from the old version.
      expect(fetched.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(MB - 262_144);
      expect(await snapshot(old)).toEqual(before);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 60_000);

  it('a fill killed (SIGKILL) after it took the commit off a leased entry, before it put it back: the next fill leaves the leased files as they were', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('e', 1);
    const old = (await fill(cache, 'e')).dir;
    const before = await snapshot(old);
    const pod = await leaseInChild(old);
    // A lease file that is a FIFO: its reader blocks until a writer opens it, so the warm-up Job stops where it reads
    // the leases, after the commit went and before it is put back, and is killed there.
    const fifo = path.join(leasesDir(old), 'blocked.lease');
    try {
      await publish('e', 6);
      expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
      let kill!: (s: NodeJS.Signals) => void;
      const job = runWarmupCli([], s3Env(proxy.endpoint, cache, { STORAGE_URI: uriOf('e') }), (k) => (kill = k));
      await until(() => !existsSync(path.join(old, MANIFEST)), 20_000, 20);
      kill('SIGKILL');
      expect((await job).signal).toBe('SIGKILL');
      await fsp.unlink(fifo);
      // The next start, while the pod still serves from the entry: its files are not rewritten under it.
      const next = await fill(cache, 'e');
      expect(readFileSync(path.join(old, 'unet/model.onnx')).equals(detBytes(MB, 1))).toBe(true);
      expect(await snapshot(old)).toEqual(before);
      expect(next).toMatchObject({ dir: `${old}@2`, fromCache: false });
      expect(readFileSync(path.join(next.dir, 'unet/model.onnx')).equals(detBytes(MB, 6))).toBe(true);
      expect(await listEntries(cache)).toEqual(expect.arrayContaining([expect.objectContaining({ name: keyOf('e'), state: 'committed', superseded: true })]));
    } finally {
      pod.kill('SIGKILL');
      await fsp.rm(fifo, { force: true });
    }
  }, 60_000);

  it('eviction counts what removing the new version frees while the old one stays: not the files they share', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('f', 1);
    const old = (await fill(cache, 'f')).dir;
    const pod = await leaseInChild(old);
    try {
      await publish('f', 8);
      const cur = (await fill(cache, 'f')).dir;
      expect(cur).toBe(`${old}@2`);
      const before = await snapshot(cur);
      // Version 2 is idle and lists its 1 MB UNet and the 0.3 MB text encoder it links with version 1, which its pod
      // keeps: removing it frees about 1 MB. Another model (1.3 MB) with 0.25 MB free needs 1.05 MB more.
      await publish('g', 2);
      const evicted: string[] = [];
      const withFree = async (free: number) => {
        const cap = (await used(cache)) + free;
        return resolveModel(uriOf('g'), { cfg: cfgFor(cache), log, io: { freeBytes: async () => Math.max(0, cap - (await used(cache))) }, onEvicted: (e) => evicted.push(e.name) });
      };
      const err = await rejection(withFree(0.25 * MB));
      expect(err.code).toBe('NO_SPACE');
      expect(evicted).toEqual([]);
      expect(await snapshot(cur)).toEqual(before);
      expect(err.message).toMatch(/\(removing every entry not in use would free only 1\.0 MB, so none was\)/);
      // With 0.35 MB free it is enough: version 2 goes, version 1 stays whole for its pod.
      expect(await withFree(0.35 * MB)).toMatchObject({ fromCache: false });
      expect(evicted).toEqual([`${keyOf('f')}@2`]);
      expect(readFileSync(path.join(old, 'text_encoder/model.onnx')).equals(detBytes(300_000, 2))).toBe(true);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 60_000);

  it('while a new version is filled, the list says so of it, and of version 1 (whose lock every fill holds) only that it is locked for that fill', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('h', 1);
    const old = (await fill(cache, 'h')).dir;
    const key = keyOf('h');
    const pod = await leaseInChild(old);
    let release!: () => void;
    try {
      await publish('h', 5);
      proxy.faults = { hold: { keys: /h\/unet\/model\.onnx/, range: (r) => r !== undefined && !r.startsWith('bytes=0-'), release: new Promise<void>((r) => (release = r)) } };
      const filling = fill(cache, 'h');
      const journal = path.join(`${old}@2`, JOURNAL);
      await until(() => existsSync(journal) && readFileSync(journal, 'utf8').includes('"f":"unet/model.onnx","add"'), 20_000, 20);
      // The pod that kept version 1 is gone: nothing but the fill's lock is on it now.
      pod.kill('SIGTERM');
      await exited(pod);
      const me = `${os.hostname()}/${process.pid}`;
      const entries = await listEntries(cache);
      expect(entries).toEqual(expect.arrayContaining([
        expect.objectContaining({ name: key, state: 'committed', users: [], locked: me, lockedFor: `${key}@2` }),
        expect.objectContaining({ name: `${key}@2`, state: 'partial', locked: me }),
      ]));
      expect(entries.find((e) => e.name === `${key}@2`)!.lockedFor).toBeUndefined();
      const text = describeEntries(entries);
      expect(text).toContain(`${key} (`);
      expect(text).toContain(`, locked while ${key}@2 is filled)`);
      expect(text).toMatch(new RegExp(`${key}@2 \\([^)]* partial, [^)]*, being filled\\)`));
      expect(text).not.toMatch(new RegExp(`${key} \\([^)]*being filled`));
      const lines = (await runWarmupCli(['cache', 'list'], s3Env(proxy.endpoint, cache))).stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines).toEqual(expect.arrayContaining([
        expect.objectContaining({ entry: key, state: 'committed', inUse: true, locked: me, lockedFor: `${key}@2` }),
        expect.objectContaining({ entry: `${key}@2`, state: 'partial', inUse: true, locked: me }),
      ]));
      expect(lines.find((l) => l.entry === `${key}@2`)).not.toHaveProperty('lockedFor');
      release();
      expect(await filling).toMatchObject({ dir: `${old}@2`, fromCache: false });
    } finally {
      release?.();
      proxy.faults = {};
      pod.kill('SIGKILL');
    }
  }, 60_000);

  it('a server starting on the entry leases its current version, not the one it replaced', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('d', 1);
    const old = (await fill(cache, 'd')).dir;
    const pod = await leaseInChild(old);
    try {
      await publish('d', 2);
      const cur = (await fill(cache, 'd')).dir;
      expect(cur).toBe(`${old}@2`);
      const seq = await resolveBoot(testConfig(proxy.endpoint, cache, { STORAGE_URI: uriOf('d') }), []);
      const mine = (dir: string) => readdirSync(leasesDir(dir)).filter((n) => n.includes(`-${process.pid}-`));
      expect(seq.plan).toMatchObject({ source: 's3', committed: { dir: cur } });
      expect([mine(cur).length, mine(old).length]).toEqual([1, 0]);
      await seq.stop();
      expect(mine(cur)).toEqual([]);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 60_000);

  // A pod killed elsewhere (OOM, a lost node) leaves its lease on the old version, stamped with its own clock: the
  // version's removal watches such a lease for two heartbeats (60 s at the default staleness) before it counts it
  // gone. A start that finds that version must not wait for it, whether a live pod still serves the version or not:
  // it leaves the version to an eviction or a prune, which watch it.
  it('a start on the new version never waits to watch a killed pod\'s lease on the old one; an eviction removes that version', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('k', 1);
    const old = (await fill(cache, 'k')).dir;
    const pod = await leaseInChild(old);
    try {
      await publish('k', 2);
      const cur = (await fill(cache, 'k')).dir;
      expect(cur).toBe(`${old}@2`);
      const before = await snapshot(old);
      const dead = path.join(leasesDir(old), 'pod-b-7-0123456789abcdef.lease');
      await fsp.writeFile(dead, JSON.stringify({ pid: 7, host: 'pod-b', token: '0123456789abcdef', since: '' }));
      const then = new Date(Date.now() - 10 * 60_000);
      await fsp.utimes(dead, then, then);
      // Default staleness: a watch of that lease would take 60 s, past this test's limit.
      expect(await fill(cache, 'k')).toMatchObject({ dir: cur, fromCache: true });
      pod.kill('SIGTERM');
      await exited(pod);
      expect(await fill(cache, 'k')).toMatchObject({ dir: cur, fromCache: true });
      expect(await snapshot(old)).toEqual(before);
      // An eviction watches the lease (for a second at a 3 s staleness), finds it still, and removes the version.
      expect(await removeEntry(cache, keyOf('k'), { leaseStaleMs: 3_000 })).toMatchObject({ removed: true });
      expect(existsSync(old)).toBe(false);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 30_000);

  // The same killed pod's lease, on the entry itself when its objects are re-uploaded: a fill that would refresh the entry
  // in place must not watch that lease for 60 s on a start's path either; it writes a new version, as for a live lease.
  it("a fill finding objects changed and only a killed pod's lease (10 min old) on the entry writes a new version beside it, without watching that lease", async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    await publish('d', 1);
    const old = (await fill(cache, 'd')).dir;
    const before = await snapshot(old);
    await fsp.mkdir(leasesDir(old), { recursive: true });
    const dead = path.join(leasesDir(old), 'pod-b-7-0123456789abcdef.lease');
    await fsp.writeFile(dead, JSON.stringify({ pid: 7, host: 'pod-b', token: '0123456789abcdef', since: '' }));
    const then = new Date(Date.now() - 10 * 60_000);
    await fsp.utimes(dead, then, then);
    await publish('d', 2);
    // Default staleness: a watch of that lease would take 60 s, past this test's limit.
    expect(await fill(cache, 'd')).toMatchObject({ dir: `${old}@2`, fromCache: false });
    expect(await snapshot(old)).toEqual(before);
    // An eviction watches the lease (a second at a 3 s staleness), finds it still, and removes the old version.
    expect(await removeEntry(cache, keyOf('d'), { leaseStaleMs: 3_000 })).toMatchObject({ removed: true });
  }, 30_000);
});

describe('optimized-model copies (ORT_OPTIMIZED_CACHE) across versions and refreshes in place', () => {
  // `always` keeps every copy untimed: the demo's graphs build in milliseconds, so `auto` would decline them.
  const OPT = { ORT_OPTIMIZED_CACHE: 'always', EXECUTION_PROVIDER: 'cpu' };
  /** The demo model with external weights in every component (padding), seeded: another seed changes every weight. */
  const demo = async (seed: number) => buildDemoModel(await fsp.mkdtemp(path.join(tmp, 'demo-')), { padBytes: 300_000, seed });
  const upload = (prefix: string, m: DemoManifest, only: (rel: string) => boolean = () => true) => putFolder(s3, 'models', `${prefix}/`, m.dir, m.files.map((f) => f.path).filter(only));
  const serverEnv = (cache: string, prefix: string) => ({ ...s3Env(proxy.endpoint, cache, { STORAGE_URI: uriOf(prefix), ...OPT }), LOG_LEVEL: 'info' });
  /** What the optimized-model cache did for each component's session (`filled`: those created after the fill). */
  const sessions = (rt: RuntimeHandle, filled = false) => {
    const from = filled ? rt.events.findIndex((e) => e.name === 'files-ready') : 0;
    return Object.fromEntries(rt.events.slice(from).flatMap((e) => (e.name === 'session' ? [[e.data.component, e.data.optimizedCache]] : [])));
  };
  const optFiles = (dir: string) => readdirSync(dir).filter((n) => n.includes('.opt.')).sort();
  /** A component's copy files as they are on disk: a file rewritten (or removed and written again) has another mtime. */
  const stamps = (dir: string) => optFiles(dir).map((n) => [n, ino(path.join(dir, n)), statSync(path.join(dir, n)).mtimeMs]);
  /** The copy's weights files: each write names its own (ortcache.ts), so a name gone is that copy removed. */
  const weights = (dir: string) => optFiles(dir).filter((n) => n.endsWith('.onnx_data'));

  /** A first server on a fresh cache: it loads the sources and writes every component's copy after ready. */
  async function cachedWithCopies(prefix: string): Promise<string> {
    const cache = await fsp.mkdtemp(path.join(tmp, 'c-'));
    const first = await startRuntime(serverEnv(cache, prefix), { ready: true });
    try {
      expect((await first.waitFor('optimized-cache-written', undefined, 60_000)).outcomes).toEqual({ text_encoder: 'written', unet: 'written', vae_decoder: 'written' });
    } finally {
      await first.stop();
    }
    return cache;
  }

  it('a re-upload that changes only the UNet: the new version (filled by the warm-up Job) starts on the text encoder\'s and VAE decoder\'s copies, hard links of the old ones, and writes only the UNet\'s', async () => {
    const [a, b] = await Promise.all([demo(0), demo(1)]);
    await upload('opt-a', a);
    const cache = await cachedWithCopies('opt-a');
    const old = path.join(cache, keyOf('opt-a'));
    const pod = await leaseInChild(old);
    try {
      await upload('opt-a', b, (rel) => rel.startsWith('unet/'));
      const job = await runWarmupCli([], s3Env(proxy.endpoint, cache, { STORAGE_URI: uriOf('opt-a'), ...OPT }));
      expect(job.code, job.stderr).toBe(0);
      expect(JSON.parse(job.stdout)).toMatchObject({ modelDir: `${old}@2`, fromCache: false });
      const cur = `${old}@2`;
      for (const c of ['text_encoder', 'vae_decoder']) {
        expect(optFiles(path.join(cur, c)), c).toEqual(optFiles(path.join(old, c)));
        // The graph and its weights are the old version's files; the key, written last, is the new version's own.
        for (const f of optFiles(path.join(cur, c)).filter((n) => !n.endsWith('.json'))) expect(ino(path.join(cur, c, f)), `${c}/${f}`).toBe(ino(path.join(old, c, f)));
      }
      expect(optFiles(path.join(cur, 'unet'))).toEqual([]);
      const next = await startRuntime(serverEnv(cache, 'opt-a'), { ready: true });
      try {
        expect((await next.waitFor('files-ready')).dir).toBe(cur);
        expect(sessions(next)).toEqual({ text_encoder: 'hit', unet: 'deferred', vae_decoder: 'hit' });
        expect((await next.waitFor('optimized-cache-written', undefined, 60_000)).outcomes).toEqual({ unet: 'written' });
      } finally {
        await next.stop();
      }
      // The copies count as the versions' other files do: once, with the newest version that holds them; the old
      // version's `bytes` (what removing it frees) are its UNet and that UNet's copy.
      const entries = Object.fromEntries((await listEntries(cache)).map((e) => [e.name, e]));
      const [v1, v2] = [entries[keyOf('opt-a')]!, entries[`${keyOf('opt-a')}@2`]!];
      expect(v1.bytes + v2.bytes).toBe(await used([old, cur]));
      expect(v1.bytes).toBe((await used([old, cur])) - (await used([cur])));
      expect(v1.shared).toBe((await used([old])) - v1.bytes);
      expect(v1.bytes).toBeLessThan(await used([path.join(old, 'unet')]) + 8192);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 120_000);

  it('a re-upload that changes only the text encoder\'s external data (same size, same graph): the server\'s own fill carries the UNet\'s and VAE decoder\'s copies, not the text encoder\'s', async () => {
    const a = await demo(0);
    await upload('opt-b', a);
    const cache = await cachedWithCopies('opt-b');
    const old = path.join(cache, keyOf('opt-b'));
    const pod = await leaseInChild(old);
    try {
      const data = readFileSync(path.join(a.dir, 'text_encoder/model.onnx_data'));
      const changed = Buffer.from(data);
      changed[changed.length - 1] ^= 0xff;
      await s3.put('models', 'opt-b/text_encoder/model.onnx_data', changed);
      const next = await startRuntime(serverEnv(cache, 'opt-b'), { ready: true });
      try {
        expect((await next.waitFor('files-ready')).dir).toBe(`${old}@2`);
        // Its sessions started on version 1 while S3 was checked, and again on version 2 once it was filled.
        expect(sessions(next, true)).toEqual({ text_encoder: 'deferred', unet: 'hit', vae_decoder: 'hit' });
      } finally {
        await next.stop();
      }
      const olds = new Set(optFiles(path.join(old, 'text_encoder')).map((f) => ino(path.join(old, 'text_encoder', f))));
      expect(optFiles(path.join(`${old}@2`, 'text_encoder')).filter((f) => olds.has(ino(path.join(`${old}@2`, 'text_encoder', f))))).toEqual([]);
    } finally {
      pod.kill('SIGKILL');
    }
  }, 120_000);

  it('a re-upload that changes only the UNet, the entry leased by no other process: refreshed in place, it keeps the text encoder\'s and VAE decoder\'s copies as they are, removes the UNet\'s, and the next start writes only that one', async () => {
    const [a, b] = await Promise.all([demo(0), demo(1)]);
    await upload('opt-c', a);
    const cache = await cachedWithCopies('opt-c');
    const dir = path.join(cache, keyOf('opt-c'));
    const before = Object.fromEntries(['text_encoder', 'vae_decoder'].map((c) => [c, stamps(path.join(dir, c))]));
    const unetWeights = weights(path.join(dir, 'unet'));
    expect(unetWeights).toHaveLength(1);
    await upload('opt-c', b, (rel) => rel.startsWith('unet/'));
    const next = await startRuntime(serverEnv(cache, 'opt-c'), { ready: true });
    try {
      expect(await next.waitFor('files-ready')).toMatchObject({ dir, fromCache: false });
      // Its sessions started on the entry as committed while S3 was checked, and again once it was refreshed.
      expect(sessions(next, true)).toEqual({ text_encoder: 'hit', unet: 'deferred', vae_decoder: 'hit' });
      expect((await next.waitFor('optimized-cache-written', undefined, 60_000)).outcomes).toEqual({ unet: 'written' });
    } finally {
      await next.stop();
    }
    expect(existsSync(`${dir}@2`)).toBe(false);
    for (const c of ['text_encoder', 'vae_decoder']) expect(stamps(path.join(dir, c)), c).toEqual(before[c]);
    // The refresh removed the UNet's old copy (a writer leaves unreferenced weights for 10 minutes); this is the new one.
    expect(weights(path.join(dir, 'unet'))).toHaveLength(1);
    expect(weights(path.join(dir, 'unet'))).not.toContain(unetWeights[0]);
  }, 120_000);

  it('a re-upload that changes only the text encoder\'s external data (same size, same graph), the entry leased by no other process: its copy is removed by the refresh and not loaded, the UNet\'s and VAE decoder\'s are', async () => {
    const a = await demo(0);
    await upload('opt-d', a);
    const cache = await cachedWithCopies('opt-d');
    const dir = path.join(cache, keyOf('opt-d'));
    const before = Object.fromEntries(['unet', 'vae_decoder'].map((c) => [c, stamps(path.join(dir, c))]));
    const textWeights = weights(path.join(dir, 'text_encoder'));
    expect(textWeights).toHaveLength(1);
    const changed = Buffer.from(readFileSync(path.join(a.dir, 'text_encoder/model.onnx_data')));
    changed[changed.length - 1] ^= 0xff;
    await s3.put('models', 'opt-d/text_encoder/model.onnx_data', changed);
    const next = await startRuntime(serverEnv(cache, 'opt-d'), { ready: true });
    try {
      expect(await next.waitFor('files-ready')).toMatchObject({ dir, fromCache: false });
      expect(sessions(next, true)).toEqual({ text_encoder: 'deferred', unet: 'hit', vae_decoder: 'hit' });
      expect((await next.waitFor('optimized-cache-written', undefined, 60_000)).outcomes).toEqual({ text_encoder: 'written' });
    } finally {
      await next.stop();
    }
    expect(readFileSync(path.join(dir, 'text_encoder/model.onnx_data')).equals(changed)).toBe(true);
    for (const c of ['unet', 'vae_decoder']) expect(stamps(path.join(dir, c)), c).toEqual(before[c]);
    expect(weights(path.join(dir, 'text_encoder'))).toHaveLength(1);
    expect(weights(path.join(dir, 'text_encoder'))).not.toContain(textWeights[0]);
  }, 120_000);

  it('a refresh in place killed (SIGKILL) after the changed text encoder\'s data was whole, the UNet\'s mid-download: the changed components\' copies are gone already, and the next start loads only the VAE decoder\'s', async () => {
    const [a, b] = await Promise.all([demo(0), demo(1)]);
    await upload('opt-e', a);
    const cache = await cachedWithCopies('opt-e');
    const dir = path.join(cache, keyOf('opt-e'));
    const vae = stamps(path.join(dir, 'vae_decoder'));
    const changed = Buffer.from(readFileSync(path.join(a.dir, 'text_encoder/model.onnx_data')));
    changed[changed.length - 1] ^= 0xff;
    await s3.put('models', 'opt-e/text_encoder/model.onnx_data', changed);
    await upload('opt-e', b, (rel) => rel.startsWith('unet/'));
    // The first range of the new UNet weights arrives, the others are held; the warm-up Job is killed once the journal
    // records the new text encoder weights whole, so the next fill reuses that file.
    proxy.faults = { hold: { keys: /opt-e\/unet\/model\.onnx_data/, range: (r) => r !== undefined && !r.startsWith('bytes=0-'), release: new Promise(() => undefined) } };
    try {
      let kill!: (s: NodeJS.Signals) => void;
      const job = runWarmupCli([], s3Env(proxy.endpoint, cache, { STORAGE_URI: uriOf('opt-e'), S3_PART_SIZE: '262144', S3_MAX_CONCURRENCY: '4', ...OPT }), (k) => (kill = k));
      const journal = path.join(dir, JOURNAL);
      const f = '"f":"text_encoder/model.onnx_data"';
      await until(() => {
        const text = existsSync(journal) ? readFileSync(journal, 'utf8') : '';
        return text.lastIndexOf(`${f},"complete":true`) > text.lastIndexOf(`${f},"drop":true`) && text.includes(`${f},"drop":true`);
      }, 30_000, 20);
      kill('SIGKILL');
      expect((await job).signal).toBe('SIGKILL');
    } finally {
      proxy.faults = {};
    }
    expect(existsSync(path.join(dir, MANIFEST))).toBe(false);
    expect(readFileSync(path.join(dir, 'text_encoder/model.onnx_data')).equals(changed)).toBe(true);
    expect([optFiles(path.join(dir, 'text_encoder')), optFiles(path.join(dir, 'unet'))]).toEqual([[], []]);
    expect(stamps(path.join(dir, 'vae_decoder'))).toEqual(vae);
    const next = await startRuntime(serverEnv(cache, 'opt-e'), { ready: true });
    try {
      expect(await next.waitFor('files-ready')).toMatchObject({ dir, fromCache: false });
      // Nothing was committed: its sessions started as the fill made their files whole.
      expect(sessions(next)).toEqual({ text_encoder: 'deferred', unet: 'deferred', vae_decoder: 'hit' });
    } finally {
      await next.stop();
    }
  }, 120_000);
});
