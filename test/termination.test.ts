/**
 * The container's termination message (src/termination.ts): the line a fatal exit ends with, in the file Kubernetes
 * shows in the pod status; the SIGBUS hint while mapped weights may be read; nothing after a graceful stop. The real
 * server and warm-up CLI, spawned with TERMINATION_MESSAGE_PATH naming a temporary file.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
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
