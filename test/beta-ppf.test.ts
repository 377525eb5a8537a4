/**
 * The beta quantile behind diffusers' beta sigmas (`scipy.stats.beta.ppf`), against test/fixtures/parity/beta-ppf.json
 * (scripts/make-beta-ppf.py): scipy's values and the exact quantiles (mpmath, 200 bits) on every point diffusers' ramp
 * takes for 1 to 200 steps and some larger counts, a grid of 4097 and the tails, at alpha = beta = 0.6 (the only shape
 * diffusers passes), and coarser grids of eight other shapes. Criterion: ours no further from the exact quantile than
 * scipy's own value is (or 16 float64 ulps where scipy is closer), and the float32 sigmas built from ours equal those
 * built from scipy's, for the bounds models ship.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { betaPpf } from '../src/pipeline/schedulers/beta-ppf.js';
import { alphasCumprod, betaSigmas, resolveConfig, sigmasFromAlphas } from '../src/pipeline/schedulers/common.js';

interface Table {
  alpha: number;
  beta: number;
  q: number[];
  ppf: number[];
  exact: number[];
}
const fixture = JSON.parse(readFileSync(path.resolve(import.meta.dirname, 'fixtures/parity/beta-ppf.json'), 'utf8')) as { scipy: string; tables: Table[] };

const dv = new DataView(new ArrayBuffer(8));
/** Distance in float64 units in the last place (both finite, same sign here). */
function ulps(a: number, b: number): number {
  dv.setFloat64(0, a);
  const ia = dv.getBigInt64(0);
  dv.setFloat64(0, b);
  const d = ia - dv.getBigInt64(0);
  return Number(d < 0n ? -d : d);
}

/** The ends of SD's scaled_linear and of the linear sigma table, as diffusers reads them, and bounds configs set. */
function bounds(): [number, number][] {
  const ends = (schedule: string, start: number, end: number): [number, number] => {
    const c = resolveConfig('EulerDiscreteScheduler', { num_train_timesteps: 1000, beta_start: start, beta_end: end, beta_schedule: schedule, trained_betas: null }, {});
    const table = sigmasFromAlphas(alphasCumprod('EulerDiscreteScheduler', c, false));
    return [table[0]!, table[table.length - 1]!];
  };
  return [ends('scaled_linear', 0.00085, 0.012), ends('linear', 0.0001, 0.02), [0.1, 8], [0.05, 10], [0.002, 80]];
}

describe(`beta quantile (scipy ${fixture.scipy} and exact values)`, () => {
  it('is 0 and 1 at the ends, as scipy gives them, and NaN outside [0, 1] or for shapes not above 0', () => {
    expect(betaPpf(0, 0.6, 0.6)).toBe(0);
    expect(betaPpf(1, 0.6, 0.6)).toBe(1);
    for (const [p, a, b] of [[-0.1, 0.6, 0.6], [1.5, 0.6, 0.6], [NaN, 0.6, 0.6], [0.5, 0, 0.6], [0.5, 0.6, -1]]) expect(betaPpf(p!, a!, b!)).toBeNaN();
    // Where it would answer wrong (B(a, b) underflows, the search stops short of a tiny quantile), it refuses instead.
    for (const [p, a, b] of [[0.5, 1000, 1000], [1e-300, 0.6, 0.6], [0.9, 0.001, 1], [0.5, 0.6, 13]]) expect(() => betaPpf(p!, a!, b!)).toThrow(RangeError);
  });

  for (const t of fixture.tables) {
    it(`alpha ${t.alpha}, beta ${t.beta}: within scipy's distance of the exact quantile (${t.q.length} points)`, () => {
      let ours = 0;
      let theirs = 0;
      t.q.forEach((q, i) => {
        ours = Math.max(ours, ulps(betaPpf(q, t.alpha, t.beta), t.exact[i]!));
        theirs = Math.max(theirs, ulps(t.ppf[i]!, t.exact[i]!));
      });
      expect(ours).toBeLessThanOrEqual(Math.max(16, theirs));
    });
  }

  it("gives diffusers' float32 beta sigmas: the same as scipy's quantiles at every point of the 0.6 table, for every bound", () => {
    const t = fixture.tables.find((x) => x.alpha === 0.6 && x.beta === 0.6)!;
    for (const [lo, hi] of bounds()) {
      const differ = t.q.filter((q, i) => Math.fround(lo + betaPpf(q, 0.6, 0.6) * (hi - lo)) !== Math.fround(lo + t.ppf[i]! * (hi - lo)));
      expect(differ, `bounds ${lo}, ${hi}`).toEqual([]);
    }
  });

  it('runs from sigma_max down to sigma_min, both ends as diffusers computes them', () => {
    const [lo, hi] = bounds()[0]!;
    for (const n of [1, 2, 7, 40]) {
      const s = betaSigmas(lo, hi, n);
      expect(s).toHaveLength(n);
      // t = 1 - linspace(0, 1, n): ppf(1) = 1 first, ppf(0) = 0 last
      expect(s[0]).toBe(lo + 1 * (hi - lo));
      if (n > 1) expect(s[n - 1]).toBe(lo);
      for (let i = 1; i < n; i++) expect(s[i]!).toBeLessThan(s[i - 1]!);
    }
  });
});
