/** @module The one way a uWebSockets.js route replies: abort-safe, corked, body-capped, errors mapped in one place. */
import type { HttpRequest, HttpResponse } from 'uWebSockets.js';
import { RuntimeError, isRuntimeError } from '../errors.js';
import type { Logger } from '../log.js';

export interface Reply {
  status: number;
  body: string | Uint8Array;
  contentType?: string;
  headers?: Record<string, string>;
}

/** What a handler may read of the request: uWS's HttpRequest dies at the first await, so this is a copy. */
export interface Req {
  method: string;
  url: string;
  query: string;
  params: string[];
  headers: Record<string, string>;
}

const STATUS_TEXT: Record<number, string> = {
  200: '200 OK', 400: '400 Bad Request', 404: '404 Not Found', 405: '405 Method Not Allowed',
  413: '413 Payload Too Large', 415: '415 Unsupported Media Type', 499: '499 Client Closed Request',
  500: '500 Internal Server Error', 501: '501 Not Implemented', 502: '502 Bad Gateway', 503: '503 Service Unavailable',
  504: '504 Gateway Timeout',
};
/** Bodies above this size are streamed with backpressure instead of copied into uWS at once. */
const STREAM_THRESHOLD = 64 * 1024;

export const statusLine = (s: number): string => STATUS_TEXT[s] ?? `${s} Status`;

export const json = (status: number, value: unknown, headers?: Record<string, string>): Reply => ({
  status,
  body: JSON.stringify(value),
  contentType: 'application/json',
  ...(headers ? { headers } : {}),
});

/** KServe's error body, with our stable code beside it. */
export function errorReply(err: unknown, log: Logger): Reply {
  if (isRuntimeError(err)) {
    const headers: Record<string, string> = {};
    if (err.retryAfter !== undefined) headers['retry-after'] = String(err.retryAfter);
    return json(err.status, { error: err.message, code: err.code }, headers);
  }
  // Unknown errors are logged with their cause and answered with a bare 500: no class names, no stacks.
  log.error({ err }, 'unhandled error in request');
  return json(500, { error: 'internal error', code: 'INTERNAL' });
}

function copyReq(req: HttpRequest, paramCount: number): Req {
  const headers: Record<string, string> = {};
  req.forEach((k, v) => {
    headers[k] = v;
  });
  const params: string[] = [];
  for (let i = 0; i < paramCount; i++) params.push(req.getParameter(i));
  return { method: req.getMethod(), url: req.getUrl(), query: req.getQuery() ?? '', params, headers };
}

/** A response guard: `send` writes at most once and never after the client left. */
export class Exchange {
  open = true;
  readonly gone = new AbortController();
  readonly started = performance.now();
  constructor(readonly res: HttpResponse) {
    res.onAborted(() => {
      this.open = false;
      this.gone.abort();
    });
  }

  send(out: Reply): boolean {
    if (!this.open) return false;
    this.open = false;
    const { res } = this;
    const body = out.body;
    res.cork(() => {
      res.writeStatus(statusLine(out.status));
      if (out.contentType) res.writeHeader('content-type', out.contentType);
      for (const [k, v] of Object.entries(out.headers ?? {})) res.writeHeader(k, v);
      // A 413 closes the connection: the rest of the oversize body is not worth reading.
      if (out.status === 413 || body.length < STREAM_THRESHOLD) {
        res.end(body, out.status === 413);
        return;
      }
      this.#stream(typeof body === 'string' ? Buffer.from(body) : body);
    });
    return true;
  }

  /**
   * Large replies (base64 images) go out with tryEnd/onWritable, so a slow client costs one copy of
   * the body, not a growing uWS buffer: the unsent tail is resent from its offset when writable.
   */
  #stream(buf: Uint8Array): void {
    const { res } = this;
    const total = buf.byteLength;
    const base = res.getWriteOffset();
    const [ok, done] = res.tryEnd(buf, total);
    if (ok || done) return;
    res.onWritable((offset) => {
      const [ok2] = res.tryEnd(buf.subarray(offset - base), total);
      return ok2;
    });
  }
}

/** Reads the body up to `limit` bytes, copying each chunk once (uWS neuters them when the callback returns). */
export function readBody(res: HttpResponse, limit: number, declared: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declaredLen = declared === '' ? NaN : Number(declared);
    if (Number.isFinite(declaredLen) && declaredLen > limit) {
      reject(new RuntimeError('BODY_TOO_LARGE', `request body of ${declaredLen} bytes exceeds the limit of ${limit} bytes`));
      // Still attach onData so uWS has a handler; drop what arrives.
      res.onData(() => {});
      return;
    }
    const parts: Buffer[] = [];
    let size = 0;
    let failed = false;
    res.onData((chunk, isLast) => {
      if (failed) return;
      size += chunk.byteLength;
      if (size > limit) {
        failed = true;
        reject(new RuntimeError('BODY_TOO_LARGE', `request body exceeds the limit of ${limit} bytes`));
        return;
      }
      parts.push(Buffer.from(chunk.slice(0)));
      if (isLast) resolve(Buffer.concat(parts, size));
    });
  });
}

export type Handler = (req: Req, ex: Exchange) => Promise<Reply> | Reply;
export type BodyHandler = (req: Req, body: Buffer, ex: Exchange) => Promise<Reply> | Reply;

export interface RouteOptions {
  log: Logger;
  maxBodyBytes: number;
  /** Runs after every reply (metrics, access log). */
  onReply?: (req: Req, out: Reply, ex: Exchange) => void;
}

/** A route without a body (GET, HEAD, or a method answered before reading). */
export function route(fn: Handler, opts: RouteOptions, paramCount = 0) {
  return (res: HttpResponse, req: HttpRequest): void => {
    const r = copyReq(req, paramCount);
    const ex = new Exchange(res);
    let out: Reply | Promise<Reply>;
    try {
      out = fn(r, ex);
    } catch (err) {
      out = errorReply(err, opts.log);
    }
    const finish = (o: Reply) => {
      if (ex.send(o)) opts.onReply?.(r, o, ex);
    };
    if (out instanceof Promise) out.catch((err) => errorReply(err, opts.log)).then(finish);
    else finish(out);
  };
}

/**
 * A route with a body. `precheck` runs synchronously before the body is read (KServe refuses an
 * unknown or unready model before reading), so a refused request costs no body copy.
 */
export function bodyRoute(fn: BodyHandler, opts: RouteOptions, paramCount = 0, precheck?: (req: Req) => void) {
  return (res: HttpResponse, req: HttpRequest): void => {
    const r = copyReq(req, paramCount);
    const ex = new Exchange(res);
    let pre: unknown;
    try {
      precheck?.(r);
    } catch (err) {
      pre = err;
    }
    const body = readBody(res, opts.maxBodyBytes, r.headers['content-length'] ?? '');
    const finish = (o: Reply) => {
      if (ex.send(o)) opts.onReply?.(r, o, ex);
    };
    if (pre !== undefined) {
      body.catch(() => {});
      finish(errorReply(pre, opts.log));
      return;
    }
    body
      .then((b) => fn(r, b, ex))
      .catch((err) => errorReply(err, opts.log))
      .then(finish);
  };
}
