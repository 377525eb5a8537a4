/**
 * @module The optimized-model cache: ONNX Runtime's optimised graph of a component, kept next to its model
 * (`<component>/model.<ortVersion>.<provider>.opt.onnx`) and loaded with graph optimisation off on the next start.
 *
 *   <component>/model.onnx (+ model.onnx_data)             the source, as downloaded
 *   <component>/model.1.30.0.cpu.opt.onnx                  ORT's optimised graph (renamed into place when whole)
 *   <component>/model.1.30.0.cpu.opt.<rand>.onnx_data      its weights (a fresh name per write, so a reader never sees a
 *                                                          half-written one; unreferenced ones are swept)
 *   <component>/model.1.30.0.cpu.opt.json                  the key it was made for, written last: ORT version, provider,
 *                                                          optimisation level, CPU, size + mtime of every source file
 *
 * The key file is the commit: it is removed before a rewrite and written after the rename, so a crash leaves either
 * no key (rebuilt next time) or a key that matches the graph beside it (or, when `declined`, says there is none on
 * purpose). A source that changed (size or mtime of any source file in the folder) never matches, and neither does
 * another ORT version, provider or CPU model (CPU graphs at level `all` hold layout transforms chosen for the CPU's
 * vector width). The S3 cache manifest lists only the objects of the bucket, so these files are never part of it: a
 * refresh of the entry in place keeps the copies of the components whose files it leaves as they are and sweeps the
 * others with other strays (keptOptimizedCopies), and a new version of the entry (storage/versions.ts) takes over the
 * copies of the components whose files it shares with the version it replaces (carryOptimizedCopies).
 * Only sources up to MAX_SOURCE_BYTES are copied (the write is slow and doubles the space); larger ones load as before.
 * A start never writes: sessions come from the source, and the copy is written afterwards in the background (the
 * runtime does it after ready, see src/pipeline/optimizer.ts), so only later starts are faster.
 *
 * Under `auto` the writer keeps a copy only if it loads measurably faster than the source builds (worthKeeping). A
 * graph of few, large nodes optimises in milliseconds, and a session from its copy ran its first generation slower
 * (300 MB benchmark model: +90 ms); then the key is written with `declined` and no graph, and later starts load the
 * source without deferring another write, until the source or ORT changes.
 */
