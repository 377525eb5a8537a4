/**
 * @module The safetensors format, read without native code: an 8-byte little-endian header length, a JSON header
 * (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}`), then the tensors' bytes,
 * little-endian, row-major, offsets relative to the end of the header. (The demo model writes it: demo/safetensors.ts.)
 */
import { open } from 'node:fs/promises';
import { readSync } from 'node:fs';
import { REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { isRuntimeError, RuntimeError } from '../errors.js';
import { fromHalfBits } from './half.js';

/** A header bigger than this is not a LoRA file (kohya's largest SDXL LoRAs have headers of a few hundred KB). */
export const MAX_HEADER_BYTES = 64 * 1024 * 1024;

const ELEMENT_BYTES: Readonly<Record<string, number>> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1, U16: 2, U32: 4, U64: 8,
  F8_E4M3: 1, F8_E5M2: 1,
};
/** The dtypes whose values a LoRA merge can read. */
const FLOAT_DTYPES = new Set(['F64', 'F32', 'F16', 'BF16']);

export interface StTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** Byte range in the data section (after the header). */
  begin: number;
  end: number;
}

export interface SafeTensors {
  tensors: Map<string, StTensor>;
  metadata: Record<string, string>;
  /** Bytes [begin, end) of the data section (after the header). */
  read(begin: number, end: number): Uint8Array;
}

/** A safetensors file read by ranges (openSafetensors): close it once its tensors have been read. */
export interface SafeTensorsFile extends SafeTensors {
  close(): Promise<void>;
}

const invalid = (what: string, msg: string) => new RuntimeError('INVALID_INPUT', `${what} is not a valid safetensors file: ${msg}`);

/** The header length the first 8 bytes give, checked against a file of `size` bytes. */
function headerLength(first8: Uint8Array, size: number, what: string): number {
  if (size < 8) throw invalid(what, `${size} bytes, shorter than the 8-byte header length`);
  const n = new DataView(first8.buffer, first8.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(Math.min(MAX_HEADER_BYTES, size - 8))) throw invalid(what, `header length ${n} runs past the file (${size} bytes) or over ${MAX_HEADER_BYTES}`);
  return Number(n);
}

/** A file in memory. `what` names the file in errors (an adapter name, never a local path). */
export function parseSafetensors(buf: Uint8Array, what: string): SafeTensors {
  const headerLen = headerLength(buf, buf.byteLength, what);
  const data = buf.subarray(8 + headerLen);
  return { ...parseHeader(buf.subarray(8, 8 + headerLen), data.byteLength, what), read: (begin, end) => data.subarray(begin, end) };
}

/**
 * A file on disk, read by ranges: the header now, each tensor when it is read. An adapter's bytes are never held whole
 * (kohya's SDXL adapters reach hundreds of MB, and Node reads no file over 2 GiB whole).
 */
export async function openSafetensors(file: string, what: string): Promise<SafeTensorsFile> {
  let fh: Awaited<ReturnType<typeof open>>;
  try {
    fh = await open(file, 'r');
  } catch (err) {
    const why = shortage(err);
    if (why) throw shortageError(`${what} could not be read`, why, REQUEST_ADVICE, err);
    throw new RuntimeError('INVALID_INPUT', `${what} could not be read`, { cause: err });
  }
  try {
    const size = (await fh.stat()).size;
    const at = (pos: number, len: number): Uint8Array => {
      const out = new Uint8Array(len);
      // One read returns at most ~2 GiB on Linux, and less if the file shrank: read until the range is whole.
      for (let got = 0; got < len;) {
        const n = readSync(fh.fd, out, got, len - got, pos + got);
        if (n === 0) throw new RuntimeError('INVALID_INPUT', `${what} could not be read: it ends at byte ${pos + got}, before the tensor it lists`);
        got += n;
      }
      return out;
    };
    const headerLen = headerLength(at(0, Math.min(8, size)), size, what);
    const base = 8 + headerLen;
    const parsed = parseHeader(at(8, headerLen), size - base, what);
    return { ...parsed, read: (begin, end) => at(base + begin, end - begin), close: () => fh.close() };
  } catch (err) {
    await fh.close().catch(() => undefined);
    if (isRuntimeError(err)) throw err;
    throw new RuntimeError('INVALID_INPUT', `${what} could not be read`, { cause: err });
  }
}

