/**
 * @module Serving benchmark (`npm run bench:serve`, i.e. `node dist/scripts/bench-serve.js`), on the embedded demo model:
 *   (a) server overhead: V1 predict through HTTP (the spawned server) vs the same Pipeline called in this process,
 *       same size/steps/seed, PNG encoding included on both sides; median of BENCH_RUNS, runs interleaved;
 *   (b) health route throughput: autocannon on `/v2/health/live` of our server vs a plain node:http server (its own
 *       process) answering the same JSON, same run, same settings;
 *   (c) batching: images/s at MAX_BATCH_SIZE 1 vs 4 under 8 concurrent clients, a bounded number of images.
 * Env: BENCH_RUNS (10), BENCH_SIZE (512), BENCH_STEPS (20), BENCH_DURATION_S (5), BENCH_BATCH_IMAGES (32),
 * BENCH_BATCH_SIZE_PX (256), BENCH_ORDER (interleaved | blocks). Servers run with EXECUTION_PROVIDER=cpu, like the in-process side. Prints a table, then one JSON line with every number.
 * Everything shares the machine's cores; run it on an otherwise idle machine for stable numbers.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { ensureDemoModel } from '../src/demo/index.js';
import { encodeImage } from '../src/pipeline/image.js';
import { readLayout } from '../src/pipeline/model.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { Pipeline, type Sessions } from '../src/pipeline/pipeline.js';
import { envNumber, median, startBenchServer } from './bench-common.js';

const env = envNumber;
const RUNS = env('BENCH_RUNS', 10);
const SIZE = env('BENCH_SIZE', 512);
const STEPS = env('BENCH_STEPS', 20);
const DURATION = env('BENCH_DURATION_S', 5);
const BATCH_IMAGES = env('BENCH_BATCH_IMAGES', 32);
const BATCH_PX = env('BENCH_BATCH_SIZE_PX', 256);
const CLIENTS = 8;

interface AutocannonResult { requests: { average: number; total: number }; latency: { p50: number; p99: number }; errors: number; non2xx: number }
type Autocannon = (o: Record<string, unknown>) => Promise<AutocannonResult>;
const autocannon = createRequire(import.meta.url)('autocannon') as Autocannon;


/** The built server on the CPU with the demo model, no result cache, and `extra`. */
const startServer = (extra: Record<string, string>, cacheDir: string) =>
  startBenchServer({ ...process.env, STORAGE_URI: '', EXECUTION_PROVIDER: 'cpu', LOG_LEVEL: 'info', MODEL_CACHE_DIR: cacheDir, RESULT_CACHE_MB: '0', ...extra });

/** A plain node:http server in its own process answering {"live":true}: the floor for (b). */
function startPlainHttp(): Promise<{ url: string; stop(): void }> {
  const src = `const http=require('node:http');const body='{"live":true}';http.createServer((q,s)=>{s.writeHead(200,{'content-type':'application/json','content-length':body.length});s.end(body)}).listen(0,'127.0.0.1',function(){process.stdout.write(String(this.address().port)+'\\n')})`;
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, ['-e', src], { stdio: ['ignore', 'pipe', 'inherit'] });
    proc.stdout!.setEncoding('utf8').once('data', (p: string) => resolve({ url: `http://127.0.0.1:${p.trim()}`, stop: () => proc.kill() }));
  });
}

