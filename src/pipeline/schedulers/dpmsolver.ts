/**
 * @module DPMSolverMultistepScheduler (diffusers): DPM-Solver++ / DPM-Solver, orders 1–2, midpoint or Heun,
 * optional Karras sigmas; float32 like torch.
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
  exponentialSigmas,
  f,
  karrasSigmas,
  multistepTimesteps,
  npInterpIndex,
  npRound,
  num,
  oneOf,
  type ResolvedConfig,
  sigmasFromAlphas,
  sigmaToT,
  str,
  trainStepRange,
  unsupported,
  logf,
} from './common.js';
import { convertModelOutput, MultistepSchedule } from './base.js';

/** The solver options DPMSolverMultistepScheduler and EDMDPMSolverMultistepScheduler share, with their defaults. */
export const DPM_SOLVER_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  solver_order: 2,
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: true,
  euler_at_final: false,
};

export const DPM_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  ...DPM_SOLVER_DEFAULTS,
  prediction_type: 'epsilon',
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_lu_lambdas: false,
  use_flow_sigmas: false,
  flow_shift: 1.0,
  final_sigmas_type: 'zero',
  lambda_min_clipped: -Infinity,
  variance_type: null,
  timestep_spacing: 'linspace',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
  use_dynamic_shifting: false,
  time_shift_type: 'exponential',
};

/**
 * Not `__init__` options, but `_convert_to_karras` / `_convert_to_exponential` take their bounds from the config when
 * it has them: a file's own keys, or an Euler or UniPC config's carried over by a request's switch.
 */
export const DPM_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };


/**
 * The heun solver type's `(e^x − 1)/x`-like ratios as float32 divisions, and at a zero step their limit: a Karras
 * schedule ending at sigma_min repeats its last sigma, where diffusers divides 0 by 0 and returns NaN.
 */
const ratio = (num: number, den: number, limit: number) => (den === 0 ? limit : f(num / den));

/** Which of diffusers' DPM-Solver updates a scheduler runs. */
export interface DPMSolverKind {
  readonly order: number;
  /** dpmsolver++ / sde-dpmsolver++: the model output converted to x0 (else to the noise). */
  readonly plusPlus: boolean;
  /** The SDE variants: fresh noise on every step. */
  readonly sde: boolean;
  readonly heun: boolean;
}

/**
 * The multistep updates of DPMSolverMultistepScheduler and EDMDPMSolverMultistepScheduler: the two classes differ in
 * their schedule, in how a model output becomes x0 (`convert`) and in alpha_t, sigma_t, lambda_t of a sigma (`asl`).
 */
export abstract class DPMSolverSteps extends MultistepSchedule {
  abstract readonly config: ResolvedConfig;
  readonly #order: number;
  readonly #plusPlus: boolean;
  readonly #sde: boolean;
  readonly #heun: boolean;
  #outputs: Float32Array[] = [];
  #lowerOrderNums = 0;

  constructor(kind: DPMSolverKind) {
    super();
    this.#order = kind.order;
    this.#plusPlus = kind.plusPlus;
    this.#sde = kind.sde;
    this.#heun = kind.heun;
  }

  /** `convert_model_output`: x0 (dpmsolver++) or the noise, at sigma. */
  protected abstract convert(modelOutput: Float32Array, sample: Float32Array, sigma: number): Float32Array;

