/**
 * @module The GPU comparison's Node half: serves the exports scripts/gpu_sd15.py made (plain and fused, SD 1.5 size)
 * with the built runtime over HTTP, next to the diffusers timings that script measured on the same GPU, and prints one
 * table: generation time at 50 and 20 steps, ready time and its phases, GPU memory, batch 4 against batch 1, and how
 * far each image is from diffusers' own for the same seed; then ready with WARMUP_VAE_ENCODER after-ready against
 * before-ready, each followed at once by an image-to-image request; last, ready with an empty CUDA JIT cache
 * and with the libraries and the model out of the page cache (what a machine's first process pays). Before those, a
 * LoRA adapter written for the export (writeBenchLora) is timed: the request that builds its set,
 * and later ones.
 *
 *   node dist/scripts/bench-gpu.js WORK_DIR [--out FILE]        (WORK_DIR/{plain,fused,ref-seed1.png,python.json})
 *
 * Environment: BENCH_GPU_QUICK=1 runs each measurement once and BENCH_GPU_EP=cpu serves on the CPU (with a plain
 * export in place of the fused one): a check of the script where no GPU is, not a measurement.
 */
import { spawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import sharp from 'sharp';
import { writeSafetensors } from '../src/demo/safetensors.js';
import { walk } from '../src/storage/cache.js';
import { readLoraMap } from '../src/pipeline/lora-map.js';
import { freePort } from './bench-common.js';
import { pixelDiff } from './e2e-case.js';

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'src', 'main.js');
const PROMPT = 'a photo of an astronaut riding a horse';
const QUICK = process.env.BENCH_GPU_QUICK === '1';
const EP = process.env.BENCH_GPU_EP;
/** BENCH_GPU_ONLY=fused: the fused export alone (a rerun after a change to the start path; the search rows start it four more times). */
const ONLY_FUSED = process.env.BENCH_GPU_ONLY === 'fused';

interface Started {
  label: string;
  dir: string;
  port: number;
  readyMs: number;
  phases?: Record<string, number>;
  sessions: Record<string, number>;
  primed: Record<string, number>;
  warmup?: { ms: number; stages: Record<string, number> };
  providers?: Record<string, string>;
  gpuMemMiB?: number;
  notes: string[];
  /** Every log line so far (the list grows while the runtime runs). */
  lines: LogLine[];
  /** The server's process id (its CPU time is read from /proc). */
  pid: number;
  stop(): Promise<void>;
}

type LogLine = Record<string, unknown> & { msg?: string };

/** Seconds of CPU a process has used, all its threads (/proc/PID/stat utime + stime); undefined off Linux. */
function cpuSeconds(pid: number): number | undefined {
  try {
    // The fields after the command name's closing parenthesis: utime and stime are the 12th and 13th there.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return undefined;
  }
}
const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

function gpuMemMiB(): number | undefined {
  try {
    return Number(execFileSync('nvidia-smi', ['--query-gpu=memory.used', '--format=csv,noheader,nounits'], { encoding: 'utf8', timeout: 5000 }).split('\n')[0]);
  } catch {
    return undefined;
  }
}

