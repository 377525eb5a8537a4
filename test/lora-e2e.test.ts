/**
 * LoRA adapters end to end, over real HTTP against the built server: the demo model with its two adapters (diffusers
 * and kohya form) must give exactly the image of a demo model whose weights the test merged itself, offline, at build
 * time (an implementation of its own: the demo graph's layouts, not the runtime's lora_map.json or merge code).
 */
import { copyFile, mkdir, open, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { buildDemoModel } from '../src/demo/build.js';
import { writeSafetensors } from '../src/demo/safetensors.js';
import { parseSafetensors, readFloats } from '../src/pipeline/lora-safetensors.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, tempDir } from './helpers/server.js';

const RANK = 4;
/** The adapters and scales the test applies, in name order (the runtime's merge order too). */
const SET = [
  { name: 'demo-kohya', scale: 1.0 },
  { name: 'demo-style', scale: 0.8 },
];

interface Term {
  factor: number;
  up: Float64Array;
  down: Float64Array;
}

/**
 * Reads the demo adapters the test's own way: each key names the demo weight it changes, by the conventions the demo
 * graphs use (initializer name = torch name).
 */
async function offlineTerms(dir: string): Promise<Map<string, Term[]>> {
  const terms = new Map<string, Term[]>();
  const add = (component: string, weight: string, t: Term) => {
    const k = `${component}/${weight}`;
    if (!terms.has(k)) terms.set(k, []);
    terms.get(k)!.push(t);
  };
  for (const { name, scale } of SET) {
    const st = parseSafetensors(await readFile(path.join(dir, 'loras', `${name}.safetensors`)), name);
    const f = (k: string) => readFloats(st, st.tensors.get(k)!, name);
    if (name === 'demo-style') {
      // diffusers form, lora_alpha 2 in the metadata.
      for (const k of st.tensors.keys()) {
        const m = /^(unet|text_encoder)\.(.+)\.lora_A\.weight$/.exec(k);
        if (!m) continue;
        add(m[1]!, `${m[2]}.weight`, { factor: (scale * 2) / RANK, down: f(k), up: f(k.replace('lora_A', 'lora_B')) });
      }
    } else {
      const modules: Record<string, [string, string]> = {
        lora_unet_attn2_to_q: ['unet', 'attn2.to_q.weight'],
        lora_unet_attn2_to_v: ['unet', 'attn2.to_v.weight'],
        lora_unet_mid_conv: ['unet', 'mid.conv.weight'],
        lora_te_text_model_encoder_layers_1_mix: ['text_encoder', 'text_model.encoder.layers.1.mix.weight'],
      };
      for (const [k, [component, weight]] of Object.entries(modules)) {
        const alpha = f(`${k}.alpha`)[0]!;
        add(component, weight, { factor: (scale * alpha) / RANK, down: f(`${k}.lora_down.weight`), up: f(`${k}.lora_up.weight`) });
      }
    }
  }
  return terms;
}

/** W + Σ factor·(up·down) in float64, rounded once; Linear weights are stored [in, out] in the demo graphs. */
function mergeInto(values: Float32Array, dims: readonly number[], terms: Term[]): void {
  const conv = dims.length === 4;
  const out = conv ? dims[0]! : dims[1]!;
  const inner = conv ? dims[1]! * dims[2]! * dims[3]! : dims[0]!;
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inner; i++) {
      let acc = 0;
      for (const t of terms) {
        let s = 0;
        for (let r = 0; r < RANK; r++) s += t.up[o * RANK + r]! * t.down[r * inner + i]!;
        acc += t.factor * s;
      }
      const at = conv ? o * inner + i : i * out + o;
      values[at] = values[at]! + acc;
    }
  }
}

