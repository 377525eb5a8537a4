/**
 * @module DPMSolverMultistepScheduler (diffusers): DPM-Solver++ / DPM-Solver, orders 1–2, midpoint or Heun,
 * optional Karras / exponential / beta sigmas or Lu lambdas; float32 like torch.
 */

import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  alphaSigmaLambda,
  BETA_DEFAULTS,
  bool,
  checkIgnoredVariance,
  checkOneRamp,
  checkSteps,
  type ConfigValue,
  f,
  multistepTimesteps,
  npInterpIndex,
  npLinspace,
  npRound,
  num,
  oneOf,
  rampSigmas,
  type ResolvedConfig,
  sigmaRamp,
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
 * Not `__init__` options, but `_convert_to_karras` / `_exponential` / `_beta` take their bounds from the config when
 * it has them: a file's own keys, or an Euler or UniPC config's carried over by a request's switch.
 */
export const DPM_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };


/**
 * The heun solver type's `(e^x − 1)/x`-like ratios as float32 divisions, and at a zero step their limit: a Karras
 * schedule ending at sigma_min repeats its last sigma, where diffusers divides 0 by 0 and returns NaN.
 */
const ratio = (num: number, den: number, limit: number) => (den === 0 ? limit : f(num / den));

/** `lambda_min_clipped`: how many of the last training timesteps have lambda(t) below it (torch.searchsorted on the flipped lambdas). */
export function lambdaClipped(ac: Float32Array, clip: number): number {
  let clipped = 0;
  for (let i = ac.length - 1; i >= 0; i--) {
    const a = ac[i]!;
    const lambda = f(logf(f(Math.sqrt(a))) - logf(f(Math.sqrt(f(1 - a)))));
    if (lambda < clip) clipped++;
    else break;
  }
  return clipped;
}

/**
 * DPM-Solver's schedule (multistep and singlestep) from its integer timesteps: the sigmas interpolated on the table, or
 * a Karras / exponential / beta ramp (bounds from the config's hidden sigma_min / sigma_max, else the table's ends), or
 * (multistep's `use_lu_lambdas`, `lu`) log-sigmas evenly spaced between the table's, each with its timesteps back from
 * it (Karras's and Lu's rounded where `roundKarras`, else truncated by the int64 cast); then the final sigma, 0 or the
 * table's first (`sigma_min`) — the table's even after a ramp, unlike UniPC's. Karras comes first, then Lu, then the
 * others, as diffusers tests them (its __init__ refuses two of Karras, exponential and beta, not Lu beside one).
 */
export function dpmSigmaSchedule(
  config: ResolvedConfig,
  ac: Float32Array,
  timesteps: number[],
  n: number,
  finalZero: boolean,
  roundKarras: boolean,
  lu = false,
): { timesteps: number[]; sig: Float32Array } {
  const table = sigmasFromAlphas(ac);
  let sig: number[];
  const sMin = (config.sigma_min as number | null | undefined) ?? table[0]!;
  const sMax = (config.sigma_max as number | null | undefined) ?? table[table.length - 1]!;
  const ramp = sigmaRamp(config);
  const logSigmas = table.map(logf);
  if (lu && ramp !== 'karras') {
    // `_convert_to_lu` (rho 1) on the flipped float32 log-sigmas, whose ends it reads; then np.exp
    sig = luLambdas(logSigmas[0]!, logSigmas[logSigmas.length - 1]!, n).map(Math.exp);
    timesteps = sig.map((s) => (roundKarras ? npRound : Math.trunc)(sigmaToT(s, logSigmas)));
  } else if (ramp) {
    sig = rampSigmas(ramp, sMin, sMax, n);
    timesteps = sig.map((s) => (ramp === 'karras' && roundKarras ? npRound : Math.trunc)(sigmaToT(s, logSigmas)));
  } else {
    sig = timesteps.map((t) => npInterpIndex(t, table));
  }
  const last = finalZero ? 0 : f(Math.sqrt(f(f(1 - ac[0]!) / ac[0]!)));
  return { timesteps, sig: Float32Array.from([...sig, last]) };
}

