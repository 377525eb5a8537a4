/**
 * @module The KServe V2 (Open Inference Protocol) tensor codec, apart from the routes (v2.ts): the model metadata, an
 * `/infer` body (JSON, or the binary tensor data extension) decoded to one V1-style instance per prompt, and the
 * answer encoded the same two ways. No I/O: bytes and headers in, values out.
 */
import { randomUUID } from 'node:crypto';
import { RuntimeError } from '../errors.js';
import { fromHalfBits } from '../pipeline/half.js';
import type { TaskResult } from '../runtime/engine.js';
import { isObj } from '../runtime/fields.js';
import { IMAGE_FIELDS } from '../runtime/image-request.js';
import { assertSafeJson, joinProblems, pushUnknownField } from '../runtime/request.js';
import { jsonText, nonEmpty, printable } from './http.js';

/** `image`: BYTES holding an image, base64 text or an s3:// URI in JSON, the file's own bytes as binary data. `json`: a
 * BYTES input or string parameter holding JSON (the list of LoRA adapters: V2 parameters are flat). */
type Kind = 'string' | 'int' | 'float' | 'image' | 'json';
/** The image fields (image-request.ts) as V2 inputs: images as BYTES, strength FP32, resize_mode BYTES. */
const IMAGE_INPUTS: Readonly<Record<(typeof IMAGE_FIELDS)[number], Kind>> = { image: 'image', mask_image: 'image', strength: 'float', resize_mode: 'string' };
/** Generation fields accepted as named inputs (one element, or one per prompt) or as request parameters. */
const FIELDS: Readonly<Record<string, Kind>> = {
  prompt: 'string',
  negative_prompt: 'string',
  num_inference_steps: 'int',
  guidance_scale: 'float',
  height: 'int',
  width: 'int',
  seed: 'int',
  scheduler: 'string',
  num_images_per_prompt: 'int',
  eta: 'float',
  guidance_rescale: 'float',
  output_format: 'string',
  quality: 'int',
  output_uri: 'string',
  ...IMAGE_INPUTS,
  loras: 'json',
};
const DATATYPE_OF: Record<Kind, string> = { string: 'BYTES', int: 'INT64', float: 'FP32', image: 'BYTES', json: 'BYTES' };
/** What a JSON number in an integer tensor may hold (64-bit ones: what a double holds exactly). */
const INT_RANGES: Readonly<Record<string, readonly [number, number]>> = {
  INT8: [-128, 127],
  UINT8: [0, 255],
  INT16: [-32768, 32767],
  UINT16: [0, 65535],
  INT32: [-(2 ** 31), 2 ** 31 - 1],
  UINT32: [0, 2 ** 32 - 1],
  INT64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  UINT64: [0, Number.MAX_SAFE_INTEGER],
};
const INTS: ReadonlySet<string> = new Set(Object.keys(INT_RANGES));
const FLOATS = new Set(['FP16', 'FP32', 'FP64', 'BF16']);
const ELEMENT_BYTES: Record<string, number> = {
  BOOL: 1, INT8: 1, UINT8: 1, INT16: 2, UINT16: 2, FP16: 2, BF16: 2, INT32: 4, UINT32: 4, FP32: 4, INT64: 8, UINT64: 8, FP64: 8,
};
const DATATYPES = new Set([...Object.keys(ELEMENT_BYTES), 'BYTES']);
const OUTPUTS = ['image', 'seed'] as const;
/** The keys of an Open Inference Protocol inference request. */
const REQUEST_KEYS = ['id', 'parameters', 'inputs', 'outputs'] as const;
/** Request parameters of Triton's that are not generation fields: `timeout` (µs) bounds the request, `priority` is read only. */
const TRITON_PARAMETERS: readonly string[] = ['timeout', 'priority'];
type OutputName = (typeof OUTPUTS)[number];

/** Model metadata: what `/infer` accepts. Variable dims are -1. */
export function modelMetadata(name: string): Record<string, unknown> {
  const t = (n: string, kind: Kind) => ({ name: n, datatype: DATATYPE_OF[kind], shape: [-1] });
  return {
    name,
    versions: [],
    platform: 'onnx-diffusers',
    // Every input but prompt is optional; the V2 metadata tensor has no field to say so (see the README).
    inputs: Object.entries(FIELDS).map(([n, k]) => t(n, k)),
    outputs: [t('image', 'string'), { name: 'seed', datatype: 'INT64', shape: [-1] }],
  };
}

