/**
 * What building a LoRA adapter set costs, on the demo model padded to a real UNet's size (its padding is external
 * data every session reads, as real weights are), and the two ways of handing merged weights to ONNX Runtime:
 *
 *   npm run bench:lora -- [PAD_MB=256]
 *
 * - memory: the graph and its data file read into memory, patched, and given as `externalData` buffers (the runtime's
 *   way, lora-merge.ts);
 * - disk: the same patched bytes written as a merged copy beside the cache, the session created from that path.
 * Each is timed against creating the base session from its path, with the process's peak RSS after each step.
 */
import { mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { buildDemoModel } from '../src/demo/build.js';
import { LORA_COMPONENTS, parseAdapter, resolveAdapters, type LoraComponent } from '../src/pipeline/lora-keys.js';
import { readLoraMap, type LoraMap } from '../src/pipeline/lora-map.js';
import { mergeComponent } from '../src/pipeline/lora-merge.js';
import { parseSafetensors } from '../src/pipeline/lora-safetensors.js';
import { SessionFactory } from '../src/pipeline/onnx.js';

const padMb = Number(process.argv[2] ?? 256);
const rssMb = () => Math.round(process.memoryUsage().rss / 2 ** 20);

async function main(): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bench-lora-'));
  try {
    await buildDemoModel(dir, { padBytes: padMb * 2 ** 20, padSplit: 'unet' });
    const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 0, optimizedModelCache: 'off' });
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
    const maps = new Map<LoraComponent, LoraMap>();
    for (const c of LORA_COMPONENTS) {
      const m = readLoraMap(path.join(dir, c));
      if (m) maps.set(c, m);
    }
    const { updates } = resolveAdapters([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 1 }], maps);
    const list = [...updates.values()].filter((u) => u.component === 'unet');
    const merged = await time('merge in memory (read graph + data, patch)', () => mergeComponent(unet, list));
    const mem = await time('session from the in-memory bytes', () => factory.createFromBytes('unet', merged.model, merged.externalData));
    const copy = path.join(dir, 'merged', 'unet');
    await time('write the merged copy to disk', async () => {
      await mkdir(copy, { recursive: true });
      await writeFile(path.join(copy, 'model.onnx'), merged.model);
      for (const e of merged.externalData) await writeFile(path.join(copy, e.path), e.data);
    });
    const disk = await time('session from the merged copy on disk', () => factory.create('unet', path.join(copy, 'model.onnx')));
    console.log(JSON.stringify({ padMB: padMb, unetMB: Math.round(merged.totalBytes / 2 ** 20), patchedKB: Math.round(merged.patchedBytes / 1024), steps: rows }, null, 1));
    await Promise.all([base.session.release(), mem.session.release(), disk.session.release()]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

void main();
