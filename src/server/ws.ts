/**
 * @module WebSocket generation with progress: `/v1/models/{name}/stream` (the `ws` package on Node's HTTP server).
 *
 *   client ── {"prompt":…, "preview_every":k} ──►
 *          ◄── {"type":"accepted","seed":s}
 *          ◄── {"type":"progress","step":i,"of":n}          (dropped while the client is slow)
 *          ◄── {"type":"preview","step":i,"png_b64":…}       (every k steps; dropped while the client is slow)
 *          ◄── {"type":"result","images":[{b64|uri,seed,format,width,height}]}   (never dropped; fragmented past 64 KiB)
 *          ◄── close 1000, once the result has left this process
 *   errors: {"type":"error","code":…,"error":…} then close 4000+HTTP status (4400, 4404, 4408, 4499, 4500, 4503).
 *   a message while the generation runs: one {"type":"error","code":"INVALID_INPUT",…} without a close; it goes on.
 *   protocol: an unmasked or malformed frame closes with 1002, a message over MAX_BODY_BYTES with 1009; pings are
 *   answered, but not read while the answers back up (a client that pings without reading).
 * The close handshake ends with this side closing the TCP connection as soon as the client answers the close frame
 * (clients such as browsers, undici and Python's websockets wait for that); a client that leaves its side open has it
 * closed 2 s (LINGER_MS) after the close frames crossed. The client's close frame, or its closing the socket, cancels
 * the generation: a queued request leaves the queue, a running batch stops between steps once every client has left
 * and no identical request waits for its images. A request identical to one queued or running (generation.ts) waits
 * for that generation's images: `accepted` once it is queued, then its steps from then on.
 */
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { httpStatus, isRuntimeError, RuntimeError } from '../errors.js';
import type { RequestIds } from '../log.js';
import type { Progress, TaskResult } from '../runtime/engine.js';
import { assertSafeJson, parseInstances } from '../runtime/request.js';
import { LINGER_MS, rawError, type App } from './base.js';
import { wsOriginRefusal } from './cors.js';
import { assertServable, generateWithImages, parseContext, parseJson, shuttingDown, type ServerContext } from './context.js';
import { errorReply, requestLog, type RouteOptions } from './http.js';
import { requestIds } from './trace.js';

/** Above this many buffered bytes, progress and previews are dropped until the client catches up. */
export const PROGRESS_BUFFER_LIMIT = 128 * 1024;
/** A result larger than this goes out as a fragmented text message (RFC 6455 5.4) of frames this size. */
export const RESULT_FRAGMENT_BYTES = 64 * 1024;
/** The request message must arrive this soon after the upgrade (close 4408 otherwise). */
export const REQUEST_WAIT_MS = 120_000;
/** A ping this often; a client that has neither answered the previous one nor read anything since is gone. */
export const HEARTBEAT_MS = 30_000;

/**
 * ws's socket, telling when the client closes. ws answers a client's close frame (and a frame that breaks the protocol)
 * through close(), and says nothing until the TCP connection has ended: for a client that leaves its side of it open,
 * 30 s later (ws's close timeout). This side closes through `closeOwn`.
 */
class StreamSocket extends WebSocket {
  /** The client's close frame came (first, or in answer to this side's), or a frame that broke the protocol. */
  onClientClose: () => void = () => undefined;

  override close(code?: number, data?: string | Buffer): void {
    super.close(code, data);
    this.onClientClose();
  }

  closeOwn(code: number, reason: string): void {
    super.close(code, reason);
  }
}

interface Conn {
  name: string;
  /** The client is gone: its close frame came, or the connection ended. It is sent nothing more. */
  closed: boolean;
  closing: boolean;
  started: boolean;
  /** A message after the request was answered with an error (once). */
  toldOne: boolean;
  alive: boolean;
  /** ws.bufferedAmount at the last heartbeat: less now means the client is taking what is queued for it. */
  queued: number;
  gone: AbortController;
  t0: number;
  timers: NodeJS.Timeout[];
  /** The upgrade request's X-Request-ID and trace context, for the log lines. */
  ids: RequestIds;
  /** The code of the error the request was answered with, for its access line. */
  code?: string;
}

