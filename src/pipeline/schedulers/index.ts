/**
 * @module Scheduler factory: a model's scheduler config as the pipeline holds it (loaded by its class, rewritten by the
 * pipeline's __init__), plus an optional per-request name, resolved the way diffusers'
 * `<Class>.from_config(pipe.scheduler.config, **overrides)` resolves it.
 */

import { RuntimeError } from '../../errors.js';
import type { StepRange } from '../job.js';
import { pyRepr } from '../pyjson.js';
import type { Scheduler } from '../types.js';
import { alphasStepRange, type ConfigValue, num, type ResolvedConfig, resolveConfig, trainStepRange } from './common.js';
import { DDIM, DDIM_DEFAULTS } from './ddim.js';
import { DDPM, DDPM_DEFAULTS } from './ddpm.js';
import { DEIS_DEFAULTS, DEIS_HIDDEN, DEISMultistep } from './deis.js';
import { DPMSDE_DEFAULTS, DPMSDE_HIDDEN, DPMSolverSDE } from './dpmsde.js';
import { DPM_DEFAULTS, DPM_HIDDEN, DPMSolverMultistep } from './dpmsolver.js';
import { DPMSolverSinglestep, DPMSS_DEFAULTS } from './dpmsolver-singlestep.js';
import { HEUN_DEFAULTS, HEUN_HIDDEN, HeunDiscrete } from './heun.js';
import { KDPM2_DEFAULTS, KDPM2_HIDDEN, KDPM2AncestralDiscrete, KDPM2Discrete } from './kdpm2.js';
import { EULER_ANCESTRAL_DEFAULTS, EULER_DEFAULTS, EulerAncestralDiscrete, EulerDiscrete } from './euler.js';
import { EDM_CLASSES, EDM_DPM_DEFAULTS, EDM_EULER_DEFAULTS, EDMDPMSolverMultistep, EDMEuler } from './edm.js';
import { LCM, LCM_DEFAULTS, lcmStepRange, TCD, TCD_DEFAULTS } from './lcm.js';
import { LMS_DEFAULTS, LMS_HIDDEN, LMSDiscrete } from './lms.js';
import { ETA_CLASSES, SCHEDULER_CLASS_NAMES, SCHEDULER_NAMES, unknownSchedulerName, type SchedulerChoice, type SchedulerClassName } from './names.js';
import { PNDM, PNDM_DEFAULTS, pndmStepRange } from './pndm.js';
import { SASolver, SASOLVER_DEFAULTS, SASOLVER_HIDDEN } from './sasolver.js';
import { UNIPC_DEFAULTS, UniPCMultistep } from './unipc.js';

export type { ResolvedConfig } from './common.js';
export { SCHEDULER_NAMES } from './names.js';

interface SchedulerClass {
  defaults: Readonly<Record<string, ConfigValue>>;
  /**
   * Keys the class reads from its config (`hasattr(self.config, …)`) though its `__init__` takes no such option: a
   * file's own key, or one `from_config` carried over from another class, is kept in the config as a hidden key.
   * Not a default: a loaded config does not gain them (nor `_use_default_values` entries for them).
   */
  hidden?: Readonly<Record<string, ConfigValue>>;
  /** The step counts `build` accepts (its constructor checks against the same function). */
  steps: (config: ResolvedConfig) => StepRange;
  build(config: ResolvedConfig, steps: number, eta: number, seeds: readonly number[] | undefined, strength: number): Scheduler;
}

