import { execFileSync } from 'node:child_process';
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import { closeSync, constants, existsSync, openSync, promises as fsp, readdirSync, readFileSync, rmdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { silentLogger } from '../src/log.js';
import { RuntimeError } from '../src/errors.js';
import { cacheIoError, READ_ONLY_CACHE, resolveModel } from '../src/storage/fetch.js';
import { acquireLock, PID_NS } from '../src/storage/lock.js';
import { fsRequestsPending, pendingIo } from '../src/storage/pending-io.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, rejection, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';
import { tmpfsForTests } from './helpers/tmpfs.js';
import { until } from './helpers/server.js';
import { buildIfStale, skewedHolder } from './helpers/lease-child.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
const log = silentLogger();
const BIG = detBytes(3_000_000, 11);

beforeAll(async () => {
  buildIfStale(); // the skewed holders run the built lock module
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'storage-cache-'));
  ({ s3, proxy } = await startS3WithProxy());
  await s3.put('models', 'm/unet/model.onnx_data', BIG);
  await s3.put('models', 'm/model_index.json', '{}');
  await s3.put('models', 'deep/a/b/c/d/e/f.bin', detBytes(10_000, 12));
});

cleanUpS3(() => ({ s3, proxy, tmp }));

const cfgFor = (cache: string, extra: Record<string, string> = {}) => testConfig(proxy.endpoint, cache, { S3_PART_SIZE: '262144', S3_MAX_CONCURRENCY: '4', ...extra });

describe('local sources', () => {
  it('returns the directory, announces every file, and names a missing one', async () => {
    const dir = path.join(tmp, 'local');
    await fsp.mkdir(path.join(dir, 'unet'), { recursive: true });
    await fsp.writeFile(path.join(dir, 'unet/model.onnx'), 'abc');
    await fsp.writeFile(path.join(dir, 'model_index.json'), '{}');
    const ready: string[] = [];
    const r = await resolveModel(`file://${dir}`, { cfg: cfgFor(tmp), log, onFileReady: (rel) => ready.push(rel) });
    expect(r).toMatchObject({ dir, fromCache: false, bytes: 5, files: 2, source: 'local' });
    expect(ready).toEqual(['model_index.json', 'unet/model.onnx']);
    const err = await rejection(resolveModel(path.join(tmp, 'absent'), { cfg: cfgFor(tmp), log }));
    expect([err.code, err.message]).toEqual(['STORAGE_MISSING', 'the model folder STORAGE_URI names does not exist; check STORAGE_URI and the volume mount']);
    // A relative path, most often an S3 prefix written without s3://: said so (before, the same words as an absolute one).
    const relative = await rejection(resolveModel('models/sd15-onnx-absent', { cfg: cfgFor(tmp), log }));
    expect([relative.code, relative.message]).toEqual(['STORAGE_MISSING', "the model folder STORAGE_URI names does not exist (STORAGE_URI is a relative path, read from "
      + "the server's working folder; an S3 model is s3://bucket/prefix); check STORAGE_URI and the volume mount"]);
    // MODEL_INIT_MODE=async (a modelcar): the link missing at start is waited for, and a stop ends the wait; a folder
    // below the link that the image lacks is missing at once, once the link is there.
    const async = { ...cfgFor(tmp), modelInitAsync: true };
    const image = path.join(tmp, 'image-models');
    await fsp.mkdir(path.join(image, 'sd15', 'unet'), { recursive: true });
    await fsp.writeFile(path.join(image, 'sd15', 'unet', 'model.onnx'), 'abc');
    const link = path.join(tmp, 'mnt-models');
    setTimeout(() => void fsp.symlink(image, link), 300);
    const linked = { cfg: async, log, modelcarLink: link };
    expect(await resolveModel(path.join(link, 'sd15'), linked)).toMatchObject({ files: 1, source: 'local' });
    const lacking = await rejection(resolveModel(path.join(link, 'sd-15'), linked));
    expect([lacking.code, lacking.message]).toEqual(['STORAGE_MISSING', 'the model folder STORAGE_URI names does not exist; check STORAGE_URI and the volume mount']);
    const stop = new AbortController();
    setTimeout(() => stop.abort(), 200);
    const stopped = await rejection(resolveModel(path.join(tmp, 'never-linked'), { cfg: async, log, signal: stop.signal }));
    expect(stopped.name).toBe('AbortError');
    const tgz = path.join(tmp, 'sd15.tar.gz');
    await fsp.writeFile(tgz, 'not unpacked');
    const file = await rejection(resolveModel(tgz, { cfg: cfgFor(tmp), log }));
    expect([file.code, file.message]).toEqual(['STORAGE_MISSING', 'STORAGE_URI names a file, not a folder (an archive: unpack it, this runtime reads the exported folder itself); point it at the exported model folder']);
  });
});

