/** @module LMSDiscreteScheduler (diffusers): linear multistep on the sigma schedule, up to order 4; float32 like torch. */

import type { StepResult } from '../types.js';
import {
  f,
  type ConfigValue,
  type ResolvedConfig,
} from './common.js';
import { discreteSchedule, EulerBase, predictX0 } from './euler.js';

export const LMS_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  prediction_type: 'epsilon',
  timestep_spacing: 'linspace',
  steps_offset: 0,
};

/**
 * Not `__init__` options, but `_convert_to_exponential` / `_convert_to_beta` take their bounds from the config when it
 * has them: a file's own keys, or an Euler config's carried over by a request's switch.
 */
export const LMS_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };

/** diffusers' `step(order=4)`, the order every pipeline runs it with. */
const ORDER = 4;

// Gauss–Legendre on 3 points: exact for the polynomials of degree ≤ 3 an order-4 step integrates.
const GL_X = [-Math.sqrt(3 / 5), 0, Math.sqrt(3 / 5)];
const GL_W = [5 / 9, 8 / 9, 5 / 9];

/**
 * `get_lms_coefficient(order, t, j)`: the integral from sigmas[t] to sigmas[t + 1] of the Lagrange basis polynomial
 * of point t − j over the points t, t − 1, …, t − order + 1 (diffusers integrates it with scipy's quad, exact for a
 * polynomial up to float rounding).
 */
export function lmsCoefficient(sigmas: ArrayLike<number>, order: number, t: number, j: number): number {
  const lo = sigmas[t]!;
  const hi = sigmas[t + 1]!;
  const half = (hi - lo) / 2;
  const mid = (hi + lo) / 2;
  let sum = 0;
  for (let q = 0; q < GL_X.length; q++) {
    const tau = mid + half * GL_X[q]!;
    let prod = 1;
    for (let k = 0; k < order; k++) {
      if (k === j) continue;
      prod *= (tau - sigmas[t - k]!) / (sigmas[t - j]! - sigmas[t - k]!);
    }
    sum += GL_W[q]! * prod;
  }
  return sum * half;
}

export class LMSDiscrete extends EulerBase {
  readonly name = 'LMSDiscreteScheduler';
  /** Derivatives of the last steps, newest first. */
  #derivatives: Float32Array[] = [];

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'LMSDiscreteScheduler';
    // The exponential and beta ramps read a config's sigma_min / sigma_max (LMS_HIDDEN); the Karras one never does.
    const { timesteps, sigmas: sig, converted } = discreteSchedule(name, config, numInferenceSteps, ['epsilon', 'v_prediction', 'sample'], false);
    super(config, converted ? timesteps.map(f) : timesteps, Float32Array.from([...sig, 0]), name);
  }

  override setBeginIndex(index: number): void {
    super.setBeginIndex(index);
    this.#derivatives = [];
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    const [sigma] = this.nextSigma();
    const t = this.index;
    const n = sample.length;
    const pred = new Float32Array(n);
    predictX0(this.prediction, modelOutput, sample, sigma, pred);
    const derivative = new Float32Array(n);
    for (let i = 0; i < n; i++) derivative[i] = f(f(sample[i]! - pred[i]!) / sigma);
    this.#derivatives.unshift(derivative);
    if (this.#derivatives.length > ORDER) this.#derivatives.pop();
    // The order follows the step index, not the derivatives held: after set_begin_index diffusers pairs the first
    // coefficients of a higher-order step with the few derivatives it has (zip stops at the shorter).
    const order = Math.min(t + 1, ORDER);
    const terms = Math.min(order, this.#derivatives.length);
    const coeffs: number[] = [];
    for (let j = 0; j < terms; j++) coeffs.push(f(lmsCoefficient(this.sig, order, t, j)));
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      let sum = f(coeffs[0]! * this.#derivatives[0]![i]!);
      for (let j = 1; j < terms; j++) sum = f(sum + f(coeffs[j]! * this.#derivatives[j]![i]!));
      out[i] = f(sample[i]! + sum);
    }
    this.index++;
    return { prevSample: out, denoised: pred };
  }
}
