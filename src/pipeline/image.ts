/** @module Image encoding with sharp (imported lazily: it is a heavy native module). */
import type { OutputFormat } from '../config.js';
import { firstUse } from '../descriptors.js';

/** sharp, imported once: at boot, while the model loads, and never while the process is out of descriptors (firstUse). */
export const loadSharp = firstUse('the image encoder (sharp)', async () => (await import('sharp')).default);

/** JPEG's and WebP's quality when a request gives none. */
export const DEFAULT_QUALITY = 90;

/** The widest and tallest image WebP holds (libwebp's WEBP_MAX_DIMENSION); MAX_IMAGE_SIZE goes to 16384. */
export const WEBP_MAX_SIDE = 16383;

/** Why `format` cannot hold a `height`×`width` image (`undefined`: it can), for a request refused before it runs. */
export function formatRefuses(format: OutputFormat, height: number, width: number): string | undefined {
  if (format !== 'webp' || (height <= WEBP_MAX_SIDE && width <= WEBP_MAX_SIDE)) return undefined;
  return `output_format webp holds at most ${WEBP_MAX_SIDE} pixels a side, and the image would be ${width}x${height}; ask for png or jpeg, or a smaller size`;
}

/** Encodes RGB uint8 HWC pixels. PNG is lossless and deterministic: same pixels, same bytes. */
export async function encodeImage(rgb: Uint8Array, width: number, height: number, format: OutputFormat, quality?: number): Promise<Buffer> {
  const sharp = await loadSharp();
  const img = sharp(Buffer.from(rgb.buffer, rgb.byteOffset, rgb.byteLength), { raw: { width, height, channels: 3 } });
  switch (format) {
    case 'png':
      return img.png({ compressionLevel: 6 }).toBuffer();
    case 'jpeg':
      return img.jpeg({ quality: quality ?? DEFAULT_QUALITY }).toBuffer();
    case 'webp':
      return img.webp({ quality: quality ?? DEFAULT_QUALITY }).toBuffer();
  }
}
