/**
 * The pipeline worker's auxiliary session threads (src/pipeline/aux.ts): a session there runs as a local one does,
 * its priming run happens after the creation is answered and before the next run, and a dead thread is reported.
 * The built modules are used: the thread's entry must be JavaScript.
 */
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { startRuntime } from './helpers/runtime.js';
import { postJson, ROOT, tempDir, until } from './helpers/server.js';
import { fixtureModel } from './fixtures/index.js';
import type { ImageInit, Job } from '../src/pipeline/job.js';
import { readLayout, type Component } from '../src/pipeline/model.js';
import { SessionFactory, type ModelSession } from '../src/pipeline/onnx.js';
import { Pipeline, type NoiseMaker, type Sessions } from '../src/pipeline/pipeline.js';
import { NO_OPTIMIZED_CACHE } from '../src/pipeline/ortcache.js';
import type { SessionProvider } from '../src/pipeline/provider.js';

type AuxModule = typeof import('../src/pipeline/aux-client.js');
type OnnxModule = typeof import('../src/pipeline/onnx.js');
const load = async () => ({
  aux: (await import(path.join(ROOT, 'dist/src/pipeline/aux-client.js'))) as AuxModule,
  onnx: (await import(path.join(ROOT, 'dist/src/pipeline/onnx.js'))) as OnnxModule,
});

/** The served size of the priming runs below: the demo's 8×8 latents, a VAE scale of 8. */
const size = { latentHeight: 8, latentWidth: 8, vaeScale: 8 };

/**
 * Runs `fn` with a decode thread whose priming runs are recorded, in order, in `order` (a test adds its own steps), on a
 * fresh demo model made with `fixture`; the thread is closed after. `heldEncoder()`: that model's VAE encoder on the
 * thread, its priming run held for the warm-up's end.
 */
async function withPrimingClient(
  fixture: Parameters<typeof fixtureModel>[0],
  fn: (t: { dir: string; client: InstanceType<AuxModule['AuxClient']>; order: string[]; heldEncoder: () => ReturnType<InstanceType<AuxModule['AuxClient']>['create']> }) => Promise<void>,
): Promise<void> {
  const { aux } = await load();
  const dir = await fixtureModel(fixture);
  const order: string[] = [];
  const client = new aux.AuxClient({ name: 'decode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, (_l, msg, obj) => {
    if (msg === 'session primed') order.push(`primed ${String(obj?.component)}`);
  }, () => undefined);
  const heldEncoder = () => client.create('vae_encoder', path.join(dir, 'vae_encoder', 'model.onnx'), 'cpu', { ...size, after: 'warm-up' });
  try {
    await fn({ dir, client, order, heldEncoder });
  } finally {
    await client.close();
  }
}

