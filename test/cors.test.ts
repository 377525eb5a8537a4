/**
 * CORS_ALLOW_ORIGINS on the built server over real sockets: off by default (no CORS header, OPTIONS a 405, as KServe's
 * server); set, a browser's preflight from an allowed origin gets 204 with the path's methods and the headers it asked
 * for, and every answer to that origin (a 200 image, a 400 error) carries Access-Control-Allow-Origin; another origin
 * gets nothing. The variable's parsing: origins as browsers send them, anything else named.
 */
import http from 'node:http';
import net from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { listenBase } from '../src/server/base.js';
import { startServer, until, type ServerHandle } from './helpers/server.js';

const servers: ServerHandle[] = [];
afterAll(async () => void (await Promise.all(servers.map((s) => s.stop()))));

interface Answer { status: number; headers: http.IncomingHttpHeaders; body: string }

/** A request as a browser sends it (Origin and the preflight fields), which fetch() would not let a page set. */
function send(port: number, method: string, path: string, headers: Record<string, string>, body?: string): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: { ...headers, ...(body === undefined ? {} : { 'content-length': Buffer.byteLength(body) }) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const APP = 'https://app.example.com';
const PREDICT = '/v1/models/model:predict';
const preflight = (origin: string, path = PREDICT, method = 'POST', asked = 'content-type, authorization') => ({
  origin, 'access-control-request-method': method, 'access-control-request-headers': asked,
});
const IMAGE = JSON.stringify({ instances: [{ prompt: 'a red bicycle', seed: 3, height: 64, width: 64, num_inference_steps: 2 }] });

describe('CORS_ALLOW_ORIGINS', () => {
  it('unset: no CORS header on any answer, and a preflight is a 405 as every OPTIONS', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0' }, { ready: true });
    servers.push(srv);
    const pre = await send(srv.port, 'OPTIONS', PREDICT, preflight(APP));
    expect([pre.status, pre.headers.allow, pre.headers['access-control-allow-origin']]).toEqual([405, 'POST', undefined]);
    const bad = await send(srv.port, 'POST', PREDICT, { origin: APP, 'content-type': 'application/json' }, '{"instances": [');
    expect(bad.status).toBe(400);
    expect(Object.keys(bad.headers).filter((h) => h.startsWith('access-control-'))).toEqual([]);
    // The methods a 405 names are those that answer there: the model's status route refuses POST (it wants :predict).
    for (const path of ['/v1/models/model', '/v1/models/mo%64el']) {
      const put = await send(srv.port, 'PUT', path, {}, '{}');
      expect([path, put.status, put.headers.allow]).toEqual([path, 405, 'GET, HEAD']);
    }
    const encoded = await send(srv.port, 'PUT', '/v1/models/model%3Apredict', {}, '{}');
    expect([encoded.status, encoded.headers.allow]).toEqual([405, 'POST']);
  });

  it('listed origins: a preflight gets 204 with the path\'s methods and the asked headers; answers carry the origin; others get nothing', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', CORS_ALLOW_ORIGINS: `${APP}, http://localhost:3000` }, { ready: true });
    servers.push(srv);
    const pre = await send(srv.port, 'OPTIONS', PREDICT, preflight(APP));
    expect(pre.status).toBe(204);
    expect(pre.body).toBe('');
    expect(pre.headers).toMatchObject({
      'access-control-allow-origin': APP,
      'access-control-allow-methods': 'POST',
      'access-control-allow-headers': 'content-type, authorization',
      'access-control-max-age': '600',
      vary: 'origin, access-control-request-method, access-control-request-headers',
    });
    // The model's status route takes GET (and HEAD); the health route too.
    expect((await send(srv.port, 'OPTIONS', '/v1/models/model', preflight('http://localhost:3000', '', 'GET', ''))).headers['access-control-allow-methods']).toBe('GET, HEAD');
    // A method the path does not take: the path's own methods, so the browser refuses it and says which it may use.
    const put = await send(srv.port, 'OPTIONS', PREDICT, preflight(APP, PREDICT, 'PUT'));
    expect([put.status, put.headers['access-control-allow-methods']]).toEqual([204, 'POST']);

    // The request itself, over the same rules: an image, and an error the page can read.
    const ok = await send(srv.port, 'POST', PREDICT, { origin: APP, 'content-type': 'application/json' }, IMAGE);
    expect(ok.status, ok.body.slice(0, 300)).toBe(200);
    expect(ok.headers).toMatchObject({ 'access-control-allow-origin': APP, vary: 'origin', 'access-control-expose-headers': 'retry-after, allow, x-should-retry, inference-header-content-length, ce-specversion, ce-id, ce-source, ce-type, ce-time' });
    const bad = await send(srv.port, 'POST', PREDICT, { origin: APP, 'content-type': 'application/json' }, '{"instances": [');
    expect([bad.status, bad.headers['access-control-allow-origin'], (JSON.parse(bad.body) as { code: string }).code]).toEqual([400, APP, 'INVALID_INPUT']);

    // Another origin, and one spelled otherwise than a browser sends it: as if CORS were off.
    for (const other of ['https://evil.example', 'https://app.example.com:8443', 'HTTPS://APP.EXAMPLE.COM']) {
      const p = await send(srv.port, 'OPTIONS', PREDICT, preflight(other));
      expect([other, p.status, p.headers['access-control-allow-origin']]).toEqual([other, 405, undefined]);
      const r = await send(srv.port, 'POST', PREDICT, { origin: other, 'content-type': 'application/json' }, '{}');
      expect([other, r.status, r.headers['access-control-allow-origin']]).toEqual([other, 400, undefined]);
    }
    // What a cache in between keys on: every answer varies on Origin, those without CORS headers included (a request
    // with no Origin, or another one), or a cache would serve one of them to the listed origin (Fetch, "CORS protocol and HTTP caches").
    for (const headers of [{}, { origin: 'https://evil.example' }] as Record<string, string>[]) {
      const r = await send(srv.port, 'GET', '/v2/models/model', headers);
      expect([r.status, r.headers['access-control-allow-origin'], r.headers.vary]).toEqual([200, undefined, 'origin']);
    }
    // OPTIONS that is no preflight, and a preflight to a path nothing answers: as without CORS, the origin named.
    const plain = await send(srv.port, 'OPTIONS', PREDICT, { origin: APP });
    expect([plain.status, plain.headers['access-control-allow-origin']]).toEqual([405, APP]);
    const nowhere = await send(srv.port, 'OPTIONS', '/v3/models/model/generate', preflight(APP));
    expect([nowhere.status, nowhere.headers['access-control-allow-origin']]).toEqual([404, APP]);
  });

  it('past MAX_CONNECTIONS: the 503 BUSY carries the origin, so the page can read it and its Retry-After', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', CORS_ALLOW_ORIGINS: APP, MAX_CONNECTIONS: '2' }, { ready: true });
    servers.push(srv);
    const held: net.Socket[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const s = net.connect(srv.port, '127.0.0.1');
        s.on('error', () => undefined);
        held.push(s);
      }
      // A connection of its own for each try (a pooled one would count within the cap); the cap fills once the
      // server has counted the two held ones, and the readiness polls' connections are gone.
      let busy: Answer | undefined;
      await until(async () => {
        const r = await send(srv.port, 'POST', PREDICT, { origin: APP, 'content-type': 'application/json', connection: 'close' }, '{}');
        if (r.status === 503) busy = r;
        return busy !== undefined;
      }, 10_000, 50);
      expect(JSON.parse(busy!.body)).toMatchObject({ code: 'BUSY' });
      expect(busy!.headers).toMatchObject({ 'retry-after': '1', 'access-control-allow-origin': APP, 'access-control-expose-headers': 'retry-after, allow, x-should-retry, inference-header-content-length, ce-specversion, ce-id, ce-source, ce-type, ce-time' });
    } finally {
      held.forEach((s) => s.destroy());
    }
  });

  it('before the runtime attaches: the 503 "not ready" carries the origin too, as does the liveness answer', async () => {
    // The listening socket comes first (main.ts): the boot's first steps run while the routes are not there yet.
    const base = await listenBase('127.0.0.1', 0, { maxConnections: 0, corsAllowOrigins: [APP] });
    try {
      const early = await send(base.port, 'POST', PREDICT, { origin: APP, 'content-type': 'application/json' }, '{}');
      expect([early.status, (JSON.parse(early.body) as { state: string }).state, early.headers['access-control-allow-origin'], early.headers.vary]).toEqual([503, 'starting', APP, 'origin']);
      expect(early.headers['access-control-expose-headers']).toContain('retry-after');
      const live = await send(base.port, 'GET', '/v2/health/live', { origin: APP });
      expect([live.status, live.headers['access-control-allow-origin']]).toEqual([200, APP]);
      const pre = await send(base.port, 'OPTIONS', '/v2/health/live', preflight(APP, '/v2/health/live', 'GET', ''));
      expect([pre.status, pre.headers['access-control-allow-methods']]).toEqual([204, 'GET, HEAD']);
      const other = await send(base.port, 'POST', PREDICT, { origin: 'https://evil.example' }, '{}');
      expect([other.status, other.headers['access-control-allow-origin']]).toEqual([503, undefined]);
    } finally {
      base.closeListener();
      base.closeConnections();
    }
  });

  it('*: any origin, answered with *, no Vary on the origin', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', CORS_ALLOW_ORIGINS: '*' }, { ready: true });
    servers.push(srv);
    const pre = await send(srv.port, 'OPTIONS', '/v2/models/model/infer', preflight('null'));
    expect(pre.status).toBe(204);
    expect(pre.headers).toMatchObject({ 'access-control-allow-origin': '*', 'access-control-allow-methods': 'POST', vary: 'access-control-request-method, access-control-request-headers' });
    const ready = await send(srv.port, 'GET', '/v2/health/ready', { origin: 'https://anything.example' });
    expect([ready.status, ready.headers['access-control-allow-origin'], ready.headers.vary]).toEqual([200, '*', undefined]);
    // The same answer to a request without Origin: a cache may serve it to a page.
    const plain = await send(srv.port, 'GET', '/v2/health/ready', {});
    expect([plain.status, plain.headers['access-control-allow-origin'], plain.headers.vary]).toEqual([200, '*', undefined]);
    // Asked headers that are not a list of field names are not echoed.
    const odd = await send(srv.port, 'OPTIONS', PREDICT, preflight(APP, PREDICT, 'POST', 'content-type; x=1'));
    expect([odd.status, odd.headers['access-control-allow-headers']]).toEqual([204, undefined]);
  });
});

