/** @module Types shared by the pipeline pieces (tokenizer, random, schedulers, pipeline). */

/** A source of N(0,1) float32 draws (torch-compatible for a seeded generator). */
export interface NoiseSource {
  /** `count` float32 draws, exactly as `torch.randn(count)` would make them from this generator's state. */
  randn(count: number): Float32Array;
}

/**
 * What a batch's Brownian noise depends on, and all it depends on: the interval [lo, hi] (the schedule's smallest
 * sigma above 0 and its largest), the values per image, and each image's seed. Plain data, so another thread can make
 * the same noise (aux.ts; brownian.ts makes it).
 */
export interface BrownianSpec {
  readonly lo: number;
  readonly hi: number;
  readonly perImage: number;
  readonly seeds: readonly number[];
}

/** One read of a batch's motion between two times (either order). */
export interface BrownianQuery {
  readonly spec: BrownianSpec;
  readonly ta: number;
  readonly tb: number;
}

export interface StepResult {
  prevSample: Float32Array;
  /** The model's prediction of x0 where the scheduler returns it (LCM decodes from this on the last step). */
  denoised?: Float32Array;
  /** The unit noise the step added where the scheduler makes its own instead of calling `noise` (DPMSolverSDE). */
  noise?: Float32Array;
}

/**
 * One scheduler instance per generation (they keep state: PNDM and DPM++ history, step index).
 * Arrays are flat, row-major over the latent shape [batch, 4, h, w] of the *unguided* latents.
 */
export interface Scheduler {
  readonly name: string;
  /**
   * diffusers' `order`: UNet runs per step of the schedule the request names (2 for Heun and KDPM2, whose timesteps
   * list each but the first twice; absent = 1). Image-to-image cuts the schedule at t_start·order.
   */
  readonly order?: number;
  /** Timesteps the UNet sees, in order (PNDM with skip_prk_steps repeats one). Floats for Euler-family. */
  readonly timesteps: readonly number[];
  /** Sigmas where the scheduler has them (Euler family, DPM++), with the trailing 0. */
  readonly sigmas: readonly number[] | undefined;
  readonly initNoiseSigma: number;
  /** Whether the UNet needs an LCM guidance embedding (`timestep_cond`) — decided by the model, not here. */
  scaleModelInput(sample: Float32Array, t: number): Float32Array;
  /**
   * One denoising step. `noise` is called only by stochastic schedulers (ancestral, DDIM eta>0, LCM, TCD eta>0),
   * once per step, and must return a draw of the full sample size (per-image generators concatenated).
   */
  step(modelOutput: Float32Array, t: number, sample: Float32Array, noise: () => Float32Array): StepResult;
  /**
   * Start at `timesteps[index]` instead of the first timestep (image-to-image and inpainting cut the schedule by
   * strength): diffusers' `set_begin_index`, or for PNDM, which has none, the step counter starting at 0 on the cut list.
   * Call before the first step.
   */
  setBeginIndex(index: number): void;
  /**
   * The noise read the next step() makes that does not depend on the model output (DPM++ SDE's Brownian motion), for
   * a sample of `length` values; undefined when it makes none. The pipeline has it made on another thread during the
   * UNet run and hands it over with giveNoise; step() uses what it is given only for exactly that read.
   */
  nextNoise?(length: number): BrownianQuery | undefined;
  giveNoise?(query: BrownianQuery, z: Float32Array): void;
  /**
   * diffusers' `scheduler.add_noise(original, noise, timesteps[index])` for this class, at `index` of the full
   * schedule: √ᾱ·x + √(1−ᾱ)·n (DDIM, PNDM, LCM, TCD), x + σ·n (Euler family, EDM), α_t·x + σ_t·n (DPM-Solver).
   */
  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array;
}
