/**
 * Input images decoded off the event loop, within what the input budget reserved for them: a BMP on a thread of its own
 * (decode-client.ts), a GIF's first frame found and cut out on one, its canvas composed by libvips. Another request is
 * answered over a real socket while a large BMP decodes, and by the real server while a large GIF's frame is cut out; a
 * cancelled decode stops its thread; a decode waiting for a thread holds none of the budget; a GIF's decode holds no
 * more memory than it reserved.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DECODE_THREADS, decodesRunning } from '../src/runtime/decode-client.js';
import { decodeImage, InputBudget, MAX_INPUT_PIXELS } from '../src/runtime/image-request.js';
import { bmp, descriptorAt } from './helpers/images.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { rejection } from './helpers/s3.js';
import { ROOT, until } from './helpers/server.js';

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
    expect(decodesRunning()).toBe(1);
    // Still running: cancelled, not decoded.
    stop.abort();
    const err = await rejection(decoding);
    expect([err.code, err.message]).toEqual(['CANCELLED', 'image: decoding was cancelled']);
    await until(() => decodesRunning() === 0, 10_000);
  }, 60_000);

  it('gives the pixels, and the decoder\'s complaints as they were, from the thread', async () => {
    const img = await decodeImage(bmp(2, 1, 24, Buffer.from([3, 2, 1, 6, 5, 4, 0, 0])), 'image');
    expect([img.width, img.height, Array.from(img.data)]).toEqual([2, 1, [1, 2, 3, 4, 5, 6]]);
    await expect(decodeImage(bmp(4000, 4000, 24, Buffer.alloc(100)), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: the file ends inside its pixels' });
    await expect(decodeImage(bmp(4000, 4000, 8, Buffer.from([4, 1, 0, 1]), 1), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: not enough image data' });
    expect(decodesRunning()).toBe(0);
  });

  it('a decode waiting for a thread holds none of the input budget until its turn, then reserves and decodes', async () => {
    const budget = new InputBudget(1 << 30);
    const side = 1024;
    const file = bmp(side, side, 24, noise(side * side * 3));
    // Its pixels and the thread's copy of the file.
    const share = side * side * 3 + file.length;
    const holds = Array.from({ length: DECODE_THREADS + 1 }, () => budget.hold());
    // Each call has its turn or joins the queue before it returns: nothing has run in between.
    const decodes = holds.map((hold) => decodeImage(file, 'image', MAX_INPUT_PIXELS, hold));
    expect(decodesRunning()).toBe(DECODE_THREADS);
    // Before, the one waiting held its share too: a queue of them refused other requests (503 BUSY) with nothing in use.
    expect(holds.map((h) => h.bytes)).toEqual([...Array<number>(DECODE_THREADS).fill(share), 0]);
    expect(budget.used).toBe(DECODE_THREADS * share);
    const images = await Promise.all(decodes);
    expect(images.every((img) => img.width === side && img.height === side && Buffer.from(img.data).equals(images[0]!.data))).toBe(true);
    expect(holds.map((h) => h.bytes)).toEqual(Array<number>(DECODE_THREADS + 1).fill(share));
    for (const h of holds) h.release();
    expect([budget.used, decodesRunning()]).toEqual([0, 0]);
  }, 60_000);

  it('a decode cancelled before its turn never starts a thread', async () => {
    const stop = new AbortController();
    stop.abort();
    const err = await rejection(decodeImage(bmp(1, 1, 24, Buffer.alloc(4)), 'image', MAX_INPUT_PIXELS, undefined, stop.signal));
    expect(err.code).toBe('CANCELLED');
    expect(decodesRunning()).toBe(0);
  });
});

describe('a GIF\'s first frame is found and cut out on a thread', () => {
  let rt: RuntimeHandle;
  // The server's own module (dist/): the runtime runs the built code, not this test's source imports.
  let running: () => number;
  beforeAll(async () => {
    rt = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', MAX_BODY_BYTES: String(128 << 20) }, { ready: true });
    running = ((await import(path.join(ROOT, 'dist', 'src', 'runtime', 'decode-client.js'))) as typeof import('../src/runtime/decode-client.js')).decodesRunning;
  }, 120_000);
  afterAll(() => rt?.stop());

  it('the server answers a health probe while it walks a GIF of 30 million one-byte sub-blocks, and serves the request', async () => {
    // A 64x64 GIF with a comment of 30 million one-byte sub-blocks (60 MB) before its image: every one is walked to find
    // the image. On the main thread that walk (and the frame's copy) held the event loop for hundreds of ms.
    const small = Buffer.from(await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 10, g: 200, b: 30 } } }).gif().toBuffer());
    const at = descriptorAt(small);
    const n = 30_000_000;
    const comment = Buffer.alloc(2 + 2 * n + 1);
    comment.set([0x21, 0xfe]);
    comment.fill(Buffer.from([1, 0x20]), 2, 2 + 2 * n);
    const gif = Buffer.concat([small.subarray(0, at), comment, small.subarray(at)]);
    // V2 binary: the file's own bytes, no base64.
    const header = Buffer.from(JSON.stringify({
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['p'] }, { name: 'image', datatype: 'BYTES', shape: [1], parameters: { binary_data_size: 4 + gif.length } }],
      parameters: { seed: 1, num_inference_steps: 1 },
    }));
    const len = Buffer.alloc(4);
    len.writeUInt32LE(gif.length);
    const answer = fetch(`${rt.url}/v2/models/model/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) },
      body: Buffer.concat([header, len, gif]),
    });
    // On the main thread the GIF never held a thread's turn: this waited in vain.
    await until(() => running() === 1, 30_000, 1);
    const live = await fetch(`${rt.url}/v2/health/live`);
    expect(live.status).toBe(200);
    // Answered while the thread still works (~100–250 ms here; the probe's answer takes a few).
    expect(running()).toBe(1);
    const res = await answer;
    const body = (await res.json()) as { outputs?: Array<{ name: string; shape: number[] }> };
    expect(res.status, JSON.stringify(body)).toBe(200);
    expect(body.outputs?.find((o) => o.name === 'image')?.shape).toEqual([1]);
    expect(running()).toBe(0);
    expect(rt.rt.inputBudget.used).toBe(0);
  }, 120_000);
});
