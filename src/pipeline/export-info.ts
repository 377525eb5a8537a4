/**
 * @module What kind of export a model folder holds: fused for CUDA (onnxruntime's transformer optimizer, float16) or
 * plain (any provider). `scripts/export_sd.py` writes `onnx_export.json` beside model_index.json; a folder without it
 * is judged from its graphs where they are small enough to read (weights in model.onnx_data).
 */
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { RuntimeError } from '../errors.js';

export const EXPORT_MANIFEST = 'onnx_export.json';

/**
 * Operators onnxruntime's optimizer writes that only the CUDA execution provider implements: a graph with any of
 * them cannot run on the CPU provider.
 */
export const CUDA_ONLY_OPS: ReadonlySet<string> = new Set(['GroupNorm', 'SkipGroupNorm', 'NhwcConv', 'BiasSplitGelu', 'BiasAdd', 'PackedMultiHeadAttention', 'PackedAttention']);
/** Operators that mark a graph as fused (its attention or normalisations replaced by onnxruntime's kernels). */
const FUSED_MARKS: ReadonlySet<string> = new Set([...CUDA_ONLY_OPS, 'MultiHeadAttention']);

export interface ExportInfo {
  /** `fused`: needs CUDA; `plain`: any provider; `unknown`: no manifest and graphs too large to read cheaply. */
  variant: 'fused' | 'plain' | 'unknown';
  /** Where the verdict came from. */
  source: 'manifest' | 'graph' | 'none';
  /** Per component: the CUDA-only operators it holds, as the manifest lists them. */
  cudaOnlyOps: Record<string, string[]>;
}

/** Graph files larger than this are not parsed to tell the kind of export (their weights are inline). */
const MAX_GRAPH_BYTES = 64 * 1024 * 1024;

/** The export manifest of `modelDir` if it has one; a manifest that cannot be read fails the boot with its reason. */
export function readExportManifest(modelDir: string): ExportInfo | undefined {
  const file = path.join(modelDir, EXPORT_MANIFEST);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  let m: { variant?: unknown; components?: Record<string, { cuda_only_ops?: Record<string, number> }> };
  try {
    m = JSON.parse(text) as typeof m;
    if (typeof m !== 'object' || m === null) throw new Error('not an object');
  } catch (err) {
    throw new RuntimeError('MODEL_FORMAT', `${EXPORT_MANIFEST} is not valid JSON: ${(err as Error).message}`);
  }
  const variant = m.variant === 'fused' || m.variant === 'plain' ? m.variant : 'unknown';
  const cudaOnlyOps: Record<string, string[]> = {};
  for (const [c, v] of Object.entries(m.components ?? {})) cudaOnlyOps[c] = Object.keys(v?.cuda_only_ops ?? {}).filter((op) => CUDA_ONLY_OPS.has(op));
  return { variant, source: 'manifest', cudaOnlyOps };
}

/**
 * The operator types of a model.onnx (its graph's nodes, read without its weights), or undefined when the file is larger
 * than MAX_GRAPH_BYTES or cannot be read.
 */
export function graphOps(modelPath: string): Set<string> | undefined {
  try {
    if (statSync(modelPath).size > MAX_GRAPH_BYTES) return undefined;
    return nodeOpTypes(readFileSync(modelPath));
  } catch {
    return undefined;
  }
}

/**
 * `ModelProto.graph.node[].op_type` of an ONNX file, walking the protobuf wire format: every other field, the
 * initializers' weights among them, is skipped by its length. Decoding the whole model with the ONNX protobuf code took
 * ~80 ms of each boot of a model without a manifest (~50 ms of it loading that code) and a copy of every tensor; this
 * reads the same operators, a repeated singular field's last value winning as in a full decode. Throws on a malformed file.
 */
export function nodeOpTypes(buf: Uint8Array): Set<string> {
  // ModelProto.graph = 7, GraphProto.node = 1, NodeProto.op_type = 4: all length-delimited (wire type 2).
  let graph: [number, number] | undefined;
  fields(buf, 0, buf.length, (field, start, end) => {
    if (field === 7) graph = [start, end];
  });
  const ops = new Set<string>();
  if (graph === undefined) return ops;
  fields(buf, graph[0], graph[1], (field, start, end) => {
    if (field !== 1) return;
    let op = '';
    fields(buf, start, end, (f, s, e) => {
      if (f === 4) op = Buffer.from(buf.buffer, buf.byteOffset + s, e - s).toString('utf8');
    });
    ops.add(op);
  });
  return ops;
}

