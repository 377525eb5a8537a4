/**
 * @module What every scheduler shares: config resolution as diffusers' `from_config` does it, the beta/alpha tables in
 * torch's float32 arithmetic, and the numpy helpers the timestep schedules are built with.
 *
 * Arithmetic rule: where diffusers works on float32 torch tensors, every operation is rounded with `Math.fround`
 * (a Python scalar operand is rounded to float32 first, as torch's CPU kernels do); where it works on numpy float64
 * arrays or Python floats, plain doubles are used.
 */

import { RuntimeError } from '../../errors.js';
import type { StepRange } from '../job.js';
import { pyRepr } from '../pyjson.js';
import { fmaf } from '../random.js';
import { betaPpf } from './beta-ppf.js';

export const f = Math.fround;
/** torch's / numpy's float32 log. */
export const logf = (x: number): number => f(Math.log(x));

export type ConfigValue = number | string | boolean | null | number[];

/** diffusers' class defaults for the beta schedule, shared by DDIM, PNDM, Euler and DPM-Solver (LCM differs). */
export const BETA_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
};
export type ResolvedConfig = Readonly<Record<string, ConfigValue>>;

/**
 * diffusers' `extract_init_dict`: keys of the target class's `__init__` come from `overrides`, else from `config`
 * (unless listed in `_use_default_values`), else the class default. Other keys (other classes' options, `_…` keys)
 * are dropped — which is why `from_config` carries beta_*, steps_offset, timestep_spacing, prediction_type across.
 * `honourUsedDefaults` false: the config is a built scheduler's own (every value in it is the one it runs with).
 */
export function resolveConfig(
  className: string,
  defaults: Readonly<Record<string, ConfigValue>>,
  config: Record<string, unknown>,
  overrides: Record<string, unknown> = {},
  honourUsedDefaults = true,
): ResolvedConfig {
  const usedDefaults = new Set(honourUsedDefaults && Array.isArray(config._use_default_values) ? (config._use_default_values as unknown[]) : []);
  const out: Record<string, ConfigValue> = {};
  for (const [key, dflt] of Object.entries(defaults)) {
    let v: unknown = dflt;
    if (Object.hasOwn(overrides, key)) v = overrides[key];
    else if (Object.hasOwn(config, key) && !usedDefaults.has(key)) v = config[key];
    out[key] = checkValue(className, key, v, dflt);
  }
  return Object.freeze(out);
}

function checkValue(className: string, key: string, v: unknown, dflt: ConfigValue): ConfigValue {
  const bad = (want: string) => new RuntimeError('UNSUPPORTED', `${className}: scheduler config ${key} must be ${want}, got ${pyRepr(v)}`);
  if (v === null) return null; // diffusers stores None for unset optionals (trained_betas, sigma_min, variance_type)
  if (key === 'noise_sampler_seed') {
    // diffusers also takes a list (one tree per image of a batch): the runtime seeds each image itself (see dpmsde.ts)
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw bad(`null or an integer from 0 to ${Number.MAX_SAFE_INTEGER}`);
    return v as number;
  }
  if (key === 'trained_betas') {
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) throw bad('a list of numbers');
    return v as number[];
  }
  if (Array.isArray(dflt)) {
    // UniPC's disable_corrector: step indices
    if (!Array.isArray(v) || !v.every((x) => Number.isInteger(x))) throw bad('a list of integers');
    return v as number[];
  }
  if (typeof dflt === 'number' || (dflt === null && typeof v === 'number')) {
    // Python's json writes -inf as -Infinity (read by parsePyJson); a few hand-written configs say "-inf".
    // NaN carries no meaning in any scheduler option and would silently poison every step, so it is refused.
    if (v === '-inf') return -Infinity;
    if (typeof v !== 'number' || Number.isNaN(v)) throw bad('a number');
    return v;
  }
  if (typeof dflt === 'boolean') {
    if (typeof v !== 'boolean') throw bad('a boolean');
    return v;
  }
  if (typeof v !== 'string') throw bad('a string');
  return v;
}

export const num = (c: ResolvedConfig, k: string): number => c[k] as number;
export const str = (c: ResolvedConfig, k: string): string => c[k] as string;
export const bool = (c: ResolvedConfig, k: string): boolean => c[k] as boolean;

