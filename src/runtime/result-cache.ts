/**
 * @module The result cache (the seed's lru_cache, bounded in bytes): a repeated request with the same seed
 * and the same generation fields gets the same encoded bytes back without touching the device.
 */
import { createHash } from 'node:crypto';
import { unconditionalPass, type ModelDefaults } from '../pipeline/job.js';
import type { EncodedImage } from './engine.js';
import { imageKey } from './image-request.js';
import { lorasKey, shapeKey, type GenerationRequest } from './request.js';

/**
 * What an entry holds besides its encoded bytes, counted against RESULT_CACHE_MB: the entry (its hashed key, the Map
 * slot, its record) and each image's record and ArrayBuffer. Measured on Node 20: ~210 bytes an entry, ~160 an image.
 * Left out, 64 MB of 306-byte images (64x64, JPEG) held another 80 MB.
 */
export const ENTRY_BYTES = 256;
export const IMAGE_BYTES = 160;

export interface ResultCache {
  /** The key of a cacheable request, or undefined (a request without an explicit seed is never cached). */
  keyOf(req: GenerationRequest): string | undefined;
  get(key: string): EncodedImage[] | undefined;
  put(key: string, images: readonly EncodedImage[]): void;
  readonly bytes: number;
  readonly entries: number;
}

export interface ResultCacheOptions {
  /** Called with the bytes held after each change (the result_cache_bytes gauge). */
  onChange?: (bytes: number) => void;
  /** The loaded model's defaults, which say which fields its images do not depend on; undefined before the load. */
  defaults?: () => Pick<ModelDefaults, 'scheduler' | 'guidanceEmbedding' | 'zerosForMissingNegative'> | undefined;
  /**
   * A text's token ids for each of the model's tokenizers, exactly as the text encoders are fed them (Engine.encodeText);
   * undefined while no tokenizer is loaded, and the text itself keys instead.
   */
  encode?: (text: string) => number[][] | undefined;
}

/**
 * An LRU over a Map (insertion order = recency): get() moves the entry to the end, put() evicts from the
 * front until the total fits. `maxBytes` 0 disables the cache; an entry larger than the whole cache is
 * not stored (it would evict everything and still not fit).
 */
export function createResultCache(modelName: string, maxBytes: number, opts: ResultCacheOptions = {}): ResultCache {
  const { onChange, defaults, encode } = opts;
  const map = new Map<string, { images: EncodedImage[]; bytes: number }>();
  let total = 0;
  const changed = () => onChange?.(total);
  return {
    keyOf(req) {
      if (maxBytes <= 0 || !req.seedsGiven) return undefined;
      const s = req.shape;
      const d = defaults?.();
      // Every field that changes the bytes: model, shape, each prompt/seed/count, and the encoding. Not those the
      // images do not depend on (the batch key's rule, shapeKey): eta where the scheduler class ignores it, and without
      // an unconditional pass guidance_rescale, the negative prompt, and the guidance scale unless the UNet embeds it.
      const cfg = unconditionalPass(s.guidance, d?.guidanceEmbedding === true);
      // A text as the text encoders see it: only its token ids reach them, so prompts that differ in case, whitespace,
      // Unicode form, HTML entities or past the 75-token cut give the same image and share an entry.
      const text = (t: string) => encode?.(t) ?? t;
      // The negative prompt is read by the unconditional pass alone. A missing one is '' to the encoder, except where
      // the model zeroes its embeddings instead (SDXL's force_zeros_for_empty_prompt): there '' is not missing.
      // Without the model's defaults that is unknown, and the text keys as sent.
      const negative = (n: string | undefined) => {
        if (!cfg) return null;
        if (n === undefined && d?.zerosForMissingNegative === true) return 0;
        return (d && encode?.(n ?? '')) ?? n ?? null;
      };
      // Hashed: the fields hold up to 20,000 characters of prompts, which as the key itself outweighed the small
      // images they index (306-byte JPEGs: 64 MB of images held 4 GB of keys).
      return createHash('sha256').update(JSON.stringify([
        modelName, shapeKey(s, d), cfg || d?.guidanceEmbedding === true ? s.guidance : null, cfg ? s.guidanceRescale : null,
        req.items.map((it) => [text(it.prompt), negative(it.negativePrompt), it.seed, it.numImages]),
        req.output.format, req.output.quality ?? null, imageKey(req), lorasKey(req.loras),
      ])).digest('hex');
    },
    get(key) {
      const e = map.get(key);
      if (!e) return undefined;
      map.delete(key);
      map.set(key, e);
      return e.images;
    },
    put(key, images) {
      const bytes = ENTRY_BYTES + images.reduce((n, i) => n + IMAGE_BYTES + i.data.byteLength, 0);
      if (maxBytes <= 0 || bytes > maxBytes) return;
      const old = map.get(key);
      if (old) {
        total -= old.bytes;
        map.delete(key);
      }
      // Copies: the caller's buffers may be transferred or reused later; ours must stay whole.
      map.set(key, { images: images.map((i) => ({ ...i, data: i.data.slice(0) })), bytes });
      total += bytes;
      for (const [k, e] of map) {
        if (total <= maxBytes) break;
        map.delete(k);
        total -= e.bytes;
      }
      changed();
    },
    get bytes() {
      return total;
    },
    get entries() {
      return map.size;
    },
  };
}
