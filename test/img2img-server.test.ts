/**
 * Image-to-image and inpainting through the real server on the demo models: the fields in V1, V2 (BYTES images as
 * base64 or binary, strength as FP32) and the WebSocket give the same image; bad inputs answer 400 naming the field;
 * s3:// inputs are read with the runtime's S3 settings; the invariants (strength 0 is the input encoded and decoded,
 * whatever the prompt; inpainting with nothing to repaint is the same); batches never mix inputs.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import WebSocket from 'ws';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixtureModel } from './fixtures/index.js';
import { CREDS, destroyS3, startS3, type S3Server } from './helpers/s3.js';
import { metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { gif1x1, tiff } from './helpers/images.js';
import { postJson, REFERENCE } from './helpers/server.js';

type Pred = { image: { b64: string }; seed: number; width: number; height: number };
const preds = (j: Record<string, unknown>) => j.predictions as Pred[];

/** A smooth test picture (and a mask: white inside a circle), PNG. */
async function picture(width: number, height: number, seed = 1): Promise<Buffer> {
  const px = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 3;
      px[o] = Math.round(128 + 100 * Math.sin((x * seed) / 9));
      px[o + 1] = Math.round((255 * y) / height);
      px[o + 2] = (x + y) % 64 < 32 ? 40 : 210;
    }
  }
  return sharp(px, { raw: { width, height, channels: 3 } }).png().toBuffer();
}
async function circleMask(width: number, height: number, fill?: number): Promise<Buffer> {
  const px = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) px.fill(fill ?? ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (width / 4) ** 2 ? 255 : 0), (y * width + x) * 3, (y * width + x) * 3 + 3);
  return sharp(px, { raw: { width, height, channels: 3 } }).png().toBuffer();
}

let demo: RuntimeHandle;
let inpaintDemo: RuntimeHandle;
let textOnly: RuntimeHandle;
let batcher: RuntimeHandle;
let s3: S3Server;
let pic: Buffer;
let pic2: Buffer;
let mask: Buffer;

const predict = (s: Pick<RuntimeHandle, 'url'>, inst: Record<string, unknown> | Array<Record<string, unknown>>) =>
  postJson(`${s.url}/v1/models/model:predict`, { instances: Array.isArray(inst) ? inst : [inst] });

