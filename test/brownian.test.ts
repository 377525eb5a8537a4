/**
 * The noise of DPMSolverSDEScheduler, piece by piece, against what the real libraries computed
 * (test/fixtures/parity/brownian.json, made by scripts/make-brownian-parity.py with numpy 1.24, torch 1.13 and
 * torchsde 0.2.6): numpy's SeedSequence states, Python's round(x, 6), torch's float32 exp / log / expm1, and
 * torchsde's BrownianInterval increments. All bit for bit.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BrownianInterval, pyRound, seedSequenceState } from '../src/pipeline/brownian.js';
import { expf, expm1f, logf } from '../src/pipeline/torchmath.js';

interface Fixture {
  seed_sequence: { entropy: string; spawn_key: string[]; pool_size: number; state: number[] }[];
  py_round: [number, number][];
  torch_math: Record<'exp_in' | 'exp' | 'expm1' | 'log_in' | 'log', number[]>;
  brownian: { t0: number; t1: number; shape: number[]; entropy: string; queries: { ta: number; tb: number; w: number[] }[] }[];
}

const v = JSON.parse(readFileSync(path.resolve(import.meta.dirname, 'fixtures/parity/brownian.json'), 'utf8')) as Fixture;
const fromBits = (b: number[]) => Array.from(new Float32Array(Int32Array.from(b).buffer));
/** Same float32, -0 and NaN included (as bit patterns). */
const bitsOf = (xs: ArrayLike<number>) => Array.from(new Int32Array(Float32Array.from(xs).buffer));

describe('numpy SeedSequence', () => {
  it(`gives numpy's states (${v.seed_sequence.length} entropies, spawn keys and pool sizes)`, () => {
    expect(v.seed_sequence.length).toBeGreaterThan(300);
    for (const c of v.seed_sequence) {
      const got = seedSequenceState(BigInt(c.entropy), c.spawn_key.map(BigInt), c.pool_size, c.state.length);
      expect(Array.from(got), `${c.entropy} ${c.spawn_key.join(',')} pool ${c.pool_size}`).toEqual(c.state);
    }
  });

  it('refuses a negative entropy as numpy does', () => {
    expect(() => seedSequenceState(-1, [], 24, 3)).toThrow(/non-negative/);
  });
});

describe("Python's round(x, 6)", () => {
  it(`rounds as Python does (${v.py_round.length} values, exact ties to even)`, () => {
    for (const [x, r] of v.py_round) expect(pyRound(x, 6), String(x)).toBe(r);
    // the tie Number(x.toFixed(6)) gets wrong: 1/128 = 0.0078125 exactly
    expect(pyRound(1 / 128, 6)).toBe(0.007812);
    expect(Number((1 / 128).toFixed(6))).toBe(0.007813);
  });
});

describe("torch's float32 exp, log, expm1 (SLEEF)", () => {
  const m = v.torch_math;
  it('exp', () => expect(bitsOf(fromBits(m.exp_in).map(expf))).toEqual(m.exp));
  it('expm1', () => expect(bitsOf(fromBits(m.exp_in).map(expm1f))).toEqual(m.expm1));
  it('log', () => expect(bitsOf(fromBits(m.log_in).map(logf))).toEqual(m.log));
  it('differ from correctly rounded results, so the emulation matters', () => {
    const ins = fromBits(m.exp_in);
    const exp = fromBits(m.exp);
    expect(ins.filter((x, i) => Math.fround(Math.exp(x)) !== exp[i]).length).toBeGreaterThan(50);
  });
});

describe('torchsde BrownianInterval', () => {
  for (const [k, c] of v.brownian.entries()) {
    it(`case ${k}: [${c.t0}, ${c.t1}], shape ${c.shape.join('x')}, entropy ${c.entropy}, ${c.queries.length} queries`, () => {
      const numel = c.shape.reduce((a, b) => a * b, 1);
      const bm = new BrownianInterval(c.t0, c.t1, numel, BigInt(c.entropy));
      for (const [i, q] of c.queries.entries()) expect(bitsOf(bm.increment(q.ta, q.tb)), `query ${i}: W(${q.ta}, ${q.tb})`).toEqual(bitsOf(q.w));
    });
  }

  it('gives the same increments whatever was asked before (a fresh tree, queries reversed)', () => {
    const c = v.brownian[0]!;
    const bm = new BrownianInterval(c.t0, c.t1, 16, BigInt(c.entropy));
    for (const q of [...c.queries].reverse()) expect(bitsOf(bm.increment(q.ta, q.tb))).toEqual(bitsOf(q.w));
  });
});
