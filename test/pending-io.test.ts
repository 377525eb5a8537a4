/**
 * A stop's cleanup (storage/pending-io.ts startCleanup), which the server's close and its stop before the runtime
 * exists share: steps bounded together, what the bound ran out on named, a step that failed taken as finished, then
 * the wait for the process's file calls still pending. A FIFO stands in for a file of the cache volume: opening it
 * blocks until a writer comes, late (a slow volume) or never (a volume that stopped answering).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync, promises as fsp } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { describePending, fsRequestsPending, pendingByVolume, pendingIo, serverVolumes, startCleanup, trackIo } from '../src/storage/pending-io.js';
import { tempDir, until } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const tmp = tempDir('dr-pending-io-');
stuckFsForTests();

afterAll(() => tmp.cleanup());

/** A FIFO at `name`, and a way to let go a reader blocked opening it (false when none was). */
function fifo(name: string): { file: string; answer(): boolean } {
  const file = path.join(tmp.dir, name);
  execFileSync('mkfifo', [file]);
  return {
    file,
    answer() {
      try {
        closeSync(openSync(file, constants.O_WRONLY | constants.O_NONBLOCK));
        return true;
      } catch {
        return false;
      }
    },
  };
}

describe('startCleanup', () => {
  it('a step that failed has finished: not named, its error handed on, and the stop goes on', async () => {
    const failed: Array<[string, unknown]> = [];
    const c = startCleanup({ failed: (step, err) => failed.push([step, err]) });
    const refused = new Error('EACCES: permission denied, open last-used');
    const thrown = new Error('thrown before any promise');
    expect(await c.step('the cache entry lease', () => Promise.reject(refused))).toBe(true);
    expect(await c.step('the model fetch', () => {
      throw thrown;
    })).toBe(true);
    expect(await c.step('the output uploads', async () => undefined)).toBe(true);
    expect(c.unfinished).toEqual([]);
    expect(failed).toEqual([['the cache entry lease', refused], ['the model fetch', thrown]]);
    expect(await c.unanswered()).toBe(0);
  });

  it('a step still running when the bound runs out is named; a later one with nothing to wait for still finishes', async () => {
    const c = startCleanup({ ms: 50 });
    expect(await c.step('the pipeline workers', () => new Promise(() => undefined))).toBe(false);
    expect(await c.step('the output uploads', async () => undefined)).toBe(true);
    expect(c.unfinished).toEqual(['the pipeline workers']);
  });

  it('a file call answered after the steps (a slow volume) is waited for; one never answered is counted once the bound is over', async () => {
    const slow = fifo('slow');
    const read = fsp.readFile(slow.file);
    await until(() => fsRequestsPending() > 0);
    const c = startCleanup();
    // Answered a second after the steps ended (here, none): longer than the half second a stop once gave such a call.
    setTimeout(() => void until(() => slow.answer()), 1_000);
    expect(await c.unanswered()).toBe(0);
    expect((await read).length).toBe(0);

    const stuck = fifo('stuck');
    const never = fsp.readFile(stuck.file);
    try {
      await until(() => fsRequestsPending() > 0);
      expect(await startCleanup({ ms: 200 }).unanswered()).toBe(1);
    } finally {
      // Let go, so that no pool thread of this process stays blocked.
      await until(() => stuck.answer());
      await never;
    }
  });

  // Node lists a close's request (CloseReq) until the close's callback returns, after the promise's reactions ran: a
  // stop whose last step ended with a close, past the bound (or with a step left: no wait then), counted it unanswered
  // and ended as a stuck one (143, not 0).
  it('a close already answered is not counted, though the bound is over', async () => {
    const c = startCleanup({ ms: 0 });
    const fh = await fsp.open(path.join(tmp.dir, 'lease'), 'w');
    await fh.write('x');
    await fh.close();
    expect(await c.unanswered()).toBe(0);
  });

  // A close flushes a file written on the volume (NFS sends its dirty pages then): on a volume that stopped answering
  // it waits for good in a pool thread, which process.exit() would join. Node lists it apart from other file calls.
  it.skipIf(stuckFsUnavailable())('a file handle\'s close the volume does not answer is counted', async () => {
    const backing = path.join(tmp.dir, 'close-backing');
    await fsp.mkdir(backing, { recursive: true });
    const fs = await mountStuckFs(backing, path.join(tmp.dir, 'close'));
    const fh = await fsp.open(path.join(fs.dir, 'written'), 'w');
    await fh.write('x');
    await fs.hang();
    const closed = fh.close();
    try {
      expect(await startCleanup({ ms: 300 }).unanswered()).toBe(1);
    } finally {
      fs.answer();
      await closed;
    }
    expect(await startCleanup({ ms: 5_000 }).unanswered()).toBe(0);
  });
});

describe('pendingByVolume', () => {
  it('names each call pending with the volume it is on: the cache (paths relative to it), the model\'s folder, a LORA_URI folder (inside the cache\'s or not), another', async () => {
    // Calls that stay pending until the test lets them go (no file is touched).
    const held: Array<() => void> = [];
    const pend = (op: string, file: string) => void trackIo(op, file, () => new Promise<void>((r) => held.push(r)));
    const cache = path.join(tmp.dir, 'cache');
    const loras = path.join(cache, 'loras');
    const t0 = performance.now();
    pend('access', '/mnt/models');
    pend('stat', path.join(cache, 'entry', 'loras', 'a.safetensors'));
    pend('stat', path.join(loras, 'b.safetensors'));
    pend('readdir', cache);
    pend('read', '/elsewhere/x');
    try {
      const volumes = serverVolumes({ cacheDir: cache, storageUri: 's3://models/sd', loraUri: `file://${loras}` });
      const age = (line: string) => line.replace(/still pending after \d+ s/g, 'still pending after N s');
      // Before, the line called every call the cache volume's: a look at /mnt/models, KServe's model folder, too.
      expect(pendingByVolume(volumes, t0 + 3_000).map(age)).toEqual([
        'the model volume (/mnt/models) did not answer: access /mnt/models still pending after N s',
        'the cache volume did not answer: stat entry/loras/a.safetensors still pending after N s; readdir . still pending after N s',
        `the LoRA volume (LORA_URI) did not answer: stat ${loras}/b.safetensors still pending after N s`,
        'a volume the server reads did not answer: read /elsewhere/x still pending after N s',
      ]);
      expect(describePending(volumes, t0 + 3_000).map(age)).toEqual([
        'access /mnt/models still pending after N s', 'stat entry/loras/a.safetensors still pending after N s', `stat ${loras}/b.safetensors still pending after N s`,
        'readdir . still pending after N s', 'read /elsewhere/x still pending after N s',
      ]);
      // A local STORAGE_URI is the model volume by that name; without MODEL_CACHE_DIR known yet (a stop before the
      // config), the cache's default folders are named whole.
      expect(pendingByVolume(serverVolumes({ storageUri: '/elsewhere' }), t0).map(age)).toEqual([
        'the model volume (/mnt/models) did not answer: access /mnt/models still pending after N s',
        `a volume the server reads did not answer: stat ${cache}/entry/loras/a.safetensors still pending after N s; stat ${loras}/b.safetensors still pending after N s; readdir ${cache} still pending after N s`,
        'the model volume (STORAGE_URI) did not answer: read /elsewhere/x still pending after N s',
      ]);
    } finally {
      for (const r of held) r();
      await until(() => pendingIo().length === 0, 5_000);
    }
  });
});