beforeAll(async () => {
  [pic, pic2, mask] = await Promise.all([picture(64, 64), picture(64, 64, 3), circleMask(64, 64)]);
  s3 = await startS3(['inputs']);
  await s3.put('inputs', 'pic.png', pic);
  await s3.put('inputs', 'not-an-image.txt', 'hello');
  const [inpaintModel, textModel] = await Promise.all([fixtureModel({ inpainting: true }), fixtureModel()]);
  const common = { WARMUP_STEPS: '1', RESULT_CACHE_MB: '0' };
  [demo, inpaintDemo, textOnly, batcher] = await Promise.all([
    // The served demo (no STORAGE_URI) has a vae_encoder.
    startRuntime({ ...common, STORAGE_URI: undefined, ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', INPUT_URI_PREFIXES: 's3://inputs' }, { ready: true }),
    startRuntime({ ...common, STORAGE_URI: inpaintModel, RESULT_CACHE_MB: '4' }, { ready: true }),
    startRuntime({ ...common, STORAGE_URI: textModel }, { ready: true }),
    // Batches of up to 4 images gather within a long window.
    startRuntime({ ...common, STORAGE_URI: undefined, MAX_BATCH_SIZE: '4', BATCH_WINDOW_MS: '400' }, { ready: true }),
  ]);
});
afterAll(async () => {
  await Promise.all([demo, inpaintDemo, textOnly, batcher].map((s) => s?.stop()));
  if (s3) await destroyS3(s3);
});

describe('image-to-image on the demo model', () => {
  const base = { prompt: 'a castle', num_inference_steps: 6, seed: 21 };

  it('takes its size from the image (rounded down to a multiple of 8) unless height and width are given', async () => {
    const odd = await picture(77, 61);
    const own = await predict(demo, { ...base, image: odd.toString('base64'), strength: 0.5 });
    expect(own.status, JSON.stringify(own.json)).toBe(200);
    expect(preds(own.json).map((p) => [p.width, p.height])).toEqual([[72, 56]]);
    const sized = await predict(demo, { ...base, image: odd.toString('base64'), strength: 0.5, height: 32, width: 48, resize_mode: 'crop' });
    expect(preds(sized.json).map((p) => [p.width, p.height])).toEqual([[48, 32]]);
  });

  it('resize_mode crop of an elongated image: the centre of its scaled copy, computed alone (whole, 6 GB: a 500)', async () => {
    // 65535x2 covering 256x256 is scaled to 8388480x256 before the crop.
    const strip = await sharp(Buffer.alloc(65535 * 2 * 3, 90), { raw: { width: 65535, height: 2, channels: 3 } }).png().toBuffer();
    const r = await predict(demo, { ...base, num_inference_steps: 2, image: strip.toString('base64'), height: 256, width: 256, resize_mode: 'crop' });
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect(preds(r.json).map((p) => [p.width, p.height])).toEqual([[256, 256]]);
  });

  it('strength 0 returns the input encoded and decoded, whatever the prompt and guidance', async () => {
    const a = await predict(demo, { ...base, image: pic.toString('base64'), strength: 0 });
    const b = await predict(demo, { ...base, prompt: 'something else entirely', guidance_scale: 2, scheduler: 'euler_a', image: pic.toString('base64'), strength: 0 });
    expect([a.status, b.status]).toEqual([200, 200]);
    expect(preds(a.json)[0]!.image.b64 === preds(b.json)[0]!.image.b64).toBe(true);
    // …and the prompt matters as soon as a step runs.
    const c = await predict(demo, { ...base, image: pic.toString('base64'), strength: 0.5 });
    const d = await predict(demo, { ...base, prompt: 'something else entirely', image: pic.toString('base64'), strength: 0.5 });
    expect(preds(c.json)[0]!.image.b64 === preds(d.json)[0]!.image.b64).toBe(false);
  });

  it('inpainting with nothing to repaint (a black mask) keeps the encoded input: the strength-0 image', async () => {
    const none = await circleMask(64, 64, 0);
    const kept = await predict(demo, { ...base, image: pic.toString('base64'), mask_image: none.toString('base64') });
    const s0 = await predict(demo, { ...base, image: pic.toString('base64'), strength: 0 });
    expect([kept.status, s0.status]).toEqual([200, 200]);
    expect(preds(kept.json)[0]!.image.b64 === preds(s0.json)[0]!.image.b64).toBe(true);
    const repainted = await predict(demo, { ...base, image: pic.toString('base64'), mask_image: mask.toString('base64') });
    expect(preds(repainted.json)[0]!.image.b64 === preds(s0.json)[0]!.image.b64).toBe(false);
  });

  it('gives the same image over V1, V2 (JSON and binary BYTES, FP32 strength), the WebSocket and an s3:// input', async () => {
    // 10 steps: int(10 · 0.7) = 7, but int(10 · float32(0.7)) = int(6.99999988) = 6 — FP32 must read as 0.7.
    const inst = { ...base, num_inference_steps: 10, image: pic.toString('base64'), strength: 0.7, num_images_per_prompt: 2 };
    const v1 = await predict(demo, inst);
    expect(v1.status, JSON.stringify(v1.json)).toBe(200);
    const want = preds(v1.json).map((p) => p.image.b64);
    expect(new Set(want).size).toBe(2);

    const v2json = await postJson(`${demo.url}/v2/models/model/infer`, {
      inputs: [
        { name: 'prompt', datatype: 'BYTES', shape: [1], data: [base.prompt] },
        { name: 'image', datatype: 'BYTES', shape: [1], data: [inst.image] },
      ],
      parameters: { seed: base.seed, num_inference_steps: 10, strength: 0.7, num_images_per_prompt: 2 },
    });
    expect(v2json.status, JSON.stringify(v2json.json)).toBe(200);
    expect((v2json.json.outputs as Array<{ name: string; data: string[] }>).find((o) => o.name === 'image')!.data).toEqual(want);

    // Binary: the PNG's own bytes as the BYTES element, strength as an FP32 input (0.7f reads as 0.7).
    const strength = Buffer.alloc(4);
    strength.writeFloatLE(0.7);
    const len = Buffer.alloc(4);
    len.writeUInt32LE(pic.length);
    const header = Buffer.from(JSON.stringify({
      inputs: [
        { name: 'prompt', datatype: 'BYTES', shape: [1], data: [base.prompt] },
        { name: 'image', datatype: 'BYTES', shape: [1], parameters: { binary_data_size: 4 + pic.length } },
        { name: 'strength', datatype: 'FP32', shape: [1], parameters: { binary_data_size: 4 } },
      ],
      parameters: { seed: base.seed, num_inference_steps: 10, num_images_per_prompt: 2 },
    }));
    const res = await fetch(`${demo.url}/v2/models/model/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) },
      body: Buffer.concat([header, len, pic, strength]),
    });
    const body = (await res.json()) as { outputs: Array<{ name: string; data: string[] }> };
    expect(res.status, JSON.stringify(body)).toBe(200);
    expect(body.outputs.find((o) => o.name === 'image')!.data).toEqual(want);

    const viaS3 = await predict(demo, { ...inst, image: 's3://inputs/pic.png' });
    expect(viaS3.status, JSON.stringify(viaS3.json)).toBe(200);
    expect(preds(viaS3.json).map((p) => p.image.b64)).toEqual(want);

    const messages: Array<Record<string, unknown>> = [];
    const ws = new WebSocket(`ws://127.0.0.1:${demo.port}/v1/models/model/stream`);
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => ws.send(JSON.stringify({ ...inst, image: `data:image/png;base64,${inst.image}` })));
      ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
      ws.on('close', () => resolve());
      ws.on('error', reject);
    });
    expect(messages[0]).toEqual({ type: 'accepted', seed: base.seed, images: 2 });
    // PNDM's 10 steps are 11 UNet calls; strength 0.7 keeps int(10 · 0.7) = 7 steps, from the 4th of the 11: 8 calls.
    expect(messages.filter((m) => m.type === 'progress').map((m) => [m.step, m.of])).toEqual(Array.from({ length: 8 }, (_, k) => [k + 1, 8]));
    const result = messages.at(-1)!;
    expect(result.type).toBe('result');
    expect((result.images as Array<{ b64: string }>).map((i) => i.b64)).toEqual(want);
  });

  it('cuts a two-runs-per-step schedule (heun, dpmpp_sde) at t_start·2, as diffusers does: progress counts the UNet runs left', async () => {
    for (const scheduler of ['heun', 'dpmpp_sde']) {
      const messages: Array<Record<string, unknown>> = [];
      const ws = new WebSocket(`ws://127.0.0.1:${demo.port}/v1/models/model/stream`);
      await new Promise<void>((resolve, reject) => {
        ws.on('open', () => ws.send(JSON.stringify({ ...base, num_inference_steps: 5, scheduler, image: pic.toString('base64'), strength: 0.6 })));
        ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
        ws.on('close', () => resolve());
        ws.on('error', reject);
      });
      // 5 steps are 9 UNet runs; int(5 · 0.6) = 3 steps kept, t_start = 2, so the schedule starts at index 4: 5 runs.
      expect(messages.filter((m) => m.type === 'progress').map((m) => [m.step, m.of]), scheduler).toEqual(Array.from({ length: 5 }, (_, k) => [k + 1, 5]));
      expect(messages.at(-1)!.type, scheduler).toBe('result');
    }
  });

  it('runs a stochastic scheduler (sa_solver: a draw every step) on a cut schedule, inpainting too: a seed gives one image, another seed another', async () => {
    for (const extra of [{ strength: 0.6 }, { mask_image: mask.toString('base64') }]) {
      const inst = { ...base, num_inference_steps: 8, scheduler: 'sa_solver', image: pic.toString('base64'), ...extra };
      const [a, again, other] = [await predict(demo, inst), await predict(demo, inst), await predict(demo, { ...inst, seed: 22 })];
      expect([a.status, again.status, other.status], JSON.stringify(a.json)).toEqual([200, 200, 200]);
      const b64 = (r: { json: Record<string, unknown> }) => preds(r.json)[0]!.image.b64;
      expect(b64(again) === b64(a)).toBe(true);
      expect(b64(other) === b64(a)).toBe(false);
      expect(b64(a) === b64(await predict(demo, { ...inst, scheduler: 'unipc' }))).toBe(false);
    }
  });

  it('never batches requests with different inputs, and a batch gives each request the image it gets alone', async () => {
    const insts = [
      { ...base, seed: 11 },
      { ...base, seed: 12, image: pic.toString('base64'), strength: 0.6 },
      { ...base, seed: 13, prompt: 'a river', image: pic.toString('base64'), strength: 0.6 },
      { ...base, seed: 14, image: pic2.toString('base64'), strength: 0.6 },
      { ...base, seed: 15, image: pic.toString('base64'), strength: 0.5 },
    ];
    const alone: string[] = [];
    for (const inst of insts) alone.push(preds((await predict(demo, inst)).json)[0]!.image.b64);
    // Sent together within the batch window: only the two requests on image A at strength 0.6 may share a batch.
    const count0 = await metric(batcher, 'inference_batch_size_count');
    const sum0 = await metric(batcher, 'inference_batch_size_sum');
    const together = await Promise.all(insts.map((inst) => predict(batcher, inst)));
    expect(together.map((r) => r.status)).toEqual([200, 200, 200, 200, 200]);
    expect((await metric(batcher, 'inference_batch_size_count')) - count0).toBe(4);
    expect((await metric(batcher, 'inference_batch_size_sum')) - sum0).toBe(5);
    expect(together.map((r) => preds(r.json)[0]!.image.b64)).toEqual(alone);
  });
});