/** `supported`: the values the runtime takes, named so that a model's config can be fixed without reading the code. */
export function unsupported(className: string, what: string, supported?: readonly string[]): never {
  throw new RuntimeError('UNSUPPORTED', `${className}: ${what} is not supported${supported ? ` (supported: ${supported.join(', ')})` : ''}`);
}

/** The timestep_spacing values every scheduler here takes (diffusers' too). */
export const TIMESTEP_SPACINGS: readonly string[] = ['linspace', 'leading', 'trailing'];

export function unsupportedSpacing(className: string, c: ResolvedConfig): never {
  return unsupported(className, `timestep_spacing "${str(c, 'timestep_spacing')}"`, TIMESTEP_SPACINGS);
}

/**
 * The DPM-Solver family and SA-Solver read `variance_type` only to drop a learned variance's output channels: a fixed
 * one (a DDPM config's "fixed_small", which from_config carries over) is ignored, as diffusers ignores it. A learned one
 * needs a UNet that predicts its variance (8 output channels), which Stable Diffusion's do not.
 */
export function checkIgnoredVariance(className: string, c: ResolvedConfig): void {
  const v = c.variance_type;
  if (v === null || (typeof v === 'string' && FIXED_VARIANCES.includes(v))) return;
  throw new RuntimeError('UNSUPPORTED', `${className}: variance_type "${String(v)}" is not supported (a learned variance needs a UNet with 8 output channels; supported: ${FIXED_VARIANCES.join(', ')} or none)`);
}

/** DDPM's fixed variance types (diffusers' `_get_variance`). */
export const FIXED_VARIANCES: readonly string[] = ['fixed_small', 'fixed_small_log', 'fixed_large', 'fixed_large_log'];

/** The sigma ramps a config can ask for instead of the interpolated schedule (diffusers' `use_*_sigmas`). */
export type SigmaRamp = 'karras' | 'exponential' | 'beta';
const RAMP_KEYS = ['use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas'] as const;

/** diffusers' `__init__` raises when a config asks for more than one sigma ramp. */
export function checkOneRamp(className: string, c: ResolvedConfig): void {
  const set = RAMP_KEYS.filter((k) => c[k] === true);
  if (set.length > 1) {
    throw new RuntimeError('UNSUPPORTED', `${className}: ${set.join(' with ')} is not supported (diffusers raises too; set only one of them true, `
      + 'and on a model whose config sets one, name a scheduler without _karras: such a name sets use_karras_sigmas)');
  }
}

/** The ramp a config asks for, if any (checkOneRamp has refused more than one). */
export function sigmaRamp(c: ResolvedConfig): SigmaRamp | undefined {
  if (c.use_karras_sigmas === true) return 'karras';
  if (c.use_exponential_sigmas === true) return 'exponential';
  if (c.use_beta_sigmas === true) return 'beta';
  return undefined;
}

