/**
 * Input images decoded off the event loop, within what the input budget reserved for them: a BMP on a thread of its own
 * (bmp-client.ts), a GIF's canvas composed by libvips. Another request is answered over a real socket while a large
 * BMP decodes; a cancelled decode stops its thread; a GIF's decode holds no more memory than it reserved.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bmpDecodesRunning } from '../src/runtime/bmp-client.js';
import { decodeImage, InputBudget, MAX_INPUT_PIXELS } from '../src/runtime/image-request.js';
import { bmp, descriptorAt } from './helpers/images.js';
import { rejection } from './helpers/s3.js';
import { until } from './helpers/server.js';

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
    // 26 MB reserved (now ~67 MB for ~62 MB reserved). 16 MB: the process's other allocations meanwhile (V8, libvips'
    // threads; ~6 MB measured alone, more when the machine is busy), well under the 40 MB the decode held before.
    expect(peak, `peak ${(peak / 2 ** 20).toFixed(1)} MB for ${(hold.bytes / 2 ** 20).toFixed(1)} MB reserved`).toBeLessThanOrEqual(hold.bytes + 16 * 2 ** 20);
  }, 60_000);
});

describe('a BMP decodes on a thread of its own', () => {
  let server: http.Server;
  let url: string;
  beforeAll(async () => {
    server = http.createServer((_, res) => res.end('ok'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;
  });
  afterAll(() => new Promise<void>((r) => server.close(() => r())));

  it('a request over a socket is answered while a 4096² BMP decodes; cancelled then, the decode stops and leaves no thread', async () => {
    const side = 4096;
    const file = bmp(side, side, 24, noise(side * side * 3));
    const stop = new AbortController();
    let settled = false;
    // On the main thread, the decode ran to its end inside this call, before the request below was even sent.
    const decoding = decodeImage(file, 'image', MAX_INPUT_PIXELS, undefined, stop.signal).finally(() => (settled = true));
    const res = await fetch(url);
    expect([res.status, await res.text()]).toEqual([200, 'ok']);
    expect(settled).toBe(false);
    expect(bmpDecodesRunning()).toBe(1);
    // Still running: cancelled, not decoded.
    stop.abort();
    const err = await rejection(decoding);
    expect([err.code, err.message]).toEqual(['CANCELLED', 'image: decoding was cancelled']);
    await until(() => bmpDecodesRunning() === 0, 10_000);
  }, 60_000);

  it('gives the pixels, and the decoder\'s complaints as they were, from the thread', async () => {
    const img = await decodeImage(bmp(2, 1, 24, Buffer.from([3, 2, 1, 6, 5, 4, 0, 0])), 'image');
    expect([img.width, img.height, Array.from(img.data)]).toEqual([2, 1, [1, 2, 3, 4, 5, 6]]);
    await expect(decodeImage(bmp(4000, 4000, 24, Buffer.alloc(100)), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: the file ends inside its pixels' });
    await expect(decodeImage(bmp(4000, 4000, 8, Buffer.from([4, 1, 0, 1]), 1), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: not enough image data' });
    expect(bmpDecodesRunning()).toBe(0);
  });

  it('a decode cancelled before its turn never starts a thread', async () => {
    const stop = new AbortController();
    stop.abort();
    const err = await rejection(decodeImage(bmp(1, 1, 24, Buffer.alloc(4)), 'image', MAX_INPUT_PIXELS, undefined, stop.signal));
    expect(err.code).toBe('CANCELLED');
    expect(bmpDecodesRunning()).toBe(0);
  });
});
