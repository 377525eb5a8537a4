/**
 * @module LCMScheduler and TCDScheduler (diffusers): consistency-distilled samplers on the same timestep schedule (a
 * subset of the distillation's original_inference_steps); LCM draws noise on every step but the last, TCD where its
 * gamma (the request's eta) is above 0. Float32 like torch.
 */

import { lcmMinStrength, lcmTimestepCount, type StepRange } from '../job.js';
import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  bool,
  checkSteps,
  f,
  npLinspace,
  num,
  oneOf,
  type ConfigValue,
  type ResolvedConfig,
  trainStepRange,
  unsupported,
} from './common.js';
import { RuntimeError } from '../../errors.js';
import { AlphaSchedule, x0AndEpsilon } from './base.js';

export const LCM_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  trained_betas: null,
  original_inference_steps: 50,
  clip_sample: false,
  clip_sample_range: 1.0,
  set_alpha_to_one: true,
  steps_offset: 0,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  timestep_spacing: 'leading',
  timestep_scaling: 10.0,
  rescale_betas_zero_snr: false,
};

/** TCD's __init__ takes LCM's options with LCM's defaults (it reads fewer of them: see TCD). */
export const TCD_DEFAULTS = LCM_DEFAULTS;

/** At most original_inference_steps: the schedule picks that many of the distillation's timesteps. */
export function lcmStepRange(config: ResolvedConfig, className = 'LCMScheduler'): StepRange {
  const r = trainStepRange(config);
  const original = num(config, 'original_inference_steps');
  if (!Number.isInteger(original) || original < 1 || original > r.max) unsupported(className, `original_inference_steps ${original}`);
  return original < r.max ? { ...r, max: original, why: `original_inference_steps is ${original}` } : r;
}

/**
 * LCM's and TCD's `set_timesteps(n, strength)` (no custom list): n of the distillation's timesteps `i·k − 1`
 * (k = num_train_timesteps // original_inference_steps, i up to int(original_inference_steps · strength)), picked at
 * evenly spaced indices from the highest. Only LatentConsistencyModelImg2ImgPipeline passes a strength below 1: its
 * image-to-image runs all n steps from the lower part of the schedule, and raises where that part has fewer than n.
 */
function consistencyTimesteps(config: ResolvedConfig, n: number, strength = 1, className = 'LCMScheduler'): readonly number[] {
  const original = num(config, 'original_inference_steps');
  const k = Math.floor(num(config, 'num_train_timesteps') / original);
  const count = lcmTimestepCount(original, strength);
  if (Math.floor(count / n) < 1) {
    throw new RuntimeError(
      'INVALID_INPUT',
      `${className}: original_inference_steps ${original} × strength ${strength} leaves ${count} of the distillation's timesteps, fewer than num_inference_steps ${n} ` +
        `(image-to-image on an LCM model picks every step from them); send a strength of at least ${lcmMinStrength(original, n)}, or fewer steps`,
    );
  }
  const origin: number[] = [];
  for (let i = count; i >= 1; i--) origin.push(i * k - 1); // already reversed
  return Object.freeze(npLinspace(0, origin.length, n, false).map((x) => origin[Math.floor(x)]!));
}

export class LCM extends AlphaSchedule {
  readonly name = 'LCMScheduler';
  readonly #finalAc: number;
  readonly #prediction: string;

