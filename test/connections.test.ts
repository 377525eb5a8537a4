/**
 * Connection overload and the open-file limit, over real sockets on loopback. The built server under a low descriptor
 * limit (`ulimit -n`) with more idle connections held than the limit allows: it stays up, probes are answered, other
 * requests get 503 + Retry-After, one warning names the limit, and it serves again once the connections close. The
 * cap itself (MAX_CONNECTIONS) on the in-process runtime. Long measurements: `npm run bench:connections`.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { descriptorLimit } from '../src/descriptors.js';
import { autoMaxConnections, listenBase, type BaseServer } from '../src/server/base.js';
import { loadConfig } from '../src/config.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { startServer, until, type ServerHandle } from './helpers/server.js';

/** Opens `n` TCP connections that send nothing; resolves once each is connected or closed. */
async function holdIdle(port: number, n: number): Promise<{ socks: net.Socket[]; closed: () => number; release: () => void }> {
  const socks: net.Socket[] = [];
  let closed = 0;
  await Promise.all(
    Array.from({ length: n }, () => new Promise<void>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => resolve());
      s.on('error', () => undefined);
      s.on('close', () => (closed++, resolve()));
      socks.push(s);
    })),
  );
  return { socks, closed: () => closed, release: () => socks.forEach((s) => s.destroy()) };
}

interface Answer { status: number; headers: Record<string, string>; body: string }

/**
 * One request on a connection of its own, closed after the answer (as kubelet's probes): a client pool's kept-alive
 * connections would count against the cap. Resolves with the answer, or `{ error }` if none came within 5 s.
 */
function ask(port: number, method: string, path: string, body?: string): Promise<Answer | { error: string }> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => {
      const head = `${method} ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n${body === undefined ? '' : `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n`}\r\n`;
      s.write(head + (body ?? ''));
    });
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => (s.destroy(), resolve({ error: 'timeout' })), 5000);
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('error', (err: NodeJS.ErrnoException) => (clearTimeout(timer), resolve({ error: err.code ?? err.message })));
    s.on('close', () => {
      clearTimeout(timer);
      const text = Buffer.concat(chunks).toString('utf8');
      const m = /^HTTP\/1\.1 (\d{3})[^\r]*\r\n([\s\S]*?)\r\n\r\n([\s\S]*)$/.exec(text);
      if (!m) return resolve({ error: text === '' ? 'closed without an answer' : 'not HTTP' });
      const headers: Record<string, string> = {};
      for (const line of m[2]!.split('\r\n')) headers[line.slice(0, line.indexOf(':')).toLowerCase()] = line.slice(line.indexOf(':') + 1).trim();
      resolve({ status: Number(m[1]), headers, body: m[3]! });
    });
  });
}

/** Calls `onAnswer` with each whole answer (status and body) that arrives on the kept-alive connection `s`. */
function onAnswers(s: net.Socket, onAnswer: (status: number, body: Buffer) => void): void {
  let got = Buffer.alloc(0);
  s.on('data', (d: Buffer) => {
    got = Buffer.concat([got, d]);
    for (;;) {
      const end = got.indexOf('\r\n\r\n');
      const length = end < 0 ? undefined : /\r\ncontent-length: *(\d+)/i.exec(got.toString('latin1', 0, end))?.[1];
      if (length === undefined || got.length < end + 4 + Number(length)) return;
      onAnswer(Number(got.toString('latin1', 9, 12)), got.subarray(end + 4, end + 4 + Number(length)));
      got = got.subarray(end + 4 + Number(length));
    }
  });
}

/**
 * A request on a kept-alive connection that stays open after its answer, so the connection keeps its place within
 * the cap whenever the generation ends. Resolves `status` with the answer's status code once the whole answer is in.
 */
function keptAlive(port: number, path: string, body: string): { status: Promise<number>; release: () => void } {
  const s = net.connect(port, '127.0.0.1', () =>
    s.write(`POST ${path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`));
  s.on('error', () => undefined);
  const status = new Promise<number>((resolve, reject) => {
    onAnswers(s, (code) => resolve(code));
    s.on('close', () => reject(new Error('closed before the whole answer')));
  });
  status.catch(() => undefined);
  return { status, release: () => s.destroy() };
}

