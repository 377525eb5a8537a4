/**
 * Model families and export variants through the real Pipeline on real ONNX Runtime sessions:
 * SD 1.x, SD 2.x (v-prediction, 768), SDXL (two encoders, pooled text_embeds, time_ids),
 * LCM (guidance embedding, no CFG), Turbo (guidance 0, no CFG), fp16 IO, int64 timesteps.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { readLayout } from '../src/pipeline/model.js';
import { SessionFactory, type OnnxSession } from '../src/pipeline/onnx.js';
import type { Job } from '../src/pipeline/job.js';
import { Pipeline, type Sessions } from '../src/pipeline/pipeline.js';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import { fixtureModel, type DemoOptions } from './fixtures/index.js';
import { createScheduler, SCHEDULER_NAMES } from '../src/pipeline/schedulers/index.js';

interface UnetCall {
  sample: readonly number[];
  inputs: string[];
  timestep: unknown[];
}

/** Loads a fixture and records every UNet feed (names and dims) by wrapping the session's run. */
async function load(opts: DemoOptions) {
  const dir = await fixtureModel(opts);
  const layout = readLayout(dir);
  const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 1 });
  const need = layout.isXL ? (['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder'] as const) : (['text_encoder', 'unet', 'vae_decoder'] as const);
  const sessions: Record<string, OnnxSession> = {};
  for (const c of need) sessions[c] = (await factory.create(c, layout.onnx[c]!)).session;
  const calls: UnetCall[] = [];
  const unet = sessions.unet!;
  const run = unet.run.bind(unet);
  unet.run = async (feeds, outputs) => {
    calls.push({ sample: feeds.sample!.dims, inputs: Object.keys(feeds).sort(), timestep: Array.from(feeds.timestep!.data as ArrayLike<unknown>) });
    return run(feeds, outputs);
  };
  const pipe = await Pipeline.create(layout, sessions as unknown as Sessions);
  return { pipe, calls, layout, sessions };
}

const job = (shape: Partial<Job['shape']>, items: Partial<Job['items'][number]>[] = [{}]): Job => ({
  shape: { steps: 3, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0, ...shape },
  items: items.map((it) => ({ prompt: 'a castle on a hill', negativePrompt: undefined, seed: 5, numImages: 1, ...it })),
});

const meanAbs = (a: Uint8Array, b: Uint8Array) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i]! - b[i]!);
  return s / a.length;
};
const std = (a: Uint8Array) => {
  const m = a.reduce((x, y) => x + y, 0) / a.length;
  return Math.sqrt(a.reduce((x, y) => x + (y - m) ** 2, 0) / a.length);
};

