/**
 * @module Image-to-image and inpainting inputs, as diffusers prepares them (StableDiffusionImg2ImgPipeline,
 * StableDiffusionInpaintPipeline, VaeImageProcessor): resizing (Pillow's, see resample.ts), normalisation, mask
 * binarisation, the schedule cut by strength, and the VAE posterior sampled with the request's generator.
 */
import type { ResizeMode } from './job.js';
import { blank, paste, resize, toLuma, type Raster } from './resample.js';

const f = Math.fround;

/** Python's floor division. */
const floorDiv = (a: number, b: number) => Math.floor(a / b);

/**
 * The size VaeImageProcessor.resize scales a `imgW` × `imgH` image to in `mode`, before `crop` crops it to width × height
 * (it covers it) or `fill` centres it and fills the margins (it fits inside): Python's floor division, as diffusers
 * computes it. A side of 0 (`fill` of an image more elongated than the output's side in pixels) is what Pillow refuses.
 */
export function scaledSize(imgW: number, imgH: number, width: number, height: number, mode: ResizeMode): { width: number; height: number } {
  if (mode === 'default') return { width, height };
  const ratio = width / height;
  const srcRatio = imgW / imgH;
  if (mode === 'crop') {
    return { width: ratio > srcRatio ? width : floorDiv(imgW * height, imgH), height: ratio <= srcRatio ? height : floorDiv(imgH * width, imgW) };
  }
  return { width: ratio < srcRatio ? width : floorDiv(imgW * height, imgH), height: ratio >= srcRatio ? height : floorDiv(imgH * width, imgW) };
}

/** VaeImageProcessor.resize for a PIL image: to width × height in the given mode (Lanczos; bicubic fill bands). */
export function fitImage(img: Raster, width: number, height: number, mode: ResizeMode): Raster {
  if (mode === 'default') return resize(img, width, height, 'lanczos');
  const { width: srcW, height: srcH } = scaledSize(img.width, img.height, width, height, mode);
  if (srcW < 1 || srcH < 1) throw new RangeError(`resize_mode ${mode} scales a ${img.width}x${img.height} image to ${srcW}x${srcH}`);
  if (mode === 'crop') {
    // The scaled image covers width × height and is pasted centred, so only its middle is kept: only that is computed
    // (the same pixels). Scaling all of an elongated image took its length times the output's other side (4096x4 to
    // 1024x1024: a 1048576x1024 image, 3 GB).
    return resize(img, srcW, srcH, 'lanczos', undefined, { x: floorDiv(srcW, 2) - floorDiv(width, 2), y: floorDiv(srcH, 2) - floorDiv(height, 2), width, height });
  }
  const ratio = width / height;
  const srcRatio = img.width / img.height;
  const resized = resize(img, srcW, srcH, 'lanczos');
  const out = blank(width, height, img.channels);
  paste(out, resized, floorDiv(width, 2) - floorDiv(srcW, 2), floorDiv(height, 2) - floorDiv(srcH, 2));
  // The margins stretch the first and last rows (or columns) of the resized image; Image.resize's default filter is
  // bicubic there, with zero-height (zero-width) boxes, as diffusers' _resize_and_fill calls it.
  if (ratio < srcRatio) {
    const fillH = floorDiv(height, 2) - floorDiv(srcH, 2);
    if (fillH > 0) {
      paste(out, resize(resized, width, fillH, 'bicubic', [0, 0, width, 0]), 0, 0);
      paste(out, resize(resized, width, fillH, 'bicubic', [0, resized.height, width, resized.height]), 0, fillH + srcH);
    }
  } else if (ratio > srcRatio) {
    const fillW = floorDiv(width, 2) - floorDiv(srcW, 2);
    if (fillW > 0) {
      paste(out, resize(resized, fillW, height, 'bicubic', [0, 0, 0, height]), 0, 0);
      paste(out, resize(resized, fillW, height, 'bicubic', [resized.width, 0, resized.width, height]), fillW + srcW, 0);
    }
  }
  return out;
}

/** float32(v / 255) for every byte value (numpy's float32 division). */
const UNIT = Float32Array.from({ length: 256 }, (_, v) => v / 255);

/** RGB pixels → [3, H, W] float32 in [-1, 1]: pil_to_numpy (v / 255), then normalize (2x − 1), channels first. */
export function imageTensor(img: Raster): Float32Array {
  if (img.channels !== 3) throw new Error('imageTensor needs RGB pixels');
  const plane = img.width * img.height;
  const out = new Float32Array(3 * plane);
  for (let p = 0; p < plane; p++) for (let c = 0; c < 3; c++) out[c * plane + p] = f(2 * UNIT[img.data[p * 3 + c]!]! - 1);
  return out;
}

