/**
 * @module What decoding an input image holds beside what INPUT_IMAGES_MB reserves for it (`npm run
 * bench:decode-memory`, i.e. `node dist/scripts/bench-decode-memory.js`): per format, a picture of gradients with mild
 * noise (and a flat one) at 2048² and 4096² (BENCH_SIDES, comma-separated), each decoded by decodeImage in a process of its own, whose peak resident
 * memory (VmHWM, reset through /proc/self/clear_refs: Linux) is measured from just before the decode. Prints the peak
 * over the reservation, in MB and in bytes per pixel; ~7 MB of it is the process's own (libvips' threads, V8).
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import sharp, { type Sharp } from 'sharp';
import { decodeImage, InputBudget } from '../src/runtime/image-request.js';

const CASES: Record<string, (raw: Sharp, side: number) => Promise<Buffer>> = {
  'WebP lossy': (raw) => raw.webp({ quality: 90 }).toBuffer(),
  'WebP lossy, alpha': (raw) => raw.ensureAlpha(0.5).webp({ quality: 90 }).toBuffer(),
  'WebP lossless': (raw) => raw.webp({ lossless: true, effort: 1 }).toBuffer(),
  'WebP lossless, flat': (_, side) => sharp(Buffer.alloc(side * side * 3, 128), { raw: { width: side, height: side, channels: 3 } }).webp({ lossless: true, effort: 0 }).toBuffer(),
  PNG: (raw) => raw.png({ compressionLevel: 1 }).toBuffer(),
  'PNG, alpha': (raw) => raw.ensureAlpha(0.5).png({ compressionLevel: 1 }).toBuffer(),
  'JPEG 4:2:0': (raw) => raw.jpeg({ quality: 90 }).toBuffer(),
  'JPEG progressive 4:2:0': (raw) => raw.jpeg({ quality: 90, progressive: true }).toBuffer(),
  'JPEG progressive 4:4:4': (raw) => raw.jpeg({ quality: 90, progressive: true, chromaSubsampling: '4:4:4' }).toBuffer(),
  'TIFF LZW': (raw) => raw.tiff({ compression: 'lzw' }).toBuffer(),
  'TIFF JPEG': (raw) => raw.tiff({ compression: 'jpeg' }).toBuffer(),
};
const SIDES = (process.env.BENCH_SIDES ?? '2048,4096').split(',').map(Number);
const MB = 2 ** 20;

/** Gradients in each channel with ±8 of xorshift noise: photo-like to every encoder. */
function picture(side: number): Sharp {
  const px = Buffer.alloc(side * side * 3);
  let x = 12345;
  for (let y = 0; y < side; y++) {
    for (let i = 0; i < side; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      const n = (x & 15) - 8;
      const o = (y * side + i) * 3;
      px[o] = Math.max(0, Math.min(255, (i * 255) / side + n));
      px[o + 1] = Math.max(0, Math.min(255, (y * 255) / side + n));
      px[o + 2] = Math.max(0, Math.min(255, ((i + y) * 127) / side + n));
    }
  }
  return sharp(px, { raw: { width: side, height: side, channels: 3 } });
}

/** In the child: one decode, its peak over the reservation. */
async function one(name: string, side: number): Promise<void> {
  const bytes = await CASES[name]!(picture(side), side);
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
  await new Promise((r) => setTimeout(r, 50));
  const hold = new InputBudget(1 << 30).hold();
  writeFileSync('/proc/self/clear_refs', '5');
  const before = kb('VmRSS');
  await decodeImage(bytes, 'image', side * side, hold);
  const peak = kb('VmHWM') - before;
  process.stdout.write(`${JSON.stringify({ file: bytes.length, reserved: hold.bytes, peak })}\n`);
}

function main(): void {
  for (const name of Object.keys(CASES)) {
    for (const side of SIDES) {
      const run = spawnSync(process.execPath, [fileURLToPath(import.meta.url), name, String(side)], { encoding: 'utf8' });
      if (run.status !== 0) throw new Error(`${name} ${side}: ${run.stderr.slice(-400)}`);
      const { file, reserved, peak } = JSON.parse(run.stdout.trim().split('\n').at(-1)!) as Record<string, number>;
      const over = peak - reserved;
      process.stdout.write(`bench-decode-memory: ${name} ${side}x${side} (${(file / MB).toFixed(1)} MB): reserved ${(reserved / MB).toFixed(0)} MB, peak ${(peak / MB).toFixed(0)} MB, over ${(over / MB).toFixed(0)} MB (${(over / (side * side)).toFixed(1)} B/px)\n`);
    }
  }
}

if (process.argv.length > 3) one(process.argv[2]!, Number(process.argv[3])).catch((err: unknown) => {
  process.stderr.write(`${String((err as Error)?.stack ?? err)}\n`);
  process.exit(1);
});
else main();
