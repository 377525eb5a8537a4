/**
 * Out of file descriptors beyond accepting connections (those: connections.test.ts). The built server and the warm-up
 * CLI under a low open-file limit (`ulimit -n`), s3rver on loopback: a boot from s3:// onto an empty cache and the
 * warm-up keep their ranges in flight within the limit, say so once, and commit what the bucket holds; a download whose
 * descriptors run out midway goes on with fewer ranges, and a boot whose fetch meets the shortage fetches again. With
 * every descriptor held by idle connections (MAX_CONNECTIONS=0), an adapter, an s3:// input image and an output_uri
 * upload are answered 503 TOO_MANY_OPEN_FILES with Retry-After, and served once the connections close (the code they
 * load on first use is not left failed for the rest of the process).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fsp, readdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { ListObjectsV2Command } from '@aws-sdk/client-s3';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDemoModel, type DemoManifest } from '../src/demo/index.js';
import { firstUse, shortage } from '../src/descriptors.js';
import { listenBase } from '../src/server/base.js';
import { rangesInFlight } from '../src/storage/plan.js';
import { bmp } from './helpers/images.js';
import { CREDS, destroyS3, putFolder, startFaultProxy, startS3, type S3Server } from './helpers/s3.js';
import { ROOT, startServer, tempDir, until, type LogLine, type ServerHandle } from './helpers/server.js';

const BUCKET = 'models';
const PREFIX = 'many/';
const under = (n: number) => ['sh', '-c', `ulimit -n ${n} && exec "$0" "$@"`];
/** `node -e script` (an ES module) under a limit of 64 descriptors: its exit code, stdout and stderr. */
async function nodeUnder64(script: string, cwd?: string): Promise<{ code: unknown; stdout: string; stderr: string }> {
  const [sh, ...args] = under(64);
  const child = spawn(sh!, [...args, process.execPath, '--input-type=module', '-e', script], { ...(cwd ? { cwd } : {}), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => (stdout += b));
  child.stderr.on('data', (b: Buffer) => (stderr += b));
  const code = await new Promise((r) => child.on('exit', r));
  return { code, stdout, stderr };
}
const sha = async (file: string) => createHash('sha256').update(await fsp.readFile(file)).digest('hex');
const LINK = { S3_MAX_CONCURRENCY: '24', S3_PART_SIZE: String(256 * 1024) };

let s3: S3Server;
let model: DemoManifest;
const dirs: Array<() => void> = [];
const newDir = (prefix: string) => {
  const d = tempDir(prefix);
  dirs.push(d.cleanup);
  return d.dir;
};

beforeAll(async () => {
  // 21 files, the largest in 256 KiB ranges: more than 24 ranges (a socket and a file each) wait from the start.
  model = await buildDemoModel(newDir('dr-fd-model-'), { padBytes: 3e6, withVaeEncoder: true });
  s3 = await startS3([BUCKET, 'loras', 'inputs', 'outputs']);
  await putFolder(s3, BUCKET, PREFIX, model.dir, model.files.map((f) => f.path));
}, 60_000);

afterAll(async () => {
  if (s3) await destroyS3(s3);
  for (const c of dirs) c();
});

const s3Env = (cacheDir: string) => ({ ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cacheDir, STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, ...LINK });

/** Every file of the committed entry equals the source's. */
async function expectCommitted(cacheDir: string): Promise<void> {
  const entry = readdirSync(cacheDir).find((d) => d.startsWith(`s3-${BUCKET}-`))!;
  const manifest = JSON.parse(await fsp.readFile(path.join(cacheDir, entry, '.complete.json'), 'utf8')) as { files: Array<{ path: string }> };
  expect(manifest.files.map((f) => f.path).sort()).toEqual(model.files.map((f) => f.path).sort());
  for (const f of model.files) expect(await sha(path.join(cacheDir, entry, f.path)), f.path).toBe(await sha(path.join(model.dir, f.path)));
}

const rangeWarnings = (lines: LogLine[]) => lines.filter((l) => l.msg === 'range failed; resuming');

describe('a download at a low open-file limit', () => {
  const LOW = 64;
  it('boots from s3:// with as many ranges in flight as the limit leaves room for, says so once, and commits the source', async () => {
    const cache = newDir('dr-fd-cache-');
    // Some 25 descriptors are open when the download starts, and S3_MAX_CONCURRENCY=24 ranges would want 48 more.
    // Before, the first one refused was a range's (CACHE_IO, the boot failed), a module the runtime still had to load
    // (the process ended with a stack trace), or nothing with luck: never this, and never without retried ranges.
    // The limit leaves the start itself room: while it loads, the process briefly holds ~56 (strace: 29 module files
    // that the loaders of the main and worker threads read side by side, the threads' event loops and pipes, stdio), so
    // at 56 one start in six hit EMFILE; at 48 a loaded machine's start did too when it held ~41.
    const srv = await startServer({ ...s3Env(cache), EXECUTION_PROVIDER: 'cpu' }, { prefix: under(LOW) });
    try {
      await srv.waitReady(60_000);
      const bounded = srv.logs.filter((l) => String(l.msg).startsWith(`the open-file limit (${LOW}) leaves room for`));
      expect(bounded).toHaveLength(1);
      expect(bounded[0]).toMatchObject({ level: 'warn', maxConcurrency: 24, descriptorLimit: LOW });
      // Fewer ranges than asked for, as the limit allows.
      expect(bounded[0]!.ranges).toBeLessThan(24);
      expect(bounded[0]!.msg).toMatch(/ranges in flight, not S3_MAX_CONCURRENCY=24; raise the pod's open-file limit \(nofile\) or lower S3_MAX_CONCURRENCY$/);
      expect(rangeWarnings(srv.logs)).toEqual([]);
      expect(srv.logs.filter((l) => l.level === 'error')).toEqual([]);
      await expectCommitted(cache);
    } finally {
      await srv.stop();
    }
    expect(srv.stderr.join('')).toBe('');
  });

  it('the warm-up CLI does too, and exits 0', async () => {
    const cache = newDir('dr-fd-warm-');
    const run = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const [sh, ...args] = under(40);
      const child = spawn(sh!, [...args, process.execPath, path.join(ROOT, 'dist', 'warmup', 'main.js')],
        { env: { PATH: process.env.PATH ?? '', ...s3Env(cache) }, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.stderr.on('data', (c) => (stderr += c));
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });
    // Before: exit 1 with `warmup: CACHE_IO: the model cache (MODEL_CACHE_DIR) refused open of "….partial": EMFILE`, or
    // 0 after dozens of ranges retried.
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toMatchObject({ files: model.files.length, fromCache: false });
    const warnings = run.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as LogLine);
    expect(warnings.map((w) => w.msg)).toEqual([expect.stringMatching(/^the open-file limit \(40\) leaves room for \d+ ranges? in flight, not S3_MAX_CONCURRENCY=24; /)]);
    await expectCommitted(cache);
  });

  it('fetches again when connections took every descriptor meanwhile (MAX_CONNECTIONS=0), and gets ready once they close', async () => {
    const LIMIT = 128;
    let answerList!: () => void;
    const proxy = await startFaultProxy(s3.port, { holdLists: new Promise<void>((r) => (answerList = r)) });
    const cache = newDir('dr-fd-again-');
    const srv = await startServer({ ...s3Env(cache), AWS_ENDPOINT_URL: proxy.endpoint, EXECUTION_PROVIDER: 'cpu', MAX_CONNECTIONS: '0' }, { prefix: under(LIMIT) });
    let release: (() => void) | undefined;
    try {
      // The runtime is loaded ('listening'), and so is sharp (code caught loading by the flood would stay failed:
      // descriptors.ts firstUse); the listing is held, and answered once every descriptor is taken.
      await until(() => srv.logs.some((l) => l.msg === 'sharp imported'), 10_000, 10);
      release = await holdIdle({ port: srv.port, pid: srv.proc.pid! }, LIMIT + 40, LIMIT);
      delete proxy.faults.holdLists;
      answerList();
      const again = 'the model fetch ran out of file descriptors; trying again';
      await until(() => srv.logs.some((l) => l.msg === again), 15_000, 20);
      release();
      // Before: failed for good (`CACHE_IO: … refused open: EMFILE`).
      await srv.waitReady(60_000);
      const retried = srv.logs.filter((l) => l.msg === again);
      expect(retried[0]).toMatchObject({ level: 'warn', attempt: 1, reason: expect.stringMatching(/: too many open files \(EMFILE\): the process is at its open-file limit \(128\); /) });
      expect(srv.logs.filter((l) => l.level === 'error')).toEqual([]);
      await expectCommitted(cache);
    } finally {
      release?.();
      await srv.stop();
      await proxy.close();
    }
  });

  it('goes on with fewer ranges when descriptors run out during the download, takes them up again once they are free, and commits the source', async () => {
    const cache = newDir('dr-fd-hog-');
    // Paced, so the download outlasts the shortage and the workers' first look for free descriptors (after 1 s).
    const proxy = await startFaultProxy(s3.port, { bytesPerSecond: 250_000, exactPace: true });
    // The process takes every descriptor it has left once S3 first answers, and frees them once the download says it
    // goes on with fewer ranges: ranges that need a new socket or file meet EMFILE. Before: the first file that could
    // not be opened failed the download (CACHE_IO).
    const out = await new Promise<string>((resolve) => {
      const [sh, ...args] = under(256);
      const child = spawn(sh!, [...args, process.execPath, path.join(ROOT, 'test', 'helpers', 'hog-fetch.mjs')],
        { env: { PATH: process.env.PATH ?? '', ...s3Env(cache), AWS_ENDPOINT_URL: proxy.endpoint, S3_MAX_CONCURRENCY: '8', S3_MAX_ATTEMPTS: '4' }, stdio: ['ignore', 'pipe', 'inherit'] });
      let stdout = '';
      child.stdout.on('data', (c) => (stdout += c));
      child.on('close', () => resolve(stdout));
    }).finally(() => proxy.close());
    const r = JSON.parse(out) as { ok: boolean; message?: string; held: number; lines: LogLine[] };
    expect(r.held).toBeGreaterThan(0);
    expect(r.ok, r.message).toBe(true);
    const fewer = r.lines.filter((l) => String(l.msg).startsWith('out of file descriptors'));
    expect(fewer).toEqual([expect.objectContaining({ level: 'warn', reason: 'EMFILE', descriptorLimit: 256,
      msg: "out of file descriptors (EMFILE): fewer ranges in flight until descriptors are free again; raise the pod's open-file limit (nofile) or lower S3_MAX_CONCURRENCY" })]);
    // Before: the ranges left stayed with the one or two workers that had their descriptors.
    const again = r.lines.filter((l) => String(l.msg).startsWith('file descriptors free again'));
    expect(again).toEqual([expect.objectContaining({ level: 'info', msg: 'file descriptors free again: taking more ranges in flight' })]);
    await expectCommitted(cache);
  }, 60_000);

  it('plans the ranges from the limit, the descriptors open and a reserve', () => {
    expect(rangesInFlight(24, undefined, 30)).toBe(24);
    expect(rangesInFlight(24, 1_048_576, 30)).toBe(24);
    expect(rangesInFlight(24, 1024, 30)).toBe(24);
    expect(rangesInFlight(24, 100, 26)).toBe(21);
    expect(rangesInFlight(24, 48, 26)).toBe(1);
    expect(rangesInFlight(24, 20, 26)).toBe(1);
  });
});

/** One request on a connection opened before (a new one could not be accepted); resolves with its whole answer. */
function ask(sock: net.Socket, body: unknown): Promise<{ status: number; headers: Record<string, string>; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    let got = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      got = Buffer.concat([got, d]);
      const text = got.toString('latin1');
      const end = text.indexOf('\r\n\r\n');
      const length = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end))?.[1];
      if (end < 0 || length === undefined || got.length < end + 4 + Number(length)) return;
      sock.off('data', onData).off('close', onClose);
      const headers: Record<string, string> = {};
      for (const line of text.slice(0, end).split('\r\n').slice(1)) headers[line.slice(0, line.indexOf(':')).toLowerCase()] = line.slice(line.indexOf(':') + 1).trim();
      resolve({ status: Number(text.slice(9, 12)), headers, json: JSON.parse(got.subarray(end + 4).toString('utf8')) as Record<string, unknown> });
    };
    const onClose = () => reject(new Error('closed before the whole answer'));
    sock.on('data', onData).on('close', onClose);
    const b = JSON.stringify(body);
    sock.write(`POST /v1/models/model:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(b)}\r\n\r\n${b}`);
  });
}