async function start(label: string, dir: string, env: Record<string, string>): Promise<Started> {
  const port = await freePort();
  const cache = mkdtempSync(path.join(os.tmpdir(), 'bench-gpu-'));
  const t0 = performance.now();
  const child = spawn(process.execPath, [MAIN], {
    env: { ...process.env, STORAGE_URI: dir, MODEL_CACHE_DIR: cache, PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'info', EXECUTION_PROVIDER: 'cuda', RESULT_CACHE_MB: '0', ...env, ...(EP ? { EXECUTION_PROVIDER: EP } : {}) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: LogLine[] = [];
  let text = '';
  const stop = async () => {
    if (child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    }
    rmSync(cache, { recursive: true, force: true });
  };
  const readyMs = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ready after 240 s; last log lines: ${lines.slice(-3).map((j) => j.msg).join(' | ')}`)), 240_000);
    const on = (c: Buffer) => {
      text += String(c);
      let i: number;
      while ((i = text.indexOf('\n')) >= 0) {
        const line = text.slice(0, i);
        text = text.slice(i + 1);
        if (!line.startsWith('{')) continue;
        let j: LogLine;
        try {
          j = JSON.parse(line) as LogLine;
        } catch {
          continue; // not a log line: it must not end the whole bench
        }
        lines.push(j);
        // The runtime's landmarks by their `event` field (src/runtime/boot-events.ts), not by their wording.
        if (j.event === 'ready') {
          clearTimeout(timer);
          resolve(performance.now() - t0);
        } else if (j.event === 'state' && j.state === 'failed') {
          clearTimeout(timer);
          reject(new Error(String(j.msg)));
        }
      }
    };
    child.stdout.on('data', on);
    child.stderr.on('data', (c: Buffer) => process.stderr.write(c));
    child.once('exit', (code) => reject(new Error(`exited ${code} before ready`)));
  }).catch(async (err) => {
    await stop();
    throw err;
  });
  const s: Started = { label, dir, port, readyMs, sessions: {}, primed: {}, notes: [], lines, pid: child.pid!, stop };
  for (const j of lines) {
    if (j.event === 'session') s.sessions[String(j.component)] = Number(j.ms);
    // A priming run is a worker thread's log line, not a runtime event.
    else if (j.msg === 'session primed') s.primed[String(j.component)] = Number(j.ms);
    else if (j.event === 'warmup-done') s.warmup = { ms: Number(j.ms), stages: j.stages as Record<string, number> };
    else if (j.event === 'ready') {
      s.phases = j.phases as Record<string, number>;
      s.providers = j.providers as Record<string, string>;
    } else if (j.level === 40 || String(j.msg).startsWith('execution provider')) s.notes.push(`${j.msg}${j.reason ? `: ${j.reason}` : ''}`);
  }
  s.gpuMemMiB = gpuMemMiB();
  process.stdout.write(`${label}: ready in ${Math.round(readyMs)} ms ${JSON.stringify({ phases: s.phases, sessions: s.sessions, primed: s.primed, warmup: s.warmup, gpuMemMiB: s.gpuMemMiB })}\n`);
  return s;
}

async function predict(port: number, o: { steps: number; seed: number; prompt?: string; image?: Buffer; strength?: number; loras?: string[]; scheduler?: string }): Promise<{ ms: number; png: Buffer }> {
  const t0 = performance.now();
  const i2i = { ...(o.image ? { image: o.image.toString('base64'), strength: o.strength ?? 0.75 } : {}), ...(o.loras ? { loras: o.loras } : {}), ...(o.scheduler ? { scheduler: o.scheduler } : {}) };
  const r = await fetch(`http://127.0.0.1:${port}/v1/models/model:predict`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ instances: [{ prompt: o.prompt ?? PROMPT, num_inference_steps: o.steps, seed: o.seed, ...i2i }] }),
  });
  const j = (await r.json()) as { predictions?: Array<{ image: { b64: string } }>; error?: string };
  if (r.status !== 200 || !j.predictions) throw new Error(`predict: HTTP ${r.status} ${j.error ?? ''}`);
  return { ms: performance.now() - t0, png: Buffer.from(j.predictions[0]!.image.b64, 'base64') };
}

/** The onnxruntime-node the runtime loads (ORT_NODE_VERSION where the caller says). */
function ortNodeVersion(): string {
  try {
    return process.env.ORT_NODE_VERSION ?? String((createRequire(import.meta.url)('onnxruntime-node/package.json') as { version: string }).version);
  } catch {
    return '?';
  }
}

/** The shared libraries the runtime loads on CUDA (onnxruntime-node's, LD_LIBRARY_PATH's) and every file of `model`. */
async function coldFiles(model: string): Promise<string[]> {
  const under = async (d: string, keep: (rel: string) => boolean) => (await walk(d)).filter(keep).map((rel) => path.join(d, rel));
  const lib = (f: string) => /\.so(\.|$)/.test(f);
  const libDirs = [path.join(path.dirname(createRequire(import.meta.url).resolve('onnxruntime-node/package.json')), 'bin'), ...(process.env.LD_LIBRARY_PATH ?? '').split(':').filter(Boolean)];
  return [...(await Promise.all(libDirs.map((d) => under(d, lib)))).flat(), ...(await under(model, () => true))];
}

/**
 * Drops `files` from the page cache (GNU dd's `iflag=nocache count=0`, no root needed) and says how many bytes of the
 * largest stay resident, where util-linux's fincore is there to tell.
 */
function evict(files: string[]): string {
  for (const f of files) {
    try {
      execFileSync('dd', [`if=${f}`, 'iflag=nocache', 'count=0', 'status=none'], { timeout: 30_000 });
    } catch {
      // an unreadable file stays as it is
    }
  }
  const largest = [...files].sort((a, b) => size(b) - size(a))[0];
  let resident = 'fincore not available';
  if (largest) {
    try {
      resident = `${execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', largest], { encoding: 'utf8', timeout: 10_000 }).trim()} of ${size(largest)} bytes resident`;
    } catch {
      // keep the note
    }
  }
  return `${files.length} files dropped from the page cache; largest ${largest ?? '—'}: ${resident}`;
}

const size = (f: string) => {
  try {
    return statSync(f).size;
  } catch {
    return 0;
  }
};

/**
 * A LoRA adapter for the model in `dir`, written to its `loras/` folder (diffusers/PEFT key names, rank 16): every
 * attention projection of the UNet its lora_map.json locates, as a style LoRA trains them, with small deterministic
 * weights. Returns its name, or undefined when the export has no map.
 */
function writeBenchLora(dir: string): string | undefined {
  const map = readLoraMap(path.join(dir, 'unet'));
  if (!map) return undefined;
  const rank = 16;
  let seed = 12345;
  const rand = (n: number, scale: number) => Float32Array.from({ length: n }, () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31 - 0.5) * scale);
  const tensors: Array<{ name: string; shape: number[]; data: Float32Array }> = [];
  for (const [name, e] of Object.entries(map.weights)) {
    if (!/attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$/.test(name) || e.shape.length !== 2) continue;
    const [out, inp] = e.shape as [number, number];
    const module = name.slice(0, -'.weight'.length);
    tensors.push({ name: `unet.${module}.lora_A.weight`, shape: [rank, inp], data: rand(rank * inp, 0.02) });
    tensors.push({ name: `unet.${module}.lora_B.weight`, shape: [out, rank], data: rand(out * rank, 0.02) });
  }
  if (tensors.length === 0) return undefined;
  mkdirSync(path.join(dir, 'loras'), { recursive: true });
  writeFileSync(path.join(dir, 'loras', 'bench-style.safetensors'), writeSafetensors(tensors));
  process.stdout.write(`LoRA bench-style: ${tensors.length / 2} UNet attention projections, rank ${rank}\n`);
  return 'bench-style';
}

