/**
 * A Playground v2.5-style SDXL export through the real Pipeline on real ONNX Runtime sessions: an EDM scheduler
 * (c_noise timesteps, c_in-scaled samples) and a VAE with per-channel latents_mean / latents_std, which the decode
 * applies (latents·σ_c/sf + μ_c) and image-to-image's encode inverts ((x − μ_c)·sf/σ_c).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readLayout, type Component } from '../src/pipeline/model.js';
import { SessionFactory, type ModelSession } from '../src/pipeline/onnx.js';
import type { ImageInit, Job } from '../src/pipeline/job.js';
import { Pipeline, type Sessions } from '../src/pipeline/pipeline.js';
import { createScheduler } from '../src/pipeline/schedulers/index.js';
import { editJson, fixtureModel, fixtureVariant, type DemoOptions } from './fixtures/index.js';
import { postJson, startServer } from './helpers/server.js';

const work = mkdtempSync(path.join(tmpdir(), 'edm-'));
const opened: ModelSession[] = [];
afterAll(async () => {
  for (const s of opened) await s.release();
  rmSync(work, { recursive: true, force: true });
});

const MEAN = [-1.6574, 1.886, -1.383, 2.5155];
const STD = [8.4927, 5.9022, 6.5498, 5.2299];
// The keys of playgroundai/playground-v2.5-1024px-aesthetic's scheduler (diffusers' defaults but solver_order 2 named).
const EDM_DPM = {
  _class_name: 'EDMDPMSolverMultistepScheduler',
  _diffusers_version: '0.27.0.dev0',
  algorithm_type: 'dpmsolver++',
  dynamic_thresholding_ratio: 0.995,
  euler_at_final: false,
  final_sigmas_type: 'zero',
  lower_order_final: true,
  num_train_timesteps: 1000,
  prediction_type: 'epsilon',
  rho: 7.0,
  sample_max_value: 1.0,
  sigma_data: 0.5,
  sigma_max: 80.0,
  sigma_min: 0.002,
  solver_order: 2,
  solver_type: 'midpoint',
  thresholding: false,
};

/** The SDXL demo export made Playground-like: its scheduler, its VAE statistics and scaling factor. */
const playground = (name: string, opts: DemoOptions = {}) =>
  fixtureVariant(path.join(work, name), { family: 'sdxl', withVaeEncoder: true, ...opts }, (d) => {
    editJson(path.join(d, 'scheduler', 'scheduler_config.json'), (c) => {
      for (const k of Object.keys(c)) delete c[k];
      Object.assign(c, EDM_DPM);
    });
    editJson(path.join(d, 'model_index.json'), (c) => Object.assign(c, { scheduler: ['diffusers', 'EDMDPMSolverMultistepScheduler'] }));
    for (const vae of ['vae_decoder', 'vae_encoder']) {
      editJson(path.join(d, vae, 'config.json'), (c) => Object.assign(c, { latents_mean: MEAN, latents_std: STD, scaling_factor: 0.5 }));
    }
  });

async function open(dir: string) {
  const layout = readLayout(dir);
  const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 1 });
  const sessions: Partial<Record<Component, ModelSession>> = {};
  for (const c of Object.keys(layout.onnx) as Component[]) opened.push((sessions[c] = (await factory.create(c, layout.onnx[c]!)).session));
  const timesteps: number[] = [];
  const unet = sessions.unet!;
  const runUnet = unet.run.bind(unet);
  unet.run = async (feeds, outputs) => {
    timesteps.push(Number((feeds.timestep!.data as ArrayLike<number>)[0]));
    return runUnet(feeds, outputs);
  };
  const decoded: Float32Array[] = [];
  const vae = sessions.vae_decoder!;
  const runVae = vae.run.bind(vae);
  vae.run = async (feeds, outputs) => {
    decoded.push(Float32Array.from(feeds.latent_sample!.data as ArrayLike<number>));
    return runVae(feeds, outputs);
  };
  return { pipe: await Pipeline.create(layout, sessions as unknown as Sessions), layout, timesteps, decoded };
}

const W = 64;
const H = 48;
const job = (shape: Partial<Job['shape']> = {}, init?: ImageInit): Job => ({
  shape: { steps: 5, guidance: 3, height: H, width: W, scheduler: undefined, eta: 0, guidanceRescale: 0, ...shape },
  items: [{ prompt: 'a lighthouse at dusk', negativePrompt: undefined, seed: 11, numImages: 1 }],
  ...(init ? { init } : {}),
});
const picture = { data: Uint8Array.from({ length: W * H * 3 }, (_, i) => (i * 37) % 251), width: W, height: H, channels: 3 };

