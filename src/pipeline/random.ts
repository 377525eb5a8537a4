/**
 * @module torch.randn on a CPU generator, bit for bit: `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))`.
 *
 * What torch (1.13, x86-64 with AVX2, as the reference data was made) does, and this file reproduces:
 * - `CPUGeneratorImpl` is an mt19937 seeded with the low 32 bits of the seed (`MT19937RNGEngine.h`).
 * - float, numel >= 16 (`normal_fill_AVX2` in `native/cpu/DistributionTemplates.h`): one 24-bit uniform per element
 *   (`(random() & 0xffffff) * 2^-24`), then Box-Muller on blocks of 16 (u1 = 1 - d[j], u2 = d[j+8]); a tail that is not
 *   a multiple of 16 redraws 16 fresh uniforms and recomputes the last 16 outputs. log/sin/cos are the Cephes
 *   polynomials of `avx_mathfun.h` in float32, and GCC contracts their mul+add pairs into FMAs (-mfma): checked
 *   against the reference hashes — the non-FMA and libm variants mismatch a few values in every 2048.
 * - numel < 16: `normal_distribution<double>` (two 53-bit uniforms from `random64()`, Box-Muller in double), whose
 *   second value is cached *in the generator* and returned by the next scalar-path draw.
 */

import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { RuntimeError } from '../errors.js';
import type { NoiseSource } from './types.js';

const N = 624;
const M = 397;
const f = Math.fround;

/** torch's at::mt19937 (the reference MT19937 with Cokus' layout; same output stream). */
class Mt19937 {
  /** The 624 words, then `next` and `left`: one array, so the native fill (native/torch-randn.c) steps it in place. */
  readonly state = new Uint32Array(N + 2);

  constructor(seed32: number) {
    const s = this.state;
    s[0] = seed32 >>> 0;
    for (let j = 1; j < N; j++) {
      const p = s[j - 1]! ^ (s[j - 1]! >>> 30);
      s[j] = (Math.imul(1812433253, p) + j) >>> 0;
    }
    s[N] = 0;
    s[N + 1] = 1;
  }

  /** d[from..to) = 24-bit uniforms `(random() & 0xffffff) * 2^-24`, as at::uniform_real_distribution<float>. */
  fillUniform24(d: Float32Array, from: number, to: number): void {
    const s = this.state;
    let next = s[N]!;
    let left = s[N + 1]!;
    for (let i = from; i < to; i++) {
      if (--left === 0) {
        this.#twist();
        next = 0;
        left = N;
      }
      let y = s[next++]!;
      y ^= y >>> 11;
      y ^= (y << 7) & 0x9d2c5680;
      y ^= (y << 15) & 0xefc60000;
      y ^= y >>> 18;
      d[i] = (y & 0xffffff) * 5.9604644775390625e-8; // 2^-24
    }
    s[N] = next;
    s[N + 1] = left;
  }

  next(): number {
    const s = this.state;
    s[N + 1] = s[N + 1]! - 1;
    if (s[N + 1] === 0) this.#twist();
    const at = s[N]!;
    s[N] = at + 1;
    let y = s[at]!;
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  #twist(): void {
    const s = this.state;
    s[N + 1] = N;
    s[N] = 0;
    let k = 0;
    for (; k < N - M; k++) {
      const y = (s[k]! & 0x80000000) | (s[k + 1]! & 0x7fffffff);
      s[k] = s[k + M]! ^ (y >>> 1) ^ (s[k + 1]! & 1 ? 0x9908b0df : 0);
    }
    for (; k < N - 1; k++) {
      const y = (s[k]! & 0x80000000) | (s[k + 1]! & 0x7fffffff);
      s[k] = s[k + M - N]! ^ (y >>> 1) ^ (s[k + 1]! & 1 ? 0x9908b0df : 0);
    }
    const y = (s[N - 1]! & 0x80000000) | (s[0]! & 0x7fffffff);
    s[N - 1] = s[M - 1]! ^ (y >>> 1) ^ (s[0]! & 1 ? 0x9908b0df : 0);
  }
}

/**
 * Single-rounding float32 fused multiply-add. a·b is exact in double (24+24 bits); rounding the double sum to float
 * differs from one rounding only when that sum lands exactly on a midpoint between two floats — then the exact
 * TwoSum error picks the side. `2s − r` is exact (Sterbenz) and is the other neighbour iff s is a midpoint.
 */
