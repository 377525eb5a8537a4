/**
 * The gate of the calls requests make on the cache volume (storage/volume-gate.ts), with real calls in libuv's pool. A
 * FIFO stands in for a file of a volume that stopped answering: opening it blocks a pool thread until a writer comes
 * (late: the volume answers again; never: it does not).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync, promises as fsp } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { isRuntimeError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { fsRequestsPending, pendingIo, serverVolumes } from '../src/storage/pending-io.js';
import { createVolumeGate } from '../src/storage/volume-gate.js';
import { tempDir, until } from './helpers/server.js';

const tmp = tempDir('dr-volume-gate-');
const fifos: string[] = [];

/**
 * Lets go a reader blocked opening the FIFO: false when none is there (yet: a call handed to the pool may not have
 * reached its open on a busy machine).
 */
const answer = (file: string): boolean => {
  try {
    closeSync(openSync(file, constants.O_WRONLY | constants.O_NONBLOCK));
    return true;
  } catch {
    return false; // no reader left
  }
};

/** Answers until a reader was there to take it. */
const release = (file: string) => until(() => answer(file), 5_000);

afterEach(async () => {
  // Every reader still blocked on a FIFO of the test is let go, so that no pool thread stays held; and its call is over
  // (recorded no more), or the next test sees it in pendingIo(): the count of requests leaves out a file handle's close,
  // which a loaded machine's pool may not have run yet.
  const left = fifos.splice(0);
  await until(() => {
    for (const f of left) answer(f);
    return fsRequestsPending() === 0 && pendingIo().length === 0;
  }, 5_000);
});
afterAll(() => tmp.cleanup());

function fifo(name: string): string {
  const file = path.join(tmp.dir, name);
  execFileSync('mkfifo', [file]);
  fifos.push(file);
  return file;
}