const connect = (port: number) => new Promise<net.Socket>((resolve, reject) => {
  const s = net.connect(port, '127.0.0.1', () => resolve(s)).on('error', reject);
});

/** Whether process `pid` has every descriptor number below `limit` open: the next one it opens fails with EMFILE. */
const descriptorsFull = (pid: number, limit: number): boolean => {
  const open = new Set(readdirSync(`/proc/${pid}/fd`).map(Number));
  for (let fd = 0; fd < limit; fd++) if (!open.has(fd)) return false;
  return true;
};

/**
 * `n` connections that send nothing, until released: each one the server accepted holds one of its descriptors.
 * Returns once the server (process `pid`, at `limit` descriptors) has none left: a client's connection is complete
 * before the server accepts it (it had 73 of 128 when the last one here connected), and past the limit libuv accepts
 * and closes at once what waits. A fixed 300 ms stood for that.
 */
async function holdIdle(srv: { port: number; pid: number }, n: number, limit: number): Promise<() => void> {
  const socks: net.Socket[] = [];
  const more = (k: number) => Promise.all(Array.from({ length: k }, () => new Promise<void>((resolve) => {
    const s = net.connect(srv.port, '127.0.0.1', () => resolve());
    s.on('error', () => resolve()).on('close', () => resolve());
    socks.push(s);
  })));
  await more(n);
  // A descriptor the server freed meanwhile (one of these it accepted and closed, a file it read) is taken by a few
  // more connections, every half second, until none is left.
  let topped = performance.now();
  await until(async () => {
    if (descriptorsFull(srv.pid, limit)) return true;
    if (performance.now() - topped > 500) {
      await more(4);
      topped = performance.now();
    }
    return false;
  }, 20_000, 10);
  return () => socks.forEach((s) => s.destroy());
}