/**
 * Priming runs that ended after ready (the VAE encoder's with WARMUP_VAE_ENCODER=after-ready): how long each took,
 * and when, counted from ready.
 */
function primedAfterReady(st: Started): Array<{ component: string; ms: number; endedAfterReadyMs: number }> {
  const ready = st.lines.findIndex((j) => j.event === 'ready');
  if (ready < 0) return [];
  const t0 = Date.parse(String(st.lines[ready]!.time));
  return st.lines
    .slice(ready + 1)
    .filter((j) => j.msg === 'session primed')
    .map((j) => ({ component: String(j.component), ms: Number(j.ms), endedAfterReadyMs: Date.parse(String(j.time)) - t0 }));
}

/** inference_stage_seconds sums and counts per stage, to average the stages of a group of requests. */
async function stageTotals(port: number): Promise<Record<string, { sum: number; count: number }>> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const out: Record<string, { sum: number; count: number }> = {};
  for (const m of text.matchAll(/^inference_stage_seconds_(sum|count)\{([^}]*)\} ([0-9.e+-]+)$/gm)) {
    const stage = /stage="([^"]+)"/.exec(m[2]!)?.[1] ?? '?';
    out[stage] ??= { sum: 0, count: 0 };
    out[stage][m[1] as 'sum' | 'count'] += Number(m[3]);
  }
  return out;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
const s = (ms: number | undefined) => (ms === undefined ? '—' : `${(ms / 1000).toFixed(2)} s`);

