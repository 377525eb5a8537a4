/**
 * @module DPMSolverSDEScheduler (diffusers; k-diffusion's DPM++ SDE, A1111's "DPM++ SDE" / "DPM++ SDE Karras"): a
 * stochastic step to the log-sigma midpoint, then the full step from the same sample with the midpoint's model
 * output, two UNet runs per step but the last; float32 like torch. Its noise is not drawn from the image's generator
 * but read from a Brownian motion over [sigma_min, sigma_max] (torchsde's BrownianInterval, ../brownian.ts), one per
 * image, whose seed is the config's `noise_sampler_seed` or else the image's own seed.
 *
 * The times at which the motion is read are torch's float32 `exp(-(-log sigma))` and midpoints of such logs: torch's
 * SLEEF exp and log (../torchmath.ts), not the correctly rounded ones, since a time one ulp off can fall on another
 * 1e-6 grid point of the tree and read other noise.
 */

import { RuntimeError } from '../../errors.js';
import { BrownianNoise, sameSpec } from '../brownian.js';
import { expf, expm1f, logf as torchLogf } from '../torchmath.js';
import type { BrownianQuery, BrownianSpec, StepResult } from '../types.js';
import { f, type ConfigValue, type ResolvedConfig, sigmaToT } from './common.js';
import { discreteSchedule, EulerBase, predictX0, scaleBySigma } from './euler.js';
import { KDPM2_DEFAULTS } from './kdpm2.js';

export const DPMSDE_DEFAULTS: Readonly<Record<string, ConfigValue>> = { ...KDPM2_DEFAULTS, noise_sampler_seed: null };

/**
 * Read by `_convert_to_exponential` / `_convert_to_beta` where the config has them (hidden keys, see index.ts); its
 * Karras ramp ignores them.
 */
export const DPMSDE_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };

const NAME = 'DPMSolverSDEScheduler';

/** torch's `sigma.log().neg()` and `t.neg().exp()` on float32 scalars. */
const tOf = (sigma: number) => -torchLogf(sigma);
const sigmaOf = (t: number) => expf(-t);

/**
 * `_second_order_timesteps`: the timestep of each log-sigma midpoint (numpy float64 on the float64 sigmas, before
 * they are cast to float32).
 */
function midpointTimesteps(sigmas: readonly number[], logSigmas: Float32Array): number[] {
  const t = sigmas.map((s) => -Math.log(s));
  return t.slice(0, -1).map((ti, k) => sigmaToT(Math.exp(-(ti + (t[k + 1]! - ti) * 0.5)), logSigmas));
}

export class DPMSolverSDE extends EulerBase {
  readonly name = NAME;
  readonly order = 2;
  readonly #seeds: readonly number[] | undefined;
  /** The batch's motion, made at the first step that reads it in place (diffusers makes its sampler there too). */
  #motion: BrownianNoise | undefined;
  #motionSpec: BrownianSpec | undefined;
  /** Noise made elsewhere for the next step's query (giveNoise). */
  #given: { query: BrownianQuery; z: Float32Array } | undefined;
  /** Between a step's two UNet runs: the sample it left from and the midpoint sigma the second run sees. */
  #pending: { sample: Float32Array; midSigma: number } | undefined;

  /**
   * `seeds`: one per image of the batch (their generators' seeds); image i's tree is seeded with the config's
   * `noise_sampler_seed` where set, else with seeds[i] (diffusers' `noise_sampler_seed=[seeds…]`). Without them the
   * batch is one image and the config must give the seed.
   */
  constructor(config: ResolvedConfig, numInferenceSteps: number, seeds?: readonly number[]) {
    // diffusers raises NotImplementedError for `sample`; its Karras ramp reads no bounds from the config (LMS's copy)
    const { timesteps: ts, sigmas, logSigmas } = discreteSchedule(NAME, config, numInferenceSteps, ['epsilon', 'v_prediction'], false, true);
    const mids = midpointTimesteps(sigmas, logSigmas);
    const timesteps = [ts[0]!, ...mids.flatMap((m, k) => [m, ts[k + 1]!])];
    const s32 = Float32Array.from(sigmas);
    const doubled = [s32[0]!, ...Array.from(s32.subarray(1)).flatMap((x) => [x, x]), 0];
    super(config, timesteps, Float32Array.from(doubled), NAME);
    if (seeds !== undefined && seeds.length === 0) throw new RuntimeError('INTERNAL', `${NAME}: no image seeds`);
    this.#seeds = seeds;
  }

  override setBeginIndex(index: number): void {
    super.setBeginIndex(index);
    this.#pending = undefined;
  }

