/**
 * What diffusers' own code does with a model's scheduler config (test/fixtures/parity/schedulers, made by
 * scripts/make-scheduler-parity.py): the file read with Python's json (-Infinity included), loaded by its class,
 * rewritten by the pipeline's __init__ (steps_offset, clip_sample, with the deprecation warning; `pipeline` null: the
 * class alone, no rewrites), switched by a request's scheduler name with from_config, then the timesteps, sigmas and a
 * replayed trajectory (from `begin_index` when the case cuts the schedule as image-to-image does).
 * Criterion: the sigma interpolation bit for bit (as float32) on diffusers' own inputs; integer timesteps equal,
 * others within 1e-6 relative, sigmas within one float32 ulp (see below why not bit for bit); every trajectory
 * array within 1e-5 of its largest magnitude, chained through our own prev_sample. DPMSolverSDEScheduler, whose noise
 * is torchsde's Brownian tree (recorded, not replaced), is held bit for bit: noise, scaled input, x0 and sample;
 * SASolverScheduler too (scaled input and sample), and its add_noise at every index from the first step's.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { pipelineRewritesConfigs, pipelineSchedulerConfig } from '../src/pipeline/model.js';
import { parsePyJson } from '../src/pipeline/pyjson.js';
import { rampSigmas, type SigmaRamp, sigmaToT } from '../src/pipeline/schedulers/common.js';
import { luLambdas } from '../src/pipeline/schedulers/dpmsolver.js';
import { createScheduler, SCHEDULER_NAMES } from '../src/pipeline/schedulers/index.js';
import { SCHEDULER_CLASS_NAMES } from '../src/pipeline/schedulers/names.js';

const REL_TOL = 1e-5;
const FLOOR = 1e-6;
/** Non-integer timesteps: the generator's tables are up to one float32 ulp off ours (see below), which the log
 * amplifies to a few ulps of t at the smallest sigmas. */
const TABLE_TOL = 1e-6;
const dir = path.resolve(import.meta.dirname, 'fixtures/parity/schedulers');
const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
// The generator's torch (>= 2.1) fills torch.linspace differently from the torch whose arithmetic the runtime follows
// (1.13, see docs/PARITY.md): a few betas differ by one ulp. Both sides run from the generator's betas here, so
// everything after them is compared bit for bit. Cases made with torch 1.13 itself (their `torch` says so) keep the
// runtime's own betas.
const torchBetas = (parsePyJson(readFileSync(path.resolve(dir, '../scheduler-betas.json'), 'utf8')) as { betas: Record<string, number[]> }).betas;

function withGeneratorBetas(config: Record<string, unknown>): Record<string, unknown> {
  const b = torchBetas[`${String(config.beta_schedule)} ${String(config.beta_start)} ${String(config.beta_end)}`];
  if (!b || config.trained_betas) return config;
  const used = ((config._use_default_values as string[] | undefined) ?? []).filter((k) => k !== 'trained_betas');
  return { ...config, trained_betas: b, _use_default_values: used };
}

interface Case {
  name: string;
  scheduler: string;
  pipeline: string | null;
  torch?: string;
  numpy?: string;
  begin_index?: number;
  model_config: string;
  request: string | null;
  built_config: { steps_offset?: unknown; clip_sample?: unknown; _use_default_values?: string[] };
  warnings: string[];
  num_inference_steps: number;
  eta?: number;
  timesteps: number[];
  sigmas: number[] | null;
  init_noise_sigma: number;
  initial_latents: number[];
  interpolation?: {
    log_sigmas: number[];
    sigma_to_t: [number, number][];
    /** The ramp's inputs and output: sigmas between bounds, or DPM-Solver's Lu ramp of log-sigmas between its table's ends. */
    convert:
      | { kind: SigmaRamp; sigma_min: number; sigma_max: number; n: number; sigmas: number[] }
      | { kind: 'lu'; lambda_min: number; lambda_max: number; n: number; lambdas: number[] }
      | null;
  };
  /** add_noise at every index from the first step's (SASolverScheduler's cases): image-to-image and the inpainting blend. */
  add_noise?: { original: number[]; noise: number[]; noised: number[][] };
  steps: {
    t: number;
    scaled_input: number[];
    model_output: number[];
    noise: number[] | null;
    /** DPMSolverSDEScheduler: the draw of its own noise sampler (torchsde's Brownian tree), recorded, not replaced. */
    brownian_noise?: number[];
    prev_sample: number[];
    denoised: number[] | null;
  }[];
}

/** Largest |ours − ref| relative to the largest |ref| of the array (elements near zero carry no relative meaning). */
function maxRelError(got: Float32Array, ref: readonly number[]): number {
  expect(got.length).toBe(ref.length);
  let scale = FLOOR;
  for (const r of ref) scale = Math.max(scale, Math.abs(r));
  let worst = 0;
  for (let i = 0; i < ref.length; i++) {
    const e = Math.abs(got[i]! - ref[i]!) / scale;
    if (!(e <= worst)) worst = e; // NaN sticks
  }
  return worst;
}

