/**
 * What building a LoRA adapter set costs, on the demo model padded to a real UNet's size (its padding is external
 * data every session reads, as real weights are), and the two ways of handing merged weights to ONNX Runtime:
 *
 *   npm run bench:lora -- [PAD_MB=256] [STEPS=20]
 *
 * - memory: the graph and its data file read into memory, patched, and given as `externalData` buffers;
 * - disk: the same patched bytes written as a whole merged copy, the session created from that path;
 * - links (the runtime's way, writeMergedComponent): a new graph whose patched initializers live in a small file and
 *   every other external weight is read through a link to the original data file, the session created from its path.
 * Each is timed against creating the base session from its path, with the process's RSS after each step.
 * Then the served cost on the unpadded demo model: the server (dist/src/main.js, CPU) answers the same request at
 * its default size without adapters, with both demo adapters once (the set is built, the request waits for it),
 * and again (the set is cached): median of 5 requests each.
 *
 *   npm run bench:lora -- switch        (env: BENCH_LORA_BASELINE=<another build's dist/>, BENCH_LORA_ROUNDS=2,
 *                                        BENCH_LORA_REQUESTS=60, BENCH_LORA_IDLE_S=12)
 *
 * Sets that switch: one client sends requests over three adapter sets in turn to a server keeping two
 * (LORA_MAX_SETS=2, so each request builds its set and evicts one; 64×64, 2 steps), with base requests (512×512,
 * 20 steps) before and after. Per build: request and set-build medians, page faults per set, base-request medians, and the server's RSS
 * at ready, after the first evictions, at the end and after BENCH_LORA_IDLE_S idle. With BENCH_LORA_BASELINE the
 * other build's server runs the same, alternately (this, baseline, this, …), and the table gives their ratio.
 */
import { mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { buildDemoModel } from '../src/demo/build.js';
import { LORA_COMPONENTS, parseAdapter } from '../src/pipeline/lora-keys.js';
import { mergeComponent, planAdapterSet, writeMergedComponent } from '../src/pipeline/lora-merge.js';
import { parseSafetensors } from '../src/pipeline/lora-safetensors.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { NO_OPTIMIZED_CACHE } from '../src/pipeline/ortcache.js';
import { readFileSync } from 'node:fs';
import { envNumber, freePort, startBenchServer, startChild } from './bench-common.js';

const padMb = Number(process.argv[2] ?? 256);
const steps = Number(process.argv[3] ?? 20);
const rssMb = () => Math.round(process.memoryUsage().rss / 2 ** 20);

async function main(): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bench-lora-'));
  try {
    await buildDemoModel(dir, { padBytes: padMb * 2 ** 20, padSplit: 'unet' });
    const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 0, optimizedModelCache: NO_OPTIMIZED_CACHE });
    const unet = path.join(dir, 'unet', 'model.onnx');
    const rows: Array<Record<string, unknown>> = [];
    const time = async <T>(label: string, fn: () => Promise<T>): Promise<T> => {
      const t0 = performance.now();
      const r = await fn();
      rows.push({ step: label, ms: Math.round(performance.now() - t0), rssMB: rssMb() });
      return r;
    };
    const base = await time('base UNet session from its path', () => factory.create('unet', unet));
    const st = parseSafetensors(await readFile(path.join(dir, 'loras', 'demo-style.safetensors')), 'demo-style');
    const graphs = Object.fromEntries(LORA_COMPONENTS.map((c) => [c, path.join(dir, c, 'model.onnx')]));
    const list = planAdapterSet([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 1 }], graphs).byComponent.get('unet') ?? [];
    const merged = await time('merge in memory (read graph + data, patch)', () => mergeComponent(unet, list));
    const mem = await time('session from the in-memory bytes', () => factory.createFromBytes('unet', merged.model, merged.externalData));
    const copy = path.join(dir, 'merged', 'unet');
    await time('write the merged copy to disk', async () => {
      await mkdir(copy, { recursive: true });
      await writeFile(path.join(copy, 'model.onnx'), merged.model);
      for (const e of merged.externalData) await writeFile(path.join(copy, e.path), e.data);
    });
    const disk = await time('session from the merged copy on disk', () => factory.create('unet', path.join(copy, 'model.onnx')));
    const linked = await time('write the linked merged graph (patched weights only)', () => writeMergedComponent(unet, list, path.join(dir, 'linked', 'unet')));
    const links = await time('session from the linked merged graph', () => factory.create('unet', linked.modelPath));
    await Promise.all([base.session.release(), mem.session.release(), disk.session.release(), links.session.release()]);
    const served = await serve(path.join(dir, 'plain'));
    console.log(JSON.stringify({ padMB: padMb, unetMB: Math.round(merged.totalBytes / 2 ** 20), patchedKB: Math.round(merged.patchedBytes / 1024), build: rows, served }, null, 1));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Medians of request times on the demo model: base, first request with adapters (builds the set), cached set. */