export function oneOf(className: string, c: ResolvedConfig, key: string, allowed: readonly string[]): string {
  const v = str(c, key);
  if (!allowed.includes(v)) throw new RuntimeError('UNSUPPORTED', `${className}: ${key} "${v}" is not supported (supported: ${allowed.join(', ')})`);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// torch arithmetic

/**
 * `torch.linspace(start, end, steps, dtype=float32)` on CPU as the reference torch computes it (aten
 * RangeFactoriesKernel before 2.1, AVX2 build): step in float32; the first half counted up from `start`, the second
 * down from `end`; the vectorised body (two groups of 8 per iteration) takes a group base and adds k·step (rounded,
 * then added: not fused); the remainder is scalar. GCC contracts each scalar `a + b*c` into an FMA — matched bit for
 * bit against the sigmas of the reference scheduler files and against torch 1.13.1 (Debian, AVX2) for 1 to 79 steps
 * on [0, 1] (lanes 3, 5, 6 and 7 of a group tell fused lanes from unfused ones).
 */
export function torchLinspaceF32(startD: number, endD: number, steps: number): Float32Array {
  const out = new Float32Array(steps);
  if (steps === 1) {
    out[0] = startD;
    return out;
  }
  const start = f(startD);
  const end = f(endD);
  const step = f(f(end - start) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  const scalar = (idx: number) => (idx < halfway ? fmaf(step, idx, start) : fmaf(-step, steps - idx - 1, end));
  const vecEnd = Math.floor(steps / 16) * 16;
  for (let idx = 0; idx < vecEnd; idx += 8) {
    const base = scalar(idx);
    for (let k = 0; k < 8; k++) out[idx + k] = f(base + f(k * step));
  }
  for (let idx = vecEnd; idx < steps; idx++) out[idx] = scalar(idx);
  return out;
}

const f64 = new DataView(new ArrayBuffer(8));

/** x = m · 2^e with m an integer (BigInt), for a finite double. */
function decompose(x: number): [bigint, number] {
  f64.setFloat64(0, x);
  const bits = f64.getBigUint64(0);
  const sign = bits >> 63n ? -1n : 1n;
  const exp = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & 0xfffffffffffffn;
  return exp === 0 ? [sign * frac, -1074] : [sign * (frac | 0x10000000000000n), exp - 1075];
}

/** `a·b + c` rounded once, as a double FMA gives it: the exact sum in BigInt, rounded by Number() (normal results). */
export function fma64(a: number, b: number, c: number): number {
  if (!Number.isFinite(a) || !Number.isFinite(b) || !Number.isFinite(c) || a === 0 || b === 0 || c === 0) return a * b + c;
  const [ma, ea] = decompose(a);
  const [mb, eb] = decompose(b);
  const [mc, ec] = decompose(c);
  const ep = ea + eb;
  const e = Math.min(ep, ec);
  const sum = ((ma * mb) << BigInt(ep - e)) + (mc << BigInt(ec - e));
  return Number(sum) * 2 ** e;
}

/**
 * `torch.linspace(start, end, steps, dtype=float64)` on CPU: torchLinspaceF32's kernel with four lanes a group —
 * matched bit for bit against torch 1.13.1 for 1 to 300 steps on [0, 1].
 */
export function torchLinspaceF64(start: number, end: number, steps: number): Float64Array {
  const out = new Float64Array(steps);
  if (steps === 1) {
    out[0] = start;
    return out;
  }
  const step = (end - start) / (steps - 1);
  const halfway = Math.floor(steps / 2);
  const scalar = (idx: number) => (idx < halfway ? fma64(step, idx, start) : fma64(-step, steps - idx - 1, end));
  const vecEnd = Math.floor(steps / 8) * 8;
  for (let idx = 0; idx < vecEnd; idx += 4) {
    const base = scalar(idx);
    for (let k = 0; k < 4; k++) out[idx + k] = base + k * step;
  }
  for (let idx = vecEnd; idx < steps; idx++) out[idx] = scalar(idx);
  return out;
}

/** `torch.cumprod` on CPU: accumulates in double, stores each prefix as float32. */
export function torchCumprodF32(x: Float32Array): Float32Array {
  const out = new Float32Array(x.length);
  let acc = 1;
  for (let i = 0; i < x.length; i++) {
    acc *= x[i]!;
    out[i] = acc;
  }
  return out;
}

/** diffusers `betas_for_alpha_bar` (cosine): Python doubles, then a float32 tensor. */
function betasForAlphaBar(n: number, maxBeta = 0.999): Float32Array {
  const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), maxBeta);
  return out;
}

/** diffusers `rescale_zero_terminal_snr` (float32 tensor ops). */
function rescaleZeroTerminalSnr(betas: Float32Array): Float32Array {
  const n = betas.length;
  const alphas = betas.map((b) => f(1 - b));
  const sq = torchCumprodF32(alphas).map((a) => f(Math.sqrt(a)));
  const a0 = sq[0]!;
  const aT = sq[n - 1]!;
  const scale = f(a0 / f(a0 - aT));
  for (let i = 0; i < n; i++) sq[i] = f(f(sq[i]! - aT) * scale);
  const bar = sq.map((v) => f(v * v));
  const out = new Float32Array(n);
  out[0] = f(1 - bar[0]!);
  for (let i = 1; i < n; i++) out[i] = f(1 - f(bar[i]! / bar[i - 1]!));
  return out;
}