function gate(o: { slots?: number; waitMs: number }) {
  const lines: Array<Record<string, unknown>> = [];
  const log = createLogger('info', 'gate-test', { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
  return { g: createVolumeGate({ volumes: serverVolumes({ cacheDir: tmp.dir }), log, ...o }), lines };
}

/** What a call through the gate ended as: its value, or its error's code and message. */
const outcome = (p: Promise<unknown>) => p.then((v) => ({ value: v }), (e: unknown) => (isRuntimeError(e) ? { code: e.code, message: e.message, retryAfter: e.retryAfter } : { error: e }));

describe('createVolumeGate', () => {
  it('a call that does not answer holds its slot: it and the calls behind it are answered CACHE_STUCK, and the pool keeps one thread held', async () => {
    const stuck = fifo('stuck');
    const { g, lines } = gate({ waitMs: 200 });
    const first = outcome(g.run('readFile', stuck, () => fsp.readFile(stuck)));
    const behind = outcome(g.run('stat', path.join(tmp.dir, 'other'), () => fsp.stat(tmp.dir)));
    const message = /^the cache volume \(MODEL_CACHE_DIR\) is not answering: readFile stuck still pending after \d+ s; check the volume's server .* retry later$/;
    expect(await first).toEqual({ code: 'CACHE_STUCK', message: expect.stringMatching(message), retryAfter: 10 });
    expect(await behind).toEqual({ code: 'CACHE_STUCK', message: expect.stringMatching(message), retryAfter: 10 });
    // Once it is past the wait, a later call is answered at once, without a call of its own.
    const later = await outcome(g.run('stat', tmp.dir, () => fsp.stat(tmp.dir)));
    expect(later).toMatchObject({ code: 'CACHE_STUCK' });
    expect(pendingIo().map((p) => [p.op, p.file])).toEqual([['readFile', stuck]]);
    expect(fsRequestsPending()).toBe(1);
    expect(lines.filter((l) => l.level === 'warn').map((l) => l.msg)).toEqual([expect.stringMatching(/^the cache volume is not answering: readFile stuck still pending after \d+ s; /)]);
    // The volume answers again: the slot is free, the next call runs, and the log says so.
    await release(stuck);
    await until(() => pendingIo().length === 0, 5_000);
    expect(await outcome(g.run('stat', tmp.dir, () => fsp.stat(tmp.dir).then((s) => s.isDirectory())))).toEqual({ value: true });
    expect(lines.filter((l) => l.level === 'info').map((l) => l.msg)).toEqual(['the volume answers again']);
  });

  it('a file outside the cache is named whole, with the volume it is on: a local LORA_URI\'s or STORAGE_URI\'s, or another', async () => {
    const stuck = fifo('stuck-outside');
    const answer = async (volumes: Parameters<typeof serverVolumes>[0]) => {
      const g = createVolumeGate({ volumes: serverVolumes(volumes), log: createLogger('silent'), waitMs: 100 });
      const r = await outcome(g.run('readFile', stuck, () => fsp.readFile(stuck)));
      // The FIFO answers: the call is over before the next gate makes its own.
      await release(stuck);
      await until(() => pendingIo().length === 0, 5_000);
      return r;
    };
    const cacheDir = path.join(tmp.dir, 'cache');
    const named = (volume: string) => ({ code: 'CACHE_STUCK', message: expect.stringMatching(new RegExp(`^${volume} is not answering: readFile ${stuck} still pending after \\d+ s; `)) });
    expect(await answer({ cacheDir })).toMatchObject(named('a volume the server reads'));
    // Before, any volume but the cache was "a volume the server reads".
    expect(await answer({ cacheDir, loraUri: tmp.dir })).toMatchObject(named('the LoRA volume \\(LORA_URI\\)'));
    expect(await answer({ cacheDir, storageUri: `file://${tmp.dir}` })).toMatchObject(named('the model volume \\(STORAGE_URI\\)'));
  });

  it('a call that returned while this process was held past the wait is answered, not CACHE_STUCK (its completion is read after the timers)', async () => {
    const { g, lines } = gate({ waitMs: 50 });
    let returned = false;
    let controlSaw: boolean | undefined;
    // From the check phase: the stat is done in the pool at once, the hold ends, and the next turn runs its timers first.
    const p = await new Promise<Promise<unknown>>((resolve) => setImmediate(() => {
      const r = outcome(g.run('stat', tmp.dir, () => fsp.stat(tmp.dir).then((st) => ((returned = true), st.isDirectory()))));
      setTimeout(() => (controlSaw = returned), 50);
      const end = performance.now() + 300;
      while (performance.now() < end);
      resolve(r);
    }));
    expect(await p).toEqual({ value: true });
    // The premise: a plain timer of the same wait fired before the call's return was read.
    expect(controlSaw).toBe(false);
    expect(lines.filter((l) => l.level === 'warn')).toEqual([]);
  });

  it('a call that answers within the wait hands its slot to the next, in order; never more calls at once than the slots', async () => {
    const slow = fifo('slow');
    const { g } = gate({ slots: 2, waitMs: 10_000 });
    let most = 0;
    const order: string[] = [];
    const call = (name: string, work: () => Promise<unknown>) => g.run('read', name, async () => {
      most = Math.max(most, pendingIo().length);
      await work();
      order.push(name);
      return name;
    });
    const calls = [call('slow', () => fsp.readFile(slow)), ...['a', 'b', 'c', 'd'].map((n) => call(n, () => fsp.stat(tmp.dir)))];
    // The four go one after another through the slot the FIFO's read leaves.
    await until(() => order.length === 4, 5_000);
    expect(pendingIo().map((p) => p.file)).toEqual(['slow']);
    await release(slow);
    expect(await Promise.all(calls)).toEqual(['slow', 'a', 'b', 'c', 'd']);
    expect(order).toEqual(['a', 'b', 'c', 'd', 'slow']);
    expect(most).toBe(2);
  });

  it('a caller whose request left is answered CANCELLED, waiting in the queue or on its call; the call goes on in its slot', async () => {
    const stuck = fifo('stuck-left');
    const { g } = gate({ waitMs: 10_000 });
    const ownLeaves = new AbortController();
    const queuedLeaves = new AbortController();
    const own = outcome(g.run('readFile', stuck, () => fsp.readFile(stuck), ownLeaves.signal));
    const queued = outcome(g.run('stat', tmp.dir, () => fsp.stat(tmp.dir), queuedLeaves.signal));
    queuedLeaves.abort();
    ownLeaves.abort();
    expect(await queued).toEqual({ code: 'CANCELLED', message: 'the client left', retryAfter: undefined });
    expect(await own).toEqual({ code: 'CANCELLED', message: 'the client left', retryAfter: undefined });
    expect(pendingIo().map((p) => p.op)).toEqual(['readFile']);
    // Answered, the call frees its slot: the next caller gets it (the one that left does not hold it).
    await release(stuck);
    expect(await outcome(g.run('stat', tmp.dir, () => fsp.stat(tmp.dir).then(() => 'ok')))).toEqual({ value: 'ok' });
  });
});
