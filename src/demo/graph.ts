/** @module A small ONNX graph builder (opset 17, IR 8) with seeded weights and optional external data. */
import { createRequire } from 'node:module';
import type onnxProto from 'onnx-proto';

type INode = onnxProto.onnx.INodeProto;
type ITensor = onnxProto.onnx.ITensorProto;
type IValueInfo = onnxProto.onnx.IValueInfoProto;
type IAttr = onnxProto.onnx.IAttributeProto;

export const DT = { FLOAT: 1, UINT8: 2, INT64: 7, FLOAT16: 10 } as const;
export type ElemType = (typeof DT)[keyof typeof DT];
/** A dimension: a fixed size, or a dim_param name as the exporters write it ("batch_size", "latent_height * 8"). */
export type Dim = number | string;

export const OPSET = 17;
export const IR_VERSION = 8;
/** onnx's external-data convention: tensors of this many bytes or more leave the .onnx file. */
export const EXTERNAL_THRESHOLD = 100;
/** Offsets in the data file are page aligned so ORT may map them. */
const EXTERNAL_ALIGN = 4096;

/**
 * The ONNX protobuf code, loaded when a graph is first built: a server whose demo model is already in its cache imports
 * this module (through demo/index.ts) before its sessions can start, and never builds a graph.
 */
let proto: typeof onnxProto.onnx | undefined;
const onnxCode = () => (proto ??= (createRequire(import.meta.url)('onnx-proto') as typeof onnxProto).onnx);

/** Attribute values; ints and floats are told apart by wrapper, since JS numbers cannot say which. */
export type Attr = { i: number } | { f: number } | { ints: number[] } | { s: string };

/** Deterministic 32-bit PRNG (mulberry32): arithmetic only, so the bytes match on every platform. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** FNV-1a over a string: a stable seed per tensor name, so weights do not depend on build order. */
export function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

interface Init {
  name: string;
  dims: number[];
  dataType: ElemType;
  bytes: Uint8Array;
}

/**
 * A float32 [PAD_ROWS, cols] weight with cols = ceil(bytes / (4 · PAD_ROWS)); its values are generated while
 * streaming, never held whole.
 */
export interface Padding {
  name: string;
  bytes: number;
  seed: number;
}

/** Rows of the padding weight: the width of the activation it multiplies (see unetGraph). */
export const PAD_ROWS = 32;

/** The padding's shape and its exact size in bytes (at least the requested bytes). */
export function paddingShape(bytes: number): { dims: [number, number]; bytes: number } {
  const cols = Math.max(1, Math.ceil(bytes / (4 * PAD_ROWS)));
  return { dims: [PAD_ROWS, cols], bytes: PAD_ROWS * cols * 4 };
}

export class GraphBuilder {
  private readonly nodes: INode[] = [];
  private readonly inits: Init[] = [];
  private readonly inputs: IValueInfo[] = [];
  private readonly outputs: IValueInfo[] = [];
  private readonly names = new Set<string>();
  private counter = 0;
  /** Torch weight name → where it lives, for `<component>/lora_map.json` (see src/pipeline/lora-map.ts). */
  readonly loraMap: Record<string, { initializer: string; shape: number[]; view: { shape: number[]; strides: number[]; offset: number } }> = {};
  /** Changes a weight's values before they are stored (tests build LoRA-merged demo graphs with it). */
  editWeight: ((name: string, values: Float32Array, dims: readonly number[]) => void) | undefined;

  /**
   * @param seed global weight seed; each tensor's stream is derived from it and the tensor's name.
   * @param fp16 every float graph input and output becomes float16, cast at the edges.
   */
  constructor(readonly name: string, private readonly seed: number, private readonly fp16 = false) {}

  private fresh(hint: string): string {
    let n: string;
    do n = `/${hint}_${this.counter++}`; while (this.names.has(n));
    this.names.add(n);
    return n;
  }

