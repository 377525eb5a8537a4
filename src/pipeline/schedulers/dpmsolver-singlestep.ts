/**
 * @module DPMSolverSinglestepScheduler (diffusers): DPM-Solver++ / DPM-Solver / SDE-DPM-Solver++ in groups of
 * orders 1, 2, 3 (`get_order_list`), each group stepping from the sample at its start; midpoint or Heun; float32 like
 * torch. The schedule is DPM-Solver's (dpmsolver.ts), with linspace timesteps only: the class has no spacing option.
 */

import type { StepResult } from '../types.js';
import {
  alphasCumprod,
  alphaSigmaLambda,
  BETA_DEFAULTS,
  bool,
  checkIgnoredVariance,
  checkOneRamp,
  checkSteps,
  type ConfigValue,
  f,
  linspaceTimesteps,
  num,
  oneOf,
  type ResolvedConfig,
  trainStepRange,
  unsupported,
} from './common.js';
import { convertModelOutput, MultistepSchedule } from './base.js';
import { dpmSigmaSchedule, type DpmForm, lambdaClipped, lowOrderCoefficients, lowOrderUpdate, thirdOrderCoefficients } from './dpmsolver.js';

/** diffusers' `__init__` options of the class (lower_order_final defaults to false here, unlike the multistep one). */
export const DPMSS_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  solver_order: 2,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lower_order_final: false,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_flow_sigmas: false,
  flow_shift: 1.0,
  final_sigmas_type: 'zero',
  lambda_min_clipped: -Infinity,
  variance_type: null,
  use_dynamic_shifting: false,
  time_shift_type: 'exponential',
};

/**
 * `set_timesteps` then `get_order_list`: the solver order of each step. An uneven step count, or the final sigma 0,
 * turns lower_order_final on (diffusers rewrites its config, with a warning); then the orders cycle 1, 2[, 3] and the
 * last group is cut short, and the final sigma 0 makes the last step first order.
 */
export function singlestepOrders(steps: number, order: number, lowerOrderFinal: boolean, finalZero: boolean): number[] {
  const lower = lowerOrderFinal || steps % order !== 0 || finalZero;
  const cycles = (k: number) => Array.from({ length: Math.max(k, 0) }, () => (order === 3 ? [1, 2, 3] : [1, 2])).flat();
  let orders: number[];
  if (order === 1) orders = Array<number>(steps).fill(1);
  else if (!lower) orders = cycles(steps / order);
  else if (order === 3) {
    const q = Math.floor(steps / 3);
    orders = steps % 3 === 0 ? [...cycles(q - 1), 1, 2, 1] : steps % 3 === 1 ? [...cycles(q), 1] : [...cycles(q), 1, 2];
  } else orders = steps % 2 === 0 ? [...cycles(steps / 2 - 1), 1, 1] : [...cycles((steps - 1) / 2), 1];
  if (finalZero) orders[orders.length - 1] = 1;
  return orders;
}