/** How many connections the server counts open (MAX_CONNECTIONS=0: all of them), this one's included; NaN if none came. */
function connectionsOpen(port: number): Promise<number> {
  return new Promise((resolve) => {
    let got = '';
    const s = net.connect(port, '127.0.0.1', () => s.write('GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'));
    s.on('data', (d: Buffer) => (got += d.toString('utf8')));
    s.on('error', () => undefined);
    s.on('close', () => resolve(Number(/^http_connections_open\{[^}]*state="within"[^}]*\} (\d+)$/m.exec(got)?.[1] ?? NaN)));
  });
}

const instance = (extra: Record<string, unknown>) => ({ instances: [{ prompt: 'fd', num_inference_steps: 1, height: 64, width: 64, seed: 1, ...extra }] });

describe('requests while every descriptor is taken (MAX_CONNECTIONS=0, ulimit -n 128)', () => {
  const LIMIT = 128;
  let srv: ServerHandle;
  let cache: string;
  beforeAll(async () => {
    const kohya = await fsp.readFile(path.join(model.dir, 'loras', 'demo-kohya.safetensors'));
    await s3.put('loras', 'adapters/from-s3/pytorch_lora_weights.safetensors', kohya);
    await s3.put('loras', 'adapters/later/pytorch_lora_weights.safetensors', kohya);
    const png = (r: number) => sharp({ create: { width: 64, height: 64, channels: 3, background: { r, g: 40, b: 90 } } }).png().toBuffer();
    await s3.put('inputs', 'a.png', await png(200));
    await s3.put('inputs', 'b.png', await png(20));
    cache = newDir('dr-fd-serve-');
    srv = await startServer({
      ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model.dir, MODEL_CACHE_DIR: cache, EXECUTION_PROVIDER: 'cpu',
      LORA_URI: 's3://loras/adapters/', INPUT_URI_PREFIXES: 's3://inputs', MAX_CONNECTIONS: '0', WARMUP_STEPS: '1',
    }, { ready: true, prefix: under(LIMIT) });
  });
  afterAll(async () => {
    await srv?.stop();
  });

  /** Sends each request on a connection opened before `LIMIT` more are held, then again once they are let go. */
  async function starved(reqs: Record<string, unknown>): Promise<{ during: Record<string, Awaited<ReturnType<typeof ask>>>; after: Record<string, Awaited<ReturnType<typeof ask>>> }> {
    const socks = Object.fromEntries(await Promise.all(Object.keys(reqs).map(async (k) => [k, await connect(srv.port)] as const)));
    const release = await holdIdle({ port: srv.port, pid: srv.proc.pid! }, LIMIT, LIMIT);
    const during: Record<string, Awaited<ReturnType<typeof ask>>> = {};
    try {
      // In turn: each waits for its own answer.
      for (const [k, body] of Object.entries(reqs)) during[k] = await ask(socks[k]!, body);
    } finally {
      release();
    }
    // Room again once the server has closed its side of the held connections: it counts the requests' own at most, and
    // the scrape's (it answered liveness while it still held some, and a fixed 300 ms stood for the rest).
    await until(async () => (await connectionsOpen(srv.port)) <= Object.keys(reqs).length + 1, 10_000, 50);
    const after: Record<string, Awaited<ReturnType<typeof ask>>> = {};
    for (const [k, body] of Object.entries(reqs)) {
      const s = await connect(srv.port);
      after[k] = await ask(s, body);
      s.destroy();
    }
    for (const s of Object.values(socks)) s.destroy();
    return { during, after };
  }

  const refused = (what: RegExp) => ({
    status: 503,
    headers: expect.objectContaining({ 'retry-after': '5' }),
    json: { code: 'TOO_MANY_OPEN_FILES', error: expect.stringMatching(new RegExp(`${what.source}.*: too many open files \\(EMFILE\\): the process is at its open-file limit \\(${LIMIT}\\); `)) },
  });

  it('answers an adapter, an s3:// input and an output_uri 503 with Retry-After, and serves them once descriptors are back', async () => {
    const reqs = {
      folder: instance({ loras: [{ name: 'demo-style', scale: 1 }] }),
      loraUri: instance({ loras: [{ name: 'from-s3', scale: 1 }] }),
      input: instance({ image: 's3://inputs/a.png', strength: 0.5 }),
      output: instance({ output_uri: 's3://outputs/first.png' }),
      plain: instance({ seed: 2 }),
    };
    const { during, after } = await starved(reqs);
    // Before: 500 INTERNAL (the adapter thread could not start), 502 UPSTREAM "…refused open: EMFILE", 500 "internal
    // error" twice; and the last three stayed so for the life of the process (a failed import is never tried again).
    expect(during.folder).toMatchObject(refused(/^the adapter set's thread could not start/));
    expect(during.loraUri).toMatchObject(refused(/^adapter "from-s3" could not be looked up/));
    expect(during.input).toMatchObject(refused(/^the S3 client \(AWS SDK\) could not be loaded/));
    expect(during.output).toMatchObject(refused(/^the S3 client \(AWS SDK\) could not be loaded/));
    // What needs no new descriptor is served all along.
    expect(during.plain!.status).toBe(200);
    for (const [k, r] of Object.entries(after)) expect(r.status, `${k}: ${JSON.stringify(r.json)}`).toBe(200);
    expect(after.output!.json.predictions).toEqual([expect.objectContaining({ image: { uri: 's3://outputs/first.png' } })]);
    // The adapter's cache entry is committed whole, from the request that could fetch it.
    const entry = readdirSync(cache).find((d) => d.startsWith('s3-loras-adapters-from-s3-'))!;
    expect(readdirSync(path.join(cache, entry)).sort()).toEqual(['.complete.json', 'pytorch_lora_weights.safetensors']);
    expect(await sha(path.join(cache, entry, 'pytorch_lora_weights.safetensors'))).toBe(await sha(path.join(model.dir, 'loras', 'demo-kohya.safetensors')));
    expect(srv.proc.exitCode).toBeNull();
  });

  it('the same once their code is loaded: a socket to S3 that cannot be opened is a 503 too, and nothing is stored', async () => {
    // Closing s3rver's side of the request client's kept-alive sockets: the next request to S3 needs a new one.
    await s3.stop();
    await s3.restart();
    const reqs = {
      input: instance({ image: 's3://inputs/b.png', strength: 0.5 }),
      output: instance({ output_uri: 's3://outputs/second.png' }),
      loraUri: instance({ loras: [{ name: 'later', scale: 1 }] }),
      // Built above and kept (LORA_MAX_SETS): its sessions need no descriptor.
      cachedSet: instance({ loras: [{ name: 'demo-style', scale: 1 }] }),
    };
    const stored = async () => ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'outputs' }))).Contents ?? []).map((o) => o.Key).sort();
    const { during, after } = await starved(reqs);
    expect(during.input).toMatchObject(refused(/^instances\[0\]\.image: reading s3:\/\/inputs\/b\.png failed/));
    expect(during.output).toMatchObject(refused(/^output_uri: upload to s3:\/\/outputs\/second\.png failed; the images were generated but not stored/));
    expect(during.loraUri).toMatchObject(refused(/^adapter "later" could not be looked up/));
    expect(during.cachedSet!.status).toBe(200);
    for (const [k, r] of Object.entries(after)) expect(r.status, `${k}: ${JSON.stringify(r.json)}`).toBe(200);
    expect(await stored()).toEqual(['first.png', 'second.png']);
    expect(srv.stderr.join('')).toBe('');
  });

  it('a BMP input, whose decoding thread needs descriptors for its event loop, is a 503 too, and decoded once they are back', async () => {
    const pixels = Buffer.alloc(64 * 64 * 3, 90);
    const { during, after } = await starved({ bmp: instance({ image: bmp(64, 64, 24, pixels).toString('base64'), strength: 0.5 }) });
    // Before: 500 INTERNAL ("the BMP decoding thread failed: … EMFILE"), as for a defect.
    expect(during.bmp).toMatchObject(refused(/^instances\[0\]\.image: the BMP decoding thread could not start/));
    expect(after.bmp!.status, JSON.stringify(after.bmp!.json)).toBe(200);
  });
});