  /** Declares a graph input and returns the tensor to compute from (float32 after any fp16 cast). */
  input(name: string, type: 'float' | 'int64', dims: Dim[]): string {
    this.names.add(name);
    const half = type === 'float' && this.fp16;
    this.inputs.push(valueInfo(name, type === 'int64' ? DT.INT64 : half ? DT.FLOAT16 : DT.FLOAT, dims));
    return half ? this.op('Cast', [name], { to: { i: DT.FLOAT } }) : name;
  }

  /** Declares a float graph output computed by `from` (float32); fp16 models get a Cast. */
  output(name: string, from: string, dims: Dim[]): void {
    this.names.add(name);
    this.outputs.push(valueInfo(name, this.fp16 ? DT.FLOAT16 : DT.FLOAT, dims));
    if (this.fp16) this.nodes.push(node('Cast', [from], [name], { to: { i: DT.FLOAT16 } }));
    else this.nodes.push(node('Identity', [from], [name], {}));
  }

  op(type: string, inputs: string[], attrs: Record<string, Attr> = {}): string {
    const out = this.fresh(type);
    this.nodes.push(node(type, inputs, [out], attrs));
    return out;
  }

  opN(type: string, inputs: string[], count: number, attrs: Record<string, Attr> = {}): string[] {
    const outs = Array.from({ length: count }, () => this.fresh(type));
    this.nodes.push(node(type, inputs, outs, attrs));
    return outs;
  }

  floats(name: string, dims: number[], data: Float32Array | readonly number[]): string {
    const arr = data instanceof Float32Array ? data : Float32Array.from(data);
    if (arr.length !== dims.reduce((a, b) => a * b, 1)) throw new Error(`initializer ${name}: ${arr.length} values for dims [${dims}]`);
    return this.addInit(name, dims, DT.FLOAT, new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength));
  }

  int64s(name: string, values: readonly number[]): string {
    const arr = BigInt64Array.from(values.map((v) => BigInt(v)));
    return this.addInit(name, [values.length], DT.INT64, new Uint8Array(arr.buffer));
  }

  int64Scalar(name: string, value: number): string {
    return this.addInit(name, [], DT.INT64, new Uint8Array(BigInt64Array.of(BigInt(value)).buffer));
  }

  /** Uniform weights in [-scale·√3, scale·√3) (standard deviation `scale`), seeded by name. */
  random(name: string, dims: number[], scale: number, offset = 0): string {
    const n = dims.reduce((a, b) => a * b, 1);
    const next = mulberry32(fnv1a(`${this.seed}:${this.name}:${name}`));
    const arr = new Float32Array(n);
    const a = scale * Math.sqrt(3);
    for (let i = 0; i < n; i++) arr[i] = offset + (next() * 2 - 1) * a;
    this.editWeight?.(name, arr, dims);
    return this.floats(name, dims, arr);
  }

  /**
   * A torch Linear(inF → outF) weight stored as the MatMul initializer [inF, outF], the transpose of torch's
   * [outF, inF] (as torch.onnx.export folds it), and listed in the LoRA map with that layout.
   */
  linear(name: string, inF: number, outF: number, scale: number): string {
    const t = this.random(name, [inF, outF], scale);
    this.loraMap[name] = { initializer: t, shape: [outF, inF], view: { shape: [outF, inF], strides: [1, outF], offset: 0 } };
    return t;
  }

  /** A torch Conv2d weight [out, in, kh, kw], stored as it is, and listed in the LoRA map. */
  convWeight(name: string, dims: [number, number, number, number], scale: number): string {
    const t = this.random(name, dims, scale);
    const [, i, kh, kw] = dims;
    this.loraMap[name] = { initializer: t, shape: [...dims], view: { shape: [...dims], strides: [i * kh * kw, kh * kw, kw, 1], offset: 0 } };
    return t;
  }

  private addInit(name: string, dims: number[], dataType: ElemType, bytes: Uint8Array): string {
    if (this.names.has(name)) throw new Error(`duplicate tensor name ${name}`);
    this.names.add(name);
    this.inits.push({ name, dims, dataType, bytes });
    return name;
  }

  /**
   * Serialises the model. With `external`, tensors of EXTERNAL_THRESHOLD bytes or more (and the padding) are
   * referenced from `dataFile`; the caller writes their bytes with `writeExternal` in the returned order.
   */
  serialize(opts: { external?: boolean; dataFile?: string; padding?: Padding } = {}): Serialized {
    const dataFile = opts.dataFile ?? 'model.onnx_data';
    const chunks: ExternalChunk[] = [];
    let offset = 0;
    const place = (length: number): number => {
      const at = Math.ceil(offset / EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
      offset = at + length;
      return at;
    };
    const onnx = onnxCode();
    const extRef = (at: number, length: number) => ({
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: dataFile },
        { key: 'offset', value: String(at) },
        { key: 'length', value: String(length) },
      ],
    });
    const initializer: ITensor[] = this.inits.map((t) => {
      const base: ITensor = { name: t.name, dims: t.dims, dataType: t.dataType };
      if (opts.external && t.bytes.byteLength >= EXTERNAL_THRESHOLD) {
        const at = place(t.bytes.byteLength);
        chunks.push({ offset: at, bytes: t.bytes });
        return { ...base, ...extRef(at, t.bytes.byteLength) };
      }
      return { ...base, rawData: t.bytes };
    });
    if (opts.padding && opts.padding.bytes > 0) {
      const p = opts.padding;
      const shape = paddingShape(p.bytes);
      const at = place(shape.bytes);
      chunks.push({ offset: at, padding: { ...p, bytes: shape.bytes } });
      initializer.push({ name: p.name, dims: shape.dims, dataType: DT.FLOAT, ...extRef(at, shape.bytes) });
    }
    const model = onnx.ModelProto.create({
      irVersion: IR_VERSION,
      opsetImport: [{ domain: '', version: OPSET }],
      producerName: 'diffusers-runtime-demo',
      producerVersion: '1',
      graph: {
        name: this.name,
        node: this.nodes,
        initializer,
        input: this.inputs,
        output: this.outputs,
      },
    });
    return { model: onnx.ModelProto.encode(model).finish(), external: chunks, externalBytes: offset };
  }
}

