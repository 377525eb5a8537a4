/**
 * @module Connection benchmark (`node dist/scripts/bench-connections.js`): the built server on the demo model, over
 * real loopback sockets, first with nothing else open (the baseline), then holding
 *   idle      BENCH_IDLE (5000) keep-alive connections, each after one answered request
 *   trickle   those, and BENCH_TRICKLE (500) connections sending a request head one byte per second
 *   ws        those, and BENCH_WS (1000) WebSocket connections on the stream route that never send their request
 * For each: probe latency (a new connection per probe, as kubelet's: /v2/health/live and /v2/health/ready, p50 and
 * max of BENCH_PROBES each), the server's RSS and open descriptors, and p50 against the baseline's. Then how long the
 * trickling and the idle kept-alive connections stay open (the head and keep-alive timeouts close them), unless
 * BENCH_WAIT_CLOSE=0. Last, the open-file limit: the server under `ulimit -n BENCH_NOFILE` (1024) holding
 * BENCH_NOFILE + 500 silent connections, once with MAX_CONNECTIONS=0 (no cap: the behaviour before the cap) and once
 * with the default cap, probes and a prediction side by side. A table, then one JSON line.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { envNumber, median, startBenchServer, type BenchServer } from './bench-common.js';

const IDLE = envNumber('BENCH_IDLE', 5000);
const TRICKLE = envNumber('BENCH_TRICKLE', 500);
const WS = envNumber('BENCH_WS', 1000);
const PROBES = envNumber('BENCH_PROBES', 30);
const NOFILE = envNumber('BENCH_NOFILE', 1024);
const WAIT_CLOSE = process.env.BENCH_WAIT_CLOSE !== '0';

/** Servers running now: a benchmark stopped by a signal (a timeout, Ctrl-C) stops them too instead of leaving them behind. */
const running = new Set<ChildProcess>();
const cacheDir = mkdtempSync(path.join(os.tmpdir(), 'bench-conn-'));
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    for (const p of running) p.kill('SIGKILL');
    rmSync(cacheDir, { recursive: true, force: true });
    process.exit(130);
  });
}

/** The built server on the demo model, under `ulimit -n nofile` when given; resolves once it is ready. */
function startServer(env: Record<string, string>, cacheDir: string, nofile?: number): Promise<BenchServer> {
  return startBenchServer({ ...process.env, STORAGE_URI: '', MODEL_CACHE_DIR: cacheDir, LOG_LEVEL: 'info', ...env }, {
    ...(nofile !== undefined ? { nofile } : {}), keepLog: true,
    spawned: (proc) => (running.add(proc), proc.once('exit', () => running.delete(proc))),
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One request on a new connection closed after it; resolves its status (0: no answer in 5 s) and milliseconds. */
function probe(port: number, method: string, p: string, body?: string): Promise<{ status: number; ms: number }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => {
      const extra = body === undefined ? '' : `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n`;
      s.write(`${method} ${p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n${extra}\r\n${body ?? ''}`);
    });
    let got = '';
    const timer = setTimeout(() => s.destroy(), 5000);
    s.on('data', (d: Buffer) => (got += d.toString('latin1')));
    s.on('error', () => undefined);
    s.on('close', () => {
      clearTimeout(timer);
      resolve({ status: Number(/^HTTP\/1\.1 (\d{3})/.exec(got)?.[1] ?? 0), ms: performance.now() - t0 });
    });
  });
}

interface Probes { liveP50: number; liveMax: number; readyP50: number; readyMax: number; failed: number }

async function probes(port: number): Promise<Probes> {
  const live: number[] = [];
  const ready: number[] = [];
  let failed = 0;
  for (let i = 0; i < PROBES; i++) {
    for (const [p, into] of [['/v2/health/live', live], ['/v2/health/ready', ready]] as const) {
      const r = await probe(port, 'GET', p);
      if (r.status === 200) into.push(r.ms);
      else failed++;
    }
    await sleep(20);
  }
  const r1 = (x: number) => Math.round(x * 10) / 10;
  const max = (xs: number[]) => (xs.length === 0 ? NaN : r1(Math.max(...xs)));
  return { liveP50: r1(median(live)), liveMax: max(live), readyP50: r1(median(ready)), readyMax: max(ready), failed };
}