interface Timed {
  runs50: number[];
  runs20: number[];
  stagesMs: Record<string, number>;
  parity?: Record<string, number>;
  /** Image-to-image from the first 50-step image, strength 0.75, 50 steps (38 UNet steps plus the VAE encoder). */
  img2img?: number[];
  /** That first image, the input of later image-to-image requests. */
  firstPng?: Buffer;
  /**
   * CPU cores the server kept busy while it ran the 50-step requests back to back (CPU seconds / wall seconds): what a
   * RawDeployment's CPU-based HPA sees of a busy pod (its target is a share of the pod's CPU request).
   */
  busyCores?: number;
}

/** The reference image's steps (gpu_sd15.py records them; 20 at full size). */
let refSteps = 20;

async function timeGenerations(st: Started, refPng: string | undefined): Promise<Timed> {
  const before = await stageTotals(st.port);
  const runs50: number[] = [];
  let first: Buffer | undefined;
  const cpu0 = cpuSeconds(st.pid);
  const wall0 = performance.now();
  for (const seed of QUICK ? [11] : [11, 12, 13]) {
    const r = await predict(st.port, { steps: 50, seed });
    runs50.push(r.ms);
    first ??= r.png;
  }
  const cpu1 = cpuSeconds(st.pid);
  const busyCores = cpu0 !== undefined && cpu1 !== undefined ? Number(((cpu1 - cpu0) / ((performance.now() - wall0) / 1000)).toFixed(2)) : undefined;
  const after = await stageTotals(st.port);
  const stagesMs: Record<string, number> = {};
  for (const [k, v] of Object.entries(after)) {
    const n = v.count - (before[k]?.count ?? 0);
    if (n > 0) stagesMs[k] = Math.round(((v.sum - (before[k]?.sum ?? 0)) / n) * 1000);
  }
  const runs20: number[] = [];
  for (const seed of QUICK ? [14] : [14, 15]) runs20.push((await predict(st.port, { steps: 20, seed })).ms);
  const t: Timed = { runs50, runs20, stagesMs, ...(first ? { firstPng: first } : {}), ...(busyCores !== undefined ? { busyCores } : {}) };
  if (first && existsSync(path.join(st.dir, 'vae_encoder'))) {
    t.img2img = [];
    for (const seed of QUICK ? [21] : [21, 22, 23]) t.img2img.push((await predict(st.port, { steps: 50, seed, image: first, strength: 0.75 })).ms);
  }
  if (refPng && existsSync(refPng)) {
    const got = await sharp((await predict(st.port, { steps: refSteps, seed: 1 })).png).removeAlpha().raw().toBuffer();
    const want = await sharp(refPng).removeAlpha().raw().toBuffer();
    if (got.length === want.length) {
      const d = pixelDiff(got, want);
      let sum = 0;
      for (let i = 0; i < got.length; i++) sum += Math.abs(got[i]! - want[i]!);
      t.parity = { max_abs: d.maxDiff, mean_abs: Number((sum / got.length).toFixed(3)), off_by_more_than_1_pct: Number(((100 * d.offByMore) / got.length).toFixed(2)) };
    }
  }
  process.stdout.write(`${st.label}: 50 steps ${runs50.map((x) => Math.round(x)).join(', ')} ms; 20 steps ${runs20.map((x) => Math.round(x)).join(', ')} ms; img2img ${t.img2img?.map((x) => Math.round(x)).join(', ') ?? '—'} ms; stages ${JSON.stringify(stagesMs)}; parity ${JSON.stringify(t.parity)}; CPU cores busy ${busyCores ?? '—'}\n`);
  return t;
}

/** `clients` concurrent clients, each sending `rounds` requests in turn, after one untimed round (new batch shapes). */
async function throughput(st: Started, clients: number, rounds: number, steps: number): Promise<number> {
  const round = (seed0: number) => Promise.all(Array.from({ length: clients }, (_, c) => predict(st.port, { steps, seed: seed0 + c })));
  await round(1000);
  const t0 = performance.now();
  for (let r = 0; r < rounds; r++) await Promise.all(Array.from({ length: clients }, (_, c) => predict(st.port, { steps, seed: 2000 + r * clients + c })));
  return (clients * rounds) / ((performance.now() - t0) / 1000);
}

