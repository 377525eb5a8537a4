/**
 * @module KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler (diffusers; k-diffusion's DPM2 and DPM2 a): a
 * half step to an interpolated sigma, then the full step with the derivative there, two UNet runs per step; float32
 * like torch.
 */

import type { StepResult } from '../types.js';
import {
  f,
  npRound,
  type ConfigValue,
  type ResolvedConfig,
  sigmaToT,
  logf,
} from './common.js';
import { discreteSchedule, EulerBase, predictX0, scaleBySigma } from './euler.js';

/** The options KDPM2, KDPM2 ancestral, Heun and DPM++ SDE share (k-diffusion's samplers in diffusers), with their defaults. */
export const KDPM2_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'linear',
  trained_betas: null,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  prediction_type: 'epsilon',
  timestep_spacing: 'linspace',
  steps_offset: 0,
};

/** Read by `_convert_to_karras` / `_exponential` / `_beta` where the config has them (hidden keys, see index.ts). */
export const KDPM2_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };


/** torch's float32 `lerp(a, b, 0.5)`: `b − (b − a)·0.5` (its formula for weights ≥ 0.5). */
const lerpHalf = (a: number, b: number) => f(b - f(f(b - a) * 0.5));

/** Every value but the first and the last twice (diffusers' `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`). */
const repeated = (xs: ArrayLike<number>): number[] => {
  const a = Array.from(xs);
  return [a[0]!, ...a.slice(1).flatMap((x) => [x, x]), a[a.length - 1]!];
};

interface Schedule {
  /** The n timesteps before interleaving: float32, or float64 after a Karras / exponential / beta conversion (not cast). */
  timesteps: number[];
  /** n sigmas and the final 0, float32. */
  sigmas: Float32Array;
  logSigmas: Float32Array;
}

function schedule(name: string, config: ResolvedConfig, n: number): Schedule {
  // diffusers raises NotImplementedError for `sample`
  const { timesteps, sigmas, logSigmas, converted } = discreteSchedule(name, config, n, ['epsilon', 'v_prediction']);
  // Karras timesteps are rounded; neither is cast to float32 (the tensor keeps numpy's float64)
  return { timesteps: converted === 'karras' ? timesteps.map(npRound) : timesteps, sigmas: Float32Array.from([...sigmas, 0]), logSigmas };
}

/** The shared state machine: the first UNet run of a step goes to the interpolated sigma, the second completes it. */
abstract class KDPM2Base extends EulerBase {
  readonly order = 2;
  protected readonly interpol: Float32Array;
  /** The sample the step started from, between its two runs. */
  protected pending: Float32Array | undefined;

  constructor(config: ResolvedConfig, s: Schedule, interpol: ArrayLike<number>, interleaved: number[], name: string) {
    super(config, [s.timesteps[0]!, ...interleaved], Float32Array.from(repeated(s.sigmas)), name);
    this.interpol = Float32Array.from(repeated(interpol));
  }

  override setBeginIndex(index: number): void {
    super.setBeginIndex(index);
    this.pending = undefined;
  }

  /** x0 from the model output at `sigmaInput`, and the derivative (x − x0)/`over`. */
  protected derivative(modelOutput: Float32Array, sample: Float32Array, sigmaInput: number, over: number): { pred: Float32Array; d: Float32Array } {
    const pred = new Float32Array(sample.length);
    predictX0(this.prediction, modelOutput, sample, sigmaInput, pred);
    const d = new Float32Array(sample.length);
    for (let k = 0; k < d.length; k++) d[k] = f(f(sample[k]! - pred[k]!) / over);
    return { pred, d };
  }
}