interface Watcher {
  /** A metric's value now, summed over the series that have `labels`. */
  metric(name: string, labels?: Record<string, string>): Promise<number>;
  /** Waits until the server counts `n` connections within the cap, this one included. */
  within(n: number): Promise<void>;
  close(): void;
}

/**
 * Reads /metrics on one kept-alive connection within the cap. A connection per scrape takes a place within the cap
 * and frees it again, and is answered 503 once the cap is full; this one keeps its place, so the count within moves
 * only with the test's own connections and can be read while the cap is full. Opened again until the server counts
 * it within (one it accepted beyond the cap gets 503 and is closed).
 */
async function watch(port: number): Promise<Watcher> {
  for (const end = Date.now() + 5_000; ;) {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => undefined);
    let pending: { resolve: (text: string) => void; reject: (err: Error) => void } | undefined;
    onAnswers(s, (status, body) => {
      const p = pending;
      pending = undefined;
      if (status === 200) p?.resolve(body.toString('utf8'));
      else p?.reject(new Error(`GET /metrics: ${status}`));
    });
    s.on('close', () => pending?.reject(new Error('GET /metrics: the connection closed')));
    const scrape = () => new Promise<string>((resolve, reject) => {
      pending = { resolve, reject };
      s.write('GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n');
    });
    if ((await scrape().catch(() => undefined)) === undefined) {
      s.destroy();
      if (Date.now() > end) throw new Error('no place within the cap for the connection that reads /metrics');
      await new Promise((r) => setTimeout(r, 25));
      continue;
    }
    const metric = async (name: string, labels: Record<string, string> = {}) => {
      let sum = 0;
      for (const line of (await scrape()).split('\n')) {
        const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$/.exec(line);
        if (m && m[1] === name && Object.entries(labels).every(([k, v]) => (m[2] ?? '').includes(`${k}="${v}"`))) sum += Number(m[3]);
      }
      return sum;
    };
    return {
      metric,
      within: (n) => until(async () => (await metric('http_connections_open', { state: 'within' })) === n, 10_000, 10),
      close: () => s.destroy(),
    };
  }
}

const PREDICT = (steps = 1) => JSON.stringify({ instances: [{ prompt: 'fd', num_inference_steps: steps, height: 64, width: 64, seed: 1 }] });
const PREDICT_PATH = '/v1/models/model:predict';

/** A WebSocket upgrade request on a raw socket; resolves with the status line of the answer. */
function upgrade(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () =>
      s.write('GET /v1/models/model/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n'));
    let got = '';
    s.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\r\n')) (resolve(got.slice(0, got.indexOf('\r\n'))), s.destroy());
    });
    s.on('error', () => resolve('error'));
    s.on('close', () => resolve(got === '' ? 'closed' : got.slice(0, got.indexOf('\r\n'))));
  });
}

