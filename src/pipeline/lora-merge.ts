/**
 * @module A component's graph with LoRA updates merged into its initializers. Two forms:
 *
 * - `writeMergedComponent` (what adapter sets use): a folder with a new graph file, in which each patched initializer
 *   points into a small `lora.onnx_data` holding only the merged weights, every other initializer into the original
 *   external data file through a hard link (ONNX Runtime refuses external data that resolves outside the graph's
 *   folder, so a symbolic link will not do; across file systems the file is copied, as a clone where the file system
 *   can), and inline ones stay inline. ONNX Runtime loads it from a path like any model (memory-mapping weights the
 *   base session maps too), and creating it costs what patching the changed weights costs.
 * - `writeMergedCopy` (what the lora-merge CLI bakes): a self-contained copy, every file copied and the patched
 *   initializers rewritten in place.
 * - `mergeComponent`: the whole component in memory, every external file read and patched (onnxruntime-node can
 *   create a session from it with `externalData` buffers, which docs/LORA.md measures and explains why sets do not).
 *   Node reads no file over 2 GiB whole, so it is for models below that (scripts/bench-lora.ts).
 */
import { constants } from 'node:fs';
import { copyFile, type FileHandle, link, mkdir, open, readFile, realpath, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { RuntimeError } from '../errors.js';
import { fromHalfBits, toHalfBits } from './half.js';
import { readFileSync } from 'node:fs';
import { LORA_COMPONENTS, mergeDelta, resolveAdapters, type LoraComponent, type WeightUpdate } from './lora-keys.js';
import { readLoraMap, viewPositions, type LoraMap } from './lora-map.js';
import { parsePyJson } from './pyjson.js';

/**
 * The adapters' weight updates by component, as an adapter set resolves them: each component's lora_map.json beside
 * its graph (`graphs`: component → model.onnx), and the UNet config's layers_per_block (SDXL kohya names need it).
 */
export function planAdapterSet(
  adapters: Parameters<typeof resolveAdapters>[0],
  graphs: Partial<Record<LoraComponent, string>>,
): { byComponent: Map<LoraComponent, WeightUpdate[]>; problems: string[] } {
  const maps = new Map<LoraComponent, LoraMap>();
  for (const c of LORA_COMPONENTS) {
    const g = graphs[c];
    const map = g === undefined ? undefined : readLoraMap(path.dirname(g));
    if (map) maps.set(c, map);
  }
  const present = new Set(LORA_COMPONENTS.filter((c) => graphs[c] !== undefined));
  const { updates, problems } = resolveAdapters(adapters, maps, layersPerBlock(graphs.unet), present);
  const byComponent = new Map<LoraComponent, WeightUpdate[]>();
  for (const u of updates.values()) {
    const list = byComponent.get(u.component);
    if (list) list.push(u);
    else byComponent.set(u.component, [u]);
  }
  return { byComponent, problems };
}

/** The UNet config's layers_per_block, when the config says. */
function layersPerBlock(unetModel: string | undefined): number | undefined {
  if (unetModel === undefined) return undefined;
  try {
    const v = (parsePyJson(readFileSync(path.join(path.dirname(unetModel), 'config.json'), 'utf8')) as Record<string, unknown>).layers_per_block;
    return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : undefined;
  } catch {
    return undefined;
  }
}

const { onnx } = onnxProto;
const FLOAT = 1;
const FLOAT16 = 10;
const EXTERNAL = onnx.TensorProto.DataLocation.EXTERNAL;

/** A component's graph file `modelPath`, decoded: its folder, the component's name (errors name it), and its initializers by name. */
async function readGraph(modelPath: string) {
  const dir = path.dirname(modelPath);
  const graphBytes = await readFile(modelPath);
  const model = onnx.ModelProto.decode(graphBytes);
  return { dir, component: path.basename(dir), graphBytes, model, inits: new Map((model.graph?.initializer ?? []).map((t) => [t.name ?? '', t] as const)) };
}

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
  const { dir, component, graphBytes, model, inits } = await readGraph(modelPath);
  const external = new Map<string, Buffer>();
  // Every external file, patched or not: a session created from bytes finds none of them on disk.
  for (const t of inits.values()) {
    if (t.dataLocation !== EXTERNAL) continue;
    const { location } = externalOf(t);
    if (external.has(location)) continue;
    const file = path.resolve(dir, location);
    if (!file.startsWith(dir + path.sep)) throw new RuntimeError('MODEL_FORMAT', `${component}: external data location ${JSON.stringify(location)} leaves the component folder`);
    external.set(location, await readFile(file));
  }
  let inlineChanged = false;
  let patchedBytes = 0;
  for (const u of updates) {
    const { t, type, size, count } = mergeable(inits, u.entry.initializer, u.param, component);
    let bytes: Uint8Array;
    if (t.dataLocation === EXTERNAL) {
      const { location, offset, length } = externalOf(t);
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
    patchedBytes += patch(bytes, type, count, u, component);
  }
  const out = inlineChanged ? onnx.ModelProto.encode(model).finish() : graphBytes;
  const externalData = [...external].map(([p, data]) => ({ path: p, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) }));
  return { model: out, externalData, patchedBytes, totalBytes: out.byteLength + externalData.reduce((n, e) => n + e.data.byteLength, 0) };
}