/**
 * Held bit for bit, every step: DPMSolverSDEScheduler (its Brownian noise) and SASolverScheduler (its cases are made
 * with torch 1.13, whose scalar exp and log the runtime follows: ../src/pipeline/torchmath.ts).
 */
const BIT_EXACT = new Set(['DPMSolverSDEScheduler', 'SASolverScheduler']);
const f32 = (xs: readonly number[]) => Array.from(Float32Array.from(xs));
const u32 = new Uint32Array(1);
const asF = new Float32Array(u32.buffer);
/** Distance in float32 units in the last place (both finite, same sign here). */
function ulps(a: number, b: number): number {
  asF[0] = a;
  const ia = u32[0]!;
  asF[0] = b;
  return Math.abs(ia - u32[0]!);
}
/** float32 bit patterns (-0 and NaN compared exactly). */
const bits = (xs: ArrayLike<number>) => Array.from(new Int32Array(Float32Array.from(xs).buffer));
// diffusers puts the scheduler's repr (its whole config as JSON) into the message; the runtime names the class.
const withoutRepr = (m: string) => m.replace(/: (\w+) \{\n[\s\S]*?\n\}\n/, ': $1');

/**
 * The generator's REQUEST table (request name → class and the overrides it passes to from_config), read from the
 * script's text: each entry one line, `"name": ("Class", {json with True/False}),`.
 */
function generatorRequestTable(): Record<string, { className: string; overrides: Record<string, unknown> }> {
  const text = readFileSync(path.resolve(import.meta.dirname, '../scripts/make-scheduler-parity.py'), 'utf8');
  const block = /^REQUEST = \{\n([\s\S]*?)^\}$/m.exec(text);
  if (!block) throw new Error('no REQUEST table in scripts/make-scheduler-parity.py');
  const table: Record<string, { className: string; overrides: Record<string, unknown> }> = {};
  for (const line of block[1]!.split('\n').filter((l) => l.trim() !== '')) {
    const m = /^\s*"(\w+)": \("(\w+)", (\{.*\})\),$/.exec(line);
    if (!m) throw new Error(`unreadable REQUEST entry: ${line}`);
    table[m[1]!] = { className: m[2]!, overrides: JSON.parse(m[3]!.replace(/\bTrue\b/g, 'true').replace(/\bFalse\b/g, 'false')) };
  }
  return table;
}