describe('at the open-file limit (ulimit -n 320, more idle connections than descriptors)', () => {
  const LIMIT = 320;
  let srv: ServerHandle;
  beforeAll(async () => {
    // The boot needs some 25 descriptors (measured): 320 leaves it room, and MAX_CONNECTIONS unset gives the automatic cap.
    srv = await startServer({ STORAGE_URI: undefined, MAX_CONNECTIONS: undefined }, { ready: true, prefix: ['sh', '-c', `ulimit -n ${LIMIT} && exec "$0" "$@"`] });
  });
  afterAll(async () => {
    await srv?.stop();
  });

  it('stays up, answers probes, refuses other requests with 503 + Retry-After, warns once, and serves again after', async () => {
    const cap = autoMaxConnections(LIMIT);
    const port = srv.port;
    const w = await watch(port);
    try {
      expect(await w.metric('process_runtime_process_max_fds')).toBe(LIMIT);
      expect(await w.metric('http_connections_max')).toBe(cap);
      // A request in flight on a connection opened before the flood is answered. Its connection stays open after the
      // answer, so the cap is still full whenever the generation ends.
      const inflight = keptAlive(port, PREDICT_PATH, PREDICT(400));
      await until(async () => (await w.metric('inference_requests_in_flight')) === 1, 10_000, 10);
      // Only these two are open within the cap, and the server fills the cap with the flood's connections, which stay
      // open: no place within it frees up later for the requests below to take (a fixed wait stood for this).
      await w.within(2);
      const idle = await holdIdle(port, LIMIT + 80);
      await w.within(cap);
      try {
        for (const path of ['/v2/health/live', '/v2/health/ready']) {
          const r = await ask(port, 'GET', path);
          expect(r, path).toMatchObject({ status: 200, headers: { connection: 'close' } });
        }
        const refused = await ask(port, 'POST', PREDICT_PATH, PREDICT());
        expect(refused).toMatchObject({ status: 503, headers: { 'retry-after': '1', connection: 'close' } });
        expect(JSON.parse((refused as Answer).body)).toMatchObject({ code: 'BUSY', error: expect.stringContaining(`MAX_CONNECTIONS=${cap}`) });
        expect(await upgrade(port)).toBe('HTTP/1.1 503 Service Unavailable');
        expect(await inflight.status).toBe(200);
        expect(srv.proc.exitCode).toBeNull();
      } finally {
        idle.release();
        inflight.release();
      }
      await w.within(1);
      expect(await ask(port, 'POST', PREDICT_PATH, PREDICT())).toMatchObject({ status: 200 });
      expect(await ask(port, 'GET', '/v2/health/ready')).toMatchObject({ status: 200 });
      // One warning for the whole flood, naming the cap and the descriptor limit.
      const warnings = srv.logs.filter((l) => l.level === 'warn' && String(l.msg).startsWith('connection limit reached'));
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatchObject({ maxConnections: cap, descriptorLimit: LIMIT });
      // The predict and the upgrade.
      expect(await w.metric('http_connections_refused_total', { reason: 'over_limit' })).toBe(2);
      expect(await w.metric('http_connections_refused_total', { reason: 'dropped' })).toBeGreaterThan(0);
    } finally {
      w.close();
    }
    expect(srv.stderr.join('')).toBe('');
  });
});

