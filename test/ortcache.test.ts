/**
 * The optimized-model cache on real ORT sessions: a start loads the source and defers the write; the background
 * write leaves a graph, its weights and a key; the next start loads the copy with the same outputs; a changed source,
 * a broken copy, a read-only folder or a folder outside a cache entry never fail a session.
 */
import { chmod, cp, readFile, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sessionOptions } from '../src/pipeline/onnx.js';
import { createWithOptimizedCache, optimizedPaths, type OptimizedCacheMode, removeWriterTemps, worthKeeping, writeOptimizedCopy } from '../src/pipeline/ortcache.js';
import { ENTRY_MARKERS, MANIFEST } from '../src/storage/cache.js';
import { fixtureModel } from './fixtures/index.js';
import { REFERENCE, tempDir } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const OPTS = sessionOptions('cpu', { intraOpThreads: 1 });
/** The policies the runtime passes: its cache entries are marked by the fetch engine's manifest or journal. */
const policy = (mode: OptimizedCacheMode) => ({ mode, entryMarkers: ENTRY_MARKERS });
const AUTO = policy('auto');
const ALWAYS = policy('always');
const VERSION = ort.env.versions?.node ?? ort.env.versions?.common ?? 'unknown';
let scratch: { dir: string; cleanup: () => void };
stuckFsForTests();
let source: string;

beforeAll(async () => {
  scratch = tempDir('dr-ortcache-');
  // Padded, so the UNet has external weights the copy must carry too.
  source = await fixtureModel({ family: 'sd15', padBytes: 1 << 20 });
});
afterAll(() => scratch.cleanup());

/** A fresh cache entry (manifest at its root) holding the demo UNet, or the UNet of another model folder. */
async function entry(name: string, from = source): Promise<string> {
  const root = path.join(scratch.dir, name);
  await cp(path.join(from, 'unet'), path.join(root, 'unet'), { recursive: true });
  await chmod(path.join(root, 'unet'), 0o755); // the shared reference model is read-only
  await writeFile(path.join(root, MANIFEST), '{}\n');
  return path.join(root, 'unet', 'model.onnx');
}

async function unetOut(s: ort.InferenceSession): Promise<Float32Array> {
  const n = 4 * 8 * 8;
  const r = await s.run({
    sample: new ort.Tensor('float32', Float32Array.from({ length: n }, (_, i) => Math.sin(i)), [1, 4, 8, 8]),
    timestep: new ort.Tensor('float32', new Float32Array([301]), []),
    encoder_hidden_states: new ort.Tensor('float32', Float32Array.from({ length: 77 * 32 }, (_, i) => Math.cos(i)), [1, 77, 32]),
  });
  return r.out_sample!.data as Float32Array;
}

/** Moves the source's weights a minute ahead: the cache key no longer matches, so a start loads the source and defers a new copy. */
async function expectDeferredOnceSourceChanges(model: string): Promise<void> {
  const later = new Date(Date.now() + 60_000);
  await utimes(path.join(path.dirname(model), 'model.onnx_data'), later, later);
  const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
  expect(r.cache).toBe('deferred');
  await r.session.release();
}

const optFiles = async (model: string) => (await readdir(path.dirname(model))).filter((f) => f.includes('.opt.')).sort();

