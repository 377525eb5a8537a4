/**
 * DEFAULT_SCHEDULER / DEFAULT_STEPS on the built server over real sockets: what a request that names neither runs,
 * the same image as a request naming them, a WebSocket client seeing that many UNet runs; a default the model cannot
 * run fails the boot with a CONFIG reason on the model endpoint. And the model's own defaults: a request leaving out
 * guidance_scale, num_inference_steps or strength gets what diffusers' pipeline class for the model and mode uses.
 */
import path from 'node:path';
import sharp from 'sharp';
import WebSocket from 'ws';
import { afterAll, describe, expect, it } from 'vitest';
import { FAMILIES } from '../src/demo/families.js';
import { editJson, fixtureModel, fixtureVariant } from './fixtures/index.js';
import { postJson, startServer, tempDir, type ServerHandle } from './helpers/server.js';

const servers: ServerHandle[] = [];
const temps: Array<() => void> = [];
afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop()));
  for (const cleanup of temps) cleanup();
});

const b64 = (r: { json: Record<string, unknown> }) => (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

describe('DEFAULT_SCHEDULER and DEFAULT_STEPS', () => {
  it('run for a request that names neither, exactly as a request naming them; one naming others is unchanged', async () => {
    const common = { STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0' };
    const [srv, plain] = await Promise.all([
      startServer({ ...common, DEFAULT_SCHEDULER: 'unipc', DEFAULT_STEPS: '7', DEFAULT_GUIDANCE: '3' }, { ready: true }),
      startServer(common, { ready: true }),
    ]);
    servers.push(srv, plain);
    const base = { prompt: 'a lighthouse at dusk', seed: 11, height: 64, width: 64 };
    const predict = (s: ServerHandle, inst: Record<string, unknown>) => postJson(`${s.url}/v1/models/model:predict`, { instances: [inst] });
    const defaulted = await predict(srv, base);
    expect(defaulted.status, JSON.stringify(defaulted.json).slice(0, 300)).toBe(200);
    const named = await predict(plain, { ...base, scheduler: 'unipc', num_inference_steps: 7, guidance_scale: 3 });
    expect(b64(defaulted) === b64(named)).toBe(true);
    expect(b64(defaulted) === b64(await predict(plain, base))).toBe(false);
    const other = { ...base, scheduler: 'euler_a', num_inference_steps: 3, guidance_scale: 7.5 };
    expect(b64(await predict(srv, other)) === b64(await predict(plain, other))).toBe(true);

    const messages: Array<Record<string, unknown>> = [];
    const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/model/stream`);
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => ws.send(JSON.stringify(base)));
      ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
      ws.on('close', () => resolve());
      ws.on('error', reject);
    });
    expect(messages.filter((m) => m.type === 'progress').map((m) => m.of)).toEqual(Array(7).fill(7));
  });

  it('a request whose scheduler cannot run DEFAULT_STEPS is told the steps are the server\'s default, not its own', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '1', DEFAULT_STEPS: '60' }, { ready: true });
    servers.push(srv);
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'x', scheduler: 'lcm', height: 64, width: 64 }] });
    expect([r.status, r.json]).toEqual([400, { code: 'INVALID_INPUT', error: 'instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm '
      + "(original_inference_steps is 50), got 60 (not sent: the server's default, DEFAULT_STEPS; send num_inference_steps)" }]);
    // Sent, the same value is the client's own.
    const sent = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'x', scheduler: 'lcm', num_inference_steps: 60, height: 64, width: 64 }] });
    expect(sent.json.error).toBe('instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 60');
  });

  it('a default the model cannot run fails the boot with a CONFIG reason naming the variable', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, DEFAULT_SCHEDULER: 'lcm', DEFAULT_STEPS: '60' });
    servers.push(srv);
    const failed = await srv.waitFor('state', (s) => s.state === 'failed');
    expect(String(failed.reason)).toBe('CONFIG: DEFAULT_STEPS must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 60');
    const m = await fetch(`${srv.url}/v1/models/model`);
    expect(m.status).toBe(503);
    expect(((await m.json()) as { reason: string }).reason).toMatch(/^CONFIG: DEFAULT_STEPS must be from 1 to 50 for scheduler lcm/);
  });
});

describe("the model's defaults are those of diffusers' pipeline class for its mode", () => {
  const common = { WARMUP_STEPS: '1', RESULT_CACHE_MB: '0' };
  const predict = (srv: ServerHandle, inst: Record<string, unknown>) => postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst] });
  const image = async (srv: ServerHandle, inst: Record<string, unknown>) => {
    const r = await predict(srv, inst);
    expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
    return b64(r);
  };
  /** Whether `inst` gives the image `want` (base64): compared here, so a failure prints no image. */
  const gives = async (srv: ServerHandle, want: string, inst: Record<string, unknown>) => want === (await image(srv, inst));

  it('SDXL: guidance 5.0 (text-to-image, image-to-image), strength 0.3 (image-to-image), 7.5 and 0.9999 (inpainting)', async () => {
    const srv = await startServer({ ...common, STORAGE_URI: await fixtureModel({ family: 'sdxl', withVaeEncoder: true }) }, { ready: true });
    servers.push(srv);
    const png = (r: number) => sharp({ create: { width: 64, height: 64, channels: 3, background: { r, g: 90, b: 160 } } }).png().toBuffer();
    const [pic, mask] = (await Promise.all([png(200), png(255)])).map((b) => b.toString('base64'));
    // StableDiffusionXLPipeline: 50 steps, guidance 5.0 (7.5 was the Stable Diffusion default given before).
    const text = { prompt: 'a lighthouse at dusk', seed: 5, height: 64, width: 64 };
    const t = await image(srv, text);
    expect(await gives(srv, t, { ...text, num_inference_steps: 50, guidance_scale: 5 })).toBe(true);
    expect(await gives(srv, t, { ...text, num_inference_steps: 50, guidance_scale: 7.5 })).toBe(false);
    // StableDiffusionXLImg2ImgPipeline: strength 0.3, guidance 5.0.
    const i2i = { prompt: 'a lighthouse at dusk', seed: 5, image: pic };
    const a = await image(srv, i2i);
    expect(await gives(srv, a, { ...i2i, num_inference_steps: 50, guidance_scale: 5, strength: 0.3 })).toBe(true);
    expect(await gives(srv, a, { ...i2i, guidance_scale: 7.5, strength: 0.8 })).toBe(false);
    // StableDiffusionXLInpaintPipeline: strength 0.9999 (49 of 50 steps, from the noised picture), guidance 7.5.
    const inp = { ...i2i, mask_image: mask };
    const m = await image(srv, inp);
    expect(await gives(srv, m, { ...inp, num_inference_steps: 50, guidance_scale: 7.5, strength: 0.9999 })).toBe(true);
    expect(await gives(srv, m, { ...inp, strength: 1 })).toBe(false);
    expect(await gives(srv, m, { ...inp, guidance_scale: 5 })).toBe(false);
    // As diffusers raises, one step leaves none at 0.9999: the 400 says the strength is the default.
    expect((await predict(srv, { ...inp, num_inference_steps: 1 })).json.error).toBe('instances[0].strength 0.9999 (not sent: this model\'s default '
      + 'for inpainting; send strength) × num_inference_steps 1 leaves no denoising step; inpainting needs strength × num_inference_steps >= 1');
  });

  it('an SD pipeline with an LCMScheduler (an LCM-LoRA fused in) and a UNet without timestep_cond: 50 steps and 7.5, not LCM\'s 4 and 8.5', async () => {
    const tmp = tempDir('dr-lcm-lora-');
    temps.push(tmp.cleanup);
    const model = await fixtureVariant(path.join(tmp.dir, 'model'), { family: 'sd15' }, (d) => {
      editJson(path.join(d, 'scheduler', 'scheduler_config.json'), (c) => {
        for (const k of Object.keys(c)) delete c[k];
        Object.assign(c, FAMILIES.lcm.scheduler);
      });
      editJson(path.join(d, 'model_index.json'), (c) => void (c.scheduler = ['diffusers', 'LCMScheduler']));
    });
    const srv = await startServer({ ...common, STORAGE_URI: model }, { ready: true });
    servers.push(srv);
    const text = { prompt: 'a lighthouse at dusk', seed: 5, height: 64, width: 64 };
    const t = await image(srv, text);
    expect(await gives(srv, t, { ...text, num_inference_steps: 50, guidance_scale: 7.5 })).toBe(true);
    expect(await gives(srv, t, { ...text, num_inference_steps: 4, guidance_scale: 8.5 })).toBe(false);
  });
});
