import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { RuntimeError } from '../src/errors.js';
import { BrownianNoise } from '../src/pipeline/brownian.js';
import type { BrownianQuery } from '../src/pipeline/types.js';
import { createScheduler, SCHEDULER_NAMES, stepRange, schedulerLimits } from '../src/pipeline/schedulers/index.js';
import { alphaSigmaLambda } from '../src/pipeline/schedulers/common.js';
import { lmsCoefficient } from '../src/pipeline/schedulers/lms.js';
import { unknownSchedulerName } from '../src/pipeline/schedulers/names.js';
import { solveF32 } from '../src/pipeline/schedulers/unipc.js';
import { referenceDir } from '../scripts/reference.js';

/**
 * Replays diffusers' own trajectories. Criterion, per element of every array of every step:
 *   |ours − ref| ≤ 1e-4 · max(|ref|, 1e-6)
 * The sample is chained through our own prev_sample (not reset from the reference), so errors would accumulate.
 * Timesteps must be equal; sigmas and init_noise_sigma must be equal as float32 (they are bit-exact).
 */
const REL_TOL = 1e-4;
const FLOOR = 1e-6;

interface Vector {
  name: string;
  scheduler: string;
  config: Record<string, unknown>;
  num_inference_steps: number;
  eta?: number;
  timesteps: number[];
  sigmas: number[] | null;
  init_noise_sigma: number;
  initial_latents: number[];
  steps: {
    t: number;
    scaled_input: number[];
    model_output: number[];
    noise?: number[] | null;
    prev_sample: number[];
    denoised?: number[] | null;
  }[];
}

const vectorsDir = process.env.SCHEDULER_VECTORS_DIR ?? path.join(referenceDir(), 'schedulers');
const files = readdirSync(vectorsDir).filter((x) => x.endsWith('.json')).sort();

function maxRelError(got: Float32Array, ref: readonly number[]): number {
  expect(got.length).toBe(ref.length);
  let worst = 0;
  for (let i = 0; i < ref.length; i++) {
    const e = Math.abs(got[i]! - ref[i]!) / Math.max(Math.abs(ref[i]!), FLOOR);
    if (!(e <= worst)) worst = e; // NaN sticks
  }
  return worst;
}

const f32 = (xs: readonly number[]) => Array.from(Float32Array.from(xs));

describe(`diffusers scheduler parity (${files.length} files in ${path.basename(vectorsDir)})`, () => {
  it('has vectors', () => expect(files.length).toBeGreaterThan(0));

  for (const file of files) {
    it(file, () => {
      const v = JSON.parse(readFileSync(path.join(vectorsDir, file), 'utf8')) as Vector;
      const s = createScheduler({ ...v.config, _class_name: v.scheduler }, v.num_inference_steps, v.eta !== undefined ? { eta: v.eta } : {});
      expect(s.name).toBe(v.scheduler);
      expect(s.timesteps).toEqual(v.timesteps);
      if (v.sigmas) expect(s.sigmas).toEqual(f32(v.sigmas));
      else expect(s.sigmas).toBeUndefined();
      expect(Math.fround(s.initNoiseSigma)).toBe(Math.fround(v.init_noise_sigma));
      expect(s.timesteps.length).toBe(v.steps.length);

      const worst = { scaled_input: 0, prev_sample: 0, denoised: 0 };
      let sample: Float32Array = Float32Array.from(v.initial_latents);
      v.steps.forEach((st, i) => {
        expect(st.t).toBe(s.timesteps[i]);
        worst.scaled_input = Math.max(worst.scaled_input, maxRelError(s.scaleModelInput(sample, st.t), st.scaled_input));
        let draws = 0;
        const r = s.step(Float32Array.from(st.model_output), st.t, sample, () => {
          draws++;
          if (!st.noise) throw new Error(`step ${i} drew noise but the reference drew none`);
          return Float32Array.from(st.noise);
        });
        expect(draws, `noise draws at step ${i}`).toBe(st.noise ? 1 : 0);
        worst.prev_sample = Math.max(worst.prev_sample, maxRelError(r.prevSample, st.prev_sample));
        if (st.denoised) worst.denoised = Math.max(worst.denoised, maxRelError(r.denoised!, st.denoised));
        sample = r.prevSample;
      });
      console.log(`${file}: max relative error ${JSON.stringify(worst)}`);
      for (const [k, e] of Object.entries(worst)) expect(e, k).toBeLessThanOrEqual(REL_TOL);
    });
  }
});

