import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import onnxProto from 'onnx-proto';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, DEMO_FAMILIES, type DemoOptions } from '../src/demo/build.js';
import { main as cliMain } from '../src/demo/cli.js';
import { demoDirName, ensureDemoModel } from '../src/demo/index.js';
import { float16Bits, float16Tensor } from '../src/pipeline/onnx.js';
import { fixtureModel } from './fixtures/index.js';

const BOS = 49406, EOS = 49407;
// "a photo of a cat" and "a red dog" in the CLIP vocabulary.
const CAT = [320, 1125, 539, 320, 2368];
const DOG = [320, 736, 1929];

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(path.join(os.tmpdir(), 'demo-test-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

// ---- tensor helpers -------------------------------------------------------------------------------------------

function mulberry(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
function randn(n: number, seed: number): Float32Array {
  const r = mulberry(seed), out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(r() + 1e-12)) * Math.cos(2 * Math.PI * r());
  return out;
}
function toHalf(v: number): number {
  const x = new Uint32Array(new Float32Array([v]).buffer)[0]!;
  const sign = (x >>> 16) & 0x8000, exp = ((x >>> 23) & 0xff) - 112, mant = x & 0x7fffff;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00;
  return sign | (exp << 10) | (mant >>> 13);
}
function fromHalf(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >>> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}
/** A float tensor in whatever float type the session declares for `name`. */
function floatFeed(session: ort.InferenceSession, name: string, data: Float32Array, dims: number[]): ort.Tensor {
  const meta = session.inputMetadata.find((m) => m.name === name);
  if (!meta || !meta.isTensor) throw new Error(`no tensor input ${name}`);
  if (meta.type === 'float16') return float16Tensor(ort, Uint16Array.from(data, toHalf), dims);
  if (meta.type === 'int64') return new ort.Tensor('int64', BigInt64Array.from(data, (v) => BigInt(Math.floor(v))), dims);
  return new ort.Tensor('float32', data, dims);
}
function asF32(t: ort.Tensor): Float32Array {
  if (t.type === 'float16') return Float32Array.from(float16Bits(t), fromHalf);
  expect(t.type).toBe('float32');
  return t.data as Float32Array;
}
function tokens(content: number[], pad: number, batch = 1): ort.Tensor {
  const row = [BOS, ...content, EOS];
  while (row.length < 77) row.push(pad);
  const all: bigint[] = [];
  for (let b = 0; b < batch; b++) all.push(...row.map(BigInt));
  return new ort.Tensor('int64', BigInt64Array.from(all), [batch, 77]);
}
const meanStd = (a: Float32Array) => {
  let s = 0, s2 = 0;
  for (const v of a) { s += v; s2 += v * v; }
  const m = s / a.length;
  return { mean: m, std: Math.sqrt(Math.max(0, s2 / a.length - m * m)) };
};
const maxAbsDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]!)), 0);
const typeOf = (s: ort.InferenceSession, name: string) => {
  const m = [...s.inputMetadata, ...s.outputMetadata].find((x) => x.name === name);
  return m && m.isTensor ? { type: m.type, shape: m.shape } : undefined;
};

async function loadAll(dir: string): Promise<Record<string, ort.InferenceSession>> {
  const out: Record<string, ort.InferenceSession> = {};
  for (const c of ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder']) {
    const p = path.join(dir, c, 'model.onnx');
    if (await stat(p).then(() => true, () => false)) out[c] = await ort.InferenceSession.create(p);
  }
  return out;
}
async function readJson(dir: string, rel: string): Promise<Record<string, any>> {
  return JSON.parse(await readFile(path.join(dir, rel), 'utf8'));
}
async function listFiles(dir: string, base = dir): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(p, base)));
    else out.push(path.relative(base, p).split(path.sep).join('/'));
  }
  return out.sort();
}

// ---- every family: layout, names, dtypes, shapes ------------------------------------------------------------