  /** `strength`: set_timesteps' (below 1 only for LatentConsistencyModelImg2ImgPipeline's image-to-image). */
  constructor(readonly config: ResolvedConfig, numInferenceSteps: number, strength = 1) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, lcmStepRange(config));
    if (bool(config, 'thresholding')) unsupported(name, 'thresholding');
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.ac = alphasCumprod(name, config, true);
    this.#finalAc = bool(config, 'set_alpha_to_one') ? 1 : this.ac[0]!;
    this.timesteps = consistencyTimesteps(config, numInferenceSteps, strength, name);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    const steps = this.timesteps.length;
    const t = this.timesteps[i]!;
    const prevT = i + 1 < steps ? this.timesteps[i + 1]! : t;
    const at = this.ac[t]!;
    const ap = prevT >= 0 ? this.ac[prevT]! : this.#finalAc;
    const sqA = f(Math.sqrt(at));
    const sqB = f(Math.sqrt(f(1 - at)));
    // Boundary-condition scalings with sigma_data = 0.5 (timestep tensor × Python float → float32).
    const scaled = f(t * f(num(this.config, 'timestep_scaling')));
    const s2 = f(f(scaled * scaled) + 0.25);
    const cSkip = f(0.25 / s2);
    const cOut = f(scaled / f(Math.sqrt(s2)));
    const n = sample.length;
    const denoised = new Float32Array(n);
    const clip = bool(this.config, 'clip_sample') ? f(num(this.config, 'clip_sample_range')) : Infinity;
    for (let j = 0; j < n; j++) {
      const s = sample[j]!;
      const m = modelOutput[j]!;
      let x0: number;
      if (this.#prediction === 'epsilon') x0 = f(f(s - f(sqB * m)) / sqA);
      else if (this.#prediction === 'sample') x0 = m;
      else x0 = f(f(sqA * s) - f(sqB * m));
      x0 = Math.min(Math.max(x0, -clip), clip);
      denoised[j] = f(cOut * x0) + f(cSkip * s);
    }
    this.index++;
    if (i === steps - 1) return { prevSample: denoised, denoised };
    const z = noise();
    const sqAp = f(Math.sqrt(ap));
    const sqBp = f(Math.sqrt(f(1 - ap)));
    const out = new Float32Array(n);
    for (let j = 0; j < n; j++) out[j] = f(sqAp * denoised[j]!) + f(sqBp * z[j]!);
    return { prevSample: out, denoised };
  }
}

/**
 * TCD (Trajectory Consistency Distillation): from x_t, the prediction noised back to s = floor((1 − γ)·t_prev)
 * (`pred_noised_sample`), then, for γ > 0 and on every step but the last, re-noised forward to t_prev with a fresh
 * draw. γ is `step()`'s eta, which diffusers' Stable Diffusion pipelines pass from their own `eta` (default 0:
 * deterministic; TCD's model cards use 0.3). Its step reads none of clip_sample, thresholding, timestep_scaling,
 * set_alpha_to_one, steps_offset or timestep_spacing, so neither does this one.
 */
export class TCD extends AlphaSchedule {
  readonly name = 'TCDScheduler';
  readonly #prediction: string;
  readonly #gamma: number;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number, eta: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, lcmStepRange(config, name));
    // diffusers asserts 0 <= eta <= 1 in every step.
    if (!(eta >= 0 && eta <= 1)) throw new RuntimeError('INVALID_INPUT', `${name}: eta (TCD's gamma) must be from 0 to 1, got ${eta}`);
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.ac = alphasCumprod(name, config, true);
    this.#gamma = eta;
    this.timesteps = consistencyTimesteps(config, numInferenceSteps, 1, name);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    const steps = this.timesteps.length;
    const t = this.timesteps[i]!;
    // After the last timestep diffusers takes t_prev = 0 (not −1: alphas_cumprod[0], never set_alpha_to_one's 1).
    const prevT = i + 1 < steps ? this.timesteps[i + 1]! : 0;
    // torch: (1 − eta) as float32 times the integer timestep, floored (float64 would floor 0.1·890 to 88, torch to 89).
    const s = Math.floor(f(f(1 - this.#gamma) * prevT));
    const at = this.ac[t]!;
    const aS = this.ac[s]!;
    const { x0, eps } = x0AndEpsilon(this.#prediction, f(Math.sqrt(at)), f(Math.sqrt(f(1 - at))), sample, modelOutput);
    const sqAs = f(Math.sqrt(aS));
    const sqBs = f(Math.sqrt(f(1 - aS)));
    const n = sample.length;
    const noised = new Float32Array(n);
    for (let j = 0; j < n; j++) noised[j] = f(sqAs * x0[j]!) + f(sqBs * eps[j]!);
    this.index++;
    // `denoised` is diffusers' second output, pred_noised_sample (what its LCM pipeline decodes after the last step,
    // where it equals prev_sample).
    if (!(this.#gamma > 0) || i === steps - 1) return { prevSample: noised, denoised: noised };
    const z = noise();
    const r = f(this.ac[prevT]! / aS);
    const c1 = f(Math.sqrt(r));
    const c2 = f(Math.sqrt(f(1 - r)));
    const out = new Float32Array(n);
    for (let j = 0; j < n; j++) out[j] = f(c1 * noised[j]!) + f(c2 * z[j]!);
    return { prevSample: out, denoised: noised };
  }
}
