/**
 * Image-to-image and inpainting (latent blend) on every demo family, in process: each scheduler family and UNet input
 * kind (SDXL's time ids and pooled embeddings, LCM's guidance embedding, v-prediction, trailing Euler ancestral) runs,
 * is deterministic, and keeps the invariants (strength 0 does not depend on the prompt; a black mask keeps the image).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { DEMO_FAMILIES } from '../src/demo/index.js';
import { readLayout, type Component } from '../src/pipeline/model.js';
import { SessionFactory, type ModelSession } from '../src/pipeline/onnx.js';
import type { ImageInit, Job } from '../src/pipeline/job.js';
import { Pipeline, type Sessions } from '../src/pipeline/pipeline.js';
import { fixtureModel } from './fixtures/index.js';

const W = 64;
const H = 48;
const picture = { data: Uint8Array.from({ length: W * H * 3 }, (_, i) => (i * 37) % 251), width: W, height: H, channels: 3 };
const black = { data: new Uint8Array(W * H * 3), width: W, height: H, channels: 3 };
const opened: ModelSession[] = [];
afterAll(async () => {
  for (const s of opened) await s.release();
});

async function open(family: (typeof DEMO_FAMILIES)[number]): Promise<Pipeline> {
  const dir = await fixtureModel({ family, withVaeEncoder: true });
  const layout = readLayout(dir);
  const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 1 });
  const sessions: Partial<Record<Component, ModelSession>> = {};
  for (const c of Object.keys(layout.onnx) as Component[]) opened.push((sessions[c] = (await factory.create(c, layout.onnx[c]!)).session));
  return Pipeline.create(layout, sessions as unknown as Sessions);
}

const bytes = (r: Awaited<ReturnType<Pipeline['generate']>>) => Buffer.from(r.images[0]!.rgb).toString('base64');

describe.each(DEMO_FAMILIES)('%s', (family) => {
  it('runs image-to-image and inpainting, deterministically, with the invariants', async () => {
    const p = await open(family);
    const d = p.defaults();
    const job = (prompt: string, init: ImageInit): Job => ({
      shape: { steps: family === 'lcm' ? 4 : 6, guidance: d.guidance, height: H, width: W, scheduler: undefined, eta: 0, guidanceRescale: 0 },
      items: [{ prompt, negativePrompt: undefined, seed: 3, numImages: 1 }],
      init,
    });
    const i2i = (strength: number): ImageInit => ({ mode: 'img2img', strength, resizeMode: 'default', image: picture });
    const a = await p.generate(job('a lighthouse', i2i(0.75)));
    expect([a.images[0]!.width, a.images[0]!.height]).toEqual([W, H]);
    expect(a.times.vaeEncoderMs).toBeGreaterThan(0);
    expect(bytes(await p.generate(job('a lighthouse', i2i(0.75))))).toBe(bytes(a));
    expect(bytes(await p.generate(job('a meadow', i2i(0.75))))).not.toBe(bytes(a));
    // Strength 1 runs the whole text-to-image schedule (from the image noised to the first timestep, as diffusers does).
    const { init: _, ...text } = job('a lighthouse', i2i(1));
    expect((await p.generate(job('a lighthouse', i2i(1)))).times.steps).toBe((await p.generate(text)).times.steps);
    const kept = await p.generate(job('a meadow', { mode: 'inpaint', strength: 1, resizeMode: 'default', image: picture, mask: black }));
    expect(bytes(await p.generate(job('a lighthouse', { mode: 'inpaint', strength: 1, resizeMode: 'default', image: picture, mask: black })))).toBe(bytes(kept));
    if (family === 'lcm') {
      // LatentConsistencyModelImg2ImgPipeline raises at strength 0: no distillation timestep to pick the steps from.
      await expect(p.generate(job('a lighthouse', i2i(0)))).rejects.toThrow('original_inference_steps 50 × strength 0 leaves 0');
      return;
    }
    const s0 = await p.generate(job('a lighthouse', i2i(0)));
    expect(s0.times.steps).toBe(0);
    expect(bytes(await p.generate(job('a meadow', i2i(0))))).toBe(bytes(s0));
    expect(bytes(kept)).toBe(bytes(s0));
  });
});

it("lcm: image-to-image runs every step, from the part of the LCM schedule strength keeps (LatentConsistencyModelImg2ImgPipeline's set_timesteps)", async () => {
  const job = (family: 'lcm' | 'sd15', strength: number, scheduler?: string): Job => ({
    shape: { steps: 4, guidance: 1, height: H, width: W, scheduler, eta: 0, guidanceRescale: 0 },
    items: [{ prompt: 'a lighthouse', negativePrompt: undefined, seed: 3, numImages: 1 }],
    init: { mode: 'img2img', strength, resizeMode: 'default', image: picture },
  });
  const lcm = await open('lcm');
  expect(lcm.defaults().strengthSchedules).toEqual({ '': 50, lcm: 50, LCMScheduler: 50 });
  // 4 steps at 0.5: timesteps 499, 379, 259, 139 (img2img/lcm-strength.json), where cutting the 4-step schedule kept 2.
  expect((await lcm.generate(job('lcm', 0.5))).times.steps).toBe(4);
  expect((await lcm.generate(job('lcm', 0.3))).times.steps).toBe(4);
  await expect(lcm.generate(job('lcm', 0.05))).rejects.toThrow('original_inference_steps 50 × strength 0.05 leaves 2');
  // Another class on the LCM model (diffusers' LCM pipeline cannot pass it strength) cuts the full schedule.
  expect((await lcm.generate(job('lcm', 0.5, 'euler'))).times.steps).toBe(2);
  // StableDiffusionImg2ImgPipeline with an LCMScheduler (an LCM-LoRA) cuts too: it never hands strength over.
  const sd = await open('sd15');
  expect(sd.defaults().strengthSchedules).toBeUndefined();
  expect((await sd.generate(job('sd15', 0.5, 'lcm'))).times.steps).toBe(2);
});

it("sd15: TCD (eta 0.3, its gamma) cuts the schedule as every class does and draws each step's noise from the image's seed", async () => {
  const p = await open('sd15');
  const job = (eta: number, strength: number): Job => ({
    shape: { steps: 8, guidance: 1.5, height: H, width: W, scheduler: 'tcd', eta, guidanceRescale: 0 },
    items: [{ prompt: 'a lighthouse', negativePrompt: undefined, seed: 3, numImages: 1 }],
    init: { mode: 'img2img', strength, resizeMode: 'default', image: picture },
  });
  const a = await p.generate(job(0.3, 0.5));
  expect(a.times.steps).toBe(4);
  expect(bytes(await p.generate(job(0.3, 0.5)))).toBe(bytes(a));
  expect(bytes(await p.generate(job(0, 0.5)))).not.toBe(bytes(a));
});
