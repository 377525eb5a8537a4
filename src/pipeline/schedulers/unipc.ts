/**
 * @module UniPCMultistepScheduler (diffusers): the UniP predictor and UniC corrector, orders 1–3, bh1/bh2, on x0 or
 * on the noise; float32 like torch.
 */

import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  alphaSigmaLambda,
  BETA_DEFAULTS,
  bool,
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

export const UNIPC_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  solver_order: 2,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  predict_x0: true,
  solver_type: 'bh2',
  lower_order_final: true,
  disable_corrector: [],
  solver_p: null,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_flow_sigmas: false,
  flow_shift: 1.0,
  timestep_spacing: 'linspace',
  steps_offset: 0,
  final_sigmas_type: 'zero',
  rescale_betas_zero_snr: false,
  use_dynamic_shifting: false,
  time_shift_type: 'exponential',
  sigma_min: null,
  sigma_max: null,
  shift_terminal: null,
};

const MAX_ORDER = 3;

/**
 * `torch.linalg.solve(A, b)` for the small systems UniPC builds (at most 3×3), in float32 as LAPACK's sgetrf/sgetrs
 * do it: LU with partial pivoting (column scaled by the pivot's reciprocal), then the two triangular solves.
 */
export function solveF32(a: readonly (readonly number[])[], b: readonly number[]): number[] {
  const n = b.length;
  const m = a.map((row) => row.map(f));
  const x = b.map(f);
  const perm: number[] = [];
  for (let j = 0; j < n; j++) {
    let p = j;
    for (let i = j + 1; i < n; i++) if (Math.abs(m[i]![j]!) > Math.abs(m[p]![j]!)) p = i;
    perm.push(p);
    if (p !== j) [m[p], m[j]] = [m[j]!, m[p]!];
    const inv = f(1 / m[j]![j]!);
    for (let i = j + 1; i < n; i++) m[i]![j] = f(m[i]![j]! * inv);
    for (let i = j + 1; i < n; i++) for (let k = j + 1; k < n; k++) m[i]![k] = f(m[i]![k]! - f(m[i]![j]! * m[j]![k]!));
  }
  perm.forEach((p, j) => {
    if (p !== j) [x[p], x[j]] = [x[j]!, x[p]!];
  });
  for (let k = 0; k < n; k++) for (let i = k + 1; i < n; i++) x[i] = f(x[i]! - f(x[k]! * m[i]![k]!));
  for (let k = n - 1; k >= 0; k--) {
    x[k] = f(x[k]! / m[k]![k]!);
    for (let i = 0; i < k; i++) x[i] = f(x[i]! - f(x[k]! * m[i]![k]!));
  }
  return x;
}

/**
 * The einsum Σ rho_k·D1_k of the predictor and the corrector at element j, D1_k = (m_k − m0)/r_k, in the order torch
 * computes them: one pass over the latents, no temporaries.
 */
function weighed(rhos: readonly number[], ms: readonly Float32Array[], rks: readonly number[], base: number, j: number): number {
  let acc = f(rhos[0]! * f(f(ms[0]![j]! - base) / rks[0]!));
  for (let k = 1; k < ms.length; k++) acc = f(acc + f(rhos[k]! * f(f(ms[k]![j]! - base) / rks[k]!)));
  return acc;
}