/** Calls `onBytes` for each length-delimited field of the message in buf[from, to); skips the others. */
function fields(buf: Uint8Array, from: number, to: number, onBytes: (field: number, start: number, end: number) => void): void {
  let i = from;
  const varint = (): number => {
    let v = 0;
    for (let shift = 0; ; shift += 7) {
      if (i >= to || shift > 63) throw new RangeError('a malformed varint');
      const b = buf[i++]!;
      // Lengths and tags fit in 2^53; the high bits of a long integer value, skipped, do not matter.
      if (shift < 53) v += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return v;
    }
  };
  while (i < to) {
    const tag = varint();
    const wire = tag % 8;
    const field = Math.floor(tag / 8);
    if (wire === 0) varint();
    else if (wire === 1) i += 8;
    else if (wire === 5) i += 4;
    else if (wire === 2) {
      const len = varint();
      if (len > to - i) throw new RangeError('a field runs past its message');
      onBytes(field, i, i + len);
      i += len;
    } else throw new RangeError(`wire type ${wire}`);
    if (i > to) throw new RangeError('a field runs past its message');
  }
}

/** The manifest's verdict, else the UNet graph's (fused when it holds onnxruntime's fused operators). */
export function exportInfo(modelDir: string): ExportInfo {
  const manifest = readExportManifest(modelDir);
  if (manifest) return manifest;
  const ops = graphOps(path.join(modelDir, 'unet', 'model.onnx'));
  if (!ops) return { variant: 'unknown', source: 'none', cudaOnlyOps: {} };
  const cuda = [...ops].filter((op) => CUDA_ONLY_OPS.has(op));
  return { variant: [...ops].some((op) => FUSED_MARKS.has(op)) ? 'fused' : 'plain', source: 'graph', cudaOnlyOps: cuda.length > 0 ? { unet: cuda } : {} };
}

/**
 * The boot error for a CUDA-only graph on the CPU provider: what it is, why the process is on the CPU when
 * EXECUTION_PROVIDER=auto tried CUDA (`cudaReason`: on a GPU node, that is what to fix), and the two ways out.
 */
export function needsCudaError(component: string, ops: readonly string[], why: string, cudaReason?: string): RuntimeError {
  return new RuntimeError(
    'MODEL_FORMAT',
    `${component} is fused for CUDA (${why}: ${ops.join(', ')} run only on the CUDA execution provider) but this process runs on the CPU provider` +
      `${cudaReason ? ` (CUDA did not start: ${cudaReason})` : ''}; ` +
      'serve it on a GPU node (EXECUTION_PROVIDER=cuda or auto), or export the model for CPU with `scripts/export-onnx.sh MODEL OUT --plain`',
  );
}

/** ORT's message when a graph node has no kernel on the provider: "Failed to find kernel for com.microsoft.NhwcConv(1) …". */
export function missingCudaOnlyKernel(message: string): string | undefined {
  const m = /(?:Failed to find kernel for|Could not find an implementation for) (?:com\.microsoft\.)?(\w+)\(/.exec(message);
  return m && CUDA_ONLY_OPS.has(m[1]!) ? m[1] : undefined;
}

/**
 * What the worker logs once when the UNet it runs on a GPU is not fused (worker.ts), or undefined for a fused one. The
 * speed-up is README's "GPU" table (SD 1.5 size, 512x512, 50 steps, H200: plain 1.46-1.55 s, fused 0.54-0.61 s).
 */
export function slowPathWarning(info: ExportInfo): { export: string; hint: string } | undefined {
  if (info.variant === 'fused') return undefined;
  return {
    export: info.variant === 'plain' ? 'a plain (unfused) export' : 'an export of unknown kind (no onnx_export.json, graph too large to inspect)',
    hint: 'scripts/export-onnx.sh writes the fused float16 export for CUDA by default (2.4-2.9x faster per image on an H200, README "GPU")',
  };
}