const VARIANTS: { label: string; opts: DemoOptions }[] = [
  ...DEMO_FAMILIES.map((family) => ({ label: family, opts: { family } })),
  { label: 'sd15 fp16', opts: { family: 'sd15', fp16: true, withVaeEncoder: true } },
  { label: 'sdxl fp16', opts: { family: 'sdxl', fp16: true } },
  { label: 'sd15 int64 timestep', opts: { family: 'sd15', timestep: 'int64-batch' } },
  { label: 'sd15 float[batch] timestep', opts: { family: 'sd15', timestep: 'float-batch' } },
  { label: 'sd15 external data + padding + vae encoder', opts: { family: 'sd15', externalData: true, padBytes: 3 << 20, withVaeEncoder: true } },
  { label: 'sd15 inpainting', opts: { family: 'sd15', inpainting: true } },
];

describe.each(VARIANTS)('demo model: $label', ({ opts }) => {
  const family = opts.family ?? 'sd15';
  const fp16 = opts.fp16 ?? false;
  const ft = fp16 ? 'float16' : 'float32';
  const C = opts.inpainting ? 9 : 4;
  let dir: string;
  let s: Record<string, ort.InferenceSession>;
  beforeAll(async () => {
    dir = await fixtureModel(opts);
    s = await loadAll(dir);
  });
  afterAll(async () => {
    for (const x of Object.values(s ?? {})) await x.release();
  });

  it('has the optimum layout and real configs', async () => {
    const files = await listFiles(dir);
    const tok = (t: string) => ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json'].map((f) => `${t}/${f}`);
    const expected = [
      'model_index.json', 'scheduler/scheduler_config.json', ...tok('tokenizer'), 'text_encoder/config.json', 'text_encoder/model.onnx',
      'unet/config.json', 'unet/model.onnx', 'vae_decoder/config.json', 'vae_decoder/model.onnx',
    ];
    if (family === 'sdxl') expected.push(...tok('tokenizer_2'), 'text_encoder_2/config.json', 'text_encoder_2/model.onnx');
    if (opts.withVaeEncoder || opts.inpainting) expected.push('vae_encoder/config.json', 'vae_encoder/model.onnx');
    // Where each torch weight lives for LoRA merges, and the two demo adapters.
    expected.push('unet/lora_map.json', 'text_encoder/lora_map.json', 'loras/demo-kohya.safetensors', 'loras/demo-style.safetensors');
    if (family === 'sdxl') expected.push('text_encoder_2/lora_map.json');
    if (opts.externalData || opts.padBytes) expected.push('unet/model.onnx_data');
    // The default split pads every component SD 1.5 keeps weights in.
    if (opts.padBytes) expected.push('text_encoder/model.onnx_data', 'vae_decoder/model.onnx_data');
    expect(files).toEqual(expected.sort());

    const index = await readJson(dir, 'model_index.json');
    const sched = await readJson(dir, 'scheduler/scheduler_config.json');
    const unet = await readJson(dir, 'unet/config.json');
    const vae = await readJson(dir, 'vae_decoder/config.json');
    const tc = await readJson(dir, 'tokenizer/tokenizer_config.json');
    expect(sched).toMatchObject({ beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', num_train_timesteps: 1000 });
    expect(index.scheduler).toEqual(['diffusers', sched._class_name]);
    expect(tc.model_max_length).toBe(77);
    const te = await readJson(dir, 'text_encoder/config.json');
    expect(te.vocab_size).toBe(49408);
    expect(typeOf(s.text_encoder!, 'last_hidden_state')?.shape).toEqual(['batch_size', 'sequence_length', te.hidden_size]);
    expect(typeOf(s.unet!, 'encoder_hidden_states')?.shape).toEqual(['batch_size', 'sequence_length', unet.cross_attention_dim]);
    switch (family) {
      case 'sd15':
        expect(index._class_name).toBe(opts.inpainting ? 'StableDiffusionInpaintPipeline' : 'StableDiffusionPipeline');
        expect(unet.in_channels).toBe(C);
        expect(sched).toMatchObject({ _class_name: 'PNDMScheduler', skip_prk_steps: true, steps_offset: 1, prediction_type: 'epsilon' });
        expect([unet.sample_size, vae.scaling_factor, tc.pad_token]).toEqual([64, 0.18215, '<|endoftext|>']);
        break;
      case 'sd2':
        expect(sched).toMatchObject({ prediction_type: 'v_prediction', steps_offset: 1 });
        expect([unet.sample_size, vae.scaling_factor, tc.pad_token]).toEqual([96, 0.18215, '!']);
        expect((await readJson(dir, 'tokenizer/special_tokens_map.json')).pad_token.content).toBe('!');
        break;
      case 'sdxl': {
        expect(index).toMatchObject({ _class_name: 'StableDiffusionXLPipeline', force_zeros_for_empty_prompt: true });
        expect(index.text_encoder_2).toEqual(['transformers', 'CLIPTextModelWithProjection']);
        expect(sched).toMatchObject({ _class_name: 'EulerDiscreteScheduler', timestep_spacing: 'leading' });
        expect([unet.sample_size, unet.addition_embed_type, vae.scaling_factor, tc.pad_token]).toEqual([128, 'text_time', 0.13025, '<|endoftext|>']);
        expect((await readJson(dir, 'tokenizer_2/tokenizer_config.json')).pad_token).toBe('!');
        const te2 = await readJson(dir, 'text_encoder_2/config.json');
        expect(unet.cross_attention_dim).toBe(te.hidden_size + te2.hidden_size);
        expect(typeOf(s.unet!, 'text_embeds')?.shape).toEqual(['batch_size', te2.projection_dim]);
        break;
      }
      case 'lcm':
        expect(index._class_name).toBe('LatentConsistencyModelPipeline');
        expect(sched).toMatchObject({ _class_name: 'LCMScheduler', original_inference_steps: 50 });
        expect(unet.time_cond_proj_dim).toBe(256);
        break;
      case 'turbo':
        expect(sched).toMatchObject({ _class_name: 'EulerAncestralDiscreteScheduler', timestep_spacing: 'trailing' });
        expect([unet.sample_size, tc.pad_token]).toEqual([64, '!']);
        break;
    }
  });

  it('declares optimum input/output names, dtypes and dynamic axes', () => {
    const te = s.text_encoder!;
    expect(te.inputNames).toEqual(['input_ids']);
    expect(typeOf(te, 'input_ids')).toEqual({ type: 'int64', shape: ['batch_size', 'sequence_length'] });
    if (family === 'sdxl') {
      expect(te.outputNames).toEqual(['last_hidden_state', 'pooler_output', 'hidden_states.0', 'hidden_states.1', 'hidden_states.2']);
      expect(s.text_encoder_2!.outputNames).toEqual(['text_embeds', 'last_hidden_state', 'hidden_states.0', 'hidden_states.1', 'hidden_states.2', 'hidden_states.3']);
    } else {
      expect(te.outputNames).toEqual(['last_hidden_state', 'pooler_output']);
    }
    expect(typeOf(te, 'last_hidden_state')?.type).toBe(ft);

    const unetInputs = ['sample', 'timestep', 'encoder_hidden_states'];
    if (family === 'sdxl') unetInputs.push('text_embeds', 'time_ids');
    if (family === 'lcm') unetInputs.push('timestep_cond');
    expect(s.unet!.inputNames).toEqual(unetInputs);
    expect(s.unet!.outputNames).toEqual(['out_sample']);
    expect(typeOf(s.unet!, 'sample')).toEqual({ type: ft, shape: ['batch_size', C, 'height', 'width'] });
    expect(typeOf(s.unet!, 'out_sample')).toEqual({ type: ft, shape: ['batch_size', 4, 'height', 'width'] });
    const ts = opts.timestep ?? 'float-scalar';
    expect(typeOf(s.unet!, 'timestep')).toEqual(
      ts === 'float-scalar' ? { type: ft, shape: [] } : ts === 'int64-batch' ? { type: 'int64', shape: ['steps'] } : { type: ft, shape: ['batch'] },
    );
    if (family === 'sdxl') expect(typeOf(s.unet!, 'time_ids')).toEqual({ type: ft, shape: ['batch_size', 6] });
    if (family === 'lcm') expect(typeOf(s.unet!, 'timestep_cond')).toEqual({ type: ft, shape: ['batch_size', 256] });

    expect(s.vae_decoder!.inputNames).toEqual(['latent_sample']);
    expect(typeOf(s.vae_decoder!, 'latent_sample')).toEqual({ type: ft, shape: ['batch_size', 4, 'latent_height', 'latent_width'] });
    expect(typeOf(s.vae_decoder!, 'sample')).toEqual({ type: ft, shape: ['batch_size', 3, 'latent_height * 8', 'latent_width * 8'] });
    if (s.vae_encoder) {
      expect(typeOf(s.vae_encoder, 'sample')).toEqual({ type: ft, shape: ['batch_size', 3, 'sample_height', 'sample_width'] });
      expect(typeOf(s.vae_encoder, 'latent_parameters')).toEqual({ type: ft, shape: ['batch_size', 8, 'sample_height / 8', 'sample_width / 8'] });
    }
  });

  it('runs every component with the declared dtypes and gives the right shapes', async () => {
    const B = 2, h = 12, w = 16;
    const pad = family === 'sd15' || family === 'lcm' ? EOS : 0;
    const te = await s.text_encoder!.run({ input_ids: tokens(CAT, pad, B) });
    const D = (await readJson(dir, 'text_encoder/config.json')).hidden_size as number;
    expect(te.last_hidden_state!.dims).toEqual([B, 77, D]);
    expect(te.pooler_output!.dims).toEqual([B, D]);
    expect(te.last_hidden_state!.type).toBe(ft);
    expect(asF32(te.last_hidden_state!).every(Number.isFinite)).toBe(true);

    const feeds: Record<string, ort.Tensor> = {
      sample: floatFeed(s.unet!, 'sample', randn(B * C * h * w, 1), [B, C, h, w]),
    };
    const ts = opts.timestep ?? 'float-scalar';
    feeds.timestep = floatFeed(s.unet!, 'timestep', new Float32Array(ts === 'float-scalar' ? [501] : Array(B).fill(501)), ts === 'float-scalar' ? [] : [B]);
    let ehs = asF32(te.last_hidden_state!), ehsDim = D;
    if (family === 'sdxl') {
      const te2 = await s.text_encoder_2!.run({ input_ids: tokens(CAT, 0, B) });
      const D2 = te2.last_hidden_state!.dims[2]!;
      expect(te2.text_embeds!.dims).toEqual([B, 24]);
      expect(te2['hidden_states.3']!.dims).toEqual([B, 77, D2]);
      // Penultimate hidden states of both encoders, concatenated on the feature axis, as SDXL does.
      const a = asF32(te['hidden_states.1']!), b = asF32(te2['hidden_states.2']!);
      ehs = new Float32Array(B * 77 * (D + D2));
      for (let r = 0; r < B * 77; r++) {
        ehs.set(a.subarray(r * D, (r + 1) * D), r * (D + D2));
        ehs.set(b.subarray(r * D2, (r + 1) * D2), r * (D + D2) + D);
      }
      ehsDim = D + D2;
      feeds.text_embeds = floatFeed(s.unet!, 'text_embeds', asF32(te2.text_embeds!), [B, 24]);
      feeds.time_ids = floatFeed(s.unet!, 'time_ids', new Float32Array([96, 128, 0, 0, 96, 128, 96, 128, 0, 0, 96, 128]), [B, 6]);
    }
    if (family === 'lcm') feeds.timestep_cond = floatFeed(s.unet!, 'timestep_cond', randn(B * 256, 2), [B, 256]);
    feeds.encoder_hidden_states = floatFeed(s.unet!, 'encoder_hidden_states', ehs, [B, 77, ehsDim]);
    const u = await s.unet!.run(feeds);
    expect(u.out_sample!.dims).toEqual([B, 4, h, w]);
    expect(u.out_sample!.type).toBe(ft);
    expect(asF32(u.out_sample!).every(Number.isFinite)).toBe(true);

    const v = await s.vae_decoder!.run({ latent_sample: floatFeed(s.vae_decoder!, 'latent_sample', randn(4 * h * w, 3), [1, 4, h, w]) });
    expect(v.sample!.dims).toEqual([1, 3, 8 * h, 8 * w]);
    expect(v.sample!.type).toBe(ft);
    if (s.vae_encoder) {
      const e = await s.vae_encoder.run({ sample: floatFeed(s.vae_encoder, 'sample', asF32(v.sample!), [1, 3, 8 * h, 8 * w]) });
      expect(e.latent_parameters!.dims).toEqual([1, 8, h, w]);
      expect(e.latent_parameters!.type).toBe(ft);
    }
  });
});

// ---- determinism and sensitivity -------------------------------------------------------------------------------

describe('demo model builder', () => {
  it('is deterministic: the same options give byte-identical files', async () => {
    const opts: DemoOptions = { family: 'sdxl', externalData: true, padBytes: (1 << 20) + 3, withVaeEncoder: true };
    const a = await buildDemoModel(path.join(scratch, 'det-a'), opts);
    const b = await buildDemoModel(path.join(scratch, 'det-b'), opts);
    expect(a.files).toEqual(b.files);
    for (const f of a.files) {
      const [x, y] = await Promise.all([readFile(path.join(a.dir, f.path)), readFile(path.join(b.dir, f.path))]);
      expect(x.equals(y), f.path).toBe(true);
    }
    // Every padded component rounds its share up to whole rows, so the weights hold at least what was asked.
    const padded = a.files.filter((f) => f.path.endsWith('/model.onnx_data')).map((f) => f.path);
    expect(padded.sort()).toEqual(['text_encoder/model.onnx_data', 'text_encoder_2/model.onnx_data', 'unet/model.onnx_data', 'vae_decoder/model.onnx_data']);
    expect(a.files.filter((f) => padded.includes(f.path)).reduce((n, f) => n + f.bytes, 0)).toBeGreaterThan((1 << 20) + 3);
    // No temporary files are left behind.
    expect((await listFiles(a.dir)).filter((f) => f.includes('.tmp-'))).toEqual([]);
    // A different seed changes the weights.
    const c = await buildDemoModel(path.join(scratch, 'det-c'), { ...opts, seed: 1 });
    const [x, y] = await Promise.all([readFile(path.join(a.dir, 'unet/model.onnx')), readFile(path.join(c.dir, 'unet/model.onnx'))]);
    expect(x.equals(y)).toBe(false);
  });

  it('names every bad option at once', async () => {
    await expect(buildDemoModel(path.join(scratch, 'bad'), { family: 'sd3' as never, padBytes: -1, timestep: 'int32' as never }))
      .rejects.toThrow(/family must be one of sd15, sd2, sdxl, lcm, turbo.*timestep must be one of.*padBytes must be an integer >= 0/);
    await expect(buildDemoModel(path.join(scratch, 'bad'), { padSplit: 'vae' as never })).rejects.toThrow(/padSplit must be one of sd15, unet, got "vae"/);
  });

  it('padding is real weight data yet leaves every output bit-identical', async () => {
    const plain = await loadAll(await fixtureModel({ family: 'sd15' }));
    const pdir = await fixtureModel({ family: 'sd15', padBytes: 2 << 20 });
    const padded = await loadAll(pdir);
    // The padding tensor is an input of a MatMul in each padded graph (not a dangling initializer).
    for (const c of ['text_encoder', 'unet', 'vae_decoder']) {
      const m = onnxProto.onnx.ModelProto.decode(await readFile(path.join(pdir, c, 'model.onnx')));
      const pad = m.graph!.initializer!.find((t) => t.name === 'demo_padding');
      expect(pad?.dims?.map(Number)[0], c).toBe(32);
      expect(m.graph!.node!.some((n) => n.opType === 'MatMul' && n.input!.includes('demo_padding')), c).toBe(true);
    }
    const ids = tokens(CAT, EOS);
    const te = [await plain.text_encoder!.run({ input_ids: ids }), await padded.text_encoder!.run({ input_ids: ids })];
    expect(Buffer.from(asF32(te[1]!.last_hidden_state!).buffer).equals(Buffer.from(asF32(te[0]!.last_hidden_state!).buffer))).toBe(true);
    const feeds = { sample: new ort.Tensor('float32', randn(4 * 16 * 16, 3), [1, 4, 16, 16]), timestep: new ort.Tensor('float32', new Float32Array([501]), []), encoder_hidden_states: te[0]!.last_hidden_state! };
    const u = [await plain.unet!.run(feeds), await padded.unet!.run(feeds)];
    expect(Buffer.from(asF32(u[1]!.out_sample!).buffer).equals(Buffer.from(asF32(u[0]!.out_sample!).buffer))).toBe(true);
    const z = { latent_sample: new ort.Tensor('float32', randn(4 * 8 * 8, 5), [1, 4, 8, 8]) };
    const v = [await plain.vae_decoder!.run(z), await padded.vae_decoder!.run(z)];
    expect(Buffer.from(asF32(v[1]!.sample!).buffer).equals(Buffer.from(asF32(v[0]!.sample!).buffer))).toBe(true);
    for (const x of [...Object.values(plain), ...Object.values(padded)]) await x.release();
  });

  it('outputs depend on the token ids and on the timestep', async () => {
    const dir = await fixtureModel({ family: 'sd15' });
    const s = await loadAll(dir);
    const cat = await s.text_encoder!.run({ input_ids: tokens(CAT, EOS) });
    const dog = await s.text_encoder!.run({ input_ids: tokens(DOG, EOS) });
    expect(maxAbsDiff(asF32(cat.last_hidden_state!), asF32(dog.last_hidden_state!))).toBeGreaterThan(0.1);
    expect(maxAbsDiff(asF32(cat.pooler_output!), asF32(dog.pooler_output!))).toBeGreaterThan(0.1);

    const x = new ort.Tensor('float32', randn(4 * 16 * 16, 7), [1, 4, 16, 16]);
    const run = (t: number, emb: ort.Tensor) =>
      s.unet!.run({ sample: x, timestep: new ort.Tensor('float32', new Float32Array([t]), []), encoder_hidden_states: emb }).then((r) => asF32(r.out_sample!));
    const base = await run(501, cat.last_hidden_state!);
    expect(maxAbsDiff(base, await run(801, cat.last_hidden_state!))).toBeGreaterThan(0.05);
    // Same coefficient bucket, different sinusoidal embedding: the embedding alone moves the output.
    expect(maxAbsDiff(base, await run(501.5, cat.last_hidden_state!))).toBeGreaterThan(1e-4);
    expect(maxAbsDiff(base, await run(501, dog.last_hidden_state!))).toBeGreaterThan(0.01);
    for (const v of Object.values(s)) await v.release();
  });
});

// ---- a real generation: bounded, structured, dependent on prompt and seed; timings ------------------------------

/** Euler discrete (leading spacing, steps_offset 1), as SD 1.5 configs it: enough to drive a full generation. */
function eulerSchedule(steps: number): { timesteps: number[]; sigmas: number[] } {
  const a = Math.sqrt(0.00085), b = Math.sqrt(0.012), ac: number[] = [];
  let prod = 1;
  for (let i = 0; i < 1000; i++) { prod *= 1 - (a + ((b - a) * i) / 999) ** 2; ac.push(prod); }
  const ratio = Math.floor(1000 / steps);
  const timesteps = Array.from({ length: steps }, (_, i) => Math.round(i * ratio) + 1).reverse();
  const sigmas = timesteps.map((t) => Math.sqrt((1 - ac[t]!) / ac[t]!));
  return { timesteps, sigmas: [...sigmas, 0] };
}

describe('sd15 demo generation (Euler, CFG 7.5)', () => {
  let s: Record<string, ort.InferenceSession>;
  beforeAll(async () => {
    s = await loadAll(await fixtureModel({ family: 'sd15' }));
  });
  afterAll(async () => {
    for (const v of Object.values(s ?? {})) await v.release();
  });

  async function generate(prompt: number[], seed: number, steps: number, size: number, timing?: Record<string, number[]>) {
    const lat = size / 8, n = 4 * lat * lat;
    const clock = async <T>(k: string, f: () => Promise<T>): Promise<T> => {
      const t0 = performance.now();
      const r = await f();
      timing?.[k]?.push(performance.now() - t0);
      return r;
    };
    const ids = tokens(prompt, EOS, 1);
    const uncond = tokens([], EOS, 1);
    const both = new ort.Tensor('int64', BigInt64Array.from([...(uncond.data as BigInt64Array), ...(ids.data as BigInt64Array)]), [2, 77]);
    const emb = (await clock('text_encoder', () => s.text_encoder!.run({ input_ids: both }))).last_hidden_state!;
    const { timesteps, sigmas } = eulerSchedule(steps);
    const latents = randn(n, seed).map((v) => v * Math.sqrt(sigmas[0]! ** 2 + 1));
    for (let i = 0; i < timesteps.length; i++) {
      const sig = sigmas[i]!, scale = 1 / Math.sqrt(sig * sig + 1);
      const x = new Float32Array(2 * n);
      for (let j = 0; j < n; j++) x[j] = x[n + j] = latents[j]! * scale;
      const out = await clock('unet', () => s.unet!.run({
        sample: new ort.Tensor('float32', x, [2, 4, lat, lat]),
        timestep: new ort.Tensor('float32', new Float32Array([timesteps[i]!]), []),
        encoder_hidden_states: emb,
      }));
      const e = out.out_sample!.data as Float32Array;
      const dt = sigmas[i + 1]! - sig;
      for (let j = 0; j < n; j++) latents[j]! += (e[j]! + 7.5 * (e[n + j]! - e[j]!)) * dt;
    }
    const z = latents.map((v) => v / 0.18215);
    const img = await clock('vae_decoder', () => s.vae_decoder!.run({ latent_sample: new ort.Tensor('float32', z, [1, 4, lat, lat]) }));
    const px = (img.sample!.data as Float32Array).map((v) => Math.min(1, Math.max(0, v / 2 + 0.5)));
    return { px, latents };
  }

  it('gives a bounded, structured image that depends on prompt, seed and steps; times each component', async () => {
    const timing: Record<string, number[]> = { text_encoder: [], unet: [], vae_decoder: [] };
    const t0 = performance.now();
    const { px, latents } = await generate(CAT, 42, 50, 512, timing);
    const total = performance.now() - t0;
    const st = meanStd(px), lt = meanStd(latents);
    const saturated = px.reduce((c, v) => c + (v <= 0.001 || v >= 0.999 ? 1 : 0), 0) / px.length;
    // Neighbouring pixels agree far more than random ones would: the image has structure, not static.
    let d = 0;
    for (let y = 0; y < 511; y++) for (let x = 0; x < 511; x++) d += Math.abs(px[y * 512 + x]! - px[y * 512 + x + 1]!);
    const neighbour = d / (511 * 511);
    const med = (a: number[]) => [...a].sort((p, q) => p - q)[Math.floor(a.length / 2)]!;
    // Warm timings: the first run of a session pays for allocation; report both.
    const warm = async (n: number, f: () => Promise<unknown>) => {
      const ts: number[] = [];
      for (let i = 0; i < n; i++) { const t1 = performance.now(); await f(); ts.push(performance.now() - t1); }
      return med(ts);
    };
    const ids = tokens(CAT, EOS, 2);
    const teWarm = await warm(10, () => s.text_encoder!.run({ input_ids: ids }));
    const z = new ort.Tensor('float32', latents.map((v) => v / 0.18215), [1, 4, 64, 64]);
    const vaeWarm = await warm(5, () => s.vae_decoder!.run({ latent_sample: z }));
    console.log(
      `[demo sd15 512x512, 50 Euler steps, CFG 7.5] total ${total.toFixed(0)} ms; per run (first / warm median): ` +
        `text_encoder [2,77] ${timing.text_encoder![0]!.toFixed(1)} / ${teWarm.toFixed(1)} ms, ` +
        `unet [2,4,64,64] ${timing.unet![0]!.toFixed(1)} / ${med(timing.unet!).toFixed(1)} ms, ` +
        `vae_decoder 512x512 ${timing.vae_decoder![0]!.toFixed(1)} / ${vaeWarm.toFixed(1)} ms; image mean ${st.mean.toFixed(3)} std ${st.std.toFixed(3)} ` +
        `saturated ${(saturated * 100).toFixed(1)}% neighbour |d| ${neighbour.toFixed(3)}; latents mean ${lt.mean.toFixed(3)} std ${lt.std.toFixed(3)}`,
    );
    expect(latents.every(Number.isFinite)).toBe(true);
    expect(st.mean).toBeGreaterThan(0.2);
    expect(st.mean).toBeLessThan(0.8);
    expect(st.std).toBeGreaterThan(0.05);
    expect(saturated).toBeLessThan(0.2);
    expect(neighbour).toBeLessThan(st.std * 0.8);

    const small = (prompt: number[], seed: number, steps: number) => generate(prompt, seed, steps, 128).then((r) => r.px);
    const ref = await small(CAT, 1, 10);
    expect(maxAbsDiff(ref, await small(CAT, 1, 10))).toBe(0);
    expect(maxAbsDiff(ref, await small(DOG, 1, 10))).toBeGreaterThan(0.02);
    expect(maxAbsDiff(ref, await small(CAT, 2, 10))).toBeGreaterThan(0.02);
    expect(maxAbsDiff(ref, await small(CAT, 1, 20))).toBeGreaterThan(0.005);
  });
});

// ---- ensureDemoModel and the CLI -------------------------------------------------------------------------------

describe('ensureDemoModel', () => {
  it('builds once, atomically, and concurrent callers agree', async () => {
    const cache = path.join(scratch, 'cache');
    const logged: object[] = [];
    const log = { info: (o: object) => void logged.push(o) };
    const [a, b] = await Promise.all([ensureDemoModel(cache, log), ensureDemoModel(cache, log)]);
    expect(a).toBe(b);
    expect(path.basename(a)).toBe(demoDirName());
    expect(path.basename(a)).toMatch(/^demo-[0-9a-f]{12}$/);
    expect(await readdir(cache)).toEqual([demoDirName()]); // no temp folders left
    expect(await listFiles(a)).toContain('unet/model.onnx');
    const before = (await stat(path.join(a, 'unet/model.onnx'))).mtimeMs;
    expect(await ensureDemoModel(cache, log)).toBe(a);
    expect((await stat(path.join(a, 'unet/model.onnx'))).mtimeMs).toBe(before);
    expect(logged.length).toBeGreaterThanOrEqual(1);
    const s = await ort.InferenceSession.create(path.join(a, 'unet', 'model.onnx'));
    expect(s.inputNames).toEqual(['sample', 'timestep', 'encoder_hidden_states']);
    await s.release();
  });

  it('finds a demo model already built without loading the ONNX protobuf code, which only a build needs', async () => {
    // A fresh process, as the server's boot is (this one has loaded onnx-proto already): the built module, a cache
    // that holds the demo, then one that does not.
    const entry = path.resolve('dist/src/demo/index.js');
    const script = `import { createRequire } from 'node:module';
      const { ensureDemoModel } = await import(${JSON.stringify(entry)});
      const loaded = () => Object.keys(createRequire(${JSON.stringify(entry)}).cache).some((k) => k.includes('/node_modules/onnx-proto/'));
      const dir = await ensureDemoModel(process.argv[1]);
      const found = loaded();
      await ensureDemoModel(process.argv[2]);
      process.stdout.write(JSON.stringify({ dir, found, built: loaded() }));`;
    const cache = path.join(scratch, 'cache');
    const built = await ensureDemoModel(cache);
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script, cache, path.join(scratch, 'cache-fresh')]);
    expect(JSON.parse(stdout)).toEqual({ dir: built, found: false, built: true });
  });
});