/** The server's resident memory (MB) and open descriptors, from /proc. */
function footprint(pid: number): { rssMb: number; fds: number } {
  const rss = Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
  return { rssMb: Math.round(rss / 1024), fds: readdirSync(`/proc/${pid}/fd`).length };
}

interface Held { socks: net.Socket[]; openedAt: number; closedAt: number[] }

/** Opens `n` connections, `batch` at a time; `start` runs on each once connected and resolves when it is set up. */
async function hold(port: number, n: number, start: (s: net.Socket) => Promise<void>, batch = 200): Promise<Held> {
  const h: Held = { socks: [], openedAt: performance.now(), closedAt: [] };
  for (let i = 0; i < n; i += batch) {
    await Promise.all(Array.from({ length: Math.min(batch, n - i) }, () => new Promise<void>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => void start(s).then(resolve, resolve));
      s.on('error', () => resolve());
      s.on('close', () => (h.closedAt.push(performance.now() - h.openedAt), resolve()));
      h.socks.push(s);
    })));
  }
  return h;
}

/** A keep-alive request answered, then nothing: an idle kept-alive connection. */
const keepAlive = (s: net.Socket) => new Promise<void>((resolve) => {
  s.write('GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n');
  let got = '';
  s.on('data', (d: Buffer) => {
    got += d.toString('latin1');
    if (got.endsWith('{"live":true}')) resolve();
  });
});

/** A request head sent one byte a second, never finished (slow loris). */
const trickle = (s: net.Socket) => {
  const head = `GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ${'a'.repeat(4000)}`;
  let i = 0;
  const t = setInterval(() => (s.writable && i < head.length ? s.write(head[i++]!) : clearInterval(t)), 1000);
  s.on('close', () => clearInterval(t));
  return Promise.resolve();
};