describe('symbolic links in a cache entry', () => {
  it.each([
    ['a component folder', 'unet'],
    ['a weights file', 'unet/model.onnx_data'],
  ])('%s linked to a copy outside the cache is not read through its object key: the link goes, the object is fetched into the entry, the copy is left as it is', async (_, linked) => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'linked-'));
    const first = await resolveModel('s3://models/m', { cfg: cfgFor(cache), log });
    // What a user does on a PVC: the entry's folder or file moved to a shared place and linked back. The copy there
    // differs (same size), as a file outside the cache would.
    const shared = await fsp.mkdtemp(path.join(tmp, 'shared-'));
    const outside = path.join(shared, path.basename(linked));
    await fsp.rename(path.join(first.dir, linked), outside);
    await fsp.symlink(outside, path.join(first.dir, linked));
    const other = Buffer.alloc(BIG.length, 7);
    await fsp.writeFile(linked === 'unet' ? path.join(outside, 'model.onnx_data') : outside, other);
    const again = await resolveModel('s3://models/m', { cfg: cfgFor(cache), log });
    // Before: a cache hit, unet/model.onnx_data read from outside the cache.
    expect(again.fromCache).toBe(false);
    expect((await fsp.lstat(path.join(again.dir, linked))).isSymbolicLink()).toBe(false);
    // Buffer.equals: toEqual compares 3 MB element by element, for half a minute.
    expect((await fsp.readFile(path.join(again.dir, 'unet', 'model.onnx_data'))).equals(BIG)).toBe(true);
    expect((await fsp.readFile(linked === 'unet' ? path.join(outside, 'model.onnx_data') : outside)).equals(other)).toBe(true);
  });
});