export function registerWs(app: App, ctx: ServerContext, opts: RouteOptions): void {
  const { metrics, cfg } = ctx;
  const labels = { model_name: cfg.modelName, protocol: 'ws' };
  metrics.wsDropped.inc({ model_name: cfg.modelName }, 0);
  // maxPayload: a bigger message closes with 1009. No compression: results are base64 PNGs, and inflating a client's
  // message would be a second size to police.
  const wss = new WebSocketServer({ WebSocket: StreamSocket, noServer: true, maxPayload: cfg.maxBodyBytes, perMessageDeflate: false, clientTracking: false });
  // A handshake ws refuses (no or a bad Sec-WebSocket-Key, a version it does not speak) gets the JSON error every other
  // answer has, instead of ws's text/html line; and the versions it speaks, as RFC 6455 4.2.2 asks.
  wss.on('wsClientError', (err, socket) => {
    rawError(socket, 'INVALID_INPUT', `WebSocket handshake refused: ${err.message}`, 'sec-websocket-version: 13, 8\r\n');
  });

  app.upgrade('/v1/models/:name/stream', (req: IncomingMessage, socket: Duplex, head: Buffer, params: string[]) => {
    const refused = wsOriginRefusal(req, cfg.corsAllowOrigins);
    if (refused !== undefined) return void rawError(socket, 'ORIGIN_NOT_ALLOWED', refused);
    const ids = requestIds(req.headers);
    wss.handleUpgrade(req, socket, head, (ws) => open(ws, params[0] ?? '', ids));
  });

  function open(ws: StreamSocket, name: string, ids: RequestIds): void {
    const c: Conn = { name, closed: false, closing: false, started: false, toldOne: false, alive: true, queued: 0, gone: new AbortController(), t0: 0, timers: [], ids };
    ws.on('message', (data: RawData) => message(ws, c, data));
    ws.on('pong', () => (c.alive = true));
    // ws answers every ping at once: a client that pings without reading would pile the answers up here without bound.
    // While this side's output is backed up, stop reading; further pings wait in the client's own buffers.
    ws.on('ping', () => {
      if (ws.isPaused || ws.bufferedAmount <= PROGRESS_BUFFER_LIMIT) return;
      ws.pause();
      const t = setInterval(() => {
        if (ws.readyState === ws.OPEN && ws.bufferedAmount > PROGRESS_BUFFER_LIMIT / 2) return;
        clearInterval(t);
        c.timers.splice(c.timers.indexOf(t), 1);
        ws.resume();
      }, 50);
      c.timers.push(t);
    });
    // Protocol errors (unmasked frame, bad opcode, invalid UTF-8, oversize) arrive here; ws then closes with 1002/1007/1009.
    ws.on('error', (err) => ctx.log.debug({ err: err.message }, 'websocket protocol error'));
    // SIGTERM: a socket that has sent no request yet is told to go elsewhere now (a running generation finishes, or is
    // answered 4503 when the grace period ends), rather than meeting a bare TCP reset (1006) at the exit.
    const endSoon = () => c.timers.push(setTimeout(() => ws.terminate(), LINGER_MS));
    const onShutdown = () => {
      if (c.started) return;
      fail(ws, c, shuttingDown(name));
      // Nothing of its own is under way: a client that does not answer that close within LINGER_MS is not waited for
      // (ws would wait 30 s, and the drain with it).
      endSoon();
    };
    ctx.shutdown.addEventListener('abort', onShutdown, { once: true });
    // Its close frame says the client takes nothing more: the generation stops now rather than when the connection
    // ends, which a client that keeps its side open put off for ws's 30 s, its generation running on all along. Both
    // close frames have then been sent (ws answers at once): the connection has nothing left to carry, and a client
    // that does not close it within LINGER_MS has it closed.
    ws.onClientClose = () => {
      if (c.closed) return;
      c.closed = true;
      c.gone.abort();
      endSoon();
    };
    ws.on('close', () => {
      c.closed = true;
      c.gone.abort();
      ctx.shutdown.removeEventListener('abort', onShutdown);
      for (const t of c.timers) clearTimeout(t), clearInterval(t);
    });
    c.timers.push(
      setTimeout(() => {
        if (!c.started) fail(ws, c, new RuntimeError('REQUEST_TIMEOUT', `no request message within ${REQUEST_WAIT_MS / 1000} s of the upgrade`));
      }, REQUEST_WAIT_MS),
      setInterval(() => {
        if (ws.readyState !== ws.OPEN) return;
        // A client still taking a large result over a slow link is alive: its pong waits behind those bytes. So is one
        // whose pongs go unread while reading is paused (ping flood), as long as it takes what is sent.
        const queued = ws.bufferedAmount;
        if (queued < c.queued) c.alive = true;
        c.queued = queued;
        if (!c.alive) return void ws.terminate();
        c.alive = false;
        ws.ping();
      }, HEARTBEAT_MS),
    );
    try {
      assertServable(ctx, name);
    } catch (err) {
      // Refused at the upgrade (404, 503): counted and logged as HTTP counts the same refusal before its body.
      c.t0 = performance.now();
      fail(ws, c, err);
      record(isRuntimeError(err) ? httpStatus(err.code) : 500, c);
    }
  }

  function message(ws: StreamSocket, c: Conn, data: RawData): void {
    if (c.closed || c.closing) return;
    if (c.started) {
      // Told once: an answer to every further message would let a client that sends without reading make this side
      // buffer without bound (4 M one-byte messages held ~0.9 GB).
      if (!c.toldOne) critical(ws, c, JSON.stringify({ type: 'error', code: 'INVALID_INPUT', error: 'one generation per connection: open a new socket for the next one' }));
      c.toldOne = true;
      return;
    }
    c.started = true;
    c.t0 = performance.now();
    const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
    void run(ws, c, buf);
  }

  async function run(ws: StreamSocket, c: Conn, body: Buffer): Promise<void> {
    let status = 200;
    try {
      assertServable(ctx, c.name);
      const inst = parseJson(body);
      if (typeof inst !== 'object' || inst === null || Array.isArray(inst)) throw new RuntimeError('INVALID_INPUT', 'send one JSON object with a "prompt" (the fields of a V1 instance)');
      assertSafeJson(inst, 'message');
      // A V1 or V2 body sent as it is: named as such, not as an unknown field of an instance.
      const whole = ['instances', 'inputs'].filter((k) => Object.hasOwn(inst, k));
      if (whole.length > 0) {
        throw new RuntimeError('INVALID_INPUT', `the stream takes one instance's fields directly: send {"prompt": …} itself, not {${whole.map((k) => `"${k}": [...]`).join(', ')}}`
          + ` (a ${whole.includes('instances') ? 'V1' : 'V1 or V2'} request body): one message is one instance, one generation per connection`);
      }
      // One message, one instance: its fields are named message.x, not as the first of a list the client never sent.
      const reqs = parseInstances([inst], parseContext(ctx), 'message', true, (p) => p.replaceAll('message[0]', 'message'));
      const req = reqs[0]!;
      // `accepted` once the request is queued: a full queue or an unknown adapter is its only answer, not a second one.
      const accepted = JSON.stringify({ type: 'accepted', seed: req.items[0]!.seed, images: req.items[0]!.numImages });
      const results = await generateWithImages(ctx, reqs, c.gone.signal, { onProgress: (p) => progress(ws, c, p), onQueued: () => critical(ws, c, accepted), ids: c.ids });
      // Its close frame came first (with its request, answered from the result cache): it is sent nothing, a 499 as a
      // generation its close stops, not a 200.
      if (c.closed) throw new RuntimeError('CANCELLED', 'the client left');
      last(ws, c, JSON.stringify({ type: 'result', images: imagesOf(results) }), 1000, 'done');
    } catch (err) {
      status = isRuntimeError(err) ? httpStatus(err.code) : 500;
      if (c.closed && status === 499) return void record(499, Object.assign(c, { code: 'CANCELLED' }));
      fail(ws, c, err);
    }
    record(status, c);
  }

  function record(status: number, c: Conn): void {
    metrics.requests.inc({ ...labels, status: String(status) });
    if (c.code === 'CACHE_STUCK') metrics.cacheStuck.inc({ model_name: labels.model_name });
    const secs = (performance.now() - c.t0) / 1000;
    if (status === 200) metrics.requestDuration.observe(labels, secs);
    ctx.log.info({ route: route(c), status, code: c.code, seconds: Number(secs.toFixed(3)), ...c.ids }, 'inference request');
  }

  /** Progress is best effort: a slow client misses steps, never the result. */
  function progress(ws: StreamSocket, c: Conn, p: Progress): void {
    if (c.closed || c.closing) return;
    for (const msg of progressMessages(p)) {
      if (ws.bufferedAmount > PROGRESS_BUFFER_LIMIT) {
        metrics.wsDropped.inc({ model_name: cfg.modelName });
        continue;
      }
      ws.send(msg);
    }
  }

  /** Messages that must arrive (accepted, result, error): queued in order however slow the client is. */
  function critical(ws: StreamSocket, c: Conn, msg: string): void {
    if (c.closed || c.closing) return;
    ws.send(msg);
  }

  /** The close frame follows the queued messages; the TCP connection ends once the client answers it. */
  function closeWith(ws: StreamSocket, c: Conn, code: number, reason: string): void {
    if (c.closed || c.closing) return;
    c.closing = true;
    ws.closeOwn(code, reason);
  }

  /**
   * The connection's last message, then its close once that message has left this process. ws ends a close handshake
   * 30 s after it begins, whatever is still queued: begun with the result queued, a client that needed longer to read
   * it (4 images at 1024x1024 are 15 MB) lost it mid-message. Until then the heartbeat bounds a client that reads
   * nothing; sent in fragments, the bytes still queued fall as the client reads, which the heartbeat takes as alive.
   */
  function last(ws: StreamSocket, c: Conn, msg: string, code: number, reason: string): void {
    if (c.closed || c.closing) return;
    c.closing = true;
    const bytes = Buffer.from(msg);
    const sent = (err?: Error | null) => {
      if (!err && ws.readyState === ws.OPEN) ws.closeOwn(code, reason);
    };
    for (let at = 0; at === 0 || at < bytes.length; at += RESULT_FRAGMENT_BYTES) {
      const fin = at + RESULT_FRAGMENT_BYTES >= bytes.length;
      ws.send(bytes.subarray(at, at + RESULT_FRAGMENT_BYTES), { binary: false, fin }, fin ? sent : undefined);
    }
  }

  const route = (c: Conn) => `/v1/models/${c.name}/stream`;

  function fail(ws: StreamSocket, c: Conn, err: unknown): void {
    const out = errorReply(err, requestLog(opts.log, route(c), c.ids));
    c.code = out.code;
    const body = JSON.parse(String(out.body)) as { error: string; code: string };
    critical(ws, c, JSON.stringify({ type: 'error', code: body.code, error: body.error, ...(out.headers?.['retry-after'] ? { retry_after: Number(out.headers['retry-after']) } : {}) }));
    closeWith(ws, c, 4000 + out.status, body.code);
  }
}

export function progressMessages(p: Progress): string[] {
  const out = [JSON.stringify({ type: 'progress', step: p.step, of: p.of })];
  if (p.preview) out.push(JSON.stringify({ type: 'preview', step: p.step, png_b64: p.preview.toString('base64') }));
  return out;
}

function imagesOf(results: TaskResult[]): Array<Record<string, unknown>> {
  return results.flatMap((r) =>
    r.images.map((img, i) => ({
      ...(r.uris ? { uri: r.uris[i] } : { b64: Buffer.from(img.data).toString('base64') }),
      seed: img.seed,
      format: img.format,
      width: img.width,
      height: img.height,
    })),
  );
}