describe('createScheduler', () => {
  const modelConfig = JSON.parse(readFileSync(path.join(referenceDir(), 'e2e/model/scheduler/scheduler_config.json'), 'utf8')) as Record<
    string,
    unknown
  >;

  it('builds the model class by default (SD 1.5 PNDM, skip_prk_steps)', () => {
    const s = createScheduler(modelConfig, 20);
    expect(s.name).toBe('PNDMScheduler');
    expect(s.timesteps.slice(0, 4)).toEqual([951, 901, 901, 851]);
    expect(s.timesteps.length).toBe(21);
  });

  it('an override is from_config of the model config (e2e euler_a case: timesteps and sigmas)', () => {
    const c = JSON.parse(readFileSync(path.join(referenceDir(), 'e2e/cases/b_euler_a__torch/case.json'), 'utf8')) as {
      steps: number;
      timesteps: number[];
      sigmas: number[];
      scheduler: { config: Record<string, unknown> };
    };
    const s = createScheduler(modelConfig, c.steps, { name: 'euler_a' }) as ReturnType<typeof createScheduler> & {
      config: Record<string, unknown>;
    };
    expect(s.name).toBe('EulerAncestralDiscreteScheduler');
    expect(s.timesteps).toEqual(c.timesteps);
    expect(s.sigmas).toEqual(f32(c.sigmas));
    for (const [k, val] of Object.entries(s.config)) expect(val, k).toEqual(c.scheduler.config[k]);
  });

  it('dpmpp_2m_karras sets use_karras_sigmas on the model config (matches the DPM++ 2M Karras vectors)', () => {
    const ref = JSON.parse(readFileSync(path.join(referenceDir(), 'schedulers/dpmpp2m-karras-sd15-12.json'), 'utf8')) as Vector;
    const s = createScheduler(modelConfig, 12, { name: 'dpmpp_2m_karras' });
    expect(s.name).toBe('DPMSolverMultistepScheduler');
    expect(s.timesteps).toEqual(ref.timesteps);
    expect(s.sigmas).toEqual(f32(ref.sigmas!));
    const plain = createScheduler(modelConfig, 12, { name: 'dpmpp_2m' });
    expect(plain.sigmas).not.toEqual(s.sigmas);
  });

  it("a DEIS or UniPC model config switched to dpmpp_2m runs as DPM-Solver++ midpoint, as diffusers' __init__ maps it", () => {
    const run = (config: Record<string, unknown>) => {
      const s = createScheduler(config, 6, { name: 'dpmpp_2m' });
      let x: Float32Array = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i + 1));
      for (const t of s.timesteps) x = s.step(Float32Array.from(x, (v, i) => 0.1 * v + Math.cos(i * t)), t, x, () => new Float32Array(16)).prevSample;
      return { timesteps: s.timesteps, x };
    };
    const dpm = run({ ...modelConfig, _class_name: 'DPMSolverMultistepScheduler' });
    // DEISMultistepScheduler's own options, and UniPCMultistepScheduler's solver types.
    for (const [cls, extra] of [['DEISMultistepScheduler', { algorithm_type: 'deis', solver_type: 'logrho' }], ['UniPCMultistepScheduler', { solver_type: 'bh2' }], ['UniPCMultistepScheduler', { solver_type: 'bh1' }]] as const) {
      expect(run({ ...modelConfig, _class_name: cls, ...extra }), `${cls} ${JSON.stringify(extra)}`).toEqual(dpm);
    }
    expect(() => createScheduler({ ...modelConfig, solver_type: 'euler' }, 6, { name: 'dpmpp_2m' })).toThrow(/solver_type "euler"/);
  });

  it('shared fields carry over, class-specific ones take the new class defaults', () => {
    // PNDM config → DDIM: set_alpha_to_one is in both classes (false carries); clip_sample is DDIM-only (default true).
    const ddim = createScheduler(modelConfig, 10, { name: 'ddim' }) as unknown as { config: Record<string, unknown> };
    expect(ddim.config.set_alpha_to_one).toBe(false);
    expect(ddim.config.clip_sample).toBe(true);
    expect(ddim.config.steps_offset).toBe(1);
    // LCM has its own beta defaults, but the model's carry over.
    const lcm = createScheduler({ _class_name: 'PNDMScheduler', beta_schedule: 'linear' }, 4, { name: 'lcm' }) as unknown as {
      config: Record<string, unknown>;
    };
    expect(lcm.config.beta_schedule).toBe('linear');
    expect(lcm.config.beta_start).toBe(0.00085);
  });

  it('ignores config keys listed in _use_default_values', () => {
    const s = createScheduler({ ...modelConfig, timestep_spacing: 'trailing', _use_default_values: ['timestep_spacing'] }, 10, { name: 'euler' });
    expect(s.timesteps.slice(0, 2)).toEqual([999, 888]); // Euler's default linspace (trailing would give 999, 899)
  });

  it('accepts every listed name and the diffusers class names', () => {
    for (const name of ['pndm', 'ddim', 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_karras', 'lcm', 'unipc', 'lms', 'lms_karras', 'ddpm', 'deis', 'dpmpp_2m_sde', 'dpmpp_2m_sde_karras', 'dpmpp_3m_sde', 'dpmpp_3m_sde_karras', 'heun', 'dpm2', 'dpm2_karras', 'dpm2_a', 'dpm2_a_karras', 'tcd', 'dpmpp_2s', 'dpmpp_2s_karras', 'dpmpp_sde', 'dpmpp_sde_karras', 'sa_solver', 'sa_solver_karras', 'EulerDiscreteScheduler', 'LCMScheduler', 'UniPCMultistepScheduler', 'LMSDiscreteScheduler', 'DDPMScheduler', 'DEISMultistepScheduler', 'HeunDiscreteScheduler', 'KDPM2DiscreteScheduler', 'KDPM2AncestralDiscreteScheduler', 'TCDScheduler', 'DPMSolverSinglestepScheduler', 'DPMSolverSDEScheduler', 'SASolverScheduler']) {
      expect(Object.hasOwn(SCHEDULER_NAMES, name), name).toBe(true);
      const s = createScheduler(modelConfig, 8, { name });
      expect(s.timesteps.length).toBeGreaterThan(0);
    }
  });

  it('rejects an unknown name with INVALID_INPUT listing the known ones', () => {
    let err: unknown;
    try {
      createScheduler(modelConfig, 10, { name: 'heun_plus_plus' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RuntimeError);
    expect((err as RuntimeError).code).toBe('INVALID_INPUT');
    expect((err as RuntimeError).message).toContain('"heun_plus_plus"');
    for (const name of ['pndm', 'ddim', 'euler', 'euler_a', 'dpmpp_2m', 'dpmpp_2m_karras', 'lcm']) {
      expect((err as RuntimeError).message).toContain(name);
    }
    // Lookups use own properties only.
    expect(() => createScheduler(modelConfig, 10, { name: 'toString' })).toThrow(/unknown/);
  });

  it('rejects bad step counts and eta as INVALID_INPUT', () => {
    for (const n of [0, 1.5, 1001]) expect(() => createScheduler(modelConfig, n)).toThrow(expect.objectContaining({ code: 'INVALID_INPUT' }));
    expect(() => createScheduler(modelConfig, 10, { name: 'ddim', eta: -1 })).toThrow(expect.objectContaining({ code: 'INVALID_INPUT' }));
    // TCD's gamma: diffusers asserts 0 <= eta <= 1 in its step; DDIM takes any eta >= 0.
    for (const eta of [0, 0.3, 1]) expect(() => createScheduler(modelConfig, 4, { name: 'tcd', eta })).not.toThrow();
    expect(() => createScheduler(modelConfig, 4, { name: 'tcd', eta: 1.5 })).toThrow(
      expect.objectContaining({ code: 'INVALID_INPUT', message: "TCDScheduler: eta (TCD's gamma) must be from 0 to 1, got 1.5" }),
    );
    expect(() => createScheduler(modelConfig, 4, { name: 'ddim', eta: 1.5 })).not.toThrow();
  });

  it("TCD runs LCM's timesteps (original_inference_steps and its step limit) whatever the spacing and offset", () => {
    for (const config of [modelConfig, { ...modelConfig, original_inference_steps: 30, timestep_spacing: 'trailing' }]) {
      for (const n of [1, 4, 8, 30]) {
        expect(createScheduler(config, n, { name: 'tcd' }).timesteps, `${n}`).toEqual(createScheduler(config, n, { name: 'lcm' }).timesteps);
      }
      expect(stepRange(config, 'tcd')).toEqual(stepRange(config, 'lcm'));
    }
    expect(createScheduler(modelConfig, 4, { name: 'tcd' }).timesteps).toEqual([999, 759, 499, 259]);
  });

  it('PNDM without skip_prk_steps runs the Runge-Kutta warm-up (diffusers timesteps)', () => {
    // The class name keeps the model's skip_prk_steps; the short name `pndm` forces it on.
    expect(createScheduler(modelConfig, 20, { name: 'PNDMScheduler' }).timesteps.length).toBe(21);
    const { skip_prk_steps: _drop, ...noSkip } = modelConfig;
    expect(createScheduler(noSkip, 20, { name: 'PNDMScheduler' }).timesteps.length).toBe(29);
    expect(createScheduler(noSkip, 20, { name: 'pndm' }).timesteps.length).toBe(21);
    expect(() => createScheduler(noSkip, 3, { name: 'PNDMScheduler' })).toThrow(expect.objectContaining({ code: 'INVALID_INPUT' }));
    const prk = createScheduler({ ...modelConfig, skip_prk_steps: false }, 20);
    expect(prk.timesteps).toEqual([
      951, 926, 926, 901, 901, 876, 876, 851, 851, 826, 826, 801, 801, 751, 701, 651, 601, 551, 501, 451, 401, 351, 301, 251, 201, 151, 101, 51, 1,
    ]);
    let x: Float32Array = new Float32Array(16).fill(1);
    for (const t of prk.timesteps) x = prk.step(new Float32Array(16).fill(0.1), t, x, () => new Float32Array(16)).prevSample;
    expect(x.every(Number.isFinite)).toBe(true);
  });

  it('timestep spacings match numpy (trailing, linspace)', () => {
    expect(createScheduler({ ...modelConfig, timestep_spacing: 'trailing' }, 7, { name: 'ddim' }).timesteps).toEqual([999, 856, 713, 570, 428, 285, 142]);
    expect(createScheduler({ ...modelConfig, timestep_spacing: 'linspace' }, 7, { name: 'euler' }).timesteps).toEqual([999, 832.5, 666, 499.5, 333, 166.5, 0]);
  });

  it("DPM2's and DPM2 a's interpolated timesteps are float32 as torch computes _sigma_to_t on tensors, with Karras sigmas too", () => {
    // diffusers' values (torch 1.13) where its float32 logs round as V8's do: each of (1 − w)·low and w·high is
    // rounded, then their sum; and the result stays float32 beside the float64 Karras timesteps.
    const dpm2 = { _class_name: 'KDPM2DiscreteScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear' };
    expect(createScheduler(dpm2, 12).timesteps[1]).toBe(955.0712890625);
    expect(createScheduler(dpm2, 12, { name: 'dpm2_karras' }).timesteps[3]).toBe(894.57763671875);
    expect(createScheduler(dpm2, 12, { name: 'dpm2_a' }).timesteps[1]).toBe(908.18212890625);
    expect(createScheduler(dpm2, 12, { name: 'dpm2_a_karras' }).timesteps[11]).toBe(345.42279052734375);
  });

  it('DDIM, DDPM and PNDM stop below the step count whose leading timesteps start past the table (diffusers raises IndexError there)', () => {
    // SD 1.5's config (leading, steps_offset 1) at 1000 steps starts at timestep 1000 of alphas_cumprod[0..999].
    for (const name of ['ddim', 'ddpm', 'pndm']) {
      expect(() => createScheduler(modelConfig, 1000, { name }), name).toThrow(
        expect.objectContaining({ code: 'INVALID_INPUT', message: expect.stringContaining('past the last (999)), got 1000') }),
      );
      const s = createScheduler(modelConfig, 999, { name });
      expect(s.timesteps[0], name).toBe(999);
      let x: Float32Array = new Float32Array(16).fill(1);
      for (const t of s.timesteps.slice(0, 3)) x = s.step(new Float32Array(16).fill(0.1), t, x, () => new Float32Array(16).fill(0.5)).prevSample;
      expect(x.every(Number.isFinite), name).toBe(true);
      // Other spacings end at timestep 999 whatever the offset.
      expect(createScheduler({ ...modelConfig, timestep_spacing: 'trailing' }, 1000, { name }).timesteps[0], name).toBe(999);
    }
    expect(stepRange({ ...modelConfig, steps_offset: 0 }, 'ddim').max).toBe(1000);
  });

  it('stepRange gives exactly the step counts createScheduler accepts, for every name, without building one', () => {
    const { skip_prk_steps: _drop, ...noSkip } = modelConfig;
    const configs = [modelConfig, noSkip, { ...modelConfig, num_train_timesteps: 30 }, { _class_name: 'LCMScheduler', original_inference_steps: 12 }];
    const unusable: string[] = [];
    const otherFamily = new Set<string>();
    for (const config of configs) {
      const own = typeof config._class_name === 'string' && Object.hasOwn(SCHEDULER_NAMES, config._class_name) ? [undefined] : [];
      for (const name of [...own, ...Object.keys(SCHEDULER_NAMES)]) {
        const build = (n: number) => createScheduler(config, n, name === undefined ? {} : { name });
        let r: ReturnType<typeof stepRange>;
        try {
          r = stepRange(config, name);
        } catch (err) {
          if ((err as Error).message.includes('cannot run this model')) {
            // A name of the other family (EDM or discrete-time) is the request's error, at every step count.
            expect((err as RuntimeError).code, `${name}`).toBe('INVALID_INPUT');
            for (const n of [1, 4, 20]) expect(() => build(n), `${name} ${n}`).toThrow((err as Error).message);
            otherFamily.add(name!);
            continue;
          }
          // An option the class cannot serve (LCM's original_inference_steps above num_train_timesteps) is not a step
          // limit: the class refuses every step count, with the same error.
          expect((err as RuntimeError).code, `${name}`).toBe('UNSUPPORTED');
          for (const n of [1, 4, 20]) expect(() => build(n), `${name} ${n}`).toThrow((err as Error).message);
          unusable.push(`${String(config.num_train_timesteps)} ${name}`);
          continue;
        }
        for (const n of new Set([0, 1, 2, 3, 4, 5, r.max - 1, r.max, r.max + 1, 2.5])) {
          const inRange = Number.isInteger(n) && n >= r.min && n <= r.max;
          if (inRange) expect(() => build(n), `${name} ${n}`).not.toThrow();
          else expect(() => build(n), `${name} ${n}`).toThrow(expect.objectContaining({ code: 'INVALID_INPUT', message: expect.stringContaining(`(${r.why}), got ${n}`) }));
        }
      }
    }
    expect(unusable.sort()).toEqual(['30 LCMScheduler', '30 TCDScheduler', '30 lcm', '30 tcd']);
    expect([...otherFamily].sort()).toEqual(['EDMDPMSolverMultistepScheduler', 'EDMEulerScheduler', 'edm_dpmpp_2m', 'edm_dpmpp_2m_sde', 'edm_euler']);
    const pastTable = 'timestep_spacing "leading" with steps_offset 1 would start 1000 steps at timestep 1000, past the last (999)';
    expect(stepRange(noSkip, 'PNDMScheduler')).toEqual({ min: 4, max: 999, why: `PNDMScheduler without skip_prk_steps needs at least 4; num_train_timesteps is 1000; ${pastTable}` });
    expect(stepRange(modelConfig, 'lcm')).toEqual({ min: 1, max: 50, why: 'original_inference_steps is 50' });
    expect(schedulerLimits(modelConfig).ranges['']).toEqual({ min: 1, max: 999, why: `num_train_timesteps is 1000; ${pastTable}` });
    expect(schedulerLimits(modelConfig).ranges.euler).toEqual({ min: 1, max: 1000, why: 'num_train_timesteps is 1000' });
    // A name the config cannot serve is left out (the worker reports why when a request asks for it).
    expect(Object.keys(schedulerLimits({ ...modelConfig, num_train_timesteps: 'many' }).ranges)).toEqual([]);
  });

  it('checks a request name against the table alone', () => {
    expect(unknownSchedulerName('euler_a')).toBeUndefined();
    expect(unknownSchedulerName('toString')).toMatch(/^scheduler "toString" is unknown; use one of pndm, ddim, euler, /);
    // Sampler labels as AUTOMATIC1111 and ComfyUI users type them get the request name, never an alias.
    for (const [label, meant] of [
      ['DPM++ 2M Karras', 'dpmpp_2m_karras'], ['Euler a', 'euler_a'], ['UniPC', 'unipc'], ['DPM2 a Karras', 'dpm2_a_karras'], ['PLMS', 'pndm'],
      ['DPM++ 2M SDE', 'dpmpp_2m_sde'], ['LMS Karras', 'lms_karras'], ['Heun', 'heun'], ['dpmpp-2m', 'dpmpp_2m'], ['DDIM', 'ddim'], ['TCD', 'tcd'],
      ['DPM++ SDE Karras', 'dpmpp_sde_karras'], ['DPM++ SDE', 'dpmpp_sde'], ['SA-Solver', 'sa_solver'],
      ['euler_ancestral', 'euler_a'], ['k_euler_a', 'euler_a'], ['k_dpmpp_2m', 'dpmpp_2m'], ['dpmpp2m_karras', 'dpmpp_2m_karras'],
      ['DPM2 ancestral', 'dpm2_a'], ['dpm2_ancestral_karras', 'dpm2_a_karras'], ['k_dpm_2', 'dpm2'], ['k_dpm_2_ancestral', 'dpm2_a'],
    ] as const) {
      expect(unknownSchedulerName(label), label).toMatch(new RegExp(`^scheduler "${label.replace(/[+]/g, '\\+')}" is unknown; did you mean "${meant}"\\?; use one of pndm, `));
    }
    // No guess for a sampler the runtime lacks, nor for a class name in other case: A1111's "DPM++ 2S a" is ancestral
    // (noise on every step), which dpmpp_2s is not.
    expect(unknownSchedulerName('DPM++ 2S a Karras')).toMatch(/^scheduler "DPM\+\+ 2S a Karras" is unknown; use one of /);
    expect(unknownSchedulerName('ddimscheduler')).toMatch(/^scheduler "ddimscheduler" is unknown; use one of /);
  });

  it('draws noise only where diffusers does', () => {
    const count = (name: string, eta = 0) => {
      const s = createScheduler(modelConfig, 4, { name, eta, seeds: [42] });
      let n = 0;
      let x: Float32Array = new Float32Array(16).fill(1);
      for (const t of s.timesteps) {
        x = s.step(new Float32Array(16).fill(0.1), t, s.scaleModelInput(x, t), () => {
          n++;
          return new Float32Array(16);
        }).prevSample;
      }
      return n;
    };
    expect(count('euler_a')).toBe(4);
    expect(count('lcm')).toBe(3);
    expect(count('ddim')).toBe(0);
    expect(count('ddim', 0.5)).toBe(4);
    expect(count('euler')).toBe(0);
    expect(count('dpmpp_2m')).toBe(0);
    expect(count('unipc')).toBe(0);
    expect(count('lms')).toBe(0);
    // DDPM draws on every step whose timestep is above 0: all four here (leading spacing ends at 1)
    expect(count('ddpm')).toBe(4);
    expect(count('deis')).toBe(0);
    expect(count('dpmpp_2m_sde')).toBe(4);
    expect(count('dpmpp_3m_sde')).toBe(4);
    expect(count('heun')).toBe(0);
    expect(count('dpm2')).toBe(0);
    // DPM2 a draws once per step, on its second UNet run: 4 steps are 7 runs and 3 draws (its first step is one run)
    expect(count('dpm2_a')).toBe(3);
    // TCD: none at eta 0 (the pipelines' default), else on every step but the last
    expect(count('tcd')).toBe(0);
    expect(count('tcd', 0.3)).toBe(3);
    expect(count('tcd', 1)).toBe(3);
    expect(count('dpmpp_2s')).toBe(0);
    expect(count('dpmpp_2s_karras')).toBe(0);
    // DPM++ SDE reads its own Brownian noise (seeded by the image seed), never the image's generator
    expect(count('dpmpp_sde')).toBe(0);
    // SA-Solver draws on every step, whether its tau makes use of the draw or not
    expect(count('sa_solver')).toBe(4);
    expect(count('sa_solver_karras')).toBe(4);
  });
});

describe('DPMSolverSDEScheduler beyond the diffusers vectors', () => {
  const modelConfig = JSON.parse(readFileSync(path.join(referenceDir(), 'e2e/model/scheduler/scheduler_config.json'), 'utf8')) as Record<string, unknown>;
  const run = (config: Record<string, unknown>, seeds: number[] | undefined, per: number, steps = 5) => {
    const s = createScheduler(config, steps, { name: 'dpmpp_sde_karras', ...(seeds ? { seeds } : {}) });
    const images = seeds?.length ?? 1;
    let x: Float32Array = Float32Array.from({ length: images * per }, (_, i) => Math.sin(i % per) * 14);
    for (const t of s.timesteps) {
      const m = Float32Array.from({ length: images * per }, (_, i) => Math.cos((i % per) * 0.3 + t));
      x = s.step(m, t, s.scaleModelInput(x, t), () => {
        throw new Error('drew from the image generator');
      }).prevSample;
    }
    return x;
  };
  const bits = (xs: Float32Array) => Array.from(new Int32Array(xs.slice().buffer));

  it('seeds image i with seeds[i] (no noise_sampler_seed): each image of a batch is bit-equal to its run alone', () => {
    const per = 64;
    const batch = run(modelConfig, [5, 6, 7], per);
    for (const [i, seed] of [5, 6, 7].entries()) expect(bits(batch.subarray(i * per, (i + 1) * per)), `image ${i}`).toEqual(bits(run(modelConfig, [seed], per)));
    // and the seed matters
    expect(bits(run(modelConfig, [5], per))).not.toEqual(bits(run(modelConfig, [6], per)));
  });

  it('names each read of its motion before the step (nextNoise); uses noise given for exactly that read, and only that', () => {
    const per = 48;
    const seeds = [5, 6];
    const model = (t: number) => Float32Array.from({ length: seeds.length * per }, (_, i) => Math.cos((i % per) * 0.3 + t));
    type Give = (q: BrownianQuery, k: number) => [BrownianQuery, Float32Array] | undefined;
    /** A run where `give` hands noise over before each step; the reads it named, and the noise each step added. */
    const runWith = (give: Give, img2img: boolean) => {
      const s = createScheduler(modelConfig, 6, { name: 'dpmpp_sde_karras', seeds });
      if (img2img) s.setBeginIndex(4); // image-to-image cuts at t_start·order: a step's first run
      const reads: BrownianQuery[] = [];
      const added: Array<Float32Array | undefined> = [];
      let x: Float32Array = Float32Array.from({ length: seeds.length * per }, (_, i) => Math.sin(i % per) * 14);
      const ts = s.timesteps.slice(img2img ? 4 : 0);
      ts.forEach((t, k) => {
        const q = s.nextNoise!(x.length);
        if (q) reads.push(q);
        const given = q && give(q, k);
        if (given) s.giveNoise!(...given);
        const r = s.step(model(t), t, s.scaleModelInput(x, t), () => {
          throw new Error('drew from the image generator');
        });
        added.push(r.noise);
        x = r.prevSample;
      });
      return { x, reads, added, runs: ts.length };
    };
    for (const img2img of [false, true]) {
      const own = runWith(() => undefined, img2img);
      // every run but the last (to sigma 0) reads the motion, and adds what it named; the spec is the batch's
      expect(own.reads.length).toBe(own.runs - 1);
      expect(own.added.at(-1)).toBeUndefined();
      own.reads.forEach((q, k) => expect(bits(own.added[k]!), `read ${k}`).toEqual(bits(new BrownianNoise(q.spec).noise(q.ta, q.tb))));
      expect(own.reads[0]!.spec).toMatchObject({ perImage: per, seeds });
      // Made elsewhere (a motion of its own, as another thread holds): the same run, bit for bit.
      const elsewhere = new Map<string, BrownianNoise>();
      const made = runWith((q) => {
        const key = JSON.stringify(q.spec);
        if (!elsewhere.has(key)) elsewhere.set(key, new BrownianNoise(q.spec));
        return [q, elsewhere.get(key)!.noise(q.ta, q.tb)];
      }, img2img);
      expect(bits(made.x)).toEqual(bits(own.x));
      // Given noise is what the step adds: other noise for the right read changes the result...
      const other = (q: BrownianQuery): [BrownianQuery, Float32Array] => [q, new BrownianNoise({ ...q.spec, seeds: [8, 9] }).noise(q.ta, q.tb)];
      const changed = runWith(other, img2img);
      changed.reads.forEach((q, k) => expect(bits(changed.added[k]!)).toEqual(bits(other(q)[1])));
      expect(bits(changed.x)).not.toEqual(bits(own.x));
      // ...and noise given for another read, another batch or at another size is not used
      const stray: Give = (q, k) => {
        const full = new Float32Array(q.spec.perImage * q.spec.seeds.length).fill(7);
        if (k % 3 === 0) return [{ ...q, tb: q.tb * 1.01 }, full];
        if (k % 3 === 1) return [{ ...q, spec: { ...q.spec, seeds: [5, 7] } }, full];
        return [q, new Float32Array(5)];
      };
      expect(bits(runWith(stray, img2img).x)).toEqual(bits(own.x));
    }
  });

  it("uses the config's noise_sampler_seed for every image where it is set", () => {
    const per = 32;
    const seeded = { ...modelConfig, noise_sampler_seed: 99 };
    const batch = run(seeded, [5, 6], per);
    const alone = bits(run(seeded, [1234], per));
    expect(bits(batch.subarray(0, per))).toEqual(alone);
    expect(bits(batch.subarray(per))).toEqual(alone);
    expect(alone).toEqual(bits(run({ ...modelConfig, noise_sampler_seed: 99 }, undefined, per)));
  });

  it('refuses what diffusers cannot run or the runtime does not take, naming it', () => {
    const bad = (over: Record<string, unknown>, re: RegExp) =>
      expect(() => createScheduler({ ...modelConfig, ...over }, 10, { name: 'dpmpp_sde' })).toThrow(expect.objectContaining({ code: 'UNSUPPORTED', message: expect.stringMatching(re) }));
    bad({ noise_sampler_seed: [1, 2] }, /DPMSolverSDEScheduler: scheduler config noise_sampler_seed must be null or an integer from 0 to 9007199254740991, got \[1,2\]/);
    bad({ noise_sampler_seed: -3 }, /noise_sampler_seed must be null or an integer/);
    bad({ noise_sampler_seed: 1.5 }, /noise_sampler_seed must be null or an integer/);
    bad({ prediction_type: 'sample' }, /DPMSolverSDEScheduler: prediction_type "sample" is not supported \(supported: epsilon, v_prediction\)/);
    bad({ use_karras_sigmas: true, use_beta_sigmas: true }, /DPMSolverSDEScheduler: use_karras_sigmas with use_beta_sigmas is not supported/);
  });

  it('says so when it has no seed at all (no image seeds given, none in the config)', () => {
    expect(() => run(modelConfig, undefined, 16)).toThrow(/DPMSolverSDEScheduler: no noise_sampler_seed in the config and no image seed/);
  });
});

describe('UniPC, LMS, DPM-Solver and the sigma ramps beyond the diffusers vectors', () => {
  const unipc = { _class_name: 'UniPCMultistepScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', steps_offset: 1 };

  it("UniPC bh1 ending at sigma 0 gives the last step's x0 prediction, where diffusers gives NaN (0 times an infinite B(h))", () => {
    for (const solver of ['bh1', 'bh2']) {
      const s = createScheduler({ ...unipc, solver_type: solver }, 6);
      const sigmas = s.sigmas!;
      let x: Float32Array<ArrayBufferLike> = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i + 1));
      let x0 = x;
      for (const t of s.timesteps) {
        const m = Float32Array.from({ length: 16 }, (_, i) => Math.cos(i * t));
        // The last step's x0 prediction, (x - sigma_s·eps) / alpha_s of its input, float32.
        const [alpha, sigma] = alphaSigmaLambda(sigmas[sigmas.length - 2]!);
        x0 = x.map((v, i) => Math.fround(Math.fround(v - Math.fround(sigma * m[i]!)) / alpha));
        x = s.step(m, t, x, () => new Float32Array(16)).prevSample;
      }
      // At sigma 0 (alpha_t = 1, sigma_t = 0) the first-order update is x0 itself.
      expect(sigmas[sigmas.length - 1]).toBe(0);
      expect(Array.from(x), solver).toEqual(Array.from(x0));
    }
  });

  it('UniPC on the noise (predict_x0 false) ending at sigma 0 steps to the x0 prediction, where diffusers gives NaN', () => {
    // One step (no corrector): from sigma_s straight to 0, the x0 prediction of the input itself.
    const one = createScheduler({ ...unipc, predict_x0: false }, 1);
    const x = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i + 1));
    const m = Float32Array.from({ length: 16 }, (_, i) => Math.cos(i));
    const [alpha, sigma] = alphaSigmaLambda(one.sigmas![0]!);
    const out = one.step(m, one.timesteps[0]!, x, () => new Float32Array(16)).prevSample;
    out.forEach((v, i) => expect(Math.abs(v - (x[i]! - sigma * m[i]!) / alpha)).toBeLessThanOrEqual(1e-6 * Math.max(1, Math.abs(v))));
    // A whole schedule stays finite to the end.
    const s = createScheduler({ ...unipc, predict_x0: false }, 6);
    let y: Float32Array<ArrayBufferLike> = x;
    for (const t of s.timesteps) y = s.step(Float32Array.from({ length: 16 }, (_, i) => Math.cos(i * t)), t, y, () => new Float32Array(16)).prevSample;
    expect(y.every(Number.isFinite)).toBe(true);
  });

  it("DPM-Solver's heun solver type through a repeated last sigma (Karras, sigma_min, 15+ steps) stays finite, where diffusers gives NaN", () => {
    for (const algorithm of ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++', 'sde-dpmsolver']) {
      const s = createScheduler(
        { ...unipc, _class_name: 'DPMSolverMultistepScheduler', algorithm_type: algorithm, solver_type: 'heun', use_karras_sigmas: true, final_sigmas_type: 'sigma_min' },
        20,
      );
      const sigmas = s.sigmas!;
      expect(sigmas[sigmas.length - 1], algorithm).toBe(sigmas[sigmas.length - 2]); // the zero step
      let x: Float32Array<ArrayBufferLike> = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i + 1));
      for (const t of s.timesteps) x = s.step(Float32Array.from({ length: 16 }, (_, i) => Math.cos(i * t)), t, x, () => new Float32Array(16).fill(0.5)).prevSample;
      expect(x.every(Number.isFinite), algorithm).toBe(true);
    }
  });

  it('refuses the options it does not implement, naming them', () => {
    const refused: [Record<string, unknown>, RegExp][] = [
      [{ solver_order: 4 }, /UniPCMultistepScheduler: solver_order 4 \(1 to 3\) is not supported/],
      [{ thresholding: true }, /UniPCMultistepScheduler: thresholding is not supported/],
      [{ use_flow_sigmas: true }, /UniPCMultistepScheduler: use_flow_sigmas is not supported/],
      [{ prediction_type: 'flow_prediction' }, /prediction_type "flow_prediction" is not supported/],
      [{ disable_corrector: 'all' }, /scheduler config disable_corrector must be a list of integers, got .all.$/],
      [{ solver_type: 'bh3' }, /solver_type "bh3" is not supported \(supported: bh1, bh2\)/],
      [{ lower_order_final: false }, /lower_order_final false with final_sigmas_type "zero" and solver_order above 1 \(the last step ends in NaN; use "sigma_min"\) is not supported/],
    ];
    for (const [extra, message] of refused) {
      expect(() => createScheduler({ ...unipc, ...extra }, 10)).toThrow(message);
    }
  });

  it("refuses two or three of the Karras, exponential and beta ramps together in every class that has them, as diffusers' __init__ raises", () => {
    const classes = ['EulerDiscreteScheduler', 'DPMSolverMultistepScheduler', 'UniPCMultistepScheduler', 'DEISMultistepScheduler', 'LMSDiscreteScheduler',
      'HeunDiscreteScheduler', 'KDPM2DiscreteScheduler', 'KDPM2AncestralDiscreteScheduler', 'DPMSolverSinglestepScheduler', 'DPMSolverSDEScheduler',
      'SASolverScheduler'];
    const sets: [string[], string][] = [
      [['use_karras_sigmas', 'use_exponential_sigmas'], 'use_karras_sigmas with use_exponential_sigmas'],
      [['use_karras_sigmas', 'use_beta_sigmas'], 'use_karras_sigmas with use_beta_sigmas'],
      [['use_exponential_sigmas', 'use_beta_sigmas'], 'use_exponential_sigmas with use_beta_sigmas'],
      [['use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas'], 'use_karras_sigmas with use_exponential_sigmas with use_beta_sigmas'],
    ];
    for (const cls of classes) {
      const base = { ...unipc, _class_name: cls, noise_sampler_seed: 1 };
      for (const [keys, what] of sets) {
        expect(() => createScheduler({ ...base, ...Object.fromEntries(keys.map((k) => [k, true])) }, 10), `${cls} ${what}`).toThrow(
          expect.objectContaining({ code: 'UNSUPPORTED', message: `${cls}: ${what} is not supported (diffusers raises too; set only one of them true, and on a model whose config sets one, name a scheduler without _karras: such a name sets use_karras_sigmas)` }),
        );
      }
      for (const k of ['use_exponential_sigmas', 'use_beta_sigmas']) expect(createScheduler({ ...base, [k]: true }, 10).timesteps.length, `${cls} ${k}`).toBeGreaterThan(0);
    }
    // A request for a Karras name on a model whose config asks for exponential or beta sigmas: from_config raises the same.
    for (const k of ['use_exponential_sigmas', 'use_beta_sigmas']) {
      expect(() => createScheduler({ ...unipc, _class_name: 'EulerDiscreteScheduler', [k]: true }, 10, { name: 'euler_karras' })).toThrow(
        new RegExp(`EulerDiscreteScheduler: use_karras_sigmas with ${k}`),
      );
    }
    // DPM-Solver's Lu ramp is not among them (diffusers tests Karras, then Lu, then the others): it builds beside any one.
    const dpm = { ...unipc, _class_name: 'DPMSolverMultistepScheduler', use_lu_lambdas: true };
    for (const k of ['use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas']) expect(createScheduler({ ...dpm, [k]: true }, 10).timesteps).toHaveLength(10);
  });

  it('runs a beta schedule from its first step where its first timesteps repeat (diffusers\' text-to-image starts at the second)', () => {
    // On the cosine schedule the integer-timestep classes truncate the first beta sigmas to one timestep: a step that
    // finds its index by timestep, as diffusers' does, starts at the second and fails at the end (image-to-image sets
    // the index and runs, as the runtime always does).
    for (const cls of ['DPMSolverMultistepScheduler', 'UniPCMultistepScheduler', 'DEISMultistepScheduler', 'DPMSolverSinglestepScheduler', 'SASolverScheduler']) {
      const config = { ...unipc, _class_name: cls, beta_schedule: 'squaredcos_cap_v2', use_beta_sigmas: true };
      const s = createScheduler(config, 12);
      expect(s.timesteps.slice(0, 3), cls).toEqual([998, 998, 998]);
      const run = (from: ReturnType<typeof createScheduler>) => {
        let x: Float32Array = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i) * 10);
        for (const t of from.timesteps) x = from.step(Float32Array.from({ length: 16 }, (_, i) => Math.cos(i + t) / 4), t, x, () => new Float32Array(16).fill(0.5)).prevSample;
        return x;
      };
      const cut = createScheduler(config, 12);
      cut.setBeginIndex(0);
      const x = run(s);
      expect(Array.from(x), cls).toEqual(Array.from(run(cut)));
      expect(x.every(Number.isFinite), cls).toBe(true);
    }
  });

  it('LMS coefficients integrate the Lagrange basis exactly: they sum to the interval, and order 1 is Euler', () => {
    const sig = [14.6, 9.7, 6.3, 4.1, 2.6, 0];
    for (let t = 0; t < 5; t++) {
      const order = Math.min(t + 1, 4);
      let sum = 0;
      for (let j = 0; j < order; j++) sum += lmsCoefficient(sig, order, t, j);
      // The basis polynomials sum to 1, so their integrals sum to sigma[t + 1] - sigma[t].
      expect(sum).toBeCloseTo(sig[t + 1]! - sig[t]!, 12);
    }
    expect(lmsCoefficient(sig, 1, 2, 0)).toBeCloseTo(sig[3]! - sig[2]!, 14);
  });

  it('solveF32 solves a system that needs row pivoting, to float32 precision', () => {
    const x = solveF32([[1, 1, 1], [-2.5, -1.2, 1], [6.25, 1.44, 1]], [0.4, 0.1, 0.05]);
    const a = [[1, 1, 1], [-2.5, -1.2, 1], [6.25, 1.44, 1]];
    a.forEach((row, i) => expect(row.reduce((acc, v, k) => acc + v * x[k]!, 0)).toBeCloseTo([0.4, 0.1, 0.05][i]!, 6));
  });
});