describe('Playground v2.5-style SDXL export (EDM scheduler, VAE latent statistics)', () => {
  it('feeds the UNet c_noise timesteps and decodes latents·σ_c/sf + μ_c, deterministically', async () => {
    const { pipe, layout, timesteps, decoded } = await open(await playground('txt'));
    expect(Array.from(layout.vae.latentsMean!)).toEqual(MEAN.map(Math.fround));
    expect(pipe.defaults().scheduler).toBe('EDMDPMSolverMultistepScheduler');
    let last: Float32Array | undefined;
    const a = await pipe.generate(job(), { onStep: (_k, _n, latents) => void (last = latents.slice()) });
    expect(timesteps).toEqual(createScheduler(layout.schedulerConfig, 5).timesteps);
    expect(timesteps[0]).toBeCloseTo(Math.log(80) / 4, 5);
    const plane = (W / 8) * (H / 8);
    const want = last!.map((x, k) => Math.fround(Math.fround(Math.fround(x * Math.fround(STD[Math.floor(k / plane)]!)) / 0.5) + Math.fround(MEAN[Math.floor(k / plane)]!)));
    expect(decoded).toHaveLength(1);
    expect(Array.from(decoded[0]!)).toEqual(Array.from(want));
    const b = await pipe.generate(job());
    expect(Buffer.compare(Buffer.from(b.images[0]!.rgb), Buffer.from(a.images[0]!.rgb))).toBe(0);
    // The SDE form draws its noise per image: two images in one run are the images of two runs.
    const sde = { scheduler: 'edm_dpmpp_2m_sde' };
    const pair = await pipe.generate({ ...job(sde), items: [{ prompt: 'a lighthouse at dusk', negativePrompt: undefined, seed: 11, numImages: 2 }] });
    const second = await pipe.generate({ ...job(sde), items: [{ prompt: 'a lighthouse at dusk', negativePrompt: undefined, seed: 12, numImages: 1 }] });
    expect(Buffer.compare(Buffer.from(pair.images[1]!.rgb), Buffer.from(second.images[0]!.rgb))).toBe(0);
    expect(Buffer.compare(Buffer.from(pair.images[0]!.rgb), Buffer.from((await pipe.generate(job(sde))).images[0]!.rgb))).toBe(0);
    // The other EDM class by name; a discrete-time one is refused with the names that fit.
    expect((await pipe.generate(job({ scheduler: 'edm_euler' }))).times.steps).toBe(5);
    await expect(pipe.generate(job({ scheduler: 'euler' }))).rejects.toThrow(/^scheduler "euler" cannot run this model: .*; use one of edm_euler, edm_dpmpp_2m, /);
  });

  it("image-to-image normalises the encoded image with the same statistics: at strength 0 the decode gives the plain VAE's image back", async () => {
    const stats = await open(await playground('i2i'));
    const plainDir = await fixtureModel({ family: 'sdxl', withVaeEncoder: true });
    const plain = await open(plainDir);
    const init: ImageInit = { mode: 'img2img', strength: 0, resizeMode: 'default', image: picture };
    const a = await stats.pipe.generate(job({}, init));
    const b = await plain.pipe.generate(job({}, init));
    expect(a.times.steps).toBe(0);
    // (x − μ)·sf/σ then ·σ/sf + μ: the same latents up to float32 rounding, so the same image within a level.
    let worst = 0;
    for (let i = 0; i < a.images[0]!.rgb.length; i++) worst = Math.max(worst, Math.abs(a.images[0]!.rgb[i]! - b.images[0]!.rgb[i]!));
    expect(worst).toBeLessThanOrEqual(1);
    // and the statistics did apply on the way in: the decoded latents differ from the plain model's
    expect(Array.from(stats.decoded[0]!)).not.toEqual(Array.from(plain.decoded[0]!));
    // Image-to-image runs the EDM schedule from the image noised to the first kept sigma.
    expect((await stats.pipe.generate(job({}, { ...init, strength: 0.6 }))).times.steps).toBe(3);
  });

  it('over HTTP: an EDM name generates, another scheduler is a 400 naming the EDM ones, and DEFAULT_SCHEDULER=euler fails the boot (CONFIG)', async () => {
    const dir = await playground('http');
    const srv = await startServer({ STORAGE_URI: dir, WARMUP_STEPS: '1', EXECUTION_PROVIDER: 'cpu', RESULT_CACHE_MB: '0' }, { ready: true });
    try {
      const predict = (scheduler: string) =>
        postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a lighthouse at dusk', seed: 3, height: 64, width: 64, num_inference_steps: 3, scheduler }] });
      const ok = await predict('edm_dpmpp_2m_sde');
      expect(ok.status, JSON.stringify(ok.json).slice(0, 300)).toBe(200);
      const bad = await predict('euler');
      expect(bad.status).toBe(400);
      // refused when parsed (the field named), before the request waits for a queue slot
      expect(JSON.stringify(bad.json)).toMatch(/instances\[0\]\.scheduler: scheduler \\"euler\\" cannot run this model: this model's scheduler is EDMDPMSolverMultistepScheduler.*use one of edm_euler, edm_dpmpp_2m, edm_dpmpp_2m_sde/);
    } finally {
      await srv.stop();
    }
    const failing = await startServer({ STORAGE_URI: dir, EXECUTION_PROVIDER: 'cpu', DEFAULT_SCHEDULER: 'euler' });
    try {
      const failed = await failing.waitFor('state', (st) => st.state === 'failed');
      expect(String(failed.reason)).toMatch(
        /^CONFIG: DEFAULT_SCHEDULER=euler cannot run from this model's scheduler\/scheduler_config\.json \(scheduler "euler" cannot run this model: this model's scheduler is EDMDPMSolverMultistepScheduler: .*use one of edm_euler, .*\); unset it or name another scheduler$/,
      );
    } finally {
      await failing.stop();
    }
  }, 120_000);

  it('refuses a UNet exported with an integer timestep, which would truncate c_noise', async () => {
    const dir = await playground('int64', { timestep: 'int64-batch' });
    await expect(open(dir)).rejects.toThrow(
      /^the UNet takes an int64 timestep, but EDMDPMSolverMultistepScheduler feeds it fractional values \(c_noise = ln\(sigma\)\/4\); export the UNet with a float timestep/,
    );
  });
});
