/**
 * @module Cold-start benchmark (`npm run bench:cold-start`, i.e. `node dist/scripts/bench-cold-start.js`).
 * Fixture: the demo pipeline padded to ~300 MB of weights, uploaded into s3rver and served behind
 * ../shared/tools/throttle-proxy.mjs (15 MB/s per connection, 150 MB/s total, 40 ms TTFB). Every measurement is a
 * fresh process (`node dist/src/main.js`, never npm), repeated BENCH_REPS times (default 3), medians reported:
 *   liveness_ms    spawn → first 200 on /v2/health/live (polled every ~2 ms), over every server spawn of the run
 *                  (readiness is then polled every ~20 ms on one keep-alive connection)
 *   ready_miss_ms  spawn on an empty cache with STORAGE_URI=s3://… → /v2/health/ready 200
 *   sequential_ms  the baseline for a miss: warm-up CLI on an empty cache (spawn → exit) + a server on that cache → ready
 *   ready_hit_ms   spawn on a cache a previous server start filled → ready
 *   bare_ms        the baseline for a hit: scripts/bench-bare-boot.ts (the same CPU sessions + warm-up generation) → done
 * The first miss server is stopped only once it has written its optimized-model copies in the background (as a pod
 * that lives on after ready does); its cache then serves the hit runs.
 * Prints a table, a per-phase profile from the servers' own log lines, and last one JSON line.
 * Env: BENCH_REPS, BENCH_PAD_BYTES (default 300e6), BENCH_PAD_SPLIT (sd15 | unet, default sd15: see DemoOptions),
 * BENCH_EP (default cpu, as bare_ms), ORT_OPTIMIZED_CACHE (default auto), THROTTLE_PROXY (proxy path),
 * S3_TRANSPORT (passed to the servers and the warm-up CLI: sdk, the default, or lite).
 * BENCH_HIT_BUILDS: hits only, to compare builds side by side (a regression's hunt): comma-separated checkouts, each
 * built (`npm run build`; `.` is this one), each optionally followed by `#VAR=value` settings for its servers
 * (`.,.#AUX_THREADS=on,../old`). Each fills its own cache with one miss, then BENCH_REPS rounds start every build once
 * in turn on its cache; prints each one's hits and median against the first's, and its median hit's timeline.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, promises as fsp, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { benchEntry, freePort, lastJson, median, s3rverWithModel, S3RVER_CREDS, startChild } from './bench-common.js';
import { buildDemoModel } from '../src/demo/index.js';
import type { PadSplit } from '../src/demo/build.js';

const SELF = fileURLToPath(import.meta.url);
const ROOT = process.cwd();
const BUCKET = 'models';
const PREFIX = 'sd-demo-300/';
const CREDS = S3RVER_CREDS;
/** The issue's link; BENCH_LINK_CONN_MBPS / BENCH_LINK_TOTAL_MBPS / BENCH_LINK_TTFB_MS try others (reported in the header). */
const LINK = {
  connMbps: Number(process.env.BENCH_LINK_CONN_MBPS ?? 15),
  totalMbps: Number(process.env.BENCH_LINK_TOTAL_MBPS ?? 150),
  ttfbMs: Number(process.env.BENCH_LINK_TTFB_MS ?? 40),
};

/**
 * CPU seconds (user + system) a process has used, from /proc (Linux): `self` counts its own, `children` those of
 * its exited, reaped children. NaN where /proc is absent. The link's servers share the machine with the runtime,
 * so how busy they keep it decides whether a download is bound by the link or by the CPU.
 */
