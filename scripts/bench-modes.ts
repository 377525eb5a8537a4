/**
 * @module The cost of each generation mode on the embedded demo model (`npm run bench:modes`, i.e.
 * `node dist/scripts/bench-modes.js`): text-to-image, image-to-image at several strengths, inpainting by latent blend
 * (the demo's 4-channel UNet) and with an inpainting UNet (the 9-channel demo variant), same size, steps, prompt and
 * seed, through the same Pipeline the workers run (in this process, CPU). Per mode: the median of BENCH_RUNS runs of
 * the whole generation and of each stage, the UNet calls, and the total as a ratio of text-to-image's.
 * Env: BENCH_RUNS (5), BENCH_SIZE (512), BENCH_STEPS (20); BENCH_MODEL_DIR: an export with vae_encoder/ to measure
 * instead of the demo (then the 9-channel row needs BENCH_INPAINT_DIR, an inpainting export, or is left out);
 * BENCH_EP: cpu (default) or cuda. Run it on an otherwise idle machine for stable numbers.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildDemoModel, ensureDemoModel } from '../src/demo/index.js';
import type { ExecutionProvider } from '../src/config.js';
import type { ImageInit, Job, StageTimes } from '../src/pipeline/job.js';
import { readLayout, type Component } from '../src/pipeline/model.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { Pipeline, type Sessions } from '../src/pipeline/pipeline.js';
import type { Raster } from '../src/pipeline/resample.js';
import { envNumber, median } from './bench-common.js';

const env = envNumber;
const RUNS = env('BENCH_RUNS', 5);
const SIZE = env('BENCH_SIZE', 512);
const STEPS = env('BENCH_STEPS', 20);
const EP = (process.env.BENCH_EP ?? 'cpu') as ExecutionProvider;


async function pipeline(dir: string): Promise<Pipeline> {
  const layout = readLayout(dir);
  const factory = new SessionFactory({ ep: EP, intraOpThreads: 0 });
  const sessions: Partial<Record<Component, unknown>> = {};
  if (!layout.onnx.vae_encoder) throw new Error(`${dir} has no vae_encoder/: image inputs need one`);
  const comps: Component[] = ['text_encoder', ...(layout.isXL ? (['text_encoder_2'] as const) : []), 'unet', 'vae_decoder', 'vae_encoder'];
  for (const c of comps) sessions[c] = (await factory.create(c, layout.onnx[c]!)).session;
  return Pipeline.create(layout, sessions as unknown as Sessions);
}

/** A smooth picture with edges (what the resize and the encoder see matters little for time). */
function picture(w: number, h: number): Raster {
  const data = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      data[o] = 128 + Math.round(100 * Math.sin(x / 17));
      data[o + 1] = Math.round((255 * y) / h);
      data[o + 2] = (x >> 5) % 2 ? 40 : 210;
    }
  }
  return { data, width: w, height: h, channels: 3 };
}

function circle(w: number, h: number): Raster {
  const data = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (w / 4) ** 2) data.fill(255, (y * w + x) * 3, (y * w + x) * 3 + 3);
  return { data, width: w, height: h, channels: 3 };
}