/** The `__init__` block every class repeats: betas → alphas → alphas_cumprod (float32). */
export function alphasCumprod(className: string, c: ResolvedConfig, withZeroSnr: boolean): Float32Array {
  const n = num(c, 'num_train_timesteps');
  if (!Number.isInteger(n) || n < 2) unsupported(className, `num_train_timesteps ${n}`);
  let betas: Float32Array;
  const trained = c.trained_betas as number[] | null;
  if (trained !== null && trained !== undefined) {
    if (trained.length !== n) unsupported(className, `trained_betas of length ${trained.length} with num_train_timesteps ${n}`);
    betas = Float32Array.from(trained);
  } else {
    const schedule = str(c, 'beta_schedule');
    if (schedule === 'linear') betas = torchLinspaceF32(num(c, 'beta_start'), num(c, 'beta_end'), n);
    else if (schedule === 'scaled_linear') {
      betas = torchLinspaceF32(num(c, 'beta_start') ** 0.5, num(c, 'beta_end') ** 0.5, n).map((b) => f(b * b));
    } else if (schedule === 'squaredcos_cap_v2') betas = betasForAlphaBar(n);
    else unsupported(className, `beta_schedule "${schedule}"`, ['linear', 'scaled_linear', 'squaredcos_cap_v2']);
  }
  if (withZeroSnr && c.rescale_betas_zero_snr === true) betas = rescaleZeroTerminalSnr(betas);
  return torchCumprodF32(betas.map((b) => f(1 - b)));
}

/**
 * `_sigma_to_alpha_sigma_t` of the multistep solvers (DPM-Solver, UniPC): alpha_t = 1/sqrt(sigma² + 1),
 * sigma_t = sigma·alpha_t, and lambda = log alpha_t − log sigma_t (float32).
 */
export function alphaSigmaLambda(sigma: number): [number, number, number] {
  const alpha = f(1 / f(Math.sqrt(f(f(sigma * sigma) + 1))));
  const sig = f(sigma * alpha);
  return [alpha, sig, f(logf(alpha) - logf(sig))];
}

/** `((1 - ac) / ac) ** 0.5` as a float32 tensor expression. */
export function sigmasFromAlphas(ac: Float32Array): Float32Array {
  return ac.map((a) => f(Math.sqrt(f(f(1 - a) / a))));
}

// ---------------------------------------------------------------------------------------------------------------
// numpy helpers (float64)

/** `np.arange(start, stop, step)` for floats: length ceil((stop-start)/step), values start + i*delta (numpy's fill). */
export function npArange(start: number, stop: number, step: number): number[] {
  const len = Math.max(0, Math.ceil((stop - start) / step));
  if (len === 0) return [];
  const out = [start];
  if (len > 1) out.push(start + step);
  const delta = (out[1] ?? start) - start;
  for (let i = 2; i < len; i++) out.push(start + i * delta);
  return out;
}

/** `np.linspace(start, stop, num, endpoint)` in float64. */
export function npLinspace(start: number, stop: number, n: number, endpoint = true): number[] {
  const div = endpoint ? n - 1 : n;
  // One point with the endpoint (div 0) has no step: numpy gives `start`, not 0/0.
  if (div <= 0) return n > 0 ? [start] : [];
  const step = (stop - start) / div;
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(step !== 0 ? i * step + start : (i / div) * (stop - start) + start);
  if (endpoint && n > 1) out[n - 1] = stop;
  return out;
}