describe('what counts as running out of descriptors', () => {
  it('EMFILE and ENFILE, also inside a cause and in a worker thread that could not start; nothing else', () => {
    expect(shortage(Object.assign(new Error('x'), { code: 'EMFILE' }))).toBe('EMFILE');
    expect(shortage(new Error('wrapped', { cause: Object.assign(new Error('x'), { code: 'ENFILE' }) }))).toBe('ENFILE');
    expect(shortage(Object.assign(new Error('Worker initialization failure: EMFILE'), { code: 'ERR_WORKER_INIT_FAILED' }))).toBe('EMFILE');
    expect(shortage(Object.assign(new Error('Worker initialization failure: ENOMEM'), { code: 'ERR_WORKER_INIT_FAILED' }))).toBeUndefined();
    expect(shortage(Object.assign(new Error('x'), { code: 'ENOENT' }))).toBeUndefined();
    expect(shortage(undefined)).toBeUndefined();
  });
});

/**
 * The cache's locks and leases read while the process has no descriptor left, in a child process under `ulimit -n 64`
 * (this test's own process keeps its descriptors). A lease or lock file that cannot be read says nothing about it.
 */
describe('cache locks and leases out of descriptors', () => {
  const script = `
    import { closeSync, openSync, readdirSync, utimesSync, existsSync } from 'node:fs';
    import { promises as fsp } from 'node:fs';
    import os from 'node:os';
    import path from 'node:path';
    const { leaseEntry, leaseState, leasesDir } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/storage/lease.js'))});
    const { acquireLock } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/storage/lock.js'))});
    const hog = [];
    const starve = () => { try { for (;;) hog.push(openSync('/dev/null', 'r')); } catch {} };
    const free = () => { for (const fd of hog.splice(0)) closeSync(fd); };
    const cache = await fsp.mkdtemp(path.join(os.tmpdir(), 'dr-fd-lease-'));
    const entry = path.join(cache, 's3-models-m-0123');
    await fsp.mkdir(entry);
    const lease = await leaseEntry(entry, { heartbeatMs: 60_000 });
    // Past the unreadable-file grace, well within a lease's life.
    const file = path.join(leasesDir(entry), readdirSync(leasesDir(entry)).find((n) => n.endsWith('.lease')));
    const ago = new Date(Date.now() - 20_000);
    utimesSync(file, ago, ago);
    const out = { live: (await leaseState(entry)).live.length };
    starve();
    out.starved = await leaseState(entry).then((s) => 'live ' + s.live.length, (e) => e.code);
    free();
    await lease.release();
    const lockFile = path.join(cache, 'entry.lock');
    const lock = await acquireLock(lockFile, { heartbeatMs: 100, staleMs: 3000, pollMs: 50 });
    starve();
    await lock.release();
    free();
    out.lockLeft = existsSync(lockFile);
    const t0 = Date.now();
    const again = await acquireLock(lockFile, { heartbeatMs: 100, staleMs: 3000, pollMs: 50 });
    out.reacquireMs = Date.now() - t0;
    await again.release();
    await fsp.rm(cache, { recursive: true });
    console.log(JSON.stringify(out));
  `;

  it('an evictor counts a lease it cannot read as a refusal, not as no lease; a lock released without a descriptor is still removed', async () => {
    const { code, stdout, stderr } = await nodeUnder64(script);
    expect(code, stderr).toBe(0);
    const out = JSON.parse(stdout.trim().split('\n').pop()!) as { live: number; starved: string; lockLeft: boolean; reacquireMs: number };
    // Before: 'live 0' (the lease folder unread, so the entry looked unused and evictable) and the lock file left
    // behind, the next acquire waiting ~3 s (staleMs) on this very process.
    expect(out).toEqual({ live: 1, starved: 'EMFILE', lockLeft: false, reacquireMs: expect.any(Number) });
    expect(out.reacquireMs).toBeLessThan(2_000);
  }, 30_000);
});

