/** @module Large LoRA adapters written by tests, for what only size shows (memory held, offsets past 2 GiB). */
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { readLoraMap, type LoraMap } from '../../src/pipeline/lora-map.js';

/**
 * A kohya-form float16 adapter on every weight of `map`'s component (the UNet: `lora_unet_*`), each weight's down and
 * up about `bytesPerWeight` together (the demo's weights are tiny, so the ranks are huge); returns the data's bytes.
 * Small values (float16 2^-10 · (1 + k/1024)) and alpha 1 where a scalar goes: the update stays finite.
 */
export function writeKohyaAdapter(file: string, map: LoraMap, bytesPerWeight: number): number {
  const header: Record<string, unknown> = {};
  let offset = 0;
  const add = (name: string, shape: number[]) => {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: 'F16', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  };
  for (const [param, e] of Object.entries(map.weights)) {
    const [out, ...rest] = e.shape as [number, ...number[]];
    const inner = rest.reduce((a, b) => a * b, 1);
    const rank = Math.floor(bytesPerWeight / 2 / (out + inner));
    const key = `lora_unet_${param.slice(0, -'.weight'.length).replaceAll('.', '_')}`;
    add(`${key}.lora_down.weight`, [rank, ...rest]);
    add(`${key}.lora_up.weight`, rest.length > 1 ? [out, rank, 1, 1] : [out, rank]);
    add(`${key}.alpha`, []);
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
  const fd = openSync(file, 'w');
  try {
    const head = Buffer.alloc(8 + json.length);
    head.writeBigUInt64LE(BigInt(json.length), 0);
    head.write(json, 8);
    writeSync(fd, head);
    const chunk = Buffer.alloc(1 << 20);
    for (let i = 0; i < chunk.length; i += 2) chunk.writeUInt16LE(0x1800 + ((i >> 1) & 0x3ff), i);
    for (let done = 0; done < offset; done += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, offset - done));
    for (const t of Object.values(header) as Array<{ shape: number[]; data_offsets: [number, number] }>) {
      if (t.shape.length === 0) writeSync(fd, Buffer.from([0x00, 0x3c]), 0, 2, head.length + t.data_offsets[0]);
    }
  } finally {
    closeSync(fd);
  }
  return offset;
}

/**
 * `src` with a hole of `gap` bytes before its tensors' bytes, offsets shifted to match: a sparse file, so no disk is
 * used for the hole, and the tensors lie past whatever offset the test needs. Returns where their bytes lie in `dst`.
 */
export function writeSparseCopy(src: string, dst: string, gap: number): { start: number; end: number } {
  const buf = readFileSync(src);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets?: [number, number] }>;
  for (const [k, v] of Object.entries(header)) if (k !== '__metadata__') v.data_offsets = [v.data_offsets![0] + gap, v.data_offsets![1] + gap];
  const head = Buffer.from(JSON.stringify(header));
  const fd = openSync(dst, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(head.length), 0);
    writeSync(fd, Buffer.concat([len, head]), 0, 8 + head.length, 0);
    writeSync(fd, buf, 8 + n, buf.length - 8 - n, 8 + head.length + gap);
  } finally {
    closeSync(fd);
  }
  return { start: 8 + head.length + gap, end: 8 + head.length + gap + buf.length - 8 - n };
}

/**
 * A kohya adapter of ~3 MB for the model at `model` (every weight of its UNet's map), written under `dir` and put at
 * s3://loras/adapters/style/pytorch_lora_weights.safetensors: one adapter, "style", from an S3 LORA_URI.
 */
export async function putStyleAdapter(s3: { put(bucket: string, key: string, body: Buffer): Promise<unknown> }, model: string, dir: string): Promise<void> {
  const file = path.join(dir, 'style.safetensors');
  writeKohyaAdapter(file, readLoraMap(path.join(model, 'unet'))!, 300e3);
  await s3.put('loras', 'adapters/style/pytorch_lora_weights.safetensors', readFileSync(file));
}
