/**
 * @module A LORA_URI adapter's fetch (`npm run bench:adapter-fetch`, i.e. `node dist/scripts/bench-adapter-fetch.js`):
 * AdapterSource.resolve of one adapter of BENCH_MB (default 256) MB from s3rver (its own process) onto a fresh cache
 * folder each run, with each bound on the fetches' positional writes (src/runtime/adapters.ts adapterWritesAtOnce)
 * side by side. The fetches run in a child process per pool size in BENCH_POOLS (default "16,4": UV_THREADPOOL_SIZE,
 * the image's and Node's default), each bound in BENCH_WRITES (default "auto,1,2,4,8,off": `auto` the runtime's for
 * that pool, `off` no bound) in every one of BENCH_RUNS rounds (default 5, after one unmeasured fetch), the order
 * rotated each round so that none always runs first. Per pool: every run's ms, the median, its ratio to `off`'s, and
 * the median of each round's ratio to that round's `off`. S3_PART_SIZE and S3_MAX_CONCURRENCY pass through (the
 * runtime's defaults: 8 MiB, 24); BENCH_CACHE_DIR puts the cache folders elsewhere than the temp dir (a volume of the
 * kind measured). Everything lives in temp dirs removed at the end.
 */
import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream, mkdtempSync, promises as fsp, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { childS3rver, envNumber, lastJson, median, S3RVER_CREDS, startChild } from './bench-common.js';
import { loadConfig } from '../src/config.js';
import { silentLogger } from '../src/log.js';
import { AdapterSource, adapterWritesAtOnce } from '../src/runtime/adapters.js';

const SELF = fileURLToPath(import.meta.url);
const BUCKET = 'loras';
const NAME = 'bench';
const MB = 1e6;

/** One pool's fetches: each bound as BENCH_WRITES names it, in its order, with its runs' ms. */
interface PoolResult { pool: number; auto: number; runs: Array<{ writes: string; ms: number[] }> }

/** A bound as BENCH_WRITES names it: a number, `auto` (the runtime's for this process's pool) or `off`. */
const bound = (w: string): number => (w === 'auto' ? adapterWritesAtOnce() : w === 'off' ? Infinity : Number(w));

/** Child mode: the fetches, in a process whose pool is UV_THREADPOOL_SIZE; one JSON line at the end. */
async function childFetches(endpoint: string): Promise<void> {
  const writes = (process.env.BENCH_WRITES || 'auto,1,2,4,8,off').split(',');
  for (const w of writes) if (!(bound(w) >= 1)) throw new Error(`BENCH_WRITES: "${w}" is not a bound (a number from 1, auto or off)`);
  const rounds = envNumber('BENCH_RUNS', 5);
  const root = mkdtempSync(path.join(process.env.BENCH_CACHE_DIR || os.tmpdir(), 'bench-adapter-fetch-cache-'));
  const passed = Object.fromEntries(Object.entries(process.env).filter(([k]) => k === 'S3_PART_SIZE' || k === 'S3_MAX_CONCURRENCY')) as Record<string, string>;
  const runs = writes.map((w) => ({ writes: w, ms: [] as number[] }));
  let k = 0;
  const fetchOnce = async (w: string): Promise<number> => {
    const cache = path.join(root, String(k++));
    const cfg = loadConfig({ ...S3RVER_CREDS, AWS_ENDPOINT_URL: endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache, LORA_URI: `s3://${BUCKET}/adapters/`, LOG_LEVEL: 'silent', ...passed });
    const src = new AdapterSource(cfg, silentLogger(), undefined, { writesAtOnce: bound(w) });
    try {
      const t0 = performance.now();
      const [ref] = await src.resolve([{ name: NAME, scale: 1 }]);
      const ms = performance.now() - t0;
      if (!ref || statSync(ref.file).size !== envNumber('BENCH_BYTES', 0)) throw new Error(`the fetched adapter is not whole: ${ref?.file}`);
      return ms;
    } finally {
      await src.close();
      await fsp.rm(cache, { recursive: true, force: true });
    }
  };
  try {
    await fetchOnce(writes[0]!);
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < writes.length; i++) {
        const j = (i + r) % writes.length;
        const w = writes[j]!;
        const ms = await fetchOnce(w);
        runs[j]!.ms.push(Math.round(ms));
        process.stderr.write(`bench-adapter-fetch: pool ${process.env.UV_THREADPOOL_SIZE ?? 4}, writes ${w}: ${Math.round(ms)} ms\n`);
      }
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
  process.stdout.write(`${JSON.stringify({ pool: Number(process.env.UV_THREADPOOL_SIZE ?? 4), auto: adapterWritesAtOnce(), runs } satisfies PoolResult)}\n`);
}