describe('MAX_CONNECTIONS on the runtime', () => {
  let rt: RuntimeHandle;
  beforeAll(async () => {
    rt = await startRuntime({ STORAGE_URI: undefined, MAX_CONNECTIONS: '4' }, { ready: true });
  });
  afterAll(async () => {
    await rt?.stop();
  });

  it('serves four connections; a fifth gets health, 503 for the rest; room again once one closes', async () => {
    const port = rt.port;
    const held = await holdIdle(port, 4);
    try {
      expect(await ask(port, 'GET', '/v2/health/live')).toMatchObject({ status: 200 });
      expect(await ask(port, 'HEAD', '/')).toMatchObject({ status: 200 });
      // The per-model readiness routes are probes too (README); the model's status is not.
      expect(await ask(port, 'GET', '/v2/models/model/ready')).toMatchObject({ status: 200 });
      expect(await ask(port, 'GET', '/v1/models/model/ready')).toMatchObject({ status: 200 });
      expect(await ask(port, 'GET', '/v1/models/model')).toMatchObject({ status: 503, headers: { 'retry-after': '1' } });
      // Kept-alive connections within the cap go on serving.
      held.socks[0]!.write('GET /v1/models/model HTTP/1.1\r\nHost: x\r\n\r\n');
      const answer = await new Promise<string>((resolve) => held.socks[0]!.once('data', (d: Buffer) => resolve(d.toString('latin1'))));
      expect(answer).toMatch(/^HTTP\/1\.1 200 /);
      held.socks[1]!.destroy();
      await until(async () => ((await ask(port, 'GET', '/v1/models/model')) as Answer).status === 200, 5_000, 25);
    } finally {
      held.release();
    }
  });

  it('closes a connection beyond the cap that sends no request within 2 s, and lets a newer one push the oldest out', async () => {
    const port = rt.port;
    // The server counts a connection closed once it has seen its client close it: wait until only the watching
    // connection is open, then until the three below hold the rest of the cap.
    const w = await watch(port);
    await w.within(1);
    const held = await holdIdle(port, 3);
    await w.within(4);
    // The server's 2 s wait runs on the test's clock (only setTimeout is faked, while the wait is armed and run): on the
    // wall clock, a machine too busy to run the test for 2 s let the 32 time out before it counted the 8 pushed out.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    try {
      // 40 beyond the cap: 32 may wait at once, so 8 are pushed out at once, the others after 2 s.
      const beyond = await holdIdle(port, 40);
      const closed = async (n: number) => {
        while (beyond.closed() < n) await new Promise((r) => setImmediate(r));
      };
      await closed(8);
      expect(beyond.closed()).toBe(8);
      // A probe among them is still answered; its connection pushes one more out.
      expect(await ask(port, 'GET', '/v2/health/ready')).toMatchObject({ status: 200 });
      await closed(9);
      expect(beyond.closed()).toBe(9);
      await vi.advanceTimersByTimeAsync(1_999);
      expect(beyond.closed()).toBe(9);
      await vi.advanceTimersByTimeAsync(1);
      await closed(40);
      // The held ones are within the cap: still open.
      expect(held.closed()).toBe(0);
    } finally {
      vi.useRealTimers();
      held.release();
    }
    await until(async () => ((await ask(port, 'GET', '/v1/models/model')) as Answer).status === 200, 5_000, 25);
    // 8 pushed out, 32 timed out; the probe beyond the cap was answered.
    expect(await w.metric('http_connections_refused_total', { reason: 'dropped' })).toBe(40);
    w.close();
  });

  it('answers a request past the cap with its 503 when the client writes the whole body before reading, never a reset', async () => {
    const port = rt.port;
    // The cap full of connections that stay open (a fixed wait stood for the server counting the earlier ones closed):
    // a place freed later would let one of the requests below be served.
    const w = await watch(port);
    await w.within(1);
    const held = await holdIdle(port, 3);
    await w.within(4);
    // Closing with the body's rest unread makes the kernel reset the connection, which can beat the answer.
    const body = 'a'.repeat(4 * 1024 * 1024);
    const once = () => new Promise<string>((resolve) => {
      const sock = net.connect(port, '127.0.0.1', () => sock.write(`POST ${PREDICT_PATH} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`));
      let got = '';
      let error: string | undefined;
      sock.on('data', (d: Buffer) => (got += d.toString('latin1')));
      sock.on('error', (e: NodeJS.ErrnoException) => (error = e.code));
      sock.on('close', () => resolve(error ?? got.split('\r\n')[0]!));
    });
    try {
      const runs: string[] = [];
      for (let i = 0; i < 20; i++) runs.push(await once());
      expect(runs.filter((r) => r !== 'HTTP/1.1 503 Service Unavailable')).toEqual([]);
    } finally {
      held.release();
      w.close();
    }
  }, 60_000);
});

describe('accept failures that reach the server', () => {
  let base: BaseServer;
  const warnings: Array<{ fields: Record<string, unknown>; msg: string }> = [];
  beforeAll(async () => {
    base = await listenBase('127.0.0.1', 0);
    base.setWarn((fields, msg) => warnings.push({ fields, msg }));
  });
  afterAll(() => {
    base.closeListener();
    base.closeConnections();
  });

  it('are counted and warned about once, not thrown: the process goes on serving', async () => {
    // What net.js's onconnection does when libuv reports a failed accept (its reserve-descriptor trick lost the race
    // to another thread): without a listener on 'error' this throws, and the process ends.
    const emfile = Object.assign(new Error('accept EMFILE'), { code: 'EMFILE', errno: -24, syscall: 'accept' });
    expect(() => {
      (base.server as EventEmitter).emit('error', emfile);
      (base.server as EventEmitter).emit('error', emfile);
    }).not.toThrow();
    expect(base.connections.acceptFailed).toBe(2);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.msg).toContain('open-file limit');
    expect(warnings[0]!.fields).toMatchObject({ code: 'EMFILE' });
    expect((await fetch(`http://127.0.0.1:${base.port}/v2/health/live`)).status).toBe(200);
  });
});