function cpuSeconds(pid: number | 'self', which: 'self' | 'children' = 'self'): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const [u, s] = which === 'self' ? [f[11], f[12]] : [f[13], f[14]];
    return (Number(u) + Number(s)) / 100; // USER_HZ is 100 on Linux
  } catch {
    return NaN;
  }
}
const TARGETS = { liveness_ms: 150, miss_ratio: 0.8, hit_ratio: 1.15 };

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What a CUDA run needs from this environment: the loader path to the CUDA libraries and the GPU selection. */
const passThroughGpuEnv = (): NodeJS.ProcessEnv =>
  Object.fromEntries(Object.entries(process.env).filter(([k]) => k === 'LD_LIBRARY_PATH' || k === 'CUDA_VISIBLE_DEVICES' || k === 'CUDA_TF32' || k.startsWith('NVIDIA_')));
const r0 = (x: number) => Math.round(x);


/** One GET (on a fresh connection unless an agent is given); resolves with the status, or 0 when nothing listens yet. */
const probe = (port: number, route: string, agent: http.Agent | false = false) => new Promise<number>((resolve) => {
  const req = http.get({ host: '127.0.0.1', port, path: route, agent }, (res) => {
    res.resume();
    res.on('end', () => resolve(res.statusCode ?? 0));
  });
  req.on('error', () => resolve(0));
  req.setTimeout(2_000, () => req.destroy());
});

interface LogLine { msg?: string; time?: string | number; [k: string]: unknown }

/** A child whose stdout is parsed as JSON log lines, each stamped with performance.now() on arrival. */
function spawnLogged(args: string[], env: NodeJS.ProcessEnv): { child: ChildProcess; t0: number; logs: Array<{ at: number; line: LogLine }>; stderr: string[]; exited: Promise<number | null> } {
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: Array<{ at: number; line: LogLine }> = [];
  const stderr: string[] = [];
  let buf = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => {
    buf += c;
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const l = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try {
        logs.push({ at: performance.now(), line: JSON.parse(l) as LogLine });
      } catch {
        logs.push({ at: performance.now(), line: { msg: l } });
      }
    }
  });
  child.stderr!.setEncoding('utf8').on('data', (c: string) => stderr.push(c));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return { child, t0, logs, stderr, exited };
}

interface ServerRun {
  livenessMs: number;
  readyMs: number;
  /** Spawn → 'listening' log line as stamped by the server's own clock (epoch ms). */
  listenLogMs: number;
  phases: Record<string, number>;
  sessions: Record<string, number>;
  /** onnxruntime-node's import in the pipeline worker; sharp's on the main thread. */
  importMs: number;
  sharpMs: number;
  warmupMs: number;
  optCache: string[];
  /** Spawn-relative ms of the boot's landmark log lines (server clock). */
  timeline: Array<[number, string]>;
}

const LANDMARKS = ['listening', 'onnxruntime-node imported', 'sharp imported', 'model files ready', 'onnx session created', 'warm-up generation done', 'model ready'];

/**
 * Spawns the server, polls liveness every ~2 ms, then readiness every ~20 ms over one keep-alive connection (Knative's
 * queue-proxy probes about every 50 ms; a new connection every few ms would steal the 2 cores the download needs).
 * Stops it with SIGTERM once ready.
 */