describe('EDM schedulers (Playground v2.5)', () => {
  const edm = { _class_name: 'EDMDPMSolverMultistepScheduler', sigma_min: 0.002, sigma_max: 80.0, sigma_data: 0.5, prediction_type: 'epsilon' };
  const sd15 = { _class_name: 'EulerDiscreteScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', steps_offset: 1 };

  it('a model trained in the EDM formulation takes only the EDM names, and other models only the others', () => {
    for (const name of ['edm_euler', 'edm_dpmpp_2m', 'edm_dpmpp_2m_sde', 'EDMEulerScheduler']) expect(createScheduler(edm, 12, { name }).timesteps).toHaveLength(12);
    expect(() => createScheduler(edm, 12, { name: 'euler' })).toThrow(
      expect.objectContaining({
        code: 'INVALID_INPUT',
        message:
          'scheduler "euler" cannot run this model: this model\'s scheduler is EDMDPMSolverMultistepScheduler: it is trained in the EDM formulation ' +
          '(sigma_data preconditioning, as Playground v2.5 is), which EulerDiscreteScheduler does not apply; use one of edm_euler, edm_dpmpp_2m, ' +
          'edm_dpmpp_2m_sde, EDMEulerScheduler, EDMDPMSolverMultistepScheduler',
      }),
    );
    expect(() => createScheduler(sd15, 12, { name: 'edm_dpmpp_2m' })).toThrow(
      /^scheduler "edm_dpmpp_2m" cannot run this model: EDMDPMSolverMultistepScheduler is for models trained in the EDM formulation \(as Playground v2\.5 is\); this model's scheduler is EulerDiscreteScheduler; use one of pndm, ddim, /,
    );
  });

  it('feeds the UNet c_noise = ln(sigma)/4 and c_in·x, and starts from noise of sigma sqrt(sigma_max² + 1)', () => {
    const s = createScheduler(edm, 3);
    // (sigma_max^(1/7))^7 in float32, as diffusers' float32 ramp gives it
    expect(s.sigmas![0]).toBeCloseTo(80, 4);
    expect(s.sigmas![3]).toBe(0);
    expect(s.timesteps[0]).toBe(Math.fround(Math.fround(Math.log(s.sigmas![0]!)) / 4));
    expect(s.initNoiseSigma).toBeCloseTo(Math.sqrt(6401), 12);
    const x = Float32Array.of(1, -2);
    const cIn = Math.fround(1 / Math.fround(Math.sqrt(Math.fround(Math.fround(s.sigmas![0]! ** 2) + 0.25))));
    expect(Array.from(s.scaleModelInput(x, s.timesteps[0]!))).toEqual([cIn, Math.fround(-2 * cIn)]);
  });

  it('refuses what diffusers cannot run, naming it', () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ prediction_type: 'sample' }, 'prediction_type "sample"'],
      [{ solver_order: 3, algorithm_type: 'sde-dpmsolver++' }, 'solver_order 3 with algorithm_type "sde-dpmsolver++"'],
      [{ algorithm_type: 'dpmsolver' }, 'algorithm_type "dpmsolver"'],
      [{ thresholding: true }, 'thresholding'],
      [{ sigma_schedule: 'linear' }, 'sigma_schedule "linear"'],
      [{ sigma_min: 90 }, 'sigma_min not below sigma_max'],
      [{ sigma_data: 0 }, 'sigma_data 0 (it must be > 0)'],
    ];
    for (const [extra, what] of cases) {
      expect(() => createScheduler({ ...edm, ...extra }, 10), what).toThrow(expect.objectContaining({ code: 'UNSUPPORTED', message: expect.stringContaining(what) }));
    }
    expect(() => createScheduler({ ...edm, _class_name: 'EDMEulerScheduler', prediction_type: 'sample' }, 10)).toThrow(/EDMEulerScheduler: prediction_type "sample"/);
  });
});

