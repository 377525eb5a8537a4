/**
 * @module DEISMultistepScheduler (diffusers): DEIS with log-rho polynomial extrapolation, orders 1–3; float32 like
 * torch.
 */

import type { StepResult } from '../types.js';
import {
  alphaSigmaLambda,
  alphasCumprod,
  BETA_DEFAULTS,
  bool,
  checkOneRamp,
  checkSteps,
  f,
  multistepTimesteps,
  num,
  oneOf,
  type ConfigValue,
  type ResolvedConfig,
  trainStepRange,
  unsupported,
  logf,
} from './common.js';
import { MultistepSchedule } from './base.js';

export const DEIS_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  solver_order: 2,
  prediction_type: 'epsilon',
  thresholding: false,
  dynamic_thresholding_ratio: 0.995,
  sample_max_value: 1.0,
  algorithm_type: 'deis',
  solver_type: 'logrho',
  lower_order_final: true,
  use_karras_sigmas: false,
  use_exponential_sigmas: false,
  use_beta_sigmas: false,
  use_flow_sigmas: false,
  flow_shift: 1.0,
  timestep_spacing: 'linspace',
  steps_offset: 0,
  use_dynamic_shifting: false,
  time_shift_type: 'exponential',
};

/**
 * Not `__init__` options, but `_convert_to_karras` / `_exponential` / `_beta` take their bounds from the config when
 * it has them: a file's own keys, or an Euler or UniPC config's carried over by a request's switch.
 */
export const DEIS_HIDDEN: Readonly<Record<string, ConfigValue>> = { sigma_min: null, sigma_max: null };


/** The second-order coefficient's antiderivative (diffusers' `ind_fn` with three points), float32. */
function ind2(t: number, b: number, c: number): number {
  return f(f(t * f(f(f(-logf(c)) + logf(t)) - 1)) / f(logf(b) - logf(c)));
}

/** The third-order one (`ind_fn` with four points), float32. */
function ind3(t: number, b: number, c: number, d: number): number {
  const [lt, lc, ld, lb] = [logf(t), logf(c), logf(d), logf(b)];
  const inner = f(f(f(f(f(f(lc * f(f(ld - lt) + 1)) - f(ld * lt)) + ld) + f(lt * lt)) - f(2 * lt)) + 2);
  return f(f(t * inner) / f(f(lb - lc) * f(lb - ld)));
}