const CLASSES: Readonly<Record<SchedulerClassName, SchedulerClass>> = Object.freeze({
  PNDMScheduler: { defaults: PNDM_DEFAULTS, steps: pndmStepRange, build: (c, n) => new PNDM(c, n) },
  DDIMScheduler: { defaults: DDIM_DEFAULTS, steps: alphasStepRange, build: (c, n, eta) => new DDIM(c, n, eta) },
  EulerDiscreteScheduler: { defaults: EULER_DEFAULTS, steps: trainStepRange, build: (c, n) => new EulerDiscrete(c, n) },
  EulerAncestralDiscreteScheduler: { defaults: EULER_ANCESTRAL_DEFAULTS, steps: trainStepRange, build: (c, n) => new EulerAncestralDiscrete(c, n) },
  DPMSolverMultistepScheduler: { defaults: DPM_DEFAULTS, hidden: DPM_HIDDEN, steps: trainStepRange, build: (c, n) => new DPMSolverMultistep(c, n) },
  LCMScheduler: { defaults: LCM_DEFAULTS, steps: lcmStepRange, build: (c, n, _eta, _seeds, strength) => new LCM(c, n, strength) },
  UniPCMultistepScheduler: { defaults: UNIPC_DEFAULTS, steps: trainStepRange, build: (c, n) => new UniPCMultistep(c, n) },
  LMSDiscreteScheduler: { defaults: LMS_DEFAULTS, hidden: LMS_HIDDEN, steps: trainStepRange, build: (c, n) => new LMSDiscrete(c, n) },
  DDPMScheduler: { defaults: DDPM_DEFAULTS, steps: alphasStepRange, build: (c, n) => new DDPM(c, n) },
  DEISMultistepScheduler: { defaults: DEIS_DEFAULTS, hidden: DEIS_HIDDEN, steps: trainStepRange, build: (c, n) => new DEISMultistep(c, n) },
  HeunDiscreteScheduler: { defaults: HEUN_DEFAULTS, hidden: HEUN_HIDDEN, steps: trainStepRange, build: (c, n) => new HeunDiscrete(c, n) },
  KDPM2DiscreteScheduler: { defaults: KDPM2_DEFAULTS, hidden: KDPM2_HIDDEN, steps: trainStepRange, build: (c, n) => new KDPM2Discrete(c, n) },
  KDPM2AncestralDiscreteScheduler: {
    defaults: KDPM2_DEFAULTS,
    hidden: KDPM2_HIDDEN,
    steps: trainStepRange,
    build: (c, n) => new KDPM2AncestralDiscrete(c, n),
  },
  EDMEulerScheduler: { defaults: EDM_EULER_DEFAULTS, steps: trainStepRange, build: (c, n) => new EDMEuler(c, n) },
  EDMDPMSolverMultistepScheduler: { defaults: EDM_DPM_DEFAULTS, steps: trainStepRange, build: (c, n) => new EDMDPMSolverMultistep(c, n) },
  TCDScheduler: { defaults: TCD_DEFAULTS, steps: (c) => lcmStepRange(c, 'TCDScheduler'), build: (c, n, eta) => new TCD(c, n, eta) },
  DPMSolverSinglestepScheduler: { defaults: DPMSS_DEFAULTS, hidden: DPM_HIDDEN, steps: trainStepRange, build: (c, n) => new DPMSolverSinglestep(c, n) },
  DPMSolverSDEScheduler: { defaults: DPMSDE_DEFAULTS, hidden: DPMSDE_HIDDEN, steps: trainStepRange, build: (c, n, _eta, seeds) => new DPMSolverSDE(c, n, seeds) },
  SASolverScheduler: { defaults: SASOLVER_DEFAULTS, hidden: SASOLVER_HIDDEN, steps: trainStepRange, build: (c, n) => new SASolver(c, n) },
});

const isClassName = (c: unknown): c is SchedulerClassName => typeof c === 'string' && Object.hasOwn(CLASSES, c);

/**
 * `pipe.scheduler.config` right after `DiffusionPipeline.from_pretrained` loaded the model's scheduler with its own
 * class (`<Class>.from_pretrained` → `from_config`): every `__init__` option (the file's value, else the class
 * default), `_use_default_values` naming those that came from defaults, and the file's other keys kept as they are
 * (options of other classes, `_class_name`, `_diffusers_version`). Keys the file lists in `_use_default_values`
 * are dropped first, as diffusers does. A class this runtime does not implement keeps the file's keys only.
 */
export function loadedSchedulerConfig(file: Readonly<Record<string, unknown>>): Record<string, unknown> {
  const dropped = new Set(Array.isArray(file._use_default_values) ? (file._use_default_values as unknown[]) : []);
  const given: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(file)) if (!dropped.has(k) && k !== '_use_default_values') given[k] = v;
  const cls = isClassName(file._class_name) ? CLASSES[file._class_name] : undefined;
  if (!cls) return given;
  const out: Record<string, unknown> = {};
  const fromDefaults: string[] = [];
  for (const [k, d] of Object.entries(cls.defaults)) {
    if (Object.hasOwn(given, k)) out[k] = given[k];
    else {
      out[k] = d;
      fromDefaults.push(k);
    }
  }
  for (const [k, v] of Object.entries(given)) if (!Object.hasOwn(out, k)) out[k] = v;
  if (fromDefaults.length > 0) out._use_default_values = fromDefaults;
  return out;
}

/** One config value a pipeline rewrote when it was built, with the FutureWarning diffusers gives for it. */
export interface ConfigRewrite {
  readonly key: string;
  readonly from: unknown;
  readonly to: unknown;
  readonly message: string;
}

const HUB_PLEA =
  ' If you have downloaded this checkpoint from the Hugging Face Hub, it would be very nice if you could open a Pull request for the' +
  ' `scheduler/scheduler_config.json` file';