/** The adapter's bytes: deterministic, written in 16 MiB blocks (no buffer of the whole size). */
async function writeAdapter(file: string, bytes: number): Promise<void> {
  const out = createWriteStream(file);
  const block = Buffer.allocUnsafe(16 << 20);
  let x = 0x9e3779b9;
  for (let i = 0; i < block.length; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    block.writeUInt32LE(x, i);
  }
  for (let at = 0; at < bytes; at += block.length) {
    const n = Math.min(block.length, bytes - at);
    if (!out.write(n === block.length ? block : block.subarray(0, n))) await new Promise<void>((r) => out.once('drain', () => r()));
  }
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
}

async function main(): Promise<void> {
  const bytes = Math.round(envNumber('BENCH_MB', 256) * MB);
  const pools = (process.env.BENCH_POOLS || '16,4').split(',').map(Number);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-adapter-fetch-'));
  const children: Array<ReturnType<typeof spawn>> = [];
  try {
    const file = path.join(tmp, 'pytorch_lora_weights.safetensors');
    await writeAdapter(file, bytes);
    const s3 = startChild(process.execPath, [SELF, 's3rver', path.join(tmp, 's3')], /PORT \d+/);
    children.push(s3.child);
    const endpoint = `http://127.0.0.1:${/PORT (\d+)/.exec(await s3.up)![1]}`;
    const { PutObjectCommand, S3Client } = await import('@aws-sdk/client-s3');
    const up = new S3Client({ endpoint, region: S3RVER_CREDS.AWS_REGION, forcePathStyle: true,
      credentials: { accessKeyId: S3RVER_CREDS.AWS_ACCESS_KEY_ID, secretAccessKey: S3RVER_CREDS.AWS_SECRET_ACCESS_KEY },
      requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' });
    await up.send(new PutObjectCommand({ Bucket: BUCKET, Key: `adapters/${NAME}/pytorch_lora_weights.safetensors`, Body: createReadStream(file), ContentLength: bytes }));
    up.destroy();
    const results: PoolResult[] = [];
    for (const pool of pools) {
      const env = { ...process.env, ...S3RVER_CREDS, UV_THREADPOOL_SIZE: String(pool), BENCH_BYTES: String(bytes) };
      const child = spawn(process.execPath, [SELF, 'fetches', endpoint], { env, stdio: ['ignore', 'pipe', 'inherit'] });
      children.push(child);
      let out = '';
      child.stdout!.on('data', (d) => (out += d));
      const code = await new Promise<number | null>((r) => child.once('exit', r));
      if (code !== 0) throw new Error(`the fetches with a pool of ${pool} exited ${code}`);
      results.push(lastJson(out) as unknown as PoolResult);
    }
    const part = process.env.S3_PART_SIZE ?? String(8 << 20);
    console.log(`adapter of ${bytes / MB} MB, S3_PART_SIZE ${part}, S3_MAX_CONCURRENCY ${process.env.S3_MAX_CONCURRENCY ?? 24}, cores ${os.availableParallelism()}`);
    for (const r of results) {
      const offRuns = r.runs.find((x) => x.writes === 'off');
      const off = offRuns ? median(offRuns.ms) : undefined;
      console.log(`\nUV_THREADPOOL_SIZE ${r.pool} (auto: ${r.auto} writes at once)`);
      // Beside the ratio of the medians, the median of each round's own ratio: a round's runs follow one another, so
      // they share the machine's load more than runs rounds apart do.
      console.log(`${'writes'.padEnd(10)}${'median ms'.padStart(10)}${off !== undefined ? `${'/ off'.padStart(8)}${'per round'.padStart(11)}` : ''}  runs (ms)`);
      for (const { writes: w, ms } of r.runs) {
        const m = median(ms);
        const paired = offRuns ? median(ms.map((x, i) => x / offRuns.ms[i]!)) : NaN;
        console.log(`${(w === 'auto' ? `auto (${r.auto})` : w).padEnd(10)}${String(Math.round(m)).padStart(10)}${off !== undefined ? `${(m / off).toFixed(2).padStart(8)}${paired.toFixed(2).padStart(11)}` : ''}  ${ms.join(' ')}`);
      }
    }
    console.log(JSON.stringify({ bench: 'adapter-fetch', mb: bytes / MB, partSize: Number(part), results }));
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    rmSync(tmp, { recursive: true, force: true });
  }
}

const [mode, ...args] = process.argv.slice(2);
await (mode === 's3rver' ? childS3rver(args[0]!, BUCKET) : mode === 'fetches' ? childFetches(args[0]!) : main()).catch((e: unknown) => {
  process.stderr.write(`bench-adapter-fetch: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