export interface ExternalChunk {
  offset: number;
  bytes?: Uint8Array;
  padding?: Padding;
}

export interface Serialized {
  model: Uint8Array;
  /** Pieces of the external data file in ascending offset order (empty when everything is inline). */
  external: ExternalChunk[];
  externalBytes: number;
}

/**
 * A padding generator: each call fills `out` (a whole number of float32s, 4-byte aligned) with the next values of
 * one seeded xorshift stream mapped to [-1, 1): finite weights, cheap and deterministic, little-endian as ONNX stores them.
 */
export function paddingStream(seed: number): (out: Uint8Array) => void {
  let x = (seed >>> 0) || 0x9e3779b9;
  return (out) => {
    if (out.byteLength % 4 !== 0 || out.byteOffset % 4 !== 0) throw new RangeError('padding blocks hold whole, aligned float32s');
    const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
    for (let i = 0; i < out.byteLength; i += 4) {
      x ^= x << 13; x >>>= 0;
      x ^= x >>> 17;
      x ^= x << 5; x >>>= 0;
      view.setFloat32(i, (x >>> 8) * 2 ** -23 - 1, true);
    }
  };
}

function valueInfo(name: string, elemType: ElemType, dims: Dim[]): IValueInfo {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

function node(opType: string, input: string[], output: string[], attrs: Record<string, Attr>): INode {
  const attribute: IAttr[] = Object.entries(attrs).map(([name, v]) => {
    const T = onnxCode().AttributeProto.AttributeType;
    if ('i' in v) return { name, type: T.INT, i: v.i };
    if ('f' in v) return { name, type: T.FLOAT, f: v.f };
    if ('ints' in v) return { name, type: T.INTS, ints: v.ints };
    return { name, type: T.STRING, s: new TextEncoder().encode(v.s) };
  });
  return { opType, input, output, name: output[0], attribute };
}