/** `np.round`: half to even. */
export function npRound(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** `np.interp(x, arange(len(fp)), fp)` in float64. */
export function npInterpIndex(x: number, fp: ArrayLike<number>): number {
  const n = fp.length;
  if (x <= 0) return fp[0]!;
  if (x >= n - 1) return fp[n - 1]!;
  const j = Math.floor(x);
  if (j === x) return fp[j]!;
  const slope = fp[j + 1]! - fp[j]!;
  return slope * (x - j) + fp[j]!;
}

/** diffusers `_sigma_to_t` (numpy: log_sigmas is a float32 array, the rest float64, or float32 on `tensors`). */
export function sigmaToT(sigma: number, logSigmas: Float32Array, tensors = false): number {
  // On a float32 tensor sigma (KDPM2's interpolated ones) numpy takes the log, the distances, the weight and
  // `(1 − w)·low + w·high` in float32, each product and the sum rounded.
  const r = tensors ? f : (x: number) => x;
  const logSigma = tensors ? f(Math.log(Math.max(sigma, f(1e-10)))) : Math.log(Math.max(sigma, 1e-10));
  const n = logSigmas.length;
  // argmax of cumsum(dists >= 0): the last index whose log_sigma is <= logSigma (0 when none), clipped to n-2.
  let low = 0;
  let count = 0;
  let best = -1;
  for (let i = 0; i < n; i++) {
    if (r(logSigma - logSigmas[i]!) >= 0) count++;
    if (count > best) {
      best = count;
      low = i;
    }
  }
  low = Math.min(low, n - 2);
  const lo = logSigmas[low]!;
  const hi = logSigmas[low + 1]!;
  // low - high subtracts two float32 scalars, so numpy rounds it to float32; low - log_sigma is float64 (but on tensors).
  const w = Math.min(Math.max(r(r(lo - logSigma) / f(lo - hi)), 0), 1);
  return tensors ? f(f(f(1 - w) * low) + f(w * (low + 1))) : (1 - w) * low + w * (low + 1);
}

/** diffusers `_convert_to_karras` (float64, rho 7). */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  const rho = 7;
  const minInv = sigmaMin ** (1 / rho);
  const maxInv = sigmaMax ** (1 / rho);
  return npLinspace(0, 1, n).map((r) => (maxInv + r * (minInv - maxInv)) ** rho);
}

/** diffusers `_convert_to_exponential`: `np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))`, float64. */
export function exponentialSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  return npLinspace(Math.log(sigmaMax), Math.log(sigmaMin), n).map(Math.exp);
}

/**
 * diffusers `_convert_to_beta` ("Beta Sampling is All You Need"; ComfyUI's "beta" scheduler): `sigma_min + ppf ·
 * (sigma_max − sigma_min)` with scipy's `beta.ppf(t, 0.6, 0.6)` for t in `1 − np.linspace(0, 1, n)`, float64 (0.6 is
 * the only shape any class passes). The ends are exact: ppf(1) = 1, ppf(0) = 0.
 */
export function betaSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  return npLinspace(0, 1, n).map((t) => sigmaMin + betaPpf(1 - t, 0.6, 0.6) * (sigmaMax - sigmaMin));
}

/** The ramp's n sigmas from sigma_max down to sigma_min (float64). */
export function rampSigmas(ramp: SigmaRamp, sigmaMin: number, sigmaMax: number, n: number): number[] {
  if (ramp === 'karras') return karrasSigmas(sigmaMin, sigmaMax, n);
  return ramp === 'exponential' ? exponentialSigmas(sigmaMin, sigmaMax, n) : betaSigmas(sigmaMin, sigmaMax, n);
}

/** `np.linspace(0, last - 1, n + 1).round()[::-1][:-1]`: the linspace spacing (DPM-Solver singlestep's only one). */
export function linspaceTimesteps(n: number, last: number): number[] {
  return npLinspace(0, last - 1, n + 1).map(npRound).reverse().slice(0, -1);
}

/**
 * The integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS) before any sigma conversion: linspace and
 * leading over n + 1 points less the last, trailing over n. `last` is where the schedule ends (DPM-Solver's
 * lambda_min_clipped cuts it short).
 */
export function multistepTimesteps(className: string, c: ResolvedConfig, n: number, last = num(c, 'num_train_timesteps')): number[] {
  const train = num(c, 'num_train_timesteps');
  switch (str(c, 'timestep_spacing')) {
    case 'linspace':
      return linspaceTimesteps(n, last);
    case 'leading': {
      const ratio = Math.floor(last / (n + 1));
      return npArange(0, n + 1, 1).map((i) => i * ratio).reverse().slice(0, -1).map((t) => t + num(c, 'steps_offset'));
    }
    case 'trailing':
      return npArange(last, 0, -train / n).map((t) => npRound(t) - 1);
    default:
      return unsupportedSpacing(className, c);
  }
}

/**
 * UniPC's, DEIS's and SA-Solver's Karras / exponential / beta schedule: the sigmas from the bounds (the config's
 * sigma_min / sigma_max, else the table's ends) and the timesteps back from them (Karras rounded, the others truncated
 * by the int64 cast).
 */
