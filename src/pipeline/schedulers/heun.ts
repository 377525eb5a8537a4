/**
 * @module HeunDiscreteScheduler (diffusers): Heun's second-order method on the sigma schedule, two UNet runs per step
 * (an Euler predictor, then the corrector at the next sigma), float32 like torch.
 */

import type { StepResult } from '../types.js';
import {
  bool,
  f,
  num,
  type ConfigValue,
  type ResolvedConfig,
} from './common.js';
import { discreteSchedule, EulerBase, predictX0 } from './euler.js';
import { KDPM2_DEFAULTS } from './kdpm2.js';

export const HEUN_DEFAULTS: Readonly<Record<string, ConfigValue>> = { ...KDPM2_DEFAULTS, clip_sample: false, clip_sample_range: 1.0 };

/** Read by `_convert_to_karras` / `_exponential` / `_beta` where the config has them (hidden keys, see index.ts). */
export const HEUN_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };

/** Every timestep but the first twice, every sigma but the first and the final 0 twice (diffusers' repeat_interleave). */
function doubled(xs: readonly number[]): number[] {
  return [xs[0]!, ...xs.slice(1).flatMap((x) => [x, x])];
}

export class HeunDiscrete extends EulerBase {
  readonly name = 'HeunDiscreteScheduler';
  readonly order = 2;
  /** Set between the predictor and the corrector: the step size, the first derivative and the sample it left from. */
  #pending: { dt: number; derivative: Float32Array; sample: Float32Array } | undefined;

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'HeunDiscreteScheduler';
    const { timesteps: raw, sigmas: sig, converted } = discreteSchedule(name, config, numInferenceSteps, ['epsilon', 'v_prediction', 'sample']);
    const timesteps = converted ? raw.map(f) : raw;
    const s32 = Array.from(Float32Array.from([...sig, 0]));
    super(config, doubled(timesteps), Float32Array.from([...doubled(s32.slice(0, -1)), 0]), name);
  }

  override setBeginIndex(index: number): void {
    super.setBeginIndex(index);
    this.#pending = undefined;
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    this.checkIndex();
    const first = this.#pending === undefined;
    const i = this.index;
    const sigma = first ? this.sig[i]! : this.sig[i - 1]!;
    const sigmaNext = first ? this.sig[i + 1]! : this.sig[i]!;
    const n = sample.length;
    const pred = new Float32Array(n);
    predictX0(this.prediction, modelOutput, sample, first ? sigma : sigmaNext, pred);
    if (bool(this.config, 'clip_sample')) {
      const r = f(num(this.config, 'clip_sample_range'));
      for (let k = 0; k < n; k++) pred[k] = Math.min(Math.max(pred[k]!, -r), r);
    }
    const out = new Float32Array(n);
    if (first) {
      const derivative = new Float32Array(n);
      for (let k = 0; k < n; k++) derivative[k] = f(f(sample[k]! - pred[k]!) / sigma);
      const dt = f(sigmaNext - sigma);
      for (let k = 0; k < n; k++) out[k] = f(sample[k]! + f(derivative[k]! * dt));
      this.#pending = { dt, derivative, sample };
    } else {
      const { dt, derivative: d0, sample: from } = this.#pending!;
      for (let k = 0; k < n; k++) {
        const d = f(f(f(d0[k]! + f(f(sample[k]! - pred[k]!) / sigmaNext)) / 2));
        out[k] = f(from[k]! + f(d * dt));
      }
      this.#pending = undefined;
    }
    this.index++;
    return { prevSample: out, denoised: pred };
  }
}
