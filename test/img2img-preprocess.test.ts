/**
 * Input images as diffusers prepares them (img2img/preprocess, made by diffusers' VaeImageProcessor on Pillow): decode
 * (sharp, as load_image decodes with Pillow), resize in each resize_mode (resample.ts, Pillow's algorithm), normalise;
 * masks resized, turned grey and binarised. Compared bit for bit.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { fitImage, imageTensor, maskTensor } from '../src/pipeline/img2img.js';
import type { ResizeMode } from '../src/pipeline/job.js';
import { blank, paste, resize, toLuma, type Raster } from '../src/pipeline/resample.js';
import { decodeImage, maskFromAlpha, sniffFormat, transparentArea } from '../src/runtime/image-request.js';
import { RuntimeError } from '../src/errors.js';
import { REFERENCE } from './helpers/server.js';
import { readNpyF32 } from '../scripts/reference.js';

const dir = path.join(REFERENCE(), 'img2img');
const index = JSON.parse(readFileSync(path.join(dir, 'preprocess', 'index.json'), 'utf8')) as {
  cases: Array<{ kind: 'image' | 'mask'; input: string; height: number | null; width: number | null; resize_mode: ResizeMode; expected: string; shape: number[] }>;
};


const input = (name: string) => decodeImage(readFileSync(path.join(dir, 'inputs', name)), 'image');

describe("diffusers' image and mask processors", () => {
  it.each(index.cases.map((c) => [`${c.kind} ${c.input} → ${c.width ?? 'own'}x${c.height ?? 'own'} ${c.resize_mode}`, c] as const))('%s', async (_n, c) => {
    const img = await input(c.input);
    // get_default_height_width: the image's own side rounded down to a multiple of 8 when not given.
    const H = c.height ?? img.height - (img.height % 8);
    const W = c.width ?? img.width - (img.width % 8);
    expect(c.shape.slice(2)).toEqual([H, W]);
    const fitted = fitImage(img, W, H, c.resize_mode);
    const got = c.kind === 'image' ? imageTensor(fitted) : maskTensor(fitted);
    const want = readNpyF32(path.join(dir, 'preprocess', c.expected));
    expect(got.length).toBe(want.length);
    let diff = 0;
    for (let i = 0; i < want.length; i++) if (!Object.is(got[i], want[i]) && got[i] !== want[i]) diff++;
    expect(diff, `${diff} of ${want.length} values differ`).toBe(0);
  });

  // CMYK: Pillow's plain formula, not libvips' ICC conversion (which differs by up to ~130 levels).
  it.each([['jpg', 'pic-77x61.jpg'], ['webp', 'pic-77x61.webp'], ['cmyk', 'pic-77x61-cmyk.jpg'], ['cmyk-rot6', 'pic-77x61-cmyk-rot6.jpg']])('decodes %s to the pixels Pillow decodes', async (tag, file) => {
    const got = await input(file);
    const want = await sharp(path.join(dir, 'preprocess', `decoded-${tag}.png`)).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    expect([got.width, got.height]).toEqual([want.info.width, want.info.height]);
    let diff = 0;
    for (let i = 0; i < want.data.length; i++) if (got.data[i] !== want.data[i]) diff++;
    expect(diff).toBe(0);
  });
});

describe("decoding as diffusers' load_image does (img2img/decode, Pillow 12)", () => {
  const decodeDir = path.join(dir, 'decode');
  const { cases } = JSON.parse(readFileSync(path.join(decodeDir, 'index.json'), 'utf8')) as {
    cases: Array<{ input: string; made: string; expected: string; size: [number, number]; alpha0?: string }>;
  };
  const pixels = async (file: string, channels: 1 | 3) => {
    const img = sharp(path.join(decodeDir, file));
    const { data, info } = await (channels === 1 ? img.extractChannel(0) : img.removeAlpha()).raw().toBuffer({ resolveWithObject: true });
    return { data, width: info.width, height: info.height };
  };

  it.each(cases.map((c) => [c.input, c.made, c] as const))('%s (%s)', async (_n, _m, c) => {
    const got = await decodeImage(readFileSync(path.join(decodeDir, c.input)), 'image');
    const want = await pixels(c.expected, 3);
    expect([got.width, got.height]).toEqual(c.size);
    expect([want.width, want.height]).toEqual(c.size);
    let diff = 0;
    for (let i = 0; i < want.data.length; i++) if (got.data[i] !== want.data[i]) diff++;
    expect(diff, `${diff} of ${want.data.length} values differ`).toBe(0);
  });

  // An OpenAI edit's mask (or a picture's own transparent area) is turned as its picture is, or the two would not align.
  it.each(cases.filter((c) => c.alpha0).map((c) => [c.input, c] as const))('the alpha-0 area of %s, turned as the picture', async (_n, c) => {
    const file = readFileSync(path.join(decodeDir, c.input));
    const want = await pixels(c.alpha0!, 1);
    for (const mask of [await maskFromAlpha(file, 'mask'), await transparentArea(file, 'image')]) {
      const got = await sharp(mask!).extractChannel(0).raw().toBuffer({ resolveWithObject: true });
      expect([got.info.width, got.info.height]).toEqual(c.size);
      expect(Buffer.compare(got.data, want.data)).toBe(0);
    }
  });
});

describe('decoding what clients send', () => {
  const png = (raw: Buffer, width: number, height: number, channels: 1 | 2 | 3 | 4) => sharp(raw, { raw: { width, height, channels } }).png().toBuffer();

  it('drops alpha without compositing, and expands grey to RGB (Pillow convert("RGB"))', async () => {
    const rgba = Buffer.from([10, 20, 30, 0, 200, 100, 50, 128]);
    expect(Array.from((await decodeImage(await png(rgba, 2, 1, 4), 'image')).data)).toEqual([10, 20, 30, 200, 100, 50]);
    const grey = Buffer.from([7, 250]);
    expect(Array.from((await decodeImage(await png(grey, 2, 1, 1), 'image')).data)).toEqual([7, 7, 7, 250, 250, 250]);
  });

  it('applies the EXIF orientation, as load_image does', async () => {
    // 2x1 stored, orientation 6 (rotate 90° clockwise to view): shown 1x2.
    const stored = await sharp(Buffer.from([255, 0, 0, 0, 0, 255]), { raw: { width: 2, height: 1, channels: 3 } }).withMetadata({ orientation: 6 }).jpeg({ quality: 100 }).toBuffer();
    const img = await decodeImage(stored, 'image');
    expect([img.width, img.height]).toEqual([1, 2]);
  });

  it('names the field and the format for what is not PNG, JPEG or WebP', async () => {
    const gif = await sharp(Buffer.from([1, 2, 3]), { raw: { width: 1, height: 1, channels: 3 } }).gif().toBuffer();
    await expect(decodeImage(gif, 'instances[0].image')).rejects.toThrow(new RuntimeError('INVALID_INPUT', 'instances[0].image is a GIF; send a PNG, JPEG or WebP image'));
    await expect(decodeImage(Buffer.from('<svg xmlns="http://www.w3.org/2000/svg"/>'), 'x')).rejects.toThrow(/x is markup \(SVG\/HTML\)/);
    await expect(decodeImage(Buffer.from('hello world'), 'x')).rejects.toThrow(/not an image format/);
    expect(sniffFormat(Buffer.from('RIFF\0\0\0\0WEBPVP8 '))).toBe('webp');
  });

  it('refuses a truncated file and a decompression bomb with a 400', async () => {
    const good = await png(Buffer.alloc(64 * 64 * 3, 9), 64, 64, 3);
    await expect(decodeImage(good.subarray(0, good.length - 30), 'instances[0].image')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: expect.stringMatching(/^instances\[0\]\.image could not be decoded as PNG/) });
    await expect(decodeImage(good, 'f', 64 * 63)).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f has more than 4032 pixels, the most an input image may have' });
  });
});

describe("Pillow's Image.resize (preprocess/resample.json)", () => {
  const { cases } = JSON.parse(readFileSync(path.join(dir, 'preprocess', 'resample.json'), 'utf8')) as {
    cases: Array<{ width: number; height: number; channels: number; out_width: number; out_height: number; box: [number, number, number, number] | null; filter: 'lanczos' | 'bicubic'; input: string; output: string }>;
  };
  it(`matches byte for byte on ${cases.length} random sizes, boxes, filters and modes`, () => {
    expect(cases.length).toBeGreaterThanOrEqual(40);
    const bad: string[] = [];
    for (const c of cases) {
      const src = { data: new Uint8Array(Buffer.from(c.input, 'base64')), width: c.width, height: c.height, channels: c.channels };
      const got = resize(src, c.out_width, c.out_height, c.filter, c.box ?? undefined);
      if (Buffer.compare(Buffer.from(got.data), Buffer.from(c.output, 'base64')) !== 0) bad.push(`${c.width}x${c.height}→${c.out_width}x${c.out_height} ${c.filter} box ${JSON.stringify(c.box)}`);
    }
    expect(bad).toEqual([]);
  });
});

describe('Pillow resampling details', () => {
  it('returns a copy when nothing changes, and luma is ITU-R 601-2 rounded', () => {
    const src = { data: Uint8Array.from([1, 2, 3, 4, 5, 6]), width: 2, height: 1, channels: 3 };
    const same = resize(src, 2, 1);
    expect(same.data).toEqual(src.data);
    expect(same.data).not.toBe(src.data);
    expect(Array.from(toLuma({ data: Uint8Array.from([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]), width: 4, height: 1, channels: 3 }).data)).toEqual([76, 150, 29, 255]);
  });
});

describe('resizing only part of the output', () => {
  // A small deterministic generator: the cases are the same on every run.
  let state = 12345;
  const rand = (n: number) => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return state % n;
  };
  const crop = (r: Raster, x: number, y: number, w: number, h: number) => {
    const out = blank(w, h, r.channels);
    paste(out, r, -x, -y);
    return out;
  };

  it('gives the pixels of the same window of the whole resize (both filters, boxes, tall images, no-op sizes)', () => {
    const bad: string[] = [];
    for (let i = 0; i < 300; i++) {
      const ch = rand(2) === 0 ? 1 : 3;
      const tall = i % 10 === 0;
      const w = 1 + rand(tall ? 3 : 40);
      const h = tall ? 101 * w + rand(300) : 1 + rand(40);
      const src = { data: Uint8Array.from({ length: w * h * ch }, () => rand(256)), width: w, height: h, channels: ch };
      const same = i % 7 === 0;
      const outW = same ? w : 1 + rand(60);
      const outH = same ? h : 1 + rand(tall ? 400 : 60);
      const box = rand(3) === 0 ? ([rand(w), rand(h), w, h] as const) : undefined;
      const filter = rand(2) === 0 ? 'lanczos' : 'bicubic';
      const x = rand(outW);
      const y = rand(outH);
      const win = { x, y, width: 1 + rand(outW - x), height: 1 + rand(outH - y) };
      const whole = resize(src, outW, outH, filter, box);
      const part = resize(src, outW, outH, filter, box, win);
      const want = crop(whole, win.x, win.y, win.width, win.height);
      if ([part.width, part.height].join() !== [win.width, win.height].join() || Buffer.compare(Buffer.from(part.data), Buffer.from(want.data)) !== 0) {
        bad.push(`${w}x${h}x${ch} → ${outW}x${outH} ${filter} box ${JSON.stringify(box)} window ${JSON.stringify(win)}`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('resize_mode crop of an elongated image costs the output, not the scaled image (4096x2 → 1024x1024 scales it to 2097152x1024)', () => {
    const img = { data: Uint8Array.from({ length: 4096 * 2 * 3 }, (_, i) => (i * 7919) % 251), width: 4096, height: 2, channels: 3 };
    // Whole, the scaled image was 6 GB: its allocation failed, a 500 (a 4096x4 image's would take 3 GB).
    const out = fitImage(img, 1024, 1024, 'crop');
    expect([out.width, out.height]).toEqual([1024, 1024]);
    // The centre of the whole scaled image, as diffusers pastes it: checked on a size whose whole resize is cheap.
    const small = { ...img, data: img.data.subarray(0, 256 * 2 * 3), width: 256 };
    const whole = resize(small, 256 * 48 / 2, 48);
    expect(Buffer.from(fitImage(small, 40, 48, 'crop').data)).toEqual(Buffer.from(crop(whole, whole.width / 2 - 20, 0, 40, 48).data));
  });
});