/**
 * What `StableDiffusionPipeline.__init__` (and the ONNX, img2img and inpaint pipelines) does to the loaded scheduler
 * config (see loadedSchedulerConfig): `steps_offset` other than 1 becomes 1 (a config without the key counts as 1),
 * and `clip_sample: true` becomes false (one without it counts as false), each with its deprecation message. Only
 * the values change: `_use_default_values` stays, so a later `from_config` switch still drops a rewritten key that
 * had come from the class default, exactly as diffusers does. SDXL and LCM pipelines rewrite nothing.
 */
export function pipelineRewrites(loaded: Readonly<Record<string, unknown>>): { config: Record<string, unknown>; rewrites: ConfigRewrite[] } {
  const config = { ...loaded };
  const rewrites: ConfigRewrite[] = [];
  const cls = String(loaded._class_name ?? 'the scheduler');
  const offset = Object.hasOwn(config, 'steps_offset') ? config.steps_offset : 1;
  if (offset !== 1) {
    rewrites.push({
      key: 'steps_offset',
      from: offset,
      to: 1,
      message:
        `The configuration file of this scheduler: ${cls} is outdated. \`steps_offset\` should be set to 1 instead of ${pyRepr(offset)}. ` +
        'Please make sure to update the config accordingly as leaving `steps_offset` might led to incorrect results in future versions.' +
        HUB_PLEA,
    });
    config.steps_offset = 1;
  }
  if (Object.hasOwn(config, 'clip_sample') && config.clip_sample === true) {
    rewrites.push({
      key: 'clip_sample',
      from: true,
      to: false,
      message:
        `The configuration file of this scheduler: ${cls} has not set the configuration \`clip_sample\`. \`clip_sample\` should be set ` +
        'to False in the configuration file. Please make sure to update the config accordingly as not setting `clip_sample` in the config ' +
        'might lead to incorrect results in future versions.' +
        HUB_PLEA,
    });
    config.clip_sample = false;
  }
  return { config, rewrites };
}

export interface CreateSchedulerOptions {
  /** A request's scheduler name (a key of SCHEDULER_NAMES); absent = the model's own `_class_name`. */
  name?: string;
  /**
   * DDIM's eta (noise weight) and TCD's gamma (0 = deterministic, as the pipelines' default): diffusers' pipelines
   * pass their `eta` to every scheduler whose step takes one; the others ignore it (names.ts ETA_CLASSES lists those
   * that take it).
   */
  eta?: number;
  /**
   * The seed of each image of the batch (the pipeline's seed + i). DPMSolverSDEScheduler seeds image i's Brownian
   * tree with it where its config has no noise_sampler_seed; the other schedulers draw from the images' generators.
   */
  seeds?: readonly number[];
  /**
   * set_timesteps' strength, which LCMScheduler alone reads (1 when absent): LatentConsistencyModelImg2ImgPipeline
   * passes the request's, and runs every step of the schedule it gives. The other pipelines cut the full schedule
   * (get_timesteps) instead; no other class here takes one.
   */
  strength?: number;
}

/** The class (and forced options) `name` builds, else the model's own class; throws for an unusable one. */
function choose(config: Record<string, unknown>, name: string | undefined): SchedulerChoice {
  if (name !== undefined) {
    const unknown = unknownSchedulerName(name);
    if (unknown !== undefined) throw new RuntimeError('INVALID_INPUT', unknown);
    const choice = SCHEDULER_NAMES[name]!;
    checkFamily(config._class_name, name, choice.className);
    return choice;
  }
  const cls = config._class_name;
  if (!isClassName(cls)) {
    // Pipeline.create checks the model's own scheduler, so such a model fails at load: the fix is in the file.
    throw new RuntimeError(
      'UNSUPPORTED',
      `the model's scheduler class ${JSON.stringify(cls)} (model_index.json "scheduler", else ${SCHEDULER_CONFIG_FILE} "_class_name") is not one ` +
        `this runtime implements; set both to one of ${SCHEDULER_CLASS_NAMES.join(', ')} (a request can still name another one)`,
    );
  }
  return { className: cls, overrides: {} };
}

/**
 * A model trained in the EDM formulation (its own class an EDM one) takes only the EDM classes, and other models
 * only the others: diffusers would switch either way and denoise with the wrong preconditioning, so the request is
 * refused instead of answered with noise.
 */