function parseHeader(bytes: Uint8Array, dataLength: number, what: string): Pick<SafeTensors, 'tensors' | 'metadata'> {
  const bad = (msg: string) => invalid(what, msg);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw bad(`the header is not JSON (${(err as Error).message})`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) throw bad('the header is not a JSON object');
  const tensors = new Map<string, StTensor>();
  let metadata: Record<string, string> = {};
  const ranges: Array<[number, number, string]> = [];
  for (const [name, v] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof v !== 'object' || v === null || Array.isArray(v) || !Object.values(v).every((x) => typeof x === 'string')) throw bad('__metadata__ must map strings to strings');
      metadata = { ...(v as Record<string, string>) };
      continue;
    }
    const t = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof t !== 'object' || t === null) throw bad(`tensor ${JSON.stringify(name)} is not an object`);
    const dtype = t.dtype;
    if (typeof dtype !== 'string' || !Object.hasOwn(ELEMENT_BYTES, dtype)) throw bad(`tensor ${JSON.stringify(name)} has unknown dtype ${JSON.stringify(dtype)}`);
    const shape = t.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) throw bad(`tensor ${JSON.stringify(name)} has a bad shape`);
    const off = t.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) throw bad(`tensor ${JSON.stringify(name)} has bad data_offsets`);
    const [begin, end] = off as [number, number];
    const count = (shape as number[]).reduce((a, b) => a * b, 1);
    if (end < begin || end > dataLength) throw bad(`tensor ${JSON.stringify(name)} lies outside the data (${begin}..${end} of ${dataLength} bytes)`);
    if (end - begin !== count * ELEMENT_BYTES[dtype]!) throw bad(`tensor ${JSON.stringify(name)}: ${end - begin} bytes for ${count} ${dtype} values`);
    tensors.set(name, { name, dtype, shape: shape as number[], begin, end });
    ranges.push([begin, end, name]);
  }
  // By end too: an empty tensor sits at the offset where the next one begins (writers give cumulative offsets).
  ranges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  for (let i = 1; i < ranges.length; i++) {
    if (ranges[i]![0] < ranges[i - 1]![1]) throw bad(`tensors ${JSON.stringify(ranges[i - 1]![2])} and ${JSON.stringify(ranges[i]![2])} overlap`);
  }
  return { tensors, metadata };
}

/**
 * The one value of a scalar tensor (a `.alpha`), as a number, of a float or integer dtype: diffusers'
 * `convert_state_dict_to_kohya` writes alphas as int64 (`torch.tensor(rank)`), kohya's scripts as floats. Undefined
 * when the tensor holds other than one value; a dtype of neither kind is refused by name.
 */
export function readScalar(st: SafeTensors, t: StTensor, what: string): number | undefined {
  if (t.end - t.begin !== ELEMENT_BYTES[t.dtype]) return undefined;
  if (FLOAT_DTYPES.has(t.dtype)) return readFloats(st, t, what)[0];
  const bytes = st.read(t.begin, t.end);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (t.dtype) {
    case 'I64': return Number(view.getBigInt64(0, true));
    case 'U64': return Number(view.getBigUint64(0, true));
    case 'I32': return view.getInt32(0, true);
    case 'U32': return view.getUint32(0, true);
    case 'I16': return view.getInt16(0, true);
    case 'U16': return view.getUint16(0, true);
    case 'I8': return view.getInt8(0);
    case 'U8': return view.getUint8(0);
    default: throw new RuntimeError('INVALID_INPUT', `${what}: tensor ${JSON.stringify(t.name)} has dtype ${t.dtype}; an alpha must be a float or an integer`);
  }
}

/** Refuses, by name, a tensor whose dtype readFloats cannot read. */
export function checkFloats(t: StTensor, what: string): void {
  if (!FLOAT_DTYPES.has(t.dtype)) throw new RuntimeError('INVALID_INPUT', `${what}: tensor ${JSON.stringify(t.name)} has dtype ${t.dtype}; LoRA weights must be F32, F16, BF16 or F64`);
}

/** A tensor's values as float64 (F32, F16, BF16, F64); other dtypes are refused by name. */
export function readFloats(st: SafeTensors, t: StTensor, what: string): Float64Array {
  checkFloats(t, what);
  const bytes = st.read(t.begin, t.end);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const size = ELEMENT_BYTES[t.dtype]!;
  const n = bytes.byteLength / size;
  const out = new Float64Array(n);
  const u32 = new Uint32Array(1);
  const f32 = new Float32Array(u32.buffer);
  for (let i = 0; i < n; i++) {
    switch (t.dtype) {
      case 'F32': out[i] = view.getFloat32(i * 4, true); break;
      case 'F16': out[i] = fromHalfBits(view.getUint16(i * 2, true)); break;
      case 'BF16': u32[0] = view.getUint16(i * 2, true) << 16; out[i] = f32[0]!; break;
      default: out[i] = view.getFloat64(i * 8, true);
    }
  }
  return out;
}
