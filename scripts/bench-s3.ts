/**
 * @module S3 → cache benchmark (`npm run bench:s3`, i.e. `node dist/scripts/bench-s3.js`).
 * Generates a 600 MB SD-shaped model (deterministic bytes) in a temp dir, serves it from s3rver behind
 * ../shared/tools/throttle-proxy.mjs (15 MB/s per connection, 150 MB/s total, 40 ms then 150 ms TTFB) and
 * compares, in one run: the link's ceiling (a lean raw-HTTP client discarding bytes), a naive client (one
 * GetObject per file, one at a time), aws-cli / rclone when installed, and the warm-up CLI cold and as a hit.
 * Every client runs in its own process; s3rver and the proxy too. Everything lives in a temp dir removed at the end.
 * Env: BENCH_MB (default 600), BENCH_TTFBS (default "40,150"), BENCH_REPEAT (default 2: ceiling and warm-up
 * alternate, the best run of each is compared, all runs are printed), BENCH_CLIENTS (default all:
 * ceiling,naive,aws-cli,rclone,warmup; `warmup-unchecked` adds a cold warm-up with S3_VERIFY_CONTENT=0 after each checked
 * one, and a line with what the content check costs), THROTTLE_PROXY (path to the proxy script), S3_TRANSPORT (the warm-up CLI's:
 * sdk, the default, or lite).
 * The link is shared with s3rver and the proxy on the same cores (and with anything else running there),
 * so single runs are noisy; the ceiling is measured in the same run for that reason.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createReadStream, createWriteStream, existsSync, mkdtempSync, promises as fsp, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { childS3rver, freePort, lastJson, S3RVER_CREDS, startChild } from './bench-common.js';
import { type ModelFile, modelShape, writeModel } from '../test/helpers/fault-suite.js';
import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';

const SELF = fileURLToPath(import.meta.url);
const ROOT = process.cwd();
const CREDS = S3RVER_CREDS;
const MB = 1e6;
const BUCKET = 'models';
const PREFIX = 'sd15/';

interface RunResult { code: number | null; stdout: string; stderr: string; wallS: number; peakRssMb?: number; cpuS?: number }

/** Runs a child to completion; peak RSS from /usr/bin/time -v when present, else by polling VmHWM. */
function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, measureRss = false): Promise<RunResult> {
  const timeBin = measureRss && existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;
  const [c, a] = timeBin ? [timeBin, ['-v', cmd, ...args]] : [cmd, args];
  return new Promise((resolve) => {
    const t0 = performance.now();
    const child = spawn(c, a, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let hwm = 0;
    const poll = measureRss && !timeBin ? setInterval(() => {
      try {
        const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
        if (m) hwm = Math.max(hwm, Number(m[1]) / 1024);
      } catch { /* exited */ }
    }, 20) : undefined;
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (code) => {
      if (poll) clearInterval(poll);
      const wallS = (performance.now() - t0) / 1000;
      const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      const peakRssMb = m ? Number(m[1]) / 1024 : hwm || undefined;
      const user = /User time \(seconds\): ([\d.]+)/.exec(stderr);
      const sys = /System time \(seconds\): ([\d.]+)/.exec(stderr);
      const cpuS = user && sys ? Number(user[1]) + Number(sys[1]) : undefined;
      resolve({ code, stdout, stderr, wallS, ...(peakRssMb !== undefined ? { peakRssMb } : {}), ...(cpuS !== undefined ? { cpuS } : {}) });
    });
  });
}

// ---- child modes ------------------------------------------------------------------------------------


