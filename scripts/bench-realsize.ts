/**
 * The runtime on a real-size model on the CPU (docs/BENCHMARKS.md, "SD 1.5 size on the CPU"): an SD 1.5-size export
 * made by scripts/cpu_sd15.py (3.4 GB of UNet weights; nothing of that size is in `npm test`).
 *
 *   npm run bench:realsize -- serve                      (env: STORAGE_URI, MODEL_CACHE_DIR, S3 settings as the server reads them)
 *   npm run bench:realsize -- merge MODEL_DIR ADAPTER.safetensors [BASELINE_CHECKOUT]
 *
 * serve: starts dist/src/main.js on the CPU provider and reports spawn → ready with the boot phases, the process's peak
 * RSS (VmHWM, sampled) and its children's (the optimized-model writer), a text-to-image predict at BENCH_SIZE (256)
 * with BENCH_STEPS (4) steps, seed 1; image-to-image from that picture (strength 0.6, 5 steps, seed 2); with
 * BENCH_LORA=name, the same text-to-image request with that adapter (the set is built, the request waits for it);
 * the optimized-model copy's write when the server starts one; SIGTERM → exit. With BENCH_REF_DIR holding
 * ref-seed1.png and ref-i2i.png (scripts/cpu_sd15.py reference, same requests) it prints the max and mean absolute
 * difference of each image in 0–255.
 * merge: the LoRA merge of ADAPTER into MODEL_DIR/unet, in a fresh process per form and build: the linked form adapter
 * sets use (writeMergedComponent) and the lora-merge CLI's self-contained copy; time and peak RSS of each, against the
 * same in BASELINE_CHECKOUT (another checkout with its dist/ built) side by side.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { freePort } from './bench-common.js';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
const mib = (kb: number) => Math.round(kb / 1024);

/** VmHWM and VmRSS (kB) of a live process; undefined once it is gone. */
function memOf(pid: number): { hwm: number; rss: number } | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(s)?.[1] ?? 0);
    return { hwm: kb('VmHWM'), rss: kb('VmRSS') };
  } catch {
    return undefined;
  }
}

/** Samples a process's peak RSS (and the largest RSS of any of its children) every `ms` until stopped. */
function sampler(pid: number, ms = 200) {
  let hwm = 0;
  let childPeak = 0;
  const tick = () => {
    const m = memOf(pid);
    if (m) hwm = Math.max(hwm, m.hwm);
    try {
      for (const c of readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean)) {
        const cm = memOf(Number(c));
        if (cm) childPeak = Math.max(childPeak, cm.rss);
      }
    } catch {
      /* gone */
    }
  };
  const t = setInterval(tick, ms);
  return { stop: () => (tick(), clearInterval(t), { peakMiB: mib(hwm), childPeakMiB: mib(childPeak) }), now: () => ({ peakMiB: mib(hwm), childPeakMiB: mib(childPeak) }) };
}

// ---------------------------------------------------------------------------------------------------------------