export function fmaf(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const r = f(s);
  const other = 2 * s - r;
  if (other === r || f(other) !== other) return r;
  const t = s - p;
  const err = p - (s - t) + (c - t);
  if (err === 0) return r;
  return err > 0 ? Math.max(r, other) : Math.min(r, other);
}

const LOG_P = [
  7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
  2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
].map(f);
const SQRTHF = f(0.707106781186547524);
const LOG_Q1 = f(-2.1219444e-4);
const LOG_Q2 = f(0.693359375);
const MIN_NORM_POS = 1.1754943508222875e-38;

const fbuf = new Float32Array(1);
const ibuf = new Int32Array(fbuf.buffer);

/** avx_mathfun `log256_ps` for one lane (x > 0 here: u1 is in (0, 1]). */
function logf(xIn: number): number {
  fbuf[0] = Math.max(xIn, MIN_NORM_POS);
  const bits = ibuf[0]!;
  let e = f((bits >>> 23) - 127 + 1);
  ibuf[0] = (bits & ~0x7f800000) | 0x3f000000;
  let x = fbuf[0]!;
  if (x < SQRTHF) {
    e = f(e - 1);
    x = f(f(x - 1) + x);
  } else {
    x = f(x - 1);
  }
  const z = f(x * x);
  let y = LOG_P[0]!;
  for (let k = 1; k < 9; k++) y = fmaf(y, x, LOG_P[k]!);
  y = f(y * x);
  y = fmaf(y, z, f(e * LOG_Q1));
  y = fmaf(-z, 0.5, y);
  x = f(x + y);
  return fmaf(e, LOG_Q2, x);
}

const DP1 = f(-0.78515625);
const DP2 = f(-2.4187564849853515625e-4);
const DP3 = f(-3.77489497744594108e-8);
const SIN_P0 = f(-1.9515295891e-4);
const SIN_P1 = f(8.3321608736e-3);
const SIN_P2 = f(-1.6666654611e-1);
const COS_P0 = f(2.443315711809948e-5);
const COS_P1 = f(-1.388731625493765e-3);
const COS_P2 = f(4.166664568298827e-2);
const FOPI = f(1.27323954473516);
const TWO_PI = f(2 * Math.PI);

/** Box-Muller on 16 uniforms at `o` in place, as `normal_fill_16_AVX2` (mean 0, std 1). */
function normalFill16(d: Float32Array, o: number): void {
  for (let j = 0; j < 8; j++) {
    const u1 = f(1 - d[o + j]!);
    const radius = f(Math.sqrt(f(-2 * logf(u1))));
    let x = f(TWO_PI * d[o + j + 8]!); // theta >= 0
    // sincos256_ps
    const q = (Math.trunc(f(x * FOPI)) + 1) & ~1;
    x = fmaf(q, DP1, x);
    x = fmaf(q, DP2, x);
    x = fmaf(q, DP3, x);
    const z = f(x * x);
    let c = fmaf(COS_P0, z, COS_P1);
    c = fmaf(c, z, COS_P2);
    c = f(c * z);
    c = fmaf(c, z, -f(z * 0.5));
    c = f(c + 1);
    let s = fmaf(SIN_P0, z, SIN_P1);
    s = fmaf(s, z, SIN_P2);
    s = f(s * z);
    s = fmaf(s, x, x);
    const sinPoly = (q & 2) === 0;
    let sin = sinPoly ? s : c;
    let cos = sinPoly ? c : s;
    if ((q & 4) !== 0) sin = -sin;
    if (((q - 2) & 4) === 0) cos = -cos;
    d[o + j] = f(radius * cos);
    d[o + j + 8] = f(radius * sin);
  }
}

type Fill = (state: Uint32Array, out: Float32Array) => void;

/**
 * native/torch-randn.c: the vectorised path below, the same values ~30 times faster (DPM++ SDE draws 40 latents a
 * step). `fill` runs the block this CPU runs best (`path`); the others it can run are there for the tests.
 */
export interface NativeFill {
  readonly path: 'avx2' | 'fma' | 'generic';
  fill: Fill;
  fillGeneric: Fill;
  fillFma?: Fill;
  fillAvx2?: Fill;
}