async function serverRun(env: NodeJS.ProcessEnv, opts: { waitForWriter?: boolean; root?: string } = {}, timeoutMs = 180_000): Promise<ServerRun> {
  const port = await freePort();
  const spawnedEpoch = Date.now();
  const s = spawnLogged([path.join(opts.root ?? ROOT, 'dist/src/main.js')], { ...env, PORT: String(port), HOST: '127.0.0.1' });
  let dead = false;
  void s.exited.then(() => (dead = true));
  const fail = (why: string) => new Error(`${why}; stderr: ${s.stderr.join('').slice(-800)}; last logs: ${s.logs.slice(-4).map((l) => JSON.stringify(l.line)).join(' | ')}`);
  try {
    let livenessMs = NaN;
    while (Number.isNaN(livenessMs)) {
      if (dead) throw fail('server exited before it listened');
      if ((await probe(port, '/v2/health/live')) === 200) livenessMs = performance.now() - s.t0;
      else await sleep(2);
    }
    let readyMs = NaN;
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    while (Number.isNaN(readyMs)) {
      if (dead) throw fail('server exited before it was ready');
      if (performance.now() - s.t0 > timeoutMs) throw fail('server not ready in time');
      if (s.logs.some((l) => typeof l.line.msg === 'string' && l.line.msg.startsWith('boot failed'))) throw fail('boot failed');
      if ((await probe(port, '/v2/health/ready', agent)) === 200) readyMs = performance.now() - s.t0;
      else await sleep(20);
    }
    agent.destroy();
    const find = (msg: string) => s.logs.find((l) => l.line.msg === msg)?.line;
    // A session that deferred its optimized copy means a writer runs after ready (never on CUDA under auto).
    if (opts.waitForWriter && s.logs.some((l) => l.line.msg === 'onnx session created' && l.line.optimizedCache === 'deferred')) {
      while (!find('optimized model cache written')) {
        if (dead || performance.now() - s.t0 > timeoutMs) throw fail('no "optimized model cache written" log line');
        await sleep(50);
      }
    }
    const ready = find('model ready');
    await sleep(20); // the 'model ready' line may trail the flip of readiness by a write
    const listening = find('listening');
    const sessions: Record<string, number> = {};
    const optCache: string[] = [];
    for (const l of s.logs) {
      if (l.line.msg !== 'onnx session created') continue;
      sessions[String(l.line.component)] = Number(l.line.ms);
      optCache.push(`${String(l.line.component)} ${String(l.line.optimizedCache)}`);
    }
    const phases: Record<string, number> = {};
    for (const [k, v] of Object.entries((ready ?? find('model ready'))?.phases ?? {})) phases[k] = r0(Number(v) * 1000);
    return {
      livenessMs, readyMs,
      listenLogMs: listening?.time !== undefined ? Date.parse(String(listening.time)) - spawnedEpoch : NaN,
      timeline: s.logs
        .filter((l) => l.line.time !== undefined && (LANDMARKS.includes(String(l.line.msg)) || String(l.line.msg).startsWith('boot ')))
        .map((l) => [Date.parse(String(l.line.time)) - spawnedEpoch, `${String(l.line.msg)}${l.line.component ? ` ${String(l.line.component)}` : ''}`]),
      phases, sessions,
      importMs: Number(find('onnxruntime-node imported')?.ms ?? NaN),
      sharpMs: Number(find('sharp imported')?.ms ?? NaN),
      warmupMs: Number(find('warm-up generation done')?.ms ?? NaN),
      optCache,
    };
  } finally {
    if (!dead) {
      s.child.kill('SIGTERM');
      const t = setTimeout(() => s.child.kill('SIGKILL'), 15_000);
      await s.exited;
      clearTimeout(t);
    }
  }
}

