/**
 * @module torch's float32 `exp`, `log` and `expm1` on CPU tensors, bit for bit: torch (1.13, x86-64 AVX2) maps them to
 * SLEEF 3.5's `Sleef_expf8_u10`, `Sleef_logf8_u10` and `Sleef_expm1f8_u10` (its AVX2 build, with FMA), which are
 * within one ulp of the exact result but not always correctly rounded (about 8% of exp and 0.5% of log results
 * differ from `Math.fround(Math.exp(x))`). Where such a value decides more than arithmetic noise (the times at which
 * DPMSolverSDEScheduler queries its Brownian tree), the runtime needs torch's own value: these follow SLEEF's
 * algorithms operation by operation in float32, fused multiply-adds included.
 */

import { fmaf } from './random.js';

const f = Math.fround;

/** A float32 pair (hi, lo): SLEEF's double-float. */
interface F2 {
  x: number;
  y: number;
}

const R_LN2F = f(1.442695040888963407359924681001892137426645954152985934135449406931);
const L2UF = f(0.693145751953125);
const L2LF = f(1.428606765330187045e-6);

/** `_mm256_cvtps_epi32`: round to nearest, ties to even. */
function rint(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** SLEEF's vldexp2: two exact power-of-two scalings, each rounded to float32. */
const ldexp2 = (x: number, q: number): number => {
  const h = q >> 1;
  return f(f(x * 2 ** h) * 2 ** (q - h));
};

/** `dfadd2_vf2_vf_vf` */
function add2(x: number, y: number): F2 {
  const s = f(x + y);
  const v = f(s - x);
  return { x: s, y: f(f(x - f(s - v)) + f(y - v)) };
}

/** `dfadd2_vf2_vf2_vf` */
function add2F2F(x: F2, y: number): F2 {
  const s = f(x.x + y);
  const v = f(s - x.x);
  const t = f(f(x.x - f(s - v)) + f(y - v));
  return { x: s, y: f(t + x.y) };
}

/** `dfadd2_vf2_vf2_vf2` */
function add2F2F2(x: F2, y: F2): F2 {
  const s = f(x.x + y.x);
  const v = f(s - x.x);
  const t = f(f(x.x - f(s - v)) + f(y.x - v));
  return { x: s, y: f(t + f(x.y + y.y)) };
}

/** `dfadd_vf2_vf2_vf2` (|x| ≥ |y|) */
function addF2F2(x: F2, y: F2): F2 {
  const s = f(x.x + y.x);
  return { x: s, y: f(f(f(f(x.x - s) + y.x) + x.y) + y.y) };
}

/** `dfadd_vf2_vf2_vf` */
function addF2F(x: F2, y: number): F2 {
  const s = f(x.x + y);
  return { x: s, y: f(f(f(x.x - s) + y) + x.y) };
}

/** `dfadd_vf2_vf_vf2` */
function addFF2(x: number, y: F2): F2 {
  const s = f(x + y.x);
  return { x: s, y: f(f(f(x - s) + y.x) + y.y) };
}

/** `dfmul_vf2_vf2_vf` (FMA form) */
function mulF2F(x: F2, y: number): F2 {
  const s = f(x.x * y);
  return { x: s, y: fmaf(x.y, y, fmaf(x.x, y, -s)) };
}

/** `dfmul_vf2_vf2_vf2` (FMA form) */
function mulF2F2(x: F2, y: F2): F2 {
  const s = f(x.x * y.x);
  return { x: s, y: fmaf(x.x, y.y, fmaf(x.y, y.x, fmaf(x.x, y.x, -s))) };
}

/** `dfsqu_vf2_vf2` (FMA form) */
function squF2(x: F2): F2 {
  const s = f(x.x * x.x);
  return { x: s, y: fmaf(f(x.x + x.x), x.y, fmaf(x.x, x.x, -s)) };
}

/** `dfdiv_vf2_vf2_vf2` (FMA form) */
function divF2F2(n: F2, d: F2): F2 {
  const t = f(1 / d.x);
  const s = f(n.x * t);
  const u = fmaf(t, n.x, -s);
  const v = fmaf(-d.y, t, fmaf(-d.x, t, 1));
  return { x: s, y: fmaf(s, v, fmaf(n.y, t, u)) };
}

/** torch's float32 `exp` (SLEEF `xexpf`). */
export function expf(d: number): number {
  d = f(d);
  if (Number.isNaN(d)) return NaN;
  const q = rint(f(d * R_LN2F));
  let s = fmaf(q, -L2UF, d);
  s = fmaf(q, -L2LF, s);
  let u = f(0.000198527617612853646278381);
  u = fmaf(u, s, f(0.00139304355252534151077271));
  u = fmaf(u, s, f(0.00833336077630519866943359));
  u = fmaf(u, s, f(0.0416664853692054748535156));
  u = fmaf(u, s, f(0.166666671633720397949219));
  u = fmaf(u, s, 0.5);
  u = f(1 + fmaf(f(s * s), u, s));
  u = ldexp2(u, q);
  if (d < -104) return 0;
  if (d > 100) return Infinity;
  return u;
}

const LN2_HI = f(0.69314718246459960938);
const LN2_LO = f(-1.904654323148236017e-9);
const FLT_MIN = 1.1754943508222875e-38;
const INV_075 = f(1 / 0.75);
const fbuf = new Float32Array(1);
const ibuf = new Int32Array(fbuf.buffer);

/** torch's float32 `log` (SLEEF `xlogf_u1`). */
export function logf(d: number): number {
  d = f(d);
  if (Number.isNaN(d) || d < 0) return NaN;
  if (d === 0) return -Infinity;
  if (d === Infinity) return Infinity;
  const tiny = d < FLT_MIN;
  if (tiny) d = f(d * 2 ** 64);
  fbuf[0] = f(d * INV_075);
  let e = ((ibuf[0]! >>> 23) & 0xff) - 0x7f;
  const m = f(d * 2 ** -e); // vldexp3: an exact exponent shift
  if (tiny) e -= 64;
  let s = mulF2F({ x: LN2_HI, y: LN2_LO }, e);
  const x = divF2F2(add2(-1, m), add2(1, m));
  const x2 = f(x.x * x.x);
  let t = f(0.3027294874);
  t = fmaf(t, x2, f(0.3996108174));
  t = fmaf(t, x2, f(0.666669488));
  s = addF2F2(s, { x: f(x.x * 2), y: f(x.y * 2) });
  s = addF2F(s, f(f(x2 * x.x) * t));
  return f(s.x + s.y);
}

/** SLEEF's `expk2f`: e^d of a double-float, as a double-float. */
function expk2(d: F2): F2 {
  const q = rint(f(f(d.x + d.y) * R_LN2F));
  let s = add2F2F(d, f(q * -L2UF));
  s = add2F2F(s, f(q * -L2LF));
  let u = f(0.1980960224e-3);
  u = fmaf(u, s.x, f(0.1394256484e-2));
  u = fmaf(u, s.x, f(0.8333456703e-2));
  u = fmaf(u, s.x, f(0.4166637361e-1));
  let t = add2F2F(mulF2F(s, u), f(0.166666659414234244790680580464));
  t = add2F2F(mulF2F2(s, t), 0.5);
  t = add2F2F2(s, mulF2F2(squF2(s), t));
  t = addFF2(1, t);
  if (d.x < -104) return { x: 0, y: 0 };
  return { x: ldexp2(t.x, q), y: ldexp2(t.y, q) };
}

/** torch's float32 `expm1` (SLEEF `xexpm1f`). */
export function expm1f(a: number): number {
  a = f(a);
  if (Number.isNaN(a)) return NaN;
  if (Object.is(a, -0)) return -0;
  if (a > 88.72283172607421875) return Infinity;
  if (a < f(-16.635532333438687426013570)) return -1;
  const d = add2F2F(expk2({ x: a, y: 0 }), -1);
  return f(d.x + d.y);
}
