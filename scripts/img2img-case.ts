/**
 * @module The image-to-image and inpainting reference (img2img/ of the reference data, made by
 * scripts/make-img2img-reference.py): assembling its two models (one with a 4-channel UNet, one with a 9-channel
 * inpainting UNet, sharing text encoder and VAE) and turning a case into the request that asks for its images.
 */
import { cpSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { parsePyJson } from '../src/pipeline/pyjson.js';

export interface Img2imgCase {
  id: string;
  mode: 'img2img' | 'inpaint';
  model: 'sd' | 'inpaint';
  image: string;
  mask_image: string | null;
  request: Record<string, unknown> & { prompt: string; seed: number; num_images_per_prompt?: number };
  output: Array<[number, number]>;
}

export const readImg2imgCases = (refDir: string): Img2imgCase[] => {
  const dir = path.join(refDir, 'img2img', 'cases');
  return readdirSync(dir).sort().map((id) => parsePyJson(readFileSync(path.join(dir, id, 'case.json'), 'utf8')) as Img2imgCase);
};

/**
 * Writes the `sd` or `inpaint` model into `dest`: the shared components, the model's UNet and index, and the CLIP
 * tokenizer of the e2e reference model (the same files; kept once in the repository).
 */
export function assembleModel(refDir: string, which: 'sd' | 'inpaint', dest: string): string {
  const m = path.join(refDir, 'img2img', 'model');
  cpSync(path.join(m, 'common'), dest, { recursive: true });
  cpSync(path.join(m, which), dest, { recursive: true });
  cpSync(path.join(refDir, 'e2e', 'model', 'tokenizer'), path.join(dest, 'tokenizer'), { recursive: true });
  return dest;
}

/** The V1 instance that asks for the case's images (input files as base64). */
export function img2imgInstance(refDir: string, c: Img2imgCase): Record<string, unknown> {
  const input = (name: string) => readFileSync(path.join(refDir, 'img2img', 'inputs', name)).toString('base64');
  return {
    ...c.request,
    image: input(c.image),
    ...(c.mask_image ? { mask_image: input(c.mask_image) } : {}),
  };
}
