/**
 * Silence bounds against a pause of this process (src/storage/silence.ts): each turn of the event loop runs its due
 * timers before it reads its sockets, so a process held past a bound (a long synchronous task, a loaded machine) saw a
 * silence timer fire before the bytes that had come meanwhile were read, and cut a range or a request still receiving.
 * The pause here is a busy loop in the check phase (setImmediate), after which the next turn starts with the timers: the
 * way a synchronous task anywhere in the runtime's main thread ends. Each unit case keeps a plain timer beside the bound
 * as its control: the control must be fooled (the pause landed where it matters), the bound must not.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { promises as fsp } from 'node:fs';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deadline } from '../src/deadline.js';
import { createLogger } from '../src/log.js';
import { resolveModel } from '../src/storage/fetch.js';
import { boundSocketSilence, silenceTimer } from '../src/storage/silence.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, rejection, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';
import { until } from './helpers/server.js';

/** Holds this process's event loop for `ms`, from its next check phase (as a synchronous task would). */
const hold = (ms: number) => new Promise<void>((resolve) => setImmediate(() => {
  const end = performance.now() + ms;
  while (performance.now() < end);
  resolve();
}));

type Kind = 'tcp' | 'http' | 'late' | 'sink' | 'stall' | 'tls-stall' | 'no-accept';

/**
 * A peer in a process of its own, so that its bytes keep coming (or going) while this one is held: `tcp` writes a byte
 * every 20 ms for 3 s and then keeps the connection open, silent; `http` answers a GET with a body sent the same way;
 * `late` answers a GET's head after 100 ms; `sink` reads a request's body a chunk every 2 ms (a slow link up: ~20 MB/s
 * here, so the kernel takes a large write in steps well under 0.1 s apart); `stall` reads as `sink` for 2 s, then no
 * more (a link that stops); `tls-stall` the same over TLS (test/fixtures/tls) a chunk every 1 ms for 2.5 s; `no-accept`
 * listens with a backlog of 1 and never accepts (its thread blocked, not spinning), so that once two connections wait
 * in its queue the next one's connect hangs.
 */
async function sender(kind: Kind): Promise<{ port: number; child: ChildProcess }> {
  const script = `
    const net = require('node:net'), http = require('node:http'), https = require('node:https'), fs = require('node:fs'), path = require('node:path');
    const kind = ${JSON.stringify(kind)};
    const trickle = (write) => { const i = setInterval(() => write('.'), 20); setTimeout(() => clearInterval(i), 3000); };
    const read = (req, everyMs, forMs) => {
      const t0 = Date.now();
      req.on('data', () => { req.pause(); if (Date.now() - t0 < forMs) setTimeout(() => req.resume(), everyMs); });
    };
    const onRequest = (req, res) => {
      if (kind === 'sink') read(req, 2, Infinity);
      else if (kind === 'stall') read(req, 2, 2000);
      else if (kind === 'tls-stall') read(req, 1, 2500);
      else if (kind === 'late') { req.resume(); setTimeout(() => res.writeHead(200, { 'content-length': '0' }).end(), 100); }
      else { req.resume(); res.writeHead(200); trickle((b) => res.write(b)); }
    };
    const tlsDir = ${JSON.stringify(path.join(import.meta.dirname, 'fixtures', 'tls'))};
    const server = kind === 'tcp' || kind === 'no-accept' ? net.createServer((s) => trickle((b) => s.write(b)))
      : kind === 'tls-stall' ? https.createServer({ key: fs.readFileSync(path.join(tlsDir, 'server.key')), cert: fs.readFileSync(path.join(tlsDir, 'server.pem')) }, onRequest)
      : http.createServer(onRequest);
    server.listen({ port: 0, host: '127.0.0.1', backlog: kind === 'no-accept' ? 1 : 511 }, () => {
      process.stdout.write(server.address().port + '\\n');
      if (kind === 'no-accept') setTimeout(() => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0), 50);
    });`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.once('data', (d: Buffer) => resolve(Number(String(d).trim())));
    child.once('exit', (code) => reject(new Error(`sender exited ${code}`)));
  });
  return { port, child };
}

const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) c.kill();
});
const start = async (kind: Kind) => {
  const s = await sender(kind);
  children.push(s.child);
  return s.port;
};

