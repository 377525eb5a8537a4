/**
 * @module Burst benchmark (`node dist/scripts/bench-burst.js`): BENCH_BURST_N servers (default 3) started at the same
 * moment on one empty cache, one s3:// model (the demo pipeline padded to BENCH_PAD_BYTES, default 100 MB), s3rver
 * behind ../shared/tools/throttle-proxy.mjs (15 MB/s per connection, 150 MB/s total, 40 ms TTFB, as bench-cold-start).
 * One server downloads (the holder: `files-ready` with fromCache false), the others wait for its commit. Per burst,
 * from the servers' own log lines (pino `time`, ms):
 *   holder_ready_ms  spawn → the holder's `ready`
 *   last_ready_ms    spawn → the last server's `ready` (the burst served at full strength)
 *   waiter_gap_ms    the last waiter's `ready` minus the holder's (what every replica but one pays on top)
 *   notice_ms        the last waiter's `files-ready` minus the holder's (how long the commit took to be seen)
 *   early            waiters whose first ONNX session existed before the holder's `files-ready` (began while waiting)
 * BENCH_BURST_BUILDS: comma-separated checkouts, each built (`npm run build`; `.` is this one), run in turn in every
 * rep, each on a fresh cache: medians side by side, and each against the first. BENCH_REPS (default 3).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchEntry, freePort, median, s3rverWithModel, S3RVER_CREDS, startChild } from './bench-common.js';
import { buildDemoModel } from '../src/demo/index.js';

const SELF = fileURLToPath(import.meta.url);
const ROOT = process.cwd();
const BUCKET = 'models';
const PREFIX = 'burst/';
const CREDS = S3RVER_CREDS;

interface Line { time?: string; event?: string; fromCache?: boolean; msg?: string; [k: string]: unknown }
interface Burst { holderReadyMs: number; lastReadyMs: number; gapMs: number; noticeMs: number; early: number }

const r0 = (x: number) => Math.round(x);
const at = (l: Line | undefined) => (l?.time ? Date.parse(l.time) : NaN);

/** N servers of the build at `root` spawned at once on an empty cache; resolves once all are ready (then stops them). */
async function burst(root: string, n: number, env: NodeJS.ProcessEnv): Promise<Burst> {
  const procs: Array<{ child: ChildProcess; lines: Line[]; spawned: number }> = [];
  for (let i = 0; i < n; i++) {
    const spawned = Date.now();
    const child = spawn(process.execPath, [path.join(root, 'dist/src/main.js')], { env, stdio: ['ignore', 'pipe', 'inherit'] });
    const lines: Line[] = [];
    let buf = '';
    child.stdout!.setEncoding('utf8').on('data', (c: string) => {
      buf += c;
      for (let k; (k = buf.indexOf('\n')) >= 0; buf = buf.slice(k + 1)) {
        try {
          lines.push(JSON.parse(buf.slice(0, k)) as Line);
        } catch {
          /* not a log line */
        }
      }
    });
    procs.push({ child, lines, spawned });
  }
  try {
    await Promise.all(procs.map((p) => new Promise<void>((resolve, reject) => {
      const t = setInterval(() => {
        if (p.lines.some((l) => l.event === 'ready')) return (clearInterval(t), resolve());
        const failed = p.lines.find((l) => l.event === 'state' && l.state === 'failed');
        if (failed || p.child.exitCode !== null) (clearInterval(t), reject(new Error(`a server failed: ${String(failed?.reason ?? p.child.exitCode)}`)));
      }, 10);
    })));
  } finally {
    for (const p of procs) p.child.kill('SIGTERM');
    await Promise.all(procs.map((p) => (p.child.exitCode !== null ? undefined : new Promise((r) => p.child.once('exit', r)))));
  }
  const ev = (p: (typeof procs)[number], name: string) => p.lines.find((l) => l.event === name);
  const holders = procs.filter((p) => ev(p, 'files-ready')?.fromCache === false);
  if (holders.length !== 1) throw new Error(`expected one server to download, got ${holders.length}`);
  const holder = holders[0]!;
  const waiters = procs.filter((p) => p !== holder);
  const last = (name: string) => Math.max(...waiters.map((w) => at(ev(w, name))));
  const early = waiters.filter((w) => at(ev(w, 'session')) < at(ev(holder, 'files-ready'))).length;
  return {
    holderReadyMs: at(ev(holder, 'ready')) - holder.spawned,
    lastReadyMs: Math.max(...procs.map((p) => at(ev(p, 'ready')))) - procs[0]!.spawned,
    gapMs: last('ready') - at(ev(holder, 'ready')),
    noticeMs: last('files-ready') - at(ev(holder, 'files-ready')),
    early,
  };
}

