/**
 * @module WebSocket generation with progress: `/v1/models/{name}/stream`.
 *
 *   client ── {"prompt":…, "preview_every":k} ──►
 *          ◄── {"type":"accepted","seed":s}
 *          ◄── {"type":"progress","step":i,"of":n}          (dropped while the client is slow)
 *          ◄── {"type":"preview","step":i,"png_b64":…}       (every k steps; dropped while the client is slow)
 *          ◄── {"type":"result","images":[{b64|uri,seed,format,width,height}]}   (never dropped)
 *          ◄── close 1000
 *   errors: {"type":"error","code":…,"error":…} then close 4000+HTTP status (4400, 4404, 4499, 4500, 4503).
 * Closing the socket cancels the generation: a queued request leaves the queue, a running batch stops
 * between steps once every client of it has left.
 */
import type { TemplatedApp, WebSocket } from 'uWebSockets.js';
import { isRuntimeError, RuntimeError } from '../errors.js';
import type { Progress, TaskResult } from '../runtime/engine.js';
import { assertSafeKeys, parseInstances } from '../runtime/request.js';
import { assertServable, parseContext, parseJson, type ServerContext } from './context.js';
import { errorReply, type RouteOptions } from './http.js';

/** Above this many buffered bytes, progress and previews are dropped until the client catches up. */
export const PROGRESS_BUFFER_LIMIT = 128 * 1024;
/** uWS drops any send while more than this is buffered; results past it wait in `pending` for `drain`. */
const MAX_BACKPRESSURE = 64 * 1024 * 1024;

interface Conn {
  name: string;
  closed: boolean;
  started: boolean;
  gone: AbortController;
  /** Messages that must arrive (result, error), waiting for `drain`, in order. */
  pending: string[];
  closeWhenFlushed: { code: number; reason: string } | undefined;
  t0: number;
}

export function registerWs(app: TemplatedApp, ctx: ServerContext, opts: RouteOptions): void {
  const { metrics, cfg } = ctx;
  const labels = { model_name: cfg.modelName, protocol: 'ws' };
  app.ws<Conn>('/v1/models/:name/stream', {
    maxPayloadLength: cfg.maxBodyBytes,
    maxBackpressure: MAX_BACKPRESSURE,
    idleTimeout: 120,
    sendPingsAutomatically: true,
    upgrade: (res, req, context) => {
      const data: Conn = { name: req.getParameter(0) ?? '', closed: false, started: false, gone: new AbortController(), pending: [], closeWhenFlushed: undefined, t0: 0 };
      res.upgrade(data, req.getHeader('sec-websocket-key'), req.getHeader('sec-websocket-protocol'), req.getHeader('sec-websocket-extensions'), context);
    },
    open: (ws) => {
      const c = ws.getUserData();
      try {
        assertServable(ctx, c.name);
      } catch (err) {
        fail(ws, err);
      }
    },
    message: (ws, message) => {
      const c = ws.getUserData();
      if (c.closed || c.closeWhenFlushed) return;
      if (c.started) {
        critical(ws, JSON.stringify({ type: 'error', code: 'INVALID_INPUT', error: 'one generation per connection: open a new socket for the next one' }));
        return;
      }
      c.started = true;
      c.t0 = performance.now();
      const text = Buffer.from(message).toString('utf8'); // the ArrayBuffer is neutered when this callback returns
      void run(ws, text);
    },
    drain: (ws) => flush(ws),
    close: (ws) => {
      const c = ws.getUserData();
      c.closed = true;
      c.gone.abort();
    },
  });

  async function run(ws: WebSocket<Conn>, text: string): Promise<void> {
    const c = ws.getUserData();
    let status = 200;
    try {
      assertServable(ctx, c.name);
      const inst = parseJson(Buffer.from(text));
      if (typeof inst !== 'object' || inst === null || Array.isArray(inst)) throw new RuntimeError('INVALID_INPUT', 'send one JSON object with a "prompt" (the fields of a V1 instance)');
      assertSafeKeys(inst, 'message');
      const reqs = parseInstances([inst], parseContext(ctx), 'message');
      const req = reqs[0]!;
      critical(ws, JSON.stringify({ type: 'accepted', seed: req.items[0]!.seed, images: req.items[0]!.numImages }));
      const results = await ctx.generate(reqs, c.gone.signal, (p) => progress(ws, p));
      critical(ws, JSON.stringify({ type: 'result', images: imagesOf(results) }));
      closeAfter(ws, 1000, 'done');
    } catch (err) {
      status = isRuntimeError(err) ? err.status : 500;
      if (c.closed && status === 499) return void record(499, c);
      fail(ws, err);
    }
    record(status, c);
  }

  function record(status: number, c: Conn): void {
    metrics.requests.inc({ ...labels, status: String(status) });
    const secs = (performance.now() - c.t0) / 1000;
    if (status === 200) metrics.requestDuration.observe(labels, secs);
    ctx.log.info({ route: `/v1/models/${c.name}/stream`, status, seconds: Number(secs.toFixed(3)) }, 'inference request');
  }

  /** Progress is best effort: a slow client misses steps, never the result. */
  function progress(ws: WebSocket<Conn>, p: Progress): void {
    const c = ws.getUserData();
    if (c.closed || c.pending.length > 0) return;
    ws.cork(() => {
      for (const msg of progressMessages(p)) {
        if (ws.getBufferedAmount() > PROGRESS_BUFFER_LIMIT) {
          metrics.wsDropped.inc({ model_name: cfg.modelName });
          continue;
        }
        ws.send(msg);
      }
    });
  }

  /** Sends in order; what uWS refuses (over maxBackpressure) waits for `drain`. */
  function critical(ws: WebSocket<Conn>, msg: string): void {
    const c = ws.getUserData();
    if (c.closed) return;
    if (c.pending.length > 0) return void c.pending.push(msg);
    ws.cork(() => {
      if (ws.send(msg) === 2) c.pending.push(msg);
    });
  }

  function flush(ws: WebSocket<Conn>): void {
    const c = ws.getUserData();
    if (c.closed) return;
    ws.cork(() => {
      while (c.pending.length > 0) {
        if (ws.send(c.pending[0]!) === 2) return;
        c.pending.shift();
      }
    });
    if (c.pending.length === 0 && c.closeWhenFlushed) {
      const { code, reason } = c.closeWhenFlushed;
      c.closed = true;
      ws.end(code, reason);
    }
  }

  /** Closes once every critical message is handed to uWS (which sends the close frame after the buffered bytes). */
  function closeAfter(ws: WebSocket<Conn>, code: number, reason: string): void {
    const c = ws.getUserData();
    if (c.closed) return;
    c.closeWhenFlushed = { code, reason };
    if (c.pending.length === 0) {
      c.closed = true;
      ws.cork(() => ws.end(code, reason));
    }
  }

  function fail(ws: WebSocket<Conn>, err: unknown): void {
    const out = errorReply(err, opts.log);
    const body = JSON.parse(String(out.body)) as { error: string; code: string };
    critical(ws, JSON.stringify({ type: 'error', code: body.code, error: body.error, ...(out.headers?.['retry-after'] ? { retry_after: Number(out.headers['retry-after']) } : {}) }));
    closeAfter(ws, 4000 + out.status, body.code);
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