/** RGB (or L) mask → [H, W] of 0 and 1: convert("L"), v / 255, then binarize (>= 0.5 is 1), as the mask processor does. */
export function maskTensor(mask: Raster): Float32Array {
  const l = toLuma(mask);
  const out = new Float32Array(l.width * l.height);
  for (let i = 0; i < out.length; i++) out[i] = UNIT[l.data[i]!]! >= 0.5 ? 1 : 0;
  return out;
}

/**
 * diffusers' get_timesteps: `init_timestep = min(int(steps · strength), steps)`, the schedule starts at index
 * `t_start · order` with `t_start = steps − init_timestep` (order 2 for Heun, DPM2 and DPM2 a, whose schedules run
 * each step but the first twice). `total` is the schedule's length (PNDM's is one longer: its first timestep repeats).
 * With no step left (strength 0, or steps · strength < 1) nothing is denoised: the image is encoded and decoded
 * (diffusers would noise at a timestep that is not there).
 */
export function cutSchedule(total: number, steps: number, strength: number, order = 1): { begin: number; steps: number } {
  const init = Math.min(Math.trunc(steps * strength), steps);
  const begin = Math.min(Math.max(steps - init, 0) * order, total);
  return { begin, steps: init === 0 ? 0 : total - begin };
}

/** The VAE encoder's output for one image: the posterior's mean and std ([4, h, w] each), or a sample already drawn. */
export interface Posterior {
  mean: Float32Array;
  /** Absent for exports whose encoder outputs a sampled latent (4 channels, older exporters): nothing to draw then. */
  std?: Float32Array;
}

/** Splits `latent_parameters` [1, 8, h, w] into mean and std (DiagonalGaussianDistribution: logvar clamped to [−30, 20]). */
export function posterior(params: Float32Array, per: number): Posterior {
  if (params.length === per) return { mean: params.slice() };
  if (params.length !== 2 * per) throw new Error(`vae_encoder output has ${params.length} values, expected ${per} or ${2 * per}`);
  const mean = params.slice(0, per);
  const std = new Float32Array(per);
  for (let i = 0; i < per; i++) {
    const lv = Math.min(Math.max(params[per + i]!, -30), 20);
    std[i] = Math.exp(f(0.5 * lv));
  }
  return { mean, std };
}

/** A VAE's per-channel latent statistics (SDXL `latents_mean` / `latents_std`). */
export interface LatentStats {
  readonly mean: Float32Array;
  readonly std: Float32Array;
}

/**
 * `scaling_factor · latent_dist.sample(generator)` = sf · (mean + std · randn): the draw is `per` values of `randn`.
 * With `stats` (SDXL image-to-image only; its inpainting ignores them, as diffusers does): (x − μ_c) · sf / σ_c.
 */
export function sampleLatent(p: Posterior, scalingFactor: number, randn: (n: number) => Float32Array, stats?: LatentStats): Float32Array {
  const per = p.mean.length;
  const sf = f(scalingFactor);
  const out = new Float32Array(per);
  const x = p.std ? randn(per).map((s, i) => f(p.mean[i]! + f(p.std![i]! * s))) : p.mean;
  if (!stats) {
    for (let i = 0; i < per; i++) out[i] = f(sf * x[i]!);
    return out;
  }
  // SDXL image-to-image with per-channel statistics: (x - mean) * scaling_factor / std.
  const plane = per / stats.mean.length;
  for (let i = 0; i < per; i++) {
    const c = Math.floor(i / plane);
    out[i] = f(f(f(x[i]! - stats.mean[c]!) * sf) / stats.std[c]!);
  }
  return out;
}

/** The mask at latent resolution: torch's nearest interpolation by an exact factor picks pixel (k·y, k·x). */
export function latentMask(mask: Float32Array, width: number, height: number, factor: number): Float32Array {
  const h = height / factor;
  const w = width / factor;
  const out = new Float32Array(h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) out[y * w + x] = mask[y * factor * width + x * factor]!;
  return out;
}

/** The image with the repaint area zeroed (`init_image * (mask < 0.5)`), [3, H, W]. */
export function maskedImage(image: Float32Array, mask: Float32Array): Float32Array {
  const plane = mask.length;
  const out = new Float32Array(image.length);
  for (let c = 0; c < 3; c++) for (let p = 0; p < plane; p++) out[c * plane + p] = image[c * plane + p]! * (mask[p]! < 0.5 ? 1 : 0);
  return out;
}

/** The inpainting blend of a 4-channel UNet: `(1 − m) · known + m · latents`, per latent channel. */
export function blendLatents(latents: Float32Array, known: Float32Array, mask: Float32Array): void {
  const plane = mask.length;
  for (let i = 0; i < latents.length; i++) {
    const m = mask[i % plane]!;
    latents[i] = f(f(1 - m) * known[i]!) + f(m * latents[i]!);
  }
}