describe('GIF, TIFF and BMP inputs (img2img/decode: what diffusers\' load_image reads beyond PNG, JPEG and WebP)', () => {
  const decodeDir = path.join(REFERENCE(), 'img2img', 'decode');
  const b64 = (file: string) => readFileSync(path.join(decodeDir, file)).toString('base64');
  const base = { prompt: 'a castle', num_inference_steps: 4, seed: 5, height: 64, width: 64 };

  // Each generates what Pillow's decode of it (<input>.rgb.png, a PNG the runtime reads as Pillow does) generates.
  it.each([
    'gif-transparent-index.gif', 'gif-first-frame-offset-transparent.gif', 'gif-animated-optimized.gif', 'gif-interlaced.gif',
    'tiff-cmyk.tif', 'tiff-16-bit-grey.tif', 'tiff-xmp-orientation-8.tif', 'tiff-jpeg.tif',
    'bmp-rle8.bmp', 'bmp-16-565.bmp', 'bmp-32-alpha-v5.bmp',
  ])('%s generates what its Pillow decode generates', async (file) => {
    const [got, want] = await Promise.all([predict(demo, { ...base, image: b64(file), strength: 0.6 }), predict(demo, { ...base, image: b64(`${file}.rgb.png`), strength: 0.6 })]);
    expect([got.status, want.status], JSON.stringify(got.json)).toEqual([200, 200]);
    expect(preds(got.json)[0]!.image.b64 === preds(want.json)[0]!.image.b64).toBe(true);
  });

  it('a GIF mask repaints what its Pillow decode repaints (convert("L") of the decoded RGB)', async () => {
    // The transparent index's colour (index 7's) is the mask's value there, not black.
    const image = b64('gif-first-frame-offset.gif.rgb.png');
    const [got, want] = await Promise.all([
      predict(demo, { ...base, image, mask_image: b64('gif-first-frame-offset-transparent.gif') }),
      predict(demo, { ...base, image, mask_image: b64('gif-first-frame-offset-transparent.gif.rgb.png') }),
    ]);
    expect([got.status, want.status], JSON.stringify(got.json)).toEqual([200, 200]);
    expect(preds(got.json)[0]!.image.b64 === preds(want.json)[0]!.image.b64).toBe(true);
  });

  it('a header claiming more pixels than its file holds is the same 400 as a PNG\'s, and a truncated BMP names Pillow\'s reason', async () => {
    const tooMany = 'instances[0].image has more than 16777216 pixels, the most an input image may have';
    const cases: Array<[Buffer, string]> = [
      [await gif1x1({ screen: [65535, 65535] }), tooMany],
      [tiff([{ width: 100000, height: 100000, data: Buffer.from([7]) }]), tooMany],
      [readFileSync(path.join(decodeDir, 'bmp-24.bmp')).subarray(0, 100), 'instances[0].image could not be decoded as BMP: the file ends inside its pixels'],
      // A first image of no pixels: Pillow's load() refuses its tile (x0 = x1 = 0 would be the whole screen, here 0x0).
      [await gif1x1({ screen: [0, 0], frame: [0, 0, 0, 0] }), 'instances[0].image could not be decoded as GIF: tile cannot extend outside image'],
      [await gif1x1({ screen: [8, 8], frame: [2, 2, 0, 1] }), 'instances[0].image could not be decoded as GIF: tile cannot extend outside image'],
    ];
    for (const [file, error] of cases) {
      const r = await predict(demo, { ...base, image: file.toString('base64') });
      expect([r.status, r.json.code, r.json.error]).toEqual([400, 'INVALID_INPUT', error]);
    }
  });
});