describe('auxiliary session thread', () => {
  it('runs a session as this thread would, primes it after answering the creation, before the next run', async () => {
    const { aux, onnx } = await load();
    const dir = await fixtureModel();
    const logs: Array<{ msg: string; obj?: Record<string, unknown> }> = [];
    const client = new aux.AuxClient({ name: 'decode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, (_l, msg, obj) => logs.push({ msg, ...(obj ? { obj } : {}) }), () => undefined);
    try {
      const file = path.join(dir, 'vae_decoder', 'model.onnx');
      const made = await client.create('vae_decoder', file, 'cpu', size);
      expect([...made.session.inputs.keys()]).toEqual(['latent_sample']);
      const latents = Float32Array.from({ length: 4 * 8 * 8 }, (_, i) => Math.sin(i));
      const remote = await made.session.run({ latent_sample: { data: latents, dims: [1, 4, 8, 8] } });
      // The run was queued behind the priming run, which logged when done.
      expect(logs.filter((l) => l.msg === 'session primed').map((l) => [l.obj?.component, l.obj?.thread])).toEqual([['vae_decoder', 'decode']]);
      const local = await new onnx.SessionFactory({ ep: 'cpu', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }).create('vae_decoder', file);
      const here = await local.session.run({ latent_sample: { data: latents, dims: [1, 4, 8, 8] } });
      expect(Object.keys(remote)).toEqual(Object.keys(here));
      for (const k of Object.keys(here)) {
        expect(remote[k]!.dims).toEqual(here[k]!.dims);
        expect(Buffer.from(remote[k]!.data.buffer).equals(Buffer.from(here[k]!.data.buffer))).toBe(true);
      }
      await local.session.release();
      await expect(client.create('vae_decoder', path.join(dir, 'missing', 'model.onnx'), 'cpu')).rejects.toThrow(/missing/);
    } finally {
      await client.close();
    }
    await expect(client.run(1, {})).rejects.toThrow(/closed/);
  });

  it('creates every session asked for before it primes any, so a load does not wait on a kernel search', () =>
    withPrimingClient(undefined, async ({ dir, client, order }) => {
      const created = ['vae_decoder', 'text_encoder'].map((c) => client.create(c, path.join(dir, c, 'model.onnx'), 'cpu', size).then((r) => (order.push(`created ${c}`), r)));
      const [dec] = await Promise.all(created);
      // A run asked for now still follows both priming runs.
      await dec!.session.run({ latent_sample: { data: new Float32Array(4 * 8 * 8), dims: [1, 4, 8, 8] } });
      order.push('ran vae_decoder');
      expect(order).toEqual(['created vae_decoder', 'created text_encoder', 'primed vae_decoder', 'primed text_encoder', 'ran vae_decoder']);
    }));

  it('settles: answers once its priming runs are done; with release, then runs the ones held for the warm-up\'s end', () =>
    withPrimingClient({ withVaeEncoder: true }, async ({ dir, client, order, heldEncoder }) => {
      const enc = await heldEncoder();
      await client.create('vae_decoder', path.join(dir, 'vae_decoder', 'model.onnx'), 'cpu', size);
      // The warm-up's end waits for the priming runs asked for before (the decoder's), not for the one held.
      expect(await client.settle(false)).toBe(0);
      order.push('settled');
      // Runs (the warm-up's own, at another size) do not release it; only the word that the warm-up has ended does.
      await enc.session.run({ sample: { data: new Float32Array(3 * 32 * 32), dims: [1, 3, 32, 32] } });
      order.push('ran vae_encoder at 32x32');
      expect(await client.settle(true)).toBe(1);
      order.push('released');
      await until(() => order.includes('primed vae_encoder'), 30_000);
      expect(order).toEqual(['primed vae_decoder', 'settled', 'ran vae_encoder at 32x32', 'released', 'primed vae_encoder']);
      expect(await client.settle(true)).toBe(0); // nothing is held any more
    }));

  it('drops a held priming run when its own session runs at that size first: that run paid the search', () =>
    withPrimingClient({ withVaeEncoder: true }, async ({ client, order, heldEncoder }) => {
      const enc = await heldEncoder();
      await enc.session.run({ sample: { data: new Float32Array(3 * 64 * 64), dims: [1, 3, 64, 64] } });
      order.push('ran vae_encoder');
      expect(await client.settle(true)).toBe(0);
      expect(order).toEqual(['ran vae_encoder']);
    }));

  it('keeps holding after a run at another size, holds each session made, never primes one released', () =>
    withPrimingClient({ withVaeEncoder: true }, async ({ client, order, heldEncoder }) => {
      // Released before its turn: never primed.
      await (await heldEncoder()).session.release();
      const primed = () => order.filter((o) => o === 'primed vae_encoder').length;
      const enc = await heldEncoder();
      expect(await client.settle(true)).toBe(1);
      await until(() => primed() === 1, 30_000);
      // Made again (a reload): held again; a run of its own at another size does not stand in for its priming run.
      await enc.session.release();
      order.push('reloaded');
      const again = await heldEncoder();
      await again.session.run({ sample: { data: new Float32Array(3 * 32 * 32), dims: [1, 3, 32, 32] } });
      order.push('ran vae_encoder at 32x32');
      expect(await client.settle(true)).toBe(1);
      await until(() => primed() === 2, 30_000);
      expect(order).toEqual(['primed vae_encoder', 'reloaded', 'ran vae_encoder at 32x32', 'primed vae_encoder']);
    }));

  it('holds the VAE encoder\'s priming for the warm-up\'s end only with WARMUP_VAE_ENCODER=after-ready, at the served size', async () => {
    const prime = (await import(path.join(ROOT, 'dist/src/pipeline/prime.js'))) as typeof import('../src/pipeline/prime.js');
    const dir = await fixtureModel();
    const unet = JSON.parse(readFileSync(path.join(dir, 'unet', 'config.json'), 'utf8')) as { sample_size: number };
    const vae = JSON.parse(readFileSync(path.join(dir, 'vae_decoder', 'config.json'), 'utf8')) as { block_out_channels: number[] };
    const size = { latentHeight: unet.sample_size, latentWidth: unet.sample_size, vaeScale: 2 ** (vae.block_out_channels.length - 1) };
    expect(prime.primeSpec(dir, 'vae_encoder', 'after-ready')).toEqual({ ...size, after: 'warm-up' });
    expect(prime.primeSpec(dir, 'vae_encoder', 'before-ready')).toEqual(size);
    for (const c of ['vae_decoder', 'text_encoder']) expect(prime.primeSpec(dir, c, 'after-ready')).toEqual(size);
    // An inpainting model's warm-up encodes its image first: its encoder is primed beside the UNet's load.
    const inpaint = await fixtureModel({ inpainting: true });
    expect(prime.primeSpec(inpaint, 'vae_encoder', 'after-ready')).toEqual(size);
    // The size the pipeline serves: the config's, but 64 where a config saved before diffusers 0.9 says less.
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'prime-'));
    try {
      const write = (unetCfg: object, blocks: number) => {
        mkdirSync(path.join(tmp, 'unet'), { recursive: true });
        mkdirSync(path.join(tmp, 'vae_decoder'), { recursive: true });
        writeFileSync(path.join(tmp, 'unet', 'config.json'), JSON.stringify(unetCfg));
        writeFileSync(path.join(tmp, 'vae_decoder', 'config.json'), JSON.stringify({ block_out_channels: Array(blocks).fill(8) }));
      };
      write({ sample_size: 96, _diffusers_version: '0.31.0' }, 3);
      expect(prime.primeSpec(tmp, 'vae_decoder', 'after-ready')).toEqual({ latentHeight: 96, latentWidth: 96, vaeScale: 4 });
      write({ sample_size: 32, _diffusers_version: '0.8.0' }, 4);
      expect(prime.primeSpec(tmp, 'unet', 'after-ready')).toEqual({ latentHeight: 64, latentWidth: 64, vaeScale: 8 });
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
    // The same size as the pipeline's layout, whose load logs the rewrite: a whole model with that old config.
    const old = mkdtempSync(path.join(os.tmpdir(), 'prime-layout-'));
    try {
      cpSync(dir, old, { recursive: true });
      const cfg = JSON.parse(readFileSync(path.join(old, 'unet', 'config.json'), 'utf8')) as Record<string, unknown>;
      writeFileSync(path.join(old, 'unet', 'config.json'), JSON.stringify({ ...cfg, sample_size: 32, _diffusers_version: '0.8.0' }));
      const layout = readLayout(old);
      expect(layout.unet.sampleSize).toBe(64);
      expect(layout.rewrites.find((r) => r.key === 'unet.sample_size')).toMatchObject({ from: 32, to: 64 });
      expect(prime.primeSpec(old, 'vae_decoder', 'before-ready')).toEqual({ latentHeight: 64, latentWidth: 64, vaeScale: layout.vae.scaleFactor });
    } finally {
      rmSync(old, { recursive: true, force: true });
    }
  });

  it("makes DPM++ SDE's noise as the worker would: each read bit-equal, batches in turn, a bad read failing clearly", async () => {
    const { aux } = await load();
    const { createScheduler } = await import('../src/pipeline/schedulers/index.js');
    const { BrownianNoise } = await import('../src/pipeline/brownian.js');
    const config = JSON.parse(readFileSync(path.join(ROOT, 'test/fixtures/reference/e2e/model/scheduler/scheduler_config.json'), 'utf8')) as Record<string, unknown>;
    /** The reads a 6-step run of `seeds` makes, at `per` values an image (the scheduler is stepped on made-up outputs). */
    const readsOf = (seeds: number[], per: number) => {
      const s = createScheduler(config, 6, { name: 'dpmpp_sde_karras', seeds });
      let x: Float32Array = new Float32Array(seeds.length * per).fill(1);
      const out = [];
      for (const t of s.timesteps) {
        const q = s.nextNoise!(x.length);
        if (q) out.push(q);
        x = s.step(x.map((v, i) => Math.cos(i + t)), t, x, () => new Float32Array(0)).prevSample;
      }
      return out;
    };
    const client = new aux.AuxClient({ name: 'encode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, () => undefined, () => undefined);
    try {
      const a = readsOf([5, 6], 300);
      const b = readsOf([9], 1000);
      const bits = (z: Float32Array) => Buffer.from(z.buffer, z.byteOffset, z.byteLength);
      const here = new Map([a, b].map((r) => [r, new BrownianNoise(r[0]!.spec)]));
      // A's first reads, then all of B's (the thread drops A's motion), then A's again from the start
      for (const q of [...a.slice(0, 3), ...b, ...a]) {
        const z = await client.noise(q);
        expect(z.length).toBe(q.spec.perImage * q.spec.seeds.length);
        expect(bits(z).equals(bits(here.get(a.includes(q) ? a : b)!.noise(q.ta, q.tb)))).toBe(true);
      }
      await expect(client.noise({ ...a[0]!, spec: { ...a[0]!.spec, seeds: [-1, 2] } })).rejects.toThrow(/SeedSequence entropy must be a non-negative integer, got -1/);
      await client.forgetNoise();
      expect(bits(await client.noise(b[2]!)).equals(bits(here.get(b)!.noise(b[2]!.ta, b[2]!.tb)))).toBe(true);
    } finally {
      await client.close();
    }
  });

  it('reports a thread that dies, and fails what was waiting on it', async () => {
    const { aux } = await load();
    let died: Error | undefined;
    const client = new aux.AuxClient({ name: 'encode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, () => undefined, (err) => (died = err));
    // A run of a session that does not exist fails cleanly; the thread stays up.
    await expect(client.run(42, {})).rejects.toThrow(/no session 42/);
    const dir = await fixtureModel();
    const made = await client.create('text_encoder', path.join(dir, 'text_encoder', 'model.onnx'), 'cpu');
    await client.kill();
    expect(died?.message).toMatch(/auxiliary session thread exited/);
    await expect(made.session.run({ input_ids: { data: new Array<number>(77).fill(0), dims: [1, 77] } })).rejects.toThrow(/auxiliary session thread exited/);
    await client.close(); // a no-op now
  });
});

describe('AUX_THREADS in a running server', () => {
  /** One image-to-image request (text encoder, VAE encoder, UNet, VAE decoder) and where each session ran. */
  async function serveOnce(env: Record<string, string>): Promise<{ threads: Record<string, string>; b64: string }> {
    const dir = await fixtureModel({ withVaeEncoder: true });
    const cache = tempDir('dr-aux-threads-');
    const s = await startRuntime({ STORAGE_URI: dir, MODEL_CACHE_DIR: cache.dir, EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off', ...env }, { ready: true });
    try {
      const grey = Buffer.from(new Uint8Array(64 * 64 * 3).fill(128));
      const png = await (await import('sharp')).default(grey, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
      const r = await postJson(`${s.url}/v1/models/model:predict`, { instances: [{ prompt: 'a red fox', seed: 3, num_inference_steps: 4, height: 64, width: 64, image: png.toString('base64'), strength: 0.6 }] });
      expect(r.status).toBe(200);
      const threads = Object.fromEntries(s.all('session').map((e) => [e.component, e.thread]));
      return { threads, b64: (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64 };
    } finally {
      await s.stop();
      cache.cleanup();
    }
  }

  it('auto on the CPU: every session on the pipeline worker; on: the text encoder and each VAE on their own thread, same image', async () => {
    const auto = await serveOnce({});
    expect(auto.threads).toEqual({ text_encoder: 'worker', unet: 'worker', vae_decoder: 'worker', vae_encoder: 'worker' });
    const on = await serveOnce({ AUX_THREADS: 'on' });
    expect(on.threads).toEqual({ text_encoder: 'encode', unet: 'worker', vae_decoder: 'decode', vae_encoder: 'image' });
    expect(on.b64.length).toBeGreaterThan(100);
    expect(on.b64).toBe(auto.b64);
  }, 60_000);
});

describe("DPM++ SDE's noise on the text encoders' thread", () => {
  /** Two images of dpmpp_sde_karras in one request: their images, and whether the log says the thread made the noise. */
  async function serveSde(env: Record<string, string>): Promise<{ b64: string[]; onThread: boolean; warned: boolean }> {
    const dir = await fixtureModel();
    const cache = tempDir('dr-aux-noise-');
    const s = await startRuntime({ STORAGE_URI: dir, MODEL_CACHE_DIR: cache.dir, EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off', ...env }, { ready: true });
    try {
      const r = await postJson(`${s.url}/v1/models/model:predict`, { instances: [{ prompt: 'a red fox', seed: 3, num_inference_steps: 6, height: 64, width: 64, num_images_per_prompt: 2, scheduler: 'dpmpp_sde_karras' }] });
      expect(r.status).toBe(200);
      const b64 = (r.json.predictions as Array<{ image: { b64: string } }>).map((p) => p.image.b64);
      const logged = (msg: string) => s.logs.some((l) => l.msg === msg);
      return { b64, onThread: logged('DPM++ SDE noise is made on an auxiliary thread during the UNet runs'), warned: logged('the auxiliary thread could not make DPM++ SDE noise; the worker makes it') };
    } finally {
      await s.stop();
      cache.cleanup();
    }
  }

  it('is made there with AUX_THREADS=on, on the worker without the thread: the same images, byte for byte', async () => {
    const here = await serveSde({});
    const there = await serveSde({ AUX_THREADS: 'on' });
    expect(here.onThread).toBe(false);
    expect(there.onThread).toBe(true);
    expect(there.warned || here.warned).toBe(false);
    expect(here.b64).toHaveLength(2);
    expect(here.b64[0]).not.toBe(here.b64[1]);
    expect(there.b64).toEqual(here.b64);
  }, 60_000);

  it("is what the pipeline's steps add, across cuts, guidance and repeated seeds; the thread forgets it once per generation, cancelled too", async () => {
    const { aux } = await load();
    const dir = await fixtureModel({ withVaeEncoder: true });
    const layout = readLayout(dir);
    const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 1 });
    const sessions: Partial<Record<Component, ModelSession>> = {};
    for (const c of Object.keys(layout.onnx) as Component[]) sessions[c] = (await factory.create(c, layout.onnx[c]!)).session;
    const client = new aux.AuxClient({ name: 'encode', intraOpThreads: 1, optimizedModelCache: NO_OPTIMIZED_CACHE }, () => undefined, () => undefined);
    try {
      const p = await Pipeline.create(layout, sessions as unknown as Sessions);
      let asked = 0;
      let forgot = 0;
      const thread: NoiseMaker = { make: async (q) => (asked++, client.noise(q)), done: () => void (forgot++, client.forgetNoise()) };
      // Noise of the right size that is not the motion's: an image made with it differs only if the steps add it.
      const other: NoiseMaker = { make: async (q) => new Float32Array(q.spec.perImage * q.spec.seeds.length).fill(0.5), done: () => undefined };
      const W = 64;
      const H = 48;
      const picture = { data: Uint8Array.from({ length: W * H * 3 }, (_, i) => (i * 37) % 251), width: W, height: H, channels: 3 };
      const mask = { data: Uint8Array.from({ length: W * H * 3 }, (_, i) => (Math.floor(i / 3) % W < W / 2 ? 255 : 0)), width: W, height: H, channels: 3 };
      const job = (guidance: number, init?: ImageInit): Job => ({
        shape: { steps: 5, guidance, height: H, width: W, scheduler: 'dpmpp_sde_karras', eta: 0, guidanceRescale: 0 },
        // the second item repeats the first's seed: its image shares the first image's tree
        items: [{ prompt: 'a red fox', negativePrompt: undefined, seed: 3, numImages: 2 }, { prompt: 'a cat', negativePrompt: undefined, seed: 3, numImages: 1 }],
        ...(init ? { init } : {}),
      });
      const bytes = (r: Awaited<ReturnType<typeof p.generate>>) => r.images.map((i) => Buffer.from(i.rgb).toString('base64'));
      const cases: Array<[string, Job]> = [
        ['text-to-image with guidance', job(7.5)],
        ['text-to-image without', job(1)],
        ['image-to-image', job(7.5, { mode: 'img2img', strength: 0.6, resizeMode: 'default', image: picture })],
        ['inpainting (the latent blend)', job(7.5, { mode: 'inpaint', strength: 0.8, resizeMode: 'default', image: picture, mask })],
      ];
      for (const [what, j] of cases) {
        const own = await p.generate(j);
        asked = 0;
        forgot = 0;
        const there = await p.generate(j, { noise: thread });
        // every UNet run but the last (to sigma 0) reads the motion
        expect(asked, what).toBe(own.times.steps - 1);
        expect(forgot, what).toBe(1);
        expect(bytes(there), what).toEqual(bytes(own));
        expect(bytes(await p.generate(j, { noise: other })), what).not.toEqual(bytes(own));
      }
      // Cancelled after two runs: the thread is told to forget, once
      asked = 0;
      forgot = 0;
      await expect(p.generate(job(7.5), { noise: thread, cancelled: () => asked >= 2 })).rejects.toMatchObject({ code: 'CANCELLED' });
      expect([asked, forgot]).toEqual([2, 1]);
    } finally {
      await client.close();
      for (const s of Object.values(sessions)) await s!.release();
    }
  }, 60_000);
});

describe('AUX_THREADS placement', () => {
  it('auto (or unset): the text encoders and the VAEs on their threads on CUDA, as before AUX_THREADS; none on the CPU', async () => {
    const { auxThreadOf } = await import('../src/pipeline/aux-placement.js');
    const comps = ['text_encoder', 'text_encoder_2', 'unet', 'vae_encoder', 'vae_decoder'];
    const where = (provider: SessionProvider, mode?: 'auto' | 'on' | 'off') => comps.map((c) => auxThreadOf(c, provider, mode) ?? 'worker');
    const threads = ['encode', 'encode', 'worker', 'image', 'decode'];
    expect(where('cuda', 'auto')).toEqual(threads);
    expect(where('cuda', undefined)).toEqual(threads);
    expect(where('cpu', 'auto')).toEqual(comps.map(() => 'worker'));
    expect(where('cpu', undefined)).toEqual(comps.map(() => 'worker'));
    expect(where('cpu', 'on')).toEqual(threads);
    expect(where('cuda', 'off')).toEqual(comps.map(() => 'worker'));
  });
});
