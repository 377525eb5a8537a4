/** @module Writes a complete, deterministic optimum-layout demo pipeline (tiny seeded ONNX graphs + real configs). */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { type FileHandle, mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { RuntimeError } from '../errors.js';
import { type ExternalChunk, type GraphBuilder, paddingStream } from './graph.js';
import {
  DEMO_FAMILIES, type DemoFamily, FAMILIES, modelIndex, specialTokensMap, textEncoderConfig, tokenizerConfig, unetConfig, vaeConfig,
} from './families.js';
import { type GraphOptions, type TimestepInput, textEncoderGraph, unetGraph, vaeDecoderGraph, vaeEncoderGraph } from './graphs.js';
import { demoLoras } from './loras.js';

/** The LoRA weight map an export carries per component: its file name and format version (see pipeline/lora-map.ts). */
export const LORA_MAP_FILE = 'lora_map.json';
export const LORA_MAP_FORMAT = 1;

export type { DemoFamily } from './families.js';
export type { TimestepInput } from './graphs.js';
export { DEMO_FAMILIES } from './families.js';

export interface DemoOptions {
  /** Which pipeline family to imitate (configs, inputs, tokenizers). Default 'sd15'. */
  family?: DemoFamily;
  /** Every float input and output of every graph becomes float16 (cast at the edges); input_ids stay int64. */
  fp16?: boolean;
  /** UNet `timestep`: float scalar [] (optimum ≥ 1.24, default), int64 [steps] (optimum 1.6–1.22), float [batch] (diffusers script). */
  timestep?: TimestepInput;
  /**
   * Bytes of extra weights (for benchmarks), stored in `<component>/model.onnx_data` and multiplied in on every run,
   * so they cost what real weights cost at load and at run time; the images do not change. Split by `padSplit`.
   */
  padBytes?: number;
  /**
   * `sd15` (default): as the weights of Stable Diffusion 1.5 are split (UNet 83.3%, text encoders 11.9% shared
   * equally, VAE decoder 4.8%: 859.5M / 123.1M / 49.5M parameters); `unet`: all of it in the UNet (the worst case
   * for overlapping downloads with session creation).
   */
  padSplit?: PadSplit;
  /** Store UNet tensors of ≥ 100 bytes in `unet/model.onnx_data`, as optimum does for large UNets. */
  externalData?: boolean;
  /** Also write `vae_encoder/`. */
  withVaeEncoder?: boolean;
  /**
   * An inpainting pipeline: the UNet takes 9 channels (latents, mask, masked-image latents) as SD inpainting exports
   * do, `model_index.json` names StableDiffusionInpaintPipeline, and `vae_encoder/` is written.
   */
  inpainting?: boolean;
  /** Weight seed; the same options give byte-identical files. Default 0. */
  seed?: number;
}

export type PadSplit = 'sd15' | 'unet';
const PAD_SPLITS: readonly PadSplit[] = ['sd15', 'unet'];
/** SD 1.5's parameter counts per component (UNet, text encoder, VAE decoder), in millions. */
const SD15_PARAMS = { unet: 859.52, textEncoders: 123.06, vaeDecoder: 49.49 } as const;

export type ResolvedDemoOptions = Required<DemoOptions>;

export interface DemoFile {
  /** Relative to the model folder, '/'-separated. */
  path: string;
  bytes: number;
}

export interface DemoManifest {
  dir: string;
  family: DemoFamily;
  options: ResolvedDemoOptions;
  /** Every file written, sorted by path. */
  files: DemoFile[];
  totalBytes: number;
}

/** Each padded component's padding weight (float32 [PAD_ROWS, ⌈bytes / 128⌉], external); see padTap in graphs.ts. */
const PAD_NAME = 'demo_padding';
const TIMESTEPS: readonly TimestepInput[] = ['float-scalar', 'int64-batch', 'float-batch'];

export function resolveDemoOptions(opts: DemoOptions = {}): ResolvedDemoOptions {
  const r: ResolvedDemoOptions = {
    family: opts.family ?? 'sd15',
    fp16: opts.fp16 ?? false,
    timestep: opts.timestep ?? 'float-scalar',
    padBytes: opts.padBytes ?? 0,
    padSplit: opts.padSplit ?? 'sd15',
    externalData: opts.externalData ?? false,
    withVaeEncoder: (opts.withVaeEncoder ?? false) || (opts.inpainting ?? false),
    inpainting: opts.inpainting ?? false,
    seed: opts.seed ?? 0,
  };
  const bad: string[] = [];
  if (!DEMO_FAMILIES.includes(r.family)) bad.push(`family must be one of ${DEMO_FAMILIES.join(', ')}, got ${JSON.stringify(r.family)}`);
  if (!TIMESTEPS.includes(r.timestep)) bad.push(`timestep must be one of ${TIMESTEPS.join(', ')}, got ${JSON.stringify(r.timestep)}`);
  if (!Number.isSafeInteger(r.padBytes) || r.padBytes < 0) bad.push(`padBytes must be an integer >= 0, got ${r.padBytes}`);
  if (!PAD_SPLITS.includes(r.padSplit)) bad.push(`padSplit must be one of ${PAD_SPLITS.join(', ')}, got ${JSON.stringify(r.padSplit)}`);
  if (!Number.isSafeInteger(r.seed) || r.seed < 0 || r.seed > 0xffffffff) bad.push(`seed must be an integer in [0, 2^32), got ${r.seed}`);
  if (bad.length > 0) throw new RuntimeError('INVALID_INPUT', `demo model options: ${bad.join('; ')}`);
  return r;
}

/** The directory holding package.json and the shipped tokenizer files, from src/demo or dist/src/demo alike. */
export function demoAssetsDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const assets = path.join(dir, 'src', 'demo', 'assets');
    if (existsSync(path.join(dir, 'package.json')) && existsSync(path.join(assets, 'vocab.json'))) return assets;
    const up = path.dirname(dir);
    if (up === dir) throw new RuntimeError('INTERNAL', 'demo tokenizer assets (src/demo/assets) not found above the demo module');
    dir = up;
  }
}

