/**
 * @module SASolverScheduler (diffusers; SA-Solver, arXiv 2309.05019): a stochastic Adams predictor (orders 1–4) and
 * corrector (orders 1–4) on the data or the noise prediction, with diffusers' default tau (1 for timesteps 200–800,
 * else 0) and fresh noise drawn on every step; float32 like torch. Its step coefficients are float32 scalar tensors in
 * diffusers, whose `exp` and `log` torch computes with SLEEF (../torchmath.ts): followed here, so a step is bit-equal
 * to torch 1.13's.
 */

import { expf, logf as torchLogf } from '../torchmath.js';
import type { StepResult } from '../types.js';
import {
  addNoiseAlphas,
  alphasCumprod,
  BETA_DEFAULTS,
  bool,
  checkIgnoredVariance,
  checkOneRamp,
  checkSteps,
  type ConfigValue,
  f,
  multistepTimesteps,
  num,
  oneOf,
  type ResolvedConfig,
  trainStepRange,
  unsupported,
} from './common.js';
import { convertModelOutput, MultistepSchedule } from './base.js';
import { lambdaClipped } from './dpmsolver.js';

export const SASOLVER_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  predictor_order: 2,
  corrector_order: 2,
  prediction_type: 'epsilon',
  tau_func: null,
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  algorithm_type: 'data_prediction',
  lower_order_final: true,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_flow_sigmas: false,
  flow_shift: 1.0,
  lambda_min_clipped: -Infinity,
  variance_type: null,
  timestep_spacing: 'linspace',
  steps_offset: 0,
};

/** Read by `_convert_to_karras` / `_exponential` / `_beta` where the config has them (hidden keys, see index.ts). */
export const SASOLVER_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };

const NAME = 'SASolverScheduler';
const MAX_ORDER = 4;

/** diffusers' default `tau_func`: stochastic in the middle of the schedule only. */
const tau = (t: number): number => (t >= 200 && t <= 800 ? 1 : 0);

/**
 * `lagrange_polynomial_coefficient`: row p holds the coefficients (highest power first) of the Lagrange basis
 * polynomial of point p, in torch's order of operations.
 */
function lagrange(l: readonly number[]): number[][] {
  if (l.length === 1) return [[1]];
  return l.map((lp, p) => {
    const o = l.filter((_, q) => q !== p);
    let d = f(lp - o[0]!);
    for (let q = 1; q < o.length; q++) d = f(d * f(lp - o[q]!));
    const inv = f(1 / d);
    if (o.length === 1) return [inv, f(-o[0]! / d)];
    if (o.length === 2) return [inv, f(f(-o[0]! - o[1]!) / d), f(f(o[0]! * o[1]!) / d)];
    const [a, b, c] = o as [number, number, number];
    return [inv, f(f(f(-a - b) - c) / d), f(f(f(f(a * b) + f(a * c)) + f(b * c)) / d), f(f(f(-a * b) * c) / d)];
  });
}

/** `get_coefficients_exponential_positive`: ∫ e^{(1+τ²)x}·x^n over [s, e] (data prediction). */
function expPositive(n: number, s: number, e: number, k: number): number {
  const ec = f(k * e);
  const sc = f(k * s);
  const E = expf(ec);
  const d = expf(-f(ec - sc));
  if (n === 0) return f(f(E * f(1 - d)) / k);
  if (n === 1) return f(f(E * f(f(ec - 1) - f(f(sc - 1) * d))) / (k * k));
  if (n === 2) {
    const p = (x: number) => f(f(f(x * x) - f(2 * x)) + 2);
    return f(f(E * f(p(ec) - f(p(sc) * d))) / (k * k * k));
  }
  const p = (x: number) => f(f(f(f(f(x * x) * x) - f(3 * f(x * x))) + f(6 * x)) - 6);
  return f(f(E * f(p(ec) - f(p(sc) * d))) / (k * k * k * k));
}