/**
 * diffusers `_convert_to_lu` (DPM-Solver's own schedule, Lu et al. 2022): n values from lambda_max down to lambda_min,
 * `lambda_max + ramp · (lambda_min − lambda_max)` over `np.linspace(0, 1, n)` (rho 1: its powers are exact), float64.
 * diffusers passes log-sigmas, not the solver's lambdas, as its bounds.
 */
export function luLambdas(lambdaMin: number, lambdaMax: number, n: number): number[] {
  return npLinspace(0, 1, n).map((r) => lambdaMax + r * (lambdaMin - lambdaMax));
}

/** Which DPM-Solver: on the x0 prediction (`++`) or the noise, an SDE (fresh noise every step), the heun solver type. */
export interface DpmForm {
  readonly plusPlus: boolean;
  readonly sde: boolean;
  readonly heun: boolean;
}

/**
 * The coefficients of diffusers' first- and second-order DPM-Solver updates from s to t (`t`, `s`: alphaSigmaLambda of
 * their sigmas), all four algorithm types: x_t = a·x + b·D0 [+ c·D1] [+ d·z], the signs folded into the coefficients
 * (x − y and x + (−y) round alike). The multistep solver steps from its last sigma, the singlestep one from the
 * start of its group; the formulas are the same.
 */
export function lowOrderCoefficients(
  form: DpmForm,
  t: readonly number[],
  s: readonly number[],
  order: 1 | 2,
): { a: number; b: number; c: number; d: number; h: number } {
  const [alphaT, sigmaT, lambdaT] = t as [number, number, number];
  const [alphaS, sigmaS, lambdaS] = s as [number, number, number];
  const h = f(lambdaT - lambdaS);
  let a: number;
  let b: number;
  let c = 0;
  let d = 0;
  if (form.sde && form.plusPlus) {
    const em2 = f(1 - f(Math.exp(f(-2 * h))));
    a = f(f(sigmaT / sigmaS) * f(Math.exp(-h)));
    b = f(alphaT * em2);
    if (order === 2) c = form.heun ? f(alphaT * f(ratio(em2, f(-2 * h), -1) + 1)) : f(0.5 * b);
    d = f(sigmaT * f(Math.sqrt(em2)));
  } else if (form.sde) {
    const ep1 = f(f(Math.exp(h)) - 1);
    a = f(alphaT / alphaS);
    b = -f(2 * f(sigmaT * ep1));
    if (order === 2) c = form.heun ? -f(2 * f(sigmaT * f(ratio(ep1, h, 1) - 1))) : -f(sigmaT * ep1);
    d = f(sigmaT * f(Math.sqrt(f(f(Math.exp(f(2 * h))) - 1))));
  } else if (form.plusPlus) {
    const em1 = f(f(Math.exp(-h)) - 1);
    a = f(sigmaT / sigmaS);
    b = -f(alphaT * em1);
    if (order === 2) c = form.heun ? f(alphaT * f(ratio(em1, h, -1) + 1)) : -f(0.5 * f(alphaT * em1));
  } else {
    const ep1 = f(f(Math.exp(h)) - 1);
    a = f(alphaT / alphaS);
    b = -f(sigmaT * ep1);
    if (order === 2) c = form.heun ? -f(sigmaT * f(ratio(ep1, h, 1) - 1)) : -f(0.5 * f(sigmaT * ep1));
  }
  return { a, b, c, d, h };
}

/**
 * x_t = a·x + b·D0 [+ c·D1] [+ d·z] elementwise as torch evaluates it, D1 = (1/r0)·(m0 − m1) where `m1` is given
 * (second order). The multistep solver's D0 is m0, the singlestep one's m1.
 */
export function lowOrderUpdate(
  k: { a: number; b: number; c: number; d: number },
  x: Float32Array,
  D0: Float32Array,
  m0: Float32Array,
  m1: Float32Array | undefined,
  invR0: number,
  z: Float32Array | undefined,
): Float32Array {
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    let v = f(f(k.a * x[i]!) + f(k.b * D0[i]!));
    if (m1) v = f(v + f(k.c * f(invR0 * f(m0[i]! - m1[i]!))));
    out[i] = z ? f(v + f(k.d * z[i]!)) : v;
  }
  return out;
}

