// `warmup cache list` and `warmup cache prune` as an operator runs them: the built CLI in a child process, on a cache
// filled from a real S3 (s3rver), with one entry leased by another live process.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/log.js';
import { MANIFEST } from '../src/storage/cache.js';
import { emptyHolderTemps } from '../src/storage/entries.js';
import { PID_NS } from '../src/storage/lock.js';
import { resolveModel } from '../src/storage/fetch.js';
import { cacheKey, parseStorageUri } from '../src/storage/uri.js';
import { cleanUpS3, CREDS, detBytes, s3Env, type S3Server, startS3, testConfig } from './helpers/s3.js';
import { buildIfStale, skewedHolder } from './helpers/lease-child.js';

const CLI = path.resolve('dist/warmup/main.js');
const LEASE_JS = path.resolve('dist/src/storage/lease.js');
const LOCK_JS = path.resolve('dist/src/storage/lock.js');
let s3: S3Server;
let tmp: string;
let cache: string;
let holder: ChildProcess;

const keyOf = (v: number) => cacheKey(parseStorageUri(`s3://models/m/v${v}`) as Extract<ReturnType<typeof parseStorageUri>, { kind: 's3' }>, s3.endpoint);

/** The CLI's `cache` command; `onStderr` sees its stderr so far at each chunk, with the child (to signal it). */
function cli(args: string[], env: Record<string, string> = {}, onStderr?: (stderr: string, child: ChildProcess) => void): Promise<{ code: number | null; out: Array<Record<string, unknown>>; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'cache', ...args], { env: { PATH: process.env.PATH ?? '', ...s3Env(s3.endpoint, cache), ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => {
      stderr += c;
      onStderr?.(stderr, child);
    });
    child.on('close', (code) => {
      const out = stdout.trim() === '' ? [] : stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      resolve({ code, out, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  if (!existsSync(CLI)) spawnSync(process.execPath, [path.resolve('node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { stdio: 'ignore' });
  buildIfStale(); // the skewed fillers run the built lock module
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'cache-cli-'));
  cache = path.join(tmp, 'cache');
  s3 = await startS3();
  for (const v of [1, 2, 3]) {
    await s3.put('models', `m/v${v}/model_index.json`, '{}');
    await s3.put('models', `m/v${v}/unet/model.onnx`, detBytes(200_000, v));
    await resolveModel(`s3://models/m/v${v}`, { cfg: testConfig(s3.endpoint, cache), log: silentLogger() });
    // v1 used 30 days ago, v2 10 days ago, v3 an hour ago.
    const t = new Date(Date.now() - [30 * 24, 10 * 24, 1][v - 1]! * 3_600_000);
    await fsp.utimes(path.join(cache, keyOf(v), MANIFEST), t, t);
  }
  // A serving process on v1: it stays whatever prune is asked.
  const script = `const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); await leaseEntry(process.argv[1]); process.stdout.write('leased\\n'); setInterval(() => {}, 60_000);`;
  holder = spawn(process.execPath, ['--input-type=module', '-e', script, path.join(cache, keyOf(1))], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((r) => holder.stdout!.on('data', (c) => String(c).includes('leased') && r()));
});

afterAll(() => void holder?.kill('SIGKILL'));
cleanUpS3(() => ({ s3, tmp }));

describe('warmup cache', () => {
  it('list: one JSON line per entry, least recently used first, with size, last use and who uses it; no local path', async () => {
    const r = await cli(['list']);
    expect(r.code, r.stderr).toBe(0);
    // v1 was committed first, but a process serves from it: its lease's heartbeat makes it the most recently used.
    expect(r.out.map((e) => e.entry)).toEqual([keyOf(2), keyOf(3), keyOf(1)]);
    expect(r.out[2]).toMatchObject({ uri: 's3://models/m/v1/', state: 'committed', inUse: true, users: [`${os.hostname()}/${holder.pid}`] });
    expect(r.out[0]).toMatchObject({ uri: 's3://models/m/v2/', inUse: false, lastUsed: expect.stringMatching(/^\d{4}-\d\d-\d\dT/) });
    for (const e of r.out) expect(e.bytes as number).toBeGreaterThanOrEqual(200_000);
    expect(r.stdout + r.stderr).not.toContain(tmp);
    expect(r.stderr).toMatch(/^cache: 3 entries, 0\.\d MB, 1 in use\n$/);
  });

  it('prune --dry-run says what would go and removes nothing; --older-than and --keep-uri keep what they name', async () => {
    const dry = await cli(['prune', '--dry-run']);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.out.map((e) => [e.entry, e.action, e.reason])).toEqual([[keyOf(2), 'would-remove', undefined], [keyOf(3), 'would-remove', undefined], [keyOf(1), 'keep', 'in use']]);
    expect(dry.stderr).toMatch(/would remove 2 of 3 entries, 0\.\d MB \(dry run\)/);
    for (const v of [1, 2, 3]) expect(existsSync(path.join(cache, keyOf(v)))).toBe(true);

    const old = await cli(['prune', '--older-than', '7d', '--keep-uri', 's3://models/m/v2', '--dry-run']);
    expect(old.out.map((e) => [e.action, e.reason])).toEqual([['keep', 'kept'], ['keep', 'recently used'], ['keep', 'in use']]);

    const r = await cli(['prune', '--older-than=2d']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.out.map((e) => [e.entry, e.action])).toEqual([[keyOf(2), 'removed'], [keyOf(3), 'keep'], [keyOf(1), 'keep']]);
    expect(existsSync(path.join(cache, keyOf(2)))).toBe(false);
    expect(existsSync(path.join(cache, keyOf(1), 'unet/model.onnx'))).toBe(true);
    expect((await fsp.readdir(cache)).filter((n) => n.startsWith('.evicting-') || n.startsWith(keyOf(2)))).toEqual([]);
    const left = await cli(['list']);
    expect(left.out.map((e) => e.entry)).toEqual([keyOf(3), keyOf(1)]);
  });

  // The case measured before the lock judged heartbeats by their movement: a prune on a node 40 s ahead of a filler took
  // over its lock and removed its entry. The fillers here beat as a fill does by default (every 2 s, stale after 30 s).
  it('prune keeps the entries of fillers whose clocks are 40 s and 10 min behind its own', async () => {
    const other = path.join(tmp, 'skewed');
    for (const v of [2, 3]) await resolveModel(`s3://models/m/v${v}`, { cfg: testConfig(s3.endpoint, other), log: silentLogger() });
    const fillers = [await skewedHolder('lock', path.join(other, `${keyOf(2)}.lock`), -40_000, 2_000), await skewedHolder('lock', path.join(other, `${keyOf(3)}.lock`), -600_000, 2_000)];
    try {
      const r = await cli(['prune'], { MODEL_CACHE_DIR: other });
      expect(r.code, r.stderr).toBe(0);
      expect(r.out.map((e) => [e.entry, e.action, e.reason]).sort()).toEqual([[keyOf(2), 'keep', 'in use'], [keyOf(3), 'keep', 'in use']]);
      expect(fillers.map(({ file }) => existsSync(file) && JSON.parse(readFileSync(file, 'utf8')).pid)).toEqual(fillers.map(({ child }) => child.pid));
    } finally {
      for (const { child } of fillers) child.kill('SIGKILL');
    }
  });

  // A server killed on another node left its lease (10 min old): prune watches it for up to a minute (two of its
  // heartbeats) before it removes the entry. Before, the first SIGTERM or Ctrl-C was ignored for that minute, and a
  // second ended the process in the middle of the removal, leaving the entry's `evict` lock behind.
  it.each([['SIGTERM', 143], ['SIGINT', 130]] as const)('prune stopped by %s while it watches a lease: exits %i at once, holds no lock, removes nothing', async (sig, status) => {
    const other = path.join(tmp, `stopped-${sig}`);
    await resolveModel('s3://models/m/v2', { cfg: testConfig(s3.endpoint, other), log: silentLogger() });
    const leases = path.join(other, '.leases', keyOf(2));
    await fsp.mkdir(leases, { recursive: true });
    const lease = path.join(leases, `pod-gone-7-${'d'.repeat(16)}.lease`);
    await fsp.writeFile(lease, JSON.stringify({ pid: 7, host: 'pod-gone', token: 'd'.repeat(16), since: '' }));
    const then = new Date(Date.now() - 10 * 60_000);
    await fsp.utimes(lease, then, then);
    let signalled = false;
    // SHUTDOWN_GRACE_S longer than the watch: the stop must not need it.
    const r = await cli(['prune'], { MODEL_CACHE_DIR: other, SHUTDOWN_GRACE_S: '120' }, (stderr, child) => {
      if (!signalled && stderr.includes('cache: watching the leases of 1 entry')) {
        signalled = true;
        child.kill(sig);
      }
    });
    expect(signalled).toBe(true);
    expect([r.code, r.stderr.trim().split('\n').at(-1)], r.stderr).toEqual([status, 'warmup: CANCELLED: stopped by signal']);
    // The watch was cut short: once over, it would have removed the entry.
    expect(readdirSync(other).filter((n) => n.includes('.lock'))).toEqual([]);
    expect(existsSync(path.join(other, keyOf(2), 'unet/model.onnx'))).toBe(true);
    expect(existsSync(lease)).toBe(true);
    expect(r.out).toEqual([]);
  });

  it('a removal killed between its rename and its delete: list shows what it left, prune deletes it', async () => {
    // What entries.ts removeEntry leaves when killed after renaming an entry aside: the renamed folder, whole or half deleted.
    const trash = path.join(cache, `.evicting-${keyOf(4)}-0badc0de`);
    await fsp.mkdir(path.join(trash, 'unet'), { recursive: true });
    await fsp.writeFile(path.join(trash, 'unet', 'model.onnx'), Buffer.alloc(300_000, 1));
    const list = await cli(['list']);
    expect(list.stderr).toMatch(/; 0\.3 MB left by an interrupted removal \(prune deletes it\)/);
    const dry = await cli(['prune', '--keep-uri', 's3://models/m/v3', '--dry-run']);
    expect(dry.stderr).toMatch(/would remove 0 of 2 entries, 0\.3 MB \(0\.3 MB of it left by an interrupted removal\) \(dry run\)/);
    expect(existsSync(trash)).toBe(true);
    const r = await cli(['prune', '--keep-uri', 's3://models/m/v3']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/removed 0 of 2 entries, 0\.3 MB \(0\.3 MB of it left by an interrupted removal\)/);
    expect(existsSync(trash)).toBe(false);
    expect((await cli(['list'])).out.map((e) => e.entry)).toEqual([keyOf(3), keyOf(1)]);
  });

  it('LoRA adapter sets of a server gone: list gives what only they hold, prune deletes them (freeing a removed entry\'s data they link); a live server\'s stay', async () => {
    // As runtime/workers.ts lays them out: a patched file of the set's own, and a hard link to the entry's UNet data.
    const sets = path.join(cache, '.lora-sets');
    const mk = async (name: string, v: number) => {
      const dir = path.join(sets, name, 'w0', '1', 'unet');
      await fsp.mkdir(dir, { recursive: true });
      await fsp.writeFile(path.join(dir, 'lora.onnx_data'), Buffer.alloc(300_000, 2));
      await fsp.link(path.join(cache, keyOf(v), 'unet', 'model.onnx'), path.join(dir, 'model.onnx_data'));
      return path.join(sets, name);
    };
    const dead = await mk('pod-a-7-dead', 3);
    const live = await mk('pod-b-7-live', 1);
    const script = `const { leaseEntry } = await import(${JSON.stringify(LEASE_JS)}); await leaseEntry(process.argv[1]); process.stdout.write('leased\\n'); setInterval(() => {}, 60_000);`;
    const server = spawn(process.execPath, ['--input-type=module', '-e', script, live], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((r) => server.stdout!.on('data', (c) => String(c).includes('leased') && r()));
      // The link to v3's data is not counted while v3 holds it too.
      expect((await cli(['list'])).stderr).toMatch(/^cache: 2 entries, 0\.\d MB, 1 in use; 0\.3 MB of LoRA adapter sets of servers gone \(prune deletes them\)\n$/);
      const dry = await cli(['prune', '--keep-uri', 's3://models/m/v3', '--dry-run']);
      expect(dry.stderr).toMatch(/would remove 0 of 2 entries, 0\.3 MB \(0\.3 MB of it LoRA adapter sets of servers gone\) \(dry run\)/);
      expect(existsSync(dead)).toBe(true);
      // What a server leaves for a STORAGE_URI with no objects: the lease folder of an entry that never came.
      const orphan = path.join(cache, '.leases', 's3-models-typo-0000');
      await fsp.mkdir(orphan, { recursive: true });
      await fsp.writeFile(path.join(orphan, 'last-used'), '');
      await cli(['prune', '--dry-run']);
      expect(existsSync(orphan)).toBe(true);
      // v3 removed first: the dead set's link is then the last name of its UNet data, and its bytes are freed with it,
      // counted once, with v3 (0.2 MB): it was 0.7 MB, the UNet data counted again with the set.
      const r = await cli(['prune']);
      expect(r.code, r.stderr).toBe(0);
      expect(r.out.map((e) => [e.entry, e.action])).toEqual([[keyOf(3), 'removed'], [keyOf(1), 'keep']]);
      expect(r.stderr).toMatch(/removed 1 of 2 entries, 0\.5 MB \(0\.3 MB of it LoRA adapter sets of servers gone\)/);
      expect(existsSync(dead)).toBe(false);
      expect(existsSync(path.join(cache, '.lora-sets', '.leases', 'pod-a-7-dead'))).toBe(false);
      expect(readdirSync(path.join(cache, '.leases'))).toEqual([keyOf(1)]);
      expect(existsSync(path.join(live, 'w0', '1', 'unet', 'model.onnx_data'))).toBe(true);
      expect((await cli(['list'])).stderr).toMatch(/^cache: 1 entry, 0\.\d MB, 1 in use\n$/);
    } finally {
      server.kill('SIGKILL');
    }
  });

  it("a lock's or lease's temp left by a process killed while it wrote one: prune deletes those no live process can own, and keeps the rest", async () => {
    const leases = path.join(cache, '.leases', keyOf(1));
    // What createHolderFile leaves when its process is killed between writing its temp and linking it: a real SIGKILL.
    const script = `const fs = await import('node:fs'); const path = await import('node:path'); const { holderInfo } = await import(${JSON.stringify(LOCK_JS)});
      const me = holderInfo(); const [lock, leases] = process.argv.slice(1);
      const lease = path.join(leases, me.host + '-' + me.pid + '-' + me.token + '.lease');
      for (const f of [lock, lease]) { const fd = fs.openSync(f + '.new.' + me.token, 'wx'); fs.writeSync(fd, JSON.stringify(me)); fs.fsyncSync(fd); fs.closeSync(fd); }
      process.kill(process.pid, 'SIGKILL');`;
    const killed = spawnSync(process.execPath, ['--input-type=module', '-e', script, path.join(cache, `${keyOf(1)}.lock`), leases], { stdio: 'inherit' });
    expect(killed.signal).toBe('SIGKILL');
    const dead = (await fsp.readdir(cache)).filter((n) => n.includes('.lock.new.')).map((n) => path.join(cache, n))
      .concat((await fsp.readdir(leases)).filter((n) => n.includes('.lease.new.')).map((n) => path.join(leases, n)));
    expect(dead).toHaveLength(2);
    // Young ones whose writer may still be at work: one naming a live process, one still empty, a takeover's aside.
    const live = path.join(cache, `${keyOf(1)}.lock.new.${'1'.repeat(16)}`);
    await fsp.writeFile(live, JSON.stringify({ pid: holder.pid, host: os.hostname(), ...(PID_NS ? { pidns: PID_NS } : {}), token: '1'.repeat(16), since: new Date().toISOString() }));
    const empty = path.join(leases, `h-1-${'2'.repeat(16)}.lease.new.${'2'.repeat(16)}`);
    await fsp.writeFile(empty, '');
    const aside = path.join(cache, `${keyOf(1)}.lock.stale.${'3'.repeat(16)}`);
    await fsp.writeFile(aside, JSON.stringify({ pid: 2 ** 22 + 12345, host: os.hostname(), token: 'old', since: '' }));
    const leased = (await fsp.readdir(leases)).filter((n) => n.endsWith('.lease'));

    await cli(['prune', '--dry-run']);
    for (const f of dead) expect(existsSync(f), f).toBe(true);
    const r = await cli(['prune']);
    expect(r.code, r.stderr).toBe(0);
    // Before: every one stayed, whatever its age; nothing else removed them.
    expect(dead.filter((f) => existsSync(f))).toEqual([]);
    expect([live, empty, aside].filter((f) => !existsSync(f))).toEqual([]);
    expect((await fsp.readdir(leases)).filter((n) => n.endsWith('.lease'))).toEqual(leased);
    // Once older than the rule of the files beside them (30 s for a lock, 3 minutes for a lease; 200 ms here), the rest go.
    await new Promise((res) => setTimeout(res, 300));
    expect(await emptyHolderTemps(cache, { lockStaleMs: 200, leaseStaleMs: 200 })).toBe(3);
    expect((await fsp.readdir(leases)).filter((n) => n.endsWith('.lease'))).toEqual(leased);
    expect((await cli(['list'])).out.map((e) => [e.entry, e.inUse])).toEqual([[keyOf(1), true]]);
  });

  it('--help anywhere (and `help`): the usage on stdout, exit 0, nothing touched; it was "unknown argument" and exit 2 after a command', () => {
    for (const args of [['--help'], ['-h'], ['help'], ['cache', '--help'], ['cache', 'prune', '--help'], ['cache', 'list', '-h'], ['push', '--help']]) {
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: { PATH: process.env.PATH ?? '', MODEL_CACHE_DIR: cache } });
      expect([r.status, r.stderr], args.join(' ')).toEqual([0, '']);
      expect(r.stdout, args.join(' ')).toMatch(/^usage: warmup {23}\(fills the cache from STORAGE_URI\)\n(.*\n)*\s+warmup cache prune \[--keep-uri/);
    }
  });

  it('bad arguments: exit 2 with one line that says what is accepted', async () => {
    for (const [args, msg] of [
      [['prune', '--older-than', 'week'], '--older-than takes a number with a unit (d, h, m or s), like 7d or 12h; got "week"'],
      [['prune', '--keep-uri', '/mnt/models'], '--keep-uri takes s3://bucket/prefix, got "/mnt/models"'],
      [['prune', '--force'], 'cache prune: unknown argument "--force"'],
      // Every one named: the first alone was.
      [['prune', '--force', 'now', '--dry-run'], 'cache prune: unknown arguments "--force", "now"'],
      [['list', 'a', 'b'], 'cache list takes no arguments, got "a", "b"'],
      [['tidy'], 'unknown cache command "tidy"'],
    ] as const) {
      const r = await cli([...args]);
      expect([r.code, r.stderr.split('\n')[0]]).toEqual([2, `warmup: ${msg}`]);
    }
  });

  it('names a variable that looks like one of ours mistyped, as the fill does, never its value: the cache it meant is not the one listed', async () => {
    const r = await cli(['list'], { model_cache_dir: path.join(tmp, 'elsewhere') });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr.split('\n')[0]).toBe('warmup: model_cache_dir is not a variable the runtime reads, so its value is not used: did you mean MODEL_CACHE_DIR?');
    expect(r.stderr).not.toContain('elsewhere');
  });
});