async function predict(url: string, inst: Record<string, unknown>): Promise<void> {
  const res = await fetch(`${url}/v1/models/model:predict`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ instances: [inst] }) });
  if (res.status !== 200) throw new Error(`predict: HTTP ${res.status} ${await res.text()}`);
  await res.arrayBuffer();
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-serve-'));
  const rows: Array<[string, string, string, string]> = [];
  const out: Record<string, unknown> = { size: SIZE, steps: STEPS, runs: RUNS };
  try {
    const dir = await ensureDemoModel(tmp);

    // (a) Server overhead.
    const layout = readLayout(dir);
    const factory = new SessionFactory({ ep: 'cpu', intraOpThreads: 0 });
    const sessions: Record<string, unknown> = {};
    for (const c of ['text_encoder', 'unet', 'vae_decoder'] as const) sessions[c] = (await factory.create(c, layout.onnx[c]!)).session;
    const pipe = await Pipeline.create(layout, sessions as unknown as Sessions);
    const shape = { steps: STEPS, guidance: 7.5, height: SIZE, width: SIZE, scheduler: undefined, eta: 0, guidanceRescale: 0 };
    const item = { prompt: 'a photo of a red fox in the snow', negativePrompt: undefined, seed: 1234, numImages: 1 };
    const inProcess = async () => {
      const t0 = performance.now();
      const { images } = await pipe.generate({ shape, items: [item] });
      await encodeImage(images[0]!.rgb, images[0]!.width, images[0]!.height, 'png');
      return performance.now() - t0;
    };
    const srv = await startServer({ WORKERS: '1', MAX_BATCH_SIZE: '1' }, tmp);
    const inst = { prompt: item.prompt, num_inference_steps: STEPS, height: SIZE, width: SIZE, seed: item.seed };
    const viaHttp = async () => {
      const t0 = performance.now();
      await predict(srv.url, inst);
      return performance.now() - t0;
    };
    await inProcess();
    await viaHttp();
    const tIn: number[] = [];
    const tHttp: number[] = [];
    // Interleaved by default, so drift on a shared machine hits both sides; BENCH_ORDER=blocks runs all HTTP runs first.
    if (process.env.BENCH_ORDER === 'blocks') {
      for (let i = 0; i < RUNS; i++) tHttp.push(await viaHttp());
      for (let i = 0; i < RUNS; i++) tIn.push(await inProcess());
    } else {
      for (let i = 0; i < RUNS; i++) {
        tHttp.push(await viaHttp());
        tIn.push(await inProcess());
      }
    }
    const mIn = median(tIn);
    const mHttp = median(tHttp);
    out.overhead = { inProcessMs: +mIn.toFixed(1), httpMs: +mHttp.toFixed(1), ratio: +(mHttp / mIn).toFixed(4), target: 1.03 };
    rows.push(['(a) predict median, in process', `${mIn.toFixed(1)} ms`, `${SIZE}x${SIZE}, ${STEPS} steps`, '']);
    rows.push(['(a) predict median, HTTP', `${mHttp.toFixed(1)} ms`, `ratio ${(mHttp / mIn).toFixed(3)}`, mHttp / mIn <= 1.03 ? 'target ≤ 1.03 met' : 'target ≤ 1.03 MISSED']);
    for (const s of Object.values(sessions)) await (s as { release(): Promise<void> }).release();

    // (b) Health route throughput, same settings for both servers.
    const plain = await startPlainHttp();
    const cannon = (url: string) => autocannon({ url, connections: 50, pipelining: 1, duration: DURATION });
    const ours = await cannon(`${srv.url}/v2/health/live`);
    const base = await cannon(`${plain.url}/`);
    plain.stop();
    await srv.stop();
    out.health = {
      oursReqPerS: Math.round(ours.requests.average), plainReqPerS: Math.round(base.requests.average), ratio: +(ours.requests.average / base.requests.average).toFixed(3),
      oursP99Ms: ours.latency.p99, plainP99Ms: base.latency.p99, errors: ours.errors + ours.non2xx + base.errors + base.non2xx,
    };
    rows.push(['(b) /v2/health/live, ours', `${Math.round(ours.requests.average)} req/s`, `p50 ${ours.latency.p50} ms, p99 ${ours.latency.p99} ms`, `${DURATION}s, 50 conns`]);
    rows.push(['(b) same reply, plain node:http', `${Math.round(base.requests.average)} req/s`, `p50 ${base.latency.p50} ms, p99 ${base.latency.p99} ms`, `ratio ${(ours.requests.average / base.requests.average).toFixed(2)}`]);

    // (c) Batching: the same bounded work at MAX_BATCH_SIZE 1 and 4.
    const batching: Record<string, number> = {};
    for (const mbs of [1, 4]) {
      const s = await startServer({ MAX_BATCH_SIZE: String(mbs), BATCH_WINDOW_MS: '50', MAX_QUEUE: '64' }, tmp);
      let next = 0;
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: CLIENTS }, async () => {
          for (let i = next++; i < BATCH_IMAGES; i = next++) await predict(s.url, { prompt: `image ${i}`, num_inference_steps: STEPS, height: BATCH_PX, width: BATCH_PX, seed: i });
        }),
      );
      const secs = (performance.now() - t0) / 1000;
      const metrics = await (await fetch(`${s.url}/metrics`)).text();
      const sum = Number(/^inference_batch_size_sum\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? NaN);
      const count = Number(/^inference_batch_size_count\{[^}]*\} (\S+)$/m.exec(metrics)?.[1] ?? NaN);
      await s.stop();
      batching[`mbs${mbs}ImagesPerS`] = +(BATCH_IMAGES / secs).toFixed(2);
      // The warm-up generation is not counted there.
      batching[`mbs${mbs}MeanBatch`] = +(sum / count).toFixed(2);
      rows.push([`(c) MAX_BATCH_SIZE=${mbs}, ${CLIENTS} clients`, `${(BATCH_IMAGES / secs).toFixed(2)} images/s`, `mean batch ${(sum / count).toFixed(2)}`, `${BATCH_IMAGES} images ${BATCH_PX}x${BATCH_PX}, ${STEPS} steps`]);
    }
    batching.speedup = +(batching.mbs4ImagesPerS! / batching.mbs1ImagesPerS!).toFixed(3);
    out.batching = batching;

    const w = [0, 1, 2, 3].map((c) => Math.max(...rows.map((r) => r[c]!.length)));
    for (const r of rows) console.log(r.map((x, i) => x.padEnd(w[i]!)).join('  '));
    console.log(JSON.stringify({ bench: 'serve', ...out }));
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