describe('MAX_CONNECTIONS and the descriptor limit', () => {
  it('reads the soft limit from /proc/self/limits', () => {
    const text = 'Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n';
    expect(descriptorLimit(text)).toBe(1024);
    expect(descriptorLimit(text.replace('1024 ', 'unlimited '))).toBeUndefined();
    if (process.platform === 'linux') expect(descriptorLimit()).toBeGreaterThan(0);
  });

  it('keeps a reserve below the limit: an eighth, at least 256', () => {
    expect(autoMaxConnections(undefined)).toBe(0);
    expect(autoMaxConnections(1024)).toBe(768);
    expect(autoMaxConnections(1_048_576)).toBe(917_504);
    expect(autoMaxConnections(300)).toBe(64);
  });

  it('parses auto, 0 and a count, and names a bad value', () => {
    expect(loadConfig({}).maxConnections).toBeUndefined();
    expect(loadConfig({ MAX_CONNECTIONS: 'AUTO' }).maxConnections).toBeUndefined();
    expect(loadConfig({ MAX_CONNECTIONS: '0' }).maxConnections).toBe(0);
    expect(loadConfig({ MAX_CONNECTIONS: '5000' }).maxConnections).toBe(5000);
    for (const bad of ['-1', '1.5', 'many', '20000000']) expect(() => loadConfig({ MAX_CONNECTIONS: bad })).toThrow(/MAX_CONNECTIONS must be auto, 0 \(no cap\) or a number/);
  });
});

describe('a client that is answered on the raw socket and never reads', () => {
  let base: BaseServer;
  beforeAll(async () => {
    base = await listenBase('127.0.0.1', 0, { maxConnections: 0 });
  });
  afterAll(() => {
    base.closeListener();
    base.closeConnections();
  });

  it('does not keep its descriptor: the socket is destroyed 2 s after the answer', async () => {
    // A malformed request is answered 400 on the raw socket, as a head that never finishes is answered 408 after 15 s.
    // The 2 s run on the test's clock (only setTimeout is faked, while they are armed and run): a busy machine stretched
    // them past the 4 s the test gave on the wall clock.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    const socks = await Promise.all(Array.from({ length: 5 }, () => new Promise<net.Socket>((resolve) => {
      const s = net.connect(base.port, '127.0.0.1', () => (s.pause(), s.write('NOT HTTP\r\n\r\n'), resolve(s)));
      s.on('error', () => undefined);
    })));
    const turn = () => new Promise((r) => setImmediate(r));
    try {
      // Each answered, and its destroy armed.
      while (base.connections.open < 5 || vi.getTimerCount() < 5) await turn();
      await vi.advanceTimersByTimeAsync(1_999);
      expect(base.connections.open).toBe(5);
      await vi.advanceTimersByTimeAsync(1);
      while (base.connections.open > 0) await turn();
    } finally {
      vi.useRealTimers();
      socks.forEach((s) => s.destroy());
    }
  });
});

describe('answers once the listener is closed (SIGTERM)', () => {
  it('close their connection, and an answer\'s own Connection options (a 426\'s upgrade) stay beside close', async () => {
    const base = await listenBase('127.0.0.1', 0, { maxConnections: 0 });
    base.app.get('/426', (_req, res) => void res.writeHead(426, { upgrade: 'websocket', connection: 'upgrade', 'content-length': 0 }).end());
    const sock = net.connect(base.port, '127.0.0.1');
    let got = '';
    const heads: string[] = [];
    const waiters: Array<() => void> = [];
    sock.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      for (let at = got.indexOf('\r\n\r\n'); at >= 0; at = got.indexOf('\r\n\r\n')) {
        heads.push(got.slice(0, at));
        got = got.slice(at + 4);
        waiters.shift()?.();
      }
    });
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    const ask = () => new Promise<string>((r) => {
      waiters.push(() => r(heads.at(-1)!));
      sock.write('GET /426 HTTP/1.1\r\nHost: x\r\n\r\n');
    });
    const connection = (head: string) => /^connection: (.*)$/im.exec(head)?.[1];
    try {
      expect(connection(await ask())).toBe('upgrade');
      base.closeListener();
      expect(connection(await ask())).toBe('upgrade, close');
      await closed;
    } finally {
      sock.destroy();
      base.closeConnections();
    }
  });
});
