/** @module DDIMScheduler (diffusers), float32 like torch; eta > 0 draws noise through the step callback. */

import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  alphasStepRange,
  BETA_DEFAULTS,
  bool,
  checkSteps,
  f,
  npArange,
  npLinspace,
  npRound,
  num,
  oneOf,
  type ConfigValue,
  type ResolvedConfig,
  str,
  unsupported,
  unsupportedSpacing,
} from './common.js';
import { AlphaSchedule, x0AndEpsilon } from './base.js';

export const DDIM_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  clip_sample: true,
  set_alpha_to_one: true,
  steps_offset: 0,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  clip_sample_range: 1.0,
  sample_max_value: 1.0,
  timestep_spacing: 'leading',
  rescale_betas_zero_snr: false,
};

/** DDIM/LCM-style integer timesteps, descending. */
export function ddimTimesteps(className: string, c: ResolvedConfig, n: number): number[] {
  const train = num(c, 'num_train_timesteps');
  switch (str(c, 'timestep_spacing')) {
    case 'linspace':
      return npLinspace(0, train - 1, n).map(npRound).reverse();
    case 'leading': {
      const ratio = Math.floor(train / n);
      return npArange(0, n, 1).map((i) => i * ratio + num(c, 'steps_offset')).reverse();
    }
    case 'trailing':
      return npArange(train, 0, -train / n).map((t) => npRound(t) - 1);
    default:
      return unsupportedSpacing(className, c);
  }
}

export class DDIM extends AlphaSchedule {
  readonly name = 'DDIMScheduler';
  readonly #finalAc: number;
  readonly #ratio: number;
  readonly #prediction: string;
  readonly #eta: number;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number, eta = 0) {
    super();
    const name = this.name;
    const train = num(config, 'num_train_timesteps');
    checkSteps(name, numInferenceSteps, alphasStepRange(config));
    if (bool(config, 'thresholding')) unsupported(name, 'thresholding');
    if (!(eta >= 0)) unsupported(name, `eta ${eta}`);
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.ac = alphasCumprod(name, config, true);
    this.#finalAc = bool(config, 'set_alpha_to_one') ? 1 : this.ac[0]!;
    this.#ratio = Math.floor(train / numInferenceSteps);
    this.#eta = eta;
    this.timesteps = Object.freeze(ddimTimesteps(name, config, numInferenceSteps));
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const t = this.timesteps[this.current()]!;
    this.index++;
    const prevT = t - this.#ratio;
    const at = this.ac[t]!;
    const ap = prevT >= 0 ? this.ac[prevT]! : this.#finalAc;
    const bt = f(1 - at);
    const sqA = f(Math.sqrt(at));
    const sqB = f(Math.sqrt(bt));
    const n = sample.length;
    const { x0, eps } = x0AndEpsilon(this.#prediction, sqA, sqB, sample, modelOutput);
    if (bool(this.config, 'clip_sample')) {
      const r = f(num(this.config, 'clip_sample_range'));
      for (let i = 0; i < n; i++) x0[i] = Math.min(Math.max(x0[i]!, -r), r);
    }
    const variance = f(f(f(1 - ap) / bt) * f(1 - f(at / ap)));
    const std = f(f(this.#eta) * f(Math.sqrt(variance)));
    const dirCoef = f(Math.sqrt(f(f(1 - ap) - f(std * std))));
    const sqAp = f(Math.sqrt(ap));
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = f(sqAp * x0[i]!) + f(dirCoef * eps[i]!);
    if (this.#eta > 0) {
      const z = noise();
      for (let i = 0; i < n; i++) out[i] = out[i]! + f(std * z[i]!);
    }
    return { prevSample: out, denoised: x0 };
  }
}
