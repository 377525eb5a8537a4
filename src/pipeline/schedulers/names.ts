/**
 * @module The scheduler names a request may give, and the class each builds: a table with no scheduler code, so the
 * request parser on the main thread checks a name without loading (or building) a scheduler.
 */

/** The diffusers scheduler classes this runtime implements (schedulers/index.ts builds each). */
export const SCHEDULER_CLASS_NAMES = [
  'PNDMScheduler',
  'DDIMScheduler',
  'EulerDiscreteScheduler',
  'EulerAncestralDiscreteScheduler',
  'DPMSolverMultistepScheduler',
  'LCMScheduler',
  'UniPCMultistepScheduler',
  'LMSDiscreteScheduler',
  'DDPMScheduler',
  'DEISMultistepScheduler',
  'HeunDiscreteScheduler',
  'KDPM2DiscreteScheduler',
  'KDPM2AncestralDiscreteScheduler',
  'EDMEulerScheduler',
  'EDMDPMSolverMultistepScheduler',
  'TCDScheduler',
  'DPMSolverSinglestepScheduler',
  'DPMSolverSDEScheduler',
  'SASolverScheduler',
] as const;
export type SchedulerClassName = (typeof SCHEDULER_CLASS_NAMES)[number];

/**
 * The classes whose step takes the request's eta (DDIM's eta, TCD's gamma). createScheduler gives every other class
 * 0, so for those eta cannot change an image and need not split a batch.
 */
export const ETA_CLASSES: ReadonlySet<string> = new Set<SchedulerClassName>(['DDIMScheduler', 'TCDScheduler']);

/** A request's `scheduler` name: the diffusers class it builds and the config it forces on top of the model's. */
export interface SchedulerChoice {
  readonly className: SchedulerClassName;
  readonly overrides: Readonly<Record<string, string | number | boolean>>;
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
  dpmpp_2m_sde: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'sde-dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  },
  dpmpp_2m_sde_karras: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'sde-dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  },
  dpmpp_3m_sde: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'sde-dpmsolver++', solver_order: 3, use_karras_sigmas: false },
  },
  dpmpp_3m_sde_karras: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'sde-dpmsolver++', solver_order: 3, use_karras_sigmas: true },
  },
  lcm: { className: 'LCMScheduler', overrides: {} },
  unipc: { className: 'UniPCMultistepScheduler', overrides: {} },
  lms: { className: 'LMSDiscreteScheduler', overrides: {} },
  lms_karras: { className: 'LMSDiscreteScheduler', overrides: { use_karras_sigmas: true } },
  ddpm: { className: 'DDPMScheduler', overrides: {} },
  deis: { className: 'DEISMultistepScheduler', overrides: {} },
  heun: { className: 'HeunDiscreteScheduler', overrides: {} },
  dpm2: { className: 'KDPM2DiscreteScheduler', overrides: {} },
  dpm2_karras: { className: 'KDPM2DiscreteScheduler', overrides: { use_karras_sigmas: true } },
  dpm2_a: { className: 'KDPM2AncestralDiscreteScheduler', overrides: {} },
  dpm2_a_karras: { className: 'KDPM2AncestralDiscreteScheduler', overrides: { use_karras_sigmas: true } },
  // Only for models trained in the EDM formulation (Playground v2.5), and only those take them: see index.ts.
  edm_euler: { className: 'EDMEulerScheduler', overrides: {} },
  edm_dpmpp_2m: { className: 'EDMDPMSolverMultistepScheduler', overrides: { algorithm_type: 'dpmsolver++', solver_order: 2 } },
  edm_dpmpp_2m_sde: { className: 'EDMDPMSolverMultistepScheduler', overrides: { algorithm_type: 'sde-dpmsolver++', solver_order: 2 } },
  tcd: { className: 'TCDScheduler', overrides: {} },
  dpmpp_2s: {
    className: 'DPMSolverSinglestepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  },
  dpmpp_2s_karras: {
    className: 'DPMSolverSinglestepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  },
  dpmpp_sde: { className: 'DPMSolverSDEScheduler', overrides: {} },
  dpmpp_sde_karras: { className: 'DPMSolverSDEScheduler', overrides: { use_karras_sigmas: true } },
  // The class's own algorithm: a DPM-Solver or DEIS config's algorithm_type, which from_config carries over, is not one
  // of SA-Solver's (diffusers raises for it).
  sa_solver: { className: 'SASolverScheduler', overrides: { algorithm_type: 'data_prediction' } },
  sa_solver_karras: { className: 'SASolverScheduler', overrides: { algorithm_type: 'data_prediction', use_karras_sigmas: true } },
  ...Object.fromEntries(SCHEDULER_CLASS_NAMES.map((c) => [c, { className: c, overrides: {} }])),
});

/** The class a request's scheduler name builds; no name: the model's own class (ModelDefaults.scheduler). */
export const schedulerClassOf = (name: string | undefined, own: string | undefined): string | undefined =>
  name === undefined ? own : Object.hasOwn(SCHEDULER_NAMES, name) ? SCHEDULER_NAMES[name]!.className : undefined;

/**
 * The request name a sampler label from AUTOMATIC1111 or ComfyUI spells ("DPM++ 2M Karras", "Euler a", "UniPC",
 * "dpmpp-2m-sde"): lower case, `++` as `pp`, spaces and dashes as `_`, PLMS as pndm. Only ever a suggestion: those
 * tools' samplers are not always diffusers' classes, so such a label is never taken silently.
 */
function suggestion(name: string): string | undefined {
  // k-diffusion's names (k_euler_a, k_dpmpp_2m), "ancestral" spelled out (euler_ancestral), "dpmpp2m" without its `_`.
  const n = name.trim().toLowerCase().replace(/\+\+/g, 'pp').replace(/[\s-]+/g, '_')
    .replace(/^k_/, '').replace(/^dpm_2/, 'dpm2').replace(/_ancestral(?=_|$)/, '_a').replace(/^dpmpp(\d)/, 'dpmpp_$1');
  const guess = n === 'plms' ? 'pndm' : n;
  return guess !== name && Object.hasOwn(SCHEDULER_NAMES, guess) ? guess : undefined;
}

/** Why `name` is not a scheduler name (the message lists the known ones), or undefined when it is one. */
export function unknownSchedulerName(name: string): string | undefined {
  if (Object.hasOwn(SCHEDULER_NAMES, name)) return undefined;
  const meant = suggestion(name);
  return `scheduler "${name}" is unknown${meant ? `; did you mean "${meant}"?` : ''}; use one of ${Object.keys(SCHEDULER_NAMES).join(', ')}`;
}

/**
 * Why DEFAULT_SCHEDULER names no scheduler, as the server says it at start (before any model is fetched) and the boot
 * at load, or undefined when it names one.
 */
export function unknownDefaultScheduler(name: string | undefined): string | undefined {
  const unknown = name === undefined ? undefined : unknownSchedulerName(name);
  return unknown === undefined ? undefined : `DEFAULT_SCHEDULER: ${unknown}`;
}
