/**
 * @module Prints the per-step CPU cost of each scheduler (scale_model_input + step) on 512px and 1024px latents,
 * the torch.randn draw of one latent, what DPM++ SDE's noise adds to a UNet run made on the worker against on an
 * auxiliary thread, and the warm tokenizer time for a full 77-token prompt.
 *
 *   npx tsc -p tsconfig.build.json && node dist/scripts/bench-scheduler.js [request names…]
 *
 * Names given: only those schedulers (and no randn / tokenizer lines; the DPM++ SDE noise lines where one is dpmpp_sde*).
 *
 * CLIP_TOKENIZER_DIR names a folder with vocab.json + merges.txt (default ../shared/reference/clip-tokenizer, else the copy in test/fixtures/reference).
 */

import { existsSync } from 'node:fs';
import path from 'node:path';
import { AuxClient } from '../src/pipeline/aux-client.js';
import { NO_OPTIMIZED_CACHE } from '../src/pipeline/ortcache.js';
import { nativeRandn, TorchGenerator } from '../src/pipeline/random.js';
import { createScheduler, SCHEDULER_NAMES } from '../src/pipeline/schedulers/index.js';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import { sharedOrFixture } from './reference.js';

const SD15_CONFIG = {
  _class_name: 'PNDMScheduler',
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  num_train_timesteps: 1000,
  set_alpha_to_one: false,
  skip_prk_steps: true,
  steps_offset: 1,
  timestep_spacing: 'leading',
};
/** Playground v2.5's scheduler: the EDM names run only on a model trained that way. */
const EDM_CONFIG = { _class_name: 'EDMDPMSolverMultistepScheduler', sigma_min: 0.002, sigma_max: 80.0, sigma_data: 0.5, solver_order: 2 };
const configFor = (name: string) => (name.startsWith('edm_') ? EDM_CONFIG : SD15_CONFIG);
/** Every request name (the diffusers class names build the same classes), or those named on the command line. */
const ONLY = process.argv.slice(2);
const NAMES = ONLY.length > 0 ? ONLY : Object.keys(SCHEDULER_NAMES).filter((n) => !n.endsWith('Scheduler'));
/** One image, seed 1: DPM++ SDE seeds its Brownian tree with it, as the pipeline does. */
const OPTS = { seeds: [1] };
const SHAPES = [
  { label: '4x64x64 (512px)', n: 4 * 64 * 64 },
  { label: '4x128x128 (1024px)', n: 4 * 128 * 128 },
];

/** Mean time of `fn`, ms: the best of 7 batches of >= 40 ms each (other load on the machine only adds time). */
function timeMs(fn: () => void): number {
  for (let i = 0; i < 3; i++) fn(); // warm the JIT
  let best = Infinity;
  for (let b = 0; b < 7; b++) {
    let runs = 0;
    const t0 = performance.now();
    do {
      fn();
      runs++;
    } while (performance.now() - t0 < 40);
    best = Math.min(best, (performance.now() - t0) / runs);
  }
  return best;
}

const stepsFor = (name: string) => (name === 'lcm' || name === 'tcd' ? 4 : 20);
/** TCD at its model cards' gamma 0.3 (eta 0 skips its noise step); DDIM at the pipelines' default 0. */
const opts = (name: string) => ({ name, ...OPTS, ...(name === 'tcd' ? { eta: 0.3 } : {}) });

/** createScheduler alone (tables, timesteps), ms. */
function benchCreate(name: string): number {
  return timeMs(() => createScheduler(configFor(name), stepsFor(name), opts(name)));
}

/** One scale_model_input + step, ms: a whole run minus its creation, over the UNet runs (2n − 1 for Heun and DPM2). */
function benchStep(name: string, n: number, createMs: number): number {
  const steps = stepsFor(name);
  const runs = createScheduler(configFor(name), steps, opts(name)).timesteps.length;
  const gen = new TorchGenerator(1);
  const modelOutput = gen.randn(n);
  const noise = gen.randn(n);
  const init = gen.randn(n);
  const perRun = timeMs(() => {
    const s = createScheduler(configFor(name), steps, opts(name));
    let x = init;
    for (const t of s.timesteps) {
      s.scaleModelInput(x, t);
      x = s.step(modelOutput, t, x, () => noise).prevSample;
    }
  });
  return Math.max(0, perRun - createMs) / runs;
}

/** What a GPU UNet run is to this thread: ORT holds it, synchronously, until the run ends. */
function hold(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end);
}

/**
 * DPM++ SDE's noise made on the worker after each UNet run, against made on an auxiliary thread (aux.ts, as a worker
 * with AUX_THREADS does) during it: a 20-step run at `n` values per image, each UNet run standing in as `unetMs` of this
 * thread held. Returns ms per UNet run beyond `unetMs`, the best of 3 runs.
 */