describe('out of disk', () => {
  it('ENOSPC while writing → NO_SPACE, nothing that looks complete, partials freed', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'nospace-'));
    let written = 0;
    const err = await rejection(resolveModel('s3://models/m', {
      cfg: cfgFor(cache), log,
      io: {
        write: async (fh, bufs, len, pos) => {
          if ((written += len) > 1_000_000) throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
          return fh.writev(bufs, pos);
        },
      },
    }));
    expect(err.code).toBe('NO_SPACE');
    expect(err.message).toMatch(/no space left in the model cache .* enlarge the PVC/);
    const files = (await fsp.readdir(cache, { recursive: true })).map(String);
    expect(files.filter((f) => f.endsWith('.complete.json') || f.endsWith('.partial') || f.endsWith('.lock') || f.endsWith('model.onnx_data'))).toEqual([]);
  });

  const mnt = path.join(os.tmpdir(), `storage-tmpfs-${process.pid}`);
  // Where a tmpfs cannot be mounted (no CAP_SYS_ADMIN) the injected ENOSPC test above still runs.
  const mounted = tmpfsForTests(mnt, '1m');

  // Node's recursive mkdir reports a folder it could not make on a full or read-only volume as ENOENT (nodejs/node#47098).
  it.skipIf(!mounted)('a volume out of inodes while making folders: NO_SPACE, not "refused mkdir: ENOENT"; a read-only one says EROFS', async () => {
    for (const inodes of [5, 6, 7, 8]) {
      const full = `${mnt}-inodes`;
      execFileSync('mkdir', ['-p', full]);
      execFileSync('mount', ['-t', 'tmpfs', '-o', `size=8m,nr_inodes=${inodes}`, 'tmpfs', full]);
      try {
        const err = await rejection(resolveModel('s3://models/deep', { cfg: cfgFor(full), log }));
        expect([err.code, err.message], `nr_inodes=${inodes}`).toEqual(['NO_SPACE', 'no space left in the model cache (MODEL_CACHE_DIR) for a/b/c/d/e/f.bin; the cache holds no other entry; enlarge the PVC or remove entries not in use (warmup cache prune)']);
      } finally {
        execFileSync('umount', [full]);
      }
      rmdirSync(full);
    }
    const ro = `${mnt}-ro`;
    execFileSync('mkdir', ['-p', ro]);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', ro]);
    try {
      const err = await rejection(resolveModel('s3://models/deep', { cfg: cfgFor(path.join(ro, 'models')), log }));
      expect([err.code, err.message]).toEqual(['CACHE_IO', `cannot create the model cache directory (MODEL_CACHE_DIR): EROFS (${READ_ONLY_CACHE})`]);
    } finally {
      execFileSync('umount', [ro]);
      rmdirSync(ro);
    }
  });

  it.skipIf(!mounted)('a real 1 MiB tmpfs: refused up front, and a real ENOSPC mid-write', async () => {
    const early = await rejection(resolveModel('s3://models/m', { cfg: cfgFor(mnt), log }));
    expect([early.code, early.message]).toEqual(['NO_SPACE', expect.stringMatching(/need 3\.0 MB more, \d\.\d MB free/)]);
    // Skip the free-space check so the kernel's own ENOSPC is what stops the write.
    const late = await rejection(resolveModel('s3://models/m', { cfg: cfgFor(mnt), log, io: { freeBytes: async () => Number.MAX_SAFE_INTEGER } }));
    expect(late.code).toBe('NO_SPACE');
    const files = (await fsp.readdir(mnt, { recursive: true })).map(String);
    expect(files.filter((f) => f.endsWith('.complete.json') || f.endsWith('.partial') || f.endsWith('.lock'))).toEqual([]);
  });
});

describe('errors of the cache volume', () => {
  it('name the call, the code and the file inside the entry, never a local path', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'io-'));
    const entry = path.join(cache, 's3-models-m-0123456789abcdef');
    await fsp.mkdir(path.join(entry, 'unet'), { recursive: true });
    const long = 'x'.repeat(300);
    const tooLong = cacheIoError(await fsp.open(path.join(entry, 'unet', long), 'w').catch((e: unknown) => e), cache) as RuntimeError;
    expect([tooLong.code, tooLong.message]).toEqual(['STORAGE_KEY_TOO_LONG', `the model cache (MODEL_CACHE_DIR) refused open of "unet/${long}": ENAMETOOLONG`]);
    const notDir = cacheIoError(await fsp.mkdir(path.join(entry, 'unet', 'a'), { recursive: true }).then(() => fsp.writeFile(path.join(entry, 'f'), '')).then(() => fsp.mkdir(path.join(entry, 'f', 'g'))).catch((e: unknown) => e), cache) as RuntimeError;
    expect([notDir.code, notDir.message]).toEqual(['CACHE_IO', 'the model cache (MODEL_CACHE_DIR) refused mkdir of "f/g": ENOTDIR']);
  });

  it('an entry folder that is a file: a CACHE_IO failure that shows no local path', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'io-'));
    const first = await resolveModel('s3://models/m', { cfg: cfgFor(cache), log });
    await fsp.rm(first.dir, { recursive: true });
    await fsp.writeFile(first.dir, 'not a folder');
    const err = await rejection(resolveModel('s3://models/m', { cfg: cfgFor(cache), log }));
    expect(err.code).toBe('CACHE_IO');
    expect(err.message).toMatch(/^the model cache \(MODEL_CACHE_DIR\) refused \w+: E[A-Z]+$/);
    expect(err.message).not.toContain(cache);
  });

  it.skipIf(process.getuid?.() !== 0)('a folder the download cannot write in: CACHE_IO at once, not retried as an S3 failure', async () => {
    const cache = await fsp.mkdtemp(path.join(tmp, 'io-'));
    const first = await resolveModel('s3://models/m', { cfg: cfgFor(cache), log });
    const rel = (readdirSync(first.dir, { recursive: true }) as string[]).find((f) => f.includes('/') && !f.startsWith('.'))!;
    await fsp.rm(first.dir, { recursive: true });
    // The file's folder read-only (a volume mounted so, or one owned by another uid under a non-root pod): its
    // partial's open fails with EROFS, as EACCES or EIO would.
    const folder = path.join(first.dir, path.dirname(rel));
    await fsp.mkdir(folder, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', folder]);
    try {
      const err = await rejection(resolveModel('s3://models/m', { cfg: cfgFor(cache, { S3_MAX_ATTEMPTS: '2' }), log }));
      // Before: STORAGE_TRANSIENT "cannot read (2 attempts) s3://models/m/…: EROFS", after the retries' backoff.
      expect([err.code, err.message]).toEqual(['CACHE_IO', `the model cache (MODEL_CACHE_DIR) refused open of "${rel}.partial": EROFS (${READ_ONLY_CACHE})`]);
    } finally {
      execFileSync('umount', [folder]);
    }
  });
});

