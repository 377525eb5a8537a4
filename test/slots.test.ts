/** The bounded FIFO of holders (src/slots.ts) that the adapters' writes, the volume gate and the decoding threads share. */
import { setImmediate as turn } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { Slots } from '../src/slots.js';

/** Who has a place so far, in the order they got one. */
function holders(s: Slots, names: string[], signals: Partial<Record<string, AbortSignal>> = {}) {
  const got: string[] = [];
  const left: string[] = [];
  for (const n of names) s.acquire(signals[n]).then(() => got.push(n), () => left.push(n));
  return { got, left };
}

describe('Slots', () => {
  it('gives places at once up to its size, then in order of arrival, one a release', async () => {
    const s = new Slots(2);
    const { got } = holders(s, ['a', 'b', 'c', 'd', 'e']);
    await turn();
    expect([got, s.held]).toEqual([['a', 'b'], 2]);
    s.release();
    await turn();
    expect([got, s.held]).toEqual([['a', 'b', 'c'], 2]);
    s.release();
    s.release();
    await turn();
    expect(got).toEqual(['a', 'b', 'c', 'd', 'e']);
    // With nobody waiting, a release frees a place.
    s.release();
    expect(s.held).toBe(1);
  });

  it('hands a released place to the waiter, not to a newcomer', async () => {
    const s = new Slots(1);
    expect(s.tryAcquire()).toBe(true);
    const { got } = holders(s, ['waiter']);
    s.release();
    expect(s.tryAcquire()).toBe(false);
    await turn();
    expect([got, s.held]).toEqual([['waiter'], 1]);
  });

  it('a waiter that gives up leaves the queue holding nothing; the next in line still gets the next place', async () => {
    const s = new Slots(1);
    const quit = new AbortController();
    const { got, left } = holders(s, ['a', 'b', 'c'], { b: quit.signal });
    await turn();
    quit.abort(new Error('gone'));
    await turn();
    expect([got, left, s.held]).toEqual([['a'], ['b'], 1]);
    await expect(s.acquire(quit.signal)).rejects.toThrow('gone');
    s.release();
    await turn();
    expect([got, s.held]).toEqual([['a', 'c'], 1]);
    s.release();
    expect(s.held).toBe(0);
  });

  it('an abort once the place is given changes nothing', async () => {
    const s = new Slots(1);
    const quit = new AbortController();
    await s.acquire(quit.signal);
    quit.abort();
    expect(s.held).toBe(1);
    s.release();
    expect(s.held).toBe(0);
  });

  it('run holds a place for the call, and gives it back when the call throws', async () => {
    const s = new Slots(1);
    const order: string[] = [];
    const first = s.run(async () => {
      order.push('first');
      await turn();
      throw new Error('failed');
    });
    const second = s.run(async () => {
      order.push('second');
      return 2;
    });
    await expect(first).rejects.toThrow('failed');
    await expect(second).resolves.toBe(2);
    expect([order, s.held]).toEqual([['first', 'second'], 0]);
  });

  it('a waiter that asks to go ahead gets the next place before those queued earlier, in order among such; one that gives up leaves', async () => {
    // The LoRA fetches' lock heartbeats and releases (fetch.ts, lockBound) go ahead of their queued writes: behind them a
    // heartbeat waited past the lock's staleness on a slow volume.
    const s = new Slots(1);
    const order: string[] = [];
    const go = (n: string, o: { ahead?: boolean; signal?: AbortSignal } = {}) =>
      void s.acquire(o.signal, { ahead: o.ahead }).then(() => order.push(n), () => order.push(`${n} left`));
    expect(s.tryAcquire()).toBe(true);
    const quit = new AbortController();
    go('write 1');
    go('write 2');
    go('beat', { ahead: true });
    go('gone', { ahead: true, signal: quit.signal });
    go('release', { ahead: true });
    go('write 3');
    await turn();
    quit.abort(new Error('gone'));
    for (let i = 0; i < 5; i++) {
      s.release();
      await turn();
    }
    expect([order, s.held]).toEqual([['gone left', 'beat', 'release', 'write 1', 'write 2', 'write 3'], 1]);
    // run takes it too.
    const ran: string[] = [];
    const late = s.run(async () => void ran.push('write 4'));
    const beat = s.run(async () => void ran.push('beat'), { ahead: true });
    s.release();
    await Promise.all([late, beat]);
    expect([ran, s.held]).toEqual([['beat', 'write 4'], 0]);
  });

  it('takes no bound (Infinity) and refuses a size below 1', () => {
    const s = new Slots(Infinity);
    for (let i = 0; i < 100; i++) expect(s.tryAcquire()).toBe(true);
    expect(() => new Slots(0)).toThrow('size must be 1 or more, got 0');
    expect(() => new Slots(NaN)).toThrow(TypeError);
  });
});