async function sdeOverhead(images: number, n: number, unetMs: number, client?: AuxClient): Promise<number> {
  const seeds = Array.from({ length: images }, (_, i) => 1 + i);
  const gen = new TorchGenerator(1);
  const modelOutput = gen.randn(images * n);
  let best = Infinity;
  for (let rep = 0; rep < 3; rep++) {
    const s = createScheduler(SD15_CONFIG, 20, { name: 'dpmpp_sde_karras', seeds });
    let x = gen.randn(images * n);
    const t0 = performance.now();
    for (const t of s.timesteps) {
      const q = client ? s.nextNoise!(x.length) : undefined;
      const made = q ? client!.noise(q) : undefined;
      hold(unetMs);
      if (made) s.giveNoise!(q!, await made);
      x = s.step(modelOutput, t, s.scaleModelInput(x, t), () => new Float32Array(0)).prevSample;
    }
    await client?.forgetNoise();
    best = Math.min(best, (performance.now() - t0) / s.timesteps.length - unetMs);
  }
  return best;
}

async function benchNoiseAhead(): Promise<void> {
  const unetMs = Number(process.env.BENCH_UNET_MS ?? 20);
  const client = new AuxClient({ name: 'encode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, () => undefined, () => undefined);
  console.log(`
DPM++ SDE Karras, 20 steps: ms per UNet run beyond the run itself (${unetMs} ms of this thread held, as ORT holds it on a GPU; BENCH_UNET_MS), noise made on the worker after the run against on an auxiliary thread during it (AUX_THREADS):`);
  try {
    for (const [label, images, n] of [['512px, 1 image', 1, SHAPES[0]!.n], ['512px, 4 images', 4, SHAPES[0]!.n], ['1024px, 1 image', 1, SHAPES[1]!.n]] as const) {
      const here = await sdeOverhead(images, n, unetMs);
      const there = await sdeOverhead(images, n, unetMs, client);
      console.log(`${label.padEnd(22)}${here.toFixed(3).padStart(10)}${there.toFixed(3).padStart(10)}   ×${(here / Math.max(there, 1e-3)).toFixed(1)}`);
    }
  } finally {
    await client.close();
  }
}

async function main(): Promise<void> {
  console.log(`node ${process.version}; schedulers known: ${Object.keys(SCHEDULER_NAMES).length} names`);
  console.log('\nscheduler cost per UNet run (scale_model_input + step, ms; SD 1.5 config, edm_* on Playground v2.5s; 20 steps, lcm and tcd 4 (tcd at eta 0.3)), and createScheduler:');
  console.log(['scheduler'.padEnd(18), ...SHAPES.map((s) => s.label.padStart(20)), 'create'.padStart(12)].join(''));
  for (const name of NAMES) {
    const createMs = benchCreate(name);
    const row = SHAPES.map((s) => benchStep(name, s.n, createMs).toFixed(3).padStart(20));
    console.log([name.padEnd(18), ...row, createMs.toFixed(3).padStart(12)].join(''));
  }
  if (ONLY.length > 0) {
    if (ONLY.some((n) => n.startsWith('dpmpp_sde'))) await benchNoiseAhead();
    return;
  }

  console.log(`\ntorch.randn of one latent (ms): native/torch-randn.c (${nativeRandn ? `${nativeRandn.path} block` : 'not built: both columns are JavaScript'}) beside the JavaScript path, same process:`);
  for (const s of SHAPES) {
    const native = new TorchGenerator(42);
    const js = new TorchGenerator(42, { native: false });
    const a = timeMs(() => native.randn(s.n));
    const b = timeMs(() => js.randn(s.n));
    console.log(`${s.label.padEnd(22)}${a.toFixed(3).padStart(10)}${b.toFixed(3).padStart(10)}   ×${(b / a).toFixed(1)}`);
  }

  await benchNoiseAhead();

  const dir = process.env.CLIP_TOKENIZER_DIR ?? sharedOrFixture('clip-tokenizer');
  if (!existsSync(path.join(dir, 'vocab.json'))) {
    console.log(`\ntokenizer: skipped (no vocab.json in ${dir}; set CLIP_TOKENIZER_DIR)`);
    return;
  }
  const tok = await ClipTokenizer.load(dir);
  const words = 'a highly detailed photograph of an astronaut riding a white horse on mars, dramatic lighting, 8k'.split(' ');
  let prompt = '';
  for (let i = 0; tok.tokenize(prompt).length < 75; i++) prompt = `${prompt} ${words[i % words.length]!}`.trim();
  const ms = timeMs(() => tok.encode(prompt));
  // A fresh tokenizer's first call pays for BPE merges; later calls hit the word cache.
  const cold = await ClipTokenizer.load(dir);
  const t0 = performance.now();
  cold.encode(prompt);
  const coldMs = performance.now() - t0;
  console.log(`\ntokenizer: ${tok.tokenize(prompt).length}-token prompt encode ${(ms * 1000).toFixed(1)} µs warm, ${coldMs.toFixed(2)} ms first call`);
}

await main();