describe(`diffusers pipeline + scheduler parity (${files.length} cases)`, () => {
  it('has cases', () => expect(files.length).toBeGreaterThan(30));

  it("the generator's request names are the runtime's, with the same class and overrides", () => {
    // (a class name is a request name with no overrides on both sides)
    const ours = Object.fromEntries(
      Object.entries(SCHEDULER_NAMES)
        .filter(([name]) => !(SCHEDULER_CLASS_NAMES as readonly string[]).includes(name))
        .map(([name, c]) => [name, { className: c.className, overrides: { ...c.overrides } }]),
    );
    expect(generatorRequestTable()).toEqual(ours);
  });

  for (const file of files) {
    it(file.replace(/\.json$/, ''), () => {
      const v = parsePyJson(readFileSync(path.join(dir, file), 'utf8')) as Case;
      const rewriting = v.pipeline !== null && pipelineRewritesConfigs(v.pipeline, v.pipeline.includes('XL'));
      const built = pipelineSchedulerConfig(parsePyJson(v.model_config) as Record<string, unknown>, rewriting);
      // The pipeline's rewrites: values, warnings, and which keys stay marked as class defaults.
      for (const k of ['steps_offset', 'clip_sample'] as const) {
        if (Object.hasOwn(v.built_config, k)) expect(built.config[k], k).toEqual(v.built_config[k]);
        else expect(Object.hasOwn(built.config, k), k).toBe(false);
      }
      const ours = new Set((built.config._use_default_values as string[] | undefined) ?? []);
      const theirs = new Set(v.built_config._use_default_values ?? []);
      for (const k of ours) expect(theirs.has(k), `${k} in _use_default_values`).toBe(true);
      for (const k of theirs) if (Object.hasOwn(built.config, k)) expect(ours.has(k), `${k} in _use_default_values`).toBe(true);
      expect(built.rewrites.map((r) => r.message)).toEqual(v.warnings.map(withoutRepr));

      if (v.request !== null) expect(SCHEDULER_NAMES[v.request]!.className).toBe(v.scheduler);
      // DPMSolverSDE with a list of noise seeds (one Brownian tree per image) is what the runtime does with each
      // image's own seed when the config sets none: the list becomes the images' seeds.
      const listSeeds = Array.isArray(built.config.noise_sampler_seed) ? (built.config.noise_sampler_seed as number[]) : undefined;
      const config = listSeeds ? { ...built.config, noise_sampler_seed: null } : built.config;
      const betas = v.torch?.startsWith('1.') ? config : withGeneratorBetas(config);
      const s = createScheduler(betas, v.num_inference_steps, {
        ...(v.request !== null ? { name: v.request } : {}),
        ...(v.eta !== undefined ? { eta: v.eta } : {}),
        ...(listSeeds ? { seeds: listSeeds } : {}),
      });
      expect(s.name).toBe(v.scheduler);
      if (v.interpolation) {
        // Karras / exponential / beta sigmas, Lu's log-sigmas and sigma → t on diffusers' own inputs, bit for bit as the
        // float32 the schedule keeps (the float64 intermediates may differ in their last bits: numpy's SIMD log and pow vs
        // V8's, scipy's beta quantile vs ours).
        const { log_sigmas: logSigmas, sigma_to_t: pairs, convert } = v.interpolation;
        const table = Float32Array.from(logSigmas);
        // numpy 1.x (legacy casting) computes the weight of _sigma_to_t in float32 (a float32 array minus a float64
        // scalar stays float32), numpy 2 in float64 as the runtime does: bit for bit only against numpy 2; the
        // timesteps below still hold numpy 1.x cases to TABLE_TOL.
        if (!v.numpy?.startsWith('1.')) for (const [sigma, t] of pairs) expect(Math.fround(sigmaToT(sigma, table)), `sigma ${sigma}`).toBe(Math.fround(t));
        if (convert?.kind === 'lu') expect(f32(luLambdas(convert.lambda_min, convert.lambda_max, convert.n))).toEqual(f32(convert.lambdas));
        else if (convert) expect(f32(rampSigmas(convert.kind, convert.sigma_min, convert.sigma_max, convert.n))).toEqual(f32(convert.sigmas));
      }
      // The generator's sigma table comes from its torch (>= 2.1: `** 0.5` is not sqrt) and numpy (SIMD float32
      // log): up to one float32 ulp from the torch 1.13 tables the runtime follows (bit-exact to
      // ../shared/reference/schedulers). So whole schedules are held to one ulp here; the arithmetic that turns
      // them into timesteps is checked bit for bit just above.
      expect(s.timesteps.length).toBe(v.timesteps.length);
      s.timesteps.forEach((t, i) => {
        const want = v.timesteps[i]!;
        // (numpy 1.x's float32 weight can land a sigma_to_t exactly on an integer that numpy 2 misses by an ulp)
        if (Number.isInteger(want) && !v.numpy?.startsWith('1.')) expect(t, `timestep ${i}`).toBe(want);
        else if (t !== want) expect(Math.abs(t - want) / want, `timestep ${i}: ${t} vs ${want}`).toBeLessThanOrEqual(TABLE_TOL);
      });
      if (v.sigmas) s.sigmas!.forEach((x, i) => expect(ulps(x, v.sigmas![i]!), `sigma ${i}: ${x} vs ${v.sigmas![i]}`).toBeLessThanOrEqual(1));
      expect(ulps(s.initNoiseSigma, v.init_noise_sigma)).toBeLessThanOrEqual(1);

      if (v.begin_index !== undefined) s.setBeginIndex(v.begin_index);
      const begin = v.begin_index ?? 0;
      expect(v.steps.length).toBe(v.timesteps.length - begin);
      let sample: Float32Array<ArrayBufferLike> = Float32Array.from(v.initial_latents);
      let worst = 0;
      v.steps.forEach((st, i) => {
        expect(st.t, `step ${i}`).toBe(v.timesteps[begin + i]);
        const scaled = s.scaleModelInput(sample, st.t);
        worst = Math.max(worst, maxRelError(scaled, st.scaled_input));
        let draws = 0;
        const r = s.step(Float32Array.from(st.model_output), st.t, sample, () => {
          draws++;
          if (!st.noise) throw new Error(`step ${i} drew noise but diffusers drew none`);
          return Float32Array.from(st.noise);
        });
        expect(draws, `noise draws at step ${i}`).toBe(st.noise ? 1 : 0);
        // Brownian noise: bit for bit (a time one ulp off reads another node of the tree, other noise altogether)
        if (st.brownian_noise) expect(bits(r.noise!), `Brownian noise at step ${i}`).toEqual(bits(st.brownian_noise));
        else expect(r.noise, `Brownian noise at step ${i}`).toBeUndefined();
        worst = Math.max(worst, maxRelError(r.prevSample, st.prev_sample));
        if (BIT_EXACT.has(v.scheduler)) {
          expect(bits(scaled), `scaled input at step ${i}`).toEqual(bits(st.scaled_input));
          expect(bits(r.prevSample), `prev_sample at step ${i}`).toEqual(bits(st.prev_sample));
          if (st.denoised) expect(bits(r.denoised!), `denoised at step ${i}`).toEqual(bits(st.denoised));
        }
        if (st.denoised) worst = Math.max(worst, maxRelError(r.denoised!, st.denoised));
        sample = r.prevSample;
      });
      expect(worst).toBeLessThanOrEqual(REL_TOL);
      if (v.add_noise) {
        const { original, noise, noised } = v.add_noise;
        expect(noised.length).toBe(v.timesteps.length - begin);
        noised.forEach((want, k) => {
          const got = s.addNoise(Float32Array.from(original), Float32Array.from(noise), begin + k);
          expect(bits(got), `add_noise at index ${begin + k}`).toEqual(bits(want));
        });
      }
    });
  }
});