  override scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return scaleBySigma(sample, this.#pending === undefined ? this.sig[this.index]! : this.#pending.midSigma);
  }

  /** diffusers' BrownianTreeNoiseSampler(sample, min sigma > 0, max sigma, seed) for a sample of `length` values. */
  #spec(length: number): BrownianSpec {
    const images = this.#seeds?.length ?? 1;
    if (this.#motionSpec?.perImage === length / images) return this.#motionSpec;
    if (length % images !== 0) throw new RuntimeError('INTERNAL', `${NAME}: a sample of ${length} values is not ${images} images`);
    let lo = Infinity;
    let hi = 0;
    for (const s of this.sig) {
      if (s > 0) lo = Math.min(lo, s);
      hi = Math.max(hi, s);
    }
    const own = this.config.noise_sampler_seed as number | null;
    const seeds = Array.from({ length: images }, (_, i) => {
      const seed = own ?? this.#seeds?.[i];
      if (seed === undefined) throw new RuntimeError('INTERNAL', `${NAME}: no noise_sampler_seed in the config and no image seed`);
      return seed;
    });
    return (this.#motionSpec = { lo, hi, perImage: length / images, seeds });
  }

  /** The step at the current index: its sigmas and times (the second run of a step goes from the step's start again). */
  #plan() {
    const i = this.index;
    const first = this.#pending === undefined;
    const sigma = first ? this.sig[i]! : this.sig[i - 1]!;
    const sigmaNext = first ? this.sig[i + 1]! : this.sig[i]!;
    const t = tOf(sigma);
    const tFull = tOf(sigmaNext);
    const tProposed = f(t + f(f(tFull - t) * 0.5));
    return { first, sigma, sigmaNext, t, tProposed, tNext: first ? tProposed : tFull };
  }

  /** The motion's read the next step makes from a sample of `length` values; none on the last step (to sigma 0). */
  nextNoise(length: number): BrownianQuery | undefined {
    if (this.index >= this.timesteps.length) return undefined;
    const p = this.#plan();
    if (p.sigmaNext === 0) return undefined;
    return { spec: this.#spec(length), ta: sigmaOf(p.t), tb: sigmaOf(p.tNext) };
  }

  giveNoise(query: BrownianQuery, z: Float32Array): void {
    this.#given = { query, z };
  }

  /** W(from, to) of the batch's motion: what giveNoise handed over for exactly this read, else made here. */
  #noise(from: number, to: number, length: number): Float32Array {
    const given = this.#given;
    this.#given = undefined;
    if (given && given.query.ta === from && given.query.tb === to && given.z.length === length) {
      if (sameSpec(given.query.spec, this.#spec(length))) return given.z;
    }
    return (this.#motion ??= new BrownianNoise(this.#spec(length))).noise(from, to);
  }

  step(modelOutput: Float32Array, _t: number, sampleIn: Float32Array): StepResult {
    this.checkIndex();
    const { first, sigma, sigmaNext, t, tProposed, tNext } = this.#plan();
    const n = sampleIn.length;
    const pred = new Float32Array(n);
    predictX0(this.prediction, modelOutput, sampleIn, first ? sigma : sigmaOf(tProposed), pred);
    const out = new Float32Array(n);
    let z: Float32Array | undefined;
    if (sigmaNext === 0) {
      const dt = f(sigmaNext - sigma);
      for (let k = 0; k < n; k++) out[k] = f(sampleIn[k]! + f(f(f(sampleIn[k]! - pred[k]!) / sigma) * dt));
    } else {
      const sample = first ? sampleIn : this.#pending!.sample;
      const from = sigmaOf(t);
      const to = sigmaOf(tNext);
      const to2 = f(to * to);
      const from2 = f(from * from);
      const up0 = f(Math.sqrt(f(f(to2 * f(from2 - to2)) / from2)));
      const up = up0 < to ? up0 : to; // Python's min(sigma_to, …) keeps sigma_to unless the other is smaller
      const down = f(Math.sqrt(f(to2 - f(up * up))));
      const ancestralT = tOf(down);
      const ratio = f(sigmaOf(ancestralT) / from);
      const em1 = expm1f(f(t - ancestralT));
      z = this.#noise(from, to, n);
      for (let k = 0; k < n; k++) {
        const x = f(f(ratio * sample[k]!) - f(em1 * pred[k]!));
        out[k] = f(x + f(z[k]! * up));
      }
      this.#pending = first ? { sample, midSigma: to } : undefined;
    }
    this.index++;
    return { prevSample: out, denoised: pred, ...(z ? { noise: z } : {}) };
  }
}
