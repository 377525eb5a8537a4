/**
 * @module The generation contract: what a pipeline reports about its model (ModelDefaults), what one generation asks
 * for (Job: its shape, its items, image inputs, LoRA adapters) and what it gives back (GeneratedImage, StageTimes).
 * The request parser (runtime/request.ts) produces these types and the pipeline consumes them; types only, and one
 * rule both sides apply (unconditionalPass), so either side imports it without the other.
 */
import type { Raster } from './resample.js';

export type { Raster } from './resample.js';

/** The num_inference_steps a scheduler accepts with this model's config; `why` names the limit that binds. */
export interface StepRange {
  min: number;
  max: number;
  why: string;
}

/**
 * Model-dependent defaults, reported by the pipeline once the model is loaded. `steps` and `guidance` are those of
 * diffusers' text-to-image pipeline class for the model, `modes` those of its image-to-image and inpainting classes.
 */
export interface ModelDefaults {
  steps: number;
  guidance: number;
  /** Per image mode, the guidance_scale and strength of a request that leaves them out (its steps: `steps`). */
  modes: Readonly<Record<ImageMode, ModeDefaults>>;
  height: number;
  width: number;
  /** The model's own scheduler class (scheduler/scheduler_config.json). */
  scheduler: string;
  /** The UNet embeds the guidance scale (an LCM-distilled one's timestep_cond input): see unconditionalPass. */
  guidanceEmbedding?: boolean;
  /**
   * A missing negative prompt's embeddings are zeros, not those of '' (SDXL's force_zeros_for_empty_prompt): there a
   * missing and an empty negative prompt give different images.
   */
  zerosForMissingNegative?: boolean;
  /** The model has a vae_encoder: it takes input images (img2img, inpainting). */
  vaeEncoder?: boolean;
  /** The UNet is an inpainting one (9 input channels): every request needs an image and a mask. */
  inpainting?: boolean;
  /** Image sides must be a multiple of this (8 × the UNet's down-sampling; 64 for SD 1.x/2.x, 32 for SDXL). */
  sizeMultiple?: number;
  /**
   * Step limits by request scheduler name ('' for the model's own scheduler), so a request outside them is refused
   * when it is parsed rather than by the worker after it waited in the queue. A name absent here is not checked early.
   */
  stepRanges?: Readonly<Record<string, StepRange>>;
  /**
   * Request names this model's scheduler config cannot serve (absent from stepRanges), with the worker's error: the
   * request's own mistakes (INVALID_INPUT: an EDM name on another model, or the reverse) are refused when parsed.
   */
  schedulerRefusals?: Readonly<Record<string, { readonly code: string; readonly message: string }>>;
  /**
   * On an LCM model (LatentConsistencyModelPipeline), the request scheduler names ('' for the model's own) that run
   * LCMScheduler, with its original_inference_steps: LatentConsistencyModelImg2ImgPipeline hands strength to its
   * set_timesteps, so image-to-image takes all num_inference_steps from the first int(original · strength) distillation
   * timesteps and needs at least num_inference_steps of them.
   */
  strengthSchedules?: Readonly<Record<string, number>>;
}

/** What a request of one image mode gets for the fields it leaves out. */
export interface ModeDefaults {
  guidance: number;
  strength: number;
}

/** The shape of a generation: requests share a batch where runtime/request.ts shapeKey says they can. */
export interface GenerationShape {
  steps: number;
  guidance: number;
  height: number;
  width: number;
  /** A request scheduler name (see pipeline/schedulers); absent: the model's own scheduler. */
  scheduler: string | undefined;
  eta: number;
  guidanceRescale: number;
}

/** One prompt of a generation, with the number of images it makes. */
export interface JobItem {
  prompt: string;
  negativePrompt: string | undefined;
  /** First image's seed; image i uses seed + i (one generator per image). */
  seed: number;
  numImages: number;
  /** This item's guidance scale, where a batch mixes requests of several (the engine sets each); else the shape's. */
  guidance?: number;
  /** This item's guidance_rescale, where a batch mixes requests of several (the engine sets each); else the shape's. */
  guidanceRescale?: number;
}

