/**
 * End-to-end parity with diffusers: every case under E2E_REFERENCE_DIR/cases is generated through the
 * runtime (in-process, over HTTP) from a copy of E2E_REFERENCE_DIR/model whose scheduler config is the case's, and must
 * equal the image diffusers made, up to off-by-one on under 1% of the values.
 */
import { cpSync, existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { afterAll, describe, expect, it } from 'vitest';
import { caseRequest, pixelDiff, readCase, writeCaseScheduler } from '../scripts/e2e-case.js';
import { startRuntime } from './helpers/runtime.js';
import { REFERENCE, postJson, startServer, tempDir } from './helpers/server.js';

const E2E = path.resolve(process.env.E2E_REFERENCE_DIR ?? path.join(REFERENCE(), 'e2e'));
const casesDir = path.join(E2E, 'cases');
const cases = existsSync(casesDir) ? readdirSync(casesDir).filter((d) => existsSync(path.join(casesDir, d, 'case.json'))).sort() : [];

const cleanups: Array<() => void> = [];
const servers: Array<{ stop(): Promise<unknown> }> = [];
afterAll(async () => {
  for (const s of servers) await s.stop();
  for (const c of cleanups) c();
});

describe('diffusers end-to-end reference', () => {
  it('has reference cases to check', () => {
    expect(cases.length).toBeGreaterThan(0);
  });

  it.each(cases)('%s matches the image diffusers generated', async (id) => {
    const c = readCase(casesDir, id);
    const { dir, cleanup } = tempDir('dr-e2e-');
    cleanups.push(cleanup);
    const model = path.join(dir, 'model');
    cpSync(path.join(E2E, 'model'), model, { recursive: true });
    writeCaseScheduler(model, c);
    const srv = await startRuntime({ STORAGE_URI: model, MODEL_CACHE_DIR: path.join(dir, 'cache'), WARMUP_STEPS: '1' }, { ready: true });
    servers.push(srv);
    const r = await postJson(`${srv.url}/v1/models/model:predict`, caseRequest(c));
    expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
    const got = await sharp(Buffer.from((r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64, 'base64')).raw().toBuffer({ resolveWithObject: true });
    const want = await sharp(path.join(casesDir, id, 'image.png')).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    expect([got.info.width, got.info.height, got.info.channels]).toEqual([want.info.width, want.info.height, want.info.channels]);
    const { offByOne: off1, offByMore: worse, maxDiff } = pixelDiff(got.data, want.data);
    console.log(`${id}: ${want.data.length} values, ${off1} off by one (${((100 * off1) / want.data.length).toFixed(3)}%), ${worse} off by more, max |Δ| ${maxDiff}`);
    expect(worse).toBe(0);
    expect(off1 / want.data.length).toBeLessThan(0.01);
    await srv.stop();
  });
});

describe('image sizes an exported UNet cannot take', () => {
  it('are refused with a 400 naming the multiple (they failed in ONNX Runtime as a 500); an image without a size is rounded to it', async () => {
    // The reference export's UNet has two blocks (one down-sampling): sides must be multiples of 16, not just 8.
    const { dir, cleanup } = tempDir('dr-e2e-sizes-');
    cleanups.push(cleanup);
    const srv = await startRuntime({ STORAGE_URI: path.join(E2E, 'model'), MODEL_CACHE_DIR: path.join(dir, 'cache'), WARMUP_STEPS: '1' }, { ready: true });
    servers.push(srv);
    const ask = (extra: Record<string, unknown>) => postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'x', num_inference_steps: 2, seed: 1, ...extra }] });
    const odd = await ask({ height: 72, width: 120 });
    expect([odd.status, odd.json.code]).toEqual([400, 'INVALID_INPUT']);
    expect(String(odd.json.error)).toBe('instances[0].height must be a multiple of 16 for this model (its exported UNet down-samples the latents by 2), got 72; instances[0].width must be a multiple of 16 for this model (its exported UNet down-samples the latents by 2), got 120');
    expect((await ask({ height: 80, width: 112 })).status).toBe(200);
    // A 77x61 picture: 72x56 by VaeImageProcessor's rule, which this UNet cannot take; 64x48 by its own multiple.
    const pic = (await sharp({ create: { width: 77, height: 61, channels: 3, background: { r: 200, g: 90, b: 40 } } }).png().toBuffer()).toString('base64');
    const img = await ask({ image: pic, strength: 0.5 });
    expect(img.status, JSON.stringify(img.json).slice(0, 300)).toBe(200);
    expect((img.json.predictions as Array<{ width: number; height: number }>)[0]).toMatchObject({ width: 64, height: 48 });
    await srv.stop();
  });
});

describe('determinism without PyTorch', () => {
  // Two processes of their own: nothing a process carries (its module state, its thread pool) may change the bytes.
  it('a fixed-seed generation on the demo model is byte-identical across runs and processes', async () => {
    const body = { instances: [{ prompt: 'a lighthouse at dusk', seed: 424242, num_inference_steps: 12, height: 192, width: 256, scheduler: 'euler_a' }] };
    const images: string[] = [];
    for (let p = 0; p < 2; p++) {
      const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '1' }, { ready: true });
      servers.push(srv);
      for (let run = 0; run < 2; run++) {
        const r = await postJson(`${srv.url}/v1/models/model:predict`, body);
        expect(r.status).toBe(200);
        images.push((r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64);
      }
      await srv.stop();
    }
    expect(new Set(images).size).toBe(1);
  });
});
