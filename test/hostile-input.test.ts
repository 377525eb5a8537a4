/**
 * Hostile input that costs the server more than its size: each case is the worst input found for one parser or limit
 * (docs/FAULTS.md, "Hostile input"), and asserts the bound holds. Complexity checks use inputs for which the unbounded
 * code takes seconds to minutes and the bounded code milliseconds, so their time limits are orders of magnitude away
 * from either.
 */
import { describe, expect, it } from 'vitest';
import { basicClean } from '../src/pipeline/tokenizer.js';

/** Milliseconds `f` takes. */
const timed = (f: () => void): number => {
  const t = performance.now();
  f();
  return performance.now() - t;
};

describe('CLIP text cleaning is linear in the prompt', () => {
  it('strips as Python does: the whitespace of `regex`, plus U+001C..U+001F', () => {
    expect(basicClean('\x1c\u3000 A\u0085b \x1f')).toBe('a b');
    expect(basicClean('\x1c\x1d\x1e\x1f')).toBe('');
    expect(basicClean('a\x1cb')).toBe('a\x1cb');
  });

  it('a long whitespace run inside a prompt costs no more than one at its end', () => {
    // `[\s…]+$` tried from every position of the run: 150,000 characters took ~45 s; a scan takes milliseconds.
    const n = 150_000;
    for (const ws of ['\x1c', '\u3000', '\t']) {
      const inside = `x${ws.repeat(n)}x`;
      const ms = timed(() => expect(basicClean(inside).length).toBeGreaterThan(1));
      expect(ms, `a run of ${n} ${JSON.stringify(ws)}`).toBeLessThan(2_000);
    }
  });
});
