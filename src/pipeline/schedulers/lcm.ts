/** @module LCMScheduler (diffusers): consistency-model steps; noise on every step but the last; float32 like torch. */

import type { StepRange } from '../job.js';
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
import { AlphaSchedule } from './base.js';

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

/** At most original_inference_steps: the schedule picks that many of the distillation's timesteps. */
export function lcmStepRange(config: ResolvedConfig): StepRange {
  const r = trainStepRange(config);
  const original = num(config, 'original_inference_steps');
  if (!Number.isInteger(original) || original < 1 || original > r.max) unsupported('LCMScheduler', `original_inference_steps ${original}`);
  return original < r.max ? { ...r, max: original, why: `original_inference_steps is ${original}` } : r;
}

export class LCM extends AlphaSchedule {
  readonly name = 'LCMScheduler';
  readonly #finalAc: number;
  readonly #prediction: string;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    const train = num(config, 'num_train_timesteps');
    checkSteps(name, numInferenceSteps, lcmStepRange(config));
    if (bool(config, 'thresholding')) unsupported(name, 'thresholding');
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.ac = alphasCumprod(name, config, true);
    this.#finalAc = bool(config, 'set_alpha_to_one') ? 1 : this.ac[0]!;
    const original = num(config, 'original_inference_steps');
    const k = Math.floor(train / original);
    const origin: number[] = [];
    for (let i = original; i >= 1; i--) origin.push(i * k - 1); // already reversed
    this.timesteps = Object.freeze(npLinspace(0, origin.length, numInferenceSteps, false).map((x) => origin[Math.floor(x)]!));
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