describe('code that could not be loaded for good', () => {
  it('fails liveness once an import ran out of descriptors midway (Node keeps the failure): the kubelet restarts the pod', async () => {
    const base = await listenBase('127.0.0.1', 0);
    const live = async () => {
      const r = await fetch(`http://127.0.0.1:${base.port}/v2/health/live`);
      return [r.status, await r.json()];
    };
    try {
      expect(await live()).toEqual([200, { live: true }]);
      // An import that met EMFILE partway (firstUse found descriptors free, another thread took them meanwhile).
      const emfile = Object.assign(new Error("EMFILE: too many open files, open '/app/node_modules/sharp/package.json'"), { code: 'EMFILE' });
      const load = firstUse('sharp', () => Promise.reject(emfile));
      await expect(load()).rejects.toMatchObject({ code: 'INTERNAL', message: expect.stringContaining('restart the server') });
      // Before: {"live":true} for good, and every generation failed at its PNG until someone restarted the pod.
      expect(await live()).toEqual([503, { live: false, error: 'sharp could not be loaded (the process ran out of file descriptors while loading it) and cannot be loaded again in this process: restart it' }]);
      const root = await fetch(`http://127.0.0.1:${base.port}/`);
      expect(root.status).toBe(503);
    } finally {
      base.closeListener();
      base.closeConnections();
    }
  });
});

