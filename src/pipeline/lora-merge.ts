/**
 * @module A component's graph with LoRA updates merged into its initializers, held in memory: the graph file is
 * decoded, each updated initializer is patched where it lives (inline raw data, or its range of the external data
 * file, read whole into memory), and a session is created from those bytes (onnxruntime-node's `externalData` with
 * in-memory files). Nothing is written to disk; docs/LORA.md has the measurements behind this choice.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { RuntimeError } from '../errors.js';
import { fromHalfBits, toHalfBits } from './half.js';
import { mergeDelta, type WeightUpdate } from './lora-keys.js';
import { viewPositions } from './lora-map.js';

const { onnx } = onnxProto;
const FLOAT = 1;
const FLOAT16 = 10;
const EXTERNAL = onnx.TensorProto.DataLocation.EXTERNAL;

export interface MergedModel {
  /** The graph file's bytes (re-encoded when an inline initializer changed). */
  model: Uint8Array;
  /** Every external data file the graph names, patched, by the location the graph names it with. */
  externalData: Array<{ path: string; data: Uint8Array }>;
  /** Bytes of weights patched, and of the whole component (graph + data): what a session of it holds. */
  patchedBytes: number;
  totalBytes: number;
}

/**
 * Merges `updates` (all of one component) into `<componentDir>/model.onnx`. Each weight becomes
 * round(W + Σ factor · up · down), summed in float64 (mergeDelta) and rounded once to the initializer's type (float16
 * through float32).
 */
export async function mergeComponent(modelPath: string, updates: readonly WeightUpdate[]): Promise<MergedModel> {
  const dir = path.dirname(modelPath);
  const component = path.basename(dir);
  const graphBytes = await readFile(modelPath);
  const model = onnx.ModelProto.decode(graphBytes);
  const inits = new Map((model.graph?.initializer ?? []).map((t) => [t.name ?? '', t] as const));
  const external = new Map<string, Buffer>();
  const locationOf = (t: onnxProto.onnx.ITensorProto) => {
    const kv = new Map((t.externalData ?? []).map((e) => [e.key ?? '', e.value ?? '']));
    return { location: kv.get('location') ?? '', offset: Number(kv.get('offset') ?? 0), length: kv.has('length') ? Number(kv.get('length')) : undefined };
  };
  // Every external file, patched or not: a session created from bytes finds none of them on disk.
  for (const t of inits.values()) {
    if (t.dataLocation !== EXTERNAL) continue;
    const { location } = locationOf(t);
    if (external.has(location)) continue;
    const file = path.resolve(dir, location);
    if (!file.startsWith(dir + path.sep)) throw new RuntimeError('MODEL_FORMAT', `${component}: external data location ${JSON.stringify(location)} leaves the component folder`);
    external.set(location, await readFile(file));
  }
  let inlineChanged = false;
  let patchedBytes = 0;
  for (const u of updates) {
    const t = inits.get(u.entry.initializer);
    if (!t) throw new RuntimeError('MODEL_FORMAT', `${component}: lora_map.json names initializer ${JSON.stringify(u.entry.initializer)} for ${u.param}, which the graph does not have`);
    const type = t.dataType ?? 0;
    if (type !== FLOAT && type !== FLOAT16) throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${u.entry.initializer} (${u.param}) is of ONNX type ${type}; LoRA merges float32 and float16 weights`);
    const size = type === FLOAT ? 4 : 2;
    const count = (t.dims ?? []).reduce((a: number, b) => a * Number(b), 1);
    let bytes: Uint8Array;
    if (t.dataLocation === EXTERNAL) {
      const { location, offset, length } = locationOf(t);
      const file = external.get(location)!;
      if (offset + (length ?? count * size) > file.byteLength) throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${u.entry.initializer} lies past the end of ${location}`);
      bytes = file.subarray(offset, offset + count * size);
    } else if (t.rawData && t.rawData.byteLength > 0) {
      // A copy: the decoded proto's raw data may be a view of the graph file's bytes.
      bytes = new Uint8Array(t.rawData);
      t.rawData = bytes;
      inlineChanged = true;
    } else {
      throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${u.entry.initializer} keeps its values outside raw_data; re-export the model with scripts/export_sd.py`);
    }
    if (bytes.byteLength !== count * size) throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${u.entry.initializer} holds ${bytes.byteLength} bytes for ${count} values`);
    const pos = viewPositions(u.entry.view);
    const delta = mergeDelta(u);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < delta.length; i++) {
      const p = pos[i]!;
      if (p < 0 || p >= count) throw new RuntimeError('MODEL_FORMAT', `${component}: lora_map.json places ${u.param} outside initializer ${u.entry.initializer}`);
      if (type === FLOAT) view.setFloat32(p * 4, view.getFloat32(p * 4, true) + delta[i]!, true);
      else view.setUint16(p * 2, toHalfBits(fromHalfBits(view.getUint16(p * 2, true)) + delta[i]!), true);
    }
    patchedBytes += delta.length * size;
  }
  const out = inlineChanged ? onnx.ModelProto.encode(model).finish() : graphBytes;
  const externalData = [...external].map(([p, data]) => ({ path: p, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) }));
  return { model: out, externalData, patchedBytes, totalBytes: out.byteLength + externalData.reduce((n, e) => n + e.data.byteLength, 0) };
}