async function main(): Promise<void> {
  const { positionals, values } = parseArgs({ allowPositionals: true, options: { out: { type: 'string' } } });
  const work = positionals[0];
  if (!work) throw new Error('usage: bench-gpu.js WORK_DIR [--out FILE]');
  const py = existsSync(path.join(work, 'python.json')) ? (JSON.parse(readFileSync(path.join(work, 'python.json'), 'utf8')) as Record<string, any>) : {};
  const ref = path.join(work, 'ref-seed1.png');
  refSteps = (py.diffusers?.steps as number[] | undefined)?.[1] ?? refSteps;
  const plain = path.join(work, 'plain');
  // A fused export refuses the CPU provider, so a check of this script on the CPU serves the plain one in its rows.
  let fused = EP === 'cpu' ? plain : path.join(work, 'fused');
  const result: Record<string, unknown> = { python: py, errors: [] as string[] };
  const errors = result.errors as string[];
  const attempt = async <T>(what: string, fn: () => Promise<T>): Promise<T | undefined> => {
    try {
      return await fn();
    } catch (err) {
      errors.push(`${what}: ${(err as Error).message}`.slice(0, 600));
      process.stdout.write(`!! ${what}: ${(err as Error).message.slice(0, 600)}\n`);
      return undefined;
    }
  };
  const startOnly = async (label: string, dir: string, env: Record<string, string>, then?: (st: Started) => Promise<unknown>) =>
    attempt(label, async () => {
      const st = await start(label, dir, env);
      try {
        const extra = then ? await then(st) : undefined;
        return { ...st, stop: undefined, extra };
      } finally {
        await st.stop();
      }
    });

  let fusedMain = await startOnly('fused', fused, {}, (st) => timeGenerations(st, ref));
  if (!fusedMain && existsSync(path.join(plain, 'unet'))) {
    // Whatever component failed, the fused UNet alone (beside the plain text encoder and VAE) is still worth a number.
    fused = path.join(work, 'fused-unet-only');
    // A rerun on the same WORK_DIR finds the links of the last one (and its LoRA); rm removes links, not their targets.
    rmSync(fused, { recursive: true, force: true });
    mkdirSync(fused, { recursive: true });
    for (const e of readdirSync(plain)) if (e !== 'unet') symlinkSync(path.join(plain, e), path.join(fused, e));
    symlinkSync(path.join(work, 'fused', 'unet'), path.join(fused, 'unet'));
    fusedMain = await startOnly('fused UNet only', fused, {}, (st) => timeGenerations(st, ref));
  }
  // EXECUTION_PROVIDER=auto must find CUDA by itself.
  // Then DPM++ SDE against Heun (both two UNet runs a step; Heun's step costs ~0.1 ms of CPU): what the Brownian noise,
  // made on the text encoders' thread during each UNet run (AUX_THREADS auto), still adds to a request. Alternating.
  const fusedAgain = await startOnly('fused, second start, EXECUTION_PROVIDER=auto', fused, { EXECUTION_PROVIDER: 'auto' }, async (st) => {
    const ms = (await predict(st.port, { steps: 20, seed: 7 })).ms;
    const sde: Record<string, number[]> = { heun: [], dpmpp_sde_karras: [] };
    for (let r = 0; r < (QUICK ? 1 : 3); r++) for (const scheduler of Object.keys(sde)) sde[scheduler]!.push((await predict(st.port, { steps: 20, seed: 8 + r, scheduler })).ms);
    process.stdout.write(`fused, 20 steps (39 UNet runs): heun ${sde.heun!.map((x) => Math.round(x)).join(', ')} ms; dpmpp_sde_karras ${sde.dpmpp_sde_karras!.map((x) => Math.round(x)).join(', ')} ms\n`);
    return { ms, sde };
  });
  const sdeRuns = (fusedAgain?.extra as { sde?: Record<string, number[]> } | undefined)?.sde;
  // cuDNN's convolution algorithm search: ONNX Runtime's default (exhaustive: the first run of each convolution shape
  // times every algorithm, which is most of the warm-up) against its heuristic choice, set through
  // CUDA_PROVIDER_OPTIONS; starts alternating, each timed as the main row (speed and parity with diffusers).
  type SearchRun = { mode: string; readyMs: number; phases?: Record<string, number>; m50?: number; m20?: number; parity?: Record<string, number>; applied?: unknown };
  const convSearch: SearchRun[] = [];
  for (const mode of QUICK ? ['HEURISTIC'] : ['HEURISTIC', 'EXHAUSTIVE', 'HEURISTIC', 'EXHAUSTIVE']) {
    const r = await startOnly(`fused, cudnn_conv_algo_search=${mode}`, fused, { CUDA_PROVIDER_OPTIONS: `cudnn_conv_algo_search=${mode}` }, (st) => timeGenerations(st, ref));
    const t = r?.extra as Timed | undefined;
    const applied = r?.lines.find((j) => j.msg === 'execution provider cuda started')?.providerOptions;
    if (r) convSearch.push({ mode, readyMs: r.readyMs, ...(r.phases ? { phases: r.phases } : {}), ...(t ? { m50: median(t.runs50), m20: median(t.runs20) } : {}), ...(t?.parity ? { parity: t.parity } : {}), applied });
  }
  // Ready with the VAE encoder primed after the warm-up or before ready (the default), starts alternating, each
  // followed at once by the request that pays for the difference: an image-to-image one.
  const i2iInput = (fusedMain?.extra as Timed | undefined)?.firstPng;
  type EncoderRun = { mode: string; readyMs: number; phases?: Record<string, number>; firstImg2imgMs?: number; primedAfterReady: ReturnType<typeof primedAfterReady> };
  const encoderWarmup: EncoderRun[] = [];
  if (existsSync(path.join(fused, 'vae_encoder'))) {
    for (const mode of QUICK ? ['after-ready', 'before-ready'] : ['after-ready', 'before-ready', 'after-ready', 'before-ready']) {
      const r = await startOnly(`fused, WARMUP_VAE_ENCODER=${mode}`, fused, { WARMUP_VAE_ENCODER: mode }, async (st) => {
        const ms = i2iInput ? (await predict(st.port, { steps: 50, seed: 31, image: i2iInput, strength: 0.75 })).ms : undefined;
        return { ms, primed: primedAfterReady(st) };
      });
      const extra = r?.extra as { ms?: number; primed: EncoderRun['primedAfterReady'] } | undefined;
      if (r) encoderWarmup.push({ mode, readyMs: r.readyMs, ...(r.phases ? { phases: r.phases } : {}), ...(extra?.ms !== undefined ? { firstImg2imgMs: extra.ms } : {}), primedAfterReady: extra?.primed ?? [] });
    }
  }
  const plainMain = ONLY_FUSED ? undefined : await startOnly('plain', plain, {}, (st) => timeGenerations(st, ref));
  const batch: Record<string, number | undefined> = {};
  for (const b of [1, 4]) {
    const r = await startOnly(`fused, MAX_BATCH_SIZE=${b}`, fused, { MAX_BATCH_SIZE: String(b), MAX_QUEUE: '64' }, (st) => throughput(st, 8, QUICK ? 1 : 3, 20));
    batch[`b${b}`] = r?.extra as number | undefined;
  }
  // LoRA on the GPU: the first request builds the adapter set (merge, the merged UNet's session, its first run's
  // kernel search), later ones use it; memory with the set held.
  const loraName = writeBenchLora(fused);
  const lora = loraName
    ? await startOnly('fused, LoRA', fused, {}, async (st) => {
        const base = await predict(st.port, { steps: 50, seed: 41 });
        const first = await predict(st.port, { steps: 50, seed: 41, loras: [loraName] });
        const again: number[] = [];
        for (const seed of QUICK ? [42] : [42, 43, 44]) again.push((await predict(st.port, { steps: 50, seed, loras: [loraName] })).ms);
        const built = st.lines.find((j) => j.event === 'adapters-ready');
        return { baseMs: base.ms, firstMs: first.ms, againMs: median(again), changed: !base.png.equals(first.png), built: built && { ms: built.ms, mergedMB: built.mergedMB, waitedMs: built.waitedMs }, gpuMemMiB: gpuMemMiB() };
      })
    : undefined;
  // Last, as they disturb the machine: what a machine's first process pays that later ones do not. A new pod has an
  // empty CUDA JIT cache (CUDA_CACHE_PATH lives in the container unless set) and may find the libraries and the model
  // out of the page cache; each start has one of the two.
  const cold: Record<string, unknown> = {};
  {
    const jit = mkdtempSync(path.join(os.tmpdir(), 'bench-gpu-jit-'));
    const r = await startOnly('fused, empty CUDA JIT cache (a new pod\'s)', fused, { CUDA_CACHE_PATH: jit });
    rmSync(jit, { recursive: true, force: true });
    const note = evict(await coldFiles(fused));
    process.stdout.write(`${note}\n`);
    const r2 = await startOnly('fused, libraries and model out of the page cache', fused, {});
    Object.assign(cold, { emptyJitCache: r && { readyMs: r.readyMs, phases: r.phases, warmup: r.warmup }, pageCacheDropped: r2 && { readyMs: r2.readyMs, phases: r2.phases, warmup: r2.warmup, note } });
  }
  const loraResult = lora?.extra as { baseMs: number; firstMs: number; againMs: number; changed: boolean; built?: Record<string, unknown>; gpuMemMiB?: number } | undefined;
  Object.assign(result, { fused: fusedMain, fusedAgain, plain: plainMain, batch, encoderWarmup, convSearch, cold, lora: loraResult });

  const d = py.diffusers as { median_50_s?: number; runs_50_s?: number[]; runs_20_s?: number[]; peak_mem_mib?: number } | undefined;
  const d50 = d?.median_50_s !== undefined ? d.median_50_s * 1000 : undefined;
  const row = (name: string, st: typeof fusedMain) => {
    const t = st?.extra as Timed | undefined;
    const m50 = t ? median(t.runs50) : undefined;
    const ratio = m50 !== undefined && d50 ? (m50 / d50).toFixed(2) : '—';
    const ph = st?.phases ? `${s((st.phases.loading ?? 0) * 1000)} / ${s((st.phases.warming ?? 0) * 1000)}` : '—';
    return `| ${name} | ${s(m50)} | ${t ? s(median(t.runs20)) : '—'} | ${ratio} | ${s(st?.readyMs)} | ${ph} | ${st?.gpuMemMiB ?? '—'} MiB | ${t?.parity ? `${t.parity.max_abs} / ${t.parity.mean_abs}` : '—'} |`;
  };
  const lines = [
    `GPU: ${py.gpu ?? '?'}; torch ${py.torch ?? '?'}; onnxruntime-node ${ortNodeVersion()}; Node ${process.version}; ${new Date().toISOString().slice(0, 10)}`,
    '',
    '| SD 1.5 size, 512×512, PNDM, CFG 7.5 | 50 steps | 20 steps | vs diffusers (50) | ready (spawn → ready) | loading / warm-up | GPU memory after ready | image vs diffusers (max / mean abs) |',
    '|---|---|---|---|---|---|---|---|',
    `| diffusers ${py.diffusers?.attention ?? ''} fp16, torch eager | ${s(d50)} | ${d?.runs_20_s ? s(median(d.runs_20_s) * 1000) : '—'} | 1 | — | — | ${d?.peak_mem_mib ?? '—'} MiB peak | — |`,
    row('runtime, plain fp16 export', plainMain),
    row('runtime, fused fp16 export (default)', fusedMain),
    '',
    `fused export served from: ${fused}`,
    `second start of the fused export (EXECUTION_PROVIDER=auto, providers ${JSON.stringify(fusedAgain?.providers)}): ready ${s(fusedAgain?.readyMs)} (loading ${s((fusedAgain?.phases?.loading ?? 0) * 1000)}, warm-up ${s((fusedAgain?.phases?.warming ?? 0) * 1000)}); sessions ${JSON.stringify(fusedAgain?.sessions)}; primed ${JSON.stringify(fusedAgain?.primed)}; warm-up stages ${JSON.stringify(fusedAgain?.warmup)}`,
    `DPM++ SDE Karras against Heun (fused, 20 steps, 39 UNet runs each, medians): ${sdeRuns ? `${s(median(sdeRuns.dpmpp_sde_karras!))} vs ${s(median(sdeRuns.heun!))}` : '—'}`,
    `image-to-image (fused, strength 0.75, 50 steps): ${(fusedMain?.extra as Timed | undefined)?.img2img?.map((x) => s(x)).join(', ') ?? '—'}`,
    `first 50-step request after ready (fused, WARMUP_VAE_ENCODER ${process.env.WARMUP_VAE_ENCODER ?? 'default'}): ${s((fusedMain?.extra as Timed | undefined)?.runs50[0])}`,
    ...encoderWarmup.map(
      (e) =>
        `WARMUP_VAE_ENCODER=${e.mode}: ready ${s(e.readyMs)} (loading ${s((e.phases?.loading ?? 0) * 1000)}, warm-up ${s((e.phases?.warming ?? 0) * 1000)}), then image-to-image at once ${s(e.firstImg2imgMs)}; primed after ready: ${e.primedAfterReady.map((p) => `${p.component} ${p.ms} ms, ended ${p.endedAfterReadyMs} ms after ready`).join('; ') || 'none'}`,
    ),
    ...convSearch.map(
      (c) =>
        `cudnn_conv_algo_search=${c.mode} (CUDA_PROVIDER_OPTIONS, applied: ${JSON.stringify(c.applied)}): ready ${s(c.readyMs)} (loading ${s((c.phases?.loading ?? 0) * 1000)}, warm-up ${s((c.phases?.warming ?? 0) * 1000)}); 50 steps ${s(c.m50)}, 20 steps ${s(c.m20)}; image vs diffusers ${c.parity ? `${c.parity.max_abs} / ${c.parity.mean_abs}` : '—'}`,
    ),
    ...(['emptyJitCache', 'pageCacheDropped'] as const).flatMap((k) => {
      const c = cold[k] as { readyMs: number; phases?: Record<string, number>; note?: string } | undefined;
      const what = k === 'emptyJitCache' ? 'fused with an empty CUDA JIT cache' : 'fused with the libraries and model out of the page cache';
      return c ? [`${what}: ready ${s(c.readyMs)} (loading ${s((c.phases?.loading ?? 0) * 1000)}, warm-up ${s((c.phases?.warming ?? 0) * 1000)})${c.note ? `; ${c.note}` : ''}`] : [];
    }),
    `LoRA (fused, rank 16 on the UNet's attention, 50 steps): ${loraResult ? `without ${s(loraResult.baseMs)}; first request with it ${s(loraResult.firstMs)} (set built: ${JSON.stringify(loraResult.built)}); later ${s(loraResult.againMs)}; image changed ${loraResult.changed}; GPU memory with the set ${loraResult.gpuMemMiB ?? '—'} MiB` : '—'}`,
    `batch (fused, 20 steps, 8 clients): MAX_BATCH_SIZE=1 ${batch.b1?.toFixed(2) ?? '—'} images/s, MAX_BATCH_SIZE=4 ${batch.b4?.toFixed(2) ?? '—'} images/s${batch.b1 && batch.b4 ? `, ratio ${(batch.b4 / batch.b1).toFixed(2)}` : ''}`,
    `CPU cores the server kept busy during back-to-back 50-step requests (for a CPU-based HPA's target): fused ${(fusedMain?.extra as Timed | undefined)?.busyCores ?? '—'}, plain ${(plainMain?.extra as Timed | undefined)?.busyCores ?? '—'}`,
    `stages per 50-step request (ms): fused ${JSON.stringify((fusedMain?.extra as Timed | undefined)?.stagesMs)}, plain ${JSON.stringify((plainMain?.extra as Timed | undefined)?.stagesMs)}`,
    `notes: ${JSON.stringify([...(fusedMain?.notes ?? []), ...(plainMain?.notes ?? [])])}`,
    errors.length > 0 ? `errors: ${JSON.stringify(errors)}` : 'errors: none',
  ];
  process.stdout.write(`\n${lines.join('\n')}\n`);
  if (values.out) writeFileSync(values.out, JSON.stringify(result, (k, v) => (k === 'firstPng' ? undefined : v), 1));
}

await main();