/**
 * Whether a generation runs an unconditional UNet pass beside the text one (classifier-free guidance): for guidance
 * above 1, unless the UNet embeds the guidance scale instead (LCM-distilled). The pipeline runs by it and the engine
 * batches by it, so images with and without that pass never share a UNet batch.
 */
export const unconditionalPass = (guidance: number, guidanceEmbedding: boolean): boolean => guidance > 1 && !guidanceEmbedding;

/**
 * Python's int(original_inference_steps · strength), in double precision as there: how many of the distillation's
 * timesteps LCMScheduler.set_timesteps picks an LCM model's image-to-image steps from (LatentConsistencyModelImg2ImgPipeline).
 */
export const lcmTimestepCount = (original: number, strength: number): number => Math.trunc(original * strength);

/**
 * The smallest strength, in hundredths, whose int(original · strength) reaches `steps`: what an LCM model's
 * image-to-image (LatentConsistencyModelImg2ImgPipeline) needs, said in its 400 so that the value sent back works.
 */
export function lcmMinStrength(original: number, steps: number): number {
  // Tried in turn, not rounded up from steps / original: 7/50 · 100 is 14.000000000000002 in floating point, which
  // rounds up to 0.15, though int(50 · 0.14) = 7 already.
  for (let h = 1; h < 100; h++) if (lcmTimestepCount(original, h / 100) >= steps) return h / 100;
  return 1;
}

/**
 * How an input is fitted to the output size (VaeImageProcessor `resize_mode`): `default` stretches it (diffusers'
 * img2img and inpaint pipelines), `crop` keeps the aspect ratio and crops the overflow around the centre, `fill` keeps
 * the aspect ratio and fills the margins by stretching the image's edge rows or columns.
 */
export type ResizeMode = 'default' | 'crop' | 'fill';
export const RESIZE_MODES: readonly ResizeMode[] = ['default', 'crop', 'fill'];

export type ImageMode = 'img2img' | 'inpaint';

/** The image inputs of a generation job, as decoded pixels (RGB, the source's own size). */
export interface ImageInit {
  mode: ImageMode;
  strength: number;
  resizeMode: ResizeMode;
  image: Raster;
  /** Inpainting: white = repaint, black = keep (same size as `image`). */
  mask?: Raster;
}

/** One LoRA adapter of a set: its name, its local file, and the request's scale. */
export interface AdapterRef {
  name: string;
  file: string;
  scale: number;
}

/** The adapter set a job runs with: its key (names and scales) and its adapters. */
export interface AdapterSet {
  key: string;
  refs: AdapterRef[];
}

export interface Job {
  shape: GenerationShape;
  items: JobItem[];
  /**
   * Token ids of every prompt and negative text of the job (a missing negative as ''), one id list per tokenizer of
   * the model (tokenizer, tokenizer_2), as the engine encoded them on the main thread. Absent: the pipeline encodes
   * with tokenizers of its own (Pipeline.create without 'external').
   */
  tokens?: Array<[string, number[][]]>;
  /** Image-to-image or inpainting inputs, shared by every item of the job (requests with other inputs never batch). */
  init?: ImageInit;
  /**
   * Run a UNet batch of one row as two (the row twice, the copy's output dropped). ONNX Runtime's CPU matrix products
   * take a kernel of their own for one row, which rounds otherwise than for two or more: a lone image without an
   * unconditional pass would differ from the same request in a batch. The engine asks for it where batches form on
   * the CPU.
   */
  padLoneRow?: boolean;
}

/** One image the pipeline made: RGB uint8, row-major HWC, and the seed it came from. */
export interface GeneratedImage {
  rgb: Uint8Array;
  width: number;
  height: number;
  seed: number;
}

/** Where a generation's time went. */
export interface StageTimes {
  textEncoderMs: number;
  denoiseMs: number;
  vaeMs: number;
  /** Resizing the input image (and mask) and running the VAE encoder on it: image-to-image and inpainting only. */
  vaeEncoderMs?: number;
  steps: number;
  /** Time spent waiting for sessions still being created (only a warm-up that starts during the download). */
  sessionWaitMs?: number;
}