/** A WebSocket upgrade answered 101, then no request message. */
const wsIdle = (s: net.Socket) => new Promise<void>((resolve) => {
  s.write('GET /v1/models/model/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  s.once('data', () => resolve());
});

const stillOpen = (h: Held) => h.socks.length - h.closedAt.length;

interface Row extends Probes { phase: string; open: number; rssMb: number; fds: number; liveVsBaseline: number }

async function loadPhases(cacheDir: string): Promise<{ rows: Row[]; closes: Record<string, unknown> }> {
  const srv = await startServer({}, cacheDir);
  const rows: Row[] = [];
  const pid = srv.proc.pid!;
  const row = async (phase: string, open: number): Promise<void> => {
    const p = await probes(srv.port);
    const base = rows[0]?.liveP50 ?? p.liveP50;
    rows.push({ phase, open, ...p, ...footprint(pid), liveVsBaseline: Math.round((p.liveP50 / base) * 100) / 100 });
  };
  try {
    // Warm the routes (and this process's sockets) first: the first probes of a fresh process are slower.
    for (let i = 0; i < 20; i++) await probe(srv.port, 'GET', i % 2 ? '/v2/health/ready' : '/v2/health/live');
    await row('baseline', 0);
    const idle = await hold(srv.port, IDLE, keepAlive);
    await row('idle', stillOpen(idle));
    const slow = await hold(srv.port, TRICKLE, trickle);
    await row('idle+trickle', stillOpen(idle) + stillOpen(slow));
    const ws = await hold(srv.port, WS, wsIdle);
    await row('idle+trickle+ws', stillOpen(idle) + stillOpen(slow) + stillOpen(ws));
    const closes: Record<string, unknown> = {};
    if (WAIT_CLOSE) {
      // The head timeout (15 s) closes the trickling ones; the keep-alive timeout (75 s) the idle ones.
      const until = async (h: Held, ms: number) => {
        const end = performance.now() + ms;
        while (stillOpen(h) > 0 && performance.now() < end) await sleep(200);
      };
      await until(slow, 40_000);
      closes.trickleClosedS = { p50: Math.round(median(slow.closedAt) / 100) / 10, max: Math.round(Math.max(...slow.closedAt) / 100) / 10, open: stillOpen(slow) };
      await until(idle, 90_000);
      closes.idleClosedS = { p50: Math.round(median(idle.closedAt) / 100) / 10, max: Math.round(Math.max(...idle.closedAt) / 100) / 10, open: stillOpen(idle) };
      closes.wsOpenAfter = { seconds: Math.round((performance.now() - ws.openedAt) / 1000), open: stillOpen(ws) };
      await row('after timeouts', stillOpen(idle) + stillOpen(slow) + stillOpen(ws));
    }
    for (const h of [idle, slow, ws]) h.socks.forEach((s) => s.destroy());
    return { rows, closes };
  } finally {
    await srv.stop();
  }
}

interface LimitRow { config: string; held: number; liveOk: number; readyOk: number; liveP50: number; predict: number; predictAfter: number; alive: boolean; warnings: number }

/** The server under `ulimit -n NOFILE` holding more silent connections than that, with and without the cap. */
async function atLimit(cacheDir: string, maxConnections: string | undefined): Promise<LimitRow> {
  const srv = await startServer(maxConnections === undefined ? {} : { MAX_CONNECTIONS: maxConnections }, cacheDir, NOFILE);
  const predictBody = JSON.stringify({ instances: [{ prompt: 'limit', num_inference_steps: 1, height: 64, width: 64, seed: 1 }] });
  try {
    const held = await hold(srv.port, NOFILE + 500, () => Promise.resolve());
    await sleep(300);
    const live: number[] = [];
    let liveOk = 0;
    let readyOk = 0;
    for (let i = 0; i < PROBES; i++) {
      const l = await probe(srv.port, 'GET', '/v2/health/live');
      if (l.status === 200) (liveOk++, live.push(l.ms));
      if ((await probe(srv.port, 'GET', '/v2/health/ready')).status === 200) readyOk++;
    }
    const predict = (await probe(srv.port, 'POST', '/v1/models/model:predict', predictBody)).status;
    const stillHeld = stillOpen(held);
    held.socks.forEach((s) => s.destroy());
    await sleep(500);
    const predictAfter = (await probe(srv.port, 'POST', '/v1/models/model:predict', predictBody)).status;
    const warnings = srv.log().split('\n').filter((l) => l.includes('"level":"warn"') && /connection limit|accepting a connection/.test(l)).length;
    return { config: maxConnections === undefined ? 'MAX_CONNECTIONS=auto' : `MAX_CONNECTIONS=${maxConnections}`, held: stillHeld, liveOk, readyOk,
      liveP50: Math.round(median(live) * 10) / 10, predict, predictAfter, alive: srv.proc.exitCode === null, warnings };
  } finally {
    await srv.stop();
  }
}

async function main(): Promise<void> {
  try {
    const { rows, closes } = await loadPhases(cacheDir);
    console.log(`\nprobes: ${PROBES} each of /v2/health/live and /v2/health/ready, a new connection each (ms); server RSS and open descriptors`);
    console.log('phase              open   live p50  live max  ready p50  ready max  failed  RSS MB   fds  live p50 vs baseline');
    for (const r of rows) {
      console.log(`${r.phase.padEnd(17)} ${String(r.open).padStart(5)} ${String(r.liveP50).padStart(9)} ${String(r.liveMax).padStart(9)} ${String(r.readyP50).padStart(10)} ${String(r.readyMax).padStart(10)} ${String(r.failed).padStart(7)} ${String(r.rssMb).padStart(7)} ${String(r.fds).padStart(5)}  ${r.liveVsBaseline}x`);
    }
    if (WAIT_CLOSE) console.log(`closed by the server's timeouts (seconds after opening): ${JSON.stringify(closes)}`);
    const limits = [await atLimit(cacheDir, '0'), await atLimit(cacheDir, undefined)];
    console.log(`\nulimit -n ${NOFILE}, ${NOFILE + 500} silent connections held; ${PROBES} probes each`);
    console.log('config                  held  live ok  ready ok  live p50  predict  predict after  alive  warnings');
    for (const l of limits) {
      console.log(`${l.config.padEnd(22)} ${String(l.held).padStart(5)} ${String(l.liveOk).padStart(8)} ${String(l.readyOk).padStart(9)} ${String(l.liveP50).padStart(9)} ${String(l.predict).padStart(8)} ${String(l.predictAfter).padStart(14)} ${String(l.alive).padStart(6)} ${String(l.warnings).padStart(9)}`);
    }
    console.log(JSON.stringify({ bench: 'connections', node: process.version, cpus: os.cpus().length, idle: IDLE, trickle: TRICKLE, ws: WS, probes: PROBES, nofile: NOFILE, phases: rows, closes, limits }));
  } finally {
    rmSync(cacheDir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