/** A WebSocket handshake to the stream as a browser sends it: 101, or the refusal's status and body. */
function handshake(port: number, headers: Record<string, string>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1', port, path: '/v1/models/model/stream',
      headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', ...headers },
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve({ status: res.statusCode!, body: '' });
    });
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('WebSocket handshakes from browser pages (cross-site WebSocket hijacking)', () => {
  const refusal = (origin: string) => JSON.stringify({
    error: `WebSocket handshake from a page of origin ${JSON.stringify(origin)} refused: a browser page may open the stream only from this server's own host or from an origin listed in CORS_ALLOW_ORIGINS`,
    code: 'ORIGIN_NOT_ALLOWED',
  });

  it('unset: a page of this host or no Origin (not a browser) connects; a page of another site, or origin null, is a 403', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0' }, { ready: true });
    servers.push(srv);
    const p = srv.port;
    expect(await handshake(p, {})).toEqual({ status: 101, body: '' });
    expect(await handshake(p, { origin: `http://127.0.0.1:${p}` })).toEqual({ status: 101, body: '' });
    // Behind a TLS proxy: the page's https origin without its default port, the Host as the proxy passes it.
    expect(await handshake(p, { origin: 'https://sd.apps.example.com', host: 'sd.apps.example.com:443' })).toEqual({ status: 101, body: '' });
    expect(await handshake(p, { origin: 'https://sd.apps.example.com', 'x-forwarded-host': 'sd.apps.example.com' })).toEqual({ status: 101, body: '' });
    // The scheme is not compared (a TLS proxy in front makes the page https, the socket here plain): the host and port are.
    for (const origin of ['https://evil.example', 'null', `http://127.0.0.1:${p + 1}`, `http://localhost:${p}`]) {
      expect([origin, await handshake(p, { origin })]).toEqual([origin, { status: 403, body: refusal(origin) }]);
    }
  });

  it('listed origins connect, others are refused; * lets any page connect', async () => {
    const listed = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', CORS_ALLOW_ORIGINS: APP }, { ready: true });
    const any = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', CORS_ALLOW_ORIGINS: '*' }, { ready: true });
    servers.push(listed, any);
    expect(await handshake(listed.port, { origin: APP })).toEqual({ status: 101, body: '' });
    expect(await handshake(listed.port, { origin: 'https://evil.example' })).toEqual({ status: 403, body: refusal('https://evil.example') });
    expect(await handshake(any.port, { origin: 'https://evil.example' })).toEqual({ status: 101, body: '' });
  });
});

