/**
 * @module What the fault suite (test/faults.test.ts) and its soak (scripts/bench-faults.ts) share: an SD-shaped model
 * of deterministic incompressible bytes, the warm-up CLI as a child process that can be killed at a chosen moment,
 * and the two measures taken from the disk itself, never from the journal under test: whether a cache entry is whole
 * (every file's SHA-256 against the source), and how many of the source's bytes are on disk in an entry's files and
 * `.partial`s (compared byte for byte). Only node: modules, so the soak runs it from dist/.
 */
import { spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { createReadStream, existsSync, promises as fsp, readdirSync } from 'node:fs';
import path from 'node:path';
import { buildDemoModel } from '../../src/demo/index.js';

export interface ModelFile {
  rel: string;
  size: number;
}

/**
 * `total` bytes in 16 files shaped like an optimum SD 1.5 export: most in the UNet's external weights, a text
 * encoder and a VAE decoder in the megabytes, and the configs and tokenizer files of a few hundred bytes to 1 MB.
 */
export function modelShape(total: number): ModelFile[] {
  const smalls: ModelFile[] = [
    { rel: 'model_index.json', size: 600 },
    { rel: 'scheduler/scheduler_config.json', size: 500 },
    { rel: 'tokenizer/vocab.json', size: Math.min(1_060_000, Math.round(total / 100)) },
    { rel: 'tokenizer/merges.txt', size: Math.min(525_000, Math.round(total / 200)) },
    { rel: 'tokenizer/special_tokens_map.json', size: 500 },
    { rel: 'tokenizer/tokenizer_config.json', size: 800 },
    { rel: 'text_encoder/config.json', size: 600 },
    { rel: 'text_encoder/model.onnx', size: 90_000 },
    { rel: 'unet/config.json', size: 1_600 },
    { rel: 'unet/model.onnx', size: 300_000 },
    { rel: 'vae_decoder/config.json', size: 700 },
    { rel: 'vae_decoder/model.onnx', size: 60_000 },
    { rel: 'vae_encoder/model.onnx', size: 50_000 },
  ];
  const rest = total - smalls.reduce((s, f) => s + f.size, 0);
  const te = Math.round(rest * 0.12);
  const vae = Math.round(rest * 0.05);
  return [
    ...smalls,
    { rel: 'text_encoder/model.onnx_data', size: te },
    { rel: 'vae_decoder/model.onnx_data', size: vae },
    { rel: 'unet/model.onnx_data', size: rest - te - vae },
  ];
}

export interface SourceFile extends ModelFile {
  sha256: string;
}

/** Writes the model under `dir`: the AES-CTR keystream of the file's name and the seed (incompressible, no zero runs). */
export async function writeModel(dir: string, files: readonly ModelFile[], seed = 0): Promise<SourceFile[]> {
  const out: SourceFile[] = [];
  const zero = Buffer.alloc(1 << 20);
  for (const f of files) {
    const abs = path.join(dir, f.rel);
    await fsp.mkdir(path.dirname(abs), { recursive: true });
    const key = createHash('sha256').update(`${seed}/${f.rel}`).digest().subarray(0, 16);
    const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
    const hash = createHash('sha256');
    const fh = await fsp.open(abs, 'w');
    try {
      for (let left = f.size; left > 0; left -= zero.length) {
        const b = cipher.update(left >= zero.length ? zero : zero.subarray(0, left));
        hash.update(b);
        await fh.write(b);
      }
    } finally {
      await fh.close();
    }
    out.push({ ...f, sha256: hash.digest('hex') });
  }
  return out;
}

/** The demo model under `dir`, padded to about `padBytes`, with each file's size and SHA-256: what a fill must reproduce. */
export async function demoSource(dir: string, padBytes: number): Promise<{ source: SourceFile[]; total: number }> {
  const m = await buildDemoModel(dir, { padBytes });
  const source = await Promise.all(m.files.map(async (f) => ({ rel: f.path, size: f.bytes, sha256: await sha256File(path.join(dir, f.path)) })));
  return { source, total: m.totalBytes };
}

/** The one cache entry (s3-…) a fill made under `cache`, if exactly one. */
export function entryIn(cache: string): string | undefined {
  const names = existsSync(cache) ? readdirSync(cache).filter((x) => x.startsWith('s3-') && !x.includes('.lock')) : [];
  return names.length === 1 ? path.join(cache, names[0]!) : undefined;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/** What is wrong with an entry that claims to be whole: files missing, of another size or another SHA-256. */
export async function entryProblems(entry: string, source: readonly SourceFile[]): Promise<string[]> {
  const bad: string[] = [];
  for (const f of source) {
    const abs = path.join(entry, f.rel);
    const st = await fsp.stat(abs).catch(() => undefined);
    if (!st) bad.push(`${f.rel}: missing`);
    else if (st.size !== f.size) bad.push(`${f.rel}: ${st.size} bytes, source has ${f.size}`);
    else if ((await sha256File(abs)) !== f.sha256) bad.push(`${f.rel}: SHA-256 differs from the source`);
  }
  return bad;
}

const BLOCK = 1 << 16;
/** Shortest run of equal bytes counted inside a block that differs: 16 random bytes equal by chance is 2^-128. */
const MIN_RUN = 16;

/**
 * Bytes of `file` equal to `src` at the same offsets, in runs of at least MIN_RUN that hold a non-zero byte: a hole
 * of a sparse .partial reads as zeros, so equal zeros alone prove nothing (an undercount only where the source has
 * runs of zeros: 0.2% of the demo's padded weights, none in random bytes).
 */
async function sameBytes(file: string, src: string): Promise<number> {
  let a;
  let b;
  try {
    a = await fsp.open(file, 'r');
    b = await fsp.open(src, 'r');
    const ba = Buffer.alloc(BLOCK);
    const bb = Buffer.alloc(BLOCK);
    let same = 0;
    let run = 0;
    let nonZero = false;
    const end = () => {
      if (run >= MIN_RUN && nonZero) same += run;
      run = 0;
      nonZero = false;
    };
    for (let pos = 0; ; pos += BLOCK) {
      const [ra, rb] = await Promise.all([a.read(ba, 0, BLOCK, pos), b.read(bb, 0, BLOCK, pos)]);
      const n = Math.min(ra.bytesRead, rb.bytesRead);
      if (n === 0) break;
      const x = ba.subarray(0, n);
      const y = bb.subarray(0, n);
      if (x.equals(y)) {
        run += n;
        nonZero ||= y.some((v) => v !== 0);
        continue;
      }
      for (let i = 0; i < n; i++) {
        if (x[i] === y[i]) {
          run++;
          if (y[i] !== 0) nonZero = true;
        } else end();
      }
    }
    end();
    return same;
  } catch {
    return 0;
  } finally {
    await a?.close();
    await b?.close();
  }
}

/**
 * The source's bytes that are on disk in the entry: each file under its final name, or else in its `.partial`,
 * compared with the source byte for byte (what a resume could keep, whatever the journal says).
 */
export async function bytesOnDisk(entry: string, sourceDir: string, files: readonly ModelFile[]): Promise<number> {
  let n = 0;
  for (const f of files) {
    const abs = path.join(entry, f.rel);
    const src = path.join(sourceDir, f.rel);
    const whole = await sameBytes(abs, src);
    n += whole > 0 ? whole : await sameBytes(`${abs}.partial`, src);
  }
  return n;
}

export interface CliRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/**
 * Runs the warm-up CLI. `killWhen` is polled every few ms while it runs; once true, `killSignal` is sent (and the
 * moment returned through onKill).
 */
export function runWarmup(cli: string, env: Record<string, string>, o: { killWhen?: () => boolean; killSignal?: NodeJS.Signals; onKill?: () => void; timeoutMs?: number } = {}): Promise<CliRun> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, [cli], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    let poll: NodeJS.Timeout | undefined;
    if (o.killWhen) {
      poll = setInterval(() => {
        if (!o.killWhen!()) return;
        clearInterval(poll);
        child.kill(o.killSignal ?? 'SIGKILL');
        o.onKill?.();
      }, 2);
    }
    const guard = setTimeout(() => child.kill('SIGKILL'), o.timeoutMs ?? 600_000);
    child.on('close', (code, signal) => {
      clearInterval(poll);
      clearTimeout(guard);
      resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 });
    });
  });
}

/** The percentiles of xs (nearest rank), for the reports. */
export function percentiles(xs: readonly number[], ps: readonly number[] = [0, 0.1, 0.5, 0.9, 1]): number[] {
  const s = [...xs].sort((a, b) => a - b);
  return ps.map((p) => (s.length === 0 ? NaN : s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))]!));
}