describe('DPM-Solver singlestep', () => {
  const ss = { _class_name: 'DPMSolverSinglestepScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear' };

  it("takes the orders of diffusers' get_order_list after set_timesteps, tiny and uneven step counts included", () => {
    // DPMSolverSinglestepScheduler(solver_order, lower_order_final, final_sigmas_type).set_timesteps(n).order_list for
    // n = 1..7, printed by the class itself (a fresh scheduler per n: set_timesteps rewrites lower_order_final).
    const want: [number, boolean, string, string[]][] = [
      [1, false, 'zero', ['1', '11', '111', '1111', '11111', '111111', '1111111']],
      [1, true, 'sigma_min', ['1', '11', '111', '1111', '11111', '111111', '1111111']],
      [2, false, 'zero', ['1', '11', '121', '1211', '12121', '121211', '1212121']],
      [2, false, 'sigma_min', ['1', '12', '121', '1212', '12121', '121212', '1212121']],
      [2, true, 'zero', ['1', '11', '121', '1211', '12121', '121211', '1212121']],
      [2, true, 'sigma_min', ['1', '11', '121', '1211', '12121', '121211', '1212121']],
      [3, false, 'zero', ['1', '11', '121', '1231', '12311', '123121', '1231231']],
      [3, false, 'sigma_min', ['1', '12', '123', '1231', '12312', '123123', '1231231']],
      [3, true, 'zero', ['1', '11', '121', '1231', '12311', '123121', '1231231']],
      [3, true, 'sigma_min', ['1', '12', '121', '1231', '12312', '123121', '1231231']],
    ];
    for (const [order, lof, fin, lists] of want) {
      lists.forEach((list, k) => {
        const s = createScheduler({ ...ss, solver_order: order, lower_order_final: lof, final_sigmas_type: fin }, k + 1) as unknown as { orders: number[] };
        expect(s.orders.join(''), `order ${order} lower_order_final ${lof} ${fin}, ${k + 1} steps`).toBe(list);
      });
    }
  });

  it('has no timestep_spacing: a config\'s "trailing" or "leading" is dropped, as from_config drops it', () => {
    for (const spacing of ['leading', 'trailing', 'linspace']) {
      expect(createScheduler({ ...ss, timestep_spacing: spacing, steps_offset: 1 }, 7).timesteps).toEqual([999, 856, 714, 571, 428, 285, 143]);
    }
  });

  it('refuses the options it does not implement, and what diffusers refuses, naming them', () => {
    const refused: [Record<string, unknown>, string][] = [
      [{ solver_order: 4 }, 'solver_order 4 (1 to 3) is not supported'],
      [{ thresholding: true }, 'thresholding is not supported'],
      [{ use_flow_sigmas: true }, 'use_flow_sigmas is not supported'],
      [{ use_dynamic_shifting: true }, 'use_dynamic_shifting is not supported'],
      [{ variance_type: 'learned_range' }, 'variance_type "learned_range" is not supported (a learned variance needs a UNet with 8 output channels; supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log or none)'],
      [{ variance_type: 'learned' }, 'variance_type "learned" is not supported (a learned variance needs a UNet with 8 output channels; supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log or none)'],
      [{ prediction_type: 'flow_prediction' }, 'prediction_type "flow_prediction" is not supported (supported: epsilon, sample, v_prediction)'],
      [{ algorithm_type: 'sde-dpmsolver' }, 'algorithm_type "sde-dpmsolver" is not supported (supported: dpmsolver++, dpmsolver, sde-dpmsolver++)'],
      [{ solver_type: 'bh3' }, 'solver_type "bh3" is not supported (supported: midpoint, heun)'],
      [{ algorithm_type: 'dpmsolver' }, 'final_sigmas_type "zero" with algorithm_type "dpmsolver" (diffusers refuses it too; use "sigma_min") is not supported'],
      // diffusers checks the algorithm_type it was given before mapping DEIS's to dpmsolver++
      [{ algorithm_type: 'deis' }, 'final_sigmas_type "zero" with algorithm_type "deis" (diffusers refuses it too; use "sigma_min") is not supported'],
    ];
    for (const [extra, message] of refused) {
      expect(() => createScheduler({ ...ss, ...extra }, 10), JSON.stringify(extra)).toThrow(
        expect.objectContaining({ code: 'UNSUPPORTED', message: `DPMSolverSinglestepScheduler: ${message}` }),
      );
    }
    // DEIS's and UniPC's own options map as diffusers maps them; a request name forces dpmsolver++.
    expect(createScheduler({ ...ss, algorithm_type: 'deis', solver_type: 'logrho', final_sigmas_type: 'sigma_min' }, 10).timesteps).toHaveLength(10);
    expect(createScheduler({ ...ss, _class_name: 'DEISMultistepScheduler', algorithm_type: 'deis' }, 10, { name: 'dpmpp_2s' }).name).toBe('DPMSolverSinglestepScheduler');
  });

  it('the SDE form draws noise on every step, the last included', () => {
    const s = createScheduler({ ...ss, algorithm_type: 'sde-dpmsolver++', solver_order: 3 }, 5);
    let n = 0;
    let x: Float32Array = new Float32Array(16).fill(1);
    for (const t of s.timesteps) {
      x = s.step(new Float32Array(16).fill(0.1), t, x, () => {
        n++;
        return new Float32Array(16).fill(0.5);
      }).prevSample;
    }
    expect(n).toBe(5);
    expect(x.every(Number.isFinite)).toBe(true);
  });
});

