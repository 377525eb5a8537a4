/**
 * What building a LoRA adapter set costs, on the demo model padded to a real UNet's size (its padding is external
 * data every session reads, as real weights are), and the two ways of handing merged weights to ONNX Runtime:
 *
 *   npm run bench:lora -- [PAD_MB=256] [STEPS=20]
 *
 * - memory: the graph and its data file read into memory, patched, and given as `externalData` buffers;
 * - disk: the same patched bytes written as a whole merged copy, the session created from that path;
 * - links (the runtime's way, writeMergedComponent): a new graph whose patched initializers live in a small file and
 *   every other external weight is read through a link to the original data file, the session created from its path.
 * Each is timed against creating the base session from its path, with the process's RSS after each step.
 * Then the served cost on the unpadded demo model: the server (dist/src/main.js, CPU) answers the same request at
 * its default size without adapters, with both demo adapters once (the set is built, the request waits for it),
 * and again (the set is cached): median of 5 requests each.
 */
import { mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { buildDemoModel } from '../src/demo/build.js';
import { LORA_COMPONENTS, parseAdapter } from '../src/pipeline/lora-keys.js';
import { mergeComponent, planAdapterSet, writeMergedComponent } from '../src/pipeline/lora-merge.js';
import { parseSafetensors } from '../src/pipeline/lora-safetensors.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { NO_OPTIMIZED_CACHE } from '../src/pipeline/ortcache.js';
import { freePort, startChild } from './bench-common.js';

const padMb = Number(process.argv[2] ?? 256);
const steps = Number(process.argv[3] ?? 20);
const rssMb = () => Math.round(process.memoryUsage().rss / 2 ** 20);

async function main(): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bench-lora-'));
  try {
    await buildDemoModel(dir, { padBytes: padMb * 2 ** 20, padSplit: 'unet' });
    const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 0, optimizedModelCache: NO_OPTIMIZED_CACHE });
    const unet = path.join(dir, 'unet', 'model.onnx');
    const rows: Array<Record<string, unknown>> = [];
    const time = async <T>(label: string, fn: () => Promise<T>): Promise<T> => {
      const t0 = performance.now();
      const r = await fn();
      rows.push({ step: label, ms: Math.round(performance.now() - t0), rssMB: rssMb() });
      return r;
    };
    const base = await time('base UNet session from its path', () => factory.create('unet', unet));
    const st = parseSafetensors(await readFile(path.join(dir, 'loras', 'demo-style.safetensors')), 'demo-style');
    const graphs = Object.fromEntries(LORA_COMPONENTS.map((c) => [c, path.join(dir, c, 'model.onnx')]));
    const list = planAdapterSet([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 1 }], graphs).byComponent.get('unet') ?? [];
    const merged = await time('merge in memory (read graph + data, patch)', () => mergeComponent(unet, list));
    const mem = await time('session from the in-memory bytes', () => factory.createFromBytes('unet', merged.model, merged.externalData));
    const copy = path.join(dir, 'merged', 'unet');
    await time('write the merged copy to disk', async () => {
      await mkdir(copy, { recursive: true });
      await writeFile(path.join(copy, 'model.onnx'), merged.model);
      for (const e of merged.externalData) await writeFile(path.join(copy, e.path), e.data);
    });
    const disk = await time('session from the merged copy on disk', () => factory.create('unet', path.join(copy, 'model.onnx')));
    const linked = await time('write the linked merged graph (patched weights only)', () => writeMergedComponent(unet, list, path.join(dir, 'linked', 'unet')));
    const links = await time('session from the linked merged graph', () => factory.create('unet', linked.modelPath));
    await Promise.all([base.session.release(), mem.session.release(), disk.session.release(), links.session.release()]);
    const served = await serve(path.join(dir, 'plain'));
    console.log(JSON.stringify({ padMB: padMb, unetMB: Math.round(merged.totalBytes / 2 ** 20), patchedKB: Math.round(merged.patchedBytes / 1024), build: rows, served }, null, 1));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Medians of request times on the demo model: base, first request with adapters (builds the set), cached set. */
async function serve(dir: string): Promise<Record<string, unknown>> {
  await buildDemoModel(dir);
  const port = await freePort();
  const env = { ...process.env, PORT: String(port), HOST: '127.0.0.1', STORAGE_URI: dir, MODEL_CACHE_DIR: path.join(dir, '..', 'cache'), EXECUTION_PROVIDER: 'cpu', RESULT_CACHE_MB: '0', LOG_LEVEL: 'info' };
  const { child, up } = startChild(process.execPath, [path.join(import.meta.dirname, '..', 'src', 'main.js')], /"model ready"/, env);
  let log = '';
  child.stdout!.on('data', (c: Buffer) => (log += String(c)));
  try {
    await up;
    const loras = [{ name: 'demo-style', scale: 0.8 }, { name: 'demo-kohya', scale: 1 }];
    const once = async (extra: Record<string, unknown>, seed: number) => {
      const t0 = performance.now();
      const r = await fetch(`http://127.0.0.1:${port}/v1/models/model:predict`, { method: 'POST', body: JSON.stringify({ instances: [{ prompt: 'a red fox', seed, num_inference_steps: steps, ...extra }] }) });
      if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
      await r.arrayBuffer();
      return performance.now() - t0;
    };
    const median = (xs: number[]) => Math.round([...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!);
    const base: number[] = [];
    for (let i = 0; i < 5; i++) base.push(await once({}, i));
    const first = await once({ loras }, 99);
    const cached: number[] = [];
    for (let i = 0; i < 5; i++) cached.push(await once({ loras }, i));
    const built = log.split('\n').filter((l) => l.includes('"adapter set built"')).map((l) => JSON.parse(l) as Record<string, unknown>)[0];
    return { steps, baseMs: median(base), firstWithAdaptersMs: Math.round(first), cachedAdaptersMs: median(cached), setBuild: built?.ms, mergedMB: built?.mergedMB };
  } finally {
    child.kill('SIGTERM');
  }
}

void main();