type Scalar = string | number | boolean;
interface Tensor {
  name: string;
  datatype: string;
  shape: number[];
  /** Buffers: image inputs sent as binary data (their bytes are the file, not text). */
  values: Array<string | number | Buffer>;
}
export interface InferRequest {
  id: string;
  parameters: Record<string, Scalar>;
  inputs: Tensor[];
  /** Outputs to return, each with whether it is sent as binary data. */
  outputs: Array<{ name: OutputName; binary: boolean }>;
  /** Triton's request parameter `timeout` (sent in microseconds), as a deadline under REQUEST_TIMEOUT_S; absent or 0: none. */
  timeoutMs?: number;
}

const bad = (msg: string) => new RuntimeError('INVALID_INPUT', msg);
/** A client's value in a message: JSON, at most 60 characters of it. */
const brief = (v: unknown): string => {
  const j = JSON.stringify(v) ?? typeof v;
  return j.length > 60 ? `${j.slice(0, 60)}…` : j;
};

/**
 * Where the JSON value at the start of `b` ends (bytes) when more follows it; undefined where it does not parse as far,
 * or where the value itself is not UTF-8 (then that is the problem, and its U+FFFD would miscount the bytes).
 */
function jsonEnd(b: Buffer): number | undefined {
  // A leading byte order mark, which jsonText skips, is no JSON to JSON.parse.
  const bom = b[0] === 0xef && b[1] === 0xbb && b[2] === 0xbf ? 3 : 0;
  const text = b.subarray(bom).toString('utf8');
  try {
    JSON.parse(text);
  } catch (e) {
    const at = /after JSON at position (\d+)/.exec((e as Error).message)?.[1];
    if (at === undefined) return undefined;
    const end = bom + Buffer.byteLength(text.slice(0, Number(at)));
    try {
      jsonText(b.subarray(0, end));
      return end;
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/** Whether `b` is a JSON request whose inputs declare binary_data_size, followed by more bytes. */
function declaresBinary(b: Buffer): boolean {
  const end = jsonEnd(b);
  if (end === undefined) return false;
  let header: unknown;
  try {
    header = JSON.parse(jsonText(b.subarray(0, end)));
  } catch {
    return false;
  }
  return isObj(header) && Array.isArray(header.inputs) && header.inputs.some((i) => isObj(i) && isObj(i.parameters) && i.parameters.binary_data_size !== undefined);
}

/** Splits a binary-extension body into its JSON header and the tensor bytes after it. */
function splitBody(headers: Readonly<Record<string, string>>, body: Buffer): { header: unknown; binary: Buffer | undefined } {
  const raw = headers['inference-header-content-length'];
  if (raw === undefined) {
    let header: unknown;
    try {
      header = JSON.parse(nonEmpty(jsonText(body)));
    } catch (err) {
      // tritonclient sends no Content-Type: a JSON header that declares binary inputs, with bytes after it, is the binary
      // extension whose length header was left out (or dropped by a proxy on the way).
      if (((headers['content-type'] ?? '').startsWith('application/octet-stream') && body.length > 0) || declaresBinary(body)) {
        // KServe's wording (its typo included), so clients that match on it keep working.
        throw bad("received byte inputs, but the'inference-header-content-length' header is missing.");
      }
      throw bad(`Unrecognized request format: ${printable((err as Error).message)}`);
    }
    return { header, binary: undefined };
  }
  const n = /^\d+$/.test(raw.trim()) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n < 1 || n > body.length) {
    throw bad(`inference-header-content-length must be an integer from 1 to the body length (${body.length}), got ${JSON.stringify(raw)}`);
  }
  let header: unknown;
  try {
    header = JSON.parse(jsonText(body.subarray(0, n)));
  } catch (err) {
    // A length that counts into the tensor bytes (whose first one is often not UTF-8): the JSON ends before it.
    const end = jsonEnd(body.subarray(0, n));
    if (end !== undefined) {
      throw bad(`inference-header-content-length (${n}) counts past the end of the JSON header, which ends at byte ${end}; send the JSON header's length in bytes`);
    }
    throw bad(`Unrecognized request format: the JSON header (the first ${n} bytes) does not parse: ${printable((err as Error).message)}`);
  }
  return { header, binary: body.subarray(n) };
}

/**
 * An `/infer` body (JSON, or the binary extension's JSON header and tensor bytes: `headers` are the request's, lower
 * case) as tensors, every problem named at once. `maxPrompts`: no input holds more elements than prompts a request
 * may have (MAX_IMAGES_PER_REQUEST).
 */
export function parseInferRequest(headers: Readonly<Record<string, string>>, body: Buffer, maxPrompts = Number.MAX_SAFE_INTEGER, modelName?: string): InferRequest {
  const { header, binary } = splitBody(headers, body);
  if (!isObj(header)) throw bad('the request body must be a JSON object with "inputs"');
  checkSizes(header, maxPrompts);
  assertSafeJson(header, 'body');
  const problems: string[] = [];
  // The Open Inference Protocol's request has these four keys; another one (a V1 `instances`, generation fields at the
  // top level) would otherwise be ignored without a word, and the images made with the defaults.
  // KServe's own clients (InferRequest.to_rest) also send the model's name and version: taken when they name this model.
  if (Object.hasOwn(header, 'model_name') && header.model_name !== null && header.model_name !== modelName) {
    problems.push(`model_name ${brief(header.model_name)} is not the model this route serves (${JSON.stringify(modelName)}); send the request to /v2/models/${typeof header.model_name === 'string' && /^[A-Za-z0-9_.-]{1,100}$/.test(header.model_name) ? header.model_name : '{name}'}/infer or leave model_name out`);
  }
  if (Object.hasOwn(header, 'model_version') && header.model_version !== null && header.model_version !== '') {
    problems.push(`model_version ${brief(header.model_version)}: this server has no model versions; leave model_version out (or empty)`);
  }
  for (const k of Object.keys(header).filter((k) => !(REQUEST_KEYS as readonly string[]).includes(k) && k !== 'model_name' && k !== 'model_version').slice(0, 20)) {
    const shown = JSON.stringify(k.length > 40 ? `${k.slice(0, 40)}…` : k);
    problems.push(k === 'instances'
      ? `"instances" is V1's body (POST /v1/models/{name}:predict); a V2 request holds ${REQUEST_KEYS.map((r) => `"${r}"`).join(', ')}`
      : `${shown} is not a known top-level field; a V2 request holds only ${REQUEST_KEYS.map((r) => `"${r}"`).join(', ')}, and "model_name" and "model_version" as KServe's client sends them`
        + ` (generation fields go in "parameters" or as named inputs: {"inputs":[{"name":"prompt",…}],"parameters":{"num_inference_steps":…}})`);
  }

  let id: string = randomUUID();
  if (Object.hasOwn(header, 'id') && header.id !== null) {
    if (typeof header.id !== 'string') problems.push(`id must be a string, got ${typeof header.id}`);
    else id = header.id;
  }

  const parameters: Record<string, Scalar> = {};
  if (Object.hasOwn(header, 'parameters') && header.parameters !== null) {
    if (!isObj(header.parameters)) problems.push('parameters must be an object of string, number or boolean values');
    else {
      for (const [k, v] of Object.entries(header.parameters)) {
        if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') parameters[k] = v;
        // The one structured parameter: taken as the list it is, or as its JSON text (see v2Loras).
        else if (k === 'loras' && Array.isArray(v)) parameters[k] = JSON.stringify(v);
        else problems.push(`parameters.${k} must be a string, number or boolean (parameters is a flat map), got ${v === null ? 'null' : Array.isArray(v) ? 'a list' : typeof v}`);
      }
    }
  }
  for (const k of Object.keys(parameters)) {
    if (k === 'binary_data_output') {
      if (typeof parameters[k] !== 'boolean') problems.push('parameters.binary_data_output must be true or false');
    } else if (TRITON_PARAMETERS.includes(k)) {
      // Triton's request parameters, which tritonclient sends when its caller sets them (infer(priority=…, timeout=…)).
      const v = parameters[k];
      if (!Number.isSafeInteger(v) || (v as number) < 0) {
        problems.push(`parameters.${k} must be a non-negative integer (${k === 'timeout' ? 'microseconds, as Triton reads it; 0 for none' : 'Triton\'s priority level; read and not used here, every request sharing one queue'}), got ${brief(v)}`);
      }
    } else if (k === 'prompt') problems.push('prompt must be an input tensor (BYTES), not a parameter');
    else if (!Object.hasOwn(FIELDS, k)) pushUnknownField(problems, 'parameters.', k, [...Object.keys(FIELDS).filter((f) => f !== 'prompt'), 'binary_data_output', ...TRITON_PARAMETERS]);
  }

  const inputs: Tensor[] = [];
  if (!Object.hasOwn(header, 'inputs')) problems.push('the request has no "inputs" list');
  else if (!Array.isArray(header.inputs) || header.inputs.length === 0) problems.push('"inputs" must be a non-empty list of tensors');
  else {
    let offset = 0;
    const seen = new Set<string>();
    header.inputs.forEach((inp, i) => {
      const t = parseTensor(inp, i, binary, offset, problems);
      // Past this input's bytes even when it is refused: the next input is read from its own bytes, not named for a
      // problem of this one.
      offset += declaredBytes(inp);
      if (!t) return;
      if (seen.has(t.name)) problems.push(`inputs[${i}]: input "${t.name}" appears twice`);
      seen.add(t.name);
      inputs.push(t);
    });
    if (binary !== undefined && problems.length === 0 && offset !== binary.length) {
      problems.push(`the binary data is ${binary.length} bytes but the inputs' binary_data_size add up to ${offset}`);
    }
  }

  const binaryAll = parameters.binary_data_output === true;
  let outputs: InferRequest['outputs'] = OUTPUTS.map((name) => ({ name, binary: binaryAll }));
  // An empty list asks for every output, as an absent one does (Triton's reading), not for an answer without any.
  if (Object.hasOwn(header, 'outputs') && header.outputs !== null && !(Array.isArray(header.outputs) && header.outputs.length === 0)) {
    if (!Array.isArray(header.outputs)) problems.push('"outputs" must be a list of {"name"}');
    else {
      outputs = [];
      header.outputs.forEach((o, i) => {
        if (!isObj(o) || typeof o.name !== 'string') return void problems.push(`outputs[${i}] must be an object with a "name"`);
        if (!(OUTPUTS as readonly string[]).includes(o.name)) return void problems.push(`outputs[${i}].name "${o.name}" is unknown; this model has ${OUTPUTS.join(', ')}`);
        // Once each (as Triton: "output already requested"): the answer would hold two tensors of one name.
        if (outputs.some((x) => x.name === o.name)) return void problems.push(`outputs[${i}]: output "${o.name}" is requested twice`);
        let bin = binaryAll;
        if (o.parameters !== undefined && o.parameters !== null) {
          if (!isObj(o.parameters)) return void problems.push(`outputs[${i}].parameters must be an object`);
          const b = o.parameters.binary_data;
          if (b !== undefined && typeof b !== 'boolean') return void problems.push(`outputs[${i}].parameters.binary_data must be true or false`);
          if (b !== undefined) bin = b;
        }
        outputs.push({ name: o.name as OutputName, binary: bin });
      });
    }
  }
  if (problems.length > 0) throw bad(joinProblems(problems));
  const timeoutUs = parameters.timeout as number | undefined;
  return { id, parameters, inputs, outputs, ...(timeoutUs ? { timeoutMs: timeoutUs / 1000 } : {}) };
}

/**
 * Counts before any per-element work: a tensor of 500k elements is refused with one line, not decoded and checked
 * element by element.
 */
function checkSizes(header: Record<string, unknown>, maxPrompts: number): void {
  const { inputs } = header;
  if (!Array.isArray(inputs)) return;
  const limit = Object.keys(FIELDS).length;
  if (inputs.length > limit) throw bad(`"inputs" has ${inputs.length} tensors; this model has ${limit} inputs`);
  inputs.forEach((inp, i) => {
    if (!isObj(inp)) return;
    const name = typeof inp.name === 'string' ? `input "${inp.name.slice(0, 40)}"` : `inputs[${i}]`;
    // A shape with a negative dim is left to parseTensor to name: [-10, -10] does not hold 100 elements.
    const n = Array.isArray(inp.shape) && inp.shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0) ? (inp.shape as number[]).reduce((a, b) => a * b, 1) : 0;
    const len = Array.isArray(inp.data) ? inp.data.length : 0;
    if (Math.max(n, len) > maxPrompts) {
      throw bad(`${name} has ${Math.max(n, len)} elements; a request may have at most ${maxPrompts} prompts (MAX_IMAGES_PER_REQUEST), and every input 1 element or one per prompt`);
    }
  });
}

/** The binary_data_size an input declares, when it is one (0 otherwise: parseTensor names the problem). */
function declaredBytes(inp: unknown): number {
  const size = isObj(inp) && isObj(inp.parameters) ? inp.parameters.binary_data_size : undefined;
  return Number.isSafeInteger(size) && (size as number) >= 0 ? (size as number) : 0;
}

function parseTensor(inp: unknown, i: number, binary: Buffer | undefined, offset: number, problems: string[]): Tensor | undefined {
  const w = `inputs[${i}]`;
  if (!isObj(inp)) return void problems.push(`${w} must be an object with name, shape, datatype and data`);
  const name = inp.name;
  if (typeof name !== 'string') return void problems.push(`${w}.name must be a string`);
  const wn = `input "${name}"`;
  if (!Object.hasOwn(FIELDS, name)) return void pushUnknownField(problems, 'input ', name, Object.keys(FIELDS), true);
  const datatype = inp.datatype;
  if (typeof datatype !== 'string' || !DATATYPES.has(datatype)) return void problems.push(`${wn}: datatype must be one of ${[...DATATYPES].join(', ')}, got ${JSON.stringify(datatype)}`);
  const shape = inp.shape;
  if (shape === undefined) return void problems.push(`${wn}: shape is missing (a list of dimensions, e.g. [1] for one prompt)`);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) return void problems.push(`${wn}: shape must be a list of non-negative integers`);
  const count = (shape as number[]).reduce((a, b) => a * b, 1);
  const kind = FIELDS[name]!;
  if ((kind === 'string' || kind === 'image' || kind === 'json') && datatype !== 'BYTES') return void problems.push(`${wn} must have datatype BYTES, got ${datatype}`);
  if (kind === 'int' && !INTS.has(datatype)) return void problems.push(`${wn} must have an integer datatype (INT32, INT64, …), got ${datatype}`);
  if (kind === 'float' && !INTS.has(datatype) && !FLOATS.has(datatype)) return void problems.push(`${wn} must have a numeric datatype (FP32, FP64, …), got ${datatype}`);

  const params = isObj(inp.parameters) ? inp.parameters : {};
  const size = params.binary_data_size;
  let values: Array<string | number | Buffer>;
  if (size !== undefined) {
    if (binary === undefined) return void problems.push("received byte inputs, but the'inference-header-content-length' header is missing.");
    if (!Number.isSafeInteger(size) || (size as number) < 0) return void problems.push(`${wn}: parameters.binary_data_size must be a non-negative integer`);
    if (Object.hasOwn(inp, 'data')) return void problems.push(`${wn} has both data and binary_data_size; send one`);
    const binaryBytes = size as number;
    if (offset + binaryBytes > binary.length) return void problems.push(`${wn}: binary_data_size ${binaryBytes} runs past the end of the body`);
    const bytes = binary.subarray(offset, offset + binaryBytes);
    const decoded = decodeBinary(bytes, datatype, count, shape as number[], wn, problems, kind === 'image');
    if (!decoded) return undefined;
    values = decoded;
  } else {
    if (!Object.hasOwn(inp, 'data')) return void problems.push(`${wn} has no data (and no parameters.binary_data_size)`);
    if (datatype === 'FP16') return void problems.push(`Receiving FP16 data via JSON is not supported. Please use the binary data format for input ${name}`);
    const flat = flatten(inp.data);
    if (!flat) return void problems.push(`${wn}: data must be a list (flat or nested)`);
    const ragged = nestingProblem(inp.data as unknown[], shape as number[], count);
    if (ragged) return void problems.push(`${wn}: ${ragged}`);
    for (const [k, v] of flat.entries()) {
      const text = kind === 'string' || kind === 'image' || kind === 'json';
      if (text ? typeof v !== 'string' : typeof v !== 'number') {
        return void problems.push(`${wn}: data[${k}] must be ${text ? 'a string' : 'a number'} for datatype ${datatype}, got ${v === null ? 'null' : typeof v}`);
      }
      const range = INT_RANGES[datatype];
      if (range && !Number.isInteger(v)) return void problems.push(`${wn}: data[${k}] must be an integer for datatype ${datatype}, got ${String(v)}`);
      if (range && ((v as number) < range[0] || (v as number) > range[1])) {
        return void problems.push(`${wn}: data[${k}] ${String(v)} is outside ${datatype}'s range, ${range[0]} to ${range[1]}${datatype.endsWith('64') ? ' (as a JSON number)' : ''}`);
      }
    }
    values = flat as Array<string | number>;
  }
  if (values.length !== count) return void problems.push(`${wn}: shape ${JSON.stringify(shape)} holds ${count} elements but data has ${values.length}`);
  // Kept a 400 where V1's empty list is answered with no prediction: V2 came with no seed-runtime clients to keep, and
  // a zero-length tensor is mostly a client's empty array sent by mistake.
  if (values.length === 0) {
    return void problems.push(name === 'prompt'
      ? `${wn} is empty (shape ${JSON.stringify(shape)}): send at least one prompt, one element per image`
      : `${wn} is empty (shape ${JSON.stringify(shape)}): give it one element (for every prompt) or one per prompt, or leave it out`);
  }
  return { name, datatype, shape: shape as number[], values };
}

