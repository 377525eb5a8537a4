/**
 * @module A fill while this process's main thread is held (`npm run bench:held`, i.e. `node dist/scripts/bench-held.js`):
 * whether the range watchdog takes the runtime's own pauses for S3's silence (src/storage/silence.ts; method and
 * results in docs/FAULTS.md). The store is s3rver behind a paced link (test/helpers/fault-link.ts, no faults), both in
 * a child process, so that its bytes keep coming while this process is held, as a real S3's do. Each run fills a new
 * cache with one object of BENCH_MB (64) MiB in 1 MiB ranges, 8 at a time, each connection paced at BENCH_CONN_MBPS
 * (2) MB/s, S3_STALL_TIMEOUT_S=BENCH_STALL_S (0.5). A held run blocks the main thread for BENCH_HOLD_MS (800) after
 * every BENCH_GAP_MS (400) it runs: a synchronous task of that length. Unheld and held runs alternate, BENCH_RUNS (3)
 * of each per transport. Prints each run (time, ranges given up as stalled, GETs, bytes read again), the medians with
 * held / unheld, then one JSON line.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { loadConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { resolveModel } from '../src/storage/fetch.js';
import { envNumber, median, S3RVER_CREDS } from './bench-common.js';
import { type FaultLink, startFaultLink } from '../test/helpers/fault-link.js';

const SELF = fileURLToPath(import.meta.url);
const BUCKET = 'models';
const KEY = 'held/unet/model.onnx_data';
const MiB = 1 << 20;
const SIZE = envNumber('BENCH_MB', 64) * MiB;
const RUNS = envNumber('BENCH_RUNS', 3);
const HOLD_MS = envNumber('BENCH_HOLD_MS', 800);
const GAP_MS = envNumber('BENCH_GAP_MS', 400);
const STALL_S = envNumber('BENCH_STALL_S', 0.5);

/** Child mode: s3rver holding the object, and the paced link in front of it; prints `LINK port`, answers `stats`. */
async function store(dir: string): Promise<void> {
  const S3rver = createRequire(import.meta.url)('s3rver') as new (o: Record<string, unknown>) => { run(): Promise<AddressInfo> };
  const s3 = await new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: dir, configureBuckets: [{ name: BUCKET }] }).run();
  const up = new S3Client({ endpoint: `http://127.0.0.1:${s3.port}`, region: S3RVER_CREDS.AWS_REGION, forcePathStyle: true,
    credentials: { accessKeyId: S3RVER_CREDS.AWS_ACCESS_KEY_ID, secretAccessKey: S3RVER_CREDS.AWS_SECRET_ACCESS_KEY } });
  const body = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) body.writeUInt32LE((i * 2654435761) >>> 0, i);
  await up.send(new PutObjectCommand({ Bucket: BUCKET, Key: KEY, Body: body }));
  up.destroy();
  const link: FaultLink = await startFaultLink(s3.port, { seed: 1, pace: { connBps: envNumber('BENCH_CONN_MBPS', 2) * 1e6 } });
  process.on('message', () => process.send!({ bodyBytes: link.stats.bodyBytes, gets: link.stats.gets }));
  process.send!({ port: link.port });
}

/** Holds the main thread HOLD_MS after every GAP_MS, from the check phase (as a synchronous task), until stopped. */
function holding(): { stop(): Promise<number> } {
  let on = true;
  let holds = 0;
  const done = (async () => {
    while (on) {
      await new Promise((r) => setTimeout(r, GAP_MS));
      if (!on) break;
      await new Promise<void>((r) => setImmediate(() => {
        const end = performance.now() + HOLD_MS;
        while (performance.now() < end);
        holds++;
        r();
      }));
    }
  })();
  return { stop: async () => ((on = false), await done, holds) };
}

interface Run { transport: string; held: boolean; s: number; holds: number; stalled: number; gets: number; readAgainMB: number }