describe('model families', () => {
  it('SD 1.x: 512 default, classifier-free guidance doubles the UNet batch', async () => {
    const { pipe, calls } = await load({ family: 'sd15' });
    expect(pipe.defaults()).toMatchObject({
      steps: 50, guidance: 7.5, height: 512, width: 512, scheduler: 'PNDMScheduler', modes: { img2img: { guidance: 7.5, strength: 0.8 }, inpaint: { guidance: 7.5, strength: 1 } },
    });
    const { images } = await pipe.generate(job({}));
    expect(calls[0]!.sample).toEqual([2, 4, 8, 8]);
    expect(calls[0]!.inputs).toEqual(['encoder_hidden_states', 'sample', 'timestep']);
    expect(images[0]!.rgb.length).toBe(64 * 64 * 3);
    expect(std(images[0]!.rgb)).toBeGreaterThan(1);
  });

  it('SD 2.x: v-prediction at a 768 default size', async () => {
    const { pipe, layout } = await load({ family: 'sd2' });
    expect(pipe.defaults()).toMatchObject({ height: 768, width: 768 });
    expect(layout.schedulerConfig.prediction_type).toBe('v_prediction');
    const a = await pipe.generate(job({ steps: 4 }));
    const b = await pipe.generate(job({ steps: 4 }, [{ prompt: 'a different prompt' }]));
    expect(meanAbs(a.images[0]!.rgb, b.images[0]!.rgb)).toBeGreaterThan(0.5);
  });

  it('SDXL: two encoders, pooled text_embeds and time_ids, zero negatives by default, 1024 default', async () => {
    const { pipe, calls, layout } = await load({ family: 'sdxl' });
    expect(layout.isXL).toBe(true);
    // StableDiffusionXLPipeline's and …Img2ImgPipeline's guidance 5.0, …InpaintPipeline's 7.5; strength 0.3, 0.9999.
    expect(pipe.defaults()).toMatchObject({ steps: 50, guidance: 5, height: 1024, width: 1024, modes: { img2img: { guidance: 5, strength: 0.3 }, inpaint: { guidance: 7.5, strength: 0.9999 } } });
    const zeroNeg = await pipe.generate(job({ height: 128, width: 96 }));
    expect(calls[0]!.inputs).toEqual(['encoder_hidden_states', 'sample', 'text_embeds', 'time_ids', 'timestep']);
    expect(calls[0]!.sample).toEqual([2, 4, 16, 12]);
    expect(zeroNeg.images[0]).toMatchObject({ width: 96, height: 128 });
    // An explicit negative prompt is encoded instead of zeros, so the image changes.
    const withNeg = await pipe.generate(job({ height: 128, width: 96 }, [{ negativePrompt: 'blurry' }]));
    expect(meanAbs(zeroNeg.images[0]!.rgb, withNeg.images[0]!.rgb)).toBeGreaterThan(0.1);
    // Batched together (the batch key ignores negative prompts), each keeps its own: zeros for the one without.
    const mixed = await pipe.generate(job({ height: 128, width: 96 }, [{}, { negativePrompt: 'blurry' }]));
    const eq = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));
    expect(eq(mixed.images[0]!.rgb, zeroNeg.images[0]!.rgb)).toBe(true);
    expect(eq(mixed.images[1]!.rgb, withNeg.images[0]!.rgb)).toBe(true);
  });

  it('LCM: guidance enters as timestep_cond, no unconditional batch, 4-step default', async () => {
    const { pipe, calls } = await load({ family: 'lcm' });
    expect(pipe.defaults()).toMatchObject({ steps: 4, guidance: 8.5, modes: { img2img: { guidance: 8.5, strength: 0.8 }, inpaint: { guidance: 8.5, strength: 1 } } });
    const a = await pipe.generate(job({ steps: 4, guidance: 8.5 }));
    expect(calls).toHaveLength(4);
    expect(calls[0]!.sample).toEqual([1, 4, 8, 8]);
    expect(calls[0]!.inputs).toContain('timestep_cond');
    expect(calls.map((c) => Number(c.timestep[0]))).toEqual([999, 759, 499, 259]);
    const b = await pipe.generate(job({ steps: 4, guidance: 3 }));
    expect(meanAbs(a.images[0]!.rgb, b.images[0]!.rgb)).toBeGreaterThan(0.1);
    // TCD on an LCM UNet: the same timesteps and guidance embedding, its own steps (eta its gamma).
    calls.length = 0;
    const tcd = await pipe.generate(job({ steps: 4, guidance: 8.5, scheduler: 'tcd', eta: 0.3 }));
    expect(calls.map((c) => Number(c.timestep[0]))).toEqual([999, 759, 499, 259]);
    expect(calls[0]!.inputs).toContain('timestep_cond');
    expect(meanAbs(a.images[0]!.rgb, tcd.images[0]!.rgb)).toBeGreaterThan(0.1);
  });

  it('a batch mixing guidance scales guides each image by its own (item.guidance): each image is its run alone, bit for bit', async () => {
    const eq = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));
    for (const [family, scales] of [['sd15', [7.5, 3, 12]], ['lcm', [8.5, 2, 1]]] as const) {
      const { pipe } = await load({ family });
      const steps = family === 'lcm' ? 4 : 3;
      // the shape carries the first request's scale, as the engine's batch does; each item its own
      const mixed = await pipe.generate(job({ steps, guidance: scales[0] }, scales.map((guidance, i) => ({ seed: 20 + i, guidance }))));
      for (const [i, guidance] of scales.entries()) {
        const alone = await pipe.generate(job({ steps, guidance }, [{ seed: 20 + i }]));
        expect(eq(mixed.images[i]!.rgb, alone.images[0]!.rgb), `${family} guidance ${guidance}`).toBe(true);
      }
      expect(eq(mixed.images[0]!.rgb, (await pipe.generate(job({ steps, guidance: scales[1] }, [{ seed: 20 }]))).images[0]!.rgb)).toBe(false);
    }
    // An unconditional pass for some images and not others cannot share a UNet batch: the engine never sends one.
    const { pipe } = await load({ family: 'sd15' });
    await expect(pipe.generate(job({ guidance: 7.5 }, [{ guidance: 7.5 }, { guidance: 1 }]))).rejects.toThrow(/a batch mixes guidance scales above and at or below 1/);
  });

  it('Turbo: guidance 0 skips the unconditional batch; one trailing step at t=999', async () => {
    const { pipe, calls } = await load({ family: 'turbo' });
    const r = await pipe.generate(job({ steps: 1, guidance: 0 }));
    expect(calls).toHaveLength(1);
    expect(calls[0]!.sample).toEqual([1, 4, 8, 8]);
    expect(Number(calls[0]!.timestep[0])).toBe(999);
    expect(std(r.images[0]!.rgb)).toBeGreaterThan(1);
  });
});