export class UniPCMultistep extends MultistepSchedule {
  readonly name = 'UniPCMultistepScheduler';
  readonly #order: number;
  readonly #prediction: string;
  readonly #predictX0: boolean;
  readonly #bh1: boolean;
  readonly #disabled: ReadonlySet<number>;
  /** Converted model outputs of the last steps, oldest first (diffusers' `model_outputs` without its leading Nones). */
  #outputs: Float32Array[] = [];
  #lastSample: Float32Array | undefined;
  #thisOrder = 0;
  #lowerOrderNums = 0;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    // As diffusers' __init__ does, DPM-Solver's solver types (a config `from_config` carries over) become bh2.
    const solver = ['midpoint', 'heun', 'logrho'].includes(String(config.solver_type)) ? 'bh2' : oneOf(name, config, 'solver_type', ['bh1', 'bh2']);
    this.#bh1 = solver === 'bh1';
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.#predictX0 = bool(config, 'predict_x0');
    this.#order = num(config, 'solver_order');
    if (!Number.isInteger(this.#order) || this.#order < 1 || this.#order > MAX_ORDER) unsupported(name, `solver_order ${this.#order} (1 to ${MAX_ORDER})`);
    for (const k of ['thresholding', 'use_flow_sigmas', 'use_dynamic_shifting']) {
      if (bool(config, k)) unsupported(name, k);
    }
    checkOneRamp(name, config);
    if (config.solver_p !== null) unsupported(name, 'solver_p');
    if (config.shift_terminal !== null) unsupported(name, 'shift_terminal');
    this.#disabled = new Set(config.disable_corrector as number[]);
    const finalType = oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
    if (finalType === 'zero' && !bool(config, 'lower_order_final') && this.#order > 1) {
      // The last step would weigh earlier outputs by (lambda_s - lambda_s0) / h with h infinite: NaN (diffusers too).
      unsupported(name, 'lower_order_final false with final_sigmas_type "zero" and solver_order above 1 (the last step ends in NaN; use "sigma_min")');
    }

    const ac = alphasCumprod(name, config, true);
    if (config.rescale_betas_zero_snr === true) ac[ac.length - 1] = 2 ** -24;
    this.sigmaSchedule(config, ac, multistepTimesteps(name, config, numInferenceSteps), numInferenceSteps, finalType === 'zero');
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    const i = this.current();
    const nSteps = this.timesteps.length;
    const converted = convertModelOutput(modelOutput, sample, this.sig[i]!, this.#prediction, this.#predictX0);
    let x = sample;
    if (i > 0 && !this.#disabled.has(i - 1) && this.#lastSample !== undefined) x = this.#correct(converted, this.#lastSample, x, this.#thisOrder);
    this.#outputs.push(converted);
    if (this.#outputs.length > this.#order) this.#outputs.shift();
    const order = bool(this.config, 'lower_order_final') ? Math.min(this.#order, nSteps - i) : this.#order;
    this.#thisOrder = Math.min(order, this.#lowerOrderNums + 1);
    this.#lastSample = x;
    const prev = this.#predict(x, this.#thisOrder);
    if (this.#lowerOrderNums < this.#order) this.#lowerOrderNums++;
    this.index++;
    return { prevSample: prev };
  }

  /**
   * What the predictor and the corrector share, for the update from sigmas[from] to sigmas[to]: the coefficients of
   * x and m0, the B(h) the differences are scaled by, the ratios r_k of the earlier points (sigmas[from - k]) and
   * the right-hand side b of the order conditions.
   */
  #terms(from: number, to: number, order: number): { a: number; c0: number; bh: number; rks: number[]; rhs: number[] } {
    const [alphaT, sigmaT, lambdaT] = alphaSigmaLambda(this.sig[to]!);
    const [alphaS0, sigmaS0, lambdaS0] = alphaSigmaLambda(this.sig[from]!);
    const h = f(lambdaT - lambdaS0);
    const rks: number[] = [];
    for (let k = 1; k < order; k++) rks.push(f(f(alphaSigmaLambda(this.sig[from - k]!)[2] - lambdaS0) / h));
    rks.push(1);
    const hh = this.#predictX0 ? -h : h;
    const hPhi1 = f(Math.expm1(hh));
    let hPhiK = f(f(hPhi1 / hh) - 1);
    let factorial = 1;
    const bh = this.#bh1 ? hh : f(Math.expm1(hh));
    const rhs: number[] = [];
    for (let k = 1; k <= order; k++) {
      rhs.push(f(f(hPhiK * factorial) / bh));
      factorial *= k + 1;
      hPhiK = f(f(hPhiK / hh) - f(1 / factorial));
    }
    const [outer, a] = this.#predictX0 ? [alphaT, f(sigmaT / sigmaS0)] : [sigmaT, f(alphaT / alphaS0)];
    // On the noise, the step to sigma 0 is 0·∞ in diffusers (NaN); sigma_t·(e^h − 1) tends to alpha_t·sigma_s0/alpha_s0,
    // which makes the step the x0 prediction, as on x0.
    const c0 = !this.#predictX0 && sigmaT === 0 ? f(f(alphaT * sigmaS0) / alphaS0) : f(outer * hPhi1);
    return { a, c0, bh: f(outer * bh), rks, rhs };
  }

  /** The order conditions' matrix: row k holds r^k for every point (the last point's r is 1). */
  #matrix(rks: readonly number[], n: number): number[][] {
    const rows: number[][] = [];
    for (let k = 0; k < n; k++) rows.push(rks.slice(0, n).map((r) => (k === 0 ? 1 : k === 1 ? r : f(r * r))));
    return rows;
  }

  /** The earlier outputs the update weighs against m0 (newest first), `order − 1` of them. */
  #earlier(order: number): Float32Array[] {
    const out: Float32Array[] = [];
    for (let k = 1; k < order; k++) out.push(this.#outputs[this.#outputs.length - 1 - k]!);
    return out;
  }

  /** `multistep_uni_p_bh_update`: from sigmas[i] to sigmas[i + 1]; this step's converted output is the newest. */
  #predict(x: Float32Array, order: number): Float32Array {
    const i = this.index;
    const m0 = this.#outputs[this.#outputs.length - 1]!;
    const { a, c0, bh, rks, rhs } = this.#terms(i, i + 1, order);
    const ms = this.#earlier(order);
    const rhos = order === 2 ? [0.5] : order > 2 ? solveF32(this.#matrix(rks, order - 1), rhs.slice(0, order - 1)) : [];
    const n = x.length;
    const out = new Float32Array(n);
    for (let j = 0; j < n; j++) {
      const base = m0[j]!;
      let v = f(f(a * x[j]!) - f(c0 * base));
      if (ms.length > 0) v = f(v - f(bh * weighed(rhos, ms, rks, base, j)));
      out[j] = v;
    }
    return out;
  }

  /**
   * `multistep_uni_c_bh_update`: corrects this step's sample, which the last step predicted from `last`, with this
   * step's converted output; the stored outputs (newest first) end at the last step's.
   */
  #correct(mt: Float32Array, last: Float32Array, x: Float32Array, order: number): Float32Array {
    const i = this.index;
    const m0 = this.#outputs[this.#outputs.length - 1]!;
    const { a, c0, bh, rks, rhs } = this.#terms(i - 1, i, order);
    const ms = this.#earlier(order);
    const rhos = order === 1 ? [0.5] : solveF32(this.#matrix(rks, order), rhs);
    const rLast = rhos[rhos.length - 1]!;
    const out = new Float32Array(x.length);
    for (let j = 0; j < x.length; j++) {
      const base = m0[j]!;
      const dt = f(mt[j]! - base);
      let sum = f(rLast * dt);
      if (ms.length > 0) sum = f(weighed(rhos, ms, rks, base, j) + sum);
      out[j] = f(f(f(a * last[j]!) - f(c0 * base)) - f(bh * sum));
    }
    return out;
  }
}