describe('CORS_ALLOW_ORIGINS parsing', () => {
  const problems = (v: string): readonly string[] => {
    try {
      loadConfig({ CORS_ALLOW_ORIGINS: v });
    } catch (e) {
      if (e instanceof ConfigError) return e.problems;
      throw e;
    }
    return [];
  };

  it('origins as browsers serialize them; * alone', () => {
    expect(loadConfig({}).corsAllowOrigins).toEqual([]);
    expect(loadConfig({ CORS_ALLOW_ORIGINS: ' * ' }).corsAllowOrigins).toEqual(['*']);
    expect(loadConfig({ CORS_ALLOW_ORIGINS: 'https://App.Example.com:443, http://localhost:3000,,http://[::1]:8080' }).corsAllowOrigins)
      .toEqual(['https://app.example.com', 'http://localhost:3000', 'http://[::1]:8080']);
  });

  it('an entry no Origin could equal is named, with what to write; credentials in one are not shown', () => {
    expect(problems('https://app.example.com/')).toEqual(['CORS_ALLOW_ORIGINS entry "https://app.example.com/" is not an origin: browsers send https://app.example.com (no path, query or trailing slash)']);
    expect(problems('app.example.com')).toEqual(['CORS_ALLOW_ORIGINS entry "app.example.com" is not an origin: write scheme://host[:port], e.g. https://app.example.com']);
    expect(problems('ftp://files.example')[0]).toMatch(/^CORS_ALLOW_ORIGINS entry "ftp:\/\/files.example" is not an origin/);
    expect(problems('*, https://app.example.com')).toEqual(['CORS_ALLOW_ORIGINS is * (any origin) together with other entries: give * alone or the origins alone']);
    const secret = problems('https://user:s3cret@app.example.com');
    expect(secret).toHaveLength(1);
    expect(secret[0]).not.toContain('s3cret');
  });
});