/** `get_coefficients_exponential_negative`: ∫ e^{−x}·x^n over [s, e] (noise prediction). */
function expNegative(n: number, s: number, e: number): number {
  const E = expf(-e);
  const D = expf(f(e - s));
  if (n === 0) return f(E * f(D - 1));
  if (n === 1) return f(E * f(f(f(s + 1) * D) - f(e + 1)));
  if (n === 2) {
    const p = (x: number) => f(f(f(x * x) + f(2 * x)) + 2);
    return f(E * f(f(p(s) * D) - p(e)));
  }
  const p = (x: number) => f(f(f(f(f(x * x) * x) + f(3 * f(x * x))) + f(6 * x)) + 6);
  return f(E * f(f(p(s) * D) - p(e)));
}

export class SASolver extends MultistepSchedule {
  readonly name = NAME;
  readonly #predictor: number;
  readonly #corrector: number;
  /** diffusers' `max(predictor_order, corrector_order - 1)`: how many outputs it keeps, and its warm-up length. */
  readonly #kept: number;
  readonly #prediction: string;
  readonly #x0: boolean;
  readonly #lowerOrderFinal: boolean;
  /** alphas_cumprod, for `add_noise` (diffusers' copy of DDPM's: √ᾱ_t·x + √(1−ᾱ_t)·n at the integer timestep). */
  readonly #ac: Float32Array;
  /** alpha_t, sigma_t and lambda_t of every sigma (torch's float32, SLEEF log). */
  #asl: [number, number, number][] = [];
  /** Converted model outputs of the last steps, oldest first. */
  #outputs: Float32Array[] = [];
  #lowerOrderNums = 0;
  /** What the last step's predictor started from, the noise it drew, its tau and the corrector order it left. */
  #last: { sample: Float32Array; noise: Float32Array; tau: number; corrector: number } | undefined;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    this.#x0 = oneOf(name, config, 'algorithm_type', ['data_prediction', 'noise_prediction']) === 'data_prediction';
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.#predictor = num(config, 'predictor_order');
    this.#corrector = num(config, 'corrector_order');
    for (const [k, v] of [['predictor_order', this.#predictor], ['corrector_order', this.#corrector]] as const) {
      if (!Number.isInteger(v) || v < 1 || v > MAX_ORDER) unsupported(name, `${k} ${v} (1 to ${MAX_ORDER})`);
    }
    this.#kept = Math.max(this.#predictor, this.#corrector - 1);
    this.#lowerOrderFinal = bool(config, 'lower_order_final');
    for (const k of ['thresholding', 'use_flow_sigmas']) if (bool(config, k)) unsupported(name, k);
    checkOneRamp(name, config);
    checkIgnoredVariance(name, config);
    // A callable in diffusers, which no JSON config can hold: the runtime runs its default.
    if (config.tau_func !== null) unsupported(name, 'tau_func (a Python callable; the runtime runs diffusers\' default, 1 for timesteps 200 to 800, else 0)');

    const ac = alphasCumprod(name, config, false);
    this.#ac = ac;
    const train = num(config, 'num_train_timesteps');
    const timesteps = multistepTimesteps(name, config, numInferenceSteps, train - lambdaClipped(ac, num(config, 'lambda_min_clipped')));
    // The final sigma is the table's first, or a ramp's last repeated (diffusers has no final_sigmas_type here).
    this.sigmaSchedule(config, ac, timesteps, numInferenceSteps, false);
    this.#asl = Array.from(this.sig, (sigma) => {
      const alpha = f(1 / f(Math.sqrt(f(f(sigma * sigma) + 1))));
      const s = f(sigma * alpha);
      return [alpha, s, f(torchLogf(alpha) - torchLogf(s))];
    });
  }

  override addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseAlphas(this.name, this.#ac, this.timesteps, index, original, noise);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    const nSteps = this.timesteps.length;
    const converted = convertModelOutput(modelOutput, sample, this.sig[i]!, this.#prediction, this.#x0);
    let x = sample;
    const last = this.#last;
    if (i > 0 && last !== undefined) {
      // The corrector redoes the last step from where it started, with this step's output and the same noise.
      const ms = [converted, ...this.#outputs.slice().reverse()];
      x = this.#update(i - 1, i, last.sample, ms, last.noise, last.corrector, last.tau, false);
    }
    this.#outputs.push(converted);
    if (this.#outputs.length > this.#kept) this.#outputs.shift();
    // diffusers draws on every step, tau 0 or not, the last included.
    const z = noise();
    const p = this.#lowerOrderFinal ? Math.min(this.#predictor, nSteps - i) : this.#predictor;
    const c = this.#lowerOrderFinal ? Math.min(this.#corrector, nSteps - i + 1) : this.#corrector;
    const t = tau(this.timesteps[i]!);
    this.#last = { sample: x, noise: z, tau: t, corrector: Math.min(c, this.#lowerOrderNums + 2) };
    const prev = this.#update(i, i + 1, x, this.#outputs.slice().reverse(), z, Math.min(p, this.#lowerOrderNums + 1), t, true);
    if (this.#lowerOrderNums < this.#kept) this.#lowerOrderNums++;
    this.index++;
    return { prevSample: prev };
  }

  /**
   * x at sigmas[from] to sigmas[to], with the outputs `ms` (newest first) and the noise `z`:
   * `stochastic_adams_bashforth_update` (the predictor, whose newest output is at `from`) or
   * `stochastic_adams_moulton_update` (the corrector, whose newest output is at `to`: it redoes the last step).
   */
  #update(from: number, to: number, x: Float32Array, ms: readonly Float32Array[], z: Float32Array, order: number, t: number, predictor: boolean): Float32Array {
    const [alphaT, sigmaT, lambdaT] = this.#asl[to]!;
    const [alphaS0, sigmaS0, lambdaS0] = this.#asl[from]!;
    const h = f(lambdaT - lambdaS0);
    // The interpolation points, one per output
    const top = predictor ? from : to;
    const lambdas: number[] = [];
    for (let j = 0; j < order; j++) lambdas.push(this.#asl[top - j]![2]);
    const k = 1 + t * t;
    const lag = lagrange(lambdas);
    const coefs = lag.map((row) => {
      let c = 0;
      for (let j = 0; j < order; j++) c = f(c + f(row[j]! * (this.#x0 ? expPositive(order - 1 - j, lambdaS0, lambdaT, k) : expNegative(order - 1 - j, lambdaS0, lambdaT))));
      return c;
    });
    if (this.#x0 && order === 2) {
      // diffusers' O(h³) modification of the second-order coefficients ("similar to UniPC")
      const e = expf(f(k * lambdaT));
      const tail = f(f(f(h * k) - 1) + expf(f(k * -h)));
      const add = predictor
        ? f(f(e * f(f(f(h * h) / 2) - f(tail / (k * k)))) / f(lambdaS0 - this.#asl[from - 1]![2]))
        : f(e * f(f(h / 2) - f(tail / f((k * k) * h))));
      coefs[0] = f(coefs[0]! + add);
      coefs[1] = f(coefs[1]! - add);
    }
    const weights = coefs.map((c) => (this.#x0 ? f(f(f(k * sigmaT) * expf(f(-(t * t) * lambdaT))) * c) : f(f(-k * alphaT) * c)));
    const a = this.#x0 ? f(expf(f(-(t * t) * h)) * f(sigmaT / sigmaS0)) : f(alphaT / alphaS0);
    const w = this.#x0
      ? f(sigmaT * f(Math.sqrt(f(1 - expf(f(-2 * t * t * h))))))
      : f(f(t * sigmaT) * f(Math.sqrt(f(expf(f(2 * h)) - 1))));
    const n = x.length;
    const out = new Float32Array(n);
    for (let q = 0; q < n; q++) {
      let g = 0;
      for (let j = 0; j < order; j++) g = f(g + f(weights[j]! * ms[j]![q]!));
      out[q] = f(f(f(a * x[q]!) + g) + f(w * z[q]!));
    }
    return out;
  }
}