describe('bad image inputs answer 400 naming the field', () => {
  const ok = { prompt: 'p', num_inference_steps: 4, seed: 1 };
  /** The start of an HEIC file (iPhones'), a format neither diffusers' Pillow nor this server reads. */
  const HEIC = Buffer.from('\0\0\0\x18ftypheic\0\0\0\0mif1heic');
  const cases: Array<[string, () => Record<string, unknown> | Promise<Record<string, unknown>>, RegExp | string]> = [
    ['an undecodable image', () => ({ ...ok, image: Buffer.from('hello, not a picture').toString('base64') }), 'instances[0].image is not an image format this server reads; send a PNG, JPEG, WebP, GIF, TIFF or BMP image'],
    ['a truncated PNG', () => ({ ...ok, image: pic.subarray(0, 200).toString('base64') }), /^instances\[0\]\.image could not be decoded as PNG: /],
    ['a GIF cut inside its header', () => ({ ...ok, image: Buffer.from('GIF89a....').toString('base64') }), 'instances[0].image could not be decoded as GIF: the file ends inside its header'],
    ['an HEIC', () => ({ ...ok, image: HEIC.toString('base64') }), 'instances[0].image is an HEIF; send a PNG, JPEG, WebP, GIF, TIFF or BMP image'],
    ['an image that is not a string', () => ({ ...ok, image: 42 }), /^instances\[0\]\.image must be a base64-encoded PNG, JPEG, WebP, GIF, TIFF or BMP image \(or a data: URL\) or an s3:\/\/bucket\/key URI, got number$/],
    ['text that is not base64', () => ({ ...ok, image: 'a picture of a cat!' }), /^instances\[0\]\.image is neither base64 nor an s3:\/\/ URI/],
    ['an http URL', () => ({ ...ok, image: 'https://example.com/cat.png' }), 'instances[0].image: https:// URLs are not fetched; send the image as base64 or as an s3:// URI'],
    ['strength above 1', () => ({ ...ok, image: pic.toString('base64'), strength: 1.5 }), 'instances[0].strength must be a number from 0 to 1, got 1.5'],
    ['strength as a string', () => ({ ...ok, image: pic.toString('base64'), strength: '0.5' }), 'instances[0].strength must be a number from 0 to 1, got "0.5"'], // the value, as every other field shows it (was "got string")
    ['strength without an image', () => ({ ...ok, strength: 0.5 }), 'instances[0].strength needs an instances[0].image to work on'],
    ['a mask without an image', () => ({ ...ok, mask_image: mask.toString('base64') }), 'instances[0].mask_image needs an instances[0].image to work on'],
    ['a mask of another size', async () => ({ ...ok, image: pic.toString('base64'), mask_image: (await circleMask(48, 64)).toString('base64') }),
      'instances[0].mask_image is 48x64 but instances[0].image is 64x64; they must have the same size'],
    ['an unknown resize_mode', () => ({ ...ok, image: pic.toString('base64'), resize_mode: 'stretch' }), 'instances[0].resize_mode must be one of default, crop, fill, got "stretch"'],
    ['inpainting with no step left', () => ({ ...ok, image: pic.toString('base64'), mask_image: mask.toString('base64'), strength: 0.2 }),
      'instances[0].strength 0.2 × num_inference_steps 4 leaves no denoising step; inpainting needs strength × num_inference_steps >= 1'],
    // Pillow cannot resize to a side of 0 (diffusers raises): was a 500 from the worker.
    ['resize_mode fill of an image more elongated than the output', async () => ({ ...ok, image: (await picture(600, 1)).toString('base64'), height: 64, width: 64, resize_mode: 'fill' }),
      'instances[0].image is 600x1: resize_mode "fill" would scale it to 64x0 to fit 64x64; use resize_mode "crop" or "default", or a less elongated image'],
    // Its resize weights alone took 400 MB of the worker at 16777216x1.
    ['an image longer than 65535 pixels', async () => ({ ...ok, image: (await picture(65536, 1)).toString('base64'), height: 64, width: 64 }),
      'instances[0].image is 65536x1; an input image may have at most 65535 pixels a side'],
    ['a missing s3:// object', () => ({ ...ok, image: 's3://inputs/nope.png' }), /^instances\[0\]\.image: s3:\/\/inputs\/nope\.png does not exist \(NoSuchKey\)$/],
    ['an s3:// object that is not an image', () => ({ ...ok, image: 's3://inputs/not-an-image.txt' }), 'instances[0].image is not an image format this server reads; send a PNG, JPEG, WebP, GIF, TIFF or BMP image'],
  ];

  it.each(cases)('%s', async (_name, inst, want) => {
    const r = await predict(demo, await inst());
    expect(r.status).toBe(400);
    expect(r.json.code).toBe('INVALID_INPUT');
    if (typeof want === 'string') expect(r.json.error).toBe(want);
    else expect(r.json.error).toMatch(want);
  });

  it('answers text that is almost base64 at once: a long run of whitespace before a stray character', async () => {
    // The check must be linear: a backtracking one took over a minute on this body (and ~13 minutes on a 1 MiB one), with
    // the event loop, health probes included, held all that time.
    const r = await predict(demo, { ...ok, image: `A${' '.repeat(300_000)}!` });
    expect(r.status).toBe(400);
    expect(r.json.error).toMatch(/^instances\[0\]\.image is neither base64 nor an s3:\/\/ URI/);
    // Padding, line breaks and the URL-safe alphabet still pass this check (and decode).
    const wrapped = pic.toString('base64url').replace(/(.{76})/g, '$1\r\n');
    expect((await predict(demo, { ...ok, image: `${wrapped}${'='.repeat((4 - (pic.toString('base64url').length % 4)) % 4)}\n` })).status).toBe(200);
  }, 15_000);

  it("points AUTOMATIC1111's img2img names to ours", async () => {
    const r = await predict(demo, { ...ok, init_images: [pic.toString('base64')], denoising_strength: 0.5, mask: 'x' });
    expect(r.status).toBe(400);
    expect(r.json.error).toBe([
      'instances[0].init_images is not a known field (AUTOMATIC1111\'s name); did you mean "image"?',
      'instances[0].denoising_strength is not a known field (AUTOMATIC1111\'s name); did you mean "strength"?',
      'instances[0].mask is not a known field (AUTOMATIC1111\'s name); did you mean "mask_image"?',
    ].join('; '));
  });

  it('lists every problem of a body at once, per instance', async () => {
    const r = await predict(demo, [{ ...ok, image: 'https://x/y.png', strength: 3 }, { ...ok, image: pic.toString('base64') }, { ...ok, image: HEIC.toString('base64') }]);
    expect(r.status).toBe(400);
    expect(r.json.error).toBe(
      'instances[0].strength must be a number from 0 to 1, got 3; instances[0].image: https:// URLs are not fetched; send the image as base64 or as an s3:// URI',
    );
    const decode = await predict(demo, [{ ...ok, image: pic.toString('base64') }, { ...ok, image: HEIC.toString('base64') }]);
    expect(decode.json.error).toBe('instances[1].image is an HEIF; send a PNG, JPEG, WebP, GIF, TIFF or BMP image');
  });

  it('V2 and the WebSocket name the field their way', async () => {
    const v2 = await postJson(`${demo.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['p'] }, { name: 'image', datatype: 'FP32', shape: [1], data: [1] }],
    });
    expect([v2.status, v2.json.error]).toEqual([400, 'input "image" must have datatype BYTES, got FP32']);
    const v2b = await postJson(`${demo.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['p'] }, { name: 'image', datatype: 'BYTES', shape: [1], data: [pic.toString('base64')] }],
      parameters: { strength: -1 },
    });
    expect([v2b.status, v2b.json.error]).toEqual([400, 'parameters.strength must be a number from 0 to 1, got -1']);
    // A problem found once the images are read names the input tensor and its element too.
    const v2heic = await postJson(`${demo.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [2], data: ['p', 'q'] },
        { name: 'image', datatype: 'BYTES', shape: [2], data: [pic.toString('base64'), HEIC.toString('base64')] }],
      parameters: { num_inference_steps: 2 },
    });
    expect([v2heic.status, v2heic.json.error]).toEqual([400, 'input "image" data[1] is an HEIF; send a PNG, JPEG, WebP, GIF, TIFF or BMP image']);
    const v2mask = await postJson(`${demo.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['p'] }, { name: 'mask_image', datatype: 'BYTES', shape: [1], data: [mask.toString('base64')] }],
    });
    expect([v2mask.status, v2mask.json.error]).toEqual([400, 'input "mask_image" needs an image to work on']);
    const meta = await (await fetch(`${demo.url}/v2/models/model`)).json() as { inputs: Array<{ name: string; datatype: string }> };
    expect(meta.inputs.filter((i) => ['image', 'mask_image', 'strength', 'resize_mode'].includes(i.name))).toEqual([
      { name: 'image', datatype: 'BYTES', shape: [-1] }, { name: 'mask_image', datatype: 'BYTES', shape: [-1] },
      { name: 'strength', datatype: 'FP32', shape: [-1] }, { name: 'resize_mode', datatype: 'BYTES', shape: [-1] },
    ]);

    const messages: Array<Record<string, unknown>> = [];
    const closed = await new Promise<number>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${demo.port}/v1/models/model/stream`);
      ws.on('open', () => ws.send(JSON.stringify({ prompt: 'p', image: pic.toString('base64'), strength: 2 })));
      ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
      ws.on('close', (code) => resolve(code));
      ws.on('error', reject);
    });
    expect(closed).toBe(4400);
    expect(messages).toEqual([{ type: 'error', code: 'INVALID_INPUT', error: 'message.strength must be a number from 0 to 1, got 2' }]);
  });

  it('a model without vae_encoder takes no image', async () => {
    const r = await predict(textOnly, { ...ok, image: pic.toString('base64') });
    expect([r.status, r.json.error]).toEqual([400, 'instances[0].image: this model has no vae_encoder, so it serves text-to-image only; export it again with its VAE encoder (scripts/export-onnx.sh and optimum write vae_encoder/ by default)']);
  });
});

describe('an inpainting model (9-channel UNet, the demo variant)', () => {
  const inst = { prompt: 'a door', num_inference_steps: 5, seed: 5 };

  it('inpaints, and needs both image and mask_image', async () => {
    const r = await predict(inpaintDemo, { ...inst, image: pic.toString('base64'), mask_image: mask.toString('base64'), num_images_per_prompt: 2 });
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect(preds(r.json).map((p) => [p.seed, p.width, p.height])).toEqual([[5, 64, 64], [6, 64, 64]]);
    const text = await predict(inpaintDemo, inst);
    expect([text.status, text.json.error]).toEqual([400, 'instances[0].image and instances[0].mask_image are required: this is an inpainting model (its UNet takes the mask and the masked image), it cannot generate from text alone']);
    const noMask = await predict(inpaintDemo, { ...inst, image: pic.toString('base64') });
    expect([noMask.status, noMask.json.error]).toEqual([400, 'instances[0].mask_image is required: this is an inpainting model (its UNet takes the mask and the masked image)']);
  });

  it('keys the result cache on the inputs: another mask is a new generation, the same request a hit', async () => {
    const req = { ...inst, image: pic.toString('base64'), mask_image: mask.toString('base64'), strength: 0.8 };
    const first = await predict(inpaintDemo, req);
    const images0 = await metric(inpaintDemo, 'images_generated_total');
    const again = await predict(inpaintDemo, req);
    expect(await metric(inpaintDemo, 'images_generated_total')).toBe(images0);
    expect(preds(again.json)[0]!.image.b64 === preds(first.json)[0]!.image.b64).toBe(true);
    const otherMask = await predict(inpaintDemo, { ...req, mask_image: (await circleMask(64, 64, 255)).toString('base64') });
    const otherImage = await predict(inpaintDemo, { ...req, image: pic2.toString('base64') });
    const otherStrength = await predict(inpaintDemo, { ...req, strength: 1 });
    expect(await metric(inpaintDemo, 'images_generated_total')).toBe(images0 + 3);
    const all = [first, otherMask, otherImage, otherStrength].map((r) => preds(r.json)[0]!.image.b64);
    expect(new Set(all).size).toBe(4);
  });

  it('warmed up by inpainting (it cannot generate from text)', async () => {
    const warm = inpaintDemo.all('warmup-done');
    expect(warm).toHaveLength(1);
    expect(Object.keys(warm[0]!.stages)).toContain('vaeEncoder');
  });
});


describe('an output size its format cannot hold', () => {
  it('a WebP over 16383 pixels a side (MAX_IMAGE_SIZE goes to 16384) is a 400 before any generation, whether the size is given or taken from the input image', async () => {
    const big = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '0', MAX_IMAGE_SIZE: '16384', RESULT_CACHE_MB: '0' }, { ready: true });
    try {
      const base = { prompt: 'a', num_inference_steps: 1, seed: 1, output_format: 'webp' };
      const given = await predict(big, { ...base, height: 64, width: 16384 });
      expect([given.status, given.json]).toEqual([400, { error: 'instances[0]: output_format webp holds at most 16383 pixels a side, and the image would be 16384x64; ask for png or jpeg, or a smaller size', code: 'INVALID_INPUT' }]);
      const strip = await picture(16384, 8);
      const taken = await predict(big, { ...base, image: strip.toString('base64'), strength: 0.5 });
      expect([taken.status, taken.json]).toEqual([400, { error: 'instances[0].image is 16384x8: output_format webp holds at most 16383 pixels a side, and the image would be 16384x8; ask for png or jpeg, or a smaller size', code: 'INVALID_INPUT' }]);
      expect(await metric(big, 'images_generated_total')).toBe(0);
      // PNG holds it: the same size from the same image is served.
      const png = await predict(big, { ...base, output_format: 'png', image: strip.toString('base64'), strength: 0.5 });
      expect([png.status, preds(png.json)[0]?.width]).toEqual([200, 16384]);
    } finally {
      await big.stop(0);
    }
  });
});