describe('demo CLI', () => {
  it('builds a family with padding into OUT_DIR and prints the manifest', async () => {
    const out = path.join(scratch, 'cli-sdxl');
    const writes: string[] = [];
    const orig = process.stdout.write.bind(process.stdout);
    process.stdout.write = ((chunk: string) => (writes.push(String(chunk)), true)) as typeof process.stdout.write;
    let code: number;
    try {
      code = await cliMain([out, '--family', 'sdxl', '--fp16', '--pad-mb', '1', '--pad-split', 'unet']);
    } finally {
      process.stdout.write = orig;
    }
    expect(code).toBe(0);
    const manifest = JSON.parse(writes.join(''));
    expect(manifest.options).toMatchObject({ family: 'sdxl', fp16: true, padBytes: 1 << 20, padSplit: 'unet' });
    expect(manifest.files.map((f: { path: string }) => f.path).filter((p: string) => p.endsWith('.onnx_data'))).toEqual(['unet/model.onnx_data']);
    expect((await stat(path.join(out, 'unet', 'model.onnx_data'))).size).toBeGreaterThanOrEqual(1 << 20);
  });

  it('refuses a bad invocation', async () => {
    const errs: string[] = [];
    const orig = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string) => (errs.push(String(chunk)), true)) as typeof process.stderr.write;
    try {
      expect(await cliMain([])).toBe(2);
      expect(await cliMain([path.join(scratch, 'x'), '--family', 'nope'])).toBe(1);
    } finally {
      process.stderr.write = orig;
    }
    expect(errs.join('')).toMatch(/usage: cli\.js OUT_DIR/);
    expect(errs.join('')).toMatch(/family must be one of/);
  });
});
