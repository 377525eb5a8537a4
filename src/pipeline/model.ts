/** @module Reads an optimum-layout ONNX diffusers folder: which components exist and how they are configured. */
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { RuntimeError } from '../errors.js';
import { EXPORT_MANIFEST } from './export-info.js';
import { readError } from './failures.js';
import { parsePyJson } from './pyjson.js';
import { loadedSchedulerConfig, pipelineRewrites, type ConfigRewrite } from './schedulers/index.js';

export const COMPONENTS = ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder'] as const;
export type Component = (typeof COMPONENTS)[number];
/**
 * Whether a top-level folder is one of the components the runtime runs. Old diffusers exports also hold
 * `safety_checker/model.onnx` (1.2 GB in float32), others `image_encoder/` or `controlnet/`: never loaded.
 */
export const isComponent = (name: string): name is Component => (COMPONENTS as readonly string[]).includes(name);
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
  /** The scheduler config as the pipeline holds it once built: loaded by its class, then the pipeline's rewrites. */
  schedulerConfig: Record<string, unknown>;
  /** Config values the pipeline rewrote when built (each with diffusers' deprecation message), for the log. */
  rewrites: ConfigRewrite[];
  /** `inChannels`: 4, or 9 for an inpainting UNet (latents, mask, masked-image latents). */
  /**
   * `sizeMultiple`: what image sides must be a multiple of (pixels). An ONNX UNet is traced at its sample size, so its
   * up-blocks double the latents without diffusers' `upsample_size` fallback: every down-sampling must divide evenly.
   */
  unet: { sampleSize: number; timeCondProjDim: number | null; inChannels: number; sizeMultiple: number };
  /**
   * `latentsMean` / `latentsStd` (4 channels each): an SDXL VAE configured with them (Playground v2.5's) takes latents
   * denormalised per channel before decoding, and image-to-image normalises the encoded image with them.
   */
  vae: { scalingFactor: number; scaleFactor: number; latentsMean?: Float32Array; latentsStd?: Float32Array };
}

/**
 * `latents_mean` and `latents_std` of an SDXL VAE config, as float32 (`torch.tensor(list)`): both or neither apply,
 * as in diffusers (one alone is ignored). Four finite values each, the std ones non-zero, else the file is wrong.
 */
function latentsStats(vaeCfg: Record<string, unknown>): { latentsMean: Float32Array; latentsStd: Float32Array } | undefined {
  const { latents_mean: mean, latents_std: std } = vaeCfg;
  if (mean === undefined || mean === null || std === undefined || std === null) return undefined;
  const read = (v: unknown, key: string, nonZero: boolean): Float32Array => {
    if (!Array.isArray(v) || v.length !== 4 || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && (!nonZero || x !== 0))) {
      throw new RuntimeError('MODEL_FORMAT', `vae_decoder/config.json: ${key} must be 4 finite numbers${nonZero ? ', none zero' : ''} (one per latent channel), got ${JSON.stringify(v)}`);
    }
    return Float32Array.from(v as number[]);
  };
  return { latentsMean: read(mean, 'latents_mean', false), latentsStd: read(std, 'latents_std', true) };
}