describe('export variants', () => {
  it('fp16 inputs/outputs give (nearly) the fp32 image', async () => {
    const a = await (await load({ family: 'sd15' })).pipe.generate(job({ steps: 4 }));
    const b = await (await load({ family: 'sd15', fp16: true })).pipe.generate(job({ steps: 4 }));
    // Only the graph edges are half precision in the fixture, so the images agree closely but not exactly.
    expect(meanAbs(a.images[0]!.rgb, b.images[0]!.rgb)).toBeLessThan(3);
  });

  it('an int64 [batch] timestep (optimum 1.6–1.22) is fed one value per row', async () => {
    const { pipe, calls } = await load({ family: 'sd15', timestep: 'int64-batch' });
    await pipe.generate(job({ steps: 2 }));
    expect(calls[0]!.timestep).toHaveLength(2);
  });
});

describe('a folder that is not an export', () => {
  it('names what is missing and what is there, leaving out the cache entry\'s own dot-files', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'dr-layout-'));
    try {
      writeFileSync(path.join(dir, 'model_index.json'), '{}');
      writeFileSync(path.join(dir, '.complete.json'), '{}');
      writeFileSync(path.join(dir, '.progress.jsonl'), '');
      expect(() => readLayout(dir)).toThrow('not an ONNX diffusers export: missing text_encoder/model.onnx, unet/model.onnx, vae_decoder/model.onnx (found: model_index.json)');
      // A repository synced whole, its export in onnx/: the folder to add is named.
      mkdirSync(path.join(dir, 'onnx', 'unet'), { recursive: true });
      writeFileSync(path.join(dir, 'onnx', 'unet', 'model.onnx'), '');
      // Under KServe's storageUri, STORAGE_URI is /mnt/models, where KServe put the model: the storageUri is what to change.
      const hint = "the export seems to be in onnx/: add onnx/ to STORAGE_URI (to the InferenceService's storageUri where KServe downloads the model)";
      expect(() => readLayout(dir)).toThrow(`(found: model_index.json, onnx); ${hint}`);
      expect(() => readLayout(dir, new Set(['model_index.json', 'onnx/unet/model.onnx', 'onnx/unet/model.onnx_data']))).toThrow(hint);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('request options', () => {
  it('num_images_per_prompt uses one generator per image: image i equals a single generation at seed+i', async () => {
    const { pipe } = await load({ family: 'sd15' });
    const both = await pipe.generate(job({}, [{ seed: 40, numImages: 2 }]));
    expect(both.images.map((i) => i.seed)).toEqual([40, 41]);
    const second = await pipe.generate(job({}, [{ seed: 41 }]));
    expect(Buffer.from(both.images[1]!.rgb).equals(Buffer.from(second.images[0]!.rgb))).toBe(true);
  });

  it('guidance_rescale changes the result, 0 leaves it alone', async () => {
    const { pipe } = await load({ family: 'sd15' });
    const base = await pipe.generate(job({ guidance: 9 }));
    const again = await pipe.generate(job({ guidance: 9, guidanceRescale: 0 }));
    const rescaled = await pipe.generate(job({ guidance: 9, guidanceRescale: 0.7 }));
    expect(Buffer.from(base.images[0]!.rgb).equals(Buffer.from(again.images[0]!.rgb))).toBe(true);
    expect(meanAbs(base.images[0]!.rgb, rescaled.images[0]!.rgb)).toBeGreaterThan(0.1);
  });

  it('a per-request scheduler override changes the trajectory', async () => {
    const { pipe } = await load({ family: 'sd15' });
    const pndm = await pipe.generate(job({ steps: 6 }));
    const euler = await pipe.generate(job({ steps: 6, scheduler: 'euler_a' }));
    expect(meanAbs(pndm.images[0]!.rgb, euler.images[0]!.rgb)).toBeGreaterThan(0.1);
  });
});

describe('every scheduler name on every family', () => {
  // The schedulers' arithmetic is checked against diffusers in scheduler-parity.test.ts; this runs each one through the
  // real pipeline: v-prediction (SD 2.x), SDXL's extra inputs, one UNet run per timestep (2n − 1 for Heun, DPM2 and
  // DPM++ SDE).
  // (the EDM names run only on a model trained that way: test/edm.test.ts)
  const names = Object.keys(SCHEDULER_NAMES).filter((n) => !n.endsWith('Scheduler') && n !== 'lcm' && !n.startsWith('edm_'));
  // UNet runs for 3 steps: PLMS repeats its first timestep, Heun and DPM2 run every step but the first twice, DPM++ SDE
  // every step but the last.
  const runsFor = (name: string) => (name === 'pndm' ? 4 : name === 'heun' || name.startsWith('dpm2') || name.startsWith('dpmpp_sde') ? 5 : 3);
  it.each(['sd15', 'sd2', 'sdxl'] as const)('%s: an image from each, one UNet run per timestep', async (family) => {
    const { pipe, calls, layout } = await load({ family });
    for (const name of names) {
      calls.length = 0;
      const out = await pipe.generate(job({ steps: 3, scheduler: name }));
      expect(createScheduler(layout.schedulerConfig, 3, { name }).timesteps, name).toHaveLength(runsFor(name));
      expect(calls.length, name).toBe(runsFor(name));
      expect(std(out.images[0]!.rgb), name).toBeGreaterThan(0);
    }
  });
});

describe('token ids from the engine', () => {
  it("a job carrying ids (as the runtime tokenizes on its main thread) gives the images the pipeline's own tokenizers give, SDXL's second included", async () => {
    for (const family of ['sd15', 'sdxl'] as const) {
      const { pipe, layout, sessions } = await load({ family });
      const external = await Pipeline.create(layout, sessions as unknown as Sessions, 'external');
      const toks = await Promise.all(layout.tokenizerDirs.map((d) => ClipTokenizer.load(d)));
      const j = job({ steps: 2 }, [{ prompt: 'a castle on a hill', negativePrompt: 'fog' }, { prompt: 'a boat', seed: 9 }]);
      const texts = new Set(j.items.flatMap((it) => [it.prompt, it.negativePrompt ?? '']));
      const withIds: Job = { ...j, tokens: [...texts].map((t) => [t, toks.map((tok) => tok.encode(t))]) };
      const own = await pipe.generate(j);
      const given = await external.generate(withIds);
      expect(given.images.map((i) => Buffer.from(i.rgb).toString('base64')), family).toEqual(own.images.map((i) => Buffer.from(i.rgb).toString('base64')));
      // Without ids and without tokenizers of its own, it says so rather than guessing.
      await expect(external.generate(j)).rejects.toThrow(/no token ids/);
    }
  }, 60_000);
});
