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
import { statSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { LORA_COMPONENTS, parseAdapter } from '../src/pipeline/lora-keys.js';
import { planAdapterSet, writeMergedComponent, writeMergedCopy } from '../src/pipeline/lora-merge.js';
import { openSafetensors, type SafeTensorsFile } from '../src/pipeline/lora-safetensors.js';

const USAGE = `usage: lora-merge [--linked] MODEL_DIR OUT_DIR ADAPTER.safetensors[:SCALE] [...]
  Merges the adapters (SCALE: a number, default 1) into a copy of MODEL_DIR's components and writes each component
  they touch to OUT_DIR/<component>/ as ONNX, with OUT_DIR/lora-merge.json. --linked: the form adapter sets use
  (patched weights in lora.onnx_data, the model's data hard-linked). More: docs/LORA.md, "Offline merge".
`;

/** A bad command line: one line saying what is wrong, the usage, exit 2. */
function usageError(problem: string): never {
  process.stderr.write(`lora-merge: ${problem}\n${USAGE}`);
  process.exit(2);
}

/** The number after an adapter's last ':' (a decimal, as a request's `scale`); a file name may hold ':' itself. */
const SCALE = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

/** `file[:scale]`: a suffix that is no number is an error, unless the whole argument names a file. */
function parseSpec(spec: string): { file: string; name: string; scale: number } {
  const colon = spec.lastIndexOf(':');
  const suffix = colon < 0 ? undefined : spec.slice(colon + 1);
  let file = spec;
  let scale = 1;
  if (suffix !== undefined && !suffix.includes('/')) {
    const v = Number(suffix);
    if (SCALE.test(suffix) && Number.isFinite(v)) {
      file = spec.slice(0, colon);
      scale = v;
    } else if (!isFile(spec)) {
      usageError(`${JSON.stringify(spec)}: the scale after ':' must be a number such as 0.8, got ${JSON.stringify(suffix)}`);
    }
  }
  return { file, name: path.basename(file).replace(/\.safetensors$/, ''), scale };
}

function isFile(p: string): boolean {
  try {
    return statSync(p).isFile();
  } catch {
    return false;
  }
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

async function main(args: string[]): Promise<void> {
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const linked = args.includes('--linked');
  // Anything else that looks like an option is one this tool does not have, never a path to read.
  const unknown = args.filter((a) => a.startsWith('-') && a !== '--linked');
  if (unknown.length > 0) usageError(`unknown option ${unknown.map((a) => JSON.stringify(a)).join(', ')}`);
  const [modelDir, outDir, ...specs] = args.filter((a) => a !== '--linked');
  if (!modelDir || !outDir || specs.length === 0) usageError('needs MODEL_DIR, OUT_DIR and at least one adapter');
  if (!isDir(modelDir)) {
    process.stderr.write(`lora-merge: MODEL_DIR ${modelDir} is not a directory\n`);
    process.exit(1);
  }
  const parsedSpecs = specs.map(parseSpec);
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
