/**
 * The schedule as image-to-image and inpainting run it, against diffusers (img2img/schedulers.json, made by
 * scripts/make-img2img-reference.py): cut by strength (get_timesteps + set_begin_index), add_noise at the first kept
 * timestep, every step on the cut schedule, and add_noise after each step as the inpainting blend calls it.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parsePyJson } from '../src/pipeline/pyjson.js';
import { createScheduler } from '../src/pipeline/schedulers/index.js';
import { cutSchedule } from '../src/pipeline/img2img.js';
import { REFERENCE } from './helpers/server.js';

interface Case {
  request: string | null;
  scheduler: string;
  config: Record<string, unknown>;
  num_inference_steps: number;
  strength: number;
  begin_index: number;
  timesteps: number[];
  original: number[];
  noise: number[];
  noised: number[];
  steps: Array<{ t: number; scaled_input: number[]; model_output: number[]; noise: number[]; prev_sample: number[]; blend_noised: number[] | null }>;
}

const file = path.join(REFERENCE(), 'img2img', 'schedulers.json');
const { cases } = parsePyJson(readFileSync(file, 'utf8')) as { cases: Case[] };

/** Largest |a − b| relative to the largest |b| of the array (elements near zero mean nothing on their own). */
function relErr(got: Float32Array, want: readonly number[]): number {
  expect(got.length).toBe(want.length);
  let scale = 1e-6;
  for (const w of want) scale = Math.max(scale, Math.abs(w));
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i]! - want[i]!) / scale;
    if (!(e <= worst)) worst = e;
  }
  return worst;
}

describe('schedules cut by strength, as diffusers runs them', () => {
  it("cuts at t_start · order (diffusers' get_timesteps): a Heun schedule of 2n − 1 runs starts at an even index", () => {
    expect(cutSchedule(11, 10, 0.7)).toEqual({ begin: 3, steps: 8 }); // PNDM: 10 steps are 11 timesteps
    expect(cutSchedule(19, 10, 0.6, 2)).toEqual({ begin: 8, steps: 11 });
    expect(cutSchedule(19, 10, 1, 2)).toEqual({ begin: 0, steps: 19 });
    expect(cutSchedule(19, 10, 0, 2)).toEqual({ begin: 19, steps: 0 });
  });

  it("has cases for the six classes the reference was made with (the later classes' cuts are scheduler-parity's *-img2img-* cases)", () => {
    expect(new Set(cases.map((c) => c.scheduler)).size).toBeGreaterThanOrEqual(6);
  });

  it.each(cases.map((c) => [`${c.scheduler} ${c.num_inference_steps} steps, strength ${c.strength}`, c] as const))('%s', (_name, c) => {
    const s = createScheduler({ ...c.config, _class_name: c.scheduler }, c.num_inference_steps);
    expect(s.timesteps).toEqual(c.timesteps.map(Math.fround));
    const cut = cutSchedule(s.timesteps.length, c.num_inference_steps, c.strength, s.order);
    expect(cut.begin).toBe(c.begin_index);
    expect(cut.steps).toBe(c.steps.length);
    s.setBeginIndex(cut.begin);
    const x0 = Float32Array.from(c.original);
    const n = Float32Array.from(c.noise);
    let latents = s.addNoise(x0, n, cut.begin);
    expect(relErr(latents, c.noised)).toBeLessThan(1e-6);
    c.steps.forEach((st, i) => {
      expect(s.timesteps[cut.begin + i]).toBe(Math.fround(st.t));
      expect(relErr(s.scaleModelInput(latents, st.t), st.scaled_input), `scaled input at step ${i}`).toBeLessThan(1e-5);
      const r = s.step(Float32Array.from(st.model_output), st.t, latents, () => Float32Array.from(st.noise));
      expect(relErr(r.prevSample, st.prev_sample), `prev_sample at step ${i}`).toBeLessThan(1e-5);
      if (st.blend_noised) expect(relErr(s.addNoise(x0, n, cut.begin + i + 1), st.blend_noised), `add_noise after step ${i}`).toBeLessThan(1e-6);
      latents = r.prevSample;
    });
  });
});

interface LcmCase {
  config_name: string;
  config: Record<string, unknown>;
  num_inference_steps: number;
  strength: number;
  error?: string;
  timesteps: number[];
  original: number[];
  noise: number[];
  noised: number[];
  steps: Array<{ t: number; model_output: number[]; noise: number[]; prev_sample: number[]; denoised: number[] }>;
}

const lcmCases = (parsePyJson(readFileSync(path.join(REFERENCE(), 'img2img', 'lcm-strength.json'), 'utf8')) as { cases: LcmCase[] }).cases;

describe("LatentConsistencyModelImg2ImgPipeline's schedule: strength handed to LCMScheduler.set_timesteps (img2img/lcm-strength.json)", () => {
  it.each(lcmCases.filter((c) => !c.error).map((c) => [`${c.config_name}, ${c.num_inference_steps} steps, strength ${c.strength}`, c] as const))('%s', (_name, c) => {
    const s = createScheduler({ ...c.config, _class_name: 'LCMScheduler' }, c.num_inference_steps, { strength: c.strength });
    // Every one of the n steps runs, from the first int(original_inference_steps · strength) distillation timesteps.
    expect(s.timesteps).toEqual(c.timesteps);
    const x0 = Float32Array.from(c.original);
    let latents = s.addNoise(x0, Float32Array.from(c.noise), 0);
    expect(relErr(latents, c.noised)).toBeLessThan(1e-6);
    c.steps.forEach((st, i) => {
      const r = s.step(Float32Array.from(st.model_output), st.t, latents, () => Float32Array.from(st.noise));
      expect(relErr(r.denoised!, st.denoised), `denoised at step ${i}`).toBeLessThan(1e-5);
      expect(relErr(r.prevSample, st.prev_sample), `prev_sample at step ${i}`).toBeLessThan(1e-5);
      latents = r.prevSample;
    });
  });

  it.each(lcmCases.filter((c) => c.error).map((c) => [`${c.config_name}, ${c.num_inference_steps} steps, strength ${c.strength}`, c] as const))('refuses %s, as diffusers raises', (_name, c) => {
    expect(c.error).toMatch(/is smaller than `num_inference_steps`/);
    const original = Number(c.config.original_inference_steps);
    expect(() => createScheduler({ ...c.config, _class_name: 'LCMScheduler' }, c.num_inference_steps, { strength: c.strength })).toThrow(
      `original_inference_steps ${original} × strength ${c.strength}`,
    );
  });

  it('is the full schedule at strength 1, as set_timesteps without strength gives it', () => {
    const c = lcmCases.find((x) => x.strength === 1)!;
    expect(createScheduler({ ...c.config, _class_name: 'LCMScheduler' }, 4).timesteps).toEqual(c.timesteps);
  });
});
