/**
 * Merges LoRA adapters into a copy of a model's components, offline, with the runtime's own merge (the same code a
 * request's adapter set goes through), and writes each component the adapters touch as ONNX:
 *
 *   npm run lora:merge -- [--linked] MODEL_DIR OUT_DIR ADAPTER.safetensors[:SCALE] [...]
 *
 * OUT_DIR/<component>/model.onnx (+ its external data files) and OUT_DIR/lora-merge.json (what was patched). Used by
 * scripts/check_lora_export.py to compare with diffusers' fuse_lora followed by an export, and to bake an adapter in.
 * `--linked` writes the form adapter sets use instead (patched weights in lora.onnx_data, the model's data hard-linked).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { LORA_COMPONENTS, parseAdapter } from '../src/pipeline/lora-keys.js';
import { planAdapterSet, writeMergedComponent, writeMergedCopy } from '../src/pipeline/lora-merge.js';
import { openSafetensors, type SafeTensorsFile } from '../src/pipeline/lora-safetensors.js';

async function main(args: string[]): Promise<void> {
  const linked = args[0] === '--linked';
  const [modelDir, outDir, ...specs] = linked ? args.slice(1) : args;
  if (!modelDir || !outDir || specs.length === 0) {
    console.error('usage: lora-merge MODEL_DIR OUT_DIR ADAPTER.safetensors[:SCALE] [...]');
    process.exit(2);
  }
  const parsedSpecs = specs.map((spec) => {
    const m = /^(.*?)(?::(-?[\d.]+))?$/.exec(spec)!;
    return { file: m[1]!, name: path.basename(m[1]!).replace(/\.safetensors$/, ''), scale: m[2] === undefined ? 1 : Number(m[2]) };
  });
  // Read by ranges as a request's adapter set is (lora-thread.ts): the header now, each tensor when its weight is merged,
  // so no adapter is held whole (Node reads no file over 2 GiB whole).
  const opening = parsedSpecs.map((a) => openSafetensors(a.file, `adapter "${a.name}"`).catch((err: unknown) => {
    const code = (err as { cause?: { code?: unknown } })?.cause?.code;
    throw new Error(`${a.file}: ${(err as Error).message}${typeof code === 'string' ? ` (${code})` : ''}`);
  }));
  try {
    await merge(linked, modelDir, outDir, parsedSpecs, await Promise.all(opening));
  } finally {
    // Every file that opened, those that opened after another had failed included.
    await Promise.allSettled(opening.map((p) => p.then((st) => st.close())));
  }
}

async function merge(linked: boolean, modelDir: string, outDir: string, specs: ReadonlyArray<{ name: string; scale: number }>, files: SafeTensorsFile[]): Promise<void> {
  const adapters = specs.map((a, i) => ({ parsed: parseAdapter(files[i]!, a.name), st: files[i]!, scale: a.scale }));
  const graphs = Object.fromEntries(LORA_COMPONENTS.map((c) => [c, path.join(modelDir, c, 'model.onnx')]));
  const { byComponent: by, problems } = planAdapterSet(adapters, graphs);
  if (problems.length > 0) {
    console.error(problems.join('\n'));
    process.exit(1);
  }
  const report: Record<string, unknown> = {};
  for (const [component, list] of by) {
    const t0 = performance.now();
    const dir = path.join(outDir, component);
    let bytes: { patchedBytes: number; totalBytes: number };
    // Both stream: one initializer in memory at a time, whatever the size of the model's data files.
    bytes = await (linked ? writeMergedComponent : writeMergedCopy)(path.join(modelDir, component, 'model.onnx'), list, dir);
    report[component] = { weights: list.map((u) => u.param).sort(), patchedBytes: bytes.patchedBytes, totalBytes: bytes.totalBytes, ms: Math.round(performance.now() - t0) };
  }
  report.formats = Object.fromEntries(adapters.map((a) => [a.parsed.name, a.parsed.format]));
  await mkdir(outDir, { recursive: true });
  await writeFile(path.join(outDir, 'lora-merge.json'), `${JSON.stringify(report, null, 1)}\n`);
  console.log(JSON.stringify(report));
}

main(process.argv.slice(2)).catch((err: unknown) => {
  console.error((err as Error)?.message ?? err);
  process.exit(1);
});