/** Which of diffusers' multistep DPM-Solver updates a scheduler runs: its form and its order. */
export interface DPMSolverKind extends DpmForm {
  readonly order: number;
}

/**
 * The coefficients of diffusers' third-order DPM-Solver updates from s to t (multistep: from its last sigma;
 * singlestep: from the start of its group), x_t = a·x + b·D0 + c·D1 + d·D2 [+ e·z], the signs folded into them: the
 * three algorithm types with a third-order form (dpmsolver++, dpmsolver, sde-dpmsolver++).
 */
export function thirdOrderCoefficients(form: DpmForm, t: readonly number[], s: readonly number[]): { a: number; b: number; c: number; d: number; e: number; h: number } {
  const [alphaT, sigmaT, lambdaT] = t as [number, number, number];
  const [alphaS, sigmaS, lambdaS] = s as [number, number, number];
  const h = f(lambdaT - lambdaS);
  if (form.sde) {
    const em2 = f(1 - f(Math.exp(f(-2 * h))));
    const m2h = f(-2 * h);
    return {
      a: f(f(sigmaT / sigmaS) * f(Math.exp(-h))),
      b: f(alphaT * em2),
      c: f(alphaT * f(f(em2 / m2h) + 1)),
      d: f(alphaT * f(f(f(em2 + m2h) / f(m2h * m2h)) - 0.5)),
      e: f(sigmaT * f(Math.sqrt(em2))),
      h,
    };
  }
  if (form.plusPlus) {
    const em1 = f(f(Math.exp(-h)) - 1);
    return {
      a: f(sigmaT / sigmaS),
      b: -f(alphaT * em1),
      c: f(alphaT * f(f(em1 / h) + 1)),
      d: -f(alphaT * f(f(f(em1 + h) / f(h * h)) - 0.5)),
      e: 0,
      h,
    };
  }
  const ep1 = f(f(Math.exp(h)) - 1);
  return {
    a: f(alphaT / alphaS),
    b: -f(sigmaT * ep1),
    c: -f(sigmaT * f(f(ep1 / h) - 1)),
    d: -f(sigmaT * f(f(f(ep1 - h) / f(h * h)) - 0.5)),
    e: 0,
    h,
  };
}

/**
 * The multistep updates of DPMSolverMultistepScheduler and EDMDPMSolverMultistepScheduler: the two classes differ in
 * their schedule, in how a model output becomes x0 (`convert`) and in alpha_t, sigma_t, lambda_t of a sigma (`asl`).
 */
export abstract class DPMSolverSteps extends MultistepSchedule {
  abstract readonly config: ResolvedConfig;
  readonly #order: number;
  readonly #form: DpmForm;
  #outputs: Float32Array[] = [];
  #lowerOrderNums = 0;