export class DEISMultistep extends MultistepSchedule {
  readonly name = 'DEISMultistepScheduler';
  readonly #order: number;
  readonly #prediction: string;
  /** Converted model outputs of the last steps, oldest first. */
  #outputs: Float32Array[] = [];
  #lowerOrderNums = 0;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    super();
    const name = this.name;
    checkSteps(name, numInferenceSteps, trainStepRange(config));
    // As diffusers' __init__ does, DPM-Solver's and UniPC's options (a config `from_config` carries over) map to DEIS's.
    if (!['dpmsolver', 'dpmsolver++'].includes(String(config.algorithm_type))) oneOf(name, config, 'algorithm_type', ['deis']);
    if (!['midpoint', 'heun', 'bh1', 'bh2'].includes(String(config.solver_type))) oneOf(name, config, 'solver_type', ['logrho']);
    this.#prediction = oneOf(name, config, 'prediction_type', ['epsilon', 'sample', 'v_prediction']);
    this.#order = num(config, 'solver_order');
    if (!Number.isInteger(this.#order) || this.#order < 1 || this.#order > 3) unsupported(name, `solver_order ${this.#order} (1 to 3)`);
    for (const k of ['thresholding', 'use_flow_sigmas', 'use_dynamic_shifting']) {
      if (bool(config, k)) unsupported(name, k);
    }
    checkOneRamp(name, config);

    const ac = alphasCumprod(name, config, false);
    // A ramp is bounded by the config's sigma_min / sigma_max (DEIS_HIDDEN), else the table's ends; DEIS has no final 0.
    this.sigmaSchedule(config, ac, multistepTimesteps(name, config, numInferenceSteps), numInferenceSteps, false);
  }

  step(modelOutput: Float32Array, _t: number, sample: Float32Array): StepResult {
    const i = this.current();
    const nSteps = this.timesteps.length;
    const lowerFinal = bool(this.config, 'lower_order_final') && nSteps < 15;
    const converted = this.#convert(modelOutput, sample, this.sig[i]!);
    this.#outputs.push(converted);
    if (this.#outputs.length > this.#order) this.#outputs.shift();
    let prev: Float32Array;
    if (this.#order === 1 || this.#lowerOrderNums < 1 || (lowerFinal && i === nSteps - 1)) prev = this.#firstOrder(converted, sample);
    else if (this.#order === 2 || this.#lowerOrderNums < 2 || (lowerFinal && i === nSteps - 2)) prev = this.#higherOrder(sample, 2);
    else prev = this.#higherOrder(sample, 3);
    if (this.#lowerOrderNums < this.#order) this.#lowerOrderNums++;
    this.index++;
    return { prevSample: prev };
  }

  /** diffusers `convert_model_output`: the x0 prediction turned back into the noise it implies. */
  #convert(m: Float32Array, s: Float32Array, sigma: number): Float32Array {
    const [alpha, sig] = alphaSigmaLambda(sigma);
    const n = m.length;
    const out = new Float32Array(n);
    for (let k = 0; k < n; k++) {
      let x0: number;
      if (this.#prediction === 'epsilon') x0 = f(s[k]! - f(sig * m[k]!)) / alpha;
      else if (this.#prediction === 'sample') x0 = m[k]!;
      else x0 = f(alpha * s[k]!) - f(sig * m[k]!);
      out[k] = f(s[k]! - f(alpha * f(x0))) / sig;
    }
    return out;
  }

  #firstOrder(m: Float32Array, s: Float32Array): Float32Array {
    const i = this.index;
    const [alphaT, sigmaT, lambdaT] = alphaSigmaLambda(this.sig[i + 1]!);
    const [alphaS, , lambdaS] = alphaSigmaLambda(this.sig[i]!);
    const h = f(lambdaT - lambdaS);
    const a = f(alphaT / alphaS);
    const b = f(sigmaT * f(f(Math.exp(h)) - 1));
    const out = new Float32Array(s.length);
    for (let k = 0; k < s.length; k++) out[k] = f(a * s[k]!) - f(b * m[k]!);
    return out;
  }

  /** `multistep_deis_{second,third}_order_update`: x_t = alpha_t·(x/alpha_s0 + Σ coef_k·m_k). */
  #higherOrder(s: Float32Array, order: 2 | 3): Float32Array {
    const i = this.index;
    const rhoAlpha = (j: number): [number, number] => {
      const [alpha, sigma] = alphaSigmaLambda(this.sig[j]!);
      return [f(sigma / alpha), alpha];
    };
    const [rt, alphaT] = rhoAlpha(i + 1);
    const [r0, alphaS0] = rhoAlpha(i);
    const r1 = rhoAlpha(i - 1)[0];
    const ms = this.#outputs.slice(-order).reverse(); // m0 (newest), m1, m2
    let coefs: number[];
    if (order === 2) coefs = [f(ind2(rt, r0, r1) - ind2(r0, r0, r1)), f(ind2(rt, r1, r0) - ind2(r0, r1, r0))];
    else {
      const r2 = rhoAlpha(i - 2)[0];
      coefs = [
        f(ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2)),
        f(ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0)),
        f(ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1)),
      ];
    }
    const out = new Float32Array(s.length);
    for (let k = 0; k < s.length; k++) {
      let acc = f(s[k]! / alphaS0);
      for (let j = 0; j < order; j++) acc = f(acc + f(coefs[j]! * ms[j]![k]!));
      out[k] = f(alphaT * acc);
    }
    return out;
  }
}
