/**
 * Image-to-image and inpainting parity with diffusers, through the runtime (in-process, over HTTP): every case of img2img/cases (made by
 * diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline, scripts/make-img2img-reference.py) is
 * asked for over V1 from the model it was made with, and each image must equal diffusers' up to off-by-one on under
 * 1% of the values (the text-to-image bound of e2e.test.ts).
 */
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pixelDiff } from '../scripts/e2e-case.js';
import { assembleModel, img2imgInstance, readImg2imgCases, type Img2imgCase } from '../scripts/img2img-case.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { REFERENCE, postJson, tempDir } from './helpers/server.js';

const ref = REFERENCE();
const cases = readImg2imgCases(ref);
const servers: Partial<Record<Img2imgCase['model'], RuntimeHandle>> = {};
const { dir, cleanup } = tempDir('dr-img2img-');

beforeAll(async () => {
  await Promise.all((['sd', 'inpaint'] as const).map(async (m) => {
    const model = assembleModel(ref, m, path.join(dir, m));
    servers[m] = await startRuntime({ STORAGE_URI: model, MODEL_CACHE_DIR: path.join(dir, `cache-${m}`), WARMUP_STEPS: '1', MAX_BODY_BYTES: String(4 << 20) }, { ready: true });
  }));
});
afterAll(async () => {
  await Promise.all(Object.values(servers).map((s) => s.stop()));
  cleanup();
});

async function compare(id: string, k: number, b64: string) {
  const got = await sharp(Buffer.from(b64, 'base64')).raw().toBuffer({ resolveWithObject: true });
  const want = await sharp(path.join(ref, 'img2img', 'cases', id, `image-${k}.png`)).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  expect([got.info.width, got.info.height, got.info.channels]).toEqual([want.info.width, want.info.height, want.info.channels]);
  const d = pixelDiff(got.data, want.data);
  console.log(`${id}[${k}]: ${d.values} values, ${d.offByOne} off by one (${((100 * d.offByOne) / d.values).toFixed(3)}%), ${d.offByMore} off by more, max |Δ| ${d.maxDiff}`);
  expect(d.offByMore).toBe(0);
  expect(d.offByOne / d.values).toBeLessThan(0.01);
}

describe('image-to-image and inpainting match diffusers', () => {
  it('has cases of every kind', () => {
    const kinds = new Set(cases.map((c) => `${c.mode}/${c.model}`));
    expect([...kinds].sort()).toEqual(['img2img/sd', 'inpaint/inpaint', 'inpaint/sd']);
  });

  it.each(cases.map((c) => [c.id, c] as const))('%s', async (id, c) => {
    const srv = servers[c.model]!;
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [img2imgInstance(ref, c)] });
    const errors = () => srv.logs.filter((l) => l.level === 'error').slice(-3).map((l) => JSON.stringify(l)).join('\n');
    expect(r.status, `${JSON.stringify(r.json).slice(0, 400)}\n${errors()}`).toBe(200);
    const preds = r.json.predictions as Array<{ image: { b64: string }; seed: number; width: number; height: number }>;
    expect(preds.length).toBe(c.output.length);
    for (const [k, p] of preds.entries()) {
      expect([p.height, p.width]).toEqual(c.output[k]);
      expect(p.seed).toBe(c.request.seed + k);
      await compare(id, k, p.image.b64);
    }
  });
});
