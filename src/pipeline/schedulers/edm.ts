/**
 * @module EDMEulerScheduler and EDMDPMSolverMultistepScheduler (diffusers): the schedulers of models trained in Karras
 * et al.'s EDM formulation (Playground v2.5). Sigmas come straight from sigma_min/sigma_max (no betas); the UNet sees
 * c_noise = ¼·ln σ as its timestep and c_in·x as its sample, and its output becomes x0 through c_skip and c_out
 * (`precondition_*`). Float32 like torch; the Euler class's Karras ramp is float64 before its float32 cast.
 */

import type { StepResult } from '../types.js';
import {
  addNoiseSigma,
  bool,
  checkSteps,
  type ConfigValue,
  f,
  logf,
  num,
  oneOf,
  type ResolvedConfig,
  torchLinspaceF32,
  torchLinspaceF64,
  trainStepRange,
  unsupported,
} from './common.js';
import { DPM_SOLVER_DEFAULTS, DPMSolverSteps } from './dpmsolver.js';
import { MultistepSchedule } from './base.js';

const EDM_COMMON: Readonly<Record<string, ConfigValue>> = {
  sigma_min: 0.002,
  sigma_max: 80.0,
  sigma_data: 0.5,
  sigma_schedule: 'karras',
  num_train_timesteps: 1000,
  prediction_type: 'epsilon',
  rho: 7.0,
};

export const EDM_EULER_DEFAULTS: Readonly<Record<string, ConfigValue>> = { ...EDM_COMMON, final_sigmas_type: 'zero' };

export const EDM_DPM_DEFAULTS: Readonly<Record<string, ConfigValue>> = { ...EDM_COMMON, ...DPM_SOLVER_DEFAULTS, final_sigmas_type: 'zero' };

/** The two classes; a request may switch only between them on a model trained this way (see index.ts). */
export const EDM_CLASSES: ReadonlySet<string> = new Set(['EDMEulerScheduler', 'EDMDPMSolverMultistepScheduler']);

/**
 * The preconditioning both classes apply, from sigma_data and the prediction type: c_in, c_skip, c_out of a float32
 * sigma (`python_scalar / tensor` is `tensor.reciprocal() * scalar` in torch).
 */
class Preconditioning {
  constructor(
    readonly sigmaData: number,
    readonly vPrediction: boolean,
  ) {}

  #c(sigma: number): { cIn: number; cSkip: number; cOut: number } {
    const sd2 = f(this.sigmaData * this.sigmaData);
    const den = f(f(sigma * sigma) + sd2);
    const root = f(Math.sqrt(den));
    return {
      cIn: f(1 / root),
      cSkip: f(f(1 / den) * sd2),
      cOut: f(f((this.vPrediction ? -sigma : sigma) * f(this.sigmaData)) / root),
    };
  }

  /** `precondition_inputs`: c_in·x, what the UNet sees. */
  inputs(sample: Float32Array, sigma: number): Float32Array {
    const { cIn } = this.#c(sigma);
    return sample.map((x) => f(x * cIn));
  }

  /** `precondition_outputs`: x0 = c_skip·x + c_out·F(x). */
  outputs(sample: Float32Array, m: Float32Array, sigma: number): Float32Array {
    const { cSkip, cOut } = this.#c(sigma);
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) out[k] = f(f(cSkip * sample[k]!) + f(cOut * m[k]!));
    return out;
  }
}

/** `init_noise_sigma`: (sigma_max² + 1) ** 0.5, in Python's float64. */
const initNoise = (config: ResolvedConfig) => Math.sqrt(num(config, 'sigma_max') ** 2 + 1);

/** The options both classes check alike; returns their preconditioning. */
function edmOptions(name: string, config: ResolvedConfig, n: number): Preconditioning {
  checkSteps(name, n, trainStepRange(config));
  oneOf(name, config, 'sigma_schedule', ['karras', 'exponential']);
  oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
  // precondition_outputs knows these two; diffusers fails "sample" at the first step
  const prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'v_prediction']);
  for (const k of ['sigma_min', 'sigma_max', 'sigma_data', 'rho']) {
    if (!(num(config, k) > 0)) unsupported(name, `${k} ${num(config, k)} (it must be > 0)`);
  }
  if (!(num(config, 'sigma_min') < num(config, 'sigma_max'))) unsupported(name, 'sigma_min not below sigma_max');
  return new Preconditioning(num(config, 'sigma_data'), prediction === 'v_prediction');
}

/** `_compute_exponential_sigmas`: a float32 linspace of the log bounds, exp'd, largest first (both classes). */
function exponentialEdm(config: ResolvedConfig, n: number): number[] {
  const ramp = torchLinspaceF32(Math.log(num(config, 'sigma_min')), Math.log(num(config, 'sigma_max')), n);
  return Array.from(ramp, (x) => f(Math.exp(x))).reverse();
}

