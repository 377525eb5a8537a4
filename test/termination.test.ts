/**
 * The container's termination message (src/termination.ts): the line a fatal exit ends with, in the file Kubernetes
 * shows in the pod status; the SIGBUS hint while mapped weights may be read; nothing after a graceful stop. The real
 * server and warm-up CLI, spawned with TERMINATION_MESSAGE_PATH naming a temporary file.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { buildDemoModel } from '../src/demo/index.js';
import { fitTerminationMessage, TERMINATION_MESSAGE_LIMIT, terminationPath } from '../src/termination.js';
import { ENTRY, ROOT, sharedCacheDir, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const WARMUP = path.join(ROOT, 'dist', 'warmup', 'main.js');
const scratch = tempDir('dr-termination-');
afterAll(() => scratch.cleanup());
let n = 0;
/** A path for one test's message file (not made). */
const messageFile = () => path.join(scratch.dir, `message-${++n}`);
const run = (entry: string, env: Record<string, string>, args: string[] = []) =>
  spawnSync(process.execPath, [entry, ...args], { encoding: 'utf8', timeout: 60_000, env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env } });

describe('the message text', () => {
  it('fits in 4096 bytes of UTF-8, cut at a character boundary and marked as cut', () => {
    expect(fitTerminationMessage('short')).toBe('short');
    const exact = 'x'.repeat(TERMINATION_MESSAGE_LIMIT);
    expect(fitTerminationMessage(exact)).toBe(exact);
    for (const unit of ['é', '一', '🙂', 'ab']) {
      const long = `a${unit.repeat(3000)}`;
      const fit = fitTerminationMessage(long);
      expect(Buffer.byteLength(fit)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
      expect(Buffer.byteLength(fit)).toBeGreaterThan(TERMINATION_MESSAGE_LIMIT - 8);
      expect(fit).toMatch(/ …\(cut\)$/);
      expect(long.startsWith(fit.replace(/ …\(cut\)$/, ''))).toBe(true);
      expect(fit).not.toContain('\ufffd');
    }
  });

  it('goes to TERMINATION_MESSAGE_PATH where set, else to the kubelet\'s file only where it exists', () => {
    const missing = path.join(scratch.dir, 'no-termination-log');
    expect(terminationPath({ TERMINATION_MESSAGE_PATH: '/x/y' }, missing)).toBe('/x/y');
    expect(terminationPath({}, missing)).toBeUndefined();
    expect(terminationPath({ TERMINATION_MESSAGE_PATH: ' ' }, missing)).toBeUndefined();
    const present = path.join(scratch.dir, 'termination-log');
    writeFileSync(present, '');
    expect(terminationPath({}, present)).toBe(present);
  });
});

describe('the server', () => {
  const live: ServerHandle[] = [];
  afterEach(async () => {
    for (const s of live.splice(0)) await s.stop('SIGKILL');
  });

  it('a bad configuration (exit 2) leaves its stderr line in the message file', () => {
    const file = messageFile();
    const r = run(ENTRY, { TERMINATION_MESSAGE_PATH: file, PORT: 'abc', MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(2);
    // Before: no file (nothing was written there).
    expect(existsSync(file)).toBe(true);
    expect(readFileSync(file, 'utf8')).toBe(r.stderr.trim());
    expect(readFileSync(file, 'utf8')).toMatch(/^diffusers-runtime: invalid configuration: PORT must be /);
  });

  it('a line longer than 4096 bytes is cut to fit', () => {
    const file = messageFile();
    const r = run(ENTRY, { TERMINATION_MESSAGE_PATH: file }, Array.from({ length: 600 }, (_, i) => `--flag-${i}=é`));
    expect(r.status).toBe(2);
    const msg = readFileSync(file, 'utf8');
    expect(Buffer.byteLength(msg)).toBeLessThanOrEqual(TERMINATION_MESSAGE_LIMIT);
    expect(msg).toMatch(/ …\(cut\)$/);
    expect(r.stderr.startsWith(msg.replace(/ …\(cut\)$/, ''))).toBe(true);
  });

  it('serving a model from the cache, the message is the SIGBUS hint naming the cache entry; a graceful stop empties it', async () => {
    const file = messageFile();
    const srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: undefined, MODEL_CACHE_DIR: sharedCacheDir(), EXECUTION_PROVIDER: 'cpu' }, { ready: true });
    live.push(srv);
    // Before: no file.
    const hint = readFileSync(file, 'utf8');
    expect(hint).toMatch(/^if this container ended with exit code 135 \(SIGBUS\): a read of the model weights mapped from the cache entry \S+ in MODEL_CACHE_DIR .*I\/O error/);
    expect(await srv.stop('SIGTERM')).toEqual({ code: 0, signal: null });
    // Before: the hint stayed after the graceful stop (exit 0).
    expect(readFileSync(file, 'utf8')).toBe('');
  }, 180_000);

  it('the boot failing with EXIT_ON_BOOT_FAILURE (exit 1) leaves its reason', async () => {
    const file = messageFile();
    const srv = await startServer({ TERMINATION_MESSAGE_PATH: file, STORAGE_URI: path.join(scratch.dir, 'no-such-model'), EXIT_ON_BOOT_FAILURE: 'true', EXECUTION_PROVIDER: 'cpu' });
    live.push(srv);
    await until(() => srv.proc.exitCode !== null, 60_000);
    expect(srv.proc.exitCode).toBe(1);
    expect(readFileSync(file, 'utf8')).toMatch(/^diffusers-runtime: the boot failed \(EXIT_ON_BOOT_FAILURE\): STORAGE_MISSING: /);
  }, 90_000);
});

describe('the warm-up Job', () => {
  it('a bad configuration (exit 2) leaves its stderr line in the message file', () => {
    const file = messageFile();
    const r = run(WARMUP, { TERMINATION_MESSAGE_PATH: file, MAX_STEPS: 'x', MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(2);
    expect(readFileSync(file, 'utf8')).toBe(r.stderr.trim());
    expect(readFileSync(file, 'utf8')).toMatch(/^warmup: CONFIG: MAX_STEPS must be /);
  });

  it('a failed run (exit 1) leaves its reason', () => {
    const file = messageFile();
    const r = run(WARMUP, { TERMINATION_MESSAGE_PATH: file, STORAGE_URI: path.join(scratch.dir, 'no-such-model'), MODEL_CACHE_DIR: scratch.dir });
    expect(r.status).toBe(1);
    const last = r.stderr.trim().split('\n').at(-1)!;
    expect(readFileSync(file, 'utf8')).toBe(last);
    expect(last).toMatch(/^warmup: STORAGE_MISSING: /);
  });
});

describe('weights the volume fails to read while mapped', () => {
  stuckFsForTests();

  it.skipIf(stuckFsUnavailable())('end the process by SIGBUS (exit 135 in a container), and the message file holds the hint', async () => {
    const backing = tempDir('dr-termination-sigbus-');
    const mnt = `${backing.dir}-mnt`;
    try {
      await buildDemoModel(path.join(backing.dir, 'model'), { externalData: true });
      const fs = await mountStuckFs(backing.dir, mnt, { eio: 'read:model.onnx_data', eioTimes: 1_000_000 });
      const file = messageFile();
      const proc = spawn(process.execPath, [ENTRY], { stdio: 'ignore', env: { ...process.env, TERMINATION_MESSAGE_PATH: file, PORT: '0', HOST: '127.0.0.1', STORAGE_URI: path.join(fs.dir, 'model'), MODEL_CACHE_DIR: path.join(backing.dir, 'cache'), EXECUTION_PROVIDER: 'cpu', BOOT_RETRY_MAX_S: '0', EXIT_ON_BOOT_FAILURE: 'true' } });
      // An EIO that ORT met in a read() instead would fail the boot: exit 1, not a wait for good.
      const kill = setTimeout(() => proc.kill('SIGKILL'), 90_000);
      const ended = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
      clearTimeout(kill);
      expect(ended).toEqual({ code: null, signal: 'SIGBUS' });
      expect(readFileSync(file, 'utf8')).toBe(`if this container ended with exit code 135 (SIGBUS): a read of the model weights mapped from ${path.join(fs.dir, 'model')} failed, the volume returned an I/O error; check the volume's health (NFS server, PVC, disk)`);
    } finally {
      backing.cleanup();
    }
  }, 120_000);
});

/** Whether this machine lets the test mount over /mnt in a mount namespace of the server's own (as config.test.ts). */
const canMountOverMnt = process.platform === 'linux'
  && spawnSync('unshare', ['-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'], { stdio: 'ignore', timeout: 5_000 }).status === 0;

describe('a second signal while the server is still starting', () => {
  stuckFsForTests();

  // MODEL_CACHE_DIR unset: the look at /mnt/cache before the listen, on a volume that does not answer, holds the start
  // before the runtime exists, and the stop waits for that look.
  it.skipIf(stuckFsUnavailable() || !canMountOverMnt)('leaves a message naming what the stop still waits for, not a drain; exit 1 once the volume answers', async () => {
    const backing = tempDir('dr-termination-starting-');
    try {
      const fs = await mountStuckFs(backing.dir, `${backing.dir}-mnt`);
      await fs.hang();
      const file = messageFile();
      const proc = spawn('unshare', ['-r', '--mount', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt && mkdir /mnt/cache && mount --bind "$0" /mnt/cache && exec "$@"', fs.dir, process.execPath, ENTRY], {
        stdio: ['ignore', 'ignore', 'pipe'],
        env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', TERMINATION_MESSAGE_PATH: file, PORT: '0', HOST: '127.0.0.1' },
      });
      let stderr = '';
      proc.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
      const kill = setTimeout(() => proc.kill('SIGKILL'), 60_000);
      const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
      // Held by the look (a thread of node's waiting for the FUSE daemon's answer): its signal handlers are in place.
      const waitsOnFuse = () => readdirSync(`/proc/${proc.pid}/task`).some((t) => {
        try {
          return readFileSync(`/proc/${proc.pid}/task/${t}/wchan`, 'utf8') === 'request_wait_answer';
        } catch {
          return false; // the thread ended
        }
      });
      await until(() => proc.exitCode === null && waitsOnFuse(), 30_000, 50);
      // A signal within a second of the one counted before is the same one: signalled until the second is taken.
      const message = () => (existsSync(file) ? readFileSync(file, 'utf8') : '');
      for (let i = 0; i < 10 && !/second signal/.test(message()); i++) {
        proc.kill('SIGTERM');
        await new Promise((r) => setTimeout(r, 1_200));
      }
      const line = 'diffusers-runtime: second signal (SIGTERM) while the server was still starting: no request or generation to stop; '
        + 'the stop still waits up to 15 s for the file system calls still pending (a volume slow to answer), then exits (1 where they finished); a third signal ends it at once';
      // Before: 'second signal (SIGTERM): the drain was ended, generations in flight stopped at their next step (exit 1)',
      // though there was no drain, and nothing on stderr.
      expect(message()).toBe(line);
      expect(stderr).toContain(`${line}\n`);
      fs.answer();
      expect(await ended).toEqual({ code: 1, signal: null });
      clearTimeout(kill);
      expect(message()).toBe(line);
    } finally {
      backing.cleanup();
    }
  }, 90_000);
});
