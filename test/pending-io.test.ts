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
import { fsRequestsPending, startCleanup } from '../src/storage/pending-io.js';
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
