/** @module Image encoding with sharp (imported lazily: it is a heavy native module). */
import type { OutputFormat } from '../config.js';
import { firstUse } from '../descriptors.js';

/** sharp, imported once: at boot, while the model loads, and never while the process is out of descriptors (firstUse). */
export const loadSharp = firstUse('the image encoder (sharp)', async () => (await import('sharp')).default);

/** JPEG's and WebP's quality when a request gives none. */
export const DEFAULT_QUALITY = 90;

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
