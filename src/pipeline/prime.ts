/**
 * @module What a session's priming run on CUDA is (aux.ts runs it): zeros at the served size, once, so its first real
 * run pays no cuDNN algorithm search. The VAE encoder serves only image input: with WARMUP_VAE_ENCODER=after-ready its
 * priming waits for the end of the worker's warm-up generation and stays off the path to ready.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { EncoderWarmup } from '../config.js';
import { pipelineRewritesConfigs, servedGeometry } from './model.js';
import { parsePyJson } from './pyjson.js';
import type { PrimeSpec } from './protocol.js';

/**
 * The priming run of `component` of the model in `dir`: the served latent size and the VAE's scale, as readLayout
 * reads them. Only its layout files are read (a component's session can start before the weights have all arrived),
 * and leniently: a bad one fails the load itself.
 */
export function primeSpec(dir: string, component: string, encoder: EncoderWarmup): PrimeSpec {
  const json = (f: string): Record<string, unknown> => {
    try {
      return parsePyJson(readFileSync(path.join(dir, f), 'utf8')) as Record<string, unknown>;
    } catch {
      return {};
    }
  };
  const unet = json('unet/config.json');
  const named = json('model_index.json')._class_name;
  const pipelineClass = typeof named === 'string' ? named : 'StableDiffusionPipeline';
  const isXL = unet.addition_embed_type === 'text_time' || pipelineClass.includes('XL');
  const { sampleSize, vaeScale } = servedGeometry(unet, json('vae_decoder/config.json'), isXL, pipelineRewritesConfigs(pipelineClass, isXL));
  const spec: PrimeSpec = { latentHeight: sampleSize, latentWidth: sampleSize, vaeScale };
  // An inpainting model's warm-up encodes its image first: there the priming run beside the UNet's load saves time.
  const hold = component === 'vae_encoder' && encoder === 'after-ready' && unet.in_channels !== 9;
  return hold ? { ...spec, after: 'warm-up' } : spec;
}
