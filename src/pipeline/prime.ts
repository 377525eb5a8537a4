/**
 * @module What a session's priming run on CUDA is (aux.ts runs it): zeros at the served size, once, so its first real
 * run pays no cuDNN algorithm search. The VAE encoder serves only image input: with WARMUP_VAE_ENCODER=after-ready its
 * priming waits for the end of the worker's warm-up generation and stays off the path to ready.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { EncoderWarmup } from '../config.js';
import { unetBefore090 } from './model.js';
import { parsePyJson } from './pyjson.js';
import type { PrimeSpec } from './protocol.js';

/**
 * The priming run of `component` of the model in `dir`: the served latent size and the VAE's scale. Only the two
 * configs are read (a component's session can start before the rest of the layout has arrived).
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
  const vae = json('vae_decoder/config.json');
  const xl = unet.addition_embed_type === 'text_time';
  let size = typeof unet.sample_size === 'number' ? unet.sample_size : xl ? 128 : 64;
  // The pipeline serves 64 where a pre-0.9 config says less (readLayout).
  if (!xl && size < 64 && unetBefore090(unet)) size = 64;
  const blocks = Array.isArray(vae.block_out_channels) ? vae.block_out_channels.length : 4;
  const spec: PrimeSpec = { latentHeight: size, latentWidth: size, vaeScale: 2 ** Math.max(0, blocks - 1) };
  // An inpainting model's warm-up encodes its image first: there the priming run beside the UNet's load saves time.
  const hold = component === 'vae_encoder' && encoder === 'after-ready' && unet.in_channels !== 9;
  return hold ? { ...spec, after: 'warm-up' } : spec;
}