/** `_compute_karras_sigmas` on a ramp from 0 to 1, in the ramp's precision (`round`: f for float32, identity for float64). */
function karrasEdm(config: ResolvedConfig, ramp: ArrayLike<number>, round: (x: number) => number): number[] {
  const rho = num(config, 'rho');
  const minInv = num(config, 'sigma_min') ** (1 / rho);
  const maxInv = num(config, 'sigma_max') ** (1 / rho);
  const span = round(minInv - maxInv);
  return Array.from(ramp, (r) => f(round(round(maxInv) + round(r * span)) ** rho));
}

const cNoise = (sigma: number) => f(0.25 * logf(sigma));

export class EDMEuler extends MultistepSchedule {
  readonly name = 'EDMEulerScheduler';
  override readonly initNoiseSigma: number;
  readonly #pre: Preconditioning;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    this.#pre = edmOptions(this.name, config, numInferenceSteps);
    this.initNoiseSigma = initNoise(config);
    // Karras on a float64 ramp (its set_timesteps asks for float64 off MPS); exponential's own linspace is float32.
    const sig =
      config.sigma_schedule === 'karras' ? karrasEdm(config, torchLinspaceF64(0, 1, numInferenceSteps), (x) => x) : exponentialEdm(config, numInferenceSteps);
    const last = config.final_sigmas_type === 'zero' ? 0 : sig[sig.length - 1]!;
    this.schedule(sig.map(cNoise), Float32Array.from([...sig, last]));
  }

  override scaleModelInput(sample: Float32Array): Float32Array {
    return this.#pre.inputs(sample, this.sig[this.current()]!);
  }

  /** The pipeline passes no s_churn, so gamma is 0: sigma_hat is sigma and no noise is drawn. */
  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    const i = this.current();
    const sigma = this.sig[i]!;
    const x0 = this.#pre.outputs(sample, modelOutput, sigma);
    const dt = f(this.sig[i + 1]! - sigma);
    const out = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) out[k] = f(sample[k]! + f(f(f(sample[k]! - x0[k]!) / sigma) * dt));
    this.index++;
    return { prevSample: out, denoised: x0 };
  }

  override addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseSigma(this.name, this.sig, this.timesteps, index, original, noise);
  }
}

const EDM_DPM = 'EDMDPMSolverMultistepScheduler';

export class EDMDPMSolverMultistep extends DPMSolverSteps {
  readonly name = EDM_DPM;
  override readonly initNoiseSigma: number;
  readonly #pre: Preconditioning;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    const pre = edmOptions(EDM_DPM, config, numInferenceSteps);
    // As its __init__ does, DEIS's and UniPC's options (carried over by from_config) map to DPM-Solver++'s.
    const algorithm = config.algorithm_type === 'deis' ? 'dpmsolver++' : oneOf(EDM_DPM, config, 'algorithm_type', ['dpmsolver++', 'sde-dpmsolver++']);
    const solver = ['logrho', 'bh1', 'bh2'].includes(String(config.solver_type)) ? 'midpoint' : oneOf(EDM_DPM, config, 'solver_type', ['midpoint', 'heun']);
    const order = num(config, 'solver_order');
    if (![1, 2, 3].includes(order)) unsupported(EDM_DPM, `solver_order ${order} (1 to 3)`);
    // its third-order update has no SDE form (diffusers' step fails)
    if (order === 3 && algorithm === 'sde-dpmsolver++') unsupported(EDM_DPM, 'solver_order 3 with algorithm_type "sde-dpmsolver++"');
    if (bool(config, 'thresholding')) unsupported(EDM_DPM, 'thresholding');
    super({ order, plusPlus: true, sde: algorithm === 'sde-dpmsolver++', heun: solver === 'heun' });
    this.#pre = pre;
    this.initNoiseSigma = initNoise(config);
    const sig =
      config.sigma_schedule === 'karras' ? karrasEdm(config, torchLinspaceF32(0, 1, numInferenceSteps), f) : exponentialEdm(config, numInferenceSteps);
    const last = config.final_sigmas_type === 'zero' ? 0 : f(num(config, 'sigma_min'));
    this.schedule(sig.map(cNoise), Float32Array.from([...sig, last]));
  }

  override scaleModelInput(sample: Float32Array): Float32Array {
    return this.#pre.inputs(sample, this.sig[this.current()]!);
  }

  protected convert(modelOutput: Float32Array, sample: Float32Array, sigma: number): Float32Array {
    return this.#pre.outputs(sample, modelOutput, sigma);
  }

  /** The inputs are scaled before the UNet, so alpha_t is 1: lambda = −ln σ (∞ at the final 0). */
  protected override asl(sigma: number): [number, number, number] {
    return [1, sigma, -logf(sigma)];
  }

  override addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseSigma(this.name, this.sig, this.timesteps, index, original, noise);
  }
}