describe('a MODEL_CACHE_DIR that is not a folder', () => {
  it('is named as a file, whether it is one or lies under one', async () => {
    const file = path.join(await fsp.mkdtemp(path.join(tmp, 'file-')), 'cache');
    await fsp.writeFile(file, 'not a folder');
    for (const cache of [file, path.join(file, 'models')]) {
      const err = await rejection(resolveModel('s3://models/m', { cfg: cfgFor(cache), log }));
      expect([err.code, err.message]).toEqual(['CACHE_IO', 'cannot create the model cache directory (MODEL_CACHE_DIR): it, or a folder above it, is a file']);
    }
  });
});

describe('lock', () => {
  it('a second holder waits until the first releases', async () => {
    const file = path.join(tmp, 'a.lock');
    const first = await acquireLock(file, { pollMs: 20 });
    let second: Awaited<ReturnType<typeof acquireLock>>;
    // The second's poll runs on the test's clock (only setTimeout is faked, while it waits): its timer armed is the event
    // that it tried and found the lock held (a fixed 150 ms stood for it, too short on a busy machine to show anything).
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    try {
      const waiting = acquireLock(file, { pollMs: 20 }).then((l) => (second = l));
      while (vi.getTimerCount() === 0 && second === undefined) await new Promise((r) => setImmediate(r));
      expect(second).toBeUndefined();
      await first!.release();
      // Woken by the lock file's removal, or by its next poll.
      await vi.advanceTimersByTimeAsync(20);
      await waiting;
    } finally {
      vi.useRealTimers();
    }
    expect(second).toBeDefined();
    await second!.release();
    expect(existsSync(file)).toBe(false);
  });

  it('takes over a lock whose heartbeat is stale, and the old holder learns it lost the lock', async () => {
    const file = path.join(tmp, 'b.lock');
    const old = await acquireLock(file, { heartbeatMs: 60_000 });
    const past = new Date(Date.now() - 10_000);
    await fsp.utimes(file, past, past);
    const next = await acquireLock(file, { staleMs: 5_000, pollMs: 20 });
    expect(next).toBeDefined();
    await old!.release(); // must not delete the new holder's lock
    expect(existsSync(file)).toBe(true);
    await next!.release();
  });

  it('takes over at once from a dead process on this host, and stops waiting once satisfied', async () => {
    const file = path.join(tmp, 'c.lock');
    await fsp.writeFile(file, JSON.stringify({ pid: 2 ** 22 + 12345, host: os.hostname(), ...(PID_NS ? { pidns: PID_NS } : {}), token: 'x', since: '' }));
    let waits = 0;
    const l = await acquireLock(file, { staleMs: 600_000, pollMs: 20, onWait: () => waits++, satisfied: async () => waits > 0 });
    expect([l === undefined, waits]).toEqual([false, 0]); // taken without one wait
    let polls = 0;
    const none = await acquireLock(file, { pollMs: 20, satisfied: async () => ++polls > 2 });
    expect(none).toBeUndefined();
    await l!.release();
  });

  it('a dead pid of another pid namespace on this host (another container: hostNetwork pods, a shared pod hostname) is not judged here', async () => {
    // `unsaid`: a holder written before holders recorded their namespace (on Linux, where this process knows its own).
    const cases: Array<[string, object]> = [['other', { pidns: `${PID_NS ?? 'x'}-other` }], ...(PID_NS ? [['unsaid', {}] as [string, object]] : [])];
    for (const [n, ns] of cases) {
      const file = path.join(tmp, `ns-${n}.lock`);
      await fsp.writeFile(file, JSON.stringify({ pid: 2 ** 22 + 12345, host: os.hostname(), ...ns, token: 'x', since: '' }));
      let waits = 0;
      const l = await acquireLock(file, { staleMs: 600_000, pollMs: 20, onWait: () => waits++, satisfied: async () => waits > 1 });
      expect([n, l, waits]).toEqual([n, undefined, 2]); // waited for: its heartbeat is fresh
    }
  });

  it('an empty lock (its creator killed before writing it) is stale once a few seconds old, not after staleMs', async () => {
    const file = path.join(tmp, 'e.lock');
    await fsp.writeFile(file, '');
    const past = new Date(Date.now() - 10_000);
    await fsp.utimes(file, past, past);
    let waits = 0;
    const l = await acquireLock(file, { staleMs: 600_000, pollMs: 20, onWait: () => waits++, satisfied: async () => waits > 0 });
    expect([l === undefined, waits]).toEqual([false, 0]);
    await l!.release();
    // A fresh empty one may be a creator of an older release still writing: waited for, but only briefly.
    await fsp.writeFile(file, '');
    const t0 = Date.now();
    // staleMs is ten minutes, so a test that ends (within its timeout) took over after unreadableStaleMs.
    const m = await acquireLock(file, { staleMs: 600_000, pollMs: 20, unreadableStaleMs: 400, onWait: () => waits++ });
    expect(m).not.toBeUndefined();
    expect(waits).toBeGreaterThan(0);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(350); // a lower bound: the age it waits for, never flaky
    await m!.release();
  });

  it('a lock that does not say who made it is taken over at once', async () => {
    const file = path.join(tmp, 'f.lock');
    for (const body of ['{"pid":"x"}', '[]', 'null', '{"host":"h","token":"t"}']) {
      await fsp.writeFile(file, body);
      let waits = 0;
      const l = await acquireLock(file, { staleMs: 600_000, pollMs: 20, onWait: () => waits++, satisfied: async () => waits > 0 });
      expect(waits, body).toBe(0);
      expect(JSON.parse(await fsp.readFile(file, 'utf8'))).toMatchObject({ pid: process.pid, host: os.hostname() });
      await l!.release();
    }
  });

  it('the lock file never exists without its holder written in it', async () => {
    const file = path.join(tmp, 'g.lock');
    const seen: string[] = [];
    const watch = setInterval(() => {
      try {
        seen.push(readFileSync(file, 'utf8'));
      } catch {
        /* not there */
      }
    }, 0);
    try {
      for (let i = 0; i < 30; i++) await (await acquireLock(file, { pollMs: 5 }))!.release();
    } finally {
      clearInterval(watch);
    }
    expect(seen.filter((s) => !s.startsWith('{"pid":'))).toEqual([]);
    expect(readdirSync(tmp).filter((n) => n.startsWith('g.lock'))).toEqual([]);
  });

  // A fill on a node whose clock is behind stamps its heartbeats in this process's past: it keeps the lock all the same
  // (the measured case: a prune 40 s ahead of a filler took over its lock and removed its partial entry).
  it('a live holder whose clock is 40 s or 10 min behind keeps its lock: a second filler waits, an evictor does not take it', async () => {
    const staleMs = 3_000;
    const holders = await Promise.all([-40_000, -600_000].map((skew) => skewedHolder('lock', path.join(tmp, `skew${skew}.lock`), skew, staleMs / 15)));
    try {
      await Promise.all(holders.map(async ({ file }) => {
        // Waited on for twice staleMs of this process's time: a heartbeat that moves never goes stale.
        const t0 = performance.now();
        const second = await acquireLock(file, { staleMs, pollMs: 20, satisfied: async () => performance.now() - t0 > 2 * staleMs });
        const evictor = await acquireLock(file, { staleMs, wait: false, purpose: 'evict' });
        expect([second, evictor]).toEqual([undefined, undefined]);
      }));
      for (const { child, file } of holders) expect(JSON.parse(readFileSync(file, 'utf8')).pid).toBe(child.pid);
    } finally {
      for (const { child } of holders) child.kill('SIGKILL');
    }
  });

  it('a dead holder on another node whose clock was 20 min ahead: a waiter and an evictor take its lock once its heartbeat stood still', async () => {
    const staleMs = 3_000;
    for (const wait of [true, false]) {
      const file = path.join(tmp, `ahead-${wait}.lock`);
      await fsp.writeFile(file, JSON.stringify({ pid: 7, host: 'pod-b', token: 'ahead', since: '' }));
      const ahead = new Date(Date.now() + 20 * 60_000);
      await fsp.utimes(file, ahead, ahead);
      // Bounded: given up (undefined) after twice staleMs; the heartbeat looks fresh for 20 minutes on this clock.
      const t0 = performance.now();
      const l = await acquireLock(file, { staleMs, pollMs: 20, wait, purpose: wait ? undefined : 'evict', satisfied: async () => performance.now() - t0 > 2 * staleMs });
      expect(l, `wait: ${wait}`).toBeDefined();
      expect(JSON.parse(await fsp.readFile(file, 'utf8'))).toMatchObject({ pid: process.pid, host: os.hostname() });
      await l!.release();
    }
  });

  it('a heartbeat the volume leaves unanswered is not sent again: it holds one of libuv\'s pool threads, not all of them', async () => {
    const file = path.join(tmp, 'h.lock');
    const other = path.join(tmp, 'h.other');
    await fsp.writeFile(other, 'x');
    const l = await acquireLock(file, { heartbeatMs: 20 });
    const holder = await fsp.readFile(file);
    // The lock's file stops answering: a FIFO in its place blocks every open of it until a writer comes. Put there by a
    // rename, not a removal then a mkfifo: a beat whose open came between them (its read handed to the pool before the
    // removal, on a loaded machine) found no file, judged the lock taken over and beat no more.
    execFileSync('mkfifo', [`${file}.fifo`]);
    await fsp.rename(`${file}.fifo`, file);
    try {
      await until(() => fsRequestsPending() > 0);
      // Fifteen periods more: a beat each would hold the pool's four threads, and every other call of the process wait.
      await new Promise((r) => setTimeout(r, 300));
      expect(fsRequestsPending()).toBe(1);
      let timer: NodeJS.Timeout | undefined;
      const read = await Promise.race([fsp.readFile(other, 'utf8'), new Promise((r) => (timer = setTimeout(() => r('the pool is full'), 10_000)))]);
      clearTimeout(timer);
      expect(read).toBe('x');
      // And a stop can name it.
      expect(pendingIo().filter((p) => p.file === file).map((p) => p.op)).toEqual(['read']);
    } finally {
      // The volume answers again: the lock's file back in place, then the beat blocked on the FIFO let go (a writer
      // opens it), so no thread of this process stays blocked.
      await fsp.link(file, `${file}.fifo`);
      await fsp.writeFile(`${file}.back`, holder);
      await fsp.rename(`${file}.back`, file);
      const back = performance.now();
      // Until no beat from before is left (later ones read the file back in place): one whose open was on its way to
      // the FIFO (not there yet, on a loaded machine) finds no writer's one answer, and would wait for good.
      await until(() => {
        try {
          closeSync(openSync(`${file}.fifo`, constants.O_WRONLY | constants.O_NONBLOCK));
        } catch {
          // no beat blocked on it now
        }
        return !pendingIo().some((p) => p.since <= back);
      });
      await fsp.rm(`${file}.fifo`);
      await l!.release();
    }
  });

  it('aborts the holder when another process steals the lock', async () => {
    const file = path.join(tmp, 'd.lock');
    const l = await acquireLock(file, { heartbeatMs: 30 });
    await fsp.writeFile(file, JSON.stringify({ pid: 1, host: 'other', token: 'thief', since: '' }));
    // The abort is what its next heartbeat does: waited for, not given 150 ms (five 30 ms beats on a quiet machine only).
    await new Promise((r) => (l!.lost.aborted ? r(undefined) : l!.lost.addEventListener('abort', r, { once: true })));
    expect(l!.lost.aborted).toBe(true);
    await l!.release();
    expect(existsSync(file)).toBe(true);
  });
});

