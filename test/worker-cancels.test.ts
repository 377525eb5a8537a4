/**
 * A pipeline worker remembers the generations it was told to stop only while it holds them. The engine sends `cancel`
 * for a batch it still holds, which may be one whose result is already on its way back (the client left in that
 * window): the long-serving soak (scripts/bench-soak.ts) saw the worker's set of cancelled ids grow by one for about
 * every 250 generations of mixed traffic and never shrink.
 */
import { describe, expect, it } from 'vitest';
import { rng } from './helpers/fault-link.js';
import { Cancels } from '../src/pipeline/cancels.js';

describe('Cancels', () => {
  it('stops a generation it holds, queued or running, and forgets it when it ends', () => {
    const c = new Cancels();
    c.begin(1);
    c.begin(2);
    c.cancel(2);
    expect([c.has(1), c.has(2)]).toEqual([false, true]);
    c.end(2);
    c.end(1);
    expect(c.has(2)).toBe(false);
    expect(c.size).toBe(0);
  });

  it('keeps nothing of a cancel that comes after the generation ended', () => {
    const c = new Cancels();
    c.begin(7);
    c.end(7);
    c.cancel(7);
    expect(c.has(7)).toBe(false);
    expect(c.size).toBe(0);
  });

  it('goes on with a generation resumed before its next step (a request joined it after its cancel); a resume after its end keeps nothing', () => {
    const c = new Cancels();
    c.begin(4);
    c.cancel(4);
    c.resume(4);
    expect(c.has(4)).toBe(false);
    c.cancel(4);
    expect(c.has(4)).toBe(true);
    c.end(4);
    c.resume(4);
    expect([c.has(4), c.size]).toEqual([false, 0]);
  });

  it('renders previews of a generation it holds unless told nobody wants them; forgets that when it ends, and keeps nothing of a word after its end', () => {
    const c = new Cancels();
    c.begin(5);
    expect(c.previewing(5)).toBe(true);
    c.previews(5, false);
    expect(c.previewing(5)).toBe(false);
    c.previews(5, true);
    expect(c.previewing(5)).toBe(true);
    c.previews(5, false);
    c.end(5);
    expect(c.size).toBe(0);
    c.previews(5, false);
    expect(c.size).toBe(0);
  });

  it('holds nothing after many generations whose cancels came before, during and after them', () => {
    const c = new Cancels();
    const r = rng(3);
    for (let id = 1; id <= 5000; id++) {
      const when = r();
      if (when < 0.1) c.cancel(id); // before the worker took it: an id it never held
      c.begin(id);
      if (when >= 0.1 && when < 0.4) c.cancel(id);
      if (when >= 0.4 && when < 0.7) expect((c.cancel(id), c.has(id))).toBe(true);
      c.end(id);
      if (when >= 0.7) c.cancel(id); // the result was already on its way back
    }
    expect(c.size).toBe(0);
  });
});