export class KDPM2Discrete extends KDPM2Base {
  readonly name = 'KDPM2DiscreteScheduler';

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'KDPM2DiscreteScheduler';
    const s = schedule(name, config, numInferenceSteps);
    // Geometric midpoints: exp(lerp(log sigma_j, log sigma_{j-1}, 0.5)); the first is NaN (never used), the last 0.
    const logs = Array.from(s.sigmas, logf);
    const interpol = logs.map((l, j) => f(Math.exp(lerpHalf(l, logs[(j + logs.length - 1) % logs.length]!))));
    const ti = interpol.map((x) => sigmaToT(x, s.logSigmas, true));
    const interleaved = s.timesteps.slice(1).flatMap((t, k) => [ti[k + 1]!, t]);
    super(config, s, interpol, interleaved, name);
  }

  override scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return scaleBySigma(sample, this.pending === undefined ? this.sig[this.index]! : this.interpol[this.index]!);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    this.checkIndex();
    const i = this.index;
    const first = this.pending === undefined;
    const sigma = first ? this.sig[i]! : this.sig[i - 1]!;
    const sigmaInterpol = first ? this.interpol[i + 1]! : this.interpol[i]!;
    const sigmaNext = first ? this.sig[i + 1]! : this.sig[i]!;
    const { pred, d } = this.derivative(modelOutput, sample, first ? sigma : sigmaInterpol, first ? sigma : sigmaInterpol);
    const dt = first ? f(sigmaInterpol - sigma) : f(sigmaNext - sigma);
    const from = first ? sample : this.pending!;
    this.pending = first ? sample : undefined;
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) out[k] = f(from[k]! + f(d[k]! * dt));
    this.index++;
    return { prevSample: out, denoised: pred };
  }
}

export class KDPM2AncestralDiscrete extends KDPM2Base {
  readonly name = 'KDPM2AncestralDiscreteScheduler';
  readonly #up: Float32Array;
  readonly #down: Float32Array;

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'KDPM2AncestralDiscreteScheduler';
    const s = schedule(name, config, numInferenceSteps);
    const n = s.sigmas.length;
    const up = new Float32Array(n);
    const down = new Float32Array(n);
    for (let j = 0; j < n; j++) {
      const sj2 = f(s.sigmas[j]! * s.sigmas[j]!);
      const next = j + 1 < n ? s.sigmas[j + 1]! : 0;
      const nx2 = f(next * next);
      up[j] = f(Math.sqrt(f(f(nx2 * f(sj2 - nx2)) / sj2)));
      down[j] = j === n - 1 ? 0 : f(Math.sqrt(f(nx2 - f(up[j]! * up[j]!))));
    }
    // exp(lerp(log sigma_j, log sigma_down_j, 0.5)), the last two set to 0.
    const interpol = Array.from(s.sigmas, (x, j) => (j >= n - 2 ? 0 : f(Math.exp(lerpHalf(logf(x), logf(down[j]!))))));
    const ti = interpol.slice(0, n - 2).map((x) => sigmaToT(x, s.logSigmas, true));
    const interleaved = s.timesteps.slice(1).flatMap((t, k) => [ti[k]!, t]);
    super(config, s, interpol, interleaved, name);
    this.#up = Float32Array.from(repeated(up));
    this.#down = Float32Array.from(repeated(down));
  }

  override scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return scaleBySigma(sample, this.pending === undefined ? this.sig[this.index]! : this.interpol[this.index - 1]!);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    this.checkIndex();
    const i = this.index;
    const first = this.pending === undefined;
    const at = first ? i : i - 1;
    const sigma = this.sig[at]!;
    const sigmaInterpol = this.interpol[at]!;
    const { pred, d } = this.derivative(modelOutput, sample, first ? sigma : sigmaInterpol, first ? sigma : sigmaInterpol);
    const out = new Float32Array(sample.length);
    if (first) {
      const dt = f(sigmaInterpol - sigma);
      for (let k = 0; k < out.length; k++) out[k] = f(sample[k]! + f(d[k]! * dt));
      this.pending = sample;
    } else {
      const dt = f(this.#down[i - 1]! - sigma);
      const from = this.pending!;
      const z = noise();
      const up = this.#up[i - 1]!;
      for (let k = 0; k < out.length; k++) out[k] = f(f(from[k]! + f(d[k]! * dt)) + f(z[k]! * up));
      this.pending = undefined;
    }
    this.index++;
    return { prevSample: out, denoised: pred };
  }
}