/** `src` with a 2.2 GB hole before its tensors' bytes (a sparse file: no disk used), offsets shifted to match. */
async function writeSparseCopy(src: string, dst: string): Promise<void> {
  const GAP = 2_200_000_000;
  const buf = await readFile(src);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets?: [number, number] }>;
  for (const [k, v] of Object.entries(header)) if (k !== '__metadata__') v.data_offsets = [v.data_offsets![0] + GAP, v.data_offsets![1] + GAP];
  const head = Buffer.from(JSON.stringify(header));
  const out = await open(dst, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(head.length), 0);
    await out.write(Buffer.concat([len, head]), 0, 8 + head.length, 0);
    await out.write(buf.subarray(8 + n), 0, buf.length - 8 - n, 8 + head.length + GAP);
  } finally {
    await out.close();
  }
}

async function imageOf(s: Pick<RuntimeHandle, 'url'>, extra: Record<string, unknown> = {}): Promise<{ status: number; b64?: string; error?: string }> {
  const r = await postJson(`${s.url}/v1/models/model:predict`, { instances: [{ prompt: 'a red fox in the snow', seed: 7, num_inference_steps: 3, height: 64, width: 64, ...extra }] });
  const p = (r.json.predictions as Array<{ image: { b64: string } }> | undefined)?.[0];
  return { status: r.status, ...(p ? { b64: p.image.b64 } : {}), ...(typeof r.json.error === 'string' ? { error: r.json.error } : {}) };
}

