/**
 * @module What the multistep solvers on the alpha/sigma schedule share (DPM-Solver, UniPC, DEIS): the schedule they
 * build, an unscaled model input, the step index (set by image-to-image's begin index) and `alpha_t·x + sigma_t·n`.
 */

import type { Scheduler, StepResult } from '../types.js';
import { alphaSigmaLambda, checkBeginIndex, checkIndex, f } from './common.js';

export abstract class MultistepSchedule implements Scheduler {
  abstract readonly name: string;
  timesteps: readonly number[] = [];
  sigmas: readonly number[] = [];
  readonly initNoiseSigma = 1;
  /** The sigmas of the timesteps and the final one (float32). */
  protected sig: Float32Array<ArrayBufferLike> = new Float32Array(0);
  protected index = 0;

  /** Called once at the end of a subclass's constructor, with the n timesteps and the n + 1 sigmas. */
  protected schedule(timesteps: number[], sig: Float32Array): void {
    this.sig = sig;
    this.sigmas = Object.freeze(Array.from(sig));
    this.timesteps = Object.freeze(timesteps);
  }

  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }

  setBeginIndex(index: number): void {
    checkBeginIndex(this.name, index, this.timesteps);
    this.index = index;
  }

  /** `alpha_t * x + sigma_t * n` with alpha_t, sigma_t from sigmas[index] (`_sigma_to_alpha_sigma_t`). */
  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    checkIndex(this.name, index, this.timesteps);
    const [alpha, sigma] = alphaSigmaLambda(this.sig[index]!);
    const out = new Float32Array(original.length);
    for (let i = 0; i < original.length; i++) out[i] = f(alpha * original[i]!) + f(sigma * noise[i]!);
    return out;
  }

  /** The index of the step about to run; throws past the schedule's end. */
  protected current(): number {
    if (this.index >= this.timesteps.length) throw new Error(`${this.name}: step() called more than ${this.timesteps.length} times`);
    return this.index;
  }

  abstract step(modelOutput: Float32Array, t: number, sample: Float32Array, noise: () => Float32Array): StepResult;
}