/**
 * Where nested `data` departs from `shape`, if it does. Nested data is the tensor in its natural multi-dimensional form
 * (the Open Inference Protocol's words), so it must be that shape exactly: counting its elements alone took rows of 1
 * and 3 values for shape [2, 2]. Flat data is left to the count check.
 */
function nestingProblem(data: unknown[], shape: number[], count: number): string | undefined {
  if (!data.some((x) => Array.isArray(x))) return undefined;
  const dims = JSON.stringify(shape);
  const fix = `nested data must follow the shape, or send the ${count} elements flat, in row-major order`;
  const walk = (v: unknown, d: number, at: string): string | undefined => {
    if (d === shape.length) return Array.isArray(v) ? `${at} is a list, but shape ${dims} has ${shape.length} dimension${shape.length === 1 ? '' : 's'} (${fix})` : undefined;
    if (!Array.isArray(v)) return `${at} is ${brief(v)}, not a list of ${shape[d]} as shape ${dims} says (${fix})`;
    if (v.length !== shape[d]) return `${at} has ${v.length} element${v.length === 1 ? '' : 's'}, but shape ${dims} says ${shape[d]} (${fix})`;
    for (let i = 0; i < v.length; i++) {
      const p = walk(v[i], d + 1, `${at}[${i}]`);
      if (p) return p;
    }
    return undefined;
  };
  return walk(data, 0, 'data');
}