  /** `_sigma_to_alpha_sigma_t` and lambda = log alpha_t − log sigma_t (float32). */
  protected asl(sigma: number): [number, number, number] {
    return alphaSigmaLambda(sigma);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    const nSteps = this.timesteps.length;
    const c = this.config;
    const lowerOrderFinal =
      i === nSteps - 1 &&
      (bool(c, 'euler_at_final') || (bool(c, 'lower_order_final') && nSteps < 15) || str(c, 'final_sigmas_type') === 'zero');
    const converted = this.convert(modelOutput, sample, this.sig[i]!);
    this.#outputs.push(converted);
    if (this.#outputs.length > this.#order) this.#outputs.shift();
    // The SDE variants draw on every step, the last included, as diffusers does.
    const z = this.#sde ? noise() : undefined;
    const lowerOrderSecond = i === nSteps - 2 && bool(c, 'lower_order_final') && nSteps < 15;
    let prev: Float32Array;
    if (this.#order === 1 || this.#lowerOrderNums < 1 || lowerOrderFinal) prev = this.#update(sample, 1, z);
    else if (this.#order === 2 || this.#lowerOrderNums < 2 || lowerOrderSecond) prev = this.#update(sample, 2, z);
    else prev = this.#thirdOrder(sample, z);
    if (this.#lowerOrderNums < this.#order) this.#lowerOrderNums++;
    this.index++;
    return { prevSample: prev, ...(this.#plusPlus ? { denoised: converted } : {}) };
  }

  /**
   * diffusers' first- and second-order updates, all four algorithm types: x_t = a·x + b·D0 [+ c·D1] [+ d·z] with the
   * signs folded into the coefficients (x − y and x + (−y) round alike), D0 = m0, D1 = (1/r0)·(m0 − m1).
   */
  #update(s: Float32Array, order: 1 | 2, z: Float32Array | undefined): Float32Array {
    const i = this.index;
    const [alphaT, sigmaT, lambdaT] = this.asl(this.sig[i + 1]!);
    const [alphaS0, sigmaS0, lambdaS0] = this.asl(this.sig[i]!);
    const h = f(lambdaT - lambdaS0);
    let a: number;
    let b: number;
    let c = 0;
    let d = 0;
    if (this.#sde && this.#plusPlus) {
      const em2 = f(1 - f(Math.exp(f(-2 * h))));
      a = f(f(sigmaT / sigmaS0) * f(Math.exp(-h)));
      b = f(alphaT * em2);
      if (order === 2) c = this.#heun ? f(alphaT * f(ratio(em2, f(-2 * h), -1) + 1)) : f(0.5 * b);
      d = f(sigmaT * f(Math.sqrt(em2)));
    } else if (this.#sde) {
      const ep1 = f(f(Math.exp(h)) - 1);
      a = f(alphaT / alphaS0);
      b = -f(2 * f(sigmaT * ep1));
      if (order === 2) c = this.#heun ? -f(2 * f(sigmaT * f(ratio(ep1, h, 1) - 1))) : -f(sigmaT * ep1);
      d = f(sigmaT * f(Math.sqrt(f(f(Math.exp(f(2 * h))) - 1))));
    } else if (this.#plusPlus) {
      const em1 = f(f(Math.exp(-h)) - 1);
      a = f(sigmaT / sigmaS0);
      b = -f(alphaT * em1);
      if (order === 2) c = this.#heun ? f(alphaT * f(ratio(em1, h, -1) + 1)) : -f(0.5 * f(alphaT * em1));
    } else {
      const ep1 = f(f(Math.exp(h)) - 1);
      a = f(alphaT / alphaS0);
      b = -f(sigmaT * ep1);
      if (order === 2) c = this.#heun ? -f(sigmaT * f(ratio(ep1, h, 1) - 1)) : -f(0.5 * f(sigmaT * ep1));
    }
    const n = this.#outputs.length;
    const m0 = this.#outputs[n - 1]!;
    const m1 = order === 2 ? this.#outputs[n - 2]! : undefined;
    const invR0 = m1 ? f(1 / f(f(lambdaS0 - this.asl(this.sig[i - 1]!)[2]) / h)) : 0;
    const out = new Float32Array(s.length);
    for (let k = 0; k < s.length; k++) {
      let v = f(f(a * s[k]!) + f(b * m0[k]!));
      if (m1) v = f(v + f(c * f(invR0 * f(m0[k]! - m1[k]!))));
      out[k] = z ? f(v + f(d * z[k]!)) : v;
    }
    return out;
  }

  /**
   * `multistep_dpm_solver_third_order_update` (dpmsolver++, dpmsolver, sde-dpmsolver++): the last three outputs give
   * D0, D1 (a first difference extrapolated) and D2 (a second difference); x_t = a·x + b·D0 + c·D1 + d·D2 [+ e·z].
   */
  #thirdOrder(s: Float32Array, z: Float32Array | undefined): Float32Array {
    const i = this.index;
    const [alphaT, sigmaT, lambdaT] = this.asl(this.sig[i + 1]!);
    const [alphaS0, sigmaS0, lambdaS0] = this.asl(this.sig[i]!);
    const lambdaS1 = this.asl(this.sig[i - 1]!)[2];
    const lambdaS2 = this.asl(this.sig[i - 2]!)[2];
    const n = this.#outputs.length;
    const [m0, m1, m2] = [this.#outputs[n - 1]!, this.#outputs[n - 2]!, this.#outputs[n - 3]!];
    const h = f(lambdaT - lambdaS0);
    const r0 = f(f(lambdaS0 - lambdaS1) / h);
    const r1 = f(f(lambdaS1 - lambdaS2) / h);
    const inv0 = f(1 / r0);
    const inv1 = f(1 / r1);
    const w = f(r0 / f(r0 + r1));
    const inv01 = f(1 / f(r0 + r1));
    let a: number;
    let b: number;
    let c: number;
    let d: number;
    let e = 0;
    if (this.#sde) {
      const em2 = f(1 - f(Math.exp(f(-2 * h))));
      a = f(f(sigmaT / sigmaS0) * f(Math.exp(-h)));
      b = f(alphaT * em2);
      c = f(alphaT * f(f(em2 / f(-2 * h)) + 1));
      d = f(alphaT * f(f(f(em2 - f(2 * h)) / f(f(2 * h) * f(2 * h))) - 0.5));
      e = f(sigmaT * f(Math.sqrt(em2)));
    } else if (this.#plusPlus) {
      const em1 = f(f(Math.exp(-h)) - 1);
      a = f(sigmaT / sigmaS0);
      b = -f(alphaT * em1);
      c = f(alphaT * f(f(em1 / h) + 1));
      d = -f(alphaT * f(f(f(em1 + h) / f(h * h)) - 0.5));
    } else {
      const ep1 = f(f(Math.exp(h)) - 1);
      a = f(alphaT / alphaS0);
      b = -f(sigmaT * ep1);
      c = -f(sigmaT * f(f(ep1 / h) - 1));
      d = -f(sigmaT * f(f(f(ep1 - h) / f(h * h)) - 0.5));
    }
    const out = new Float32Array(s.length);
    for (let k = 0; k < s.length; k++) {
      const d10 = f(inv0 * f(m0[k]! - m1[k]!));
      const d11 = f(inv1 * f(m1[k]! - m2[k]!));
      const diff = f(d10 - d11);
      const D1 = f(d10 + f(w * diff));
      const D2 = f(inv01 * diff);
      let v = f(f(f(a * s[k]!) + f(b * m0[k]!)) + f(c * D1));
      v = f(v + f(d * D2));
      out[k] = z ? f(v + f(e * z[k]!)) : v;
    }
    return out;
  }
}

const DPM_NAME = 'DPMSolverMultistepScheduler';

/** A DPMSolverMultistepScheduler config's solver options, checked (the step count first, as diffusers fails). */
function dpmOptions(config: ResolvedConfig, numInferenceSteps: number): DPMSolverKind & { prediction: string } {
  const name = DPM_NAME;
  checkSteps(name, numInferenceSteps, trainStepRange(config));
  // As diffusers' __init__ does, DEIS's and UniPC's options (a config `from_config` carries over) map to DPM-Solver's.
  const algorithm =
    config.algorithm_type === 'deis' ? 'dpmsolver++' : oneOf(name, config, 'algorithm_type', ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++', 'sde-dpmsolver']);
  const plusPlus = algorithm.endsWith('++');
  const solver = ['logrho', 'bh1', 'bh2'].includes(String(config.solver_type)) ? 'midpoint' : oneOf(name, config, 'solver_type', ['midpoint', 'heun']);
  const prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
  const order = num(config, 'solver_order');
  if (![1, 2, 3].includes(order)) unsupported(name, `solver_order ${order} (1 to 3)`);
  // diffusers has no third-order update for it (its step fails)
  if (order === 3 && algorithm === 'sde-dpmsolver') unsupported(name, 'solver_order 3 with algorithm_type "sde-dpmsolver" (use "sde-dpmsolver++")');
  for (const k of ['thresholding', 'use_beta_sigmas', 'use_lu_lambdas', 'use_flow_sigmas', 'use_dynamic_shifting']) {
    if (bool(config, k)) unsupported(name, k);
  }
  checkOneRamp(name, config);
  if (config.variance_type !== null) unsupported(name, `variance_type "${String(config.variance_type)}"`);
  const finalType = oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
  if (!plusPlus && finalType === 'zero') {
    unsupported(name, `final_sigmas_type "zero" with algorithm_type "${algorithm}" (diffusers refuses it too; use "sigma_min")`);
  }
  return { order, plusPlus, sde: algorithm.startsWith('sde-'), heun: solver === 'heun', prediction };
}

export class DPMSolverMultistep extends DPMSolverSteps {
  readonly name = DPM_NAME;
  readonly #prediction: string;
  readonly #toX0: boolean;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    const options = dpmOptions(config, numInferenceSteps);
    super(options);
    this.#prediction = options.prediction;
    this.#toX0 = options.plusPlus;
    const name = this.name;
    const train = num(config, 'num_train_timesteps');
    const finalType = str(config, 'final_sigmas_type');
    const ac = alphasCumprod(name, config, true);
    if (config.rescale_betas_zero_snr === true) ac[ac.length - 1] = 2 ** -24;
    // lambda_min_clipped cuts the schedule where lambda(t) falls below it (searchsorted on the flipped lambdas).
    const clip = num(config, 'lambda_min_clipped');
    let clippedIdx = 0;
    for (let i = ac.length - 1; i >= 0; i--) {
      const a = ac[i]!;
      const lambda = f(logf(f(Math.sqrt(a))) - logf(f(Math.sqrt(f(1 - a)))));
      if (lambda < clip) clippedIdx++;
      else break;
    }
    let timesteps = multistepTimesteps(name, config, numInferenceSteps, train - clippedIdx);
    const table = sigmasFromAlphas(ac);
    let sig: number[];
    const sMin = (config.sigma_min as number | null) ?? table[0]!;
    const sMax = (config.sigma_max as number | null) ?? table[table.length - 1]!;
    if (bool(config, 'use_karras_sigmas')) {
      const logSigmas = table.map(logf);
      // _convert_to_karras on the flipped table: sigma_min = table[0], sigma_max = table[-1] unless the config carries
      // bounds (DPM_HIDDEN).
      sig = karrasSigmas(sMin, sMax, numInferenceSteps);
      timesteps = sig.map((s) => sigmaToT(s, logSigmas));
      if (str(config, 'beta_schedule') !== 'squaredcos_cap_v2') timesteps = timesteps.map(npRound);
      else timesteps = timesteps.map(Math.trunc); // astype(int64)
    } else if (bool(config, 'use_exponential_sigmas')) {
      const logSigmas = table.map(logf);
      sig = exponentialSigmas(sMin, sMax, numInferenceSteps);
      timesteps = sig.map((s) => Math.trunc(sigmaToT(s, logSigmas))); // not rounded: astype(int64) truncates
    } else {
      sig = timesteps.map((t) => npInterpIndex(t, table));
    }
    const lastSigma = finalType === 'zero' ? 0 : f(Math.sqrt(f(f(1 - ac[0]!) / ac[0]!)));
    this.schedule(timesteps, Float32Array.from([...sig, lastSigma]));
  }

  protected convert(modelOutput: Float32Array, sample: Float32Array, sigma: number): Float32Array {
    return convertModelOutput(modelOutput, sample, sigma, this.#prediction, this.#toX0);
  }
}