export function convertedSigmas(c: ResolvedConfig, ramp: SigmaRamp, table: Float32Array, n: number): { sigmas: number[]; timesteps: number[] } {
  const logSigmas = table.map(logf);
  // On the flipped table: in_sigmas[-1] is the smallest sigma, in_sigmas[0] the largest.
  const sMin = (c.sigma_min as number | null | undefined) ?? table[0]!;
  const sMax = (c.sigma_max as number | null | undefined) ?? table[table.length - 1]!;
  const sigmas = rampSigmas(ramp, sMin, sMax, n);
  const timesteps = sigmas.map((s) => (ramp === 'karras' ? npRound(sigmaToT(s, logSigmas)) : Math.trunc(sigmaToT(s, logSigmas))));
  return { sigmas, timesteps };
}

/**
 * The num_inference_steps every class accepts: 1 to num_train_timesteps (diffusers raises above it). A class with
 * limits of its own narrows this in its `stepRange` (PNDM, LCM); its constructor checks against the same range
 * (checkSteps), and the request parser reads it before a request queues, so the limits are stated once.
 */
export function trainStepRange(config: ResolvedConfig): StepRange {
  const train = num(config, 'num_train_timesteps');
  return { min: 1, max: train, why: `num_train_timesteps is ${train}` };
}

/**
 * The step counts of the classes that look each timestep up in alphas_cumprod (DDIM, DDPM, PNDM). Leading spacing
 * adds steps_offset after spacing the steps, so from some count on the first timestep lies past the table (at
 * num_train_timesteps steps with steps_offset 1: timestep 1000 of 0–999), where diffusers raises IndexError; the
 * range stops below the first such count.
 */
export function alphasStepRange(config: ResolvedConfig): StepRange {
  const r = trainStepRange(config);
  const offset = num(config, 'steps_offset');
  if (str(config, 'timestep_spacing') !== 'leading' || !(offset > 0)) return r;
  const train = r.max;
  const first = (n: number) => (n - 1) * Math.floor(train / n) + offset;
  let max = 0;
  while (max < train && first(max + 1) < train) max++;
  if (max === train) return r;
  return { min: 1, max, why: `${r.why}; timestep_spacing "leading" with steps_offset ${offset} would start ${max + 1} steps at timestep ${first(max + 1)}, past the last (${train - 1})` };
}

/** A step count outside the class's range is the request's error. */
export function checkSteps(className: string, n: number, range: StepRange): void {
  if (!Number.isInteger(n) || n < range.min || n > range.max) {
    throw new RuntimeError('INVALID_INPUT', `num_inference_steps must be an integer from ${range.min} to ${range.max} for ${className} (${range.why}), got ${n}`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// add_noise (image-to-image and inpainting start from a noised image latent)

export function checkIndex(className: string, index: number, timesteps: readonly number[]): void {
  if (!Number.isInteger(index) || index < 0 || index >= timesteps.length) {
    throw new RangeError(`${className}: no timestep at index ${index} of ${timesteps.length}`);
  }
}

/** DDPM-style `add_noise` (DDIM, PNDM, LCM): `ac[t] ** 0.5 * x + (1 - ac[t]) ** 0.5 * n`, float32 tensor ops. */
export function addNoiseAlphas(className: string, ac: Float32Array, timesteps: readonly number[], index: number, x: Float32Array, n: Float32Array): Float32Array {
  checkIndex(className, index, timesteps);
  const a = ac[timesteps[index]!]!;
  const sa = f(Math.sqrt(a));
  const sb = f(Math.sqrt(f(1 - a)));
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = f(sa * x[i]!) + f(sb * n[i]!);
  return out;
}

/** Euler-family `add_noise`: `x + n * sigma` (sigmas[step index]), float32. */
export function addNoiseSigma(className: string, sigmas: Float32Array, timesteps: readonly number[], index: number, x: Float32Array, n: Float32Array): Float32Array {
  checkIndex(className, index, timesteps);
  const sigma = sigmas[index]!;
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i]! + f(n[i]! * sigma);
  return out;
}

export function checkBeginIndex(className: string, index: number, timesteps: readonly number[]): void {
  // The end is allowed: strength 0 cuts every step.
  if (!Number.isInteger(index) || index < 0 || index > timesteps.length) throw new RangeError(`${className}: begin index ${index} outside 0..${timesteps.length}`);
}
