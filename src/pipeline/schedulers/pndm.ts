/** @module PNDMScheduler (diffusers): the PRK warm-up when skip_prk_steps is false, then PLMS; float32 like torch. */

import type { StepRange } from '../job.js';
import type { Scheduler, StepResult } from '../types.js';
import {
  addNoiseAlphas,
  alphasCumprod,
  alphasStepRange,
  BETA_DEFAULTS,
  bool,
  checkBeginIndex,
  checkSteps,
  f,
  npArange,
  npLinspace,
  npRound,
  num,
  oneOf,
  type ConfigValue,
  type ResolvedConfig,
  str,
  unsupportedSpacing,
} from './common.js';

export const PNDM_DEFAULTS: Readonly<Record<string, ConfigValue>> = {
  ...BETA_DEFAULTS,
  skip_prk_steps: false,
  set_alpha_to_one: false,
  prediction_type: 'epsilon',
  timestep_spacing: 'leading',
  steps_offset: 0,
};

/** diffusers fails below 4 steps without skip_prk_steps: the PRK warm-up needs the last 4 timesteps. */
export function pndmStepRange(config: ResolvedConfig): StepRange {
  const r = alphasStepRange(config);
  return bool(config, 'skip_prk_steps') ? r : { ...r, min: 4, why: `PNDMScheduler without skip_prk_steps needs at least 4; ${r.why}` };
}

const SIXTH = f(1 / 6);
const THIRD = f(1 / 3);
const TWENTY_FOURTH = f(1 / 24);

export class PNDM implements Scheduler {
  readonly name = 'PNDMScheduler';
  readonly timesteps: readonly number[];
  readonly sigmas = undefined;
  readonly initNoiseSigma = 1;
  readonly #ac: Float32Array;
  readonly #finalAc: number;
  readonly #ratio: number;
  readonly #vPred: boolean;
  readonly #prkCount: number;
  readonly #prkTimesteps: number[];
  #counter = 0;
  /** Where the (cut) schedule starts: diffusers' PNDM has no begin index, its counter runs from 0 on the cut list. */
  #offset = 0;
  #ets: Float32Array[] = [];
  #curSample: Float32Array | undefined;
  #curModelOutput: Float32Array | undefined;

