/** @module EulerDiscreteScheduler and EulerAncestralDiscreteScheduler (diffusers), float32 like torch. */

import type { Scheduler, StepResult } from '../types.js';
import {
  addNoiseSigma,
  alphasCumprod,
  BETA_DEFAULTS,
  checkBeginIndex,
  checkOneRamp,
  checkSteps,
  trainStepRange,
  f,
  npArange,
  npInterpIndex,
  npLinspace,
  npRound,
  num,
  oneOf,
  type ConfigValue,
  rampSigmas,
  type ResolvedConfig,
  type SigmaRamp,
  sigmaRamp,
  sigmaToT,
  sigmasFromAlphas,
  str,
  unsupported,
  unsupportedSpacing,
  logf,
} from './common.js';

export const EULER_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  prediction_type: 'epsilon',
  interpolation_type: 'linear',
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  sigma_min: null,
  sigma_max: null,
  timestep_spacing: 'linspace',
  timestep_type: 'discrete',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
  final_sigmas_type: 'zero',
};

export const EULER_ANCESTRAL_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  trained_betas: null,
  prediction_type: 'epsilon',
  timestep_spacing: 'linspace',
  steps_offset: 0,
  rescale_betas_zero_snr: false,
};

/**
 * Euler-family timesteps (float32, not rounded for linspace), discreteSchedule's too. `linspace64`: linspace kept in
 * float64, as DPMSolverSDEScheduler makes it (`dtype=float`; the others ask numpy for float32).
 */
function eulerTimesteps(className: string, c: ResolvedConfig, n: number, linspace64 = false): number[] {
  const train = num(c, 'num_train_timesteps');
  switch (str(c, 'timestep_spacing')) {
    case 'linspace': {
      const ts = npLinspace(0, train - 1, n).reverse();
      return linspace64 ? ts : ts.map(f);
    }
    case 'leading': {
      const ratio = Math.floor(train / n);
      return npArange(0, n, 1).map((i) => f(f(npRound(i * ratio)) + num(c, 'steps_offset'))).reverse();
    }
    case 'trailing':
      return npArange(train, 0, -train / n).map((t) => f(f(npRound(t)) - 1));
    default:
      return unsupportedSpacing(className, c);
  }
}

function eulerTables(name: string, c: ResolvedConfig): { ac: Float32Array; sigmas: Float32Array } {
  const ac = alphasCumprod(name, c, true);
  // Close to 0 without being 0 so the first sigma is finite (as diffusers does).
  if (c.rescale_betas_zero_snr === true) ac[ac.length - 1] = 2 ** -24;
  return { ac, sigmas: sigmasFromAlphas(ac) };
}

/** sample / sqrt(sigma² + 1), float32. */
export function scaleBySigma(sample: Float32Array, sigma: number): Float32Array {
  const denom = f(Math.sqrt(f(f(sigma * sigma) + 1)));
  const out = new Float32Array(sample.length);
  for (let i = 0; i < sample.length; i++) out[i] = sample[i]! / denom;
  return out;
}

/** pred_original_sample of the Euler family, written into `out`. */
export function predictX0(prediction: string, m: Float32Array, s: Float32Array, sigma: number, out: Float32Array): void {
  if (prediction === 'epsilon') {
    for (let i = 0; i < s.length; i++) out[i] = s[i]! - f(sigma * m[i]!);
  } else if (prediction === 'v_prediction') {
    const s2p1 = f(f(sigma * sigma) + 1);
    const cm = f(-sigma / f(Math.sqrt(s2p1)));
    for (let i = 0; i < s.length; i++) out[i] = f(m[i]! * cm) + f(s[i]! / s2p1);
  } else {
    out.set(m);
  }
}

/**
 * The schedule of the k-diffusion style classes (LMS, Heun, KDPM2 and its ancestral form, DPM++ SDE): checks shared by
 * their constructors, the Euler timesteps, sigmas interpolated on the table, then a Karras / exponential / beta ramp
 * between the config's sigma_min / sigma_max (hidden keys; LMS's and DPM++ SDE's Karras ramp ignores them) or the
 * schedule's own ends, with the timesteps back from those sigmas: float64, neither rounded nor cast (each class does
 * that its own way).
 */
export function discreteSchedule(
  name: string,
  config: ResolvedConfig,
  n: number,
  predictions: readonly string[],
  karrasReadsBounds = true,
  linspace64 = false,
): { timesteps: number[]; sigmas: number[]; logSigmas: Float32Array; converted: SigmaRamp | undefined } {
  checkSteps(name, n, trainStepRange(config));
  oneOf(name, config, 'prediction_type', predictions);
  checkOneRamp(name, config);
  const { sigmas: table } = eulerTables(name, config);
  const logSigmas = table.map(logf);
  const timesteps = eulerTimesteps(name, config, n, linspace64);
  const sigmas = timesteps.map((t) => npInterpIndex(t, table));
  const converted = sigmaRamp(config);
  if (!converted) return { timesteps, sigmas, logSigmas, converted };
  const bounds = converted !== 'karras' || karrasReadsBounds;
  const sMin = (bounds ? (config.sigma_min as number | null | undefined) : undefined) ?? sigmas[sigmas.length - 1]!;
  const sMax = (bounds ? (config.sigma_max as number | null | undefined) : undefined) ?? sigmas[0]!;
  const ramp = rampSigmas(converted, sMin, sMax, n);
  return { timesteps: ramp.map((s) => sigmaToT(s, logSigmas)), sigmas: ramp, logSigmas, converted };
}