interface Mode {
  label: string;
  model: 'demo' | 'inpaint';
  init?: ImageInit;
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-modes-'));
  try {
    const own = process.env.BENCH_MODEL_DIR;
    const demoDir = own ?? (await ensureDemoModel(tmp));
    const inpaintDir = own ? process.env.BENCH_INPAINT_DIR : (await buildDemoModel(path.join(tmp, 'inpaint'), { inpainting: true })).dir;
    const pipes = { demo: await pipeline(demoDir), inpaint: inpaintDir ? await pipeline(inpaintDir) : undefined };
    const what = own ? `${path.basename(own)}${inpaintDir ? ` (+ ${path.basename(inpaintDir)})` : ''}` : 'demo model';
    const img = picture(SIZE, SIZE);
    const big = picture(2 * SIZE, 2 * SIZE);
    const mask = circle(SIZE, SIZE);
    const i2i = (strength: number, image = img): ImageInit => ({ mode: 'img2img', strength, resizeMode: 'default', image });
    const modes: Mode[] = [
      { label: 'text-to-image', model: 'demo' },
      { label: 'img2img strength 0.5', model: 'demo', init: i2i(0.5) },
      { label: 'img2img strength 0.8', model: 'demo', init: i2i(0.8) },
      { label: 'img2img strength 1.0', model: 'demo', init: i2i(1) },
      { label: `img2img 0.8, ${2 * SIZE}px input`, model: 'demo', init: i2i(0.8, big) },
      { label: 'inpaint blend (4-ch UNet) 1.0', model: 'demo', init: { mode: 'inpaint', strength: 1, resizeMode: 'default', image: img, mask } },
      { label: 'inpaint blend (4-ch UNet) 0.75', model: 'demo', init: { mode: 'inpaint', strength: 0.75, resizeMode: 'default', image: img, mask } },
      ...(pipes.inpaint ? [{ label: 'inpaint UNet (9-ch) 1.0', model: 'inpaint' as const, init: { mode: 'inpaint' as const, strength: 1, resizeMode: 'default' as const, image: img, mask } }] : []),
    ];
    const shape = { steps: STEPS, guidance: 7.5, height: SIZE, width: SIZE, scheduler: undefined, eta: 0, guidanceRescale: 0 };
    const items = [{ prompt: 'a photo of a red fox in the snow', negativePrompt: undefined, seed: 1234, numImages: 1 }];
    const run = async (m: Mode) => {
      const job: Job = { shape, items, ...(m.init ? { init: m.init } : {}) };
      const t0 = performance.now();
      const { times } = await pipes[m.model]!.generate(job);
      return { total: performance.now() - t0, times };
    };
    for (const m of modes) await run(m); // warm every session and path once
    const samples = new Map<string, Array<{ total: number; times: StageTimes }>>(modes.map((m) => [m.label, []]));
    // Interleaved, so drift on a shared machine hits every mode alike.
    for (let r = 0; r < RUNS; r++) for (const m of modes) samples.get(m.label)!.push(await run(m));

    const cols = ['mode', 'total ms', 'x text', 'UNet calls', 'text enc', 'image in', 'denoise', 'vae dec'];
    const widths = [34, 10, 8, 11, 10, 10, 10, 9];
    const line = (xs: Array<string | number>) => xs.map((x, i) => (i === 0 ? String(x).padEnd(widths[i]!) : String(x).padStart(widths[i]!))).join('');
    console.log(`${what}, ${EP}, ${SIZE}x${SIZE}, ${STEPS} steps, guidance 7.5, median of ${RUNS} runs, ${os.cpus().length} cores`);
    console.log(line(cols));
    const base = median(samples.get('text-to-image')!.map((s) => s.total));
    const out: Record<string, unknown> = { model: what, ep: EP, size: SIZE, steps: STEPS, runs: RUNS, modes: {} };
    for (const m of modes) {
      const ss = samples.get(m.label)!;
      const med = (f: (t: StageTimes) => number) => median(ss.map((s) => f(s.times)));
      const row = {
        totalMs: median(ss.map((s) => s.total)),
        unetCalls: ss[0]!.times.steps,
        textEncoderMs: med((t) => t.textEncoderMs),
        imageInputMs: med((t) => t.vaeEncoderMs ?? 0),
        denoiseMs: med((t) => t.denoiseMs),
        vaeDecoderMs: med((t) => t.vaeMs),
      };
      (out.modes as Record<string, unknown>)[m.label] = row;
      const f1 = (x: number) => x.toFixed(1);
      console.log(line([m.label, f1(row.totalMs), (row.totalMs / base).toFixed(2), row.unetCalls, f1(row.textEncoderMs), f1(row.imageInputMs), f1(row.denoiseMs), f1(row.vaeDecoderMs)]));
    }
    console.log('"image in": resizing the input (and mask) and the VAE encoder; it is part of no other column.');
    console.log(JSON.stringify(out));
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

void main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