async function main(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-held-'));
  await fsp.mkdir(path.join(tmp, 's3'));
  const child: ChildProcess = fork(SELF, ['store', path.join(tmp, 's3')], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  let exited: ((e: Error) => void) | undefined;
  child.once('exit', (code) => exited?.(new Error(`the store exited (${code})`)));
  try {
    const next = () => new Promise<Record<string, number>>((resolve, reject) => {
      exited = reject;
      child.once('message', (m) => resolve(m as Record<string, number>));
    });
    const { port } = await next();
    const linkStats = () => {
      const p = next();
      child.send('stats');
      return p;
    };
    Object.assign(process.env, S3RVER_CREDS);
    process.stdout.write(`bench-held: ${SIZE / MiB} MiB in 1 MiB ranges, 8 at a time, ${envNumber('BENCH_CONN_MBPS', 2)} MB/s a connection, `
      + `S3_STALL_TIMEOUT_S=${STALL_S}; held runs: ${HOLD_MS} ms held after every ${GAP_MS} ms\n`);
    const runs: Run[] = [];
    for (const transport of ['lite', 'sdk'] as const) {
      for (let i = 0; i < RUNS * 2; i++) {
        const held = i % 2 === 1;
        const lines: Array<Record<string, unknown>> = [];
        const log = createLogger('info', 'bench-held', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
        const cache = mkdtempSync(path.join(tmp, 'cache-'));
        const cfg = loadConfig({ ...S3RVER_CREDS, AWS_ENDPOINT_URL: `http://127.0.0.1:${port}`, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache, LOG_LEVEL: 'silent',
          S3_TRANSPORT: transport, S3_PART_SIZE: String(MiB), S3_MAX_CONCURRENCY: '8', S3_STALL_TIMEOUT_S: String(STALL_S), S3_MAX_ATTEMPTS: '8' });
        const before = await linkStats();
        const h = held ? holding() : undefined;
        const t0 = performance.now();
        await resolveModel(`s3://${BUCKET}/held/`, { cfg, log });
        const s = (performance.now() - t0) / 1000;
        const holds = (await h?.stop()) ?? 0;
        const after = await linkStats();
        const run: Run = {
          transport, held, s, holds, gets: after.gets! - before.gets!,
          stalled: lines.filter((l) => l.msg === 'range failed; resuming' && l.reason === 'stalled').length,
          readAgainMB: (after.bodyBytes! - before.bodyBytes! - SIZE) / 1e6,
        };
        runs.push(run);
        process.stdout.write(`  ${transport} ${held ? 'held  ' : 'unheld'} ${s.toFixed(2)} s, ${holds} holds, ${run.stalled} ranges given up as stalled, ${run.gets} GETs, ${run.readAgainMB.toFixed(2)} MB read again\n`);
        rmSync(cache, { recursive: true, force: true });
      }
    }
    const summary: Record<string, unknown> = {};
    process.stdout.write('\n| transport | unheld (median) | held (median) | held / unheld | ranges given up, held runs | MB read again, held runs |\n|---|---|---|---|---|---|\n');
    for (const transport of ['lite', 'sdk']) {
      const of = (held: boolean) => runs.filter((r) => r.transport === transport && r.held === held);
      const u = median(of(false).map((r) => r.s));
      const hm = median(of(true).map((r) => r.s));
      const stalled = of(true).map((r) => r.stalled);
      const again = of(true).map((r) => r.readAgainMB.toFixed(2));
      process.stdout.write(`| ${transport} | ${u.toFixed(2)} s | ${hm.toFixed(2)} s | ${(hm / u).toFixed(2)} | ${stalled.join(', ')} | ${again.join(', ')} |\n`);
      summary[transport] = { unheldS: u, heldS: hm, ratio: hm / u, stalledHeld: stalled, stalledUnheld: of(false).map((r) => r.stalled), readAgainMBHeld: of(true).map((r) => r.readAgainMB) };
    }
    process.stdout.write(`${JSON.stringify({ bench: 'held', sizeMiB: SIZE / MiB, holdMs: HOLD_MS, gapMs: GAP_MS, stallS: STALL_S, ...summary })}\n`);
  } finally {
    child.kill();
    rmSync(tmp, { recursive: true, force: true });
  }
}

const [mode, dir] = process.argv.slice(2);
if (mode === 'store') await store(dir!);
else {
  await main().catch((e: unknown) => {
    process.stderr.write(`bench: ${(e as Error).stack ?? String(e)}\n`);
    process.exitCode = 1;
  });
}
