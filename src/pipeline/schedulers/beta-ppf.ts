/**
 * @module The beta distribution's quantile function (`scipy.stats.beta.ppf`: the inverse of the regularized incomplete
 * beta function I_x(a, b)) in float64, for diffusers' beta sigmas. scipy answers with Boost's `ibeta_inv`; this is
 * not Boost's algorithm, but both land within a few float64 ulps of the true quantile (test/beta-ppf.test.ts holds it
 * to scipy's values), far inside the float32 the sigmas are kept in.
 */

/** The j-th partial numerator of I_x(a, b)'s continued fraction, 1/(1 + d1/(1 + d2/(1 + …))). */
function partial(a: number, b: number, x: number, j: number): number {
  const m = Math.floor(j / 2);
  if (j % 2 === 0) return (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m));
  return (-(a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1));
}

/**
 * I_x(a, b)'s continued fraction, fast for x below (a + 1)/(a + b + 2). The modified Lentz recurrence finds how deep
 * it must go; the value is then summed from the bottom up, which rounds less than Lentz's running product (within
 * 1–2 ulps rather than up to ~10 at x = 1/2).
 */
function continuedFraction(a: number, b: number, x: number): number {
  const tiny = 1e-300;
  const clamp = (v: number) => (Math.abs(v) < tiny ? tiny : v);
  // Lentz on 1 + d1/(1 + d2/(1 + …)): C0 = 1, D0 = 0
  let c = 1;
  let d = 0;
  for (let j = 1; j <= 20_000; j++) {
    const dj = partial(a, b, x, j);
    d = 1 / clamp(1 + dj * d);
    c = clamp(1 + dj / c);
    if (Math.abs(d * c - 1) <= 2 ** -53) {
      let t = 1;
      for (let k = j + 16; k >= 1; k--) t = 1 + partial(a, b, x, k) / t;
      return 1 / t;
    }
  }
  throw new Error(`incomplete beta: no convergence for a=${a}, b=${b}, x=${x}`);
}

/** x^a (1 − x)^b / a · CF: B_x(a, b), the unnormalised incomplete beta, where its continued fraction converges fast. */
const lowerTail = (a: number, b: number, x: number, y: number) => ((x ** a * y ** b) / a) * continuedFraction(a, b, x);

/**
 * The regularized incomplete beta of the smaller tail and its density, for a quantile search: `lower(x)` is I_x(a, b)
 * with y = 1 − x passed exactly, `density(x)` its derivative. B(a, b) itself comes from the same continued fractions
 * (B = B_x(a, b) + B_{1−x}(b, a) at the point where both converge alike), so no gamma function is needed.
 */
class IncompleteBeta {
  readonly #split: number;
  /** B(a, b) */
  readonly beta: number;

  constructor(readonly a: number, readonly b: number) {
    this.#split = (a + 1) / (a + b + 2);
    const y0 = 1 - this.#split;
    const x0 = 1 - y0; // x0 + y0 == 1 exactly
    this.beta = lowerTail(a, b, x0, y0) + lowerTail(b, a, y0, x0);
  }

  lower(x: number, y: number): number {
    if (x <= this.#split) return lowerTail(this.a, this.b, x, y) / this.beta;
    return 1 - lowerTail(this.b, this.a, y, x) / this.beta;
  }

  density(x: number, y: number): number {
    return (x ** (this.a - 1) * y ** (this.b - 1)) / this.beta;
  }
}

/** x with I_x(a, b) = p for p ≤ 1/2 (x from 0): Newton's method kept inside a bracket, bisecting where it leaves it. */
function solveLower(ib: IncompleteBeta, p: number): number {
  let lo = 0;
  let hi = 1;
  // Near 0, I_x ≈ x^a / (a·B): its inverse is the first guess.
  let x = Math.min(0.5, (p * ib.a * ib.beta) ** (1 / ib.a));
  if (!(x > 0)) x = 0.5;
  for (let i = 0; i < 200; i++) {
    const y = 1 - x;
    const fx = ib.lower(x, y) - p;
    if (fx === 0) return x;
    if (fx < 0) lo = x;
    else hi = x;
    let next = x - fx / ib.density(x, y);
    if (!(next > lo && next < hi)) next = lo + (hi - lo) / 2;
    if (next === x || next === lo || next === hi) return x;
    if (Math.abs(next - x) <= x * 2 ** -60) return next;
    x = next;
  }
  return x;
}

/** The shapes and probabilities the quantile is checked on (test/beta-ppf.test.ts); diffusers passes 0.6, 0.6. */
const SHAPES: readonly [number, number] = [0.1, 12];
const TINY_P = 1e-16;

/**
 * `scipy.stats.beta.ppf(p, a, b)`: 0 at p = 0, 1 at p = 1, NaN outside [0, 1]. Only for shapes in SHAPES and p from
 * TINY_P, where it is checked; outside, B(a, b) underflows or the search stops short of a tiny quantile, so it throws
 * rather than answer wrong.
 */
export function betaPpf(p: number, a: number, b: number): number {
  if (!(a > 0) || !(b > 0) || !(p >= 0 && p <= 1)) return NaN;
  if (a < SHAPES[0] || a > SHAPES[1] || b < SHAPES[0] || b > SHAPES[1] || (p > 0 && p < TINY_P)) {
    throw new RangeError(`betaPpf(${p}, ${a}, ${b}): outside the shapes ${SHAPES.join('–')} and the probabilities from ${TINY_P} it is checked on`);
  }
  if (p === 0) return 0;
  if (p === 1) return 1;
  // The smaller tail is solved for: 1 − I_x(a, b) = I_{1−x}(b, a).
  const q = 1 - p;
  if (p <= q) return solveLower(new IncompleteBeta(a, b), p);
  return 1 - solveLower(new IncompleteBeta(b, a), q);
}