function flatten(v: unknown, depth = 0): unknown[] | undefined {
  if (!Array.isArray(v) || depth > 8) return undefined;
  const out: unknown[] = [];
  for (const x of v) {
    if (Array.isArray(x)) {
      const inner = flatten(x, depth + 1);
      if (!inner) return undefined;
      // One at a time: spread as arguments, a list of ~150,000 overflows the stack (a 500 instead of a 400).
      for (const y of inner) out.push(y);
    } else out.push(x);
  }
  return out;
}

// ignoreBOM: a BYTES element is its bytes; a leading U+FEFF is text the prompt has (as in JSON mode), not a mark to drop.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Binary tensor data: little-endian, row-major; each BYTES element is a uint32 LE length and the bytes (`raw`: kept as
 * bytes, for image inputs; otherwise UTF-8 text). At most `count` elements (the shape's) are decoded: bytes for more are
 * refused by their size, not first decoded one by one (a 64 MB FP32 tensor held the event loop for 17 s).
 */
function decodeBinary(b: Buffer, datatype: string, count: number, shape: number[], wn: string, problems: string[], raw = false): Array<string | number | Buffer> | undefined {
  if (datatype === 'BYTES') {
    const out: Array<string | Buffer> = [];
    for (let o = 0; o < b.length; ) {
      if (out.length === count) return void problems.push(`${wn}: shape ${JSON.stringify(shape)} holds ${count} elements but its binary data has more (${b.length - o} bytes left after element ${count})`);
      if (o + 4 > b.length) return void problems.push(`${wn}: BYTES element at byte ${o} is cut short (needs a 4-byte length)`);
      const n = b.readUInt32LE(o);
      o += 4;
      if (o + n > b.length) return void problems.push(`${wn}: BYTES element of ${n} bytes runs past its binary_data_size`);
      if (raw) {
        out.push(b.subarray(o, o + n));
        o += n;
        continue;
      }
      try {
        out.push(utf8.decode(b.subarray(o, o + n)));
      } catch {
        return void problems.push(`${wn}: BYTES element is not valid UTF-8 text`);
      }
      o += n;
    }
    return out;
  }
  const size = ELEMENT_BYTES[datatype]!;
  if (b.length % size !== 0) return void problems.push(`${wn}: binary_data_size ${b.length} is not a multiple of ${size} bytes (${datatype})`);
  if (b.length !== count * size) {
    return void problems.push(`${wn}: shape ${JSON.stringify(shape)} holds ${count} elements (${count * size} bytes of ${datatype}) but binary_data_size is ${b.length} (${b.length / size} elements)`);
  }
  const out: number[] = [];
  for (let o = 0; o < b.length; o += size) {
    let v: number;
    switch (datatype) {
      case 'INT8': v = b.readInt8(o); break;
      case 'UINT8': case 'BOOL': v = b.readUInt8(o); break;
      case 'INT16': v = b.readInt16LE(o); break;
      case 'UINT16': v = b.readUInt16LE(o); break;
      case 'INT32': v = b.readInt32LE(o); break;
      case 'UINT32': v = b.readUInt32LE(o); break;
      case 'INT64': case 'UINT64': {
        const big = datatype === 'INT64' ? b.readBigInt64LE(o) : b.readBigUInt64LE(o);
        if (big > BigInt(Number.MAX_SAFE_INTEGER) || big < BigInt(Number.MIN_SAFE_INTEGER)) return void problems.push(`${wn}: ${big} is outside the safe integer range`);
        v = Number(big);
        break;
      }
      case 'FP16': v = fromHalfBits(b.readUInt16LE(o)); break;
      case 'BF16': v = new Float32Array(new Uint32Array([b.readUInt16LE(o) << 16]).buffer)[0]!; break;
      case 'FP32': v = shortestFloat32(b.readFloatLE(o)); break;
      default: v = b.readDoubleLE(o);
    }
    out.push(v);
  }
  return out;
}

/**
 * A float32 as the shortest decimal that reads back as the same float32 (numpy prints np.float32(0.7) as 0.7): a client
 * that sends strength 0.7 as FP32 means 0.7, and int(steps · 0.69999999) would lose a step that 0.7 keeps.
 */
export function shortestFloat32(v: number): number {
  if (!Number.isFinite(v) || v === 0) return v;
  for (let p = 1; p <= 9; p++) {
    const d = Number(v.toPrecision(p));
    if (Math.fround(d) === v) return d;
  }
  return v;
}

/** One V1-style instance per prompt: request parameters, then named inputs (one element or one per prompt). */
export function toInstances(req: InferRequest): Array<Record<string, unknown>> {
  const prompt = req.inputs.find((t) => t.name === 'prompt');
  if (!prompt) throw bad('the BYTES input "prompt" is required (shape [n] for n prompts)');
  const n = prompt.values.length;
  const problems: string[] = [];
  for (const t of req.inputs) {
    if (t.values.length !== 1 && t.values.length !== n) problems.push(`input "${t.name}" must have 1 element or one per prompt (${n}), got ${t.values.length}`);
  }
  if (problems.length > 0) throw bad(joinProblems(problems));
  const params: Record<string, Scalar> = { ...req.parameters };
  for (const k of ['binary_data_output', ...TRITON_PARAMETERS]) delete params[k];
  return prompt.values.map((_, i) => {
    const inst: Record<string, unknown> = { ...params };
    for (const t of req.inputs) inst[t.name] = t.values.length === 1 ? t.values[0] : t.values[i];
    if (Object.hasOwn(inst, 'loras')) inst.loras = v2Loras(inst.loras, fieldSource(req, i, 'loras') ?? 'loras');
    return inst;
  });
}

/**
 * Where the client put `field` of prompt `i` (toInstances' precedence: a named input over a parameter): `input "seed"`
 * for a one-element tensor, `input "seed" data[1]` for a per-prompt one, `parameters.seed`; undefined when not sent.
 */
export function fieldSource(req: InferRequest, i: number, field: string): string | undefined {
  const t = req.inputs.find((x) => x.name === field);
  if (t) return t.values.length === 1 ? `input "${field}"` : `input "${field}" data[${i}]`;
  return Object.hasOwn(req.parameters, field) ? `parameters.${field}` : undefined;
}

/**
 * parseInstances' relabel for the instances of toInstances (parsed with where `prompt`): each `prompt[i].<field>` as
 * fieldSource names it, a field the client did not send (a default, a missing image) by its bare name.
 */
export function v2Relabel(req: InferRequest): (problem: string, i: number) => string {
  return (problem, i) => problem.replace(new RegExp(`\\bprompt\\[${i}\\]\\.([a-z_]+)`, 'g'), (_, f: string) => fieldSource(req, i, f) ?? f);
}

/**
 * `loras` arrives as JSON text (a BYTES element or a string parameter): `[{"name":"style-x","scale":0.8}]`. The
 * parsed list is checked like V1's field (parseLoras); text that is not JSON is a 400 here. `at`: where it was sent.
 */
function v2Loras(v: unknown, at: string): unknown {
  if (typeof v !== 'string') throw bad(`${at} must be JSON text such as [{"name":"style-x","scale":0.8}] (a BYTES input or a string parameter), got ${typeof v}`);
  try {
    return JSON.parse(v) as unknown;
  } catch (err) {
    throw bad(`${at} is not JSON: ${printable((err as Error).message)}; send e.g. [{"name":"style-x","scale":0.8}]`);
  }
}

/** An encoded `/infer` answer: JSON, or (binary outputs) the JSON header followed by the tensor bytes. */
export interface InferResponse {
  body: string | Buffer;
  contentType: string;
  /** The binary extension's header length, when `body` carries binary outputs. */
  headerLength?: number;
}

/** The `/infer` answer for the images of `results`, each output as JSON or binary data as the request asked. */
export function encodeInferResponse(modelName: string, req: InferRequest, results: readonly TaskResult[]): InferResponse {
  const imgs = results.flatMap((r) => r.images.map((img, i) => ({ img, uri: r.uris?.[i] })));
  const n = imgs.length;
  const chunks: Buffer[] = [];
  const outputs = req.outputs.map(({ name, binary }) => {
    if (name === 'image') {
      const elems = imgs.map(({ img, uri }) => (uri !== undefined ? Buffer.from(uri) : Buffer.from(img.data)));
      const base = { name, shape: [n], datatype: 'BYTES' };
      if (!binary) return { ...base, data: imgs.map(({ img, uri }) => uri ?? Buffer.from(img.data).toString('base64')) };
      let size = 0;
      for (const e of elems) {
        const len = Buffer.alloc(4);
        len.writeUInt32LE(e.length);
        chunks.push(len, e);
        size += 4 + e.length;
      }
      return { ...base, parameters: { binary_data_size: size } };
    }
    const seeds = imgs.map(({ img }) => img.seed);
    const base = { name, shape: [n], datatype: 'INT64' };
    if (!binary) return { ...base, data: seeds };
    const b = Buffer.alloc(8 * n);
    seeds.forEach((s, i) => b.writeBigInt64LE(BigInt(s), 8 * i));
    chunks.push(b);
    return { ...base, parameters: { binary_data_size: b.length } };
  });
  const header = { model_name: modelName, id: req.id, outputs };
  if (chunks.length === 0) return { body: JSON.stringify(header), contentType: 'application/json' };
  const head = Buffer.from(JSON.stringify(header));
  return { body: Buffer.concat([head, ...chunks]), contentType: 'application/octet-stream', headerLength: head.length };
}