/**
 * Builds the pipeline folder in `outDir` (created if missing; existing files are replaced). Each file is written to a
 * temporary name and renamed into place, so a reader never sees half a file.
 */
export async function buildDemoModel(outDir: string, opts?: DemoOptions, hooks: { editWeight?: GraphOptions['edit'] } = {}): Promise<DemoManifest> {
  const o = resolveDemoOptions(opts);
  const family = FAMILIES[o.family];
  const spec = o.inpainting ? { ...family, pipelineClass: family.pipelineClass.replace(/Pipeline$/, 'InpaintPipeline'), inChannels: 9 } : family;
  const dir = path.resolve(outDir);
  const g: GraphOptions = { seed: o.seed, fp16: o.fp16, ...(hooks.editWeight ? { edit: hooks.editWeight } : {}) };
  const written: string[] = [];
  const put = async (rel: string, data: Uint8Array | string) => {
    await writeAtomic(path.join(dir, rel), data);
    written.push(rel);
  };
  const json = (rel: string, value: unknown) => put(rel, `${JSON.stringify(value, null, 2)}\n`);
  const pads = padShares(o, spec.textEncoders.length);
  const padName = (bytes: number) => (bytes > 0 ? PAD_NAME : undefined);
  const model = async (folder: string, graph: GraphBuilder, external = false, padBytes = 0) => {
    // Each component's padding draws its own stream, so no two weight files share bytes.
    const s = graph.serialize({ external: external || padBytes > 0, padding: { name: PAD_NAME, bytes: padBytes, seed: (o.seed + written.length * 0x9e3779b1) >>> 0 } });
    if (s.external.length > 0) {
      await writeExternal(path.join(dir, folder, 'model.onnx_data'), s.external, s.externalBytes);
      written.push(`${folder}/model.onnx_data`);
    }
    await put(`${folder}/model.onnx`, s.model);
    // Where each torch weight lives, for LoRA merges (src/pipeline/lora-map.ts reads it; scripts/export_sd.py writes the
    // same file for real exports); the fp16 variant casts at the graph's edges only, so its weights and their layout are
    // the same.
    if (Object.keys(graph.loraMap).length > 0) {
      await json(`${folder}/${LORA_MAP_FILE}`, { format: LORA_MAP_FORMAT, component: folder, producer: 'diffusers-runtime demo', weights: graph.loraMap });
    }
  };

  await mkdir(dir, { recursive: true });
  const assets = demoAssetsDir();
  const [vocab, merges] = await Promise.all([readFile(path.join(assets, 'vocab.json')), readFile(path.join(assets, 'merges.txt'))]);

  await json('scheduler/scheduler_config.json', spec.scheduler);
  for (const enc of spec.textEncoders) {
    await put(`${enc.tokenizerFolder}/vocab.json`, vocab);
    await put(`${enc.tokenizerFolder}/merges.txt`, merges);
    await json(`${enc.tokenizerFolder}/tokenizer_config.json`, tokenizerConfig(enc));
    await json(`${enc.tokenizerFolder}/special_tokens_map.json`, specialTokensMap(enc));
    await json(`${enc.folder}/config.json`, { ...textEncoderConfig(spec, enc), ...(o.fp16 ? { torch_dtype: 'float16' } : {}) });
    await model(enc.folder, textEncoderGraph(spec, enc, g, padName(pads.textEncoder)), false, pads.textEncoder);
  }
  await json('unet/config.json', unetConfig(spec));
  await model('unet', unetGraph(spec, o.timestep, g, padName(pads.unet)), o.externalData, pads.unet);
  await json('vae_decoder/config.json', vaeConfig(spec));
  await model('vae_decoder', vaeDecoderGraph(spec, g, padName(pads.vaeDecoder)), false, pads.vaeDecoder);
  if (o.withVaeEncoder) {
    await json('vae_encoder/config.json', vaeConfig(spec));
    await model('vae_encoder', vaeEncoderGraph(spec, g));
  }
  for (const [file, bytes] of Object.entries(demoLoras(spec))) await put(`loras/${file}`, bytes);
  // Last, so a folder with model_index.json has everything it names.
  await json('model_index.json', modelIndex(spec));

  const files: DemoFile[] = [];
  for (const rel of written.sort()) files.push({ path: rel, bytes: (await stat(path.join(dir, rel))).size });
  return { dir, family: o.family, options: o, files, totalBytes: files.reduce((a, f) => a + f.bytes, 0) };
}

