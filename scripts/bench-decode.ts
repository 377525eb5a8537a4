/**
 * @module How long decoding an input image holds the event loop (`npm run bench:decode`, i.e. `node
 * dist/scripts/bench-decode.js [BASELINE_CHECKOUT]`): a 4096 × 4096 picture of noise as a 24-bit BMP, an RLE8 BMP, a
 * GIF whose frame sits a row down its canvas, and a GIF of noise written in one-byte sub-blocks (the most a GIF's
 * first frame can make its parse walk and copy), each decoded BENCH_N (default 5) times, interleaved, while a 1 ms timer
 * notes the longest gap between its ticks. Before: the BMP decoded on the main thread (bmp.ts, as decodeImage did), or,
 * with a checkout whose build holds another image-request.js (`<checkout>/dist/src/runtime/image-request.js`, e.g. the
 * parent commit's), that one's decodeImage for every picture. After: this decodeImage. Medians of the longest gap and
 * of the decode's wall time, and before/after. On a shared machine the gaps are noisy: compare medians, not single runs.
 *
 * Then what a decoding thread costs a 512 × 512 GIF and BMP, 4 × BENCH_N times each, interleaved: their JavaScript
 * decode inline on the main thread, on a thread started for the picture and ended with it (as decode-client.ts did
 * before it kept its threads: where its time went too, till the thread runs JavaScript, till it answers, till it has
 * ended), and on a kept thread (decodeOnThread); medians of the wall time and their ratios, and decodeImage's whole
 * decode (the checkout's beside it where one is given).
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import sharp from 'sharp';
import { readBmp } from '../src/runtime/bmp.js';
import { decodeOnThread, type ThreadJob, type ThreadReply } from '../src/runtime/decode-client.js';
import { gifFirstFrame } from '../src/runtime/gif.js';
import { decodeImage } from '../src/runtime/image-request.js';
import { bmp, descriptorAt } from '../test/helpers/images.js';
import { median } from './bench-common.js';

type Decode = (bytes: Uint8Array) => Promise<unknown>;
const n = Number(process.env.BENCH_N ?? 5);
const SIDE = 4096;
const SMALL = 512;

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


/** The small pictures: noise, so that the GIF's data is not a few bytes. */
async function smallPictures(): Promise<Record<string, { job: ThreadJob; bytes: Buffer }>> {
  const noise = Buffer.alloc(SMALL * SMALL * 3);
  for (let i = 0; i < noise.length; i++) noise[i] = (i * 7919) % 251;
  return {
    GIF: { job: 'gif', bytes: Buffer.from(await sharp(noise, { raw: { width: SMALL, height: SMALL, channels: 3 } }).gif().toBuffer()) },
    'BMP 24-bit': { job: 'bmp', bytes: bmp(SMALL, SMALL, 24, noise) },
  };
}

const THREAD = new URL('../src/runtime/decode-thread.js', import.meta.url);

/** Where a thread per picture's time went: till it ran JavaScript, till its answer, till it ended (ms). */
type Phases = { start: number; answer: number; end: number };

/** `job` on a thread started for it and ended once it answered, as decode-client.ts decoded every picture before. */
async function threadPerPicture(job: ThreadJob, bytes: Uint8Array, phases: Phases[]): Promise<unknown> {
  const t0 = performance.now();
  const copy = new Uint8Array(bytes);
  const worker = new Worker(THREAD);
  const online = new Promise<number>((r) => worker.once('online', () => r(performance.now())));
  const reply = await new Promise<ThreadReply>((resolve, reject) => {
    worker.once('message', resolve).once('error', reject);
    worker.postMessage({ job, bytes: copy }, [copy.buffer]);
  });
  const answered = performance.now();
  await worker.terminate();
  phases.push({ start: (await online) - t0, answer: answered - (await online), end: performance.now() - answered });
  if ('error' in reply) throw new Error(reply.error);
  return reply.answer;
}

/** Medians (ms) of each way's wall time over `runs` rounds, the ways interleaved. */
async function walls(ways: Record<string, () => Promise<unknown>>, runs: number): Promise<Record<string, number>> {
  const times: Record<string, number[]> = Object.fromEntries(Object.keys(ways).map((k) => [k, []]));
  for (const way of Object.values(ways)) await way();
  for (let i = 0; i < runs; i++) {
    for (const [k, way] of Object.entries(ways)) {
      const t0 = performance.now();
      await way();
      times[k]!.push(performance.now() - t0);
    }
  }
  return Object.fromEntries(Object.entries(times).map(([k, t]) => [k, median(t)]));
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
  for (const [name, { job, bytes }] of Object.entries(await smallPictures())) {
    const phases: Phases[] = [];
    const ms = await walls(
      {
        inline: async () => (job === 'bmp' ? readBmp(bytes).decode() : gifFirstFrame(bytes)),
        perPicture: () => threadPerPicture(job, bytes, phases),
        kept: () => decodeOnThread(job, bytes, 'image'),
        decodeImage: () => decodeImage(bytes, 'image'),
        ...(baseline ? { baseline: () => baseline(bytes, 'image') } : {}),
      },
      4 * n,
    );
    const f = (v: number) => (v < 1 ? v.toFixed(2) : v.toFixed(1));
    const whole = `; decodeImage ${f(ms.decodeImage!)} ms${ms.baseline === undefined ? '' : ` (the checkout's ${f(ms.baseline)} ms)`}`;
    process.stdout.write(
      `bench-decode: ${name} ${SMALL}x${SMALL} (${(bytes.length / 1024).toFixed(0)} KB), its JavaScript decode: inline ${f(ms.inline!)} ms, ` +
        `on a thread per picture ${f(ms.perPicture!)} ms, on a kept thread ${f(ms.kept!)} ms ` +
        `(${(ms.perPicture! / ms.kept!).toFixed(0)}x less than a thread per picture, ${(ms.kept! / ms.inline!).toFixed(1)}x inline)${whole}\n` +
        `bench-decode:   a thread per picture: ${f(median(phases.map((p) => p.start)))} ms till it runs JavaScript, ${f(median(phases.map((p) => p.answer)))} ms more ` +
        `till its answer (its module loaded, the file moved, the decode), ${f(median(phases.map((p) => p.end)))} ms till it has ended\n`,
    );
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench-decode: ${String((err as Error)?.stack ?? err)}\n`);
  process.exit(1);
});