/**
 * dist/native/torch-randn.node, where `npm run build` puts it (scripts/build-native.sh; from the source tree, as the
 * tests run it, the built one beside it); undefined without a C compiler at build time: the JavaScript path then.
 */
const NATIVE: NativeFill | undefined = (() => {
  for (const rel of ['../../native/torch-randn.node', '../../dist/native/torch-randn.node']) {
    const file = fileURLToPath(new URL(rel, import.meta.url));
    if (!existsSync(file)) continue;
    try {
      const m = { exports: {} as NativeFill };
      process.dlopen(m, file);
      if (typeof m.exports.fill === 'function' && typeof m.exports.fillGeneric === 'function') return m.exports;
    } catch {
      // an unloadable build (another platform's): the JavaScript path gives the same values
    }
  }
  return undefined;
})();

/** The native module where it loaded (TorchGenerator uses its `fill`), for logs and tests. */
export const nativeRandn: NativeFill | undefined = NATIVE;

const MAX_SEED = 2n ** 64n - 1n;

/** `torch.Generator("cpu").manual_seed(seed)`: every `randn(n)` continues the stream like successive `torch.randn` calls. */
export class TorchGenerator implements NoiseSource {
  readonly seed: bigint;
  readonly #mt: Mt19937;
  /** The second Box-Muller value of the scalar (numel < 16) path, kept by torch's generator between calls. */
  #nextDouble: number | undefined;

  readonly #native: Fill | undefined;

  /**
   * `native: false` keeps the JavaScript path even where the native fill loaded; a function is a fill of its own
   * (benchmarks and tests comparing them).
   */
  constructor(seed: number | bigint, opts: { native?: boolean | Fill } = {}) {
    let s: bigint;
    if (typeof seed === 'bigint') s = seed;
    else if (Number.isSafeInteger(seed)) s = BigInt(seed);
    else throw new RuntimeError('INVALID_INPUT', `seed must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}, got ${seed}`);
    if (s < 0n || s > MAX_SEED) throw new RuntimeError('INVALID_INPUT', `seed must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}, got ${seed}`);
    this.seed = s;
    this.#mt = new Mt19937(Number(s & 0xffffffffn));
    this.#native = opts.native === false ? undefined : typeof opts.native === 'function' ? opts.native : NATIVE?.fill;
  }

  randn(count: number): Float32Array {
    if (!Number.isInteger(count) || count < 0) throw new RangeError(`randn count must be a non-negative integer, got ${count}`);
    const out = new Float32Array(count);
    if (count >= 16) this.#fillVectorised(out);
    else for (let i = 0; i < count; i++) out[i] = this.#normalDouble();
    return out;
  }

  #uniform53(): number {
    const hi = this.#mt.next();
    const lo = this.#mt.next();
    return ((hi & 0x1fffff) * 2 ** 32 + lo) * 2 ** -53;
  }

  #fillVectorised(d: Float32Array): void {
    if (this.#native) {
      this.#native(this.#mt.state, d);
      return;
    }
    const n = d.length;
    this.#mt.fillUniform24(d, 0, n);
    for (let i = 0; i + 16 <= n; i += 16) normalFill16(d, i);
    if (n % 16 !== 0) {
      this.#mt.fillUniform24(d, n - 16, n);
      normalFill16(d, n - 16);
    }
  }

  #normalDouble(): number {
    if (this.#nextDouble !== undefined) {
      const v = this.#nextDouble;
      this.#nextDouble = undefined;
      return v;
    }
    const u1 = this.#uniform53();
    const u2 = this.#uniform53();
    const r = Math.sqrt(-2 * Math.log(1 - u2)); // 1 - u2 is exact: torch 1.13 wrote log(1 - u2)
    const theta = 2 * Math.PI * u1;
    this.#nextDouble = r * Math.sin(theta);
    return r * Math.cos(theta);
  }
}

/** A seed for a request that gave none: uniform over [0, 2^53 - 1], so it round-trips through JSON. */
export function randomSeed(): number {
  const b = randomBytes(8);
  return (b.readUInt32BE(0) & 0x1fffff) * 2 ** 32 + b.readUInt32BE(4);
}
