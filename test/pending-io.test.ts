/**
 * A stop's cleanup (storage/pending-io.ts startCleanup), which the server's close and its stop before the runtime
 * exists share: steps bounded together, what the bound ran out on named, a step that failed taken as finished.
 */
import { describe, expect, it } from 'vitest';
import { startCleanup } from '../src/storage/pending-io.js';

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
  });

  it('a step still running when the bound runs out is named; a later one with nothing to wait for still finishes', async () => {
    const c = startCleanup({ ms: 50 });
    expect(await c.step('the pipeline workers', () => new Promise(() => undefined))).toBe(false);
    expect(await c.step('the output uploads', async () => undefined)).toBe(true);
    expect(c.unfinished).toEqual(['the pipeline workers']);
  });
});
