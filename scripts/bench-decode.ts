/**
 * @module How long decoding an input image holds the event loop (`npm run bench:decode`, i.e. `node
 * dist/scripts/bench-decode.js [BASELINE_CHECKOUT]`): a 4096 × 4096 picture of noise as a 24-bit BMP, an RLE8 BMP, a
 * GIF whose frame sits a row down its canvas, and a GIF of noise written in one-byte sub-blocks (the most a GIF's
 * first frame can make its parse walk and copy), each decoded BENCH_N (default 5) times, interleaved, while a 1 ms timer
 * notes the longest gap between its ticks. Before: the BMP decoded on the main thread (bmp.ts, as decodeImage did), or,
 * with a checkout whose build holds another image-request.js (`<checkout>/dist/src/runtime/image-request.js`, e.g. the
 * parent commit's), that one's decodeImage for every picture. After: this decodeImage. Medians of the longest gap and
 * of the decode's wall time, and before/after. On a shared machine the gaps are noisy: compare medians, not single runs.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import sharp from 'sharp';
import { readBmp } from '../src/runtime/bmp.js';
import { decodeImage } from '../src/runtime/image-request.js';
import { bmp, descriptorAt } from '../test/helpers/images.js';
import { median } from './bench-common.js';

type Decode = (bytes: Uint8Array) => Promise<unknown>;
const n = Number(process.env.BENCH_N ?? 5);
const SIDE = 4096;

async function pictures(): Promise<Record<string, Buffer>> {
  const noise = Buffer.alloc(SIDE * SIDE * 3);
  for (let i = 0; i < noise.length; i++) noise[i] = (i * 7919) % 251;
  // RLE8: runs of 16 of alternating indices, each row ended.
  const row = Buffer.concat([...Array.from({ length: SIDE / 16 }, (_, i) => Buffer.from([16, i & 1])), Buffer.from([0, 0])]);
  const gif = Buffer.from(await sharp(noise.subarray(0, SIDE * (SIDE - 1) * 3), { raw: { width: SIDE, height: SIDE - 1, channels: 3 } }).gif().toBuffer());
  // The frame a row down: the canvas grows around it.
  gif.writeUInt16LE(1, descriptorAt(gif) + 3);
  // Noise LZW barely compresses (xorshift32): ~23 MB of image data, 46 MB as one-byte sub-blocks.
  const rand = Buffer.alloc(SIDE * SIDE * 3);
  let x = 2463534242;
  for (let i = 0; i < rand.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    rand[i] = x & 255;
  }
  const rough = Buffer.from(await sharp(rand, { raw: { width: SIDE, height: SIDE, channels: 3 } }).gif({ dither: 0, effort: 1 }).toBuffer());
  return {
    'BMP 24-bit': bmp(SIDE, SIDE, 24, noise),
    'BMP RLE8': bmp(SIDE, SIDE, 8, Buffer.concat(Array.from({ length: SIDE }, () => row)), 1),
    'GIF, frame offset': gif,
    'GIF, one-byte sub-blocks': oneByteBlocks(rough),
  };
}

/** `gif` (as sharp writes it: one image, its data after the descriptor's colour table) with its image data re-cut into sub-blocks of one byte. */
function oneByteBlocks(gif: Buffer): Buffer {
  const d = descriptorAt(gif);
  const flags = gif[d + 9]!;
  const lzw = d + 10 + (flags & 0x80 ? 3 << ((flags & 7) + 1) : 0);
  const data: Buffer[] = [];
  for (let o = lzw + 1; gif[o] !== 0; o += gif[o]! + 1) data.push(gif.subarray(o + 1, o + 1 + gif[o]!));
  const bytes = Buffer.concat(data);
  const cut = Buffer.alloc(2 * bytes.length, 1);
  for (let i = 0; i < bytes.length; i++) cut[2 * i + 1] = bytes[i]!;
  return Buffer.concat([gif.subarray(0, lzw + 1), cut, Buffer.from([0, 0x3b])]);
}

/** The longest gap between ticks of a 1 ms timer while `decode` runs, and its wall time, in ms. */
async function blocked(decode: Decode, bytes: Buffer): Promise<{ gap: number; wall: number }> {
  let last = performance.now();
  let gap = 0;
  const tick = setInterval(() => {
    const now = performance.now();
    gap = Math.max(gap, now - last);
    last = now;
  }, 1);
  await new Promise((r) => setTimeout(r, 20));
  [gap, last] = [0, performance.now()];
  const t0 = performance.now();
  await decode(bytes);
  const wall = performance.now() - t0;
  // The gap a decode ends in is noted at the next tick.
  await new Promise((r) => setTimeout(r, 20));
  clearInterval(tick);
  return { gap, wall };
}


async function main(): Promise<void> {
  const checkout = process.argv[2];
  type Baseline = (b: Uint8Array, field: string) => Promise<unknown>;
  const baseline: Baseline | undefined = checkout
    ? ((await import(pathToFileURL(path.resolve(checkout, 'dist/src/runtime/image-request.js')).href)) as { decodeImage: Baseline }).decodeImage
    : undefined;
  const after: Decode = (b) => decodeImage(b, 'image');
  for (const [name, bytes] of Object.entries(await pictures())) {
    const before: Decode | undefined = baseline ? (b) => baseline(b, 'image') : name.startsWith('BMP') ? async (b) => readBmp(b).decode() : undefined;
    const runs: Record<'before' | 'after', Array<{ gap: number; wall: number }>> = { before: [], after: [] };
    await after(bytes);
    for (let i = 0; i < n; i++) {
      if (before) runs.before.push(await blocked(before, bytes));
      runs.after.push(await blocked(after, bytes));
    }
    const show = (k: 'before' | 'after') => `event loop held ${median(runs[k].map((r) => r.gap)).toFixed(0)} ms (decode ${median(runs[k].map((r) => r.wall)).toFixed(0)} ms)`;
    const ratio = before ? `; held ${(median(runs.before.map((r) => r.gap)) / median(runs.after.map((r) => r.gap))).toFixed(1)}x shorter` : '';
    process.stdout.write(`bench-decode: ${name} ${SIDE}x${SIDE}: ${before ? `before ${show('before')}, ` : ''}after ${show('after')}${ratio}\n`);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench-decode: ${String((err as Error)?.stack ?? err)}\n`);
  process.exit(1);
});