function checkFamily(own: unknown, name: string, className: SchedulerClassName): void {
  if (!isClassName(own) || EDM_CLASSES.has(own) === EDM_CLASSES.has(className)) return;
  const fits = Object.keys(SCHEDULER_NAMES).filter((n) => EDM_CLASSES.has(SCHEDULER_NAMES[n]!.className) === EDM_CLASSES.has(own));
  const why = EDM_CLASSES.has(own)
    ? `this model's scheduler is ${own}: it is trained in the EDM formulation (sigma_data preconditioning, as Playground v2.5 is), which ${className} does not apply`
    : `${className} is for models trained in the EDM formulation (as Playground v2.5 is); this model's scheduler is ${own}`;
  throw new RuntimeError('INVALID_INPUT', `scheduler "${name}" cannot run this model: ${why}; use one of ${fits.join(', ')}`);
}

// Without a name the pipeline runs its own scheduler, whose config values all apply (rewritten ones included);
// a name is `from_config(config, **overrides)`, which drops the keys listed in `_use_default_values`.
const resolve = (config: Record<string, unknown>, choice: SchedulerChoice, named: boolean): ResolvedConfig => {
  const cls = CLASSES[choice.className];
  return resolveConfig(choice.className, { ...cls.defaults, ...cls.hidden }, config, choice.overrides, named);
};

export function createScheduler(
  config: Record<string, unknown>,
  numInferenceSteps: number,
  opts: CreateSchedulerOptions = {},
): Scheduler {
  const choice = choose(config, opts.name);
  const eta = opts.eta ?? 0;
  if (!Number.isFinite(eta) || eta < 0) throw new RuntimeError('INVALID_INPUT', `eta must be a number >= 0, got ${eta}`);
  // Only ETA_CLASSES see eta, the classes the batch key keeps it for: a class that reads eta but is missing there gets 0
  // (and fails its own eta tests) rather than sharing a batch with images of another eta.
  const given = ETA_CLASSES.has(choice.className) ? eta : 0;
  return CLASSES[choice.className].build(resolve(config, choice, opts.name !== undefined), numInferenceSteps, given, opts.seeds, opts.strength ?? 1);
}

export const SCHEDULER_CONFIG_FILE = 'scheduler/scheduler_config.json';

/**
 * What a load checks of the model's own scheduler: that it builds (at 10 steps, or fewer where its class allows no
 * more). At load only the file's values are in play, so a refusal names the file.
 */
export function checkModelScheduler(config: Record<string, unknown>): void {
  try {
    createScheduler(config, Math.min(10, stepRange(config).max));
  } catch (err) {
    if (err instanceof RuntimeError && !err.message.includes(SCHEDULER_CONFIG_FILE)) {
      throw new RuntimeError(err.code === 'INVALID_INPUT' ? 'MODEL_FORMAT' : err.code, `${SCHEDULER_CONFIG_FILE}: ${err.message}`, { cause: err });
    }
    throw err;
  }
}

/**
 * The num_inference_steps `createScheduler(config, n, { name })` accepts, from the same per-class function its
 * constructor checks with, without building a scheduler. Throws as createScheduler does for an unusable name or config.
 */
export function stepRange(config: Record<string, unknown>, name?: string): StepRange {
  const choice = choose(config, name);
  return CLASSES[choice.className].steps(resolve(config, choice, name !== undefined));
}

/**
 * The request names ('' for the model's own scheduler) that run LCMScheduler from this config, with its
 * original_inference_steps: where LatentConsistencyModelImg2ImgPipeline hands strength to set_timesteps, the
 * image-to-image schedule is picked from the first int(original_inference_steps · strength) distillation timesteps.
 */
export function strengthSchedules(config: Record<string, unknown>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const name of [undefined, ...Object.keys(SCHEDULER_NAMES)]) {
    try {
      const choice = choose(config, name);
      if (choice.className === 'LCMScheduler') out[name ?? ''] = num(resolve(config, choice, name !== undefined), 'original_inference_steps');
    } catch {
      // a name this config cannot run: schedulerLimits reports it
    }
  }
  return out;
}

/** Why a request name cannot run from this config: createScheduler's error, whatever the step count. */
export interface SchedulerRefusal {
  readonly code: string;
  readonly message: string;
}

/**
 * stepRange for the model's own scheduler ('') and every request name (`ranges`; a name the config cannot serve is
 * left out), and for each name left out, why (`refused`).
 */
export function schedulerLimits(config: Record<string, unknown>): { ranges: Record<string, StepRange>; refused: Record<string, SchedulerRefusal> } {
  const ranges: Record<string, StepRange> = {};
  const refused: Record<string, SchedulerRefusal> = {};
  for (const name of [undefined, ...Object.keys(SCHEDULER_NAMES)]) {
    try {
      ranges[name ?? ''] = stepRange(config, name);
    } catch (err) {
      // createScheduler reports the same when a request asks for it
      if (name !== undefined && err instanceof RuntimeError) refused[name] = { code: err.code, message: err.message };
    }
  }
  return { ranges, refused };
}
