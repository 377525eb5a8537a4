/**
 * @module Scheduler factory: a model's scheduler_config.json plus an optional per-request name, resolved the way
 * diffusers' `<Class>.from_config(model_config, **overrides)` resolves it.
 */

import { RuntimeError } from '../../errors.js';
import type { Scheduler } from '../types.js';
import { type ConfigValue, type ResolvedConfig, resolveConfig } from './common.js';
import { DDIM, DDIM_DEFAULTS } from './ddim.js';
import { DPM_DEFAULTS, DPMSolverMultistep } from './dpmsolver.js';
import { EULER_ANCESTRAL_DEFAULTS, EULER_DEFAULTS, EulerAncestralDiscrete, EulerDiscrete } from './euler.js';
import { LCM, LCM_DEFAULTS } from './lcm.js';
import { PNDM, PNDM_DEFAULTS } from './pndm.js';

export type { ResolvedConfig } from './common.js';

interface SchedulerClass {
  defaults: Readonly<Record<string, ConfigValue>>;
  build(config: ResolvedConfig, steps: number, eta: number): Scheduler;
}

const CLASSES: Readonly<Record<string, SchedulerClass>> = Object.freeze({
  PNDMScheduler: { defaults: PNDM_DEFAULTS, build: (c, n) => new PNDM(c, n) },
  DDIMScheduler: { defaults: DDIM_DEFAULTS, build: (c, n, eta) => new DDIM(c, n, eta) },
  EulerDiscreteScheduler: { defaults: EULER_DEFAULTS, build: (c, n) => new EulerDiscrete(c, n) },
  EulerAncestralDiscreteScheduler: { defaults: EULER_ANCESTRAL_DEFAULTS, build: (c, n) => new EulerAncestralDiscrete(c, n) },
  DPMSolverMultistepScheduler: { defaults: DPM_DEFAULTS, build: (c, n) => new DPMSolverMultistep(c, n) },
  LCMScheduler: { defaults: LCM_DEFAULTS, build: (c, n) => new LCM(c, n) },
});

/** A request's `scheduler` name: the diffusers class it builds and the config it forces on top of the model's. */
export interface SchedulerChoice {
  readonly className: string;
  readonly overrides: Readonly<Record<string, ConfigValue>>;
}

/**
 * Request names (A1111/ComfyUI-style short names; the diffusers class names are accepted too, with no overrides).
 * `pndm` forces skip_prk_steps as every Stable Diffusion pipeline ships it; a bare `PNDMScheduler` keeps the model's.
 */
export const SCHEDULER_NAMES: Readonly<Record<string, SchedulerChoice>> = Object.freeze({
  pndm: { className: 'PNDMScheduler', overrides: { skip_prk_steps: true } },
  ddim: { className: 'DDIMScheduler', overrides: {} },
  euler: { className: 'EulerDiscreteScheduler', overrides: {} },
  euler_karras: { className: 'EulerDiscreteScheduler', overrides: { use_karras_sigmas: true } },
  euler_a: { className: 'EulerAncestralDiscreteScheduler', overrides: {} },
  dpmpp_2m: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  },
  dpmpp_2m_karras: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  },
  lcm: { className: 'LCMScheduler', overrides: {} },
  ...Object.fromEntries(Object.keys(CLASSES).map((c) => [c, { className: c, overrides: {} }])),
});

export interface CreateSchedulerOptions {
  /** A request's scheduler name (a key of SCHEDULER_NAMES); absent = the model's own `_class_name`. */
  name?: string;
  /** DDIM's eta (noise weight, 0 = deterministic); other schedulers ignore it, as diffusers' pipeline does. */
  eta?: number;
}

export function createScheduler(
  config: Record<string, unknown>,
  numInferenceSteps: number,
  opts: CreateSchedulerOptions = {},
): Scheduler {
  let choice: SchedulerChoice;
  if (opts.name !== undefined) {
    if (!Object.hasOwn(SCHEDULER_NAMES, opts.name)) {
      throw new RuntimeError('INVALID_INPUT', `scheduler "${opts.name}" is unknown; use one of ${Object.keys(SCHEDULER_NAMES).join(', ')}`);
    }
    choice = SCHEDULER_NAMES[opts.name]!;
  } else {
    const cls = config._class_name;
    if (typeof cls !== 'string' || !Object.hasOwn(CLASSES, cls)) {
      throw new RuntimeError(
        'UNSUPPORTED',
        `scheduler class ${JSON.stringify(cls)} of the model is not supported; choose one per request (${Object.keys(SCHEDULER_NAMES).join(', ')})`,
      );
    }
    choice = { className: cls, overrides: {} };
  }
  const eta = opts.eta ?? 0;
  if (!Number.isFinite(eta) || eta < 0) throw new RuntimeError('INVALID_INPUT', `eta must be a number >= 0, got ${eta}`);
  const cls = CLASSES[choice.className]!;
  return cls.build(resolveConfig(choice.className, cls.defaults, config, choice.overrides), numInferenceSteps, eta);
}