async function serve(dir: string): Promise<Record<string, unknown>> {
  await buildDemoModel(dir);
  const port = await freePort();
  const env = { ...process.env, PORT: String(port), HOST: '127.0.0.1', STORAGE_URI: dir, MODEL_CACHE_DIR: path.join(dir, '..', 'cache'), EXECUTION_PROVIDER: 'cpu', RESULT_CACHE_MB: '0', LOG_LEVEL: 'info' };
  const { child, up } = startChild(process.execPath, [path.join(import.meta.dirname, '..', 'src', 'main.js')], /"model ready"/, env);
  let log = '';
  child.stdout!.on('data', (c: Buffer) => (log += String(c)));
  try {
    await up;
    const loras = [{ name: 'demo-style', scale: 0.8 }, { name: 'demo-kohya', scale: 1 }];
    const once = async (extra: Record<string, unknown>, seed: number) => {
      const t0 = performance.now();
      const r = await fetch(`http://127.0.0.1:${port}/v1/models/model:predict`, { method: 'POST', body: JSON.stringify({ instances: [{ prompt: 'a red fox', seed, num_inference_steps: steps, ...extra }] }) });
      if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
      await r.arrayBuffer();
      return performance.now() - t0;
    };
    const median = (xs: number[]) => Math.round([...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!);
    const base: number[] = [];
    for (let i = 0; i < 5; i++) base.push(await once({}, i));
    const first = await once({ loras }, 99);
    const cached: number[] = [];
    for (let i = 0; i < 5; i++) cached.push(await once({ loras }, i));
    const built = log.split('\n').filter((l) => l.includes('"adapter set built"')).map((l) => JSON.parse(l) as Record<string, unknown>)[0];
    return { steps, baseMs: median(base), firstWithAdaptersMs: Math.round(first), cachedAdaptersMs: median(cached), setBuild: built?.ms, mergedMB: built?.mergedMB };
  } finally {
    child.kill('SIGTERM');
  }
}

interface SwitchRun {
  requestMs: number[];
  buildMs: number[];
  baseBeforeMs: number[];
  baseAfterMs: number[];
  minorFaultsPerSet: number;
  rssMB: { ready: number; level: number; end: number; idle: number };
  trims: number;
}

/** Base requests at the demo's default size: the first after the idle trim faults its pages back in. */
const BASE = { height: 512, width: 512, num_inference_steps: 20 };
const SWITCH_SETS = [['demo-style'], ['demo-kohya'], [{ name: 'demo-style', scale: 0.5 }, 'demo-kohya']];

/** One server of the build whose dist/ is `dist`: base requests, `requests` set switches, base requests, idle. */
async function switchRun(dist: string, requests: number, idleS: number, cacheDir: string): Promise<SwitchRun> {
  // startBenchServer starts the main.js of its own build: another build's server goes through that build's copy.
  const start = (await import(path.join(dist, 'scripts', 'bench-common.js'))) as { startBenchServer: typeof startBenchServer };
  const srv = await start.startBenchServer({ ...process.env, STORAGE_URI: '', EXECUTION_PROVIDER: 'cpu', WORKERS: '1', LORA_MAX_SETS: '2', RESULT_CACHE_MB: '0', LOG_LEVEL: 'info', MODEL_CACHE_DIR: cacheDir });
  const pid = srv.proc.pid!;
  const status = () => readFileSync(`/proc/${pid}/status`, 'utf8');
  const rss = () => Math.round(Number(/VmRSS:\s+(\d+)/.exec(status())![1]) / 1024);
  const minflt = () => Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[7]);
  const buildMs: number[] = [];
  let trims = 0;
  srv.proc.stdout!.on('data', (c: Buffer) => {
    for (const line of String(c).split('\n')) {
      if (line.includes('"adapter set built"')) buildMs.push((JSON.parse(line) as { ms: { total: number } }).ms.total);
      if (line.includes('memory of ended LoRA adapter set threads given back')) trims++;
    }
  });
  const once = async (extra: Record<string, unknown>, k: number) => {
    const t0 = performance.now();
    const r = await fetch(`${srv.url}/v1/models/model:predict`, { method: 'POST', body: JSON.stringify({ instances: [{ prompt: `p${k}`, seed: k, height: 64, width: 64, num_inference_steps: 2, ...extra }] }) });
    if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
    await r.arrayBuffer();
    return performance.now() - t0;
  };
  try {
    const ready = rss();
    const baseBeforeMs: number[] = [];
    for (let k = 0; k < 7; k++) baseBeforeMs.push(await once(BASE, k));
    const requestMs: number[] = [];
    let level = 0;
    const f0 = minflt();
    for (let k = 0; k < requests; k++) {
      requestMs.push(await once({ loras: SWITCH_SETS[k % 3] }, k));
      if (k === 5) level = rss();
    }
    const faults = minflt() - f0;
    const end = rss();
    await new Promise((r) => setTimeout(r, idleS * 1000));
    const idle = rss();
    const baseAfterMs: number[] = [];
    for (let k = 0; k < 7; k++) baseAfterMs.push(await once(BASE, 100 + k));
    return { requestMs, buildMs, baseBeforeMs, baseAfterMs, minorFaultsPerSet: Math.round(faults / Math.max(1, buildMs.length)), rssMB: { ready, level, end, idle }, trims };
  } finally {
    await srv.stop();
  }
}