/** Runs a child to its end: spawn → exit, spawn → its first JSON line on stdout, and its stdout. */
async function timed(args: string[], env: NodeJS.ProcessEnv): Promise<{ ms: number; jsonMs: number; stdout: string }> {
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let jsonMs = NaN;
  child.stdout.on('data', (d) => {
    stdout += d;
    if (Number.isNaN(jsonMs) && /^\{/m.test(stdout)) jsonMs = performance.now() - t0;
  });
  child.stderr.on('data', (d) => (stderr += d));
  const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  const ms = performance.now() - t0;
  if (code !== 0) throw new Error(`${path.basename(args[0]!)} exited ${code}: ${stderr.slice(-800)}`);
  return { ms, jsonMs, stdout };
}

// ---- orchestration ---------------------------------------------------------------------------------------------

interface Rep { miss: ServerRun; warmupMs: number; warmupDownloadS: number; linkCpu: { s3rver: number; proxy: number; cli: number }; seqHit: ServerRun; sequentialMs: number; hit: ServerRun; bareMs: number; bare: Record<string, unknown> }

async function main(): Promise<void> {
  const reps = Number(process.env.BENCH_REPS ?? 3);
  const padBytes = Number(process.env.BENCH_PAD_BYTES ?? 300e6);
  const padSplit = (process.env.BENCH_PAD_SPLIT ?? 'sd15') as PadSplit;
  const ep = process.env.BENCH_EP ?? 'cpu';
  if (ep !== 'cpu' && ep !== 'cuda') throw new Error(`BENCH_EP must be cpu or cuda (the bare baseline needs one provider), got ${ep}`);
  const optimizedCache = process.env.ORT_OPTIMIZED_CACHE ?? 'auto';
  const proxyScript = process.env.THROTTLE_PROXY ?? path.resolve(ROOT, '../shared/tools/throttle-proxy.mjs');
  for (const f of [proxyScript, 'dist/src/main.js', 'dist/warmup/main.js', 'dist/scripts/bench-bare-boot.js']) {
    if (!existsSync(path.resolve(ROOT, f))) throw new Error(`${f} is missing (run \`npm run build\` from the repository root; THROTTLE_PROXY names the proxy)`);
  }
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-cold-'));
  const children: ChildProcess[] = [];
  const cleanup = () => {
    for (const c of children) c.kill('SIGTERM');
    rmSync(tmp, { recursive: true, force: true });
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const say = (m: string) => process.stderr.write(`bench: ${m}\n`);
  try {
    const model = await buildDemoModel(path.join(tmp, 'model'), { padBytes, padSplit });
    say(`demo model with ${(padBytes / 1e6).toFixed(0)} MB padding (${padSplit} split): ${(model.totalBytes / 1e6).toFixed(1)} MB in ${model.files.length} files`);

    const s3 = await s3rverWithModel(SELF, path.join(tmp, 's3rver'), BUCKET, PREFIX, model, children);
    const s3port = s3.port;
    await fsp.rm(model.dir, { recursive: true });

    const pport = await freePort();
    const proxy = startChild(process.execPath, [proxyScript, '--listen', String(pport), '--upstream', `127.0.0.1:${s3port}`,
      '--conn-mbps', String(LINK.connMbps), '--total-mbps', String(LINK.totalMbps), '--ttfb-ms', String(LINK.ttfbMs)], /throttle-proxy on/);
    children.push(proxy.child);
    await proxy.up;
    say(`s3rver on ${s3port}, throttle proxy on ${pport} (${LINK.connMbps} MB/s per connection, ${LINK.totalMbps} MB/s total, ${LINK.ttfbMs} ms TTFB)`);

    const env = (cacheDir: string): NodeJS.ProcessEnv => ({
      PATH: process.env.PATH, HOME: process.env.HOME, ...CREDS,
      AWS_ENDPOINT_URL: `http://127.0.0.1:${pport}`, S3_USE_HTTPS: '0', STORAGE_URI: `s3://${BUCKET}/${PREFIX}`,
      MODEL_CACHE_DIR: cacheDir, EXECUTION_PROVIDER: ep, LOG_LEVEL: 'info', ORT_OPTIMIZED_CACHE: optimizedCache, ...passThroughGpuEnv(),
      ...(process.env.S3_TRANSPORT ? { S3_TRANSPORT: process.env.S3_TRANSPORT } : {}),
    });

    if (process.env.BENCH_HIT_BUILDS) {
      await compareHits(process.env.BENCH_HIT_BUILDS, reps, (dir) => env(path.join(tmp, dir)), say);
      return;
    }
    const runs: Rep[] = [];
    let hitCache: string | undefined;
    for (let i = 0; i < reps; i++) {
      // Miss: a fresh cache; its filled cache (with the optimized graphs this start wrote) serves the hit runs.
      const missCache = path.join(tmp, `cache-miss-${i}`);
      // The first miss fills the cache the hits use: let it finish its background write first (not timed).
      const miss = await serverRun(env(missCache), { waitForWriter: hitCache === undefined });
      say(`rep ${i + 1}: ready_miss ${r0(miss.readyMs)} ms (liveness ${r0(miss.livenessMs)} ms)`);
      if (hitCache === undefined) hitCache = missCache;
      else await fsp.rm(missCache, { recursive: true, force: true });

      // Sequential: the warm-up Job fills a fresh cache, then the server starts on it.
      const seqCache = path.join(tmp, `cache-seq-${i}`);
      const cpu0 = { s3rver: cpuSeconds(s3.child.pid!), proxy: cpuSeconds(proxy.child.pid!), cli: cpuSeconds('self', 'children') };
      const w = await timed([path.join(ROOT, 'dist/warmup/main.js')], { ...env(seqCache), LOG_LEVEL: 'warn' });
      const linkCpu = { s3rver: cpuSeconds(s3.child.pid!) - cpu0.s3rver, proxy: cpuSeconds(proxy.child.pid!) - cpu0.proxy, cli: cpuSeconds('self', 'children') - cpu0.cli };
      const wj = lastJson(w.stdout);
      if (wj.fromCache !== false) throw new Error(`the warm-up run was not a miss: ${JSON.stringify(wj)}`);
      const seqHit = await serverRun(env(seqCache));
      const modelDir = String(wj.modelDir);
      say(`rep ${i + 1}: sequential ${r0(w.ms + seqHit.readyMs)} ms (warm-up CLI ${r0(w.ms)} ms + first start on its cache ${r0(seqHit.readyMs)} ms)`);

      const hit = await serverRun(env(hitCache));
      say(`rep ${i + 1}: ready_hit ${r0(hit.readyMs)} ms`);

      // Bare runs on the warm-up cache with no optimized graphs in it: plain ORT, as a script without the runtime would.
      await removeOptimized(modelDir);
      const bareRun = await timed([path.join(ROOT, 'dist/scripts/bench-bare-boot.js'), modelDir, '--ep', ep], { PATH: process.env.PATH, HOME: process.env.HOME, ...passThroughGpuEnv() });
      const bare = lastJson(bareRun.stdout);
      const bareMs = bareRun.jsonMs; // spawn → its result line, as ready is spawn → the first ready 200
      say(`rep ${i + 1}: bare ${r0(bareMs)} ms (sessions ${String(bare.sessionsMs)} ms, warm-up ${String(bare.warmupMs)} ms)`);
      await fsp.rm(seqCache, { recursive: true, force: true });
      runs.push({ miss, warmupMs: w.ms, warmupDownloadS: Number(wj.seconds), linkCpu, seqHit, sequentialMs: w.ms + seqHit.readyMs, hit, bareMs, bare });
    }

    const liveAll = runs.flatMap((x) => [x.miss.livenessMs, x.seqHit.livenessMs, x.hit.livenessMs]);
    const result = {
      liveness_ms: r0(median(liveAll)),
      ready_miss_ms: r0(median(runs.map((x) => x.miss.readyMs))),
      sequential_ms: r0(median(runs.map((x) => x.sequentialMs))),
      ready_hit_ms: r0(median(runs.map((x) => x.hit.readyMs))),
      bare_ms: r0(median(runs.map((x) => x.bareMs))),
      miss_ratio: 0,
      hit_ratio: 0,
    };
    result.miss_ratio = +(result.ready_miss_ms / result.sequential_ms).toFixed(3);
    result.hit_ratio = +(result.ready_hit_ms / result.bare_ms).toFixed(3);

    const pad = (s: string | number, n: number) => String(s).padEnd(n);
    const row = (name: string, xs: number[], med: number, target: string) => `${pad(name, 16)}${pad(xs.map(r0).join(' '), 52)}${pad(r0(med), 10)}${target}`;
    const lines = [
      `cold start, demo model ${(model.totalBytes / 1e6).toFixed(0)} MB (${padSplit} split) from s3rver via throttle proxy (${LINK.connMbps}/${LINK.totalMbps} MB/s, ${LINK.ttfbMs} ms TTFB), EP ${ep}, S3_TRANSPORT ${process.env.S3_TRANSPORT ?? 'sdk'}, ${os.cpus().length} cores, ${reps} reps`,
      `${pad('measure', 16)}${pad('runs (ms)', 52)}${pad('median', 10)}target`,
      row('liveness_ms', liveAll, result.liveness_ms, `<= ${TARGETS.liveness_ms} ${result.liveness_ms <= TARGETS.liveness_ms ? 'met' : 'MISSED'}`),
      row('ready_miss_ms', runs.map((x) => x.miss.readyMs), result.ready_miss_ms, `miss/sequential = ${result.miss_ratio} (<= ${TARGETS.miss_ratio} ${result.miss_ratio <= TARGETS.miss_ratio ? 'met' : 'MISSED'})`),
      row('sequential_ms', runs.map((x) => x.sequentialMs), result.sequential_ms, `warm-up CLI ${runs.map((x) => r0(x.warmupMs)).join('/')} + first start ${runs.map((x) => r0(x.seqHit.readyMs)).join('/')}`),
      row('ready_hit_ms', runs.map((x) => x.hit.readyMs), result.ready_hit_ms, `hit/bare = ${result.hit_ratio} (<= ${TARGETS.hit_ratio} ${result.hit_ratio <= TARGETS.hit_ratio ? 'met' : 'MISSED'})`),
      row('bare_ms', runs.map((x) => x.bareMs), result.bare_ms, ''),
      '',
      'profile (medians, ms; server phases from its own "model ready" log line, sessions from "onnx session created"):',
    ];
    const prof = (name: string, sel: (x: Rep) => ServerRun) => {
      const pick = (f: (s: ServerRun) => number) => r0(median(runs.map((x) => f(sel(x)))));
      const comps = [...new Set(runs.flatMap((x) => Object.keys(sel(x).sessions)))];
      return `  ${pad(name, 12)} live ${pick((s) => s.livenessMs)} (listen log +${pick((s) => s.listenLogMs)}), phases ${['resolving', 'fetching', 'loading', 'warming'].map((p) => `${p} ${pick((s) => s.phases[p] ?? NaN)}`).join(', ')}; ` +
        `ORT import ${pick((s) => s.importMs)} (worker), sharp ${pick((s) => s.sharpMs)} (main); sessions ${comps.map((c) => `${c} ${pick((s) => s.sessions[c] ?? NaN)}`).join(', ')}; warm-up ${pick((s) => s.warmupMs)}` +
        `${sel(runs[0]!).optCache.length ? `; opt cache: ${sel(runs[0]!).optCache.join(', ')}` : ''}`;
    };
    lines.push(prof('miss', (x) => x.miss), prof('first hit', (x) => x.seqHit), prof('hit', (x) => x.hit));
    lines.push(`  ${pad('bare', 12)} node start ${r0(median(runs.map((x) => Number(x.bare.startMs))))}, import ${r0(median(runs.map((x) => Number(x.bare.importMs))))}, sessions ${r0(median(runs.map((x) => Number(x.bare.sessionsMs))))} ${JSON.stringify(runs[0]!.bare.perComponent)}, warm-up ${r0(median(runs.map((x) => Number(x.bare.warmupMs))))}`);
    for (const [name, sel] of [['miss', (x: Rep) => x.miss], ['hit', (x: Rep) => x.hit]] as const) {
      const t = runs.map(sel).sort((a, b) => a.readyMs - b.readyMs)[runs.length >> 1]!;
      lines.push(`  median ${name} run, timeline (ms after spawn): ${t.timeline.map(([ms, m]) => `${ms} ${m}`).join(' | ')}`);
    }
    lines.push(`  warm-up CLI download: ${runs.map((x) => x.warmupDownloadS.toFixed(2)).join(' / ')} s in-process (${(model.totalBytes / 1e6 / median(runs.map((x) => x.warmupDownloadS))).toFixed(0)} MB/s)`);
    const cpu = (k: 's3rver' | 'proxy' | 'cli') => median(runs.map((x) => x.linkCpu[k]));
    const busy = (cpu('s3rver') + cpu('proxy') + cpu('cli')) / (median(runs.map((x) => x.warmupMs)) / 1000) / os.cpus().length;
    if (Number.isFinite(busy)) {
      lines.push(`  CPU during the warm-up CLI run: s3rver ${cpu('s3rver').toFixed(2)} s, proxy ${cpu('proxy').toFixed(2)} s, CLI ${cpu('cli').toFixed(2)} s = ${(busy * 100).toFixed(0)}% of ${os.cpus().length} cores` +
        (busy > 0.6 ? ' (the download is bound by this machine\'s CPU more than by the link: work the runtime overlaps with it competes for the same cores)' : ''));
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    cleanup();
  }
}

/**
 * BENCH_HIT_BUILDS: every build fills its own cache with one miss (its own cache format, its background writer let
 * finish), then `reps` rounds start each build once, in turn, on its cache: builds alternate, so the machine's drift
 * falls on all of them alike.
 */
async function compareHits(spec: string, reps: number, envFor: (cacheDir: string) => NodeJS.ProcessEnv, say: (m: string) => void): Promise<void> {
  const builds = spec.split(',').map((b, i) => {
    const [dir, ...vars] = b.trim().split('#');
    const root = path.resolve(ROOT, dir || '.');
    if (!existsSync(path.join(root, 'dist/src/main.js'))) throw new Error(`BENCH_HIT_BUILDS: ${root} has no dist/src/main.js (run \`npm run build\` there)`);
    const extra = Object.fromEntries(vars.map((v) => {
      const eq = v.indexOf('=');
      if (eq <= 0) throw new Error(`BENCH_HIT_BUILDS: ${JSON.stringify(v)} is not VAR=value`);
      return [v.slice(0, eq), v.slice(eq + 1)];
    }));
    return { name: b.trim(), root, extra, cache: `cache-build-${i}`, hits: [] as ServerRun[] };
  });
  for (const b of builds) {
    const miss = await serverRun({ ...envFor(b.cache), ...b.extra }, { waitForWriter: true, root: b.root });
    say(`${b.name}: cache filled (miss ${r0(miss.readyMs)} ms)`);
  }
  for (let i = 0; i < reps; i++) {
    for (const b of builds) {
      const hit = await serverRun({ ...envFor(b.cache), ...b.extra }, { root: b.root });
      b.hits.push(hit);
      say(`round ${i + 1}: ${b.name} hit ${r0(hit.readyMs)} ms`);
    }
  }
  const base = median(builds[0]!.hits.map((h) => h.readyMs));
  const lines = [`cache hits, builds alternating, ${reps} rounds (ms, spawn → ready)`];
  for (const b of builds) {
    const med = median(b.hits.map((h) => h.readyMs));
    const t = [...b.hits].sort((x, y) => x.readyMs - y.readyMs)[b.hits.length >> 1]!;
    lines.push(`  ${b.name}: ${b.hits.map((h) => r0(h.readyMs)).join(' ')}; median ${r0(med)} (${(med / base).toFixed(3)} of the first)`);
    lines.push(`    median hit: ${t.timeline.map(([ms, m]) => `${ms} ${m}`).join(' | ')}`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
  process.stdout.write(`${JSON.stringify({ hits: Object.fromEntries(builds.map((b) => [b.name, r0(median(b.hits.map((h) => h.readyMs)))])) })}\n`);
}

/** Drops the optimized graphs a server start may have left, so bare_ms is plain ONNX Runtime. */
async function removeOptimized(modelDir: string): Promise<void> {
  for (const comp of await fsp.readdir(modelDir).catch(() => [] as string[])) {
    const d = path.join(modelDir, comp);
    for (const f of await fsp.readdir(d).catch(() => [] as string[])) if (f.includes('.opt.')) await fsp.rm(path.join(d, f), { force: true });
  }
}

await benchEntry(main, BUCKET);
