/**
 * @module What the schedulers with unscaled model input share: the step index (set by image-to-image's begin index),
 * and the noising of their schedule — DDPM-style on alphas_cumprod (DDIM, DDPM, LCM, TCD) or `alpha_t·x + sigma_t·n` on
 * the sigma schedule of the multistep solvers (DPM-Solver, UniPC, DEIS).
 */

import type { Scheduler, StepResult } from '../types.js';
import {
  addNoiseAlphas,
  alphaSigmaLambda,
  checkBeginIndex,
  checkIndex,
  convertedSigmas,
  f,
  npInterpIndex,
  type ResolvedConfig,
  sigmasFromAlphas,
  sigmaRamp,
} from './common.js';

abstract class UnscaledSchedule implements Scheduler {
  abstract readonly name: string;
  abstract readonly sigmas: readonly number[] | undefined;
  timesteps: readonly number[] = [];
  readonly initNoiseSigma: number = 1;
  protected index = 0;

  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }

  setBeginIndex(index: number): void {
    checkBeginIndex(this.name, index, this.timesteps);
    this.index = index;
  }

  /** The index of the step about to run; throws past the schedule's end. */
  protected current(): number {
    if (this.index >= this.timesteps.length) throw new Error(`${this.name}: step() called more than ${this.timesteps.length} times`);
    return this.index;
  }

  abstract addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array;
  abstract step(modelOutput: Float32Array, t: number, sample: Float32Array, noise: () => Float32Array): StepResult;
}

/** DDIM, DDPM, LCM, TCD: integer timesteps into alphas_cumprod. */
export abstract class AlphaSchedule extends UnscaledSchedule {
  readonly sigmas = undefined;
  protected ac: Float32Array<ArrayBufferLike> = new Float32Array(0);

  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseAlphas(this.name, this.ac, this.timesteps, index, original, noise);
  }
}

/**
 * DDIM's and TCD's `pred_original_sample` and `pred_epsilon` from the model output, given √ᾱ_t and √(1 − ᾱ_t)
 * (float32 tensor ops as torch does them; the branch on the prediction type outside the loops).
 */
export function x0AndEpsilon(prediction: string, sqA: number, sqB: number, sample: Float32Array, m: Float32Array): { x0: Float32Array; eps: Float32Array } {
  const n = sample.length;
  const x0 = new Float32Array(n);
  const eps = new Float32Array(n);
  if (prediction === 'epsilon') {
    for (let i = 0; i < n; i++) x0[i] = f(sample[i]! - f(sqB * m[i]!)) / sqA;
    eps.set(m);
  } else if (prediction === 'sample') {
    x0.set(m);
    for (let i = 0; i < n; i++) eps[i] = f(sample[i]! - f(sqA * m[i]!)) / sqB;
  } else {
    for (let i = 0; i < n; i++) {
      x0[i] = f(sqA * sample[i]!) - f(sqB * m[i]!);
      eps[i] = f(sqA * m[i]!) + f(sqB * sample[i]!);
    }
  }
  return { x0, eps };
}

/** DPM-Solver, UniPC, DEIS: a sigma per timestep and a final one. */
export abstract class MultistepSchedule extends UnscaledSchedule {
  sigmas: readonly number[] = [];
  /** The sigmas of the timesteps and the final one (float32). */
  protected sig: Float32Array<ArrayBufferLike> = new Float32Array(0);

  /** Called once at the end of a subclass's constructor, with the n timesteps and the n + 1 sigmas. */
  protected schedule(timesteps: number[], sig: Float32Array): void {
    this.sig = sig;
    this.sigmas = Object.freeze(Array.from(sig));
    this.timesteps = Object.freeze(timesteps);
  }

  /**
   * UniPC's, DEIS's and SA-Solver's schedule from its timesteps: the sigmas interpolated on the table, or a Karras /
   * exponential / beta ramp with its own timesteps; then the final sigma, 0 (`final_sigmas_type: zero`) or the ramp's
   * last, else the table's first (`sigma_min`).
   */
  protected sigmaSchedule(config: ResolvedConfig, ac: Float32Array, timesteps: number[], n: number, finalZero: boolean): void {
    const table = sigmasFromAlphas(ac);
    const kind = sigmaRamp(config);
    if (kind) {
      const ramp = convertedSigmas(config, kind, table, n);
      this.schedule(ramp.timesteps, Float32Array.from([...ramp.sigmas, finalZero ? 0 : ramp.sigmas[ramp.sigmas.length - 1]!]));
    } else {
      const last = finalZero ? 0 : f(Math.sqrt(f(f(1 - ac[0]!) / ac[0]!)));
      this.schedule(timesteps, Float32Array.from([...timesteps.map((t) => npInterpIndex(t, table)), last]));
    }
  }

  /** `alpha_t * x + sigma_t * n` with alpha_t, sigma_t from sigmas[index] (`_sigma_to_alpha_sigma_t`). */
  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    checkIndex(this.name, index, this.timesteps);
    const [alpha, sigma] = alphaSigmaLambda(this.sig[index]!);
    const out = new Float32Array(original.length);
    for (let i = 0; i < original.length; i++) out[i] = f(alpha * original[i]!) + f(sigma * noise[i]!);
    return out;
  }
}

/** diffusers' `convert_model_output` of DPM-Solver and UniPC: the x0 prediction (`toX0`), else the noise. */
export function convertModelOutput(m: Float32Array, s: Float32Array, sigma: number, prediction: string, toX0: boolean): Float32Array {
  const [alpha, sig] = alphaSigmaLambda(sigma);
  const n = m.length;
  const out = new Float32Array(n);
  if (toX0) {
    if (prediction === 'epsilon') for (let k = 0; k < n; k++) out[k] = f(s[k]! - f(sig * m[k]!)) / alpha;
    else if (prediction === 'sample') out.set(m);
    else for (let k = 0; k < n; k++) out[k] = f(alpha * s[k]!) - f(sig * m[k]!);
  } else {
    if (prediction === 'epsilon') out.set(m);
    else if (prediction === 'sample') for (let k = 0; k < n; k++) out[k] = f(s[k]! - f(alpha * m[k]!)) / sig;
    else for (let k = 0; k < n; k++) out[k] = f(alpha * m[k]!) + f(sig * s[k]!);
  }
  return out;
}
