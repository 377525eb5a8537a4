/**
 * A request whose body never completes: the client closes its side mid-body (a cancelled curl, a proxy giving up), sends
 * a malformed chunk, or pipelines such a request behind another. The connection must be answered and closed, and the
 * route must see the client gone, instead of the socket waiting in CLOSE-WAIT with the partial body for ever. And a client
 * that leaves with pipelined requests unanswered: the SIGTERM drain (answered()) must not wait for them.
 * The base server and a body route over a real loopback socket; no model.
 */
import { once } from 'node:events';
import type { ServerResponse } from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { listenBase, type BaseServer } from '../src/server/base.js';
import { bodyRoute, json, route } from '../src/server/http.js';
import { until } from './helpers/server.js';

let base: BaseServer;
/** How each body read of the route ended: 'read N' or the error's message. */
const outcomes: string[] = [];

beforeAll(async () => {
  base = await listenBase('127.0.0.1', 0);
  const opts = { log: createLogger('silent'), maxBodyBytes: 1024 * 1024 };
  base.app.post('/echo', bodyRoute((_r, body) => {
    outcomes.push(`read ${body.length}`);
    return json(200, { bytes: body.length });
  }, opts));
  base.app.get('/slow', route(() => new Promise((r) => setTimeout(() => r(json(200, { slow: true })), 300)), opts));
});
afterAll(() => {
  base?.closeListener();
  base?.closeConnections();
});

/** Sends `payload`, optionally half-closes, and collects what comes back until the server closes (or `ms` pass). */
function exchange(payload: string, opts: { halfClose?: boolean; ms?: number } = {}): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve) => {
    const s = net.connect({ port: base.port, host: '127.0.0.1', allowHalfOpen: true }, () => {
      s.write(payload);
      if (opts.halfClose) s.end();
    });
    let text = '';
    let done = false;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ text, closed });
    };
    s.on('data', (d: Buffer) => (text += d.toString('latin1')));
    s.on('end', () => finish(true));
    s.on('close', () => finish(true));
    s.on('error', () => undefined);
    const timer = setTimeout(() => finish(false), opts.ms ?? 3000);
  });
}

const statuses = (text: string) => [...text.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1]));

describe('a request body that never completes', () => {
  it('closed by the client mid-body: answered 400 and the connection closed, not left half-open', async () => {
    const r = await exchange('POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"instances":', { halfClose: true });
    expect(r.closed).toBe(true);
    expect(statuses(r.text)).toEqual([400]);
    expect(r.text).toContain('"the connection was closed before the whole request body arrived"');
  });

  it('a malformed chunk: answered 400 at once and closed', async () => {
    const r = await exchange('POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"ins\r\nZZZ\r\n');
    expect(r.closed).toBe(true);
    expect(statuses(r.text)).toEqual([400]);
    expect(r.text).toContain('Invalid character in chunk size');
  });

  it('a malformed chunk pipelined behind a slower request: that one is answered first, then the 400, then the close', async () => {
    const r = await exchange('GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{"\r\nQ\r\n');
    expect(r.closed).toBe(true);
    expect(statuses(r.text)).toEqual([200, 400]);
    expect(r.text.indexOf('{"slow":true}')).toBeLessThan(r.text.indexOf('HTTP/1.1 400'));
  });

  it('twenty cut bodies: every connection closed, none handed to the route; a whole body still reads', async () => {
    const cut = await Promise.all(Array.from({ length: 20 }, () => exchange('POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"x":', { halfClose: true })));
    expect(cut.every((r) => r.closed)).toBe(true);
    const whole = await exchange('POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}');
    expect(statuses(whole.text)).toEqual([200]);
    expect(outcomes).toEqual(['read 2']);
  });
});

describe('a client that leaves with pipelined requests unanswered', () => {
  it('is not waited for by the drain: answered() resolves once its connection has closed', async () => {
    const own = await listenBase('127.0.0.1', 0);
    try {
      // Answered once the test says, as a generation would be; the second is queued behind the first.
      const held: ServerResponse[] = [];
      own.app.get('/held', (_req, res) => void held.push(res));
      const s = net.connect(own.port, '127.0.0.1');
      s.on('error', () => undefined);
      s.write('GET /held HTTP/1.1\r\nHost: x\r\n\r\nGET /held HTTP/1.1\r\nHost: x\r\n\r\n');
      await until(() => held.length === 2);
      const serverSide = once(held[0]!.req.socket, 'close');
      s.destroy();
      await serverSide;
      // A route whose client left answers nothing (http.ts Exchange); one that answers anyway writes to no socket.
      held[1]!.end('late');
      // answered() of a server with nothing to answer resolves at once: before the next turn of the event loop.
      const state = await Promise.race([own.answered().then(() => 'answered'), new Promise((r) => setImmediate(() => r('still waiting')))]);
      expect(state).toBe('answered');
    } finally {
      own.closeListener();
      own.closeConnections();
    }
  });
});
