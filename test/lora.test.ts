/**
 * LoRA pieces on their own: the safetensors parser, both key conventions on files diffusers and PEFT made
 * (test/fixtures/lora, see its README), the merge of a component checked against diffusers' own fuse_lora, the map's
 * strided views, and the adapter-set cache's eviction rules.
 */
import { closeSync, copyFileSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import * as ort from 'onnxruntime-node';
import onnxProto from 'onnx-proto';
import { describe, expect, it } from 'vitest';
import { parseAdapter, resolveAdapters, mergeDelta, sgmCandidates, type LoraComponent } from '../src/pipeline/lora-keys.js';
import * as demoBuild from '../src/demo/build.js';
import { checkLoraMap, LORA_MAP_FILE, LORA_MAP_FORMAT, readLoraMap, viewPositions, type LoraMap } from '../src/pipeline/lora-map.js';
import { mergeComponent, writeMergedComponent, writeMergedCopy } from '../src/pipeline/lora-merge.js';
import { fixtureModel } from './fixtures/index.js';
import { writeKohyaAdapter } from './helpers/big-adapter.js';
import { writeSafetensors } from '../src/demo/safetensors.js';
import { openSafetensors, parseSafetensors, readFloats } from '../src/pipeline/lora-safetensors.js';
import { AdapterSetCache } from '../src/pipeline/lora-sets.js';

const { onnx } = onnxProto;

const FIX = path.join(import.meta.dirname, 'fixtures', 'lora');
const load = (f: string) => parseSafetensors(readFileSync(path.join(FIX, f)), f);
const maps = new Map<LoraComponent, LoraMap>(
  (['unet', 'text_encoder'] as const).map((c) => [c, checkLoraMap(JSON.parse(readFileSync(path.join(FIX, `${c}.lora_map.json`), 'utf8')), c)]),
);

describe('safetensors', () => {
  it('reads what it writes, metadata and dtypes included', () => {
    const bytes = writeSafetensors([{ name: 'a', shape: [2, 2], data: Float32Array.of(1, -2, 3.5, 0) }, { name: 'b', shape: [], data: Float32Array.of(8) }], { k: 'v' });
    const st = parseSafetensors(bytes, 'x');
    expect(st.metadata).toEqual({ k: 'v' });
    expect([...readFloats(st, st.tensors.get('a')!, 'x')]).toEqual([1, -2, 3.5, 0]);
    expect(st.tensors.get('b')!.shape).toEqual([]);
  });

  it('reads F16 and BF16 tensors as safetensors stores them', () => {
    const header = JSON.stringify({ h: { dtype: 'F16', shape: [2], data_offsets: [0, 4] }, b: { dtype: 'BF16', shape: [1], data_offsets: [4, 6] } });
    const buf = Buffer.alloc(8 + header.length + 6);
    buf.writeBigUInt64LE(BigInt(header.length), 0);
    buf.write(header, 8);
    const d = 8 + header.length;
    buf.writeUInt16LE(0x3c00, d); // 1.0
    buf.writeUInt16LE(0xc000, d + 2); // -2.0
    buf.writeUInt16LE(0x3fc0, d + 4); // bf16 1.5
    const st = parseSafetensors(buf, 'x');
    expect([...readFloats(st, st.tensors.get('h')!, 'x')]).toEqual([1, -2]);
    expect([...readFloats(st, st.tensors.get('b')!, 'x')]).toEqual([1.5]);
  });

  it.each([
    ['too short', Buffer.alloc(4), /shorter than the 8-byte header length/],
    ['a header past the end', (() => { const b = Buffer.alloc(16); b.writeBigUInt64LE(100n, 0); return b; })(), /runs past the file/],
    ['a header that is not JSON', (() => { const b = Buffer.alloc(12); b.writeBigUInt64LE(4n, 0); b.write('{{{{', 8); return b; })(), /not JSON/],
  ])('refuses %s with an error naming the file', (_what, buf, re) => {
    expect(() => parseSafetensors(buf, 'adapter "x"')).toThrow(re);
    expect(() => parseSafetensors(buf, 'adapter "x"')).toThrow(/^adapter "x" is not a valid safetensors file/);
  });

  it('reads a file on disk by ranges as it reads it in memory, and past 2 GiB, which no whole read of it can', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'dr-st-'));
    try {
      for (const f of readdirSync(FIX).filter((n) => n.endsWith('.safetensors'))) {
        const whole = load(f);
        const st = await openSafetensors(path.join(FIX, f), f);
        try {
          expect(st.metadata, f).toEqual(whole.metadata);
          expect([...st.tensors.keys()], f).toEqual([...whole.tensors.keys()]);
          for (const t of st.tensors.values()) expect(readFloats(st, t, f), `${f} ${t.name}`).toEqual(readFloats(whole, whole.tensors.get(t.name)!, f));
        } finally {
          await st.close();
        }
      }
      // A sparse file of 2.2 GB: one tensor at its very end, after a gap the header leaves (sparse: no disk used).
      const header = JSON.stringify({ w: { dtype: 'F32', shape: [2], data_offsets: [2_200_000_000, 2_200_000_008] } });
      const big = path.join(dir, 'big.safetensors');
      const fd = openSync(big, 'w');
      const head = Buffer.alloc(8 + header.length);
      head.writeBigUInt64LE(BigInt(header.length), 0);
      head.write(header, 8);
      writeSync(fd, head, 0, head.length, 0);
      writeSync(fd, Buffer.from(Float32Array.of(1.5, -3).buffer), 0, 8, head.length + 2_200_000_000);
      closeSync(fd);
      expect(() => readFileSync(big)).toThrow(/ERR_FS_FILE_TOO_LARGE|File size .* is greater than 2 GiB/);
      const st = await openSafetensors(big, 'adapter "big"');
      expect([...readFloats(st, st.tensors.get('w')!, 'big')]).toEqual([1.5, -3]);
      await st.close();
      // Cut short after it was opened: the read names the adapter, never the path.
      const cut = path.join(dir, 'cut.safetensors');
      copyFileSync(path.join(FIX, readdirSync(FIX).find((n) => n.endsWith('.safetensors'))!), cut);
      const opened = await openSafetensors(cut, 'adapter "cut"');
      const last = [...opened.tensors.values()].sort((a, b) => b.end - a.end)[0]!;
      const cfd = openSync(cut, 'r+');
      ftruncateSync(cfd, statSync(cut).size - 1);
      closeSync(cfd);
      expect(() => readFloats(opened, last, 'cut')).toThrow(/^adapter "cut" could not be read: it ends at byte \d+, before the tensor it lists$/);
      await opened.close();
      await expect(openSafetensors(cut, 'adapter "cut"')).rejects.toThrow(/^adapter "cut" is not a valid safetensors file: tensor .* lies outside the data/);
      await expect(openSafetensors(path.join(dir, 'missing.safetensors'), 'adapter "gone"')).rejects.toThrow(/^adapter "gone" could not be read$/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses tensors outside the data, of the wrong size, overlapping, or of unknown dtypes', () => {
    const file = (h: object, data: number) => {
      const j = JSON.stringify(h);
      const b = Buffer.alloc(8 + j.length + data);
      b.writeBigUInt64LE(BigInt(j.length), 0);
      b.write(j, 8);
      return b;
    };
    expect(() => parseSafetensors(file({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, 8), 'x')).toThrow(/lies outside the data/);
    expect(() => parseSafetensors(file({ a: { dtype: 'F32', shape: [3], data_offsets: [0, 16] } }, 16), 'x')).toThrow(/16 bytes for 3 F32 values/);
    expect(() => parseSafetensors(file({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, 12), 'x')).toThrow(/overlap/);
    expect(() => parseSafetensors(file({ a: { dtype: 'Q4', shape: [2], data_offsets: [0, 2] } }, 2), 'x')).toThrow(/unknown dtype "Q4"/);
    // An empty tensor where the next one begins overlaps nothing, whichever the header lists first.
    const empty = parseSafetensors(file({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [0], data_offsets: [0, 0] } }, 4), 'x');
    expect([...empty.tensors.keys()]).toEqual(['a', 'b']);
  });
});

describe('adapter files made by diffusers and PEFT', () => {
  const deltas = load('diffusers-deltas.safetensors');

  it.each([
    ['diffusers.safetensors', 'diffusers'],
    ['kohya.safetensors', 'kohya'],
  ])('%s: every layer finds its weight, and the update equals diffusers\' fuse_lora', (file, format) => {
    const st = load(file);
    const parsed = parseAdapter(st, file);
    expect(parsed.format).toBe(format);
    expect(parsed.unknownKeys).toEqual([]);
    const { updates, problems } = resolveAdapters([{ parsed, st, scale: 1 }], maps);
    expect(problems).toEqual([]);
    expect(updates.size).toBe(parsed.layers.length);
    let checked = 0;
    for (const [key, t] of deltas.tensors) {
      const [component, param] = key.split('/') as [LoraComponent, string];
      const u = updates.get(`${component}:${param}`);
      expect(u, key).toBeDefined();
      const want = readFloats(deltas, t, 'deltas');
      const got = mergeDelta(u!);
      const scale = Math.max(...want.map(Math.abs));
      let worst = 0;
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
      // diffusers merged in float32 (and the fixture is float32 of a difference): a few float32 units of the scale.
      expect(worst / scale, key).toBeLessThan(1e-5);
      checked++;
    }
    expect(checked).toBe(15);
  });

  it('gives a layer without .alpha the most common alpha of its component, as diffusers and PEFT scale a kohya file with only some alphas', () => {
    // scripts/make_lora_partial_alpha.py: kohya.safetensors with some alphas removed or changed; the scales from
    // diffusers' get_peft_kwargs and PEFT's pattern lookup. Without the rule, a layer lacking .alpha gets its rank.
    const fix = JSON.parse(readFileSync(path.join(FIX, 'kohya-partial-alpha.json'), 'utf8')) as { edits: Record<string, number | null>; text_encoder_default_alpha: number; scales: Record<string, number> };
    const kohya = load('kohya.safetensors');
    const tensors = [...kohya.tensors.values()].flatMap((t) => {
      const layer = t.name.slice(0, t.name.indexOf('.'));
      let data = Float32Array.from(readFloats(kohya, t, 'kohya'));
      if (t.name.endsWith('.alpha')) {
        if (layer.startsWith('lora_te1_')) data = Float32Array.of(fix.text_encoder_default_alpha);
        if (Object.hasOwn(fix.edits, layer)) {
          const a = fix.edits[layer]!;
          if (a === null) return [];
          data = Float32Array.of(a);
        }
      }
      return [{ name: t.name, shape: t.shape, data }];
    });
    const st = parseSafetensors(writeSafetensors(tensors), 'partial');
    const { updates, problems } = resolveAdapters([{ parsed: parseAdapter(st, 'partial'), st, scale: 0.5 }], maps);
    expect(problems).toEqual([]);
    const got = Object.fromEntries([...updates.values()].map((u) => [`${u.component}/${u.param}`, u.terms[0]!.factor / 0.5]));
    expect(got).toEqual(fix.scales);
  });

  it('refuses a file with only some alphas where two values are equally common (diffusers would take the first in key order)', () => {
    const layer = (m: string, alpha?: number) => [
      { name: `lora_unet_${m}.lora_down.weight`, shape: [4, 32, 1, 1], data: new Float32Array(128) },
      { name: `lora_unet_${m}.lora_up.weight`, shape: [32, 4, 1, 1], data: new Float32Array(128) },
      ...(alpha === undefined ? [] : [{ name: `lora_unet_${m}.alpha`, shape: [], data: Float32Array.of(alpha) }]),
    ];
    const st = parseSafetensors(writeSafetensors([
      ...layer('down_blocks_0_attentions_0_proj_in', 8),
      ...layer('down_blocks_0_attentions_0_proj_out', 2),
      ...layer('up_blocks_1_attentions_0_proj_in'),
    ]), 'tie');
    expect(resolveAdapters([{ parsed: parseAdapter(st, 'tie'), st, scale: 1 }], maps).problems).toEqual([
      'adapter "tie" has a .alpha for only some of its unet layers, and its alphas 2 and 8 are equally common, so the alpha of the layers ' +
        'without one is ambiguous (diffusers takes the most common): lora_unet_up_blocks_1_attentions_0_proj_in; give each layer a .alpha',
    ]);
  });

  it("reads integer alphas (diffusers' convert_state_dict_to_kohya writes them as int64) as the same alphas in float", () => {
    // kohya.safetensors with each F32 .alpha rewritten as I64 (the F32 values are whole numbers), the rest as it is.
    const kohya = load('kohya.safetensors');
    const header: Record<string, unknown> = {};
    const chunks: Buffer[] = [];
    let offset = 0;
    for (const t of kohya.tensors.values()) {
      let bytes = Buffer.from(kohya.read(t.begin, t.end));
      let dtype = t.dtype;
      if (t.name.endsWith('.alpha')) {
        bytes = Buffer.alloc(8);
        bytes.writeBigInt64LE(BigInt(readFloats(kohya, t, 'kohya')[0]!));
        dtype = 'I64';
      }
      header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
      chunks.push(bytes);
      offset += bytes.length;
    }
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    const ints = parseSafetensors(Buffer.concat([len, json, ...chunks]), 'ints');
    expect([...ints.tensors.values()].filter((t) => t.dtype === 'I64')).toHaveLength(89);
    const factors = (st: typeof kohya) => {
      const { updates, problems } = resolveAdapters([{ parsed: parseAdapter(st, 'k'), st, scale: 1 }], maps);
      expect(problems).toEqual([]);
      return [...updates.values()].map((u) => [u.param, u.terms[0]!.factor]);
    };
    expect(factors(ints)).toEqual(factors(kohya));
  });

  it("matches the metadata's alpha_pattern as PEFT's get_pattern_key does: from the name's start or after a dot, the key as one group", () => {
    const alpha = (pattern: Record<string, number>, module: string) => {
      const meta = { 'unet.r': 4, 'unet.lora_alpha': 4, 'unet.alpha_pattern': pattern };
      const st = parseSafetensors(writeSafetensors([
        { name: `unet.${module}.lora_A.weight`, shape: [4, 32], data: new Float32Array(128) },
        { name: `unet.${module}.lora_B.weight`, shape: [32, 4], data: new Float32Array(128) },
      ], { lora_adapter_metadata: JSON.stringify(meta) }), 'x');
      return parseAdapter(st, 'p').layers[0]!.alpha;
    };
    const m = 'up_blocks.1.attentions.0.proj_in';
    expect(alpha({ proj_in: 8 }, m)).toBe(8);
    expect(alpha({ [m]: 8 }, m)).toBe(8);
    expect(alpha({ 'attentions.0.proj_in': 8 }, m)).toBe(8);
    // re.match anchors at the start: a key matching only mid-segment ("s.0.proj_in" in "attentions.0.proj_in") does not.
    expect(alpha({ 's.0.proj_in': 8 }, m)).toBe(4);
    // The key is one group: "down_blocks|proj_out" is either whole name, not "…down_blocks" or "proj_out$".
    expect(alpha({ 'down_blocks|x.proj_in': 8 }, m)).toBe(4);
    expect(alpha({ 'proj_out|proj_in': 8 }, m)).toBe(8);
  });

  it('scales a PEFT file saved with use_rslora by alpha / sqrt(rank), as the LoraConfig diffusers builds from its metadata does', () => {
    // save_lora_weights stores the whole LoraConfig per component (here r 4, lora_alpha 8); PEFT's rsLoRA scaling is
    // lora_alpha / sqrt(r) = 4, plain LoRA's lora_alpha / r = 2.
    const factor = (rslora: boolean | undefined) => {
      const meta = { 'unet.r': 4, 'unet.lora_alpha': 8, 'unet.use_dora': false, ...(rslora === undefined ? {} : { 'unet.use_rslora': rslora }) };
      const st = parseSafetensors(writeSafetensors([
        { name: 'unet.down_blocks.0.attentions.0.proj_in.lora_A.weight', shape: [4, 32], data: new Float32Array(128).fill(0.1) },
        { name: 'unet.down_blocks.0.attentions.0.proj_in.lora_B.weight', shape: [32, 4], data: new Float32Array(128).fill(0.1) },
      ], { lora_adapter_metadata: JSON.stringify(meta) }), 'x');
      const { updates, problems } = resolveAdapters([{ parsed: parseAdapter(st, 'rs'), st, scale: 0.5 }], maps);
      expect(problems).toEqual([]);
      return [...updates.values()][0]!.terms[0]!.factor;
    };
    expect(factor(true)).toBe(0.5 * 4);
    expect(factor(false)).toBe(0.5 * 2);
    expect(factor(undefined)).toBe(0.5 * 2);
  });

  it('names keys of no known form, unsupported variants, and modules the model lacks', () => {
    const st = parseSafetensors(writeSafetensors([
      { name: 'unet.attn9.to_q.lora_A.weight', shape: [1, 2], data: new Float32Array(2) },
      { name: 'unet.attn9.to_q.lora_B.weight', shape: [2, 1], data: new Float32Array(2) },
      { name: 'lora_unet_mid_block_hada_w1_a', shape: [1], data: new Float32Array(1) },
      { name: 'lora_unet_x.hada_w1_a', shape: [1], data: new Float32Array(1) },
      { name: 'something.else', shape: [1], data: new Float32Array(1) },
    ]), 'x');
    const parsed = parseAdapter(st, 'odd');
    const { problems } = resolveAdapters([{ parsed, st, scale: 1 }], maps);
    expect(problems.join('\n')).toMatch(/adapter "odd" has keys of no known LoRA form \(diffusers\/PEFT or kohya\): lora_unet_mid_block_hada_w1_a, something\.else/);
    expect(problems.join('\n')).toMatch(/adapter "odd" uses LoRA variants this runtime does not merge .*: lora_unet_x\.hada_w1_a/);
    expect(problems.join('\n')).toMatch(/adapter "odd" has keys that match nothing in this model: unet\.attn9\.to_q/);
  });

  it("names a LoRA made for another base model: a component this model lacks, and shapes that do not fit", () => {
    // An SDXL kohya file on an SD 1.x model: its second text encoder, and 2048-wide cross-attention keys.
    const st = parseSafetensors(writeSafetensors([
      { name: 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight', shape: [1, 2], data: new Float32Array(2) },
      { name: 'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight', shape: [2, 1], data: new Float32Array(2) },
    ]), 'xl');
    const parsed = parseAdapter(st, 'xl-style');
    const present = new Set(['unet', 'text_encoder'] as const);
    expect(resolveAdapters([{ parsed, st, scale: 1 }], maps, undefined, present).problems).toEqual([
      'adapter "xl-style" targets text_encoder_2, which this model does not have: a LoRA made for another base model (SDXL\'s on SD 1.x or 2.x?)',
    ]);
    // Without knowing the model's components, it can only be a missing map.
    expect(resolveAdapters([{ parsed, st, scale: 1 }], maps).problems.join()).toMatch(/whose export has no lora_map\.json/);
  });

  it('reads the older diffusers forms (attention processor, lora.down/up) and a .alpha tensor', () => {
    const A = Float32Array.from({ length: 4 * 32 }, (_, i) => Math.sin(i));
    const B = Float32Array.from({ length: 32 * 4 }, (_, i) => Math.cos(i));
    const mod = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1';
    const old = parseSafetensors(writeSafetensors([
      { name: `unet.${mod}.processor.to_q_lora.down.weight`, shape: [4, 32], data: A },
      { name: `unet.${mod}.processor.to_q_lora.up.weight`, shape: [32, 4], data: B },
      { name: `unet.${mod}.processor.to_q_lora.alpha`, shape: [], data: Float32Array.of(2) },
    ]), 'old');
    const peft = parseSafetensors(writeSafetensors([
      { name: `unet.${mod}.to_q.lora_A.weight`, shape: [4, 32], data: A },
      { name: `unet.${mod}.to_q.lora_B.weight`, shape: [32, 4], data: B },
      { name: `unet.${mod}.to_q.alpha`, shape: [], data: Float32Array.of(2) },
    ]), 'peft');
    const a = resolveAdapters([{ parsed: parseAdapter(peft, 'peft'), st: peft, scale: 1 }], maps);
    const oldParsed = parseAdapter(old, 'old');
    expect(oldParsed.layers.map((l) => l.module)).toEqual([`${mod}.to_q`]);
    const b = resolveAdapters([{ parsed: oldParsed, st: old, scale: 1 }], maps);
    expect(a.problems).toEqual([]);
    expect(b.problems).toEqual([]);
    const da = mergeDelta([...a.updates.values()][0]!);
    const db = mergeDelta([...b.updates.values()][0]!);
    expect([...db]).toEqual([...da]);
    expect([...a.updates.values()][0]!.terms[0]!.factor).toBe(0.5); // alpha 2 over rank 4
  });
});

describe('SDXL kohya names (Stability block names)', () => {
  const want = JSON.parse(readFileSync(path.join(FIX, 'sgm-names.json'), 'utf8')) as Record<string, string>;

  it('map to the modules diffusers\' own conversion names', () => {
    for (const [sgm, module] of Object.entries(want)) expect(sgmCandidates(sgm, 2), sgm).toContain(module.replaceAll('.', '_'));
  });

  it('resolve against an SDXL-shaped map, each to the one module the map has', () => {
    const weights = Object.fromEntries(Object.values(want).map((m) => [`${m}.weight`, { initializer: m, shape: [2, 3], view: { shape: [2, 3], strides: [3, 1], offset: 0 } }]));
    const sdxl = new Map<LoraComponent, LoraMap>([['unet', checkLoraMap({ format: 1, weights }, 'unet')]]);
    const st = parseSafetensors(writeSafetensors(Object.keys(want).flatMap((k) => [
      { name: `lora_unet_${k}.lora_down.weight`, shape: [1, 3], data: Float32Array.of(1, 2, 3) },
      { name: `lora_unet_${k}.lora_up.weight`, shape: [2, 1], data: Float32Array.of(1, 1) },
    ])), 'sdxl');
    const parsed = parseAdapter(st, 'sdxl');
    const { updates, problems } = resolveAdapters([{ parsed, st, scale: 1 }], sdxl, 2);
    expect(problems).toEqual([]);
    expect([...updates.values()].map((u) => u.param).sort()).toEqual(Object.values(want).map((m) => `${m}.weight`).sort());
    // Without the UNet config's layers_per_block the names are not guessed.
    expect(resolveAdapters([{ parsed, st, scale: 1 }], sdxl).problems.join()).toMatch(/match nothing in this model: lora_unet_input_blocks_0_0, lora_unet_input_blocks_1_0_in_layers_2/);
  });
});

describe('lora_map views', () => {
  it('walks the torch order through transposed and packed per-head layouts', () => {
    // A Linear [out 4, in 3] transposed into MatMul [3, 4].
    expect([...viewPositions({ shape: [4, 3], strides: [1, 4], offset: 0 })]).toEqual([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
    // K of a packed [in 2, heads 2, k|v, head 2] weight: out = heads × head.
    expect([...viewPositions({ shape: [2, 2, 2], strides: [4, 1, 8], offset: 2 })]).toEqual([2, 10, 3, 11, 6, 14, 7, 15]);
  });

  it('refuses a malformed map by name', () => {
    expect(() => checkLoraMap({ format: 1, weights: { w: { initializer: 'x', shape: [2, 2], view: { shape: [3], strides: [1], offset: 0 } } } }, 'unet')).toThrow(/unet\/lora_map.json: weight "w" has a malformed entry/);
    expect(() => checkLoraMap({ format: 9, weights: {} }, 'unet')).toThrow(/format 9 is not 1/);
  });

  it('the demo model writes the file name and format version the pipeline reads (the two layers share no module)', () => {
    expect([demoBuild.LORA_MAP_FILE, demoBuild.LORA_MAP_FORMAT]).toEqual([LORA_MAP_FILE, LORA_MAP_FORMAT]);
  });
});

describe('adapter set cache', () => {
  it('evicts the least recently used sets that are not in use, by count and by bytes', () => {
    const c = new AdapterSetCache<string>({ maxSets: 2, maxBytes: 100 });
    expect(c.add('a', 40, 'A')).toEqual([]);
    expect(c.add('b', 40, 'B')).toEqual([]);
    c.get('a'); // a is now more recent than b
    expect(c.add('c', 10, 'C').map((s) => s.key)).toEqual(['b']);
    const a = c.get('a')!;
    a.inUse++;
    // Over bytes: c goes (least recent not in use); a stays while in use and d was just built, so the cache is over
    // its budget until a is released.
    expect(c.add('d', 70, 'D').map((s) => s.key)).toEqual(['c']);
    expect(c.keys().sort()).toEqual(['a', 'd']);
    expect(c.bytes).toBe(110);
    a.inUse--;
    expect(c.evictable().map((s) => s.key)).toEqual(['a']);
    expect(c.fits(101)).toBe(false);
    expect(new AdapterSetCache({ maxSets: 0, maxBytes: 1e9 }).fits(1)).toBe(false);
  });
});

describe('merged components', () => {
  it('a graph with external data: the linked form (hard links, patched weights only) runs like the in-memory copy', async () => {
    const dir = await fixtureModel({ externalData: true });
    const st = parseSafetensors(readFileSync(path.join(dir, 'loras', 'demo-style.safetensors')), 'demo-style');
    const demoMaps = new Map<LoraComponent, LoraMap>([['unet', readLoraMap(path.join(dir, 'unet'))!]]);
    const { updates } = resolveAdapters([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 0.9 }], demoMaps);
    const list = [...updates.values()].filter((u) => u.component === 'unet');
    const unet = path.join(dir, 'unet', 'model.onnx');
    const out = mkdtempSync(path.join(os.tmpdir(), 'lora-linked-'));
    try {
      const linked = await writeMergedComponent(unet, list, path.join(out, 'unet'));
      expect(linked.data).toBe('linked');
      expect(readdirSync(path.join(out, 'unet')).sort()).toEqual(['lora.onnx_data', 'model.onnx', 'model.onnx_data']);
      // The link is the model's own data file, not a copy of it.
      expect(statSync(path.join(out, 'unet', 'model.onnx_data')).ino).toBe(statSync(path.join(dir, 'unet', 'model.onnx_data')).ino);
      expect(linked.totalBytes).toBe(statSync(unet).size + statSync(path.join(dir, 'unet', 'model.onnx_data')).size);
      const mem = await mergeComponent(unet, list);
      const opts = { executionProviders: ['cpu'], logSeverityLevel: 3 as const };
      const [a, b, base] = await Promise.all([
        ort.InferenceSession.create(linked.modelPath, opts),
        ort.InferenceSession.create(mem.model, { ...opts, externalData: mem.externalData }),
        ort.InferenceSession.create(unet, opts),
      ]);
      const feeds = {
        sample: new ort.Tensor('float32', Float32Array.from({ length: 2 * 4 * 8 * 8 }, (_, i) => Math.sin(i)), [2, 4, 8, 8]),
        timestep: new ort.Tensor('float32', Float32Array.of(500), []),
        encoder_hidden_states: new ort.Tensor('float32', Float32Array.from({ length: 2 * 77 * 32 }, (_, i) => Math.cos(i / 7)), [2, 77, 32]),
      };
      const [ra, rb, rbase] = await Promise.all([a.run(feeds), b.run(feeds), base.run(feeds)]);
      expect([...(ra.out_sample!.data as Float32Array)]).toEqual([...(rb.out_sample!.data as Float32Array)]);
      expect([...(ra.out_sample!.data as Float32Array)]).not.toEqual([...(rbase.out_sample!.data as Float32Array)]);
      await Promise.all([a.release(), b.release(), base.release()]);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
  it('the self-contained copy the lora-merge CLI bakes holds what the in-memory merge holds, and leaves the model as it was', async () => {
    const dir = await fixtureModel({ externalData: true });
    const list = demoStyleUpdates(dir, readLoraMap(path.join(dir, 'unet'))!);
    const unet = path.join(dir, 'unet', 'model.onnx');
    const before = readFileSync(path.join(dir, 'unet', 'model.onnx_data'));
    const out = mkdtempSync(path.join(os.tmpdir(), 'lora-copy-'));
    try {
      const copy = await writeMergedCopy(unet, list, path.join(out, 'unet'));
      const mem = await mergeComponent(unet, list);
      expect(copy.patchedBytes).toBe(mem.patchedBytes);
      expect(copy.patchedBytes).toBeGreaterThan(0);
      expect(readdirSync(path.join(out, 'unet')).sort()).toEqual(['model.onnx', 'model.onnx_data']);
      expect(Buffer.compare(readFileSync(copy.modelPath), Buffer.from(mem.model))).toBe(0);
      expect(mem.externalData.map((e) => e.path)).toEqual(['model.onnx_data']);
      const patched = readFileSync(path.join(out, 'unet', 'model.onnx_data'));
      expect(Buffer.compare(patched, Buffer.from(mem.externalData[0]!.data))).toBe(0);
      expect(Buffer.compare(patched, before)).not.toBe(0);
      expect(Buffer.compare(readFileSync(path.join(dir, 'unet', 'model.onnx_data')), before)).toBe(0);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('weights past 4 GiB of a data file (sparse, 5 GiB) merge as the same weights at its start do, reading only what is patched', async () => {
    const dir = await fixtureModel({ externalData: true });
    const map = readLoraMap(path.join(dir, 'unet'))!;
    const list = demoStyleUpdates(dir, map);
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'lora-5g-'));
    try {
      // The fixture's UNet with its data file's bytes moved to 5 GiB - their length: every external offset past 4 GiB.
      const big = path.join(tmp, 'model', 'unet');
      mkdirSync(big, { recursive: true });
      const data = readFileSync(path.join(dir, 'unet', 'model.onnx_data'));
      const shift = 5 * 2 ** 30 - data.byteLength;
      const fd = openSync(path.join(big, 'model.onnx_data'), 'w');
      ftruncateSync(fd, shift + data.byteLength);
      writeSync(fd, data, 0, data.byteLength, shift);
      closeSync(fd);
      const model = onnx.ModelProto.decode(readFileSync(path.join(dir, 'unet', 'model.onnx')));
      let moved = 0;
      for (const t of model.graph!.initializer!) {
        for (const e of t.externalData ?? []) {
          if (e.key !== 'offset') continue;
          e.value = String(Number(e.value) + shift);
          moved++;
        }
        if (t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL && !(t.externalData ?? []).some((e) => e.key === 'offset')) {
          t.externalData!.push({ key: 'offset', value: String(shift) });
          moved++;
        }
      }
      expect(moved).toBeGreaterThan(0);
      writeFileSync(path.join(big, 'model.onnx'), onnx.ModelProto.encode(model).finish());
      copyFileSync(path.join(dir, 'unet', 'lora_map.json'), path.join(big, 'lora_map.json'));
      expect(statSync(path.join(big, 'model.onnx_data')).blocks * 512).toBeLessThan(64 * 2 ** 20);
      const small = await writeMergedComponent(path.join(dir, 'unet', 'model.onnx'), list, path.join(tmp, 'small'));
      const rss0 = process.memoryUsage().rss;
      const large = await writeMergedComponent(path.join(big, 'model.onnx'), list, path.join(tmp, 'large'));
      expect(process.memoryUsage().rss - rss0).toBeLessThan(512 * 2 ** 20);
      expect(large.patchedBytes).toBe(small.patchedBytes);
      expect(large.totalBytes).toBe(statSync(path.join(big, 'model.onnx')).size + 5 * 2 ** 30);
      expect(Buffer.compare(readFileSync(path.join(tmp, 'large', 'lora.onnx_data')), readFileSync(path.join(tmp, 'small', 'lora.onnx_data')))).toBe(0);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });
});

describe('adapters whose merge is not a usable model', () => {
  it('a NaN or infinite value in a LoRA weight is refused by tensor name, not merged into NaN weights', () => {
    const mod = 'down_blocks.0.attentions.0.proj_in';
    const B = new Float32Array(32 * 4).fill(0.1);
    B[37] = Number.NaN;
    const st = parseSafetensors(writeSafetensors([
      { name: `unet.${mod}.lora_A.weight`, shape: [4, 32], data: new Float32Array(128).fill(0.1) },
      { name: `unet.${mod}.lora_B.weight`, shape: [32, 4], data: B },
    ]), 'nan');
    const { updates, problems } = resolveAdapters([{ parsed: parseAdapter(st, 'nan'), st, scale: 1 }], maps);
    expect(problems).toEqual([]);
    expect(() => mergeDelta([...updates.values()][0]!)).toThrow(
      `adapter "nan": tensor "unet.${mod}.lora_B.weight" holds NaN (element 37 of 128); LoRA weights must be finite numbers`,
    );
  });

  it('a weight the adapters take past float16 or float32 range is refused by name, and no folder is left', async () => {
    // One inline initializer per type; an update of 300 · 300 = 90,000 fits float32, not float16 (65504).
    const graph = (dataType: number, bytes: Uint8Array) => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'lora-range-'));
      mkdirSync(path.join(dir, 'unet'));
      const model = onnx.ModelProto.create({ irVersion: 8, opsetImport: [{ domain: '', version: 17 }], graph: { name: 'g', initializer: [{ name: 'w', dims: [1, 2], dataType, rawData: bytes }] } });
      writeFileSync(path.join(dir, 'unet', 'model.onnx'), onnx.ModelProto.encode(model).finish());
      return dir;
    };
    const st = parseSafetensors(writeSafetensors([
      { name: 'down', shape: [1, 2], data: Float32Array.of(300, 1) },
      { name: 'up', shape: [1, 1], data: Float32Array.of(300) },
    ]), 'big');
    const update = (factor: number) => ({
      component: 'unet' as const, param: 'proj.weight',
      entry: { initializer: 'w', shape: [1, 2], view: { shape: [1, 2], strides: [2, 1], offset: 0 } },
      terms: [{ adapter: 'big', factor, st, up: st.tensors.get('up')!, down: st.tensors.get('down')!, rank: 1 }],
    });
    const f16 = graph(10, new Uint8Array(4));
    const f32 = graph(1, new Uint8Array(8));
    try {
      for (const write of [writeMergedComponent, writeMergedCopy]) {
        const out = path.join(f16, 'out');
        await expect(write(path.join(f16, 'unet', 'model.onnx'), [update(1)], out)).rejects.toThrow(
          "adapter \"big\" takes unet weight proj.weight to 9.000e+4, past float16's range (65504); use a smaller scale",
        );
        expect(existsSync(out)).toBe(false);
        await expect(write(path.join(f16, 'unet', 'model.onnx'), [update(0.5)], out)).resolves.toBeDefined();
        await expect(write(path.join(f32, 'unet', 'model.onnx'), [update(1)], path.join(f32, 'out'))).resolves.toBeDefined();
        await expect(write(path.join(f32, 'unet', 'model.onnx'), [update(1e34)], path.join(f32, 'out'))).rejects.toThrow(
          "adapter \"big\" takes unet weight proj.weight to 9.000e+38, past float32's range; use a smaller scale",
        );
      }
    } finally {
      rmSync(f16, { recursive: true, force: true });
      rmSync(f32, { recursive: true, force: true });
    }
  });
});

describe('a merge that fails part-way', () => {
  it('leaves no half-written folder (patched weights written so far, links or copies of the data)', async () => {
    const dir = await fixtureModel({ externalData: true });
    const list = demoStyleUpdates(dir, readLoraMap(path.join(dir, 'unet'))!);
    expect(list.length).toBeGreaterThan(1);
    // The last update's map entry points past its initializer: the weights before it are patched and written first.
    const last = list.at(-1)!;
    const broken = [...list.slice(0, -1), { ...last, entry: { ...last.entry, view: { ...last.entry.view, offset: 1e9 } } }];
    const out = mkdtempSync(path.join(os.tmpdir(), 'lora-fail-'));
    try {
      for (const [name, write] of [['linked', writeMergedComponent], ['copy', writeMergedCopy]] as const) {
        const target = path.join(out, name, 'unet');
        await expect(write(path.join(dir, 'unet', 'model.onnx'), broken, target)).rejects.toThrow(/places .* outside initializer/);
        expect(existsSync(target), name).toBe(false);
      }
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

/** The demo-style adapter's UNet updates at scale 0.9 against the map `map`. */
function demoStyleUpdates(dir: string, map: LoraMap) {
  const st = parseSafetensors(readFileSync(path.join(dir, 'loras', 'demo-style.safetensors')), 'demo-style');
  const { updates } = resolveAdapters([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 0.9 }], new Map<LoraComponent, LoraMap>([['unet', map]]));
  return [...updates.values()].filter((u) => u.component === 'unet');
}

describe('a large adapter', () => {
  it("is read a weight's layers at a time while it merges, not held whole as float64 (an SDXL rank-128 file is ~900 MB of float16)", async () => {
    const dir = await fixtureModel({ externalData: true });
    const map = readLoraMap(path.join(dir, 'unet'))!;
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'lora-big-'));
    try {
      // kohya form, float16, ~12.8 MB per weight over every weight of the demo UNet (its weights are tiny, so the ranks
      // are huge): 128 MB of float16, 512 MB as float64.
      const file = path.join(tmp, 'big.safetensors');
      writeKohyaAdapter(file, map, 12.8e6);
      expect(statSync(file).size).toBeGreaterThan(120e6);
      // As an adapter set's thread builds it (lora-thread.ts), in a process of its own so its peak is its own.
      const url = (f: string) => JSON.stringify(pathToFileURL(path.join(import.meta.dirname, '..', 'dist', 'src', 'pipeline', f)).href);
      const script = `
        const { openSafetensors } = await import(${url('lora-safetensors.js')});
        const { parseAdapter } = await import(${url('lora-keys.js')});
        const { planAdapterSet, writeMergedComponent } = await import(${url('lora-merge.js')});
        const st = await openSafetensors(${JSON.stringify(file)}, 'adapter "big"');
        const before = process.memoryUsage().rss;
        const { byComponent, problems } = planAdapterSet([{ parsed: parseAdapter(st, 'big'), st, scale: 1 }], { unet: ${JSON.stringify(path.join(dir, 'unet', 'model.onnx'))} });
        if (problems.length > 0) throw new Error(problems.join('; '));
        const w = await writeMergedComponent(${JSON.stringify(path.join(dir, 'unet', 'model.onnx'))}, byComponent.get('unet'), ${JSON.stringify(path.join(tmp, 'out'))});
        await st.close();
        console.log(JSON.stringify({ grewMB: (process.resourceUsage().maxRSS * 1024 - before) / 2 ** 20, weights: byComponent.get('unet').length, patchedBytes: w.patchedBytes }));`;
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 120_000 });
      expect(r.stderr).toBe('');
      const got = JSON.parse(r.stdout) as { grewMB: number; weights: number; patchedBytes: number };
      expect(got.weights).toBe(Object.keys(map.weights).length);
      expect(got.patchedBytes).toBeGreaterThan(0);
      // Held whole it grows by 4× the file (512 MB) and more; a weight's layers at a time, by a few weights' worth (~50 MB
      // each as float64), ~140 MB here.
      expect(got.grewMB).toBeLessThan(256);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }, 180_000);
});