describe('optimized-model cache', () => {
  it('defers the write at start, writes in the background, then serves later starts from the copy', async () => {
    const model = await entry('cycle');
    const first = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(first.cache).toBe('deferred');
    // The start itself writes nothing.
    expect(await optFiles(model)).toEqual([]);
    const want = await unetOut(first.session);
    await first.session.release();

    const logs: string[] = [];
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, (_l, msg) => logs.push(msg), ALWAYS)).toBe('written');
    expect(logs).toContain('optimized model cached for the next start');
    const files = await optFiles(model);
    const p = optimizedPaths(model, VERSION, 'cpu');
    expect(files).toContain(path.basename(p.onnx));
    expect(files).toContain(path.basename(p.key));
    expect(files.some((f) => f.endsWith('.onnx_data'))).toBe(true);
    expect(files.some((f) => f.includes('.tmp-'))).toBe(false);

    const second = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(second.cache).toBe('hit');
    expect(Buffer.from((await unetOut(second.session)).buffer).equals(Buffer.from(want.buffer))).toBe(true);
    await second.session.release();
    // Nothing more to write once the copy is there.
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, AUTO)).toBe('hit');
  });

  it('a changed source invalidates the copy', async () => {
    const model = await entry('changed');
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, ALWAYS)).toBe('written');
    const before = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(before.cache).toBe('hit');
    await before.session.release();
    await expectDeferredOnceSourceChanges(model);
  });

  it('a broken copy falls back to the source and drops its key', async () => {
    const model = await entry('broken');
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, ALWAYS)).toBe('written');
    const p = optimizedPaths(model, VERSION, 'cpu');
    await writeFile(p.onnx, 'not a protobuf');
    const warns: string[] = [];
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, (_l, msg) => warns.push(msg), AUTO);
    expect(r.cache).toBe('failed');
    expect(warns[0]).toMatch(/optimized model cache unusable/);
    expect(await optFiles(model)).not.toContain(path.basename(p.key));
    await r.session.release();
  });

  it('a killed writer leaves nothing half-written, and a copy it committed stays', async () => {
    const model = await entry('killed');
    const announced: string[] = [];
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, ALWAYS, (paths) => announced.push(...paths))).toBe('written');
    // As if a second write had started and been killed: its temp graph and weights exist, nothing refers to them.
    const dir = path.dirname(model);
    const orphans = [path.join(dir, 'model.x.cpu.opt.onnx.tmp-99-ab'), path.join(dir, 'model.x.cpu.opt.99-ab.onnx_data')];
    for (const f of orphans) await writeFile(f, 'partial');
    await removeWriterTemps([...announced, ...orphans]);
    const left = await optFiles(model);
    expect(left.filter((f) => f.includes('99-ab'))).toEqual([]);
    // The committed copy (its weights among the announced files) still loads.
    expect(left.some((f) => announced.some((a) => a.endsWith(f) && f.endsWith('.onnx_data')))).toBe(true);
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(r.cache).toBe('hit');
    await r.session.release();
  });

  // CIFS with the mount's uid and file_mode, vfat, some FUSE file systems: the modes are the mount's, and a chmod is
  // refused (EPERM) even on a file the process just made. The copy is whole and readable: kept, not 'failed'.
  it.skipIf(stuckFsUnavailable())('keeps a copy written on a volume that refuses chmod', async () => {
    const backing = path.join(scratch.dir, 'no-chmod');
    const inBacking = await entry(path.join('no-chmod', 'e'));
    const fs = await mountStuckFs(backing, path.join(scratch.dir, 'no-chmod-mnt'), { eio: 'setattr:*', eioTimes: 1_000_000, eioErrno: 1 });
    const model = path.join(fs.dir, path.relative(backing, inBacking));
    const logs: string[] = [];
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, (_l, msg, f) => logs.push(`${msg} ${JSON.stringify(f)}`), ALWAYS), logs.join('; ')).toBe('written');
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(r.cache).toBe('hit');
    await r.session.release();
  });

  it('skips a folder outside a cache entry (auto), a read-only folder, and mode off', async () => {
    const outside = path.join(scratch.dir, 'plain', 'unet');
    await cp(path.join(source, 'unet'), outside, { recursive: true });
    const model = path.join(outside, 'model.onnx');
    for (const mode of ['auto', 'off'] as const) {
      const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, policy(mode));
      expect(r.cache, mode).toBe('skipped');
      await r.session.release();
      expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, policy(mode)), mode).toBe('skipped');
    }
    const ro = await entry('read-only');
    await chmod(path.dirname(ro), 0o555);
    try {
      const r = await createWithOptimizedCache(ort, ro, 'cpu', OPTS, undefined, AUTO);
      expect(r.cache).toBe('skipped');
      await r.session.release();
      expect(await optFiles(ro)).toEqual([]);
    } finally {
      await chmod(path.dirname(ro), 0o755);
      await rm(path.dirname(path.dirname(ro)), { recursive: true, force: true });
    }
  });

  it('copies no component larger than the policy\'s size cap (ORT_OPTIMIZED_CACHE_MAX_MB), and copies it once the cap is above it', async () => {
    const model = await entry('size-cap');
    const { stat } = await import('node:fs/promises');
    const bytes = (await stat(model)).size + (await stat(path.join(path.dirname(model), 'model.onnx_data'))).size;
    const capped = { ...ALWAYS, maxSourceBytes: bytes - 1 };
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, capped);
    expect(r.cache).toBe('skipped');
    await r.session.release();
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, capped)).toBe('skipped');
    expect(await optFiles(model)).toEqual([]);
    const raised = { ...ALWAYS, maxSourceBytes: bytes };
    const again = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, raised);
    expect(again.cache).toBe('deferred');
    await again.session.release();
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, raised)).toBe('written');
  });

  it('auto leaves CUDA sessions alone (slower there), always still caches them', async () => {
    // The provider argument names the cache and picks the policy; the session itself runs on CPU here.
    const model = await entry('cuda-label');
    const auto = await createWithOptimizedCache(ort, model, 'cuda', OPTS, undefined, AUTO);
    expect(auto.cache).toBe('skipped');
    await auto.session.release();
    expect(await writeOptimizedCopy(ort, model, 'cuda', OPTS, undefined, AUTO)).toBe('skipped');
    expect(await optFiles(model)).toEqual([]);
    const always = await createWithOptimizedCache(ort, model, 'cuda', OPTS, undefined, ALWAYS);
    expect(always.cache).toBe('deferred');
    await always.session.release();
  });

  it('a GPU copy made under other CUDA_PROVIDER_OPTIONS does not match (prefer_nhwc shapes the graph, and a copy is not optimised again)', async () => {
    const model = await entry('cuda-options');
    const before = process.env.CUDA_PROVIDER_OPTIONS;
    try {
      delete process.env.CUDA_PROVIDER_OPTIONS;
      expect(await writeOptimizedCopy(ort, model, 'cuda', OPTS, undefined, ALWAYS)).toBe('written');
      const hit = await createWithOptimizedCache(ort, model, 'cuda', OPTS, undefined, ALWAYS);
      expect(hit.cache).toBe('hit');
      await hit.session.release();
      process.env.CUDA_PROVIDER_OPTIONS = 'prefer_nhwc=1';
      const other = await createWithOptimizedCache(ort, model, 'cuda', OPTS, undefined, ALWAYS);
      expect(other.cache).toBe('deferred');
      await other.session.release();
      expect(await writeOptimizedCopy(ort, model, 'cuda', OPTS, undefined, ALWAYS)).toBe('written');
      // The same options written another way are the same options.
      process.env.CUDA_PROVIDER_OPTIONS = ' prefer_nhwc = 1 ;';
      const again = await createWithOptimizedCache(ort, model, 'cuda', OPTS, undefined, ALWAYS);
      expect(again.cache).toBe('hit');
      await again.session.release();
      // CPU copies do not depend on them.
      const cpu = await entry('cpu-options');
      expect(await writeOptimizedCopy(ort, cpu, 'cpu', OPTS, undefined, ALWAYS)).toBe('written');
      delete process.env.CUDA_PROVIDER_OPTIONS;
      const cpuHit = await createWithOptimizedCache(ort, cpu, 'cpu', OPTS, undefined, ALWAYS);
      expect(cpuHit.cache).toBe('hit');
      await cpuHit.session.release();
    } finally {
      if (before === undefined) delete process.env.CUDA_PROVIDER_OPTIONS;
      else process.env.CUDA_PROVIDER_OPTIONS = before;
    }
  });

  it('keeps a copy only when it loads clearly faster than the source builds', () => {
    expect(worthKeeping({ sourceMs: 145, copyMs: 85 })).toBe(true);
    expect(worthKeeping({ sourceMs: 42, copyMs: 21 })).toBe(true);
    // A few milliseconds either way: not worth a second copy of the weights and a slower first run.
    expect(worthKeeping({ sourceMs: 8, copyMs: 3 })).toBe(false);
    // 20 ms saved of 2 s is noise.
    expect(worthKeeping({ sourceMs: 2000, copyMs: 1980 })).toBe(false);
    expect(worthKeeping({ sourceMs: 30, copyMs: 40 })).toBe(false);
  });

  it('auto times the copy: one that does not load faster is declined, and stays so until the source changes', async () => {
    // The demo UNet is a handful of nodes: its source builds in milliseconds, so a copy cannot save 20 ms on an idle
    // machine. Under load a build can stall either way, so the decision is fixed here (the timed one is the next test's)
    // while the times are still measured and logged.
    const model = await entry('declined');
    const logs: Array<[string, Record<string, unknown>]> = [];
    const judged: Array<{ sourceMs: number; copyMs: number }> = [];
    const declineAll = { ...AUTO, keep: (t: { sourceMs: number; copyMs: number }) => (judged.push(t), false) };
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, (_l, msg, obj) => logs.push([msg, obj as Record<string, unknown>]), declineAll)).toBe('declined');
    const [msg, obj] = logs.at(-1)!;
    expect(msg).toBe('optimized model not kept: it does not load faster than the source builds');
    expect(judged).toHaveLength(1);
    expect(judged[0]!.sourceMs).toBeGreaterThan(0);
    expect(judged[0]!.copyMs).toBeGreaterThan(0);
    expect(obj.sourceMs).toBe(Math.round(judged[0]!.sourceMs * 10) / 10);
    expect(obj.copyMs).toBe(Math.round(judged[0]!.copyMs * 10) / 10);
    // Only the key is left, saying why; no graph, no weights, no temp.
    const p = optimizedPaths(model, VERSION, 'cpu');
    expect(await optFiles(model)).toEqual([path.basename(p.key)]);
    const key = JSON.parse(await readFile(p.key, 'utf8')) as { declined?: { sourceMs: number; copyMs: number } };
    expect(key.declined).toEqual({ sourceMs: obj.sourceMs, copyMs: obj.copyMs });

    // Later starts load the source and defer nothing; the writer does not time it again. What a writer killed
    // harder than SIGTERM left behind is swept there too, once old enough.
    const orphan = path.join(path.dirname(model), `${p.stem}.99-dead.onnx_data`);
    await writeFile(orphan, 'left by a killed writer');
    const old = new Date(Date.now() - 3600_000);
    await utimes(orphan, old, old);
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(r.cache).toBe('declined');
    await r.session.release();
    await expect.poll(async () => (await optFiles(model)).includes(path.basename(orphan))).toBe(false);
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, AUTO)).toBe('declined');
    // `always` does not time copies: the declined key is its answer too (the source has not changed).
    expect(await writeOptimizedCopy(ort, model, 'cpu', OPTS, undefined, ALWAYS)).toBe('declined');

    await expectDeferredOnceSourceChanges(model);
  });

  it('auto decides on a real UNet by the build times it measured, and later starts follow the decision', async () => {
    // The tiny real SD 1.x export (reference e2e model): its UNet builds in ~145 ms from the source and ~85 ms from a
    // copy, so on an idle machine the copy is kept (docs/DESIGN.md). Which way it goes is a timing, and a loaded CI
    // machine can tip it; this checks what does not depend on load: the outcome is worthKeeping of the times it
    // logged, and the next start loads what that outcome left.
    const model = await entry('real-unet', path.join(REFERENCE(), 'e2e', 'model'));
    const logs: Array<[string, Record<string, unknown>]> = [];
    const outcome = await writeOptimizedCopy(ort, model, 'cpu', OPTS, (_l, msg, obj) => logs.push([msg, obj as Record<string, unknown>]), AUTO);
    const [, obj] = logs.at(-1)!;
    const times = { sourceMs: Number(obj.sourceMs), copyMs: Number(obj.copyMs) };
    expect(times.sourceMs).toBeGreaterThan(0);
    expect(times.copyMs).toBeGreaterThan(0);
    expect(outcome).toBe(worthKeeping(times) ? 'written' : 'declined');
    const r = await createWithOptimizedCache(ort, model, 'cpu', OPTS, undefined, AUTO);
    expect(r.cache).toBe(outcome === 'written' ? 'hit' : 'declined');
    await r.session.release();
  });
});