/** The write queue of `req`'s TCP handle (under TLS, the handle beneath the TLS wrapper). */
const tcpQueue = (req: http.ClientRequest) => {
  const h = (req.socket as unknown as { _handle?: { writeQueueSize?: number; _parent?: { writeQueueSize?: number } } } | null)?._handle;
  return h?._parent?.writeQueueSize ?? h?.writeQueueSize ?? 0;
};

describe('silence bounds judged after what the sockets hold', () => {
  it('silenceTimer: a process held 3× past the bound while bytes keep coming is no silence; the sender\'s silence still is, once', async () => {
    const port = await start('tcp');
    const socket = net.connect(port, '127.0.0.1');
    await new Promise((r) => socket.once('data', r));
    let controlFired = 0;
    const control = setTimeout(() => controlFired++, 200);
    let silent = 0;
    let silentAt = 0;
    const bound = silenceTimer(200, () => {
      silent++;
      silentAt = performance.now();
    });
    socket.on('data', () => {
      control.refresh();
      bound.beat();
    });
    await new Promise((r) => setTimeout(r, 100));
    await hold(600);
    await new Promise((r) => setTimeout(r, 100));
    expect(controlFired).toBe(1); // the premise: a plain timer took the pause for silence
    expect(silent).toBe(0);
    // The sender stops writing 3 s after it began: silence, told once, about 200 ms after its last byte.
    let lastByte = performance.now();
    socket.on('data', () => (lastByte = performance.now()));
    await until(() => silent > 0, 5_000);
    expect(silentAt - lastByte).toBeGreaterThanOrEqual(190);
    await new Promise((r) => setTimeout(r, 500));
    expect(silent).toBe(1);
    bound.clear();
    clearTimeout(control);
    socket.destroy();
  });

  it('silenceTimer: clear() stops a bound whose time ran out, even between its timer and the read after it', async () => {
    let silent = 0;
    const bound = silenceTimer(20, () => silent++);
    // The timer fires during the first turn after the hold; clear() in that turn's timers, before the check phase.
    setTimeout(() => bound.clear(), 25);
    await hold(100);
    await new Promise((r) => setTimeout(r, 100));
    expect(silent).toBe(0);
  });

  it('boundSocketSilence: a request still receiving while this process is held is not cut; silent once the answer stops coming', async () => {
    const port = await start('http');
    const req = http.get({ host: '127.0.0.1', port, path: '/', agent: false });
    let controlFired = 0;
    // Node's own bound, on the same socket timer: the control.
    req.setTimeout(200, () => controlFired++);
    let silent = 0;
    boundSocketSilence(req, 200, () => silent++);
    const res = await new Promise<http.IncomingMessage>((r) => req.once('response', r));
    let received = 0;
    let lastByte = performance.now();
    res.on('data', (d: Buffer) => {
      received += d.length;
      lastByte = performance.now();
    });
    await new Promise((r) => setTimeout(r, 100));
    await hold(600);
    await new Promise((r) => setTimeout(r, 100));
    expect(controlFired).toBe(1);
    expect(silent).toBe(0);
    // After the hold the bytes go on: the bound watches still.
    const before = received;
    await until(() => silent > 0, 5_000);
    expect(received).toBeGreaterThan(before);
    expect(performance.now() - lastByte).toBeGreaterThanOrEqual(190);
    await new Promise((r) => setTimeout(r, 500));
    expect(silent).toBe(1);
    req.destroy();
  });

  it('boundSocketSilence: a request body still draining to a slow reader while this process is held is not cut (its write queue moved)', async () => {
    const port = await start('sink');
    const req = http.request({ host: '127.0.0.1', port, path: '/', method: 'PUT', agent: false });
    req.on('error', () => undefined);
    let silent = 0;
    boundSocketSilence(req, 400, () => silent++);
    // 64 MiB: more than the kernel's buffers hold, read at ~20 MB/s: still draining well after the hold.
    req.end(Buffer.alloc(64 * 1024 * 1024, 1));
    await new Promise((r) => setTimeout(r, 300));
    const queued = tcpQueue(req);
    await hold(1_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(tcpQueue(req)).toBeLessThan(queued); // still draining
    expect(tcpQueue(req)).toBeGreaterThan(0);
    // Whether the socket's timer fired after the hold depends on where its last look fell (the stand-in socket's case
    // below pins each order); whichever, the drain read after it is no silence.
    expect(silent).toBe(0);
    req.destroy();
  });

  it('boundSocketSilence: a body found draining after the hold is still bounded: silent once its write queue stands', async () => {
    const port = await start('stall');
    const req = http.request({ host: '127.0.0.1', port, path: '/', method: 'PUT', agent: false });
    req.on('error', () => undefined);
    let silent = 0;
    boundSocketSilence(req, 400, () => silent++);
    req.end(Buffer.alloc(64 * 1024 * 1024, 1));
    // When the write queue last moved, seen each turn or so.
    let last = tcpQueue(req);
    let movedAt = performance.now();
    const sampler = setInterval(() => {
      if (tcpQueue(req) !== last) [last, movedAt] = [tcpQueue(req), performance.now()];
    }, 5);
    await new Promise((r) => setTimeout(r, 300));
    await hold(1_000);
    await new Promise((r) => setTimeout(r, 300));
    expect(silent).toBe(0);
    // The reader stops 2 s after the request came. Before: the socket's timer, fired and not set again (no write
    // ended, nothing read), never fired again.
    await until(() => silent > 0, 5_000);
    const silentAfter = performance.now() - movedAt;
    clearInterval(sampler);
    expect(tcpQueue(req)).toBeGreaterThan(0); // the write had not ended: only the queue could tell the drain
    // Told once the queue stood for the bound (less the sampler's lag on a loaded machine), not while it moved.
    expect(silentAfter).toBeGreaterThanOrEqual(350);
    await new Promise((r) => setTimeout(r, 900));
    expect(silent).toBe(1);
    req.destroy();
  });

  it('boundSocketSilence over TLS: a body draining steadily is not cut (the TCP queue beneath the TLS wrapper moves, the wrapper\'s stands), and is once its reader stops', async () => {
    const port = await start('tls-stall');
    const t0 = performance.now();
    const req = https.request({ host: '127.0.0.1', port, path: '/', method: 'PUT', agent: false, ca: readFileSync(path.join(import.meta.dirname, 'fixtures', 'tls', 'ca.pem')) });
    req.on('error', () => undefined);
    let controlAt: number | undefined;
    req.setTimeout(600, () => (controlAt ??= performance.now() - t0));
    let silentAt: number | undefined;
    let silent = 0;
    boundSocketSilence(req, 600, () => {
      silent++;
      silentAt ??= performance.now() - t0;
    });
    req.end(Buffer.alloc(64 * 1024 * 1024, 1));
    await new Promise((r) => setTimeout(r, 2_200));
    // The premise: Node's own bound, which compares the TLS wrapper's queue, took the steady drain for silence.
    expect(controlAt).toBeLessThan(2_200);
    // Before: cut within two bounds of the start, as Node's.
    expect(silent).toBe(0);
    // The reader stops 2.5 s after the request came: told within two bounds of that, the write not ended.
    await until(() => silent > 0, 5_000);
    expect(silentAt).toBeGreaterThanOrEqual(2_500);
    expect(tcpQueue(req)).toBeGreaterThan(0);
    await new Promise((r) => setTimeout(r, 1_300));
    expect(silent).toBe(1);
    req.destroy();
  });

  it('boundSocketSilence: a connect that hangs is silence too (Node\'s req.setTimeout starts only once connected)', async () => {
    const port = await start('no-accept');
    // Wait for its thread to block, then fill its queue (a backlog of 1 holds two): later connects hang.
    await new Promise((r) => setTimeout(r, 200));
    const filled = [0, 1, 2].map(() => net.connect(port, '127.0.0.1').on('error', () => undefined));
    try {
      await until(() => filled.filter((f) => !f.connecting).length === 2, 5_000);
      const control = http.request({ host: '127.0.0.1', port, path: '/', agent: false });
      control.on('error', () => undefined);
      let controlFired = 0;
      control.setTimeout(300, () => controlFired++);
      control.end();
      const req = http.request({ host: '127.0.0.1', port, path: '/', agent: false });
      req.on('error', () => undefined);
      let silent = 0;
      let connecting: boolean | undefined;
      boundSocketSilence(req, 300, () => {
        silent++;
        connecting = req.socket?.connecting;
        req.destroy();
      });
      req.end();
      await until(() => silent > 0, 5_000);
      await new Promise((r) => setTimeout(r, 300));
      // Before: nothing bounded it until the LIST's 60 s cap (the lite transport's global agent had given it 5 s).
      expect([silent, connecting]).toEqual([1, true]);
      expect([controlFired, control.socket?.connecting]).toEqual([0, true]);
      control.destroy();
    } finally {
      for (const f of filled) f.destroy();
    }
  });

  it('boundSocketSilence, the verdict on a stand-in socket: a write queue that moved since the last look, or moves before the check, is no silence; one that stood is, once; under TLS the TCP handle\'s queue counts', async () => {
    const immediate = () => new Promise((r) => setImmediate(r));
    const standIn = (tls: boolean) => {
      const tcp = { writeQueueSize: 1_000 };
      const socket = Object.assign(new EventEmitter(), {
        bytesRead: 0, bytesWritten: 5_000, connecting: false, timeouts: [] as number[],
        _handle: tls ? { writeQueueSize: 4_000, _parent: tcp } : tcp,
        setTimeout(ms: number) {
          socket.timeouts.push(ms);
        },
      });
      const req = Object.assign(new EventEmitter(), { socket });
      let silent = 0;
      boundSocketSilence(req as unknown as http.ClientRequest, 300, () => silent++);
      return { tcp, socket, req, silent: () => silent };
    };
    for (const tls of [false, true]) {
      const { tcp, socket, req, silent } = standIn(tls);
      expect(socket.timeouts).toEqual([300]);
      // Drained during the period (nothing reaches JavaScript for that): watched again at once.
      tcp.writeQueueSize = 900;
      socket.emit('timeout');
      expect([socket.timeouts, silent()]).toEqual([[300, 300], 0]);
      // Still since that look, but drained behind the timer (read before the check): watched again.
      socket.emit('timeout');
      tcp.writeQueueSize = 800;
      await immediate();
      expect([socket.timeouts, silent()]).toEqual([[300, 300, 300], 0]);
      // Still since that look and through the check: silent, once, however often the timer fires meanwhile.
      socket.emit('timeout');
      socket.emit('timeout');
      await immediate();
      expect([socket.timeouts.length, silent()]).toEqual([3, 1]);
      // Closed: no more verdicts, and the socket keeps no bound for its next request.
      socket.emit('timeout');
      req.emit('close');
      await immediate();
      expect([socket.timeouts.at(-1), silent(), socket.listenerCount('timeout')]).toEqual([0, 1, 0]);
    }
  });

  it('boundSocketSilence: a kept-alive socket handed straight to a request waiting for it does not keep the bound', async () => {
    const server = http.createServer((req, res) => setTimeout(() => res.end('ok'), req.url === '/slow' ? 600 : 0));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const { port } = server.address() as net.AddressInfo;
    // One socket: the second request waits for the first's, and gets it without passing through the pool.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      let silent = 0;
      const first = http.get({ host: '127.0.0.1', port, path: '/fast', agent }, (res) => res.resume());
      boundSocketSilence(first, 200, () => silent++);
      let timeouts = 0;
      let handedTimeout: number | undefined;
      const second = http.get({ host: '127.0.0.1', port, path: '/slow', agent }, (res) => res.resume());
      second.once('socket', (s: net.Socket) => {
        handedTimeout = s.timeout;
        s.on('timeout', () => timeouts++);
      });
      await new Promise((r) => second.once('close', r));
      expect(second.reusedSocket || first.socket === second.socket).toBe(true); // the premise: the same socket
      // Before: 200, and the socket timed out under the second request's 600 ms wait (a listener there would cut it).
      expect([handedTimeout, timeouts, silent]).toEqual([0, 0, 0]);
    } finally {
      agent.destroy();
      server.close();
    }
  });

  it('deadline(afterInput): an answer that came while this process was held clears the bound; a plain deadline beside it ran out', async () => {
    const port = await start('late');
    const d = deadline(undefined, 250, undefined, { afterInput: true });
    const plain = deadline(undefined, 250);
    const answered = new Promise<void>((resolve) => http.get({ host: '127.0.0.1', port, path: '/', agent: false }, (res) => {
      // As an awaited HEAD does: the answer's handling clears its deadline.
      d.clear();
      res.resume();
      resolve();
    }));
    await new Promise((r) => setTimeout(r, 20));
    await hold(600);
    await answered;
    await new Promise((r) => setTimeout(r, 50));
    expect(plain.timedOut).toBe(true);
    expect([d.timedOut, d.signal.aborted]).toEqual([false, false]);
    plain.clear();
  });

  it('deadline(afterInput): with no answer, the time runs out as it would', async () => {
    const d = deadline(undefined, 50, undefined, { afterInput: true });
    await new Promise((r) => d.signal.addEventListener('abort', r, { once: true }));
    expect([d.timedOut, (d.signal.reason as Error).name]).toEqual([true, 'TimeoutError']);
  });
});