/** The link's ceiling: raw keep-alive HTTP, `conc` ranged GETs of `part` bytes in flight, bytes discarded. */
async function childCeiling(endpoint: string, filesJson: string, conc: number, part: number): Promise<void> {
  const files = JSON.parse(filesJson) as ModelFile[];
  const agent = new http.Agent({ keepAlive: true, maxSockets: conc });
  const u = new URL(endpoint);
  const ranges: Array<{ key: string; start: number; end: number }> = [];
  for (const f of files) for (let s = 0; s < f.size; s += part) ranges.push({ key: `/${BUCKET}/${PREFIX}${f.rel}`, start: s, end: Math.min(f.size, s + part) - 1 });
  let next = 0;
  let bytes = 0;
  const t0 = performance.now();
  const one = (r: (typeof ranges)[number]) => new Promise<void>((resolve, reject) => {
    http.get({ host: u.hostname, port: u.port, path: r.key, agent, headers: { range: `bytes=${r.start}-${r.end}` } }, (res) => {
      let got = 0;
      res.on('data', (c: Buffer) => (got += c.length));
      // 'close' without a complete body (a dropped connection) is a failure, never a silent hang.
      res.on('close', () => {
        if (res.statusCode === 206 && got === r.end - r.start + 1) {
          bytes += got;
          resolve();
        } else reject(new Error(`range ${r.key} ${r.start}-${r.end}: status ${res.statusCode}, ${got} bytes`));
      });
    }).on('error', reject);
  });
  await Promise.all(Array.from({ length: conc }, async () => {
    while (next < ranges.length) {
      const r = ranges[next++]!;
      // One retry, so a rare dropped connection does not void the whole measurement.
      await one(r).catch(() => one(r));
    }
  }));
  const seconds = (performance.now() - t0) / 1000;
  agent.destroy();
  process.stdout.write(`${JSON.stringify({ bytes, seconds })}\n`);
}

/** What a first implementation does: list, then one GetObject per file, one file at a time, piped to disk. */
async function childNaive(endpoint: string, out: string): Promise<void> {
  const c = new S3Client({ endpoint, region: 'us-east-1', forcePathStyle: true, requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' });
  const t0 = performance.now();
  const list = await c.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: PREFIX }));
  let bytes = 0;
  for (const o of list.Contents ?? []) {
    const abs = path.join(out, o.Key!.slice(PREFIX.length));
    await fsp.mkdir(path.dirname(abs), { recursive: true });
    const res = await c.send(new GetObjectCommand({ Bucket: BUCKET, Key: o.Key! }));
    await pipeline(res.Body as NodeJS.ReadableStream, createWriteStream(abs));
    bytes += o.Size ?? 0;
  }
  const seconds = (performance.now() - t0) / 1000;
  c.destroy();
  process.stdout.write(`${JSON.stringify({ bytes, seconds })}\n`);
}

// ---- orchestration ----------------------------------------------------------------------------------

interface Row { ttfbMs: number; client: string; seconds: number; wallS: number; mbps: number; peakRssMb?: number; cpuS?: number; note?: string }