/** What the sigma-based discrete schedulers share (Euler, Euler ancestral, LMS, Heun, DPM2, DPM2 a): schedule, input scaling, noising. */
export abstract class EulerBase implements Scheduler {
  abstract readonly name: string;
  readonly timesteps: readonly number[];
  readonly sigmas: readonly number[];
  readonly initNoiseSigma: number;
  protected readonly sig: Float32Array;
  protected readonly prediction: string;
  protected index = 0;

  constructor(readonly config: ResolvedConfig, timesteps: number[], sigmas: Float32Array, className: string) {
    this.prediction = oneOf(className, config, 'prediction_type', ['epsilon', 'v_prediction', 'sample', 'original_sample']);
    this.sig = sigmas;
    this.sigmas = Object.freeze(Array.from(sigmas));
    this.timesteps = Object.freeze(timesteps.slice());
    let max = 0;
    for (const s of sigmas) max = Math.max(max, s);
    const spacing = str(config, 'timestep_spacing');
    this.initNoiseSigma = spacing === 'linspace' || spacing === 'trailing' ? max : f(Math.sqrt(f(f(max * max) + 1)));
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return scaleBySigma(sample, this.sig[this.index]!);
  }

  setBeginIndex(index: number): void {
    checkBeginIndex(this.name, index, this.timesteps);
    this.index = index;
  }

  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseSigma(this.name, this.sig, this.timesteps, index, original, noise);
  }

  abstract step(modelOutput: Float32Array, t: number, sample: Float32Array, noise: () => Float32Array): StepResult;

  /** Throws past the schedule's end. */
  protected checkIndex(): void {
    if (this.index >= this.timesteps.length) throw new Error(`${this.name}: step() called more than ${this.timesteps.length} times`);
  }

  protected nextSigma(): [number, number] {
    this.checkIndex();
    return [this.sig[this.index]!, this.sig[this.index + 1]!];
  }
}

export class EulerDiscrete extends EulerBase {
  readonly name = 'EulerDiscreteScheduler';

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'EulerDiscreteScheduler';
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    checkOneRamp(name, config);
    oneOf(name, config, 'interpolation_type', ['linear']);
    if (str(config, 'timestep_type') === 'continuous' && str(config, 'prediction_type') === 'v_prediction') {
      unsupported(name, 'timestep_type "continuous" with v_prediction');
    }
    const finalType = oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
    const { ac, sigmas: table } = eulerTables(name, config);
    let timesteps = eulerTimesteps(name, config, numInferenceSteps);
    let sig = timesteps.map((t) => npInterpIndex(t, table));
    const ramp = sigmaRamp(config);
    if (ramp) {
      const logSigmas = table.map(logf);
      // np.interp returns float64: the bounds are not rounded to float32 (they differ for linspace spacing).
      const sMin = (config.sigma_min as number | null) ?? sig[sig.length - 1]!;
      const sMax = (config.sigma_max as number | null) ?? sig[0]!;
      sig = rampSigmas(ramp, sMin, sMax, numInferenceSteps);
      timesteps = sig.map((s) => f(sigmaToT(s, logSigmas)));
    }
    const last = finalType === 'zero' ? 0 : f(Math.sqrt(f(f(1 - ac[0]!) / ac[0]!)));
    super(config, timesteps, Float32Array.from([...sig, last]), name);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    const [sigma, sigmaNext] = this.nextSigma();
    const pred = new Float32Array(sample.length);
    predictX0(this.prediction, modelOutput, sample, sigma, pred);
    const dt = f(sigmaNext - sigma);
    const out = pred; // pred is read before being overwritten, element by element
    for (let i = 0; i < sample.length; i++) {
      const d = f(f(sample[i]! - pred[i]!) / sigma);
      out[i] = sample[i]! + f(d * dt);
    }
    this.index++;
    return { prevSample: out };
  }
}

export class EulerAncestralDiscrete extends EulerBase {
  readonly name = 'EulerAncestralDiscreteScheduler';

  constructor(config: ResolvedConfig, numInferenceSteps: number) {
    const name = 'EulerAncestralDiscreteScheduler';
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    oneOf(name, config, 'prediction_type', ['epsilon', 'v_prediction']);
    const { sigmas: table } = eulerTables(name, config);
    const timesteps = eulerTimesteps(name, config, numInferenceSteps);
    const sig = timesteps.map((t) => npInterpIndex(t, table));
    super(config, timesteps, Float32Array.from([...sig, 0]), name);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const [sigma, sigmaTo] = this.nextSigma();
    const out = new Float32Array(sample.length);
    predictX0(this.prediction, modelOutput, sample, sigma, out);
    const from2 = f(sigma * sigma);
    const to2 = f(sigmaTo * sigmaTo);
    const sigmaUp = f(Math.sqrt(f(f(to2 * f(from2 - to2)) / from2)));
    const sigmaDown = f(Math.sqrt(f(to2 - f(sigmaUp * sigmaUp))));
    const dt = f(sigmaDown - sigma);
    // diffusers draws the noise on every step, the last (sigma_up = 0) included: it advances the generator.
    const z = noise();
    for (let i = 0; i < sample.length; i++) {
      const d = f(f(sample[i]! - out[i]!) / sigma);
      out[i] = f(sample[i]! + f(d * dt)) + f(z[i]! * sigmaUp);
    }
    this.index++;
    return { prevSample: out };
  }
}
