/**
 * Input images decoded off the event loop, within what the input budget reserved for them: a BMP on a thread of its own
 * (bmp-client.ts), a GIF's canvas composed by libvips. Another request is answered over a real socket while a large
 * BMP decodes; a cancelled decode stops its thread; a GIF's decode holds no more memory than it reserved.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { decodeImage, InputBudget, MAX_INPUT_PIXELS } from '../src/runtime/image-request.js';
import { descriptorAt } from './helpers/images.js';

/** Noise no encoder flattens: (i · 7919) mod 251. */
const noise = (n: number) => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7919) % 251;
  return b;
};

describe('a GIF decode stays within what it reserved', () => {
  // First in its file: the process's peak resident memory (VmHWM, reset through clear_refs) then measures this decode.
  it('peak memory while decoding a frame offset on its canvas is at most the reservation (Linux)', async () => {
    const side = 3000;
    const gif = Buffer.from(await sharp(noise(side * side * 3), { raw: { width: side, height: side, channels: 3 } }).gif().toBuffer());
    // The frame moved down a row: the canvas (3000x3001) grows around it, so the decode places it on a filled canvas.
    gif.writeUInt16LE(1, descriptorAt(gif) + 3);
    const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
    const hold = new InputBudget(1 << 30).hold();
    writeFileSync('/proc/self/clear_refs', '5');
    const before = kb('VmRSS');
    const img = await decodeImage(gif, 'f', MAX_INPUT_PIXELS, hold);
    const peak = kb('VmHWM') - before;
    expect([img.width, img.height]).toEqual([side, side + 1]);
    // Before: the frame decoded whole (RGBA inside libvips, then RGB), then a canvas beside it: ~90 MB at the peak for
    // 26 MB reserved (now ~67 MB for ~62 MB reserved). 8 MB: the process's other allocations meanwhile (V8, libvips' threads).
    expect(peak, `peak ${(peak / 2 ** 20).toFixed(1)} MB for ${(hold.bytes / 2 ** 20).toFixed(1)} MB reserved`).toBeLessThanOrEqual(hold.bytes + 8 * 2 ** 20);
  }, 60_000);
});
