/**
 * Input images as diffusers prepares them (img2img/preprocess, made by diffusers' VaeImageProcessor on Pillow): decode
 * (sharp, as load_image decodes with Pillow), resize in each resize_mode (resample.ts, Pillow's algorithm), normalise;
 * masks resized, turned grey and binarised. Compared bit for bit.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { fitImage, imageTensor, maskTensor } from '../src/pipeline/img2img.js';
import type { ResizeMode } from '../src/pipeline/job.js';
import { blank, paste, resize, toLuma, type Raster } from '../src/pipeline/resample.js';
import { decodeImage, InputBudget, maskFromAlpha, sha256Hex, sniffFormat, transparentArea } from '../src/runtime/image-request.js';
import { RuntimeError } from '../src/errors.js';
import { gifFirstFrame } from '../src/runtime/gif.js';
import { bmp, gif1x1, tiff } from './helpers/images.js';
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

describe('resampling an RGB image as three grey ones', () => {
  // Pillow's resampling treats each channel alone: an RGB resize is the three L resizes of its channels, interleaved. The
  // two paths walk the source apart (RGB's three sums in one walk), so this holds them to each other on the shapes the
  // references above do not reach: downscales whose windows span a hundred pixels and more, and a box.
  it.each([
    ['lanczos', 700, 500, 23, 37, undefined],
    ['bicubic', 700, 500, 64, 48, undefined],
    ['lanczos', 97, 61, 150, 40, undefined],
    ['lanczos', 640, 480, 48, 64, [13.5, 7.25, 601, 470]],
  ] as const)('%s %ix%i to %ix%i, box %j', (filter, w, h, outW, outH, box) => {
    let seed = 12345;
    const rgb = new Uint8Array(w * h * 3);
    for (let i = 0; i < rgb.length; i++) rgb[i] = (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 24;
    const plane = (b: number): Raster => {
      const data = new Uint8Array(w * h);
      for (let i = 0; i < data.length; i++) data[i] = rgb[i * 3 + b]!;
      return { data, width: w, height: h, channels: 1 };
    };
    const whole = resize({ data: rgb, width: w, height: h, channels: 3 }, outW, outH, filter, box);
    const planes = [0, 1, 2].map((b) => resize(plane(b), outW, outH, filter, box).data);
    expect([whole.width, whole.height, whole.channels]).toEqual([outW, outH, 3]);
    let diff = 0;
    for (let i = 0; i < whole.data.length; i++) if (whole.data[i] !== planes[i % 3]![Math.floor(i / 3)]) diff++;
    expect(diff, `${diff} of ${whole.data.length} values differ`).toBe(0);
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

  it('names the field and the format for what it does not read (AVIF, HEIF, SVG, PDF)', async () => {
    const send = 'send a PNG, JPEG, WebP, GIF, TIFF or BMP image';
    const avif = Buffer.from('\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf');
    await expect(decodeImage(avif, 'instances[0].image')).rejects.toThrow(new RuntimeError('INVALID_INPUT', `instances[0].image is an AVIF; ${send}`));
    await expect(decodeImage(Buffer.from('\0\0\0\x18ftypheic\0\0\0\0mif1heic'), 'x')).rejects.toThrow(new RuntimeError('INVALID_INPUT', `x is an HEIF; ${send}`));
    await expect(decodeImage(Buffer.from('<svg xmlns="http://www.w3.org/2000/svg"/>'), 'x')).rejects.toThrow(/x is markup \(SVG\/HTML\)/);
    await expect(decodeImage(Buffer.from('%PDF-1.7'), 'x')).rejects.toThrow(`x is a PDF; ${send}`);
    await expect(decodeImage(Buffer.from('hello world'), 'x')).rejects.toThrow(/not an image format/);
    expect(sniffFormat(Buffer.from('RIFF\0\0\0\0WEBPVP8 '))).toBe('webp');
    expect([Buffer.from('II*\0'), Buffer.from('MM\0*'), Buffer.from('II+\0'), Buffer.from('GIF87a'), Buffer.from('BM')].map(sniffFormat)).toEqual(['tiff', 'tiff', 'tiff', 'gif', 'bmp']);
    // Pillow's signatures only: "GIF8" alone is not a GIF.
    expect(sniffFormat(Buffer.from('GIF85a'))).toEqual({ other: 'not an image format this server reads' });
  });

  it('reads a GIF, a TIFF and a BMP (sharp wrote the first two)', async () => {
    const one = (fmt: 'gif' | 'tiff') => sharp(Buffer.from([1, 2, 3]), { raw: { width: 1, height: 1, channels: 3 } }).toFormat(fmt, { compression: 'lzw' }).toBuffer();
    expect(Array.from((await decodeImage(await one('gif'), 'image')).data)).toEqual([1, 2, 3]);
    expect(Array.from((await decodeImage(await one('tiff'), 'image')).data)).toEqual([1, 2, 3]);
    expect(Array.from((await decodeImage(bmp(1, 1, 24, Buffer.from([3, 2, 1, 0])), 'image')).data)).toEqual([1, 2, 3]);
  });

  it('refuses a truncated file and a decompression bomb with a 400', async () => {
    const good = await png(Buffer.alloc(64 * 64 * 3, 9), 64, 64, 3);
    await expect(decodeImage(good.subarray(0, good.length - 30), 'instances[0].image')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: expect.stringMatching(/^instances\[0\]\.image could not be decoded as PNG/) });
    await expect(decodeImage(good, 'f', 64 * 63)).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f has more than 4032 pixels, the most an input image may have' });
  });

  // Headers that claim far more pixels than their file holds: refused from the header, before the pixels are allocated.
  // A GIF's header is read on a thread (decode-client.ts), from a copy of the file that cuts the frame out of it, both
  // reserved before it runs: at most the file twice, a 256-colour table and a trailer.
  const gifCopies = (f: Uint8Array) => 2 * f.length + 3 * 256 + 1;
  const tooMany = { code: 'INVALID_INPUT', message: `f has more than ${4096 * 4096} pixels, the most an input image may have` };
  it.each([
    ['a GIF whose screen is 65535x65535 around a 1x1 frame', () => gif1x1({ screen: [65535, 65535] })],
    ['a GIF whose first frame claims 65535x65535', () => gif1x1({ frame: [0, 0, 65535, 65535] })],
    ['a GIF whose 1x1 frame sits at (65000, 65000)', () => gif1x1({ frame: [65000, 65000, 1, 1] })],
    ['a TIFF of 100000x100000 holding one byte', () => tiff([{ width: 100000, height: 100000, data: Buffer.from([7]) }])],
    ['a BMP of 100000x100000 holding no pixels', () => bmp(100000, 100000, 24, Buffer.alloc(0))],
    ['an RLE8 BMP of 100000x100000 holding an end of bitmap', () => bmp(100000, 100000, 8, Buffer.from([0, 1]), 1)],
  ])('refuses %s', async (_name, make) => {
    const hold = new InputBudget(1 << 30).hold();
    const file = await make();
    await expect(decodeImage(file, 'f', 4096 * 4096, hold)).rejects.toMatchObject(tooMany);
    expect(hold.bytes).toBe(sniffFormat(file) === 'gif' ? gifCopies(file) : 0);
  });

  it('refuses a BMP or GIF that holds less than its header claims, as Pillow does', async () => {
    await expect(decodeImage(bmp(4000, 4000, 24, Buffer.alloc(100)), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: the file ends inside its pixels' });
    // An RLE that ends before the picture is full is Pillow's "not enough image data".
    await expect(decodeImage(bmp(4000, 4000, 8, Buffer.from([4, 1, 0, 1]), 1), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: not enough image data' });
    await expect(decodeImage(bmp(1, 1, 12, Buffer.alloc(4)), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as BMP: unsupported BMP pixel depth (12)' });
    const gif = await gif1x1({});
    await expect(decodeImage(gif.subarray(0, 20), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: expect.stringMatching(/^f could not be decoded as GIF: /) });
    // Cut inside its image data: Pillow's "image file is truncated", not rows of black.
    const noisy = await sharp(Buffer.from(Array.from({ length: 64 * 64 * 3 }, (_, i) => (i * 7919) % 251)), { raw: { width: 64, height: 64, channels: 3 } }).gif().toBuffer();
    await expect(decodeImage(noisy.subarray(0, noisy.length - 40), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: expect.stringMatching(/^f could not be decoded as GIF: image file is truncated/) });
    await expect(decodeImage(noisy, 'f')).resolves.toMatchObject({ width: 64, height: 64 });
    await expect(decodeImage(Buffer.from('GIF89a\x01\0\x01\0\0\0\0;'), 'f')).rejects.toMatchObject({ code: 'INVALID_INPUT', message: 'f could not be decoded as GIF: the file has no image' });
  });

  it('reads only the first page of a TIFF, as Pillow does, and reserves only its pixels: a huge or bogus later page costs nothing', async () => {
    const hold = new InputBudget(1 << 30).hold();
    // libvips read every page's header and failed on the second one's ("Bogus StripByteCounts"); Pillow reads the first.
    const img = await decodeImage(tiff([{ width: 2, height: 1, data: Buffer.from([10, 200]) }, { width: 100000, height: 100000, data: Buffer.from([7]) }]), 'f', 4096 * 4096, hold);
    expect([img.width, img.height, Array.from(img.data)]).toEqual([2, 1, [10, 10, 10, 200, 200, 200]]);
    expect(hold.bytes).toBe(2 * 3);
  });

  it('reserves the canvas of a GIF (Pillow composes the first frame on it), from the header, and what decoding the frame holds', async () => {
    const hold = new InputBudget(1 << 30).hold();
    const file = await gif1x1({ screen: [300, 200] });
    const img = await decodeImage(file, 'f', 4096 * 4096, hold);
    expect([img.width, img.height]).toEqual([300, 200]);
    // The canvas, libvips' RGBA of the 1x1 frame, and the thread's copy of the file and the frame's own file cut from it.
    expect(hold.bytes).toBe(300 * 200 * 3 + 4 + gifCopies(file));
    expect(gifFirstFrame(file).frame.length).toBeLessThanOrEqual(file.length + 3 * 256 + 1);
    const small = new InputBudget(300 * 200 * 3 - 1).hold();
    await expect(decodeImage(await gif1x1({ screen: [300, 200] }), 'f', 4096 * 4096, small)).rejects.toMatchObject({ code: 'INVALID_INPUT', message: expect.stringContaining('(INPUT_IMAGES_MB)') });
  });
});

describe("an input's digest (the key of the request's images and of the result cache)", () => {
  it('is the SHA-256 of its bytes at every size around the 4 MiB pieces, and a large one lets the event loop turn while it is taken', async () => {
    const bytes = new Uint8Array((12 << 20) + 5).map((_, i) => (i * 2654435761) >>> 24);
    for (const n of [0, 1, (4 << 20) - 1, 4 << 20, (4 << 20) + 1, bytes.length]) {
      expect(await sha256Hex(bytes.subarray(0, n))).toBe(createHash('sha256').update(bytes.subarray(0, n)).digest('hex'));
    }
    let turned = false;
    setImmediate(() => (turned = true));
    await sha256Hex(bytes);
    expect(turned).toBe(true);
  });
});