export interface WrittenModel {
  /** The merged graph's path (in `outDir`), to create a session from. */
  modelPath: string;
  patchedBytes: number;
  /** Bytes of the whole component's weights: what a session of it holds on the device. */
  totalBytes: number;
  /** How the unchanged external data got into the folder. */
  data: 'none' | 'linked' | 'copied';
}

/** Offsets in lora.onnx_data are page aligned, so ONNX Runtime may map them as it maps other external data. */
const ALIGN = 4096;

/**
 * Writes the merged component into `outDir` (created; anything there is replaced): `model.onnx`, `lora.onnx_data`
 * with the patched initializers, and a hard link (or copy) per original external data file. Each weight becomes
 * round(W + Σ factor · up · down) as in mergeComponent. Each patched initializer is written as soon as it is patched,
 * so memory holds one initializer at a time whatever the adapter patches (a LoRA on every layer of a UNet patches
 * nearly all of its weights: 3.4 GB in SD 1.5's float32, more than a Buffer holds in SDXL's).
 */
export async function writeMergedComponent(modelPath: string, updates: readonly WeightUpdate[], outDir: string, opts: { link?: boolean } = {}): Promise<WrittenModel> {
  const { dir, component, model, inits } = await readGraph(modelPath);
  const locations = externalLocations(inits, dir, component);
  await freshOutDir(dir, outDir, component);
  return removedOnFailure(outDir, () => writeLinked(modelPath, model, inits, locations, updates, outDir, opts));
}

async function writeLinked(
  modelPath: string,
  model: onnxProto.onnx.ModelProto,
  inits: ReadonlyMap<string, onnxProto.onnx.ITensorProto>,
  locations: ReadonlySet<string>,
  updates: readonly WeightUpdate[],
  outDir: string,
  opts: { link?: boolean },
): Promise<WrittenModel> {
  const dir = path.dirname(modelPath);
  const component = path.basename(dir);
  let data: WrittenModel['data'] = locations.size > 0 ? 'linked' : 'none';
  for (const l of locations) {
    try {
      if (opts.link === false) throw new Error('copy asked for');
      // link(2) does not follow a symbolic link: a Hugging Face cache snapshot's relative link into blobs/ would be
      // linked as a link, dangling in outDir. The file it names is linked instead.
      await link(await realpath(path.resolve(dir, l)), path.join(outDir, l));
    } catch {
      // Another file system (EXDEV) or no hard links there: a copy, cloned where the file system supports it.
      await copyFile(path.resolve(dir, l), path.join(outDir, l), constants.COPYFILE_FICLONE);
      data = 'copied';
    }
  }
  const fh = await open(path.join(outDir, PATCH_FILE), 'w');
  let patchedBytes: number;
  try {
    let offset = 0;
    patchedBytes = await patchEach(inits, updates, component, (e, n) => readRange(path.join(dir, e.location), e.offset, n), async (t, bytes) => {
      const at = Math.ceil(offset / ALIGN) * ALIGN;
      await writeAll(fh, bytes, at);
      offset = at + bytes.byteLength;
      t.rawData = new Uint8Array(0);
      t.dataLocation = EXTERNAL;
      t.externalData = [
        { key: 'location', value: PATCH_FILE },
        { key: 'offset', value: String(at) },
        { key: 'length', value: String(bytes.byteLength) },
      ];
    });
    // The alignment gap before the last initializer is a hole until written: the file ends where its bytes end.
    await fh.truncate(offset);
  } finally {
    await fh.close();
  }
  const out = path.join(outDir, 'model.onnx');
  await writeFile(out, onnx.ModelProto.encode(model).finish());
  return { modelPath: out, patchedBytes, totalBytes: await filesBytes(modelPath, locations), data };
}

/** Bytes of a component as a session of it holds them (graph + external data): what a merged copy of it costs. */
export async function componentBytes(modelPath: string): Promise<number> {
  const { dir, component, inits } = await readGraph(modelPath);
  return filesBytes(modelPath, externalLocations(inits, dir, component));
}

async function filesBytes(modelPath: string, locations: ReadonlySet<string>): Promise<number> {
  let n = (await stat(modelPath)).size;
  for (const l of locations) n += (await stat(path.resolve(path.dirname(modelPath), l))).size;
  return n;
}

