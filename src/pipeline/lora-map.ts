/**
 * @module `<component>/lora_map.json`: where each torch weight of a component lives in its ONNX graph, written by the
 * export (scripts/export_sd.py, the demo model) so a LoRA merge can patch initializers by torch parameter name.
 *
 * A weight is a strided view into one initializer: the torch tensor's elements, in row-major order, are walked
 * through `view.shape` (any reshape of the torch shape with the same element count) and element i of the view lives
 * at `offset + Σ index_d · strides_d` of the initializer (element units). That one form covers every layout the
 * exporters produce: the same shape (strides row-major), a Linear weight transposed into a MatMul initializer,
 * NhwcConv's OHWI weights, and onnxruntime's packed Q/K/V and K/V weights interleaved per head.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { RuntimeError } from '../errors.js';

export const LORA_MAP_FILE = 'lora_map.json';
export const LORA_MAP_FORMAT = 1;

export interface WeightView {
  shape: number[];
  strides: number[];
  offset: number;
}

export interface MapEntry {
  initializer: string;
  /** The torch parameter's shape. */
  shape: number[];
  view: WeightView;
}

export interface LoraMap {
  format: number;
  component: string;
  /** Torch parameter name (`down_blocks.0.attentions.0.proj_in.weight`) → where it is. */
  weights: Record<string, MapEntry>;
  /** Linear/Conv weights of the torch module the export could not locate (folded or rewritten): named in errors. */
  unmapped?: string[];
}

/** The component's map, or undefined when the export has none (adapters then cannot target the component). */
export function readLoraMap(componentDir: string): LoraMap | undefined {
  const file = path.join(componentDir, LORA_MAP_FILE);
  if (!existsSync(file)) return undefined;
  const component = path.basename(componentDir);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new RuntimeError('MODEL_FORMAT', `${component}/${LORA_MAP_FILE} is not JSON: ${(err as Error).message}`);
  }
  return checkLoraMap(raw, component);
}

export function checkLoraMap(raw: unknown, component: string): LoraMap {
  const bad = (msg: string) => new RuntimeError('MODEL_FORMAT', `${component}/${LORA_MAP_FILE}: ${msg}`);
  const m = raw as Partial<LoraMap>;
  if (typeof m !== 'object' || m === null) throw bad('not an object');
  if (m.format !== LORA_MAP_FORMAT) throw bad(`format ${JSON.stringify(m.format)} is not ${LORA_MAP_FORMAT}; re-export the model with this runtime's scripts/export_sd.py`);
  if (typeof m.weights !== 'object' || m.weights === null) throw bad('no "weights" object');
  const ints = (v: unknown) => Array.isArray(v) && v.every((d) => Number.isSafeInteger(d));
  for (const [name, e] of Object.entries(m.weights)) {
    const ok = typeof e?.initializer === 'string' && ints(e.shape) && ints(e.view?.shape) && ints(e.view?.strides) && Number.isSafeInteger(e.view?.offset)
      && e.view.shape.length === e.view.strides.length && numel(e.view.shape) === numel(e.shape);
    if (!ok) throw bad(`weight ${JSON.stringify(name)} has a malformed entry`);
  }
  return { format: m.format, component: typeof m.component === 'string' ? m.component : component, weights: m.weights, ...(Array.isArray(m.unmapped) ? { unmapped: m.unmapped.map(String) } : {}) };
}

export const numel = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** For each element of the torch tensor (row-major), its element index in the initializer. */
export function viewPositions(v: WeightView): Float64Array {
  const n = numel(v.shape);
  const out = new Float64Array(n);
  const idx = new Array<number>(v.shape.length).fill(0);
  let pos = v.offset;
  for (let i = 0; i < n; i++) {
    out[i] = pos;
    // Odometer increment over the view's dims, last dim fastest.
    for (let d = v.shape.length - 1; d >= 0; d--) {
      idx[d]!++;
      pos += v.strides[d]!;
      if (idx[d]! < v.shape[d]!) break;
      pos -= v.strides[d]! * v.shape[d]!;
      idx[d] = 0;
    }
  }
  return out;
}
