/**
 * A decoding thread (decode-client.ts) is kept between pictures, started at the first that needs one: the pictures after
 * it start none. A decode cancelled mid-way stops its thread, which is not kept: the next picture starts one again. A
 * thread that expanded a large RLE BMP is not kept either. A kept thread keeps no process from ending. In a file of its
 * own: each test starts from the threads the ones before it kept.
 */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { decodesRunning, decodeThreads } from '../src/runtime/decode-client.js';
import { decodeImage, MAX_INPUT_PIXELS } from '../src/runtime/image-request.js';
import { bmp } from './helpers/images.js';
import { rejection } from './helpers/s3.js';
import { ROOT, tempDir, until } from './helpers/server.js';

/** Noise no encoder flattens: (i · 7919) mod 251. */
const noise = (n: number) => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7919) % 251;
  return b;
};
const gif = (side: number) => sharp(noise(side * side * 3), { raw: { width: side, height: side, channels: 3 } }).gif().toBuffer();

describe('a decoding thread is kept between pictures', () => {
  it('the first picture starts a thread and leaves it kept; a GIF, a BMP and a refused BMP after it start none', async () => {
    expect(decodeThreads()).toEqual({ started: 0, kept: 0 });
    const small = bmp(2, 1, 24, Buffer.from([3, 2, 1, 6, 5, 4, 0, 0]));
    expect(Array.from((await decodeImage(small, 'image')).data)).toEqual([1, 2, 3, 4, 5, 6]);
    // Before, each picture started a thread of its own, which ended with it: three more here, none kept.
    expect(decodeThreads()).toEqual({ started: 1, kept: 1 });
    const img = await decodeImage(await gif(64), 'image');
    expect([img.width, img.height]).toEqual([64, 64]);
    expect(Array.from((await decodeImage(small, 'image')).data)).toEqual([1, 2, 3, 4, 5, 6]);
    await expect(decodeImage(bmp(4000, 4000, 24, Buffer.alloc(100)), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: the file ends inside its pixels' });
    expect([decodeThreads(), decodesRunning()]).toEqual([{ started: 1, kept: 1 }, 0]);
  });

  it('a decode cancelled on the kept thread stops it, and it is not kept; the next picture starts a thread, kept in turn', async () => {
    const side = 4096;
    const stop = new AbortController();
    const decoding = decodeImage(bmp(side, side, 24, noise(side * side * 3)), 'image', MAX_INPUT_PIXELS, undefined, stop.signal);
    // Once its file is copied, the decode takes the kept thread.
    await until(() => decodeThreads().kept === 0, 10_000, 1);
    stop.abort();
    const err = await rejection(decoding);
    expect([err.code, err.message]).toEqual(['CANCELLED', 'image: decoding was cancelled']);
    // Not offered again: the next picture would go to a thread that has ended.
    expect([decodeThreads(), decodesRunning()]).toEqual([{ started: 1, kept: 0 }, 0]);
    const img = await decodeImage(bmp(2, 1, 24, Buffer.from([3, 2, 1, 6, 5, 4, 0, 0])), 'image');
    expect(Array.from(img.data)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(decodeThreads()).toEqual({ started: 2, kept: 1 });
  }, 60_000);

  it('a thread that expanded a 4096² RLE BMP (an index per pixel left on its heap) is not kept; one that expanded a 64² one is', async () => {
    // RLE8: runs of 16 of alternating indices, each row ended.
    const rle = (side: number) => {
      const row = Buffer.concat([...Array.from({ length: side / 16 }, (_, i) => Buffer.from([16, i & 1])), Buffer.from([0, 0])]);
      return bmp(side, side, 8, Buffer.concat(Array.from({ length: side }, () => row)), 1);
    };
    const { started } = decodeThreads();
    expect((await decodeImage(rle(64), 'image')).width).toBe(64);
    expect(decodeThreads()).toEqual({ started, kept: 1 });
    expect((await decodeImage(rle(4096), 'image')).width).toBe(4096);
    expect([decodeThreads(), decodesRunning()]).toEqual([{ started, kept: 0 }, 0]);
  }, 60_000);

  it('a process whose only work left is a kept thread ends', async () => {
    const { dir, cleanup } = tempDir();
    try {
      // The built modules, as the server runs them (a thread runs no TypeScript), from a file: a thread started by
      // `node -e` inherits its --input-type, which a thread refuses.
      const script = path.join(dir, 'decode.mjs');
      writeFileSync(script, `
        const { decodeImage } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/runtime/image-request.js'))});
        const { decodeThreads } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/runtime/decode-client.js'))});
        const img = await decodeImage(Buffer.from(process.argv[2], 'base64'), 'image');
        console.log(JSON.stringify({ width: img.width, ...decodeThreads() }));`);
      // Referenced, the kept thread would hold the process until its idle end (DECODE_THREAD_IDLE_MS, 30 s).
      const { stdout } = await promisify(execFile)(process.execPath, [script, (await gif(16)).toString('base64')], { timeout: 20_000 });
      expect(JSON.parse(stdout)).toEqual({ width: 16, started: 1, kept: 1 });
    } finally {
      cleanup();
    }
  }, 60_000);
});
