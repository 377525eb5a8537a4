/**
 * @module Long-serving soak (`npm run bench:soak`, i.e. `node dist/scripts/bench-soak.js`): does a server that serves
 * for days keep its memory, its file descriptors and its event loop? Method and results in docs/BENCHMARKS.md
 * ("Long serving"). Two runs of the built server (`node dist/src/main.js`, embedded demo model, CPU), one after the
 * other, each fresh and with the same settings:
 *   plain  the simplest repeated V1 request (one prompt, 64×64, 2 steps, no seed: never a result-cache hit)
 *   mixed  a seeded mix of what clients send, over real sockets: V1 and V2 predicts of several sizes, step counts,
 *          schedulers and output formats, batches of prompts, img2img (base64 PNG/JPEG, some with a mask), WebSocket
 *          generations (some with previews, some left mid-generation), OpenAI generations and edits (multipart, some
 *          with a mask), CloudEvents (binary with ever new attributes, and structured), identical seeded requests at
 *          once (one generation, the others waiting for its images; one client sometimes leaving), LoRA adapter sets
 *          that switch (more sets than LORA_MAX_SETS, and scales from the client, each a set of its own), names from
 *          the client everywhere a name goes (random paths, model names on every route and on the WebSocket, OpenAI's
 *          `model`, adapter names), result-cache hits and misses, malformed / invalid / unknown-model bodies (400/404),
 *          oversize bodies (413, declared and chunked), clients that leave mid-request and mid-body, bodies trickled
 *          slowly, responses read slowly or never, generations past REQUEST_TIMEOUT_S (504), bursts over MAX_QUEUE
 *          (503 BUSY), pipelined requests, probes and metric scrapes, and heads that never end (slow loris, cut by the
 *          server's headers timeout).
 * Every BENCH_SOAK_SAMPLE_EVERY requests it samples the server's VmRSS and VmHWM (/proc/<pid>/status), the RSS of its
 * process tree (children such as the optimized-model writer), its open fds and sockets (/proc/<pid>/fd), threads, and
 * what its /metrics says (process RSS, main-thread heap and external memory, active handles, event-loop lag since the
 * last scrape, the number of metric series, result-cache bytes), and the resident MB of glibc's malloc arenas (smaps).
 * The server's trims of ended adapter set threads' memory, and its adapter set build times, are read from its log. Growth is the least-squares slope over the second
 * half of the run (after warm-up effects), in MB per 1000 requests. A probe loop times /v2/health/live all along.
 * After the traffic, an idle wait: fds and sockets must come back to what they were before it.
 * Env: BENCH_SOAK_REQUESTS (3000 per run), BENCH_SOAK_CLIENTS (3 concurrent), BENCH_SOAK_SAMPLE_EVERY (100),
 * BENCH_SOAK_RUNS (plain,mixed), BENCH_SOAK_TIMEOUT_S (REQUEST_TIMEOUT_S of both servers, 2), BENCH_SOAK_CACHE_MB
 * (RESULT_CACHE_MB, 8), BENCH_SOAK_DEADLINE_S (1800 per run: the traffic stops there, and says so), BENCH_SOAK_GC
 * (off; 1: each sample also reads the main thread's heap after a forced full GC), BENCH_SEED
 * (random), BENCH_SOAK_ONLY (some actions of the mix only, by name), BENCH_SOAK_SNAPSHOT_SIGNAL (sent to the server a
 * quarter in and after the idle wait: with NODE_OPTIONS=--heapsnapshot-signal=<it>, two heap snapshots of its main
 * thread to compare; NODE_OPTIONS reaches the servers).
 * Prints a table, then one JSON line.
 */
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import WebSocket from 'ws';
import { rng } from '../test/helpers/fault-link.js';
import { envNumber, median, startBenchServer, type BenchServer } from './bench-common.js';

const n = envNumber;
const REQUESTS = n('BENCH_SOAK_REQUESTS', 3000);
const CLIENTS = n('BENCH_SOAK_CLIENTS', 3);
const EVERY = n('BENCH_SOAK_SAMPLE_EVERY', 100);
const TIMEOUT_S = n('BENCH_SOAK_TIMEOUT_S', 2);
const CACHE_MB = n('BENCH_SOAK_CACHE_MB', 8);
const DEADLINE_S = n('BENCH_SOAK_DEADLINE_S', 1800);
const SEED = n('BENCH_SEED', Math.floor(Math.random() * 2 ** 31));
const RUNS = (process.env.BENCH_SOAK_RUNS ?? 'plain,mixed').split(',').map((s) => s.trim()).filter(Boolean) as Array<'plain' | 'mixed'>;
/** Only these actions of the mix (names as in the outcome table, comma-separated): to look at one kind of traffic. */
const ONLY = process.env.BENCH_SOAK_ONLY ? process.env.BENCH_SOAK_ONLY.split(',').map((x) => x.trim()) : undefined;
/**
 * A signal sent to the server a quarter into the run and after the idle wait, e.g. SIGUSR2 with
 * NODE_OPTIONS=--heapsnapshot-signal=SIGUSR2: two heap snapshots of the main thread to compare.
 */
const SNAPSHOT_SIGNAL = process.env.BENCH_SOAK_SNAPSHOT_SIGNAL as NodeJS.Signals | undefined;
/**
 * With BENCH_SOAK_GC=1 each sample also reads the server's main-thread heap after a forced full GC: the servers run
 * with `--expose-gc` and a preload (written to a temporary folder, passed in NODE_OPTIONS) that, on SIGWINCH, collects
 * and writes process.memoryUsage() to a file. Live objects only, so growth there is retained memory, not garbage.
 */
const GC = process.env.BENCH_SOAK_GC === '1';
const GC_SIGNAL = 'SIGWINCH';
const GC_DIR = GC ? mkdtempSync(path.join(os.tmpdir(), 'soak-gc-')) : '';
if (GC) {
  writeFileSync(path.join(GC_DIR, 'gc.cjs'), `const { isMainThread } = require('node:worker_threads');
if (isMainThread && typeof globalThis.gc === 'function') {
  let n = 0;
  process.on('${GC_SIGNAL}', () => {
    globalThis.gc();
    require('node:fs').writeFileSync(${JSON.stringify(GC_DIR)} + '/' + process.pid + '.json', JSON.stringify({ n: ++n, ...process.memoryUsage() }));
  });
}
`);
  process.on('exit', () => rmSync(GC_DIR, { recursive: true, force: true }));
}
const MAX_QUEUE = 8;
const MAX_BODY = 1024 * 1024;
const MB = 1e6;

/** The servers' settings, the same for both runs. */
const SERVER_ENV = {
  STORAGE_URI: '', EXECUTION_PROVIDER: 'cpu', WORKERS: '1', MAX_BATCH_SIZE: '2', MAX_QUEUE: String(MAX_QUEUE),
  REQUEST_TIMEOUT_S: String(TIMEOUT_S), RESULT_CACHE_MB: String(CACHE_MB), MAX_BODY_BYTES: String(MAX_BODY), LORA_MAX_SETS: '2', LOG_LEVEL: 'info',
};

type Server = BenchServer;