/** Padding bytes per component (each text encoder gets `textEncoder`); the shares add up to about padBytes. */
function padShares(o: ResolvedDemoOptions, encoders: number): { unet: number; textEncoder: number; vaeDecoder: number } {
  if (o.padSplit === 'unet' || o.padBytes === 0) return { unet: o.padBytes, textEncoder: 0, vaeDecoder: 0 };
  const p = SD15_PARAMS, total = p.unet + p.textEncoders + p.vaeDecoder;
  const share = (x: number) => Math.round((o.padBytes * x) / total);
  return { unet: share(p.unet), textEncoder: Math.round(share(p.textEncoders) / encoders), vaeDecoder: share(p.vaeDecoder) };
}

const tempName = (file: string) => `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;

/** Writes `file` through a temp name in the same folder: fsync'd, renamed when whole, removed on any error. */
async function atomically(file: string, fill: (fh: FileHandle) => Promise<void>): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  const tmp = tempName(file);
  try {
    const fh = await open(tmp, 'w');
    try {
      await fill(fh);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

const writeAtomic = (file: string, data: Uint8Array | string): Promise<void> => atomically(file, (fh) => fh.writeFile(data));

/** Writes the external data file piece by piece (the padding in 1 MiB blocks), never holding it whole. */
async function writeExternal(file: string, chunks: ExternalChunk[], total: number): Promise<void> {
  await atomically(file, async (fh) => {
    for (const c of chunks) {
      if (c.bytes) await fh.write(c.bytes, 0, c.bytes.byteLength, c.offset);
      if (c.padding) {
        const fill = paddingStream(c.padding.seed);
        const block = new Uint8Array(1 << 20);
        for (let done = 0; done < c.padding.bytes; ) {
          const n = Math.min(block.byteLength, c.padding.bytes - done);
          const view = block.subarray(0, n);
          fill(view);
          await fh.write(view, 0, n, c.offset + done);
          done += n;
        }
      }
    }
    // Alignment gaps are holes; make sure the length is exact even if the last piece were empty.
    await fh.truncate(total);
  });
}
