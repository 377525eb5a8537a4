/**
 * @module DDPMScheduler (diffusers), float32 like torch: ancestral sampling with fresh noise every step but the last.
 * DreamBooth fine-tunes saved by some training scripts ship it as their scheduler.
 */

import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  alphasStepRange,
  BETA_DEFAULTS,
  bool,
  checkSteps,
  f,
  num,
  oneOf,
  type ConfigValue,
  type ResolvedConfig,
  unsupported,
} from './common.js';
import { AlphaSchedule } from './base.js';
import { ddimTimesteps } from './ddim.js';

export const DDPM_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  variance_type: 'fixed_small',
  clip_sample: true,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  clip_sample_range: 1.0,
  sample_max_value: 1.0,
  timestep_spacing: 'leading',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
};

export class DDPM extends AlphaSchedule {
  readonly name = 'DDPMScheduler';
  readonly #prediction: string;
  readonly #variance: string;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, alphasStepRange(config));
    if (bool(config, 'thresholding')) unsupported(name, 'thresholding');
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    // fixed_large_log takes the square root of a log below 0 in diffusers (NaN); learned* need a UNet that predicts
    // its variance (8 output channels), which Stable Diffusion's do not. None (a DPM-Solver config's, carried over by
    // from_config) falls through every branch of diffusers' _get_variance: fixed_small's variance.
    this.#variance = config.variance_type === null ? 'fixed_small' : oneOf(name, config, 'variance_type', ['fixed_small', 'fixed_small_log', 'fixed_large']);
    this.ac = alphasCumprod(name, config, true);
    this.timesteps = Object.freeze(ddimTimesteps(name, config, numInferenceSteps));
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    this.index++;
    const t = this.timesteps[i]!;
    // previous_timestep: the next one of the schedule, -1 after the last.
    const prevT = i + 1 < this.timesteps.length ? this.timesteps[i + 1]! : -1;
    const at = this.ac[t]!;
    const ap = prevT >= 0 ? this.ac[prevT]! : 1;
    const bt = f(1 - at);
    const bp = f(1 - ap);
    const ca = f(at / ap);
    const cb = f(1 - ca);
    const sqA = f(Math.sqrt(at));
    const sqB = f(Math.sqrt(bt));
    const n = sample.length;
    const x0 = new Float32Array(n);
    for (let k = 0; k < n; k++) {
      const s = sample[k]!;
      const m = modelOutput[k]!;
      if (this.#prediction === 'epsilon') x0[k] = f(s - f(sqB * m)) / sqA;
      else if (this.#prediction === 'sample') x0[k] = m;
      else x0[k] = f(sqA * s) - f(sqB * m);
    }
    if (bool(this.config, 'clip_sample')) {
      const r = f(num(this.config, 'clip_sample_range'));
      for (let k = 0; k < n; k++) x0[k] = Math.min(Math.max(x0[k]!, -r), r);
    }
    const c0 = f(f(f(Math.sqrt(ap)) * cb) / bt);
    const cs = f(f(f(Math.sqrt(ca)) * bp) / bt);
    const out = new Float32Array(n);
    for (let k = 0; k < n; k++) out[k] = f(c0 * x0[k]!) + f(cs * sample[k]!);
    if (t > 0) {
      const z = noise();
      const variance = Math.max(f(f(bp / bt) * cb), f(1e-20));
      let scale: number;
      if (this.#variance === 'fixed_small_log') scale = f(Math.exp(f(0.5 * f(Math.log(variance)))));
      else scale = f(Math.sqrt(this.#variance === 'fixed_large' ? cb : variance));
      for (let k = 0; k < n; k++) out[k] = out[k]! + f(scale * z[k]!);
    }
    return { prevSample: out, denoised: x0 };
  }
}