/**
 * Writes the merged component into `outDir` as a self-contained copy (what the lora-merge CLI bakes): the graph and
 * each external data file copied under its own name (cloned where the file system can), then each patched
 * initializer read from the copy, patched and written back in place. Memory holds one initializer at a time, so a
 * data file of any size merges (Node reads no file over 2 GiB whole, and holds no Buffer over 4 GiB).
 */
export async function writeMergedCopy(modelPath: string, updates: readonly WeightUpdate[], outDir: string): Promise<WrittenModel> {
  const { dir, component, graphBytes, model, inits } = await readGraph(modelPath);
  const locations = externalLocations(inits, dir, component);
  await freshOutDir(dir, outDir, component);
  return removedOnFailure(outDir, async () => {
    for (const l of locations) await copyFile(path.resolve(dir, l), path.join(outDir, l), constants.COPYFILE_FICLONE);
    let inlineChanged = false;
    const patchedBytes = await patchEach(inits, updates, component, (e, n) => readRange(path.join(outDir, e.location), e.offset, n), async (t, bytes, e) => {
      if (e) {
        const fh = await open(path.join(outDir, e.location), 'r+');
        try {
          await writeAll(fh, bytes, e.offset);
        } finally {
          await fh.close();
        }
      } else {
        t.rawData = bytes;
        inlineChanged = true;
      }
    });
    const out = path.join(outDir, 'model.onnx');
    await writeFile(out, inlineChanged ? onnx.ModelProto.encode(model).finish() : graphBytes);
    return { modelPath: out, patchedBytes, totalBytes: await filesBytes(modelPath, locations), data: locations.size > 0 ? 'copied' : 'none' };
  });
}

/**
 * Empties `outDir` for a merge of the component in `modelDir`, refusing an `outDir` that is that folder or holds it
 * (through links too): emptying it would delete the model before it is read (`lora:merge MODEL_DIR MODEL_DIR ...`).
 */
async function freshOutDir(modelDir: string, outDir: string, component: string): Promise<void> {
  const real = async (p: string): Promise<string> => {
    try {
      return await realpath(p);
    } catch {
      const parent = path.dirname(p);
      return parent === p ? p : path.join(await real(parent), path.basename(p));
    }
  };
  const [model, out] = await Promise.all([real(modelDir), real(outDir)]);
  const rel = path.relative(out, model);
  if (rel === '' || (rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel))) {
    throw new RuntimeError('INVALID_INPUT', `${component}: the output folder is the model's own folder (or holds it); write the merge to another folder`);
  }
  await rm(outDir, { recursive: true, force: true });
  await mkdir(outDir, { recursive: true });
}

