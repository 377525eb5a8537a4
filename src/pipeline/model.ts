/** @module Reads an optimum-layout ONNX diffusers folder: which components exist and how they are configured. */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { RuntimeError } from '../errors.js';
import { EXPORT_MANIFEST } from './export-info.js';

export const COMPONENTS = ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder'] as const;
export type Component = (typeof COMPONENTS)[number];
/** The components a text-to-image generation needs (text_encoder_2 only for SDXL). */
export const REQUIRED: readonly Component[] = ['text_encoder', 'unet', 'vae_decoder'];

export interface ModelLayout {
  dir: string;
  pipelineClass: string;
  isXL: boolean;
  forceZerosForEmptyPrompt: boolean;
  requiresAestheticsScore: boolean;
  /** component → path of its model.onnx, for the components present. */
  onnx: Partial<Record<Component, string>>;
  tokenizerDirs: string[];
  schedulerConfig: Record<string, unknown>;
  unet: { sampleSize: number; timeCondProjDim: number | null };
  vae: { scalingFactor: number; scaleFactor: number };
}

const readJson = (file: string, what: string): Record<string, unknown> => {
  try {
    const v: unknown = JSON.parse(readFileSync(file, 'utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw new RuntimeError('MODEL_FORMAT', `${what} (${path.basename(path.dirname(file))}/${path.basename(file)}) is not valid JSON: ${(err as Error).message}`);
  }
};
const optJson = (file: string, what: string) => (existsSync(file) ? readJson(file, what) : {});
const num = (v: unknown, d: number) => (typeof v === 'number' && Number.isFinite(v) ? v : d);

/**
 * The model.onnx of a component folder, or undefined when the folder or file is absent. `listed`: the folder's
 * relative file paths as the store listed them, for a folder whose weights are still arriving.
 */
export function componentOnnx(dir: string, c: Component, listed?: ReadonlySet<string>): string | undefined {
  const p = path.join(dir, c, 'model.onnx');
  return (listed ? listed.has(`${c}/model.onnx`) : existsSync(p)) ? p : undefined;
}

/** A tokenizer folder of a diffusers export: `tokenizer`, or `tokenizer_2` and so on for a second text encoder. */
export const isTokenizerFolder = (name: string): boolean => /^tokenizer(_\d+)?$/.test(name);

/**
 * The files readLayout reads (model_index.json, scheduler and tokenizer folders, each component's config.json):
 * once these are whole, the layout of a folder whose weights still download can be read (readLayout's `listed`).
 */
export function isLayoutFile(rel: string): boolean {
  const [top = '', ...rest] = rel.split('/');
  if (rest.length === 0) return top === 'model_index.json' || top === EXPORT_MANIFEST;
  if (top === 'scheduler' || isTokenizerFolder(top)) return true;
  return (COMPONENTS as readonly string[]).includes(top) && rest.join('/') === 'config.json';
}

/** `listed`: every relative file path of the model as listed, when its weights are not all whole yet (see isLayoutFile). */
export function readLayout(dir: string, listed?: ReadonlySet<string>): ModelLayout {
  if (!existsSync(dir)) throw new RuntimeError('STORAGE_MISSING', `model directory ${dir} does not exist`);
  const onnx: Partial<Record<Component, string>> = {};
  for (const c of COMPONENTS) {
    const p = componentOnnx(dir, c, listed);
    if (p) onnx[c] = p;
  }
  const missing = REQUIRED.filter((c) => !onnx[c]);
  if (missing.length > 0) {
    const torchWeights = ['unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_pytorch_model.bin', 'unet/diffusion_pytorch_model.fp16.safetensors'];
    if (torchWeights.some((f) => existsSync(path.join(dir, f)))) {
      throw new RuntimeError(
        'MODEL_FORMAT',
        'this is a PyTorch diffusers folder, not an ONNX export; export it with `optimum-cli export onnx --model <id> out/` ' +
          '(scripts/export-onnx.sh does this and uploads the result) and point STORAGE_URI at the export',
      );
    }
    const present = existsSync(dir) ? readdirSync(dir).slice(0, 20).join(', ') : '';
    throw new RuntimeError('MODEL_FORMAT', `not an ONNX diffusers export: missing ${missing.map((c) => `${c}/model.onnx`).join(', ')} (found: ${present || 'nothing'})`);
  }
  const index = optJson(path.join(dir, 'model_index.json'), 'model_index.json');
  const pipelineClass = typeof index._class_name === 'string' ? index._class_name : 'StableDiffusionPipeline';
  const schedulerFile = path.join(dir, 'scheduler', 'scheduler_config.json');
  if (!existsSync(schedulerFile)) throw new RuntimeError('MODEL_FORMAT', 'not an ONNX diffusers export: missing scheduler/scheduler_config.json');
  const tokenizerDirs = ['tokenizer', 'tokenizer_2'].map((t) => path.join(dir, t)).filter((t) => existsSync(path.join(t, 'vocab.json')));
  if (tokenizerDirs.length === 0) throw new RuntimeError('MODEL_FORMAT', 'not an ONNX diffusers export: missing tokenizer/vocab.json and merges.txt');
  const unetCfg = optJson(path.join(dir, 'unet', 'config.json'), 'unet config');
  const vaeCfg = optJson(path.join(dir, 'vae_decoder', 'config.json'), 'vae_decoder config');
  const isXL = Boolean(onnx.text_encoder_2) || unetCfg.addition_embed_type === 'text_time' || pipelineClass.includes('XL');
  if (isXL && !onnx.text_encoder_2) throw new RuntimeError('MODEL_FORMAT', 'an SDXL export needs text_encoder_2/model.onnx');
  if (isXL && tokenizerDirs.length < 2) throw new RuntimeError('MODEL_FORMAT', 'an SDXL export needs tokenizer_2/');
  const blocks = Array.isArray(vaeCfg.block_out_channels) ? vaeCfg.block_out_channels.length : 4;
  return {
    dir,
    pipelineClass,
    isXL,
    forceZerosForEmptyPrompt: index.force_zeros_for_empty_prompt === true,
    requiresAestheticsScore: index.requires_aesthetics_score === true,
    onnx,
    tokenizerDirs,
    schedulerConfig: readJson(schedulerFile, 'scheduler config'),
    unet: {
      sampleSize: num(unetCfg.sample_size, isXL ? 128 : 64),
      timeCondProjDim: typeof unetCfg.time_cond_proj_dim === 'number' ? unetCfg.time_cond_proj_dim : null,
    },
    vae: { scalingFactor: num(vaeCfg.scaling_factor, isXL ? 0.13025 : 0.18215), scaleFactor: 2 ** Math.max(0, blocks - 1) },
  };
}