async function main(): Promise<void> {
  const totalMb = Number(process.env.BENCH_MB ?? 600);
  const ttfbs = (process.env.BENCH_TTFBS ?? '40,150').split(',').map(Number);
  const repeat = Math.max(1, Number(process.env.BENCH_REPEAT ?? 2));
  const clients = (process.env.BENCH_CLIENTS ?? 'ceiling,naive,aws-cli,rclone,warmup').split(',');
  const proxyScript = process.env.THROTTLE_PROXY ?? path.resolve(ROOT, '../shared/tools/throttle-proxy.mjs');
  if (!existsSync(proxyScript)) throw new Error(`throttle proxy not found at ${proxyScript}; set THROTTLE_PROXY`);
  const warmupCli = path.resolve(ROOT, 'dist/warmup/main.js');
  if (!existsSync(warmupCli)) throw new Error('dist/warmup/main.js is missing; run `npm run build` first');

  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-s3-'));
  const children: Array<{ kill(s?: NodeJS.Signals): boolean }> = [];
  const cleanup = () => {
    for (const c of children) c.kill('SIGTERM');
    rmSync(tmp, { recursive: true, force: true });
  };
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const rows: Row[] = [];
  try {
    const files = modelShape(totalMb * MB);
    const total = files.reduce((s, f) => s + f.size, 0);
    process.stderr.write(`bench: generating ${(total / MB).toFixed(0)} MB model in ${tmp}\n`);
    const src = path.join(tmp, 'model');
    await writeModel(src, files);

    const s3d = startChild(process.execPath, [SELF, 's3rver', path.join(tmp, 's3rver')], /PORT \d+/);
    children.push(s3d.child);
    let s3port = 0;
    s3d.child.stdout!.on('data', (c: Buffer) => {
      const m = /PORT (\d+)/.exec(String(c));
      if (m) s3port = Number(m[1]);
    });
    await s3d.up;
    const direct = `http://127.0.0.1:${s3port}`;
    const up = new S3Client({ endpoint: direct, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
      requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED' });
    for (const f of files) {
      await up.send(new PutObjectCommand({ Bucket: BUCKET, Key: PREFIX + f.rel, Body: createReadStream(path.join(src, f.rel)), ContentLength: f.size }));
    }
    up.destroy();
    process.stderr.write(`bench: uploaded to s3rver on ${s3port}\n`);
    await fsp.rm(src, { recursive: true });

    const awsOk = spawnSync('aws', ['--version'], { stdio: 'ignore' }).status === 0;
    const rcloneOk = spawnSync('rclone', ['version'], { stdio: 'ignore' }).status === 0;
    const baseEnv: NodeJS.ProcessEnv = { ...process.env, ...CREDS };
    // rclone refuses any AWS_CA_BUNDLE with its own HTTP transport; the benchmark's endpoint is plain HTTP.
    const rcloneEnv: NodeJS.ProcessEnv = { ...baseEnv, AWS_CA_BUNDLE: undefined };

    for (const ttfb of ttfbs) {
      const pport = await freePort();
      const proxy = startChild(process.execPath, [proxyScript, '--listen', String(pport), '--upstream', `127.0.0.1:${s3port}`, '--conn-mbps', '15', '--total-mbps', '150', '--ttfb-ms', String(ttfb)], /throttle-proxy on/);
      children.push(proxy.child);
      await proxy.up;
      const endpoint = `http://127.0.0.1:${pport}`;
      const row = (client: string, r: RunResult, seconds: number, extra: Partial<Row> = {}) => {
        const x: Row = { ttfbMs: ttfb, client, seconds: +seconds.toFixed(2), wallS: +r.wallS.toFixed(2), mbps: +(total / MB / seconds).toFixed(1), ...extra };
        if (r.peakRssMb !== undefined) x.peakRssMb = +r.peakRssMb.toFixed(0);
        if (r.cpuS !== undefined) x.cpuS = +r.cpuS.toFixed(2);
        rows.push(x);
        process.stderr.write(`bench: ttfb=${ttfb}ms ${client}: ${x.seconds}s ${x.mbps} MB/s${x.peakRssMb ? ` rss=${x.peakRssMb}MB` : ''}${x.cpuS !== undefined ? ` cpu=${x.cpuS}s` : ''}\n`);
      };
      const check = (name: string, r: RunResult) => {
        if (r.code !== 0) throw new Error(`${name} failed (${r.code}): ${r.stderr.slice(-800)}`);
      };

      const conc = Number(process.env.BENCH_CEILING_CONCURRENCY ?? 24);
      const want = (c: string) => clients.includes(c);
      const ceilingRun = async () => {
        const ceil = await run(process.execPath, [SELF, 'ceiling', endpoint, JSON.stringify(files), String(conc), String(8 * 1024 * 1024)], baseEnv, true);
        check('ceiling', ceil);
        row('ceiling', ceil, Number(lastJson(ceil.stdout).seconds));
      };
      const warmupRun = async (rep: number, verify = true) => {
        const cache = path.join(tmp, `cache-${ttfb}-${rep}`);
        const wenv = { ...baseEnv, STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, AWS_ENDPOINT_URL: endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache, LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'warn',
          S3_VERIFY_CONTENT: verify ? '1' : '0' };
        const cold = await run(process.execPath, [warmupCli], wenv, true);
        if (process.env.BENCH_LOG_LEVEL) process.stderr.write(cold.stderr.split('\n').filter((l) => l.startsWith('{')).join('\n') + '\n');
        check('warmup (cold)', cold);
        const cj = lastJson(cold.stdout);
        if (cj.fromCache !== false || cj.bytes !== total) throw new Error(`warm-up cold run reported ${JSON.stringify(cj)}`);
        if (!verify) {
          row('warmup cold, unchecked', cold, Number(cj.seconds));
          await fsp.rm(cache, { recursive: true, force: true });
          return;
        }
        row('warmup cold', cold, Number(cj.seconds));
        const hit = await run(process.execPath, [warmupCli], wenv, true);
        check('warmup (hit)', hit);
        const hj = lastJson(hit.stdout);
        if (hj.fromCache !== true) throw new Error(`second warm-up was not a cache hit: ${JSON.stringify(hj)}`);
        row('warmup hit', hit, Number(hj.seconds), { mbps: NaN, note: 'cache hit: LIST + ETag compare' });
        await fsp.rm(cache, { recursive: true, force: true });
      };
      for (let rep = 0; rep < repeat; rep++) {
        if (want('ceiling')) await ceilingRun();
        if (want('warmup')) await warmupRun(rep);
        if (want('warmup-unchecked')) await warmupRun(rep, false);
      }

      if (want('naive')) {
        const naiveDir = path.join(tmp, `naive-${ttfb}`);
        const naive = await run(process.execPath, [SELF, 'naive', endpoint, naiveDir], baseEnv, true);
        check('naive', naive);
        row('naive', naive, Number(lastJson(naive.stdout).seconds));
        await fsp.rm(naiveDir, { recursive: true, force: true });
      }

      if (!want('aws-cli')) { /* not asked for */ } else if (awsOk) {
        const awsDir = path.join(tmp, `aws-${ttfb}`);
        const aws = await run('aws', ['s3', 'cp', `s3://${BUCKET}/${PREFIX}`, awsDir, '--recursive', '--endpoint-url', endpoint, '--no-progress', '--only-show-errors'], baseEnv, true);
        check('aws-cli', aws);
        row('aws-cli', aws, aws.wallS, { note: 'defaults (max_concurrent_requests=10, 8 MB chunks); wall time incl. start' });
        await fsp.rm(awsDir, { recursive: true, force: true });
      } else rows.push({ ttfbMs: ttfb, client: 'aws-cli', seconds: NaN, wallS: NaN, mbps: NaN, note: 'not installed: skipped' });
      if (!want('rclone')) { /* not asked for */ } else if (rcloneOk) {
        const rcDir = path.join(tmp, `rclone-${ttfb}`);
        const rc = await run('rclone', ['copy', `:s3:${BUCKET}/${PREFIX}`, rcDir, '--s3-provider', 'Other', '--s3-endpoint', endpoint, '--s3-access-key-id', 'S3RVER', '--s3-secret-access-key', 'S3RVER', '--transfers', '16', '--multi-thread-streams', '16', '--multi-thread-cutoff', '16M'], rcloneEnv, true);
        check('rclone', rc);
        row('rclone', rc, rc.wallS, { note: 'wall time incl. start' });
        await fsp.rm(rcDir, { recursive: true, force: true });
      } else rows.push({ ttfbMs: ttfb, client: 'rclone', seconds: NaN, wallS: NaN, mbps: NaN, note: 'not installed: skipped' });

      proxy.child.kill('SIGTERM');
    }

    // ---- report: the best run of each client (least disturbed by whatever else shares the cores)
    const best = (client: string, t: number): Row | undefined => rows.filter((x) => x.client === client && x.ttfbMs === t)
      .sort((a, b) => a.seconds - b.seconds)[0];
    const pad = (s: string, n: number) => s.padEnd(n);
    const lines = [`model ${(total / MB).toFixed(0)} MB (${files.length} files), link 15 MB/s per connection, 150 MB/s total`,
      `${pad('client', 14)}${ttfbs.map((t) => pad(`ttfb ${t}ms: s / MB/s / RSS MB`, 34)).join('')}`];
    for (const client of ['ceiling', 'naive', 'aws-cli', 'rclone', 'warmup cold', 'warmup hit']) {
      const cells = ttfbs.map((t) => {
        const r = best(client, t);
        if (!r) return pad('-', 34);
        if (Number.isNaN(r.seconds)) return pad(r.note ?? '-', 34);
        return pad(`${r.seconds.toFixed(2)} / ${Number.isNaN(r.mbps) ? '-' : r.mbps.toFixed(1)} / ${r.peakRssMb ?? '-'}`, 34);
      });
      lines.push(`${pad(client, 14)}${cells.join('')}`);
    }
    const summary = ttfbs.map((t) => {
      const get = (c: string) => best(c, t);
      const w = get('warmup cold') ?? ({ mbps: NaN } as Row);
      const ceiling = get('ceiling') ?? ({ mbps: NaN } as Row);
      const peers = rows.filter((x) => x.ttfbMs === t && ['naive', 'aws-cli', 'rclone'].includes(x.client) && !Number.isNaN(x.mbps));
      const top = peers.sort((a, b) => b.mbps - a.mbps)[0];
      return {
        ttfbMs: t, warmupMBps: w.mbps, ceilingMBps: ceiling.mbps, ratioToCeiling: +(w.mbps / ceiling.mbps).toFixed(3),
        bestPeer: top?.client, bestPeerMBps: top?.mbps, ratioToBestPeer: top ? +(w.mbps / top.mbps).toFixed(2) : undefined,
        warmupPeakRssMb: Math.max(...rows.filter((x) => x.ttfbMs === t && x.client.startsWith('warmup')).map((x) => x.peakRssMb ?? 0)),
        allRuns: rows.filter((x) => x.ttfbMs === t && (x.client === 'ceiling' || x.client === 'warmup cold')).map((x) => `${x.client}:${x.mbps}`).join(' '), hitSeconds: get('warmup hit')?.seconds, hitWallS: get('warmup hit')?.wallS,
      };
    });
    for (const t of ttfbs) {
      const [c, u] = [best('warmup cold', t), best('warmup cold, unchecked', t)];
      if (c && u) {
        const cpu = (x: Row) => rows.filter((r) => r.ttfbMs === t && r.client === x.client).map((r) => r.cpuS).join(', ');
        lines.push(`ttfb ${t}ms: content check: checked ${c.mbps} MB/s vs unchecked ${u.mbps} MB/s = ${(c.mbps / u.mbps).toFixed(3)}; client CPU-s checked ${cpu(c)}, unchecked ${cpu(u)}`);
      }
    }
    for (const s of summary) {
      lines.push(`ttfb ${s.ttfbMs}ms: warmup/ceiling = ${s.ratioToCeiling} (target >= 0.92), warmup/${s.bestPeer} = ${s.ratioToBestPeer}x, peak RSS ${s.warmupPeakRssMb} MB (target <= 200), hit ${s.hitSeconds}s in-process / ${s.hitWallS}s with Node start (target < 1 s); runs: ${s.allRuns}`);
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify({ bench: 's3', modelBytes: total, files: files.length, cores: os.cpus().length, rows, summary })}\n`);
  } finally {
    cleanup();
  }
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 's3rver') await childS3rver(args[0]!, BUCKET);
else if (mode === 'ceiling') {
  await childCeiling(args[0]!, args[1]!, Number(args[2]), Number(args[3])).catch((e: unknown) => {
    process.stderr.write(`ceiling: ${(e as Error).message}\n`);
    process.exitCode = 1;
  });
}
else if (mode === 'naive') await childNaive(args[0]!, args[1]!);
else await main().catch((e: unknown) => {
  process.stderr.write(`bench: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