/** Runs `write`; if it fails, `outDir` goes (a half-written merge holds up to a whole component's bytes). */
async function removedOnFailure<T>(outDir: string, write: () => Promise<T>): Promise<T> {
  try {
    return await write();
  } catch (err) {
    await rm(outDir, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
}

/** The external data files a graph names, each checked to be a plain file name beside the graph. */
function externalLocations(inits: ReadonlyMap<string, onnxProto.onnx.ITensorProto>, dir: string, component: string): Set<string> {
  const locations = new Set<string>();
  for (const t of inits.values()) if (t.dataLocation === EXTERNAL) locations.add(externalOf(t).location);
  for (const l of locations) {
    const file = path.resolve(dir, l);
    if (!file.startsWith(dir + path.sep) || l.includes('/') || l.includes('\\') || l === PATCH_FILE) {
      throw new RuntimeError('MODEL_FORMAT', `${component}: external data location ${JSON.stringify(l)} is not a file beside the graph`);
    }
  }
  return locations;
}

/**
 * Reads, patches and hands to `done` each initializer the updates name, one at a time (packed Q/K/V weights take
 * several updates: each initializer is read, patched by all of its updates, handed over once). Returns the bytes
 * patched.
 */
async function patchEach(
  inits: ReadonlyMap<string, onnxProto.onnx.ITensorProto>,
  updates: readonly WeightUpdate[],
  component: string,
  readExternal: (e: ReturnType<typeof externalOf>, length: number) => Promise<Uint8Array>,
  done: (t: onnxProto.onnx.ITensorProto, bytes: Uint8Array, external: ReturnType<typeof externalOf> | undefined) => Promise<void>,
): Promise<number> {
  let patchedBytes = 0;
  const byName = new Map(updates.map((u) => [u.entry.initializer, [] as WeightUpdate[]] as const));
  for (const u of updates) byName.get(u.entry.initializer)!.push(u);
  for (const [name, list] of byName) {
    const { t, type, size, count } = mergeable(inits, name, list[0]!.param, component);
    let bytes: Uint8Array;
    let e: ReturnType<typeof externalOf> | undefined;
    if (t.dataLocation === EXTERNAL) {
      e = externalOf(t);
      bytes = await readExternal(e, count * size);
    } else if (t.rawData && t.rawData.byteLength > 0) {
      // A copy: the decoded proto's raw data may be a view of the graph file's bytes.
      bytes = new Uint8Array(t.rawData);
    } else {
      throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${name} keeps its values outside raw_data; re-export the model with scripts/export_sd.py`);
    }
    if (bytes.byteLength !== count * size) throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${name} holds ${bytes.byteLength} bytes for ${count} values`);
    for (const u of list) patchedBytes += patch(bytes, type, count, u, component);
    await done(t, bytes, e);
  }
  return patchedBytes;
}

/** Writes all of `bytes` at `position` (a single write may be short for large buffers). */
async function writeAll(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.byteLength) done += (await fh.write(bytes, done, bytes.byteLength - done, position + done)).bytesWritten;
}

const PATCH_FILE = 'lora.onnx_data';

function externalOf(t: onnxProto.onnx.ITensorProto): { location: string; offset: number; length: number | undefined } {
  const kv = new Map((t.externalData ?? []).map((e) => [e.key ?? '', e.value ?? '']));
  return { location: kv.get('location') ?? '', offset: Number(kv.get('offset') ?? 0), length: kv.has('length') ? Number(kv.get('length')) : undefined };
}

/** The initializer `name` that lora_map.json names for `param`, checked to be float32 or float16, with its size. */
function mergeable(inits: ReadonlyMap<string, onnxProto.onnx.ITensorProto>, name: string, param: string, component: string) {
  const t = inits.get(name);
  if (!t) throw new RuntimeError('MODEL_FORMAT', `${component}: lora_map.json names initializer ${JSON.stringify(name)} for ${param}, which the graph does not have`);
  const type = t.dataType ?? 0;
  if (type !== FLOAT && type !== FLOAT16) throw new RuntimeError('MODEL_FORMAT', `${component}: initializer ${name} (${param}) is of ONNX type ${type}; LoRA merges float32 and float16 weights`);
  return { t, type, size: type === FLOAT ? 4 : 2, count: (t.dims ?? []).reduce((a: number, b) => a * Number(b), 1) };
}

async function readRange(file: string, offset: number, length: number): Promise<Uint8Array> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(length);
    // A single read returns at most ~2 GiB on Linux: read until the range is whole or the file ends.
    let bytesRead = 0;
    for (let n = -1; bytesRead < length && n !== 0; bytesRead += n) n = (await fh.read(buf, bytesRead, length - bytesRead, offset + bytesRead)).bytesRead;
    if (bytesRead !== length) throw new RuntimeError('MODEL_FORMAT', `${path.basename(path.dirname(file))}: an initializer lies past the end of ${path.basename(file)}`);
    return buf;
  } finally {
    await fh.close();
  }
}

/** Adds one update into the initializer's bytes in place; returns the bytes it changed. */
function patch(bytes: Uint8Array, type: number, count: number, u: WeightUpdate, component: string): number {
  const pos = viewPositions(u.entry.view);
  const delta = mergeDelta(u);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < delta.length; i++) {
    const p = pos[i]!;
    if (p < 0 || p >= count) throw new RuntimeError('MODEL_FORMAT', `${component}: lora_map.json places ${u.param} outside initializer ${u.entry.initializer}`);
    // Finite adapters can still push a weight past the type's range (float16: 65504): infinite weights give NaN images.
    if (type === FLOAT) {
      const w = view.getFloat32(p * 4, true);
      const merged = Math.fround(w + delta[i]!);
      if (!Number.isFinite(merged) && Number.isFinite(w)) throw overflow(u, component, type, w + delta[i]!);
      view.setFloat32(p * 4, merged, true);
    } else {
      const w = fromHalfBits(view.getUint16(p * 2, true));
      const merged = toHalfBits(w + delta[i]!);
      // All exponent bits set: infinite (or NaN) in float16.
      if ((merged & 0x7c00) === 0x7c00 && Number.isFinite(w)) throw overflow(u, component, type, w + delta[i]!);
      view.setUint16(p * 2, merged, true);
    }
  }
  return delta.length * (type === FLOAT ? 4 : 2);
}

function overflow(u: WeightUpdate, component: string, type: number, value: number): RuntimeError {
  const names = [...new Set(u.terms.map((t) => `"${t.adapter}"`))];
  const who = names.length > 1 ? `adapters ${names.join(', ')} take` : `adapter ${names[0]} takes`;
  const range = type === FLOAT ? 'float32\'s range' : 'float16\'s range (65504)';
  return new RuntimeError('INVALID_INPUT', `${who} ${component} weight ${u.param} to ${value.toPrecision(4)}, past ${range}; use a smaller scale`);
}