  constructor(readonly config: ResolvedConfig, numInferenceSteps: number) {
    const name = this.name;
    const train = num(config, 'num_train_timesteps');
    checkSteps(name, numInferenceSteps, pndmStepRange(config));
    this.#vPred = oneOf(name, config, 'prediction_type', ['epsilon', 'v_prediction']) === 'v_prediction';
    this.#ac = alphasCumprod(name, config, false);
    this.#finalAc = bool(config, 'set_alpha_to_one') ? 1 : this.#ac[0]!;
    this.#ratio = Math.floor(train / numInferenceSteps);
    // Ascending, as diffusers keeps `_timesteps`.
    let base: number[];
    switch (str(config, 'timestep_spacing')) {
      case 'linspace':
        base = npLinspace(0, train - 1, numInferenceSteps).map(npRound);
        break;
      case 'leading':
        base = npArange(0, numInferenceSteps, 1).map((i) => i * this.#ratio + num(config, 'steps_offset'));
        break;
      case 'trailing':
        base = npArange(train, 0, -train / numInferenceSteps).map((t) => npRound(t) - 1).reverse();
        break;
      default:
        unsupportedSpacing(name, config);
    }
    let prk: number[] = [];
    let plms: number[];
    if (bool(config, 'skip_prk_steps')) {
      plms = [...base.slice(0, -1), ...base.slice(-2, -1), ...base.slice(-1)].reverse();
    } else {
      const half = Math.floor(this.#ratio / 2);
      const rep: number[] = [];
      for (const t of base.slice(-4)) rep.push(t, t + half);
      const doubled = rep.slice(0, -1).flatMap((t) => [t, t]);
      prk = doubled.slice(1, -1).reverse();
      plms = base.slice(0, -3).reverse();
    }
    this.#prkTimesteps = prk;
    this.#prkCount = prk.length;
    this.timesteps = Object.freeze([...prk, ...plms]);
  }

  scaleModelInput(sample: Float32Array): Float32Array {
    return sample;
  }

  setBeginIndex(index: number): void {
    checkBeginIndex(this.name, index, this.timesteps);
    this.#offset = index;
  }

  addNoise(original: Float32Array, noise: Float32Array, index: number): Float32Array {
    return addNoiseAlphas(this.name, this.#ac, this.timesteps, index, original, noise);
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array): StepResult {
    const left = this.timesteps.length - this.#offset;
    if (this.#counter >= left) throw new Error(`${this.name}: step() called more than ${left} times`);
    t = this.timesteps[this.#offset + this.#counter]!;
    const prev = this.#counter < this.#prkCount ? this.#stepPrk(modelOutput, t, sample) : this.#stepPlms(modelOutput, t, sample);
    this.#counter++;
    return { prevSample: prev };
  }

  #stepPrk(m: Float32Array, t: number, sample: Float32Array): Float32Array {
    const c = this.#counter;
    const prevT = t - (c % 2 ? 0 : Math.floor(this.#ratio / 2));
    const t0 = this.#prkTimesteps[Math.floor(c / 4) * 4]!;
    const n = m.length;
    let out = m;
    if (c % 4 === 0) {
      this.#curModelOutput = m.map((v) => f(SIXTH * v));
      this.#ets.push(m.slice()); // kept across steps: never alias a caller's buffer
      this.#curSample = sample.slice();
    } else if (c % 4 === 1 || c % 4 === 2) {
      const acc = this.#curModelOutput!;
      for (let i = 0; i < n; i++) acc[i] = acc[i]! + f(THIRD * m[i]!);
    } else {
      const acc = this.#curModelOutput!;
      out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = acc[i]! + f(SIXTH * m[i]!);
      this.#curModelOutput = undefined;
    }
    return this.#prevSample(this.#curSample ?? sample, t0, prevT, out);
  }

  #stepPlms(m: Float32Array, t: number, sample: Float32Array): Float32Array {
    let prevT = t - this.#ratio;
    if (this.#counter !== 1) {
      this.#ets = this.#ets.slice(-3);
      this.#ets.push(m.slice());
    } else {
      // The repeated timestep: the first step is redone at the same t from the saved sample.
      prevT = t;
      t = t + this.#ratio;
    }
    const e = this.#ets;
    const n = m.length;
    let mo: Float32Array;
    if (e.length === 1 && this.#counter === 0) {
      mo = m;
      this.#curSample = sample.slice();
    } else if (e.length === 1 && this.#counter === 1) {
      mo = new Float32Array(n);
      for (let i = 0; i < n; i++) mo[i] = f(m[i]! + e[0]![i]!) / 2;
      sample = this.#curSample!;
      this.#curSample = undefined;
    } else if (e.length === 2) {
      const [a, b] = [e[1]!, e[0]!];
      mo = new Float32Array(n);
      for (let i = 0; i < n; i++) mo[i] = f(f(3 * a[i]!) - b[i]!) / 2;
    } else if (e.length === 3) {
      const [a, b, c] = [e[2]!, e[1]!, e[0]!];
      mo = new Float32Array(n);
      for (let i = 0; i < n; i++) mo[i] = f(f(f(23 * a[i]!) - f(16 * b[i]!)) + f(5 * c[i]!)) / 12;
    } else {
      const [a, b, c, d] = [e[3]!, e[2]!, e[1]!, e[0]!];
      mo = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        mo[i] = TWENTY_FOURTH * f(f(f(f(55 * a[i]!) - f(59 * b[i]!)) + f(37 * c[i]!)) - f(9 * d[i]!));
      }
    }
    return this.#prevSample(sample, t, prevT, mo);
  }

  /** diffusers `_get_prev_sample` (formula (9) of the PNDM paper). */
  #prevSample(sample: Float32Array, t: number, prevT: number, m: Float32Array): Float32Array {
    const at = this.#ac[t]!;
    const ap = prevT >= 0 ? this.#ac[prevT]! : this.#finalAc;
    const bt = f(1 - at);
    const bp = f(1 - ap);
    const n = sample.length;
    if (this.#vPred) {
      const sa = f(Math.sqrt(at));
      const sb = f(Math.sqrt(bt));
      const mv = new Float32Array(n);
      for (let i = 0; i < n; i++) mv[i] = f(sa * m[i]!) + f(sb * sample[i]!);
      m = mv;
    }
    const sampleCoeff = f(Math.sqrt(f(ap / at)));
    const denom = f(f(at * f(Math.sqrt(bp))) + f(Math.sqrt(f(f(at * bt) * ap))));
    const diff = f(ap - at);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = f(sampleCoeff * sample[i]!) - f(f(diff * m[i]!) / denom);
    return out;
  }
}