/** A JSON file of the model folder `dir`, named in errors by its path inside the model (never the folder's own name). */
const readJson = (dir: string, rel: string): Record<string, unknown> => {
  const file = path.join(dir, rel);
  try {
    // diffusers writes its configs with Python's json (NaN, Infinity, -Infinity allowed).
    const v: unknown = parsePyJson(readFileSync(file, 'utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw readError(rel, err, { missingIsFormat: true }) ?? new RuntimeError('MODEL_FORMAT', `${rel} is not valid JSON: ${(err as Error).message}`);
  }
};
const optJson = (dir: string, rel: string) => (existsSync(path.join(dir, rel)) ? readJson(dir, rel) : {});
const num = (v: unknown, d: number) => (typeof v === 'number' && Number.isFinite(v) ? v : d);

/** model_index.json names an LCM pipeline (LatentConsistencyModelPipeline): AutoPipelineFor* pick the LCM classes. */
export const isLcmPipeline = (pipelineClass: string): boolean => pipelineClass.includes('LatentConsistency');

/** The Stable Diffusion pipelines rewrite configs in __init__; SDXL's and LCM's do not (see docs/PARITY.md). */
export const pipelineRewritesConfigs = (pipelineClass: string, isXL: boolean): boolean => !isXL && !isLcmPipeline(pipelineClass);

/** A model's scheduler_config.json as the built pipeline holds it: loaded by its class, then rewritten if `rewriting`. */
export function pipelineSchedulerConfig(file: Record<string, unknown>, rewriting: boolean): { config: Record<string, unknown>; rewrites: ConfigRewrite[] } {
  const loaded = loadedSchedulerConfig(file);
  return rewriting ? pipelineRewrites(loaded) : { config: loaded, rewrites: [] };
}

/**
 * The scheduler class diffusers builds: the one model_index.json lists under "scheduler" (`DiffusionPipeline` and
 * optimum's ORT pipelines load that class, then read scheduler_config.json into it), else the config's own
 * `_class_name`. Where the two differ, the listed class is used and the difference is returned for the log.
 */
export function listedSchedulerClass(index: Record<string, unknown>, file: Record<string, unknown>): { file: Record<string, unknown>; rewrite?: ConfigRewrite } {
  const entry = index.scheduler;
  const listed = Array.isArray(entry) && typeof entry[1] === 'string' ? entry[1] : undefined;
  if (listed === undefined || listed === file._class_name) return { file };
  return {
    file: { ...file, _class_name: listed },
    rewrite: {
      key: '_class_name',
      from: file._class_name,
      to: listed,
      message:
        `model_index.json lists the scheduler as ${listed} while scheduler/scheduler_config.json says _class_name ${JSON.stringify(file._class_name)}; ` +
        `diffusers builds the class model_index.json lists, and so does this runtime (set both to change the scheduler)`,
    },
  };
}

/**
 * The latent size the pipeline serves and the VAE's scale, from the UNet's and the VAE decoder's configs: the UNet's
 * sample_size (default 128 for SDXL, else 64), raised to 64 where a config saved before diffusers 0.9 says less and
 * the pipeline rewrites configs (`raisedFrom`: what the config said).
 */
export function servedGeometry(
  unetCfg: Record<string, unknown>,
  vaeCfg: Record<string, unknown>,
  isXL: boolean,
  rewriting: boolean,
): { sampleSize: number; raisedFrom?: number; vaeScale: number } {
  const configured = num(unetCfg.sample_size, isXL ? 128 : 64);
  const vaeScale = downscale(vaeCfg);
  const raise = rewriting && unetBefore090(unetCfg) && Number.isInteger(unetCfg.sample_size) && configured < 64;
  return raise ? { sampleSize: 64, raisedFrom: configured, vaeScale } : { sampleSize: configured, vaeScale };
}

/** How much a VAE or UNet config's blocks shrink an image: one halving per block but the last (4 blocks when unsaid). */
const downscale = (cfg: Record<string, unknown>): number =>
  2 ** Math.max(0, (Array.isArray(cfg.block_out_channels) ? cfg.block_out_channels.length : 4) - 1);

/** Whether a unet config was saved by diffusers before 0.9.0 (its `_diffusers_version`, pre-release tags ignored). */
function unetBefore090(cfg: Record<string, unknown>): boolean {
  const m = typeof cfg._diffusers_version === 'string' ? /^v?(\d+)(?:\.(\d+))?/.exec(cfg._diffusers_version) : null;
  if (!m) return false;
  return Number(m[1]) === 0 && Number(m[2] ?? 0) < 9;
}

/**
 * The model.onnx of a component folder, or undefined when the folder or file is absent. `listed`: the folder's
 * relative file paths as the store listed them, for a folder whose weights are still arriving.
 */
export function componentOnnx(dir: string, c: Component, listed?: ReadonlySet<string>): string | undefined {
  const p = path.join(dir, c, 'model.onnx');
  return (listed ? listed.has(`${c}/model.onnx`) : existsSync(p)) ? p : undefined;
}

/** The `tokenizers` library's file, which transformers 5 saves in place of vocab.json and merges.txt. */
export const TOKENIZER_JSON = 'tokenizer.json';

/** A tokenizer folder of a diffusers export: `tokenizer`, or `tokenizer_2` and so on for a second text encoder. */
export const isTokenizerFolder = (name: string): boolean => /^tokenizer(_\d+)?$/.test(name);

/** Weights of other frameworks beside the ONNX ones: PyTorch, Flax, TensorFlow, OpenVINO, single-file checkpoints. */
const OTHER_WEIGHTS = /\.(?:safetensors|msgpack|h5|ckpt|pt|pth|xml)$|^(?:diffusion_pytorch_model|pytorch_model|openvino_model)\b.*\.bin$/;

/**
 * The files of an ONNX export's listing that the runtime never reads, so not worth downloading: weights of other
 * frameworks (a Hugging Face repository such as stabilityai/stable-diffusion-xl-base-1.0 holds the PyTorch, Flax and
 * OpenVINO weights of each component beside the ONNX ones, and single-file checkpoints at its root: several times the
 * ONNX export's size), folders of no component (`vae/`, `safety_checker/`, `.git/`), and files at the root but model_index.json and
 * onnx_export.json. The model's own LoRA adapters (`loras/`) and everything in the components', scheduler and tokenizer
 * folders but those weights stay. A listing with no UNet graph is left whole, so what it is can still be told (a
 * PyTorch folder, a diffusion transformer) from what was downloaded.
 */
export function unusedFiles(rels: readonly string[]): ReadonlySet<string> {
  if (!rels.includes('unet/model.onnx')) return new Set();
  return new Set(
    rels.filter((rel) => {
      const [top = '', ...rest] = rel.split('/');
      if (rest.length === 0) return top !== 'model_index.json' && top !== EXPORT_MANIFEST;
      if (top === 'loras' || top === 'scheduler' || isTokenizerFolder(top)) return false;
      return !isComponent(top) || OTHER_WEIGHTS.test(rest[rest.length - 1]!);
    }),
  );
}

/**
 * The files readLayout reads (model_index.json, scheduler and tokenizer folders, each component's config.json):
 * once these are whole, the layout of a folder whose weights still download can be read (readLayout's `listed`).
 */
export function isLayoutFile(rel: string): boolean {
  const [top = '', ...rest] = rel.split('/');
  if (rest.length === 0) return top === 'model_index.json' || top === EXPORT_MANIFEST;
  if (top === 'scheduler' || isTokenizerFolder(top)) return true;
  return isComponent(top) && rest.join('/') === 'config.json';
}

/** `listed`: every relative file path of the model as listed, when its weights are not all whole yet (see isLayoutFile). */
export function readLayout(dir: string, listed?: ReadonlySet<string>): ModelLayout {
  if (!existsSync(dir)) throw new RuntimeError('STORAGE_MISSING', 'the model folder does not exist');
  const onnx: Partial<Record<Component, string>> = {};
  for (const c of COMPONENTS) {
    const p = componentOnnx(dir, c, listed);
    if (p) onnx[c] = p;
  }
  const missing = REQUIRED.filter((c) => !onnx[c]);
  if (missing.length > 0) {
    // A component folder this uid may not search hides its graph: that is a permission, not a missing file; one the
    // volume fails to look into (EIO) is the volume's error (CACHE_IO, tried again), not the export's either.
    for (const c of missing) {
      try {
        statSync(path.join(dir, c, 'model.onnx'));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (typeof code === 'string' && code !== 'ENOENT' && code !== 'ENOTDIR') throw readError(`${c}/model.onnx`, err) ?? err;
      }
    }
    const torchWeights = ['unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_pytorch_model.bin', 'unet/diffusion_pytorch_model.fp16.safetensors'];
    if (torchWeights.some((f) => existsSync(path.join(dir, f)))) {
      throw new RuntimeError(
        'MODEL_FORMAT',
        'this is a PyTorch diffusers folder, not an ONNX export; export it with `scripts/export-onnx.sh <folder or id> out/` ' +
          '(fused float16 for CUDA; add --plain for the CPU provider) and point STORAGE_URI at the export',
      );
    }
    // SD3, Flux and PixArt denoise with a transformer (optimum exports it as transformer/model.onnx), not a UNet.
    if (!onnx.unet && (listed ? [...listed].some((f) => f.startsWith('transformer/')) : existsSync(path.join(dir, 'transformer')))) {
      const cls = optJson(dir, 'model_index.json')._class_name;
      throw new RuntimeError(
        'UNSUPPORTED',
        `this export denoises with transformer/${typeof cls === 'string' ? ` (model_index.json: ${cls})` : ''}, a diffusion transformer (SD3, Flux, PixArt), ` +
          'which this runtime does not serve; it serves UNet pipelines (unet/: SD 1.x, 2.x, SDXL, LCM, Turbo)',
      );
    }
    if (!onnx.text_encoder && onnx.text_encoder_2 && onnx.unet) {
      throw new RuntimeError(
        'UNSUPPORTED',
        'this export has text_encoder_2 but no text_encoder: an SDXL refiner (image-to-image with the second encoder alone), which ' +
          'this runtime does not serve; it serves pipelines with text_encoder/ (SD 1.x, 2.x, SDXL base, LCM, Turbo)',
      );
    }
    // The cache's own dot-files (its manifest, its journal) are not the user's upload.
    const names = existsSync(dir) ? readdirSync(dir).filter((f) => !f.startsWith('.')) : [];
    // An export one folder down (a repository's onnx/ folder synced whole): name it rather than what is missing.
    const nested = listed
      ? [...listed].map((f) => /^([^/]+)\/unet\/model\.onnx$/.exec(f)?.[1]).find((f) => f !== undefined && !f.startsWith('.'))
      : names.find((f) => existsSync(path.join(dir, f, 'unet', 'model.onnx')));
    // A storageUri's model is at /mnt/models, where STORAGE_URI points: the user's setting is then the storageUri.
    const hint = nested === undefined ? '' : `; the export seems to be in ${nested}/: add ${nested}/ to STORAGE_URI (to the InferenceService's storageUri where KServe downloads the model)`;
    throw new RuntimeError('MODEL_FORMAT', `not an ONNX diffusers export: missing ${missing.map((c) => `${c}/model.onnx`).join(', ')} (found: ${names.slice(0, 20).join(', ') || 'nothing'})${hint}`);
  }
  const index = optJson(dir, 'model_index.json');
  const pipelineClass = typeof index._class_name === 'string' ? index._class_name : 'StableDiffusionPipeline';
  const schedulerFile = path.join(dir, 'scheduler', 'scheduler_config.json');
  if (!existsSync(schedulerFile)) throw new RuntimeError('MODEL_FORMAT', 'not an ONNX diffusers export: missing scheduler/scheduler_config.json');
  const tokenizerDirs: string[] = [];
  for (const t of ['tokenizer', 'tokenizer_2']) {
    const absent = ['vocab.json', 'merges.txt'].filter((f) => !existsSync(path.join(dir, t, f)));
    // transformers 5 saves tokenizer.json alone (see ClipTokenizer.load).
    if (absent.length === 0 || existsSync(path.join(dir, t, TOKENIZER_JSON))) tokenizerDirs.push(path.join(dir, t));
    // Half a tokenizer is an upload that missed a file: named now, before any session is built.
    else if (absent.length === 1) throw new RuntimeError('MODEL_FORMAT', `not an ONNX diffusers export: missing ${t}/${absent[0]}`);
  }
  // Each pipeline reads its tokenizers by folder name: tokenizer_2 alone is no tokenizer/.
  const noTokenizer = (t: string, what: string) =>
    new RuntimeError('MODEL_FORMAT', `${what}: missing ${t}/vocab.json and merges.txt (or ${t}/${TOKENIZER_JSON})`);
  if (tokenizerDirs[0] !== path.join(dir, 'tokenizer')) throw noTokenizer('tokenizer', 'not an ONNX diffusers export');
  const unetCfg = optJson(dir, 'unet/config.json');
  const vaeCfg = optJson(dir, 'vae_decoder/config.json');
  const inChannels = num(unetCfg.in_channels, 4);
  if (inChannels !== 4 && inChannels !== 9) {
    // Other UNets condition on inputs these pipelines do not make (InstructPix2Pix's image latents: 8 channels,
    // depth-to-image: 5, the x4 upscaler: 7): refused at load rather than failing every request.
    throw new RuntimeError(
      'UNSUPPORTED',
      `unet/config.json: in_channels ${inChannels}${typeof index._class_name === 'string' ? ` (model_index.json: ${pipelineClass})` : ''} is not a UNet this runtime serves; it serves ` +
        '4 input channels (text-to-image, image-to-image) and 9 (inpainting), as the Stable Diffusion, SDXL, LCM and Turbo pipelines have',
    );
  }
  const isXL = Boolean(onnx.text_encoder_2) || unetCfg.addition_embed_type === 'text_time' || pipelineClass.includes('XL');
  if (isXL && !onnx.text_encoder_2) throw new RuntimeError('MODEL_FORMAT', 'an SDXL export needs text_encoder_2/model.onnx');
  if (isXL && tokenizerDirs.length < 2) throw noTokenizer('tokenizer_2', 'an SDXL export needs tokenizer_2/');
  // SDXL pipelines denormalise latents with these before decoding (Playground v2.5's VAE has them); SD 1.x/2.x ignore them.
  const latentStats = isXL ? latentsStats(vaeCfg) : undefined;
  const rewriting = pipelineRewritesConfigs(pipelineClass, isXL);
  const { file: schedulerJson, rewrite: classRewrite } = listedSchedulerClass(index, readJson(dir, 'scheduler/scheduler_config.json'));
  const { config: schedulerConfig, rewrites } = pipelineSchedulerConfig(schedulerJson, rewriting);
  if (classRewrite) rewrites.unshift(classRewrite);
  const { sampleSize, raisedFrom, vaeScale } = servedGeometry(unetCfg, vaeCfg, isXL, rewriting);
  if (raisedFrom !== undefined) {
    rewrites.push({
      key: 'unet.sample_size',
      from: raisedFrom,
      to: 64,
      message:
        'The configuration file of the unet has set the default `sample_size` to smaller than 64 which seems highly unlikely. If your ' +
        'checkpoint is a fine-tuned version of any of the following: \n- CompVis/stable-diffusion-v1-4 \n- CompVis/stable-diffusion-v1-3 ' +
        '\n- CompVis/stable-diffusion-v1-2 \n- CompVis/stable-diffusion-v1-1 \n- stable-diffusion-v1-5/stable-diffusion-v1-5 \n- ' +
        "stable-diffusion-v1-5/stable-diffusion-inpainting \n you should change 'sample_size' to 64 in the configuration file. Please make " +
        'sure to update the config accordingly as leaving `sample_size=32` in the config might lead to incorrect results in future ' +
        'versions. If you have downloaded this checkpoint from the Hugging Face Hub, it would be very nice if you could open a Pull ' +
        'request for the `unet/config.json` file',
    });
  }
  return {
    dir,
    pipelineClass,
    isXL,
    // StableDiffusionXLPipeline's __init__ defaults it to True (optimum's ORT pipeline too): a model_index.json
    // without the key zeroes the negative embeddings; one that says null or false does not.
    forceZerosForEmptyPrompt: Object.hasOwn(index, 'force_zeros_for_empty_prompt') ? Boolean(index.force_zeros_for_empty_prompt) : isXL,
    requiresAestheticsScore: index.requires_aesthetics_score === true,
    onnx,
    tokenizerDirs,
    schedulerConfig,
    rewrites,
    unet: {
      sampleSize,
      timeCondProjDim: typeof unetCfg.time_cond_proj_dim === 'number' ? unetCfg.time_cond_proj_dim : null,
      inChannels,
      // diffusers' default_overall_up_factor (2 ** num_upsamplers: one per block but the last), in pixels.
      sizeMultiple: vaeScale * downscale(unetCfg),
    },
    vae: { scalingFactor: num(vaeCfg.scaling_factor, isXL ? 0.13025 : 0.18215), scaleFactor: vaeScale, ...latentStats },
  };
}