async function switching(): Promise<void> {
  const here = path.resolve(import.meta.dirname, '..');
  const baseline = process.env.BENCH_LORA_BASELINE ? path.resolve(process.env.BENCH_LORA_BASELINE) : undefined;
  const rounds = envNumber('BENCH_LORA_ROUNDS', 2);
  const requests = envNumber('BENCH_LORA_REQUESTS', 60);
  const idleS = envNumber('BENCH_LORA_IDLE_S', 12);
  const builds = baseline ? [['this', here], ['baseline', baseline]] as const : [['this', here]] as const;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bench-lora-switch-'));
  const runs = new Map<string, SwitchRun[]>(builds.map(([name]) => [name, []]));
  try {
    for (let r = 0; r < rounds; r++) {
      for (const [name, dist] of builds) {
        const run = await switchRun(dist, requests, idleS, path.join(dir, `${name}-${r}`));
        runs.get(name)!.push(run);
        process.stderr.write(`bench-lora switch: ${name} round ${r + 1}: build median ${median(run.buildMs)} ms, RSS ${Object.values(run.rssMB).join(' / ')} MB\n`);
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  // Each value is the median over rounds of each round's value (a round slowed by other work on the machine moves it
  // less than pooling every request would).
  const mid = (name: string, f: (r: SwitchRun) => number) => median(runs.get(name)!.map(f));
  const metrics: Array<[string, (n: string) => number]> = [
    ['request with a set switch, median ms', (n) => mid(n, (r) => median(r.requestMs))],
    ['set build (log ms.total), median ms', (n) => mid(n, (r) => median(r.buildMs))],
    ['sets built per run', (n) => mid(n, (r) => r.buildMs.length)],
    ['base request (512², 20 steps) before the switches, median ms', (n) => mid(n, (r) => median(r.baseBeforeMs))],
    ['first base request after them and the idle time, ms', (n) => mid(n, (r) => Math.round(r.baseAfterMs[0]!))],
    ['base requests after it, median ms', (n) => mid(n, (r) => median(r.baseAfterMs.slice(1)))],
    ['minor page faults per set built', (n) => mid(n, (r) => r.minorFaultsPerSet)],
    ['RSS MB at ready', (n) => mid(n, (r) => r.rssMB.ready)],
    ['RSS MB after 6 requests', (n) => mid(n, (r) => r.rssMB.level)],
    ['RSS MB at the end', (n) => mid(n, (r) => r.rssMB.end)],
    [`RSS MB after ${idleS} s idle`, (n) => mid(n, (r) => r.rssMB.idle)],
    ['trims logged', (n) => mid(n, (r) => r.trims)],
  ];
  const table = metrics.map(([label, f]) => {
    const mine = f('this');
    const other = baseline ? f('baseline') : undefined;
    return { label, this: mine, ...(other !== undefined ? { baseline: other, ratio: other > 0 ? +(mine / other).toFixed(3) : null } : {}) };
  });
  const w = Math.max(...table.map((t) => t.label.length));
  console.log(`${''.padEnd(w)}  ${'this'.padStart(9)}${baseline ? `  ${'baseline'.padStart(9)}  ${'ratio'.padStart(6)}` : ''}`);
  for (const t of table) console.log(`${t.label.padEnd(w)}  ${String(t.this).padStart(9)}${baseline ? `  ${String(t.baseline).padStart(9)}  ${String(t.ratio).padStart(6)}` : ''}`);
  console.log(JSON.stringify({ bench: 'lora-switch', rounds, requests, idleS, baseline: baseline ?? null, table, runs: Object.fromEntries(runs) }));
}

const median = (xs: number[]) => (xs.length === 0 ? 0 : Math.round([...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!));

if (process.argv[2] === 'switch') void switching().catch((e: unknown) => {
  process.stderr.write(`bench-lora: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
else void main();