/** `node dist/src/main.js` with SERVER_ENV, once its log says the model is ready. */
const startServer = (cacheDir: string): Promise<Server> => startBenchServer({
  ...process.env, ...SERVER_ENV, MODEL_CACHE_DIR: cacheDir,
  ...(GC ? { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --expose-gc --require ${path.join(GC_DIR, 'gc.cjs')}`.trim() } : {}),
});

/** The main thread's heap used and external memory after a forced full GC (BENCH_SOAK_GC), in bytes. */
async function heapAfterGc(pid: number): Promise<{ gcHeap?: number; gcExternal?: number }> {
  if (!GC) return {};
  const file = path.join(GC_DIR, `${pid}.json`);
  const read = () => {
    try {
      return JSON.parse(readFileSync(file, 'utf8')) as { n: number; heapUsed: number; external: number };
    } catch {
      return undefined;
    }
  };
  const before = read()?.n ?? 0;
  process.kill(pid, GC_SIGNAL);
  for (let i = 0; i < 250; i++) {
    await new Promise((r) => setTimeout(r, 20));
    const m = read();
    if (m && m.n > before) return { gcHeap: m.heapUsed, gcExternal: m.external };
  }
  return {};
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling

interface Sample {
  req: number;
  t: number;
  rssMB: number;
  hwmMB: number;
  treeRssMB: number;
  children: number;
  threads: number;
  fds: number;
  sockets: number;
  metrics: Record<string, number>;
  series: number;
  /** The series' names and labels (first and idle samples only, for what was added during the run). */
  keys?: string[];
  /** The fds by what they point at (first and idle samples only). */
  fdKinds?: Record<string, number>;
  diskMB: number;
  diskFiles: number;
  /** Resident MB of glibc's malloc arenas (smaps): the main arena's `[heap]`, and the other arenas' heaps. */
  arenaMB: { main: number; others: number; heaps: number };
}

const METRICS = {
  rss: 'process_runtime_process_resident_memory_bytes',
  heapUsed: 'process_runtime_nodejs_heap_size_used_bytes',
  heapTotal: 'process_runtime_nodejs_heap_size_total_bytes',
  external: 'process_runtime_nodejs_external_memory_bytes',
  openFds: 'process_runtime_process_open_fds',
  handles: 'process_runtime_nodejs_active_handles_total',
  resources: 'process_runtime_nodejs_active_resources_total',
  lagMax: 'process_runtime_nodejs_eventloop_lag_max_seconds',
  lagP99: 'process_runtime_nodejs_eventloop_lag_p99_seconds',
  resultCache: 'result_cache_bytes',
  adapterSetsBuilt: 'lora_adapter_set_load_seconds_count',
  inflight: 'inference_requests_in_flight',
  queue: 'inference_queue_depth',
  /** Not scraped: heapAfterGc's (BENCH_SOAK_GC). */
  gcHeap: '',
  gcExternal: '',
} as const;

const kB = (line: string | undefined) => Number(/(\d+)\s*kB/.exec(line ?? '')?.[1] ?? NaN) * 1024;
function status(pid: number): { rss: number; hwm: number; threads: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n');
  const get = (k: string) => s.find((l) => l.startsWith(`${k}:`));
  return { rss: kB(get('VmRSS')), hwm: kB(get('VmHWM')), threads: Number(get('Threads')?.split(/\s+/)[1] ?? NaN) };
}

/** The process's descendants (children of children too), from /proc/<pid>/stat's ppid field. */
function descendants(root: number): number[] {
  const parent = new Map<number, number>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      parent.set(Number(e), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    } catch {
      // gone meanwhile
    }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const [c, pp] of parent) if (pp === p) (out.push(c), walk(c));
  };
  walk(root);
  return out;
}

/** What the process's fds point at, by kind (socket, pipe, anon_inode:[eventfd], or the file's path). */
function fdTargets(pid: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const t = readlinkSync(`/proc/${pid}/fd/${fd}`).replace(/^(socket|pipe):\[\d+\]$/, '$1');
      out[t] = (out[t] ?? 0) + 1;
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** Bytes and files under `dir` (the model cache: merged LoRA sets are written there). */
function diskUse(dir: string): { bytes: number; files: number } {
  let bytes = 0;
  let files = 0;
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      try {
        if (e.isDirectory()) walk(p);
        else if (e.isFile()) (bytes += statSync(p).size), files++;
      } catch {
        // removed meanwhile
      }
    }
  };
  try {
    walk(dir);
  } catch {
    // not there yet
  }
  return { bytes, files };
}

/**
 * glibc's arenas in /proc/<pid>/smaps: `[heap]` is the main arena; every other arena is made of heaps that glibc maps
 * at 64 MiB-aligned addresses (HEAP_MAX_SIZE on 64-bit), anonymous and read-write where in use. Their resident bytes
 * are what ended adapter set threads leave free but resident (docs/BENCHMARKS.md, "Long serving").
 */
function arenas(pid: number): Sample['arenaMB'] {
  let main = 0;
  let others = 0;
  let heaps = 0;
  let kind: 'main' | 'other' | undefined;
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  } catch {
    return { main: NaN, others: NaN, heaps: NaN };
  }
  for (const line of text.split('\n')) {
    const head = /^([0-9a-f]+)-[0-9a-f]+ (\S+) \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (head) {
      const [, start, perms, inode, name] = head;
      kind = name === '[heap]' ? 'main' : name === '' && inode === '0' && perms!.startsWith('rw') && BigInt(`0x${start}`) % (64n << 20n) === 0n ? 'other' : undefined;
      if (kind === 'other') heaps++;
      continue;
    }
    if (kind && line.startsWith('Rss:')) {
      const b = kB(line);
      if (kind === 'main') main += b;
      else others += b;
    }
  }
  return { main: main / MB, others: others / MB, heaps };
}

/** GET on a connection of its own, closed after the answer: the measurement holds no socket of the server's open. */
function getOnce(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    http.get(url, { agent: false, headers: { connection: 'close' } }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve(body));
    }).on('error', reject);
  });
}

async function scrape(url: string): Promise<{ values: Record<string, number>; series: number; keys: string[] }> {
  const text = await getOnce(`${url}/metrics`);
  const values: Record<string, number> = {};
  const keys: string[] = [];
  let series = 0;
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    series++;
    keys.push(line.slice(0, line.lastIndexOf(' ')));
    const sp = line.lastIndexOf(' ');
    const name = line.slice(0, sp).replace(/\{.*\}$/, '');
    for (const [k, m] of Object.entries(METRICS)) if (name === m) values[k] = (values[k] ?? 0) + Number(line.slice(sp + 1));
  }
  return { values, series, keys };
}

async function sample(srv: Server, req: number, t0: number, cacheDir: string): Promise<Sample> {
  const pid = srv.proc.pid!;
  const st = status(pid);
  const kids = descendants(pid);
  let kidsRss = 0;
  for (const k of kids) {
    try {
      kidsRss += status(k).rss;
    } catch {
      // exited meanwhile
    }
  }
  const m = await scrape(srv.url);
  Object.assign(m.values, await heapAfterGc(pid));
  const fdKinds = fdTargets(pid);
  const fds = Object.values(fdKinds).reduce((a, b) => a + b, 0);
  const sockets = fdKinds.socket ?? 0;
  const disk = diskUse(cacheDir);
  return {
    fdKinds, diskMB: disk.bytes / MB, diskFiles: disk.files, arenaMB: arenas(pid),
    req, t: (performance.now() - t0) / 1000, rssMB: st.rss / MB, hwmMB: st.hwm / MB, treeRssMB: (st.rss + kidsRss) / MB, children: kids.length,
    threads: st.threads, fds, sockets, metrics: m.values, series: m.series, keys: m.keys,
  };
}

/** Least-squares slope of y over x. */
function slope(xs: number[], ys: number[]): number {
  const k = xs.length;
  if (k < 2) return NaN;
  const mx = xs.reduce((a, b) => a + b, 0) / k;
  const my = ys.reduce((a, b) => a + b, 0) / k;
  let num = 0;
  let den = 0;
  for (let i = 0; i < k; i++) {
    num += (xs[i]! - mx) * (ys[i]! - my);
    den += (xs[i]! - mx) ** 2;
  }
  return den === 0 ? NaN : num / den;
}

/** MB (or count) per 1000 requests over the samples of the second half of the run. */
function growth(samples: Sample[], total: number, y: (s: Sample) => number): number {
  const late = samples.filter((s) => s.req >= total / 2 && Number.isFinite(y(s)));
  return +(slope(late.map((s) => s.req), late.map(y)) * 1000).toFixed(3);
}

// ---------------------------------------------------------------------------------------------------------------
// Clients

type Outcome = string; // an HTTP status, or what happened on a raw socket / WebSocket

interface RawOpts {
  /** Sent one after the other, each after its delay. */
  parts: Array<{ data: string | Buffer; delayMs?: number }>;
  /** Destroy the socket this long after the last part was written (a client that leaves). */
  cutAfterMs?: number;
  /** Start reading the answer only after this long (a slow reader). */
  readAfterMs?: number;
  /** Leave without reading the answer at all, after this long. */
  leaveAfterMs?: number;
  /** Give up after this long (the server should have answered or closed). */
  maxMs?: number;
}

/** A request on a raw socket: what a client that misbehaves looks like from the server. Returns the statuses seen. */
function rawRequest(port: number, o: RawOpts): Promise<Outcome> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let got = false;
    let settled = false;
    const timers: NodeJS.Timeout[] = [];
    const done = (out: Outcome) => {
      if (settled) return;
      settled = true;
      for (const t of timers) clearTimeout(t);
      s.destroy();
      resolve(out);
    };
    // Status lines anywhere in the stream (pipelined answers follow whole image bodies): each chunk is searched with
    // the end of the one before, in case a status line is split between them.
    const seen: string[] = [];
    let tail = '';
    const statuses = () => seen.join('+') || 'closed';
    s.on('data', (c: Buffer) => {
      const text = tail + c.toString('latin1');
      for (const m of text.matchAll(/HTTP\/1\.1 (\d{3}) /g)) if (m.index! + m[0].length > tail.length) seen.push(m[1]!);
      tail = text.slice(-16);
      got = true;
    });
    s.on('error', () => done(got ? statuses() : 'reset'));
    s.on('close', () => done(statuses()));
    if (o.readAfterMs) {
      s.pause();
      timers.push(setTimeout(() => s.resume(), o.readAfterMs));
    }
    timers.push(setTimeout(() => done(`stuck:${statuses()}`), o.maxMs ?? 30_000));
    s.once('connect', async () => {
      for (const p of o.parts) {
        if (p.delayMs) await new Promise((r) => setTimeout(r, p.delayMs));
        if (settled) return;
        s.write(p.data);
      }
      if (o.cutAfterMs !== undefined) timers.push(setTimeout(() => done('cut'), o.cutAfterMs));
      if (o.leaveAfterMs !== undefined) timers.push(setTimeout(() => done(`left:${statuses()}`), o.leaveAfterMs));
    });
  });
}

const httpHead = (method: string, p: string, headers: Record<string, string | number>) =>
  `${method} ${p} HTTP/1.1\r\nHost: 127.0.0.1\r\n${Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`;

/** Answers other than 200 counted by status, error code and the start of their message (digits blanked). */
const examples = new Map<string, number>();

async function post(url: string, p: string, body: string | Buffer, headers: Record<string, string> = {}): Promise<Outcome> {
  try {
    const res = await fetch(`${url}${p}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
    const text = Buffer.from(await res.arrayBuffer());
    if (res.status !== 200) {
      let j: { code?: string; error?: string } = {};
      try {
        j = JSON.parse(text.toString('utf8')) as typeof j;
        // OpenAI's shape under /openai: {"error": {"message", "code", …}}
        const e = j.error as unknown as { message?: string; code?: string } | string | undefined;
        if (typeof e === 'object' && e !== null) j = { code: e.code ?? undefined, error: e.message };
      } catch {
        // not JSON
      }
      const key = `${res.status} ${j.code}: ${String(j.error).slice(0, 90).replace(/\d+/g, 'N')}`;
      if (examples.has(key) || examples.size < 60) examples.set(key, (examples.get(key) ?? 0) + 1);
    }
    return String(res.status);
  } catch (err) {
    return `error:${(err as Error & { cause?: { code?: string } }).cause?.code ?? (err as Error).message}`;
  }
}

async function get(url: string, p: string): Promise<Outcome> {
  try {
    const res = await fetch(`${url}${p}`);
    await res.arrayBuffer();
    return String(res.status);
  } catch (err) {
    return `error:${(err as Error).message}`;
  }
}

/** A WebSocket generation; `leaveAfterAccepted` closes the socket once the request is queued (a client that leaves). */
function wsGenerate(port: number, inst: Record<string, unknown>, leaveAfterAccepted: boolean): Promise<Outcome> {
  return new Promise((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/models/model/stream`);
    let out: Outcome = 'ws:closed';
    const timer = setTimeout(() => (ws.terminate(), resolve('ws:stuck')), 30_000);
    ws.on('open', () => ws.send(JSON.stringify(inst)));
    ws.on('message', (d) => {
      const m = JSON.parse(String(d)) as { type: string; code?: string };
      if (m.type === 'accepted' && leaveAfterAccepted) {
        out = 'ws:left';
        ws.terminate();
      }
      if (m.type === 'result') out = 'ws:result';
      if (m.type === 'error') out = `ws:${m.code}`;
    });
    ws.on('error', () => (out = out === 'ws:closed' ? 'ws:error' : out));
    ws.on('close', () => {
      clearTimeout(timer);
      resolve(out);
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Traffic

const SCHEDULERS = [undefined, 'pndm', 'ddim', 'euler', 'euler_a', 'euler_karras', 'dpmpp_2m', 'dpmpp_2m_karras'];
const FORMATS = ['png', 'jpeg', 'webp'];
const SIZES = [64, 96, 128, 192, 256];
const LORA_SETS = [['demo-style'], ['demo-kohya'], [{ name: 'demo-style', scale: 0.5 }, 'demo-kohya']];
const PROMPTS = ['a red fox in the snow', 'a lighthouse at dusk, oil painting', 'an astronaut riding a horse', 'a bowl of ramen, studio photo', 'ein Haus am See', '猫の写真'];

interface Ctx {
  url: string;
  port: number;
  r: () => number;
  images: { png: string; jpeg: string; mask: string; alphaMask: Buffer };
  slowloris: Array<Promise<Outcome>>;
}

const pick = <T>(r: () => number, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
const int = (r: () => number, lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));

function instance(c: Ctx, o: { seed?: number; big?: boolean } = {}): Record<string, unknown> {
  const size = o.big ? pick(c.r, [384, 512]) : pick(c.r, SIZES);
  const sched = pick(c.r, SCHEDULERS);
  return {
    prompt: pick(c.r, PROMPTS), height: size, width: pick(c.r, [size, Math.min(256, size + 32)]), num_inference_steps: int(c.r, 1, o.big ? 12 : 6),
    seed: o.seed ?? int(c.r, 0, 2 ** 31), output_format: pick(c.r, FORMATS), ...(sched ? { scheduler: sched } : {}),
    ...(c.r() < 0.3 ? { negative_prompt: 'blurry' } : {}), ...(c.r() < 0.2 ? { guidance_scale: int(c.r, 1, 12) } : {}),
  };
}
const v1 = (insts: unknown[]) => JSON.stringify({ instances: insts });

/** An action: how many requests it counts as, and what it does. `ok`: the outcomes it may end with. */
interface Action {
  name: string;
  weight: number;
  count?: number;
  ok: readonly string[];
  run(c: Ctx): Promise<Outcome | Outcome[]>;
}

const PREDICT_OK = ['200', '503', '504'];
const PRED = '/v1/models/model:predict';

const ACTIONS: Action[] = [
  { name: 'v1', weight: 22, ok: PREDICT_OK, run: (c) => post(c.url, PRED, v1([instance(c)])) },
  { name: 'v1 larger', weight: 3, ok: PREDICT_OK, run: (c) => post(c.url, PRED, v1([instance(c, { big: true })])) },
  // A small pool of seeded requests: the result cache answers their repeats.
  { name: 'v1 cache hit', weight: 10, ok: PREDICT_OK, run: (c) => post(c.url, PRED, v1([{ prompt: PROMPTS[int(c.r, 0, 3)], seed: int(c.r, 1, 12), height: 64, width: 64, num_inference_steps: 2 }])) },
  {
    name: 'v1 batch', weight: 6, ok: PREDICT_OK,
    run: (c) => {
      const k = int(c.r, 2, 4);
      return post(c.url, PRED, v1(Array.from({ length: k }, () => ({ ...instance(c), height: 64, width: 64, num_images_per_prompt: int(c.r, 1, 2) }))));
    },
  },
  {
    name: 'v2', weight: 10, ok: PREDICT_OK,
    run: (c) => {
      const inst = instance(c);
      const prompts = c.r() < 0.3 ? [String(inst.prompt), pick(c.r, PROMPTS)] : [String(inst.prompt)];
      const { prompt: _p, ...params } = inst;
      return post(c.url, '/v2/models/model/infer', JSON.stringify({
        id: `soak-${int(c.r, 0, 1e9)}`, inputs: [{ name: 'prompt', shape: [prompts.length], datatype: 'BYTES', data: prompts }],
        parameters: { ...params, ...(c.r() < 0.3 ? { binary_data_output: true } : {}) },
      }));
    },
  },
  {
    name: 'img2img', weight: 8, ok: PREDICT_OK,
    run: (c) => {
      const withMask = c.r() < 0.25;
      const img = withMask || c.r() < 0.5 ? c.images.png : c.images.jpeg;
      const inst = instance(c);
      const strength = int(c.r, 3, 9) / 10;
      // strength × steps must leave a denoising step (a 400 otherwise, which the bad-body action already sends).
      const steps = Math.max(Number(inst.num_inference_steps), Math.ceil(1 / strength));
      return post(c.url, PRED, v1([{ ...inst, height: 64, width: 64, num_inference_steps: steps, image: img, strength, ...(withMask ? { mask_image: c.images.mask } : {}) }]));
    },
  },
  { name: 'lora', weight: 5, ok: PREDICT_OK, run: (c) => post(c.url, PRED, v1([{ ...instance(c), height: 64, width: 64, loras: pick(c.r, LORA_SETS) }])) },
  {
    name: 'websocket', weight: 8, ok: ['ws:result', 'ws:left', 'ws:BUSY', 'ws:TIMEOUT'],
    run: (c) => wsGenerate(c.port, { ...instance(c), ...(c.r() < 0.4 ? { preview_every: 1, num_inference_steps: 4 } : {}) }, c.r() < 0.25),
  },
  {
    name: 'bad body (400/404)', weight: 6, ok: ['400', '404'],
    run: (c) => {
      const bodies: Array<[string, string]> = [
        [PRED, '{"instances":[{"prompt":"x",'],
        [PRED, v1([{ prompt: 7 }])],
        [PRED, v1([{ prompt: 'x', width: 65, scheduler: 'no-such' }])],
        [PRED, v1([{ prompt: 'x', sampler_nmae: 'euler', extra: 1 }])],
        [PRED, v1([{ prompt: 'x', image: 'bm90IGFuIGltYWdl' }])],
        [PRED, v1([{ prompt: 'x', loras: ['no-such-adapter'] }])],
        [PRED, JSON.stringify({ nothing: true })],
        [`/v1/models/other-${int(c.r, 0, 1e6)}:predict`, v1([{ prompt: 'x' }])],
        ['/v2/models/model/infer', JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'FP32', data: [1] }] })],
      ];
      const [p, b] = pick(c.r, bodies);
      return post(c.url, p, b);
    },
  },
  {
    name: 'openai', weight: 4, ok: PREDICT_OK,
    run: (c) => {
      const inst = instance(c);
      const { prompt, height, width, ...rest } = inst;
      if (c.r() < 0.6) {
        return post(c.url, '/openai/v1/images/generations', JSON.stringify({ model: 'model', prompt, size: `${Math.min(Number(width), 128)}x${Math.min(Number(height), 128)}`, n: int(c.r, 1, 2), ...rest }));
      }
      // images/edits: multipart with the input picture (and sometimes a mask), as OpenAI's SDKs send it.
      const form = new FormData();
      form.set('prompt', String(prompt));
      form.set('size', '64x64');
      form.set('num_inference_steps', String(int(c.r, 2, 4)));
      form.set('strength', '0.8');
      form.set('image', new Blob([Buffer.from(c.images.png, 'base64')], { type: 'image/png' }), 'in.png');
      if (c.r() < 0.3) form.set('mask', new Blob([c.images.alphaMask], { type: 'image/png' }), 'mask.png');
      return fetch(`${c.url}/openai/v1/images/edits`, { method: 'POST', body: form }).then(async (res) => {
        const text = await res.text();
        if (res.status !== 200) {
          const key = `${res.status} edits: ${text.slice(0, 160).replace(/\d+/g, 'N')}`;
          if (examples.has(key) || examples.size < 60) examples.set(key, (examples.get(key) ?? 0) + 1);
        }
        return String(res.status);
      }, (err: Error) => `error:${err.message}`);
    },
  },
  {
    name: 'cloudevents', weight: 3, ok: PREDICT_OK,
    run: (c) => {
      const inst = { ...instance(c), height: 64, width: 64 };
      const id = `ev-${int(c.r, 0, 1e9)}`;
      if (c.r() < 0.5) {
        return post(c.url, PRED, v1([inst]), { 'ce-specversion': '1.0', 'ce-id': id, 'ce-source': `/soak/${int(c.r, 0, 1e6)}`, 'ce-type': `dev.soak.${int(c.r, 0, 1e6)}`, [`ce-x${int(c.r, 0, 1e6)}`]: 'v' });
      }
      return post(c.url, PRED, JSON.stringify({ specversion: '1.0', id, source: `/soak/${int(c.r, 0, 1e6)}`, type: 'dev.soak.generate', data: { instances: [inst] } }), { 'content-type': 'application/cloudevents+json' });
    },
  },
  {
    // Names from the client in every place a name goes: unknown paths, model names, adapters, OpenAI's model field.
    name: 'random names (404/400)', weight: 4, ok: ['400', '404', '405', 'ws:MODEL_NOT_FOUND', 'ws:closed', 'ws:error'],
    run: (c) => {
      const r = `${int(c.r, 0, 1e9).toString(36)}-${int(c.r, 0, 1e9)}`;
      const which = int(c.r, 0, 8);
      if (which === 0) return get(c.url, `/no/such/${r}`);
      if (which === 1) return get(c.url, `/v2/models/${r}/ready`);
      if (which === 2) return get(c.url, `/openai/v1/models/${r}`);
      if (which === 3) return post(c.url, `/v2/models/${r}/infer`, JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['x'] }] }));
      if (which === 4) return post(c.url, '/openai/v1/images/generations', JSON.stringify({ model: r, prompt: 'x' }));
      if (which === 5) return post(c.url, PRED, v1([{ prompt: 'x', height: 64, width: 64, loras: [`a${r}`] }]));
      if (which === 6) return post(c.url, `/v1/models/${r}:predict`, v1([{ prompt: 'x' }]));
      if (which === 7) return post(c.url, `/${r}`, '{}');
      return new Promise<Outcome>((resolve) => {
        const ws = new WebSocket(`ws://127.0.0.1:${c.port}/v1/models/${r}/stream`);
        let out: Outcome = 'ws:closed';
        ws.on('message', (d) => (out = `ws:${(JSON.parse(String(d)) as { code?: string }).code}`));
        ws.on('error', () => (out = 'ws:error'));
        ws.on('close', () => resolve(out));
      });
    },
  },
  {
    // The same seeded request from several clients at once: one generation runs, the others wait for its images
    // (generation.ts' single flight); some leave while they wait, or the one running leaves.
    name: 'identical at once', weight: 3, count: 3, ok: ['200', '503', '504', 'cut'],
    run: (c) => {
      const body = v1([{ prompt: pick(c.r, PROMPTS), seed: int(c.r, 0, 2 ** 31), height: 64, width: 64, num_inference_steps: int(c.r, 2, 6) }]);
      const leaver = int(c.r, -1, 2);
      return Promise.all([0, 1, 2].map((i) => i === leaver
        ? rawRequest(c.port, { parts: [{ data: httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }) + body }], cutAfterMs: int(c.r, 1, 60) })
        : post(c.url, PRED, body)));
    },
  },
  {
    // Scales from the client: each distinct one is an adapter set of its own (built, then evicted past LORA_MAX_SETS).
    name: 'lora scales', weight: 1, ok: PREDICT_OK,
    run: (c) => post(c.url, PRED, v1([{ ...instance(c), height: 64, width: 64, num_inference_steps: 2, loras: [{ name: pick(c.r, ['demo-style', 'demo-kohya']), scale: int(c.r, 1, 20) / 10 }] }])),
  },
  {
    name: 'oversize (413)', weight: 2, ok: ['declared:413', 'chunked:413'],
    run: (c) => {
      const body = Buffer.alloc(MAX_BODY + 4096, 'a');
      // Declared too large (refused before the body is read), or chunked and found too large while reading.
      const chunked = c.r() < 0.5;
      const headers: Record<string, string | number> = chunked ? { 'content-type': 'application/json', 'transfer-encoding': 'chunked' } : { 'content-type': 'application/json', 'content-length': body.length };
      const data = chunked ? Buffer.concat([Buffer.from(`${body.length.toString(16)}\r\n`), body, Buffer.from('\r\n0\r\n\r\n')]) : body;
      return rawRequest(c.port, { parts: [{ data: httpHead('POST', PRED, headers) }, { data }], maxMs: 10_000 }).then((o) => `${chunked ? 'chunked' : 'declared'}:${o}`);
    },
  },
  {
    name: 'left mid-request', weight: 4, ok: ['cut', '200'],
    run: (c) => {
      const body = v1([instance(c, { big: c.r() < 0.5 })]);
      return rawRequest(c.port, { parts: [{ data: httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }) + body }], cutAfterMs: int(c.r, 1, 120) });
    },
  },
  {
    name: 'left mid-body', weight: 3, ok: ['cut'],
    run: (c) => {
      const body = v1([instance(c)]);
      const half = Math.floor(body.length / 2);
      return rawRequest(c.port, { parts: [{ data: httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }) + body.slice(0, half) }], cutAfterMs: int(c.r, 1, 50) });
    },
  },
  {
    name: 'slow body', weight: 3, ok: PREDICT_OK,
    run: (c) => {
      const body = v1([{ ...instance(c), height: 64, width: 64 }]);
      const third = Math.ceil(body.length / 3);
      return rawRequest(c.port, {
        parts: [
          { data: httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' }) },
          { data: body.slice(0, third), delayMs: 60 }, { data: body.slice(third, 2 * third), delayMs: 60 }, { data: body.slice(2 * third), delayMs: 60 },
        ],
      });
    },
  },
  {
    name: 'slow reader', weight: 2, ok: ['200', 'left:closed', 'left:200', '503', '504'],
    run: (c) => {
      const body = v1([{ prompt: pick(c.r, PROMPTS), height: 512, width: 512, num_inference_steps: 2, seed: int(c.r, 0, 1e9) }]);
      const leave = c.r() < 0.5;
      return rawRequest(c.port, {
        parts: [{ data: httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' }) + body }],
        readAfterMs: 400, ...(leave ? { leaveAfterMs: 250 } : {}),
      });
    },
  },
  // Longer than REQUEST_TIMEOUT_S: stopped between steps, answered 504.
  { name: 'past REQUEST_TIMEOUT_S', weight: 0.4, ok: ['504', '503'], run: (c) => post(c.url, PRED, v1([{ prompt: 'slow', height: 1024, width: 1024, num_inference_steps: 500, seed: int(c.r, 0, 1e9) }])) },
  {
    name: 'burst over MAX_QUEUE', weight: 0.5, count: 2 * MAX_QUEUE, ok: ['200', '503', '504'],
    run: (c) => Promise.all(Array.from({ length: 2 * MAX_QUEUE }, () => post(c.url, PRED, v1([{ prompt: pick(c.r, PROMPTS), height: 64, width: 64, num_inference_steps: 2 }])))),
  },
  {
    name: 'pipelined', weight: 2, count: 2, ok: ['200+200', '200+503', '503+200', '503+503', '200+504', '504+200', '504+504', '503+504', '504+503'],
    run: (c) => {
      const body = v1([{ ...instance(c), height: 64, width: 64 }]);
      const one = httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }) + body;
      const last = httpHead('POST', PRED, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' }) + body;
      return rawRequest(c.port, { parts: [{ data: one + last }] });
    },
  },
  {
    name: 'probes and scrapes', weight: 5, ok: ['200'],
    run: (c) => get(c.url, pick(c.r, ['/v2/health/ready', '/v1/models/model', '/v1/models/model/ready', '/metrics', '/v2/models/model', '/v1/models'])),
  },
  {
    // A head that never ends: the server's headers timeout cuts it; not awaited (it takes that long).
    name: 'slow loris', weight: 0.3, ok: ['started'],
    run: async (c) => {
      c.slowloris.push(rawRequest(c.port, { parts: [{ data: `POST ${PRED} HTTP/1.1\r\nHost: 127.0.0.1\r\n` }], maxMs: 90_000 }));
      return 'started';
    },
  },
];

const PLAIN: Action = { name: 'plain v1', weight: 1, ok: ['200'], run: (c) => post(c.url, PRED, v1([{ prompt: 'a red fox in the snow', height: 64, width: 64, num_inference_steps: 2 }])) };

async function inputImages(): Promise<Ctx['images']> {
  const raw = Buffer.alloc(96 * 80 * 3);
  const r = rng(7);
  for (let i = 0; i < raw.length; i++) raw[i] = Math.floor(r() * 256);
  const img = () => sharp(raw, { raw: { width: 96, height: 80, channels: 3 } });
  const mask = Buffer.alloc(96 * 80);
  for (let y = 0; y < 80; y++) for (let x = 0; x < 96; x++) mask[y * 96 + x] = x > 48 ? 255 : 0;
  return {
    png: (await img().png().toBuffer()).toString('base64'),
    jpeg: (await img().jpeg({ quality: 80 }).toBuffer()).toString('base64'),
    mask: (await sharp(mask, { raw: { width: 96, height: 80, channels: 1 } }).png().toBuffer()).toString('base64'),
    // OpenAI's edits mask: transparent where the picture is to change.
    alphaMask: await sharp(raw, { raw: { width: 96, height: 80, channels: 3 } }).joinChannel(Buffer.from(mask.map((v) => 255 - v)), { raw: { width: 96, height: 80, channels: 1 } }).png().toBuffer(),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// A run

interface RunResult {
  kind: 'plain' | 'mixed';
  requests: number;
  seconds: number;
  deadlineHit: boolean;
  samples: Sample[];
  idle: Sample;
  /** Seconds until the server's sockets were back to their count before the traffic (or the wait gave up). */
  idleS: number;
  outcomes: Record<string, Record<string, number>>;
  unexpected: Record<string, Record<string, number>>;
  probeMs: { p50: number; p99: number; max: number; count: number };
  examples: Record<string, number>;
  exit: { code: number | null; signal: string | null };
  /** The server's trims (log `memory of ended LoRA adapter set threads given back`): seconds in, requests done, MB. */
  trims: Array<{ t: number; req: number; rssMB: number; returnedMB: number }>;
  /** The server's adapter set builds (log `adapter set built`, its `ms.total`): requests done, ms. */
  builds: Array<{ req: number; ms: number }>;
}

async function run(kind: 'plain' | 'mixed', cacheDir: string, images: Ctx['images']): Promise<RunResult> {
  const srv = await startServer(cacheDir);
  examples.clear();
  // The server's trims of ended adapter set threads' memory (lora-memory.ts): when, and what each gave back.
  const trims: RunResult['trims'] = [];
  const builds: RunResult['builds'] = [];
  let logTail = '';
  let completedNow = 0;
  srv.proc.stdout!.on('data', (chunk: string | Buffer) => {
    const lines = (logTail + String(chunk)).split('\n');
    logTail = lines.pop()!;
    for (const line of lines) {
      if (line.includes('"adapter set built"')) {
        try {
          builds.push({ req: completedNow, ms: Number((JSON.parse(line) as { ms?: { total?: number } }).ms?.total) });
        } catch {
          // not a log line
        }
        continue;
      }
      if (!line.includes('adapter set threads given back')) continue;
      try {
        const l = JSON.parse(line) as { rssMB?: number; returnedMB?: number };
        trims.push({ t: +((performance.now() - t0) / 1000).toFixed(1), req: completedNow, rssMB: l.rssMB ?? NaN, returnedMB: l.returnedMB ?? NaN });
      } catch {
        // not a log line
      }
    }
  });
  const c: Ctx = { url: srv.url, port: srv.port, r: rng(SEED + (kind === 'plain' ? 1 : 2)), images, slowloris: [] };
  const t0 = performance.now();
  const deadline = Date.now() + DEADLINE_S * 1000;
  const samples: Sample[] = [await sample(srv, 0, t0, cacheDir)];
  const outcomes: Record<string, Record<string, number>> = {};
  const unexpected: Record<string, Record<string, number>> = {};
  const note = (a: Action, o: Outcome) => {
    const tally = (m: typeof outcomes) => ((m[a.name] ??= {})[o] = (m[a.name]![o] ?? 0) + 1);
    tally(outcomes);
    if (!a.ok.includes(o)) tally(unexpected);
  };
  const actions = ONLY ? ACTIONS.filter((a) => ONLY.includes(a.name)) : ACTIONS;
  if (actions.length === 0) throw new Error(`BENCH_SOAK_ONLY names no action; the actions are: ${ACTIONS.map((a) => a.name).join(', ')}`);
  const total = actions.reduce((s, a) => s + a.weight, 0);
  const choose = (): Action => {
    if (kind === 'plain') return PLAIN;
    let x = c.r() * total;
    for (const a of actions) if ((x -= a.weight) < 0) return a;
    return actions[0]!;
  };

  let issued = 0;
  let completed = 0;
  let finished = false;
  // Probes: what a kubelet sees of the event loop, all along.
  const probeMs: number[] = [];
  const prober = (async () => {
    while (!finished) {
      const p0 = performance.now();
      await get(srv.url, '/v2/health/live');
      probeMs.push(performance.now() - p0);
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  let nextSample = EVERY;
  const sampler = (async () => {
    while (!finished || completed >= nextSample) {
      if (completed >= nextSample) {
        if (SNAPSHOT_SIGNAL && nextSample === Math.ceil(REQUESTS / 4 / EVERY) * EVERY) srv.proc.kill(SNAPSHOT_SIGNAL);
        const x = await sample(srv, completed, t0, cacheDir);
        delete x.keys;
        delete x.fdKinds;
        samples.push(x);
        nextSample += EVERY;
        if (samples.length % 10 === 1) {
          const s = samples.at(-1)!;
          process.stderr.write(`bench-soak ${kind}: ${s.req} requests, ${s.t.toFixed(0)} s, RSS ${s.rssMB.toFixed(1)} MB, heap ${((s.metrics.heapUsed ?? 0) / MB).toFixed(1)} MB, arenas ${s.arenaMB.main.toFixed(0)}+${s.arenaMB.others.toFixed(0)} MB, fds ${s.fds}, trims ${trims.length}\n`);
        }
      } else await new Promise((r) => setTimeout(r, 20));
    }
  })();
  const client = async () => {
    while (issued < REQUESTS && Date.now() < deadline) {
      const a = choose();
      const k = a.count ?? 1;
      issued += k;
      const out = await a.run(c);
      for (const o of Array.isArray(out) ? out : [out]) note(a, o);
      completed += k;
      completedNow = completed;
    }
  };
  await Promise.all(Array.from({ length: CLIENTS }, client));
  const seconds = (performance.now() - t0) / 1000;
  finished = true;
  await Promise.all([prober, sampler]);
  if (samples.at(-1)!.req !== completed) samples.push(await sample(srv, completed, t0, cacheDir));

  // Idle: slow loris heads cut by the server's headers timeout, and the clients' kept-alive connections closed (the
  // server's keep-alive timeout is 75 s, and fetch keeps a connection about as long as the server says it may).
  const lorisOut = await Promise.all(c.slowloris);
  for (const o of lorisOut) note({ name: 'slow loris (end)', weight: 0, ok: ['408', 'closed'], run: async () => '' }, o);
  const base = samples[0]!;
  const idleFrom = Date.now();
  const end = idleFrom + 100_000;
  let idle = await sample(srv, completed, t0, cacheDir);
  // Sockets only: a LoRA adapter set still cached holds its thread's fds (an event loop: eventpoll, eventfd, pipes).
  while (idle.sockets > base.sockets && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 2000));
    idle = await sample(srv, completed, t0, cacheDir);
  }
  const idleS = (Date.now() - idleFrom) / 1000;
  if (SNAPSHOT_SIGNAL) {
    srv.proc.kill(SNAPSHOT_SIGNAL);
    // Writing a snapshot stops the process's main thread; /metrics answers once it is done.
    await new Promise((r) => setTimeout(r, 1000));
    await scrape(srv.url);
  }
  const exit = await srv.stop();
  const ps = [...probeMs].sort((a, b) => a - b);
  return {
    kind, requests: completed, seconds, deadlineHit: Date.now() >= deadline, samples, idle, idleS, outcomes, unexpected,
    probeMs: { p50: +median(ps).toFixed(1), p99: +(ps[Math.floor(ps.length * 0.99)] ?? NaN).toFixed(1), max: +(ps.at(-1) ?? NaN).toFixed(1), count: ps.length },
    examples: Object.fromEntries(examples), exit: { code: exit.code, signal: exit.signal }, trims, builds,
  };
}

/** The series the run added, counted by metric name: a label taken from client input would show here without bound. */
function newSeries(first: Sample, idle: Sample): Record<string, number> {
  const before = new Set(first.keys ?? []);
  const out: Record<string, number> = {};
  for (const k of idle.keys ?? []) {
    if (before.has(k)) continue;
    const name = k.replace(/\{.*\}$/, '').replace(/_(bucket|sum|count)$/, '');
    out[name] = (out[name] ?? 0) + 1;
  }
  return out;
}

/** Fds open at idle that were not before the traffic, by what they point at. */
function fdDiff(first: Sample, idle: Sample): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of new Set([...Object.keys(first.fdKinds ?? {}), ...Object.keys(idle.fdKinds ?? {})])) {
    const d = (idle.fdKinds?.[k] ?? 0) - (first.fdKinds?.[k] ?? 0);
    if (d !== 0) out[k] = d;
  }
  return out;
}

function summary(r: RunResult) {
  const s = r.samples;
  const first = s[0]!;
  const last = s.at(-1)!;
  const m = (x: Sample, k: keyof typeof METRICS) => +((x.metrics[k] ?? NaN) / MB).toFixed(2);
  const g = (y: (x: Sample) => number) => growth(s, r.requests, y);
  const lag = s.slice(1).map((x) => (x.metrics.lagMax ?? NaN) * 1000).filter(Number.isFinite);
  const buildMs = (from: number) => {
    const ms = r.builds.filter((b) => b.req >= from && Number.isFinite(b.ms)).map((b) => b.ms).sort((a, b) => a - b);
    return { count: ms.length, median: +median(ms).toFixed(0), p90: ms[Math.floor(ms.length * 0.9)] ?? NaN };
  };
  const late = s.filter((x) => x.req >= r.requests / 2).map((x) => x.rssMB).sort((a, b) => a - b);
  const lagP99 = s.slice(1).map((x) => (x.metrics.lagP99 ?? NaN) * 1000).filter(Number.isFinite);
  return {
    requests: r.requests, seconds: +r.seconds.toFixed(1), requestsPerS: +(r.requests / r.seconds).toFixed(1), samples: s.length, deadlineHit: r.deadlineHit,
    slopeMBPer1k: {
      rss: g((x) => x.rssMB), treeRss: g((x) => x.treeRssMB), heapUsed: g((x) => (x.metrics.heapUsed ?? NaN) / MB),
      external: g((x) => (x.metrics.external ?? NaN) / MB), resultCache: g((x) => (x.metrics.resultCache ?? NaN) / MB),
    },
    slopePer1k: { fds: g((x) => x.fds), sockets: g((x) => x.sockets), handles: g((x) => x.metrics.handles ?? NaN), series: g((x) => x.series) },
    /** RSS over the samples of the run's second half: the level while the traffic goes on. */
    rssLateMB: { min: +(late[0] ?? NaN).toFixed(1), median: +median(late).toFixed(1), max: +(late.at(-1) ?? NaN).toFixed(1) },
    rssMB: { start: +first.rssMB.toFixed(1), half: +(s.find((x) => x.req >= r.requests / 2)?.rssMB ?? NaN).toFixed(1), end: +last.rssMB.toFixed(1), idle: +r.idle.rssMB.toFixed(1), hwm: +r.idle.hwmMB.toFixed(1) },
    treeRssMB: { start: +first.treeRssMB.toFixed(1), end: +last.treeRssMB.toFixed(1), children: Math.max(...s.map((x) => x.children)) },
    heapUsedMB: { start: m(first, 'heapUsed'), end: m(last, 'heapUsed'), max: +Math.max(...s.map((x) => (x.metrics.heapUsed ?? 0) / MB)).toFixed(2) },
    heapAfterGcMB: { start: m(first, 'gcHeap'), half: m(s.find((x) => x.req >= r.requests / 2) ?? last, 'gcHeap'), end: m(last, 'gcHeap'), idle: m(r.idle, 'gcHeap'), externalEnd: m(last, 'gcExternal'), slope: g((x) => (x.metrics.gcHeap ?? NaN) / MB) },
    externalMB: { start: m(first, 'external'), end: m(last, 'external') },
    resultCacheMB: { end: m(last, 'resultCache'), cap: CACHE_MB * 1.048576 },
    fds: { start: first.fds, max: Math.max(...s.map((x) => x.fds)), end: last.fds, idle: r.idle.fds },
    sockets: { start: first.sockets, max: Math.max(...s.map((x) => x.sockets)), end: last.sockets, idle: r.idle.sockets, idleAfterS: +r.idleS.toFixed(0) },
    threads: { start: first.threads, max: Math.max(...s.map((x) => x.threads)), idle: r.idle.threads },
    handles: { start: first.metrics.handles, max: Math.max(...s.map((x) => x.metrics.handles ?? 0)), idle: r.idle.metrics.handles },
    series: { start: first.series, end: last.series, idle: r.idle.series },
    newSeries: newSeries(first, r.idle),
    fdsAddedAtIdle: fdDiff(first, r.idle),
    diskMB: { start: +first.diskMB.toFixed(1), max: +Math.max(...s.map((x) => x.diskMB)).toFixed(1), idle: +r.idle.diskMB.toFixed(1), filesStart: first.diskFiles, filesIdle: r.idle.diskFiles },
    afterIdle: { inflight: r.idle.metrics.inflight, queue: r.idle.metrics.queue },
    adapterSetsBuilt: r.idle.metrics.adapterSetsBuilt ?? 0,
    /** Adapter set build times (ms), over the run and over its second half. */
    setBuildMs: { all: buildMs(0), late: buildMs(r.requests / 2) },
    eventLoopLagMs: { maxOfMax: +Math.max(...lag).toFixed(1), medianOfMax: +median(lag).toFixed(1), medianP99: +median(lagP99).toFixed(1) },
    probeMs: r.probeMs,
    outcomes: r.outcomes, unexpected: r.unexpected, examples: r.examples, exit: r.exit,
    arenaMB: { start: first.arenaMB, end: last.arenaMB, idle: r.idle.arenaMB },
    trims: r.trims,
    /** RSS and the other arenas' resident MB at each sample: the curve. */
    curve: s.map((x) => [x.req, +x.t.toFixed(0), +x.rssMB.toFixed(1), +x.arenaMB.others.toFixed(1)]),
  };
}

async function main(): Promise<void> {
  const tmp = { dir: mkdtempSync(path.join(os.tmpdir(), 'bench-soak-')) };
  try {
    const images = await inputImages();
    process.stderr.write(`bench-soak: ${REQUESTS} requests per run, ${CLIENTS} clients, runs ${RUNS.join(', ')}, seed ${SEED}\n`);
    const results: Record<string, ReturnType<typeof summary>> = {};
    for (const kind of RUNS) results[kind] = summary(await run(kind, path.join(tmp.dir, 'cache'), images));
    const cols = RUNS;
    const row = (label: string, f: (x: ReturnType<typeof summary>) => unknown) => `${label.padEnd(44)}${cols.map((k) => `  ${String(f(results[k]!)).padStart(32)}`).join('')}`;
    const lines = [
      `${''.padEnd(44)}${cols.map((k) => `  ${k.padStart(32)}`).join('')}`,
      row('requests (req/s)', (x) => `${x.requests} (${x.requestsPerS})`),
      row('RSS MB start / half / end / idle', (x) => `${x.rssMB.start} / ${x.rssMB.half} / ${x.rssMB.end} / ${x.rssMB.idle}`),
      row('RSS MB 2nd half min / median / max', (x) => `${x.rssLateMB.min} / ${x.rssLateMB.median} / ${x.rssLateMB.max}`),
      row('VmHWM MB', (x) => x.rssMB.hwm),
      row('slope RSS, MB/1k req (2nd half)', (x) => x.slopeMBPer1k.rss),
      row('slope RSS of process tree, MB/1k req', (x) => x.slopeMBPer1k.treeRss),
      row('slope main heap used, MB/1k req', (x) => x.slopeMBPer1k.heapUsed),
      row('slope external memory, MB/1k req', (x) => x.slopeMBPer1k.external),
      row('heap used MB start / end / max', (x) => `${x.heapUsedMB.start} / ${x.heapUsedMB.end} / ${x.heapUsedMB.max}`),
      row('heap after GC MB start / half / end / idle (slope)', (x) => (GC ? `${x.heapAfterGcMB.start} / ${x.heapAfterGcMB.half} / ${x.heapAfterGcMB.end} / ${x.heapAfterGcMB.idle} (${x.heapAfterGcMB.slope})` : 'not read (BENCH_SOAK_GC=1)')),
      row('result cache MB end (cap)', (x) => `${x.resultCacheMB.end} (${x.resultCacheMB.cap.toFixed(1)})`),
      row('fds start / max / end / idle', (x) => `${x.fds.start} / ${x.fds.max} / ${x.fds.end} / ${x.fds.idle}`),
      row('sockets start / max / end / idle (after s)', (x) => `${x.sockets.start} / ${x.sockets.max} / ${x.sockets.end} / ${x.sockets.idle} (${x.sockets.idleAfterS})`),
      row('fds added at idle (by kind)', (x) => Object.entries(x.fdsAddedAtIdle).map(([k, v]) => `${path.basename(k)} ${v > 0 ? '+' : ''}${v}`).join(', ') || 'none'),
      row('LoRA adapter sets built', (x) => x.adapterSetsBuilt),
      row('set build ms median / p90 (2nd half)', (x) => `${x.setBuildMs.all.median} / ${x.setBuildMs.all.p90} (${x.setBuildMs.late.median} / ${x.setBuildMs.late.p90})`),
      row('cache dir MB start / max / idle', (x) => `${x.diskMB.start} / ${x.diskMB.max} / ${x.diskMB.idle}`),
      row('threads start / max / idle', (x) => `${x.threads.start} / ${x.threads.max} / ${x.threads.idle}`),
      row('active handles start / max / idle', (x) => `${x.handles.start} / ${x.handles.max} / ${x.handles.idle}`),
      row('metric series start / end', (x) => `${x.series.start} / ${x.series.end}`),
      row('event-loop lag ms: max, median max, p99', (x) => `${x.eventLoopLagMs.maxOfMax}, ${x.eventLoopLagMs.medianOfMax}, ${x.eventLoopLagMs.medianP99}`),
      row('/v2/health/live ms p50 / p99 / max', (x) => `${x.probeMs.p50} / ${x.probeMs.p99} / ${x.probeMs.max}`),
      row('unexpected outcomes', (x) => Object.values(x.unexpected).reduce((s, o) => s + Object.values(o).reduce((a, b) => a + b, 0), 0)),
      row('malloc arenas MB main+others (heaps) end', (x) => `${x.arenaMB.end.main.toFixed(0)}+${x.arenaMB.end.others.toFixed(0)} (${x.arenaMB.end.heaps})`),
      row('malloc arenas MB main+others idle', (x) => `${x.arenaMB.idle.main.toFixed(0)}+${x.arenaMB.idle.others.toFixed(0)} (${x.arenaMB.idle.heaps})`),
      row('trims (RSS after, MB returned)', (x) => x.trims.map((t) => `${t.rssMB}/${t.returnedMB}`).join(' ') || 'none'),
      row('exit after SIGTERM', (x) => x.exit.code),
    ];
    if (results.plain && results.mixed) {
      lines.push(`mixed − plain RSS slope: ${(results.mixed.slopeMBPer1k.rss - results.plain.slopeMBPer1k.rss).toFixed(3)} MB per 1000 requests`);
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    for (const k of cols) {
      if (Object.keys(results[k]!.unexpected).length) process.stdout.write(`${k}: unexpected outcomes ${JSON.stringify(results[k]!.unexpected)}\n`);
    }
    process.stdout.write(`${JSON.stringify({ bench: 'soak', seed: SEED, requests: REQUESTS, clients: CLIENTS, sampleEvery: EVERY, cores: os.cpus().length, server: SERVER_ENV, runs: results })}\n`);
  } finally {
    rmSync(tmp.dir, { recursive: true, force: true });
  }
}

await main();