describe('LoRA adapters on the demo model', () => {
  const tmp = tempDir('lora-e2e-');
  let base: RuntimeHandle;
  let merged: RuntimeHandle;
  const baseDir = path.join(tmp.dir, 'base');
  const mergedDir = path.join(tmp.dir, 'merged');

  beforeAll(async () => {
    await buildDemoModel(baseDir, { withVaeEncoder: true });
    const terms = await offlineTerms(baseDir);
    const edited: string[] = [];
    await buildDemoModel(mergedDir, { withVaeEncoder: true }, {
      editWeight: (component, name, values, dims) => {
        const t = terms.get(`${component}/${name}`);
        if (!t) return;
        mergeInto(values, dims, t);
        edited.push(`${component}/${name}`);
      },
    });
    // Every weight the adapters name was found in the demo graphs.
    expect(edited.sort()).toEqual([...terms.keys()].sort());
    // Adapters the runtime must refuse, beside the good ones.
    await mkdir(path.join(baseDir, 'loras', 'folder-form'), { recursive: true });
    await copyFile(path.join(baseDir, 'loras', 'demo-style.safetensors'), path.join(baseDir, 'loras', 'folder-form', 'pytorch_lora_weights.safetensors'));
    const A = new Float32Array(RANK * 8).fill(0.01);
    const B = new Float32Array(8 * RANK).fill(0.01);
    await writeFile(path.join(baseDir, 'loras', 'bad-keys.safetensors'), writeSafetensors([
      { name: 'unet.down_blocks.0.attentions.0.proj_in.lora_A.weight', shape: [RANK, 8], data: A },
      { name: 'unet.down_blocks.0.attentions.0.proj_in.lora_B.weight', shape: [8, RANK], data: B },
      { name: 'lora_unet_attn2_to_q.lora_down.weight', shape: [RANK, 8], data: A },
      { name: 'lora_unet_attn2_to_q.lora_up.weight', shape: [3, RANK], data: new Float32Array(3 * RANK) },
    ]));
    await writeFile(path.join(baseDir, 'loras', 'not-safetensors.safetensors'), 'hello');
    // Values a merge cannot turn into a usable model: a NaN, and finite ones whose update passes float32's range.
    const nan = Float32Array.from(B, (v, i) => (i === 5 ? Number.NaN : v));
    await writeFile(path.join(baseDir, 'loras', 'nan-weights.safetensors'), writeSafetensors([
      { name: 'lora_unet_attn2_to_q.lora_down.weight', shape: [RANK, 8], data: A },
      { name: 'lora_unet_attn2_to_q.lora_up.weight', shape: [4, RANK], data: nan.subarray(0, 4 * RANK) },
    ]));
    await writeFile(path.join(baseDir, 'loras', 'too-large.safetensors'), writeSafetensors([
      { name: 'lora_unet_attn2_to_q.lora_down.weight', shape: [RANK, 8], data: new Float32Array(RANK * 8).fill(1e19) },
      { name: 'lora_unet_attn2_to_q.lora_up.weight', shape: [4, RANK], data: new Float32Array(4 * RANK).fill(1e19) },
    ]));
    await writeSparseCopy(path.join(baseDir, 'loras', 'demo-style.safetensors'), path.join(baseDir, 'loras', 'demo-style-big.safetensors'));
    const env = { EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', MAX_LORAS: '3', RESULT_CACHE_MB: '0' };
    [base, merged] = await Promise.all([
      startRuntime({ ...env, STORAGE_URI: baseDir }, { ready: true }),
      startRuntime({ ...env, STORAGE_URI: mergedDir }, { ready: true }),
    ]);
  }, 240_000);

  afterAll(async () => {
    await Promise.all([base?.stop(), merged?.stop()]);
    tmp.cleanup();
  });

  it('gives the image of the offline-merged model, byte for byte, in any order of the adapters', async () => {
    const want = await imageOf(merged);
    const plain = await imageOf(base);
    expect(want.status).toBe(200);
    expect(plain.b64).not.toBe(want.b64); // the adapters change the image
    const got = await imageOf(base, { loras: SET });
    expect(got.status).toBe(200);
    expect(got.b64).toBe(want.b64);
    const reversed = await imageOf(base, { loras: [...SET].reverse() });
    expect(reversed.b64).toBe(want.b64);
    // The base model is untouched by the set beside it.
    expect((await imageOf(base)).b64).toBe(plain.b64);
    const ready = base.all('adapters-ready');
    expect(ready).toHaveLength(1); // the second order reused the set
    expect(ready[0]!.components).toEqual(expect.arrayContaining(['unet', 'text_encoder']));
    expect(ready[0]!.formats).toEqual({ 'demo-kohya': 'kohya', 'demo-style': 'diffusers' });
  });

  it('applies the adapters to image-to-image too, with the base model\'s VAE encoder', async () => {
    const input = (await imageOf(base)).b64!;
    const want = await imageOf(merged, { image: input, strength: 0.6 });
    expect(want.status).toBe(200);
    const got = await imageOf(base, { image: input, strength: 0.6, loras: SET });
    expect(got.error).toBeUndefined();
    expect(got.b64).toBe(want.b64);
    expect(got.b64).not.toBe((await imageOf(base, { image: input, strength: 0.6 })).b64);
  });

  it('reads an adapter over 2 GiB (read by ranges: Node reads no file that big whole)', async () => {
    const one = await imageOf(base, { loras: [{ name: 'demo-style', scale: 0.5 }] });
    const big = await imageOf(base, { loras: [{ name: 'demo-style-big', scale: 0.5 }] });
    expect(big.error).toBeUndefined();
    expect(big.b64).toBe(one.b64);
  });

  it('reads an adapter folder (diffusers save_lora_weights layout)', async () => {
    const one = await imageOf(base, { loras: [{ name: 'demo-style', scale: 0.5 }] });
    const folder = await imageOf(base, { loras: [{ name: 'folder-form', scale: 0.5 }] });
    expect(one.status).toBe(200);
    expect(folder.b64).toBe(one.b64);
  });

  it('answers 400 naming unknown adapters, keys that match nothing, too many adapters and bad files', async () => {
    const unknown = await imageOf(base, { loras: [{ name: 'no-such' }, { name: 'demo-style' }, { name: 'missing-too' }] });
    expect(unknown.status).toBe(400);
    expect(unknown.error).toMatch(/unknown LoRA adapters "missing-too", "no-such"/);
    expect(unknown.error).toMatch(/the model has .*demo-kohya, demo-style/);
    const keys = await imageOf(base, { loras: [{ name: 'bad-keys' }] });
    expect(keys.status).toBe(400);
    expect(keys.error).toMatch(/adapter "bad-keys" has keys that match nothing in this model: unet\.down_blocks\.0\.attentions\.0\.proj_in/);
    expect(keys.error).toMatch(/adapter "bad-keys" has layers whose shapes do not fit this model's weights \(a LoRA made for another base model\?\): lora_unet_attn2_to_q \(down \[4,8\] and up \[3,4\] do not fit the weight \[4,8\]\)/);
    const many = await imageOf(base, { loras: ['a', 'b', 'c', 'd'] });
    expect(many.status).toBe(400);
    expect(many.error).toMatch(/instances\[0\]\.loras names 4 adapters; a request may use at most 3 \(MAX_LORAS\)/);
    const scale = await imageOf(base, { loras: [{ name: 'demo-style', scale: 'high' }, { name: '../x' }] });
    expect(scale.status).toBe(400);
    expect(scale.error).toMatch(/loras\[0\]\.scale must be a number/);
    expect(scale.error).toMatch(/loras\[1\]\.name must be an adapter name/);
    const file = await imageOf(base, { loras: ['not-safetensors'] });
    expect(file.status).toBe(400);
    expect(file.error).toMatch(/adapter "not-safetensors" is not a valid safetensors file/);
    const nan = await imageOf(base, { loras: ['nan-weights'] });
    expect(nan).toEqual({ status: 400, error: 'adapter "nan-weights": tensor "lora_unet_attn2_to_q.lora_up.weight" holds NaN (element 5 of 16); LoRA weights must be finite numbers' });
    const large = await imageOf(base, { loras: ['too-large'] });
    expect(large).toEqual({ status: 400, error: "adapter \"too-large\" takes unet weight attn2.to_q.weight to 4.000e+38, past float32's range; use a smaller scale" });
    // The server goes on serving both ways.
    expect((await imageOf(base, { loras: SET })).status).toBe(200);
  });

  it('takes loras in V2 (a JSON BYTES input or parameter) and over the WebSocket', async () => {
    const want = (await imageOf(merged)).b64;
    const v2 = await postJson(`${base.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['a red fox in the snow'] }],
      parameters: { seed: 7, num_inference_steps: 3, height: 64, width: 64, loras: JSON.stringify(SET) },
    });
    expect(v2.status).toBe(200);
    expect((v2.json.outputs as Array<{ name: string; data: string[] }>).find((o) => o.name === 'image')!.data[0]).toBe(want);
    const v2list = await postJson(`${base.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['a red fox in the snow'] }, { name: 'loras', datatype: 'BYTES', shape: [1], data: [JSON.stringify(SET)] }],
      parameters: { seed: 7, num_inference_steps: 3, height: 64, width: 64 },
    });
    expect((v2list.json.outputs as Array<{ name: string; data: string[] }>).find((o) => o.name === 'image')!.data[0]).toBe(want);
    const bad = await postJson(`${base.url}/v2/models/model/infer`, {
      inputs: [{ name: 'prompt', datatype: 'BYTES', shape: [1], data: ['x'] }],
      parameters: { loras: '[{"name": "nope"' },
    });
    expect(bad.status).toBe(400);
    expect(bad.json.error).toMatch(/loras is not JSON/);

    const ws = new WebSocket(`${base.url.replace('http', 'ws')}/v1/models/model/stream`);
    const msgs: Array<Record<string, unknown>> = [];
    await new Promise<void>((resolve, reject) => {
      ws.onopen = () => ws.send(JSON.stringify({ prompt: 'a red fox in the snow', seed: 7, num_inference_steps: 3, height: 64, width: 64, loras: SET }));
      ws.onmessage = (e) => void msgs.push(JSON.parse(String(e.data)) as Record<string, unknown>);
      ws.onclose = () => resolve();
      ws.onerror = () => reject(new Error('websocket error'));
    });
    const result = msgs.find((m) => m.type === 'result') as { images: Array<{ b64: string }> } | undefined;
    expect(result?.images[0]!.b64).toBe(want);
  });
});
