/**
 * @module The floor for a cache-hit start (`node dist/scripts/bench-bare-boot.js MODEL_DIR`): a plain script that imports
 * onnxruntime-node and sharp, creates the same CPU sessions the server creates (same options, no HTTP, no worker
 * thread, no storage layer, no optimized-model cache) and runs the server's warm-up generation (WARMUP_STEPS, default 2,
 * at the model's default size, PNG-encoded). Prints one JSON line with its phases; `doneMs` counts from process start.
 * Flags: --steps N, --level disabled|basic|extended|all, --opt-cache (go through the runtime's optimized-model cache),
 * --prepack (let ORT pre-pack CPU weights, its default, which the runtime turns off), --ep cpu|cuda (default cpu; cuda
 * also keeps TF32 off unless CUDA_TF32=true, as the runtime does). --opt-cache uses the runtime's own session options, so --level and --prepack
 * do not apply to it.
 */
import { parseArgs } from 'node:util';
import { encodeImage, loadSharp } from '../src/pipeline/image.js';
import { readLayout, type Component } from '../src/pipeline/model.js';
import { loadOrt, OnnxSession, SessionFactory, sessionOptions, type GraphOptimizationLevel } from '../src/pipeline/onnx.js';
import { writeOptimizedCopy } from '../src/pipeline/ortcache.js';
import { Pipeline } from '../src/pipeline/pipeline.js';
import { loadConfig } from '../src/config.js';
import { applyTf32 } from '../src/runtime/workers.js';

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { steps: { type: 'string' }, level: { type: 'string' }, 'opt-cache': { type: 'boolean' }, prepack: { type: 'boolean' }, ep: { type: 'string' } },
  });
  const dir = positionals[0];
  if (dir === undefined) throw new Error('usage: bench-bare-boot.js MODEL_DIR [--steps N] [--level all] [--opt-cache] [--prepack] [--ep cpu|cuda]');
  const ep = values.ep ?? 'cpu';
  if (ep !== 'cpu' && ep !== 'cuda') throw new Error(`--ep must be cpu or cuda, got ${ep}`);
  applyTf32({ executionProvider: ep, cudaTf32: loadConfig({ CUDA_TF32: process.env.CUDA_TF32 }).cudaTf32 });
  const steps = Number(values.steps ?? process.env.WARMUP_STEPS ?? 2);
  const level = (values.level ?? 'all') as GraphOptimizationLevel;
  const t: Record<string, number> = { startMs: performance.now() };

  const [ort] = await Promise.all([loadOrt(), loadSharp()]);
  t.importedMs = performance.now();
  const layout = readLayout(dir);
  const need: Component[] = layout.isXL ? ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder'] : ['text_encoder', 'unet', 'vae_decoder'];
  const sessions: Partial<Record<Component, OnnxSession>> = {};
  const perComponent: Record<string, number> = {};
  const factory = values['opt-cache'] ? new SessionFactory({ ep, intraOpThreads: 0, optimizedModelCache: { mode: 'always', entryMarkers: [] } }) : undefined;
  for (const c of need) {
    const c0 = performance.now();
    sessions[c] = factory
      ? (await factory.create(c, layout.onnx[c]!)).session
      : new OnnxSession(c, await ort.InferenceSession.create(layout.onnx[c]!, { ...sessionOptions(ep, { intraOpThreads: 0, graphOptimizationLevel: level }), ...(values.prepack ? { extra: {} } : {}) }));
    perComponent[c] = Math.round(performance.now() - c0);
  }
  t.sessionsMs = performance.now();
  const pipeline = await Pipeline.create(layout, sessions as Required<Pick<typeof sessions, 'text_encoder' | 'unet' | 'vae_decoder'>>);
  const d = pipeline.defaults();
  const g0 = performance.now();
  const { images } = await pipeline.generate({
    shape: { steps, guidance: d.guidance, height: d.height, width: d.width, scheduler: undefined, eta: 0, guidanceRescale: 0 },
    items: [{ prompt: 'warm-up', negativePrompt: undefined, seed: 0, numImages: 1 }],
  });
  for (const img of images) await encodeImage(img.rgb, img.width, img.height, 'png');
  t.doneMs = performance.now();
  const r = (x: number) => Math.round(x);
  process.stdout.write(`${JSON.stringify({
    doneMs: r(t.doneMs), startMs: r(t.startMs), importMs: r(t.importedMs - t.startMs), sessionsMs: r(t.sessionsMs - t.importedMs),
    warmupMs: r(t.doneMs - g0), perComponent, level, ep, prepack: values.prepack === true, maxRssMb: Math.round(process.resourceUsage().maxRSS / 1024), optCache: factory ? factory.cacheOutcomes : 'off', steps, size: `${d.width}x${d.height}`,
  })}\n`);
  await Promise.all(Object.values(sessions).map((s) => s!.release()));
  // As the server does after ready: write the copies this run loaded without, so the next --opt-cache run hits.
  // The factory's sessions use the runtime's own options (level all, no pre-packing), whatever --level and --prepack say.
  for (const it of factory?.deferredWrites ?? []) await writeOptimizedCopy(ort, it.path, ep, sessionOptions(ep, { intraOpThreads: 0 }), undefined, { mode: 'always', entryMarkers: [] });
}

await main().catch((e: unknown) => {
  process.stderr.write(`bench-bare-boot: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