describe('SA-Solver', () => {
  const sa = { _class_name: 'SASolverScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', steps_offset: 1 };
  /** Each step's prev_sample, the step drawing `fill` as its noise. */
  const run = (config: Record<string, unknown>, n: number, fill: number) => {
    const s = createScheduler(config, n);
    let x: Float32Array = Float32Array.from({ length: 16 }, (_, i) => Math.sin(i) * 3);
    return s.timesteps.map((t) => (x = s.step(Float32Array.from({ length: 16 }, (_, i) => Math.cos(i + t)), t, x, () => new Float32Array(16).fill(fill)).prevSample));
  };

  it("uses the noise only where diffusers' default tau is 1 (timesteps 200 to 800), in the predictor and in the corrector after it", () => {
    // 10 steps: 999, 899, 799, ..., 99. The first two steps (tau 0, and the second's corrector redoing the first) ignore
    // the draw; the third's predictor (799) takes it.
    for (const algorithm_type of ['data_prediction', 'noise_prediction']) {
      const [a, b] = [run({ ...sa, algorithm_type }, 10, 0), run({ ...sa, algorithm_type }, 10, 1)];
      expect(a.map((x, k) => x.every((v, i) => v === b[k]![i])), algorithm_type).toEqual([true, true, false, false, false, false, false, false, false, false]);
    }
    // Two trailing steps are 999 and 499: the second takes the draw; one step (999) never does.
    expect(run({ ...sa, timestep_spacing: 'trailing' }, 2, 0)[1]).not.toEqual(run({ ...sa, timestep_spacing: 'trailing' }, 2, 1)[1]);
    expect(run(sa, 1, 0)).toEqual(run(sa, 1, 1));
  });

  it('refuses the options it does not implement, and what diffusers refuses, naming them', () => {
    const refused: [Record<string, unknown>, string][] = [
      [{ predictor_order: 5 }, 'predictor_order 5 (1 to 4) is not supported'],
      [{ corrector_order: 0 }, 'corrector_order 0 (1 to 4) is not supported'],
      [{ predictor_order: 2.5 }, 'predictor_order 2.5 (1 to 4) is not supported'],
      [{ thresholding: true }, 'thresholding is not supported'],
      [{ use_flow_sigmas: true }, 'use_flow_sigmas is not supported'],
      [{ variance_type: 'learned_range' }, 'variance_type "learned_range" is not supported (a learned variance needs a UNet with 8 output channels; supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log or none)'],
      [{ variance_type: 'learned' }, 'variance_type "learned" is not supported (a learned variance needs a UNet with 8 output channels; supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log or none)'],
      [{ prediction_type: 'flow_prediction' }, 'prediction_type "flow_prediction" is not supported (supported: epsilon, sample, v_prediction)'],
      [{ algorithm_type: 'dpmsolver++' }, 'algorithm_type "dpmsolver++" is not supported (supported: data_prediction, noise_prediction)'],
      [{ tau_func: 'lambda t: 1' }, "tau_func (a Python callable; the runtime runs diffusers' default, 1 for timesteps 200 to 800, else 0) is not supported"],
    ];
    for (const [extra, message] of refused) {
      expect(() => createScheduler({ ...sa, ...extra }, 10), JSON.stringify(extra)).toThrow(
        expect.objectContaining({ code: 'UNSUPPORTED', message: `SASolverScheduler: ${message}` }),
      );
    }
  });

  it("the request names replace a DPM-Solver config's algorithm_type, which the class name carries over and refuses as diffusers does", () => {
    const dpm = { ...sa, _class_name: 'DPMSolverMultistepScheduler', algorithm_type: 'dpmsolver++', solver_order: 2 };
    for (const name of ['sa_solver', 'sa_solver_karras']) expect(createScheduler(dpm, 10, { name }).name).toBe('SASolverScheduler');
    expect(() => createScheduler(dpm, 10, { name: 'SASolverScheduler' })).toThrow(
      expect.objectContaining({ code: 'UNSUPPORTED', message: 'SASolverScheduler: algorithm_type "dpmsolver++" is not supported (supported: data_prediction, noise_prediction)' }),
    );
    // A SA-Solver model's own noise_prediction: kept by the class name, replaced by the short names.
    const noise = { ...sa, algorithm_type: 'noise_prediction' };
    expect(run(noise, 6, 0.5)).not.toEqual(run(sa, 6, 0.5));
    const viaName = createScheduler(noise, 6, { name: 'sa_solver' }) as unknown as { config: Record<string, unknown> };
    expect(viaName.config.algorithm_type).toBe('data_prediction');
  });
});