/**
 * The model's load while the process has no descriptor left (a download or connections took them), in a child process
 * under `ulimit -n 64`: ONNX Runtime's own failure to open the graph, and a tokenizer file, are a shortage the boot
 * waits out (TOO_MANY_OPEN_FILES), not the cache volume's failure.
 */
describe('the model loaded out of descriptors', () => {
  const script = (dir: string) => `
    import { closeSync, openSync } from 'node:fs';
    import path from 'node:path';
    const ort = (await import('onnxruntime-node')).default;
    const { loadError } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/pipeline/failures.js'))});
    const { ClipTokenizer } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/pipeline/tokenizer.js'))});
    const dir = ${JSON.stringify(dir)};
    const hog = [];
    const starve = () => { try { for (;;) hog.push(openSync('/dev/null', 'r')); } catch {} };
    const free = () => { for (const fd of hog.splice(0)) closeSync(fd); };
    const graph = path.join(dir, 'unet', 'model.onnx');
    starve();
    const session = await ort.InferenceSession.create(graph).then(() => 'created', (e) => loadError('unet', graph, e));
    const tokenizer = await ClipTokenizer.load(path.join(dir, 'tokenizer')).then(() => 'loaded', (e) => e);
    free();
    const seen = (e) => (typeof e === 'string' ? e : { code: e.code, message: e.message, errno: e.cause?.code });
    console.log(JSON.stringify({ session: seen(session), tokenizer: seen(tokenizer) }));
  `;

  it('is TOO_MANY_OPEN_FILES, naming the file inside the model', async () => {
    const { code, stdout, stderr } = await nodeUnder64(script(model.dir), ROOT);
    expect(code, stderr).toBe(0);
    const out = JSON.parse(stdout.trim().split('\n').pop()!) as Record<string, { code: string; message: string; errno: string }>;
    // Before: CACHE_IO ("… could not be read: open failed with EMFILE (the volume that holds the model failed …)"),
    // which no boot tried again.
    const refused = (what: string) => ({ code: 'TOO_MANY_OPEN_FILES', errno: 'EMFILE',
      message: expect.stringMatching(new RegExp(`^${what} could not be read: too many open files \\(EMFILE\\): the process is at its open-file limit \\(64\\); if it persists, raise the pod's open-file limit \\(nofile\\)$`)) });
    expect(out).toEqual({ session: refused('unet(/model\\.onnx)?'), tokenizer: refused('tokenizer: tokenizer/[a-z_.]+') });
    expect(JSON.stringify(out)).not.toContain(model.dir);
  }, 30_000);
});