export class DPMSolverSinglestep extends MultistepSchedule {
  readonly name = 'DPMSolverSinglestepScheduler';
  readonly #prediction: string;
  readonly #form: DpmForm;
  /** The order of each step. */
  readonly orders: readonly number[];
  /** The converted outputs of the last solver_order steps, oldest first; undefined before a step gave one. */
  readonly #outputs: (Float32Array | undefined)[];
  /** `self.sample`: the sample at the start of the current group (its first-order step). */
  #start: Float32Array = new Float32Array(0);

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    const given = config.algorithm_type;
    // As diffusers' __init__ does, DEIS's and UniPC's options (a config `from_config` carries over) map to DPM-Solver's.
    const algorithm = given === 'deis' ? 'dpmsolver++' : oneOf(name, config, 'algorithm_type', ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++']);
    const solver = ['logrho', 'bh1', 'bh2'].includes(String(config.solver_type)) ? 'midpoint' : oneOf(name, config, 'solver_type', ['midpoint', 'heun']);
    this.#form = { plusPlus: algorithm.endsWith('++'), sde: algorithm.startsWith('sde-'), heun: solver === 'heun' };
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    const order = num(config, 'solver_order');
    if (![1, 2, 3].includes(order)) unsupported(name, `solver_order ${order} (1 to 3)`);
    for (const k of ['thresholding', 'use_flow_sigmas', 'use_dynamic_shifting']) {
      if (bool(config, k)) unsupported(name, k);
    }
    checkOneRamp(name, config);
    checkIgnoredVariance(name, config);
    const finalType = oneOf(name, config, 'final_sigmas_type', ['zero', 'sigma_min']);
    // diffusers checks the algorithm_type it was given, so DEIS's "deis" is refused here too
    if (given !== 'dpmsolver++' && given !== 'sde-dpmsolver++' && finalType === 'zero') {
      unsupported(name, `final_sigmas_type "zero" with algorithm_type "${String(given)}" (diffusers refuses it too; use "sigma_min")`);
    }

    const ac = alphasCumprod(name, config, false);
    const last = num(config, 'num_train_timesteps') - lambdaClipped(ac, num(config, 'lambda_min_clipped'));
    const s = dpmSigmaSchedule(config, ac, linspaceTimesteps(numInferenceSteps, last), numInferenceSteps, finalType === 'zero', true);
    this.schedule(s.timesteps, s.sig);
    this.orders = Object.freeze(singlestepOrders(numInferenceSteps, order, bool(config, 'lower_order_final'), finalType === 'zero'));
    this.#outputs = Array<Float32Array | undefined>(order).fill(undefined);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array, noise: () => Float32Array): StepResult {
    const i = this.current();
    const outputs = this.#outputs;
    outputs.shift();
    outputs.push(convertModelOutput(modelOutput, sample, this.sig[i]!, this.#prediction, this.#form.plusPlus));
    // The SDE form draws on every step, the last included, as diffusers does.
    const z = this.#form.sde ? noise() : undefined;
    // A schedule cut by image-to-image may begin inside a group: its first steps drop to the orders they have outputs for.
    let order = this.orders[i]!;
    while (outputs[outputs.length - order] === undefined) order--;
    if (order === 1) this.#start = sample;
    const n = outputs.length;
    const m0 = outputs[n - 1]!;
    let prev: Float32Array;
    if (order === 1) {
      const k = lowOrderCoefficients(this.#form, alphaSigmaLambda(this.sig[i + 1]!), alphaSigmaLambda(this.sig[i]!), 1);
      prev = lowOrderUpdate(k, this.#start, m0, m0, undefined, 0, z);
    } else if (order === 2) {
      // From the group's start at sigma s1 to t: D0 = m1, D1 = (1/r0)·(m0 − m1), r0 = (lambda_s0 − lambda_s1) / h.
      const s1 = alphaSigmaLambda(this.sig[i - 1]!);
      const k = lowOrderCoefficients(this.#form, alphaSigmaLambda(this.sig[i + 1]!), s1, 2);
      const invR0 = f(1 / f(f(alphaSigmaLambda(this.sig[i]!)[2] - s1[2]) / k.h));
      prev = lowOrderUpdate(k, this.#start, outputs[n - 2]!, m0, outputs[n - 2], invR0, z);
    } else prev = this.#thirdOrder(m0, outputs[n - 2]!, outputs[n - 3]!, z);
    this.index++;
    return { prevSample: prev };
  }

  /**
   * `singlestep_dpm_solver_third_order_update`: from the group's start at sigma s2 to t, D0 = m2 and the first
   * differences D1_0 = (1/r1)·(m1 − m2), D1_1 = (1/r0)·(m0 − m2); midpoint takes D1_1, heun D1 (their extrapolation)
   * and the second difference D2. x_t = a·x + b·D0 + c·D1 [+ d·D2] [+ e·z], the signs folded into the coefficients.
   */
  #thirdOrder(m0: Float32Array, m1: Float32Array, m2: Float32Array, z: Float32Array | undefined): Float32Array {
    const i = this.index;
    const lambdaS0 = alphaSigmaLambda(this.sig[i]!)[2];
    const lambdaS1 = alphaSigmaLambda(this.sig[i - 1]!)[2];
    const s2 = alphaSigmaLambda(this.sig[i - 2]!);
    const { a, b, c, d, e, h } = thirdOrderCoefficients(this.#form, alphaSigmaLambda(this.sig[i + 1]!), s2);
    const r0 = f(f(lambdaS0 - s2[2]) / h);
    const r1 = f(f(lambdaS1 - s2[2]) / h);
    const inv0 = f(1 / r0);
    const inv1 = f(1 / r1);
    const dr = f(r0 - r1);
    const heun = this.#form.heun;
    const x = this.#start;
    const out = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) {
      const d10 = f(inv1 * f(m1[k]! - m2[k]!));
      const d11 = f(inv0 * f(m0[k]! - m2[k]!));
      let v = f(f(a * x[k]!) + f(b * m2[k]!));
      if (heun) {
        const D1 = f(f(f(r0 * d10) - f(r1 * d11)) / dr);
        const D2 = f(f(2 * f(d11 - d10)) / dr);
        v = f(f(v + f(c * D1)) + f(d * D2));
      } else v = f(v + f(c * d11));
      out[k] = z ? f(v + f(e * z[k]!)) : v;
    }
    return out;
  }
}