describe('object changed mid-download', () => {
  it('refetches the new version; never commits a mix', async () => {
    await s3.put('models', 'chg/w.bin', detBytes(1_500_000, 21));
    const cache = await fsp.mkdtemp(path.join(tmp, 'chg-'));
    const next = detBytes(1_400_000, 22);
    // The first ranged GET (parts are 256 KiB) stops sending after 200 kB, its socket left open; the new version is
    // stored then, and every GET meanwhile is held until it is: whatever the machine's load, the download spans the
    // change. s3rver ignores If-Match, so a later part's ETag (or the listing after the last byte) is what tells.
    const stalls0 = proxy.stats.stalls;
    proxy.faults = { stallAfterBytes: 200_000, stalls: 1 };
    const done = resolveModel('s3://models/chg', { cfg: cfgFor(cache, { S3_STALL_TIMEOUT_S: '2' }), log });
    await until(() => proxy.stats.stalls !== stalls0, 10_000, 5);
    expect(proxy.stats.stalls - stalls0).toBe(1);
    const stored = s3.put('models', 'chg/w.bin', next);
    proxy.faults = { hold: { keys: /chg\/w\.bin/, release: stored } };
    await stored;
    const r = await done;
    proxy.faults = {};
    expect((await fsp.readFile(path.join(r.dir, 'w.bin'))).equals(next)).toBe(true);
    const m = JSON.parse(await fsp.readFile(path.join(r.dir, '.complete.json'), 'utf8'));
    expect(m.files[0].size).toBe(1_400_000);
  });

  it('an object that shrank answers 416 to ranges past its new end: listed again, not "missing"', async () => {
    await s3.put('models', 'shrink/w.bin', detBytes(1_500_000, 23));
    const cache = await fsp.mkdtemp(path.join(tmp, 'shrink-'));
    const smaller = detBytes(300_000, 24);
    let release!: () => void;
    // The first two ranges (bytes 0-524287) go through; the rest wait until the object is replaced by a shorter one.
    proxy.faults = { hold: { keys: /shrink\/w\.bin/, range: (r) => Number(/^bytes=(\d+)/.exec(r ?? '')?.[1] ?? 0) >= 524_288, release: new Promise<void>((r) => (release = r)) } };
    const held = proxy.stats.held;
    const p = resolveModel('s3://models/shrink', { cfg: cfgFor(cache), log });
    await until(() => proxy.stats.held - held >= 4);
    await s3.put('models', 'shrink/w.bin', smaller);
    release();
    const r = await p;
    expect((await fsp.readFile(path.join(r.dir, 'w.bin'))).equals(smaller)).toBe(true);
    const m = JSON.parse(await fsp.readFile(path.join(r.dir, '.complete.json'), 'utf8'));
    expect(m.files).toEqual([expect.objectContaining({ path: 'w.bin', size: 300_000 })]);
  });

  it.each(['sdk', 'lite'])('an object deleted after the listing (a push --replace removing an old file) answers 404: listed again, committed without it (%s)', async (transport) => {
    await s3.put('models', `gone-${transport}/keep.bin`, detBytes(200_000, 25));
    await s3.put('models', `gone-${transport}/old.bin`, detBytes(1_500_000, 26));
    const cache = await fsp.mkdtemp(path.join(tmp, `gone-${transport}-`));
    let release!: () => void;
    // old.bin's first two ranges go through; the rest wait until it is deleted.
    proxy.faults = { hold: { keys: new RegExp(`gone-${transport}/old\\.bin`), range: (r) => Number(/^bytes=(\d+)/.exec(r ?? '')?.[1] ?? 0) >= 524_288, release: new Promise<void>((r) => (release = r)) } };
    const held = proxy.stats.held;
    const p = resolveModel(`s3://models/gone-${transport}`, { cfg: cfgFor(cache, { S3_TRANSPORT: transport }), log });
    await until(() => proxy.stats.held - held >= 2);
    await s3.client.send(new DeleteObjectCommand({ Bucket: 'models', Key: `gone-${transport}/old.bin` }));
    release();
    const r = await p;
    proxy.faults = {};
    expect(readdirSync(r.dir).filter((f) => !f.startsWith('.'))).toEqual(['keep.bin']);
    const m = JSON.parse(await fsp.readFile(path.join(r.dir, '.complete.json'), 'utf8'));
    expect(m.files).toEqual([expect.objectContaining({ path: 'keep.bin', size: 200_000 })]);
  });

  it('an object still listed that every GET answers 404 fails by its key as missing, after one listing more', async () => {
    await s3.put('models', 'ghost/w.bin', detBytes(100_000, 27));
    const cache = await fsp.mkdtemp(path.join(tmp, 'ghost-'));
    const lists = proxy.stats.lists;
    proxy.faults = { failGets: { count: 1_000, status: 404, code: 'NoSuchKey' } };
    const err = await rejection(resolveModel('s3://models/ghost', { cfg: cfgFor(cache), log }));
    proxy.faults = {};
    expect(err).toBeInstanceOf(RuntimeError);
    expect((err as RuntimeError).code).toBe('STORAGE_MISSING');
    expect((err as RuntimeError).message).toContain('s3://models/ghost/w.bin');
    expect(proxy.stats.lists - lists).toBe(2);
  });

  it('every object deleted during the download (the model removed from S3): STORAGE_MISSING as for an empty prefix, nothing committed', async () => {
    await s3.put('models', 'vanish/w.bin', detBytes(1_500_000, 29));
    const cache = await fsp.mkdtemp(path.join(tmp, 'vanish-'));
    let release!: () => void;
    // The first two ranges go through; the rest wait until the object is deleted.
    proxy.faults = { hold: { keys: /vanish\/w\.bin/, range: (r) => Number(/^bytes=(\d+)/.exec(r ?? '')?.[1] ?? 0) >= 524_288, release: new Promise<void>((r) => (release = r)) } };
    const held = proxy.stats.held;
    const p = rejection(resolveModel('s3://models/vanish', { cfg: cfgFor(cache), log }));
    await until(() => proxy.stats.held - held >= 2);
    await s3.client.send(new DeleteObjectCommand({ Bucket: 'models', Key: 'vanish/w.bin' }));
    release();
    const err = await p;
    proxy.faults = {};
    expect([err.code, err.message]).toEqual(['STORAGE_MISSING', 'no objects under s3://models/vanish/; check the bucket and prefix in STORAGE_URI']);
    const [entry] = readdirSync(cache).filter((n) => !n.endsWith('.lock'));
    expect(existsSync(path.join(cache, entry!, '.complete.json'))).toBe(false);
  });

  it('the listing taken again after an object changed is checked as the first one: a key leaving the cache is refused, nothing written outside it', async () => {
    await s3.put('models', 'relist/w.bin', detBytes(100_000, 28));
    const root = await fsp.mkdtemp(path.join(tmp, 'relist-'));
    const cache = path.join(root, 'cache');
    // The first GET is answered 412 (the object changed since the listing); the listing taken again then names a key
    // that leaves the entry's folder (a hostile store, or a proxy in front of it).
    let lists = 0;
    proxy.faults = {
      failGets: { count: 1, status: 412, code: 'PreconditionFailed' },
      rewriteList: (xml) => (++lists === 1 ? xml : xml.replace('<Key>relist/w.bin</Key>', '<Key>relist/../../escape.bin</Key>')),
    };
    const err = await rejection(resolveModel('s3://models/relist', { cfg: cfgFor(cache), log }));
    proxy.faults = {};
    expect(lists).toBe(2);
    expect(err.code).toBe('INVALID_INPUT');
    expect(err.message).toMatch(/\.\.\/\.\.\/escape\.bin.*leave the cache/);
    expect(readdirSync(root)).toEqual(['cache']);
  });
});