  constructor(kind: DPMSolverKind) {
    super();
    this.#order = kind.order;
    this.#form = { plusPlus: kind.plusPlus, sde: kind.sde, heun: kind.heun };
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
    const z = this.#form.sde ? noise() : undefined;
    const lowerOrderSecond = i === nSteps - 2 && bool(c, 'lower_order_final') && nSteps < 15;
    let prev: Float32Array;
    if (this.#order === 1 || this.#lowerOrderNums < 1 || lowerOrderFinal) prev = this.#update(sample, 1, z);
    else if (this.#order === 2 || this.#lowerOrderNums < 2 || lowerOrderSecond) prev = this.#update(sample, 2, z);
    else prev = this.#thirdOrder(sample, z);
    if (this.#lowerOrderNums < this.#order) this.#lowerOrderNums++;
    this.index++;
    return { prevSample: prev, ...(this.#form.plusPlus ? { denoised: converted } : {}) };
  }

  /** diffusers' first- and second-order multistep updates: from the last sigma, D0 = m0, D1 = (1/r0)·(m0 − m1). */
  #update(s: Float32Array, order: 1 | 2, z: Float32Array | undefined): Float32Array {
    const i = this.index;
    const s0 = this.asl(this.sig[i]!);
    const k = lowOrderCoefficients(this.#form, this.asl(this.sig[i + 1]!), s0, order);
    const n = this.#outputs.length;
    const m0 = this.#outputs[n - 1]!;
    const m1 = order === 2 ? this.#outputs[n - 2]! : undefined;
    const invR0 = m1 ? f(1 / f(f(s0[2] - this.asl(this.sig[i - 1]!)[2]) / k.h)) : 0;
    return lowOrderUpdate(k, s, m0, m0, m1, invR0, z);
  }

  /**
   * `multistep_dpm_solver_third_order_update` (dpmsolver++, dpmsolver, sde-dpmsolver++): the last three outputs give
   * D0, D1 (a first difference extrapolated) and D2 (a second difference); x_t = a·x + b·D0 + c·D1 + d·D2 [+ e·z].
   */
  #thirdOrder(s: Float32Array, z: Float32Array | undefined): Float32Array {
    const i = this.index;
    const s0 = this.asl(this.sig[i]!);
    const lambdaS1 = this.asl(this.sig[i - 1]!)[2];
    const lambdaS2 = this.asl(this.sig[i - 2]!)[2];
    const n = this.#outputs.length;
    const [m0, m1, m2] = [this.#outputs[n - 1]!, this.#outputs[n - 2]!, this.#outputs[n - 3]!];
    const { a, b, c, d, e, h } = thirdOrderCoefficients(this.#form, this.asl(this.sig[i + 1]!), s0);
    const r0 = f(f(s0[2] - lambdaS1) / h);
    const r1 = f(f(lambdaS1 - lambdaS2) / h);
    const inv0 = f(1 / r0);
    const inv1 = f(1 / r1);
    const w = f(r0 / f(r0 + r1));
    const inv01 = f(1 / f(r0 + r1));
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
  const solver = ['logrho', 'bh1', 'bh2'].includes(String(config.solver_type)) ? 'midpoint' : oneOf(name, config, 'solver_type', ['midpoint', 'heun']);
  const form = { plusPlus: algorithm.endsWith('++'), sde: algorithm.startsWith('sde-'), heun: solver === 'heun' };
  const prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
  const order = num(config, 'solver_order');
  if (![1, 2, 3].includes(order)) unsupported(name, `solver_order ${order} (1 to 3)`);
  // diffusers has no third-order update for it (its step fails)
  if (order === 3 && algorithm === 'sde-dpmsolver') unsupported(name, 'solver_order 3 with algorithm_type "sde-dpmsolver" (use "sde-dpmsolver++")');
  for (const k of ['thresholding', 'use_flow_sigmas', 'use_dynamic_shifting']) {
    if (bool(config, k)) unsupported(name, k);
  }
  checkOneRamp(name, config);
  checkIgnoredVariance(name, config);
  const finalType = oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
  if (!form.plusPlus && finalType === 'zero') {
    unsupported(name, `final_sigmas_type "zero" with algorithm_type "${algorithm}" (diffusers refuses it too; use "sigma_min")`);
  }
  return { order, ...form, prediction };
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
    const timesteps = multistepTimesteps(name, config, numInferenceSteps, train - lambdaClipped(ac, num(config, 'lambda_min_clipped')));
    // diffusers leaves the Karras and Lu timesteps of the cosine schedule unrounded (then cast to int64, which truncates).
    const cosine = str(config, 'beta_schedule') === 'squaredcos_cap_v2';
    const s = dpmSigmaSchedule(config, ac, timesteps, numInferenceSteps, finalType === 'zero', !cosine, bool(config, 'use_lu_lambdas'));
    this.schedule(s.timesteps, s.sig);
  }

  protected convert(modelOutput: Float32Array, sample: Float32Array, sigma: number): Float32Array {
    return convertModelOutput(modelOutput, sample, sigma, this.#prediction, this.#toX0);
  }
}