import { randomBytes } from 'node:crypto';
import { constants, promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type * as OrtModule from 'onnxruntime-node';
import type { InferenceSession } from 'onnxruntime-node';

type Ort = typeof OrtModule;
type Log = (level: 'info' | 'warn', msg: string, obj?: object) => void;

/**
 * `deferred`: loaded from the source; the optimised copy is worth writing later (writeOptimizedCopy). `declined`: a
 * copy was timed and did not load faster than the source builds, so none is kept (see worthKeeping).
 */
export type CacheOutcome = 'hit' | 'deferred' | 'written' | 'declined' | 'skipped' | 'failed';

/**
 * `auto`: only inside a model cache entry the runtime filled (its folder holds the entry's manifest or download
 * journal), never in a user's model folder or a read-only mount; `always`: any writable folder (benchmarks); `off`.
 */
export type { OptimizedCacheMode } from '../config.js';
import type { OptimizedCacheMode } from '../config.js';
import { exists } from '../files.js';
import { onGpu, type SessionProvider } from './provider.js';

/**
 * What the cache may do: the mode and, for `auto`, the names of the files whose presence at a model folder's root
 * marks it as a cache entry the runtime filled. The runtime passes storage's manifest and journal names: which files
 * those are is the fetch engine's business, not the pipeline's.
 */
export interface OptimizedCachePolicy {
  mode: OptimizedCacheMode;
  entryMarkers: readonly string[];
  /** Sources larger than this (all files of the component) are not copied; MAX_SOURCE_BYTES when absent. */
  maxSourceBytes?: number;
  /** Under `auto`, whether a timed copy is kept; worthKeeping when absent (tests fix the decision, not the timing). */
  keep?: (t: BuildTimes) => boolean;
}

/** No optimised copies, read or written (LoRA sets' merged graphs, tests). */
export const NO_OPTIMIZED_CACHE: OptimizedCachePolicy = Object.freeze({ mode: 'off', entryMarkers: [] });

/** One optimised-model copy to write: the source graph and the provider its sessions run on. */
export interface OptimizeItem {
  path: string;
  provider: SessionProvider;
  deviceId?: number;
}

export interface CachedSession {
  session: InferenceSession;
  cache: CacheOutcome;
}

interface SourceFile {
  name: string;
  size: number;
  mtimeMs: number;
}

interface CacheKey {
  version: 1;
  ort: string;
  provider: SessionProvider;
  level: string;
  cpu: string;
  /** A GPU provider's options from CUDA_PROVIDER_OPTIONS, as applied (absent when none). */
  providerOptions?: string;
  sources: SourceFile[];
}

/** What the key file holds: the key, plus the timings when the copy was declined (there is no graph then). */
interface StoredKey extends CacheKey {
  declined?: { sourceMs: number; copyMs: number };
}

/** Session builds (best of a few) of the source at level `all` and of its optimised copy with optimisation off. */
export interface BuildTimes {
  sourceMs: number;
  copyMs: number;
}

/** A copy must save at least this much of the source's build time, in milliseconds and as a fraction of it. */
export const KEEP_MIN_GAIN_MS = 20;
export const KEEP_MIN_GAIN_FRACTION = 0.25;

/**
 * Whether a copy is worth loading instead of the source. Measured on this machine: the tiny real SD 1.x export's UNet
 * builds in ~145 ms from its source and ~85 ms from its copy (kept); the 300 MB benchmark model's components build in
 * 3-8 ms either way, and its copies made the first generation ~90 ms slower (declined).
 */
export function worthKeeping(t: BuildTimes): boolean {
  const gain = t.sourceMs - t.copyMs;
  return gain >= KEEP_MIN_GAIN_MS && gain >= KEEP_MIN_GAIN_FRACTION * t.sourceMs;
}

/**
 * Sources larger than this are not copied by default (ORT_OPTIMIZED_CACHE_MAX_MB raises it): a multi-GB UNet would
 * double its space on the PVC, and the background write holds a second session of it (GPU memory on CUDA, ~2.7 GiB
 * of RAM for SD 1.5's on the CPU) while it runs. On the CPU its copy would save its source build (26-46 s per start
 * for SD 1.5: docs/BENCHMARKS.md, "SD 1.5 size on the CPU").
 */
export const MAX_SOURCE_BYTES = 512 * 1024 * 1024;
/** Weights of the optimised copy must fit this many times over in the free space, so the cache never fills the PVC. */
const FREE_SPACE_FACTOR = 2;
/** Unreferenced optimised weights younger than this may belong to another process still writing them. */
const SWEEP_AFTER_MS = 10 * 60 * 1000;
const OPT_MARK = '.opt.';

export function optimizedPaths(modelPath: string, ortVersion: string, provider: string): { dir: string; stem: string; onnx: string; key: string } {
  const dir = path.dirname(modelPath);
  const stem = `${path.basename(modelPath, '.onnx')}.${ortVersion}.${provider}.opt`;
  return { dir, stem, onnx: path.join(dir, `${stem}.onnx`), key: path.join(dir, `${stem}.json`) };
}

/**
 * Creates the session for `modelPath`: from the optimised copy when its key matches, else from the source. A source
 * that may be cached comes back with `cache: 'deferred'`: the copy is written later by `writeOptimizedCopy` (after
 * ready, off the start's critical path: ORT writes weights at ~60 MB/s). Any cache problem (read-only folder, full
 * disk, a copy ORT cannot load) falls back to the source; it never fails a session that the source alone would create.
 */
export async function createWithOptimizedCache(
  ort: Ort,
  modelPath: string,
  provider: SessionProvider,
  options: InferenceSession.SessionOptions,
  log: Log | undefined,
  policy: OptimizedCachePolicy,
): Promise<CachedSession> {
  const plan = await planCache(ort, modelPath, provider, options, policy);
  if (plan.kind === 'off') return { session: await ort.InferenceSession.create(modelPath, options), cache: 'skipped' };
  const { p, key } = plan;
  const stored = await storedKey(p.key, key);
  if (stored === 'declined') {
    // Whatever a killed writer or an earlier copy left goes too, once old enough (as on a hit).
    void sweepStale(p, '').catch(() => undefined);
    return { session: await ort.InferenceSession.create(modelPath, options), cache: 'declined' };
  }
  if (stored === 'copy') {
    let reason: string;
    try {
      // The graph is optimised already: running the optimisers again would only cost start-up time.
      const session = await ort.InferenceSession.create(p.onnx, { ...options, graphOptimizationLevel: 'disabled' });
      // Leftovers of a writer killed by something harsher than SIGTERM (OOM, node failure) go once they are old.
      void sweepStale(p, '').catch(() => undefined);
      return { session, cache: 'hit' };
    } catch (err) {
      reason = firstLine(err);
    }
    // The source decides: if it fails too (say CUDA does not start), its error is the one to report, not the cache's.
    const session = await ort.InferenceSession.create(modelPath, options);
    log?.('warn', 'optimized model cache unusable; loaded the source model and dropped the cache', { component: path.basename(p.dir), reason });
    await fsp.rm(p.key, { force: true }).catch(() => undefined);
    return { session, cache: 'failed' };
  }
  const session = await ort.InferenceSession.create(modelPath, options);
  return { session, cache: (await worthWriting(key, p.dir, policy)) ? 'deferred' : 'skipped' };
}

/**
 * Writes the optimised copy of `modelPath` (the work `createWithOptimizedCache` deferred): a throwaway session with
 * `optimizedModelFilePath`, released at once, then (under `auto`) the timing that decides whether it is kept, then the
 * commit. Meant for a background process after ready; a crash or kill part-way leaves temp files that a later write
 * sweeps, never a key without its graph (a `declined` key says on purpose that there is none).
 */
export async function writeOptimizedCopy(
  ort: Ort,
  modelPath: string,
  provider: SessionProvider,
  options: InferenceSession.SessionOptions,
  log: Log | undefined,
  policy: OptimizedCachePolicy,
  /** Told the files about to be written, before ORT starts (so whoever kills the writer can remove them). */
  onFiles?: (paths: string[]) => void,
): Promise<CacheOutcome> {
  const { mode } = policy;
  const plan = await planCache(ort, modelPath, provider, options, policy);
  if (plan.kind === 'off') return 'skipped';
  const { p, key } = plan;
  const component = path.basename(p.dir);
  const stored = await storedKey(p.key, key);
  if (stored !== 'none') return stored === 'copy' ? 'hit' : 'declined'; // another process decided meanwhile
  if (!(await worthWriting(key, p.dir, policy))) return 'skipped';
  const tag = `${process.pid}-${randomBytes(4).toString('hex')}`;
  const tmpOnnx = path.join(p.dir, `${p.stem}.onnx.tmp-${tag}`);
  const dataName = `${p.stem}.${tag}.onnx_data`;
  const t0 = performance.now();
  onFiles?.([tmpOnnx, path.join(p.dir, dataName)]);
  try {
    const session = await ort.InferenceSession.create(modelPath, {
      ...options,
      optimizedModelFilePath: tmpOnnx,
      extra: {
        ...(options.extra as Record<string, unknown> | undefined),
        session: {
          ...((options.extra as { session?: Record<string, string> } | undefined)?.session ?? {}),
          // Weights go to a sibling file (a >2 GB UNet cannot be one protobuf); small tensors stay in the graph.
          optimized_model_external_initializers_file_name: dataName,
          optimized_model_external_initializers_min_size_in_bytes: '1024',
        },
      },
    });
    await session.release();
    // `always` keeps every copy it writes untimed (benchmarks, CUDA); `auto` keeps only one that loads faster than the
    // source builds. Either way an earlier decision for the same key (a copy, or declined) stands until the key changes.
    const times = mode === 'always' ? undefined : await buildTimes(ort, modelPath, tmpOnnx, options);
    // The source may have been replaced while ORT read it: then this copy belongs to no key.
    if (JSON.stringify(await currentKey(p.dir, key.ort, key.provider, key.level)) !== JSON.stringify(key)) throw new Error('the source changed while it was optimised');
    if (times && !(policy.keep ?? worthKeeping)(times)) {
      await removeQuietly(tmpOnnx, path.join(p.dir, dataName));
      // Another replica on a shared volume may have committed a copy for this key meanwhile: it stays.
      if ((await storedKey(p.key, key)) === 'copy') return 'hit';
      await commitDeclined(p, { ...key, declined: { sourceMs: round1(times.sourceMs), copyMs: round1(times.copyMs) } });
      await sweepStale(p, '');
      log?.('info', 'optimized model not kept: it does not load faster than the source builds', { component, sourceMs: round1(times.sourceMs), copyMs: round1(times.copyMs) });
      return 'declined';
    }
    await commit(p, tmpOnnx, path.join(p.dir, dataName), key);
    await sweepStale(p, dataName);
    log?.('info', 'optimized model cached for the next start', { component, file: path.basename(p.onnx), ms: Math.round(performance.now() - t0), ...(times ? { sourceMs: round1(times.sourceMs), copyMs: round1(times.copyMs) } : {}) });
    return 'written';
  } catch (err) {
    await removeQuietly(tmpOnnx, path.join(p.dir, dataName));
    log?.('warn', 'could not write the optimized model cache', { component, reason: firstLine(err) });
    return 'failed';
  }
}

type Plan = { kind: 'off' } | { kind: 'cache'; p: ReturnType<typeof optimizedPaths>; key: CacheKey };

async function planCache(ort: Ort, modelPath: string, provider: SessionProvider, options: InferenceSession.SessionOptions, policy: OptimizedCachePolicy): Promise<Plan> {
  const { mode } = policy;
  // `auto` skips CUDA: on an H100 and an H200 starts from the copy were no faster, and its writer would hold a second
  // CUDA context and copy of the weights next to the serving one (README "Boot").
  if (mode === 'off' || (mode === 'auto' && (onGpu(provider) || !(await isCacheEntry(path.dirname(path.dirname(modelPath)), policy.entryMarkers))))) return { kind: 'off' };
  const ortVersion = ort.env.versions?.node ?? ort.env.versions?.common ?? 'unknown';
  const p = optimizedPaths(modelPath, ortVersion, provider);
  const key = await currentKey(p.dir, ortVersion, provider, String(options.graphOptimizationLevel ?? 'all'));
  return key === undefined ? { kind: 'off' } : { kind: 'cache', p, key };
}

async function worthWriting(key: CacheKey, dir: string, policy: OptimizedCachePolicy): Promise<boolean> {
  const sourceBytes = key.sources.reduce((s, f) => s + f.size, 0);
  return sourceBytes <= (policy.maxSourceBytes ?? MAX_SOURCE_BYTES) && (await canWrite(dir, sourceBytes));
}

/** The key for the component folder as it is now: every source file (not ours, not temps, not configs). */
async function currentKey(dir: string, ort: string, provider: SessionProvider, level: string): Promise<CacheKey | undefined> {
  let names: string[];
  try {
    names = (await fsp.readdir(dir, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);
  } catch {
    return undefined;
  }
  const sources: SourceFile[] = [];
  for (const name of names.sort()) {
    if (!isSource(name)) continue;
    const st = await fsp.stat(path.join(dir, name)).catch(() => undefined);
    if (st) sources.push({ name, size: st.size, mtimeMs: st.mtimeMs });
  }
  const providerOptions = gpuProviderOptions(provider);
  return { version: 1, ort, provider, level, cpu: cpuTag(provider), ...(providerOptions ? { providerOptions } : {}), sources };
}

/** A file of a component folder that the key lists: not ours, not a temp, not a config. */
const isSource = (name: string): boolean => !(name.includes(OPT_MARK) || name.includes('.tmp') || name.endsWith('.partial') || name.endsWith('.json'));

/**
 * CUDA_PROVIDER_OPTIONS as the native module applies them to every CUDA provider of this process (it reads the same
 * variable at each append; provider-options.ts), normalised as it parses them. Some shape the optimised graph
 * (prefer_nhwc: NHWC layout), and a copy loads with optimisation off: one made under other options must not match.
 */
function gpuProviderOptions(provider: SessionProvider): string {
  if (!onGpu(provider)) return '';
  return (process.env.CUDA_PROVIDER_OPTIONS ?? '').split(/[,;]/).map((e) => e.split('=').map((x) => x.trim()).join('=')).filter((e) => e !== '').join(',');
}

/** CPU graphs at level `all` depend on the vector width; a GPU graph does not depend on the host CPU. */
function cpuTag(provider: SessionProvider): string {
  if (onGpu(provider)) return '';
  const c = os.cpus()[0];
  return `${process.arch} ${c?.model ?? 'unknown'}`;
}

/** What the key file says for `want`: a copy to load, a declined copy, or nothing that matches. */
async function storedKey(file: string, want: CacheKey): Promise<'copy' | 'declined' | 'none'> {
  try {
    const { declined, ...got } = JSON.parse(await fsp.readFile(file, 'utf8')) as StoredKey;
    if (JSON.stringify(got) !== JSON.stringify(want)) return 'none';
    return declined === undefined ? 'copy' : 'declined';
  } catch {
    return 'none';
  }
}

/**
 * Times session builds from the source and from the copy at `copyPath`. Best of three (one when the source takes
 * over half a second: the noise is small next to it), alternating, so a burst of load on the machine hits both.
 */
async function buildTimes(ort: Ort, modelPath: string, copyPath: string, options: InferenceSession.SessionOptions): Promise<BuildTimes> {
  const time = async (file: string, o: InferenceSession.SessionOptions) => {
    const t0 = performance.now();
    const s = await ort.InferenceSession.create(file, o);
    const ms = performance.now() - t0;
    await s.release();
    return ms;
  };
  let sourceMs = Infinity;
  let copyMs = Infinity;
  for (let i = 0; i < 3 && (i === 0 || sourceMs < 500); i++) {
    sourceMs = Math.min(sourceMs, await time(modelPath, options));
    copyMs = Math.min(copyMs, await time(copyPath, { ...options, graphOptimizationLevel: 'disabled' }));
  }
  return { sourceMs, copyMs };
}

const round1 = (ms: number) => Math.round(ms * 10) / 10;

/** A folder of the PVC cache: one of the fetch engine's markers (its manifest, or its journal while filling) sits at its root. */
async function isCacheEntry(modelRoot: string, markers: readonly string[]): Promise<boolean> {
  for (const marker of markers) if (await exists(path.join(modelRoot, marker))) return true;
  return false;
}

async function canWrite(dir: string, sourceBytes: number): Promise<boolean> {
  try {
    await fsp.access(dir, constants.W_OK);
    // access() says yes to root on a folder marked read-only; a folder made read-only on purpose stays untouched.
    if (((await fsp.stat(dir)).mode & 0o222) === 0) return false;
    const fs = await fsp.statfs(dir);
    return fs.bavail * fs.bsize > FREE_SPACE_FACTOR * sourceBytes;
  } catch {
    return false;
  }
}

/**
 * Shares both files with the group, fsyncs them, drops the old key, renames the graph into place, writes the new key
 * (tmp + rename), fsyncs the folder.
 */
async function commit(p: ReturnType<typeof optimizedPaths>, tmpOnnx: string, data: string, key: CacheKey): Promise<void> {
  await shareWithGroup(tmpOnnx);
  await fsyncFile(tmpOnnx);
  const noWeights = (e: NodeJS.ErrnoException) => {
    // A graph with no initializer of 1 KB or more writes no weights file.
    if (e.code !== 'ENOENT') throw e;
  };
  await shareWithGroup(data).catch(noWeights);
  await fsyncFile(data).catch(noWeights);
  await fsp.rm(p.key, { force: true });
  await fsp.rename(tmpOnnx, p.onnx);
  await writeKey(p, key);
}

/** The key, written last (tmp + rename), then the folder synced: the commit point of a copy or of a declined one. */
async function writeKey(p: ReturnType<typeof optimizedPaths>, key: StoredKey): Promise<void> {
  const tmpKey = `${p.key}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await fsp.writeFile(tmpKey, `${JSON.stringify(key)}\n`);
  await fsyncFile(tmpKey);
  await fsp.rename(tmpKey, p.key);
  await fsyncFile(p.dir);
}

/** A key that says the copy was timed and not kept: written like a real key (tmp + rename), with no graph beside it. */
async function commitDeclined(p: ReturnType<typeof optimizedPaths>, key: StoredKey): Promise<void> {
  await fsp.rm(p.key, { force: true });
  await fsp.rm(p.onnx, { force: true });
  await writeKey(p, key);
}

/**
 * Carries the optimised copies of a cache entry's version `fromRoot` into a new version `toRoot` of the same entry
 * (storage/versions.ts: its unchanged files are hard links to the old version's), so that the new version's first start
 * loads them instead of optimising again. A copy comes along only when its component folder in the new version holds
 * exactly the source files its key lists, each the very inode the old version holds: the same bytes, since the cache
 * never rewrites a file in place (a changed file, its external data included, is a new file). Its graph and weights are
 * hard-linked, and its key written last, as a write commits: a crash part-way leaves no key, so nothing a start loads.
 * The key itself is unchanged, so ORT version, provider, level, CPU and provider options are checked at load as for any
 * copy. Declined keys come along too. Never throws: a copy not carried is written again. Resolves to the folders whose
 * copies (or declined keys) came along.
 */
export async function carryOptimizedCopies(fromRoot: string, toRoot: string): Promise<string[]> {
  const carried: string[] = [];
  const comps = await fsp.readdir(fromRoot, { withFileTypes: true }).catch(() => []);
  for (const c of comps.filter((e) => e.isDirectory()).map((e) => e.name).sort()) {
    const from = path.join(fromRoot, c), to = path.join(toRoot, c);
    const keys = (await fsp.readdir(from).catch(() => [] as string[])).filter((n) => n.endsWith(`${OPT_MARK}json`));
    let any = false;
    for (const k of keys) if (await carryOne(from, to, k.slice(0, -'.json'.length)).catch(() => false)) any = true;
    if (any) carried.push(c);
  }
  return carried;
}

async function carryOne(from: string, to: string, stem: string): Promise<boolean> {
  const src = { onnx: path.join(from, `${stem}.onnx`), key: path.join(from, `${stem}.json`) };
  const p = { dir: to, stem, onnx: path.join(to, `${stem}.onnx`), key: path.join(to, `${stem}.json`) };
  // Decided in the new version already (an earlier round of the same fill).
  if (await exists(p.key)) return false;
  const text = await fsp.readFile(src.key, 'utf8');
  const stored = JSON.parse(text) as StoredKey;
  // The same file: the cache never rewrites one in place, so the same inode is the same bytes.
  const same = async (name: string) => {
    const [a, b] = await Promise.all([fsp.stat(path.join(from, name)), fsp.stat(path.join(to, name))]);
    return a.dev === b.dev && a.ino === b.ino;
  };
  if (!(await holdsSources(to, stored, same))) return false;
  if (stored.declined !== undefined) {
    await writeKey(p, stored);
    return true;
  }
  const tmpOnnx = path.join(to, `${stem}.onnx.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const made: string[] = [];
  try {
    await fsp.link(src.onnx, tmpOnnx);
    made.push(tmpOnnx);
    for (const name of await weightsOf(from, stem, await fsp.readFile(tmpOnnx))) {
      await fsp.link(path.join(from, name), path.join(to, name));
      made.push(path.join(to, name));
    }
    // The old version's copy may have been replaced meanwhile under the same name (another replica's write for another
    // CPU model): the graph linked must be the one in place while its key was read, before and after. A replaced graph
    // is a new inode, and the one linked here cannot be reused while this link holds it.
    const ino = (await fsp.stat(tmpOnnx)).ino;
    const inPlace = async () => (await fsp.stat(src.onnx)).ino === ino;
    if (!(await inPlace()) || (await fsp.readFile(src.key, 'utf8')) !== text || !(await inPlace())) throw new Error('the copy was replaced while it was carried');
    await fsp.rename(tmpOnnx, p.onnx);
    made[0] = p.onnx;
    await fsyncFile(to);
    await writeKey(p, stored);
    return true;
  } catch {
    await removeQuietly(...made);
    return false;
  }
}

/**
 * Keeps the optimised copies of a cache entry `root` through a refresh in place (storage/fetch.ts: the refresh removes
 * whatever it does not keep), those of the components whose source files it leaves as they are. `unchanged`: the
 * entry's files (paths relative to `root`) it keeps whole; `fetched`: the listed files it fetches again, each a new
 * file under its name (the old one is removed first). A copy stays only when its folder holds exactly the sources its
 * key lists, as the key saw them (size, mtime), each unchanged, and no source of the folder is fetched (a changed file,
 * its external data at the same size included; a file added). The key is unchanged, so ORT version, provider, level
 * and CPU are checked at load as for any copy. Declined keys stay too. Nothing is written: a kill part-way leaves what
 * the last sweep left, and a copy removed is written again. A file an earlier, killed run of the same refresh fetched
 * is whole (`unchanged`) in the next, but that run's first sweep removed its component's copy before any download,
 * and its mtime is not the key's. Resolves to the files kept (graph, weights, key; paths relative to `root`).
 */
export async function keptOptimizedCopies(root: string, unchanged: ReadonlySet<string>, fetched: ReadonlySet<string>): Promise<string[]> {
  const kept: string[] = [];
  const refetched = new Set([...fetched].filter((rel) => isSource(path.posix.basename(rel))).map((rel) => path.posix.dirname(rel)));
  const comps = await fsp.readdir(root, { withFileTypes: true }).catch(() => []);
  for (const c of comps.filter((e) => e.isDirectory() && !refetched.has(e.name)).map((e) => e.name).sort()) {
    const dir = path.join(root, c);
    const names = await fsp.readdir(dir).catch(() => [] as string[]);
    for (const k of names.filter((n) => n.endsWith(`${OPT_MARK}json`))) {
      const stem = k.slice(0, -'.json'.length);
      try {
        const stored = JSON.parse(await fsp.readFile(path.join(dir, k), 'utf8')) as StoredKey;
        if (!(await holdsSources(dir, stored, async (name) => unchanged.has(`${c}/${name}`)))) continue;
        const graph = stored.declined === undefined ? await fsp.readFile(path.join(dir, `${stem}.onnx`)).catch(() => undefined) : undefined;
        const files = [k, ...(graph ? [`${stem}.onnx`, ...(await weightsOf(dir, stem, graph))] : [])];
        kept.push(...files.map((n) => `${c}/${n}`));
      } catch {
        // An unreadable key keeps nothing: the sweep removes it with its graph.
      }
    }
  }
  return kept;
}

const HOOKS = Object.freeze({ carry: carryOptimizedCopies, keep: keptOptimizedCopies });

/**
 * The cache fill's hooks that keep the copies of unchanged components (storage/fetch.ts ResolveOptions carry, keep);
 * none where ORT_OPTIMIZED_CACHE is off (no copy is loaded then).
 */
export const optimizedCopyHooks = (mode: OptimizedCacheMode): Partial<typeof HOOKS> => (mode === 'off' ? {} : HOOKS);

/** The folder `dir` holds exactly the sources `key` lists, as it saw them (size, mtime), each passing `same`. */
async function holdsSources(dir: string, key: StoredKey, same: (name: string) => Promise<boolean>): Promise<boolean> {
  const now = await currentKey(dir, key.ort, key.provider, key.level);
  if (now === undefined || JSON.stringify(now.sources) !== JSON.stringify(key.sources)) return false;
  for (const f of key.sources) if (!(await same(f.name))) return false;
  return true;
}

/** The weights files of the optimised copy `stem` in `dir`: those its graph names. */
async function weightsOf(dir: string, stem: string, graph: Buffer): Promise<string[]> {
  return (await fsp.readdir(dir)).filter((name) => name.startsWith(`${stem}.`) && name.endsWith('.onnx_data') && graph.includes(name));
}

/**
 * Removes what a killed writer left half-done (the paths it announced through `onFiles`): its temp graph, and its
 * weights file unless a committed graph refers to it (a copy it committed before it died stays).
 */
export async function removeWriterTemps(paths: readonly string[]): Promise<void> {
  for (const file of paths) {
    const dir = path.dirname(file), name = path.basename(file);
    if (name.endsWith('.onnx_data')) {
      const graphs = (await fsp.readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith(`${OPT_MARK}onnx`));
      const used = await Promise.all(graphs.map(async (g) => (await fsp.readFile(path.join(dir, g)).catch(() => undefined))?.includes(name) === true));
      if (used.some(Boolean)) continue;
    }
    await fsp.rm(file, { force: true }).catch(() => undefined);
  }
}

/** Removes optimised weights no graph refers to any more (an older write, a crashed one), once they are old enough. */
async function sweepStale(p: ReturnType<typeof optimizedPaths>, keep: string): Promise<void> {
  const now = Date.now();
  const graph = await fsp.readFile(p.onnx).catch(() => undefined);
  for (const name of await fsp.readdir(p.dir).catch(() => [] as string[])) {
    const isData = name.startsWith(`${p.stem}.`) && name.endsWith('.onnx_data');
    const isTemp = name.startsWith(`${p.stem}.onnx.tmp-`) || name.startsWith(`${path.basename(p.key)}.tmp-`);
    if (name === keep || (!isData && !isTemp)) continue;
    if (isData && graph?.includes(name)) continue;
    const st = await fsp.stat(path.join(p.dir, name)).catch(() => undefined);
    if (st && now - st.mtimeMs > SWEEP_AFTER_MS) await fsp.rm(path.join(p.dir, name), { force: true }).catch(() => undefined);
  }
}

/**
 * Gives the group what the owner has, as the process's umask does for every file the runtime makes (config.ts
 * applyContainerDefaults): ORT creates its files 0644 whatever the umask, and the next pod may run as another uid of the
 * group (OpenShift). A volume whose modes are its mount's (CIFS with file_mode, vfat, some FUSE file systems) refuses
 * the chmod, even to the file's maker: the copy is whole and as open to the group as the mount makes every file, so
 * it is kept.
 */
async function shareWithGroup(file: string): Promise<void> {
  const mode = (await fsp.stat(file)).mode & 0o7777;
  const shared = mode | ((mode & 0o700) >> 3);
  if (shared === mode) return;
  await fsp.chmod(file, shared).catch((e: NodeJS.ErrnoException) => {
    if (!CHMOD_REFUSED.has(e.code ?? '')) throw e;
  });
}

/** What a volume that does not take a file's mode from chmod answers. */
const CHMOD_REFUSED: ReadonlySet<string> = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS']);

/** fsync of a file, or of a folder (its entries). */
async function fsyncFile(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function removeQuietly(...files: string[]): Promise<void> {
  await Promise.all(files.map((f) => fsp.rm(f, { force: true }).catch(() => undefined)));
}

const firstLine = (err: unknown): string => String((err as Error)?.message ?? err).split('\n')[0]!.slice(0, 300);