describe.each(['lite', 'sdk'] as const)('a fill while this process is held past S3_STALL_TIMEOUT_S (S3_TRANSPORT=%s)', (client) => {
  let s3: S3Server;
  let proxy: FaultProxy;
  let tmp: string;
  beforeAll(async () => {
    Object.assign(process.env, CREDS);
    tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'silence-'));
    ({ s3, proxy } = await startS3WithProxy());
  });
  cleanUpS3(() => ({ s3, proxy, tmp }));

  function recorder() {
    const lines: Array<Record<string, unknown>> = [];
    return { log: createLogger('info', 'test', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) }), lines };
  }

  it('a range still receiving is not given up as stalled: one GET, no retry', async () => {
    const body = detBytes(1024 * 1024, 61);
    await s3.put('models', 'paced/unet/model.onnx', body);
    // One range, paced at 1 MB/s (chunks every ~65 ms): about a second, and the 0.5 s bound never reached but for the hold.
    proxy.faults = { bytesPerSecond: 1_000_000, exactPace: true };
    const gets = proxy.stats.gets;
    const { log, lines } = recorder();
    const cfg = testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'cache-')), {
      S3_TRANSPORT: client, S3_PART_SIZE: String(1024 * 1024), S3_MAX_CONCURRENCY: '1', S3_STALL_TIMEOUT_S: '0.5', S3_MAX_ATTEMPTS: '1',
    });
    let held: Promise<void> | undefined;
    const r = await resolveModel('s3://models/paced/', {
      cfg, log, onProgress: (p) => {
        if (p.bytesDone > 0) held ??= hold(1_200);
      },
    });
    await held;
    expect(held).toBeDefined();
    expect((await fsp.readFile(path.join(r.dir, 'unet/model.onnx'))).equals(body)).toBe(true);
    // Before: the range's watchdog fired first after the hold, and S3_MAX_ATTEMPTS=1 failed the fill STORAGE_STALL.
    expect(lines.filter((l) => /stall|range failed/.test(String(l.msg)))).toEqual([]);
    expect(proxy.stats.gets - gets).toBe(1);
  });

  it('a LIST still sending is not cut for silence: it runs to its own cap', async () => {
    await s3.put('models', 'trickled/a.bin', detBytes(5_000, 62));
    proxy.faults = { trickleLists: { everyMs: 50 } };
    const lists = proxy.stats.lists;
    const first = until(() => proxy.stats.lists - lists >= 1).then(() => hold(1_000));
    const err = await rejection(resolveModel('s3://models/trickled', {
      cfg: testConfig(proxy.endpoint, await fsp.mkdtemp(path.join(tmp, 'cache-')), { S3_TRANSPORT: client, S3_MAX_ATTEMPTS: '2', S3_STALL_TIMEOUT_S: '0.5' }),
      log: recorder().log, listTimeoutMs: 1_500,
    }));
    await first;
    // Before: the first try was cut after the hold, "S3 sent nothing for 0.5 s (S3_STALL_TIMEOUT_S)".
    expect([err.code, err.message]).toEqual(['STORAGE_TRANSIENT', 'cannot list s3://models/trickled/: S3 did not finish the LIST within 1.5 s on each of its 2 tries']);
    expect(proxy.stats.lists - lists).toBe(2);
  });
});