async function main(): Promise<void> {
  const reps = Number(process.env.BENCH_REPS ?? 3);
  const n = Number(process.env.BENCH_BURST_N ?? 3);
  const padBytes = Number(process.env.BENCH_PAD_BYTES ?? 100e6);
  const link = { conn: Number(process.env.BENCH_LINK_CONN_MBPS ?? 15), total: Number(process.env.BENCH_LINK_TOTAL_MBPS ?? 150), ttfb: Number(process.env.BENCH_LINK_TTFB_MS ?? 40) };
  const proxyScript = process.env.THROTTLE_PROXY ?? path.resolve(ROOT, '../shared/tools/throttle-proxy.mjs');
  const builds = (process.env.BENCH_BURST_BUILDS ?? '.').split(',').map((b) => path.resolve(ROOT, b.trim()));
  for (const b of builds) if (!existsSync(path.join(b, 'dist/src/main.js'))) throw new Error(`${b} has no dist/src/main.js (run \`npm run build\` there)`);
  if (!existsSync(proxyScript)) throw new Error(`${proxyScript} is missing (THROTTLE_PROXY names the proxy)`);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-burst-'));
  const children: ChildProcess[] = [];
  const say = (m: string) => process.stderr.write(`bench: ${m}\n`);
  try {
    const model = await buildDemoModel(path.join(tmp, 'model'), { padBytes });
    const s3 = await s3rverWithModel(SELF, path.join(tmp, 's3rver'), BUCKET, PREFIX, model, children);
    const s3port = s3.port;
    const pport = await freePort();
    const proxy = startChild(process.execPath, [proxyScript, '--listen', String(pport), '--upstream', `127.0.0.1:${s3port}`,
      '--conn-mbps', String(link.conn), '--total-mbps', String(link.total), '--ttfb-ms', String(link.ttfb)], /throttle-proxy on/);
    children.push(proxy.child);
    await proxy.up;
    const header = `burst of ${n} servers on one empty cache, demo model ${(model.totalBytes / 1e6).toFixed(0)} MB from s3rver via throttle proxy (${link.conn}/${link.total} MB/s, ${link.ttfb} ms TTFB), CPU, ${os.cpus().length} cores, ${reps} reps`;
    say(header);
    const results = builds.map(() => [] as Burst[]);
    for (let i = 0; i < reps; i++) {
      for (const [k, root] of builds.entries()) {
        const cache = path.join(tmp, `cache-${k}-${i}`);
        const r = await burst(root, n, {
          PATH: process.env.PATH, HOME: process.env.HOME, ...CREDS, AWS_ENDPOINT_URL: `http://127.0.0.1:${pport}`, S3_USE_HTTPS: '0',
          STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, MODEL_CACHE_DIR: cache, EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off', PORT: '0', LOG_LEVEL: 'info',
        });
        await fsp.rm(cache, { recursive: true, force: true });
        say(`rep ${i + 1} ${path.relative(ROOT, root) || '.'}: holder ready ${r0(r.holderReadyMs)} ms, all ready ${r0(r.lastReadyMs)} ms, last waiter +${r0(r.gapMs)} ms, commit seen +${r0(r.noticeMs)} ms, ${r.early}/${n - 1} waiters began sessions while waiting`);
        results[k]!.push(r);
      }
    }
    const med = (k: number, f: (b: Burst) => number) => median(results[k]!.map(f));
    const lines = [header, '| build | holder_ready_ms | last_ready_ms | vs first | waiter_gap_ms | notice_ms | early |', '|---|---:|---:|---:|---:|---:|---:|'];
    for (const [k, root] of builds.entries()) {
      const ratio = med(k, (b) => b.lastReadyMs) / med(0, (b) => b.lastReadyMs);
      lines.push(`| ${path.relative(ROOT, root) || '.'} | ${r0(med(k, (b) => b.holderReadyMs))} | ${r0(med(k, (b) => b.lastReadyMs))} | ${ratio.toFixed(2)} | ${r0(med(k, (b) => b.gapMs))} | ${r0(med(k, (b) => b.noticeMs))} | ${med(k, (b) => b.early)}/${n - 1} |`);
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify(Object.fromEntries(builds.map((root, k) => [path.relative(ROOT, root) || '.',
      { holderReadyMs: r0(med(k, (b) => b.holderReadyMs)), lastReadyMs: r0(med(k, (b) => b.lastReadyMs)), waiterGapMs: r0(med(k, (b) => b.gapMs)), noticeMs: r0(med(k, (b) => b.noticeMs)) }])))}\n`);
  } finally {
    for (const c of children) c.kill('SIGTERM');
    rmSync(tmp, { recursive: true, force: true });
  }
}

await benchEntry(main, BUCKET);