async function serve(): Promise<void> {
  const size = Number(process.env.BENCH_SIZE ?? 256);
  const steps = Number(process.env.BENCH_STEPS ?? 4);
  const lora = process.env.BENCH_LORA;
  const refDir = process.env.BENCH_REF_DIR;
  const port = await freePort();
  const env = { ...process.env, PORT: String(port), HOST: '127.0.0.1', EXECUTION_PROVIDER: 'cpu', RESULT_CACHE_MB: '0', LOG_LEVEL: 'info' };
  const t0 = performance.now();
  const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'src', 'main.js')], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  const mem = sampler(child.pid!);
  const events: Array<Record<string, unknown> & { at: number }> = [];
  let buf = '';
  child.stdout!.on('data', (c: Buffer) => {
    buf += String(c);
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try {
        events.push({ ...(JSON.parse(line) as Record<string, unknown>), at: performance.now() - t0 });
      } catch {
        /* not JSON */
      }
    }
  });
  const waitFor = async (pred: (e: Record<string, unknown>) => boolean, ms: number) => {
    const end = performance.now() + ms;
    for (;;) {
      const e = events.find(pred);
      if (e) return e;
      if (child.exitCode !== null) throw new Error(`the server exited (${child.exitCode}) before: ${JSON.stringify(events.at(-1)).slice(0, 400)}`);
      if (performance.now() > end) throw new Error('timed out waiting for the server');
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  const out: Record<string, unknown> = { size, steps };
  try {
    const listening = await waitFor((e) => e.event === 'listening', 30_000);
    const ready = await waitFor((e) => e.event === 'ready' || (e.event === 'state' && e.state === 'failed'), 1_800_000);
    if (ready.event !== 'ready') throw new Error(`boot failed: ${JSON.stringify(ready).slice(0, 400)}`);
    const files = events.find((e) => e.event === 'files-ready');
    const warm = events.find((e) => e.event === 'warmup-done');
    Object.assign(out, {
      listeningMs: Math.round(listening.at), readyMs: Math.round(ready.at), phases: ready.phases, fromCache: files?.fromCache, fetchSeconds: files?.seconds,
      sessions: Object.fromEntries(events.filter((e) => e.event === 'session').map((e) => [e.component, { ms: e.ms, optimizedCache: e.optimizedCache }])),
      warmup: warm && { ms: warm.ms, size: warm.size, stages: warm.stages }, peakAtReadyMiB: mem.now().peakMiB,
    });
    const predict = async (inst: Record<string, unknown>) => {
      const s = performance.now();
      const r = await fetch(`http://127.0.0.1:${port}/v1/models/model:predict`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ instances: [inst] }) });
      const text = await r.text();
      if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${text.slice(0, 300)}`);
      const png = Buffer.from((JSON.parse(text) as { predictions: Array<{ image: { b64: string } }> }).predictions[0]!.image.b64, 'base64');
      return { ms: Math.round(performance.now() - s), png };
    };
    const prompt = 'a photo of an astronaut riding a horse';
    const t2i = await predict({ prompt, seed: 1, num_inference_steps: steps, guidance_scale: 7.5, height: size, width: size });
    const i2i = await predict({ prompt: 'a watercolor painting of a horse', image: t2i.png.toString('base64'), strength: 0.6, seed: 2, num_inference_steps: 5, guidance_scale: 7.5 });
    out.predictMs = t2i.ms;
    out.img2imgMs = i2i.ms;
    if (refDir) out.parity = { txt2img: await diff(t2i.png, path.join(refDir, 'ref-seed1.png')), img2img: await diff(i2i.png, path.join(refDir, 'ref-i2i.png')) };
    if (lora) {
      const before = mem.now().peakMiB;
      const l = await predict({ prompt, seed: 1, num_inference_steps: steps, guidance_scale: 7.5, height: size, width: size, loras: [{ name: lora, scale: 0.8 }] });
      const built = events.find((e) => e.event === 'adapters-ready');
      const again = await predict({ prompt, seed: 3, num_inference_steps: steps, guidance_scale: 7.5, height: size, width: size, loras: [{ name: lora, scale: 0.8 }] });
      out.lora = { firstMs: l.ms, cachedMs: again.ms, build: built?.ms, mergedMB: built?.mergedMB, peakBeforeMiB: before, peakAfterMiB: mem.now().peakMiB };
    }
    // The optimized-model copy is written after ready, in a child process: wait for it when one was started.
    if (events.some((e) => e.event === 'optimized-cache-writing')) {
      const w = await waitFor((e) => e.event === 'optimized-cache-written', 1_800_000);
      out.optimizedCache = { ms: w.ms, outcomes: w.outcomes, writerPeakRssMiB: mem.now().childPeakMiB };
    }
  } finally {
    const s = performance.now();
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode !== null ? r(undefined) : child.once('exit', r)));
    out.exitAfterSigtermMs = Math.round(performance.now() - s);
    const m = mem.stop();
    out.serverPeakRssMiB = m.peakMiB;
    out.childPeakRssMiB = m.childPeakMiB;
  }
  console.log(JSON.stringify(out));
}

/** Max and mean absolute difference (0–255) of two PNGs' RGB values. */
async function diff(png: Buffer, refFile: string): Promise<{ max: number; mean: number; differing: number } | string> {
  const sharp = (await import('sharp')).default;
  const raw = (b: Buffer | string) => sharp(b).removeAlpha().raw().toBuffer();
  let ref: Buffer;
  try {
    ref = await raw(refFile);
  } catch {
    return `no ${path.basename(refFile)}`;
  }
  const got = await raw(png);
  if (got.length !== ref.length) return `size differs (${got.length} vs ${ref.length} values)`;
  let max = 0, sum = 0, differing = 0;
  for (let i = 0; i < got.length; i++) {
    const d = Math.abs(got[i]! - ref[i]!);
    if (d > max) max = d;
    if (d > 0) differing++;
    sum += d;
  }
  return { max, mean: sum / got.length, differing };
}

// ---------------------------------------------------------------------------------------------------------------

/** Runs a child to its end with its peak RSS sampled. */
async function measured(args: string[]): Promise<{ ms: number; peakMiB: number; code: number | null; last: string }> {
  const t0 = performance.now();
  const child: ChildProcess = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const mem = sampler(child.pid!, 50);
  let text = '';
  child.stdout!.on('data', (c: Buffer) => (text += String(c)));
  child.stderr!.on('data', (c: Buffer) => (text += String(c)));
  const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  return { ms: Math.round(performance.now() - t0), peakMiB: mem.stop().peakMiB, code, last: text.trim().split('\n').at(-1)?.slice(0, 200) ?? '' };
}

/** Child mode: the linked merge (adapter sets' form) with BUILD's code; prints its JSON result and peak RSS. */
async function mergeChild(build: string, modelDir: string, adapter: string, outDir: string): Promise<void> {
  const mod = async <T>(p: string) => (await import(pathToFileURL(path.join(build, 'dist', 'src', 'pipeline', p)).href)) as T;
  const { parseSafetensors } = await mod<typeof import('../src/pipeline/lora-safetensors.js')>('lora-safetensors.js');
  const { parseAdapter, LORA_COMPONENTS } = await mod<typeof import('../src/pipeline/lora-keys.js')>('lora-keys.js');
  const { planAdapterSet, writeMergedComponent } = await mod<typeof import('../src/pipeline/lora-merge.js')>('lora-merge.js');
  const st = parseSafetensors(await readFile(adapter), 'adapter');
  const graphs = Object.fromEntries(LORA_COMPONENTS.map((c) => [c, path.join(modelDir, c, 'model.onnx')]));
  const list = planAdapterSet([{ parsed: parseAdapter(st, 'adapter'), st, scale: 1 }], graphs).byComponent.get('unet') ?? [];
  const t0 = performance.now();
  const r = await writeMergedComponent(path.join(modelDir, 'unet', 'model.onnx'), list, outDir);
  console.log(JSON.stringify({ weights: list.length, patchedMB: Math.round(r.patchedBytes / 1e6), mergeMs: Math.round(performance.now() - t0), hwmMiB: mib(memOf(process.pid)!.hwm) }));
}

async function merge(modelDir: string, adapter: string, baseline?: string): Promise<void> {
  const builds = [ROOT, ...(baseline ? [path.resolve(baseline)] : [])];
  const tmp = await mkdtemp(path.join(path.dirname(path.resolve(modelDir)), 'bench-realsize-'));
  const rows: Array<Record<string, unknown>> = [];
  try {
    for (const b of builds) {
      const linked = await measured([path.join(ROOT, 'dist', 'scripts', 'bench-realsize.js'), 'merge-child', b, modelDir, adapter, path.join(tmp, 'linked')]);
      await rm(path.join(tmp, 'linked'), { recursive: true, force: true });
      const cli = await measured([path.join(b, 'dist', 'scripts', 'lora-merge.js'), modelDir, path.join(tmp, 'copy'), adapter]);
      await rm(path.join(tmp, 'copy'), { recursive: true, force: true });
      rows.push({ build: b === ROOT ? 'this' : b, linked: { ms: linked.ms, peakMiB: linked.peakMiB, code: linked.code, result: linked.last }, cli: { ms: cli.ms, peakMiB: cli.peakMiB, code: cli.code, result: cli.code === 0 ? 'ok' : cli.last } });
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  for (const r of rows) console.log(`${String(r.build).padEnd(40)} linked ${JSON.stringify(r.linked)}\n${''.padEnd(40)} cli    ${JSON.stringify(r.cli)}`);
  if (rows.length === 2) {
    const [a, b] = rows as Array<{ linked: { peakMiB: number; ms: number } }>;
    console.log(`linked peak RSS ratio this/baseline ${(a!.linked.peakMiB / b!.linked.peakMiB).toFixed(3)}, time ratio ${(a!.linked.ms / b!.linked.ms).toFixed(3)}`);
  }
  console.log(JSON.stringify({ modelDir, adapter: path.basename(adapter), rows }));
}

const [cmd, ...rest] = process.argv.slice(2);
const run = cmd === 'serve' ? serve() : cmd === 'merge' && rest.length >= 2 ? merge(rest[0]!, rest[1]!, rest[2]) : cmd === 'merge-child' ? mergeChild(rest[0]!, rest[1]!, rest[2]!, rest[3]!) : undefined;
if (!run) {
  console.error('usage: bench-realsize serve | merge MODEL_DIR ADAPTER.safetensors [BASELINE_CHECKOUT]');
  process.exit(2);
}
run.catch((err: unknown) => {
  console.error((err as Error)?.stack ?? err);
  process.exit(1);
});
