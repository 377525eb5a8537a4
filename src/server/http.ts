/** @module The one way a route replies: abort-safe, once, body-capped, errors mapped in one place. */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import zlib from 'node:zlib';
import { SHORTAGE_RETRY_AFTER } from '../descriptors.js';
import { RuntimeError, httpStatus, isRuntimeError } from '../errors.js';
import type { Logger, RequestIds } from '../log.js';
import { lingerOnClose, onSocketClose, pathOf } from './base.js';
import { exposeEventHeaders } from './cors.js';
import { requestIds } from './trace.js';

export interface Reply {
  status: number;
  body: string | Uint8Array;
  contentType?: string;
  headers?: Record<string, string>;
  /** An error answer's code (errorReply), for the access log. */
  code?: string;
}

/** What a handler may read of the request. */
export interface Req {
  method: string;
  url: string;
  query: string;
  params: string[];
  headers: Record<string, string>;
  /** What its log lines name it by (trace.ts): its headers' ids, and its CloudEvent's trace once read (withEventTrace). */
  ids: RequestIds;
}

// fatal: a byte that is not UTF-8 is refused, not read as U+FFFD (which changed a prompt without a word).
const UTF8 = new TextDecoder('utf-8', { fatal: true });
/**
 * A JSON body as text. A leading UTF-8 byte order mark (Windows PowerShell's `Out-File -Encoding utf8` writes one, and
 * `curl -d @file` sends it) is dropped, as RFC 8259 8.1 lets a parser do. Bytes that are not UTF-8 throw a SyntaxError
 * naming the first bad byte's offset, for the caller to word as it words a body that does not parse.
 */
export function jsonText(b: Uint8Array): string {
  try {
    return UTF8.decode(b);
  } catch {
    const at = firstInvalidUtf8(b);
    const bytes = [...b.subarray(at, at + 4)].map((x) => `0x${x.toString(16).padStart(2, '0')}`).join(' ');
    // The two bodies a client sends by mistake most: a file saved as UTF-16 (PowerShell 5's default), gzip without its header.
    const why = (b[0] === 0xff && b[1] === 0xfe) || (b[0] === 0xfe && b[1] === 0xff)
      ? 'the body starts with a UTF-16 byte order mark; send the JSON as UTF-8'
      : b[0] === 0x1f && b[1] === 0x8b ? 'the body is gzip data; send it with Content-Encoding: gzip' : 'send the JSON as UTF-8';
    throw new SyntaxError(`invalid UTF-8 at byte ${at} (${bytes}): ${why}`);
  }
}

/**
 * Offset of the first byte that does not begin a well-formed UTF-8 sequence (Unicode 3.9 table 3-7: no overlong form,
 * no surrogate, nothing past U+10FFFF), or of a sequence cut short; only run once the decoder has refused the body.
 */
function firstInvalidUtf8(b: Uint8Array): number {
  for (let i = 0; i < b.length; ) {
    const x = b[i]!;
    if (x < 0x80) {
      i++;
      continue;
    }
    let n: number, lo = 0x80, hi = 0xbf;
    if (x >= 0xc2 && x <= 0xdf) n = 1;
    else if (x >= 0xe0 && x <= 0xef) {
      n = 2;
      if (x === 0xe0) lo = 0xa0;
      else if (x === 0xed) hi = 0x9f;
    } else if (x >= 0xf0 && x <= 0xf4) {
      n = 3;
      if (x === 0xf0) lo = 0x90;
      else if (x === 0xf4) hi = 0x8f;
    } else return i;
    for (let k = 1; k <= n; k++) {
      const c = b[i + k];
      if (c === undefined || c < (k === 1 ? lo : 0x80) || c > (k === 1 ? hi : 0xbf)) return i;
    }
    i += n + 1;
  }
  return b.length;
}

/** `s` with control characters (C0, DEL, C1) written as \xNN: V8's JSON.parse message quotes the body's first characters. */
export const printable = (s: string): string => s.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);

/** An error body never exceeds this: a message past it is cut, saying how much was left out. */
export const MAX_ERROR_BYTES = 64 * 1024;

export const json = (status: number, value: unknown, headers?: Record<string, string>): Reply => ({
  status,
  body: JSON.stringify(value),
  contentType: 'application/json',
  ...(headers ? { headers } : {}),
});

/**
 * JSON text from its parts, each byte part (an image) written as base64 inside the quotes the text parts put around
 * it. base64 needs no JSON escaping, so each image goes straight into one buffer of the exact size instead of through
 * a megabyte-sized JSON string and its UTF-8 copy (about 10 ms per 512² image on a small CPU).
 */
export function jsonWithBase64(parts: ReadonlyArray<string | Uint8Array>): Buffer {
  const size = parts.reduce((n, p) => n + (typeof p === 'string' ? Buffer.byteLength(p) : Math.ceil(p.length / 3) * 4), 0);
  const out = Buffer.allocUnsafe(size);
  let o = 0;
  for (const p of parts) o += typeof p === 'string' ? out.write(p, o, 'utf8') : out.write(Buffer.from(p.buffer, p.byteOffset, p.byteLength).toString('base64'), o, 'latin1');
  if (o !== size) throw new Error(`JSON body size mismatch: wrote ${o} of ${size} bytes`);
  return out;
}

/**
 * The error boundary: every error a route, the WebSocket or the fallback meets becomes KServe's `{"error": …}` body with
 * our stable code beside it (and the error's own fields), its status from the code.
 */
export function errorReply(err: unknown, log: Logger): Reply {
  if (isRuntimeError(err)) {
    const headers: Record<string, string> = {};
    // A shortage reported by a worker thread comes back as its code and message alone.
    const retryAfter = err.retryAfter ?? (err.code === 'TOO_MANY_OPEN_FILES' ? SHORTAGE_RETRY_AFTER : undefined);
    if (retryAfter !== undefined) headers['retry-after'] = String(retryAfter);
    if (err.allow !== undefined) headers.allow = err.allow.join(', ');
    return { ...json(httpStatus(err.code), { error: capMessage(err.message), code: err.code, ...err.fields }, headers), code: err.code };
  }
  // Unknown errors are logged with their cause and answered with a bare 500: no class names, no stacks.
  log.error({ err }, 'unhandled error in request');
  return { ...json(500, { error: 'internal error', code: 'INTERNAL' }), code: 'INTERNAL' };
}

/** Cuts a message to MAX_ERROR_BYTES (UTF-8), on a character boundary. */
export function capMessage(msg: string): string {
  if (Buffer.byteLength(msg) <= MAX_ERROR_BYTES) return msg;
  const room = MAX_ERROR_BYTES - 64;
  let cut = Buffer.from(msg).subarray(0, room).toString('utf8');
  if (cut.endsWith('\uFFFD')) cut = cut.slice(0, -1);
  return `${cut}… (${Buffer.byteLength(msg) - Buffer.byteLength(cut)} more bytes left out)`;
}

function copyReq(req: IncomingMessage, params: string[]): Req {
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(req.headers)) if (v !== undefined) headers[k] = Array.isArray(v) ? v.join(', ') : v;
  const url = req.url ?? '/';
  const q = url.indexOf('?');
  return { method: (req.method ?? 'GET').toLowerCase(), url: pathOf(url), query: q < 0 ? '' : url.slice(q + 1), params, headers, ids: requestIds(headers) };
}

/** A response guard: `send` writes at most once and never after the client left. */
export class Exchange {
  open = true;
  readonly gone = new AbortController();
  readonly started = performance.now();
  constructor(readonly res: ServerResponse, req: IncomingMessage) {
    // The client left when its socket closed before this response was finished (a queued pipelined one included).
    const onClose = () => {
      if (!this.open || res.writableFinished || !(res.destroyed || req.socket.destroyed)) return;
      this.open = false;
      this.gone.abort();
    };
    res.once('close', onClose);
    req.once('close', onClose);
    // A request pipelined behind another gets neither event when the connection drops (Node closes only the response
    // on the socket, and the request's own 'close' came when its body was read): the socket's close tells it.
    const off = onSocketClose(req.socket, onClose);
    res.once('finish', off);
    res.once('close', off);
  }

  send(out: Reply): boolean {
    if (!this.open) return false;
    this.open = false;
    const headers: Record<string, string | number> = { ...out.headers, 'content-length': out.body.length === 0 ? 0 : Buffer.byteLength(out.body) };
    if (out.contentType) headers['content-type'] = out.contentType;
    // A 413 or 415 closes the connection: the rest of a body too large or in an unknown coding is not worth reading.
    if (out.status === 413 || out.status === 415) {
      headers.connection = 'close';
      lingerOnClose(this.res);
    }
    exposeEventHeaders(this.res, out.headers);
    // Node queues the bytes and writes them as the socket drains: a slow client costs one copy of the body.
    this.res.writeHead(out.status, headers).end(out.body);
    return true;
  }
}

/** Content codings a request body may come in (tritonclient's `request_compression_algorithm`: gzip, deflate). */
export const BODY_CODINGS = ['gzip', 'x-gzip', 'deflate'];

/**
 * The content codings of a request body, in the order they were applied: BODY_CODINGS only, at most two (clients apply
 * one; each layer is inflated up to the limit again, on the thread pool the cache's I/O shares). Otherwise a 415.
 */
export function bodyCodings(header: string | undefined): string[] {
  const codings = (header ?? '').split(',').map((c) => c.trim().toLowerCase()).filter((c) => c !== '' && c !== 'identity');
  const unknown = codings.filter((c) => !BODY_CODINGS.includes(c));
  if (unknown.length > 0) {
    throw new RuntimeError('UNSUPPORTED_ENCODING', `Content-Encoding ${unknown.join(', ')} is not supported; send the body as is, gzip or deflate`);
  }
  if (codings.length > 2) throw new RuntimeError('UNSUPPORTED_ENCODING', `Content-Encoding ${codings.join(', ')}: at most two codings, each gzip or deflate`);
  return codings;
}

/**
 * A Transfer-Encoding other than chunked (`gzip, chunked`): Node undoes only the chunking and would hand on a body
 * still compressed, so it is refused (RFC 9112: 501), pointing to Content-Encoding, which is decoded.
 */
export function transferCodingError(header: string | undefined): RuntimeError | undefined {
  const other = (header ?? '').split(',').map((c) => c.trim().toLowerCase()).filter((c) => c !== '' && c !== 'chunked' && c !== 'identity');
  if (other.length === 0) return undefined;
  return new RuntimeError('UNSUPPORTED', `Transfer-Encoding ${other.join(', ')} is not supported; send the body chunked or with a Content-Length (a compressed body with Content-Encoding: gzip or deflate)`);
}

/**
 * Reads the body up to `limit` bytes; a declared or actual size above it is a 413 before more is read. A body in
 * `codings` (bodyCodings of its Content-Encoding) is decoded, to at most `limit` bytes as well.
 */
export async function readBody(req: IncomingMessage, limit: number, declared: string, codings: string[]): Promise<Buffer> {
  let body = await readRaw(req, limit, declared);
  // Undo the last applied first.
  for (const c of codings.reverse()) body = await decode(body, c, limit);
  return body;
}

function decode(body: Buffer, coding: string, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // unzip takes gzip and zlib-wrapped deflate (what HTTP's "deflate" is) alike.
    zlib.unzip(body, { maxOutputLength: limit }, (err, out) => {
      if (!err) return resolve(out);
      if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
        return reject(new RuntimeError('BODY_TOO_LARGE', `request body decoded from ${coding} exceeds the limit of ${limit} bytes (MAX_BODY_BYTES)`));
      }
      reject(new RuntimeError('INVALID_INPUT', `request body is not valid ${coding} data (Content-Encoding: ${coding}): ${err.message}`));
    });
  });
}

function readRaw(req: IncomingMessage, limit: number, declared: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const tooLarge = (what: string) => {
      req.pause();
      reject(new RuntimeError('BODY_TOO_LARGE', `request body ${what} exceeds the limit of ${limit} bytes (MAX_BODY_BYTES)`));
    };
    const declaredLen = /^\d+$/.test(declared) ? Number(declared) : NaN;
    if (declaredLen > limit) return tooLarge(`of ${declared} bytes`);
    const parts: Buffer[] = [];
    let size = 0;
    let failed = false;
    req.on('data', (chunk: Buffer) => {
      if (failed) return;
      size += chunk.length;
      if (size > limit) {
        failed = true;
        return tooLarge(`sent so far (${size} bytes)`);
      }
      parts.push(chunk);
    });
    req.once('end', () => {
      if (!failed) resolve(Buffer.concat(parts, size));
    });
    req.once('error', () => reject(new RuntimeError('CANCELLED', 'the client closed the connection while sending the body')));
  });
}

export type Handler = (req: Req, ex: Exchange) => Promise<Reply> | Reply;
export type BodyHandler = (req: Req, body: Buffer, ex: Exchange) => Promise<Reply> | Reply;

export interface RouteOptions {
  log: Logger;
  maxBodyBytes: number;
  /** Runs after every reply (metrics, access log). */
  onReply?: (req: Req, out: Reply, ex: Exchange) => void;
  /** Rewrites an error reply into another protocol's shape (OpenAI's); KServe's `{"error": …}` otherwise. */
  errorShape?: (out: Reply) => Reply;
}

/** The log of a request's unknown error names it as its access line does (app.ts, ws.ts), to be found beside it. */
export const requestLog = (log: Logger, route: string, ids: RequestIds): Logger => log.child({ route, ...ids });

const failed = (err: unknown, opts: RouteOptions, r: Req): Reply => {
  const out = errorReply(err, requestLog(opts.log, r.url, r.ids));
  return opts.errorShape ? opts.errorShape(out) : out;
};

/**
 * Sends the answer and reports it. A client that left first is reported as 499 (what the WebSocket route records too),
 * so every request shows in the request counts and the access log, not only those whose answer went out.
 */
function replied(r: Req, out: Reply, ex: Exchange, opts: RouteOptions): void {
  if (ex.send(out)) opts.onReply?.(r, out, ex);
  else if (ex.gone.signal.aborted) opts.onReply?.(r, { status: httpStatus('CANCELLED'), body: '', code: 'CANCELLED' }, ex);
}

/** A route without a body (GET, HEAD, or a method answered before reading). */
export function route(fn: Handler, opts: RouteOptions) {
  return (req: IncomingMessage, res: ServerResponse, params: string[]): void => {
    const r = copyReq(req, params);
    const ex = new Exchange(res, req);
    let out: Reply | Promise<Reply>;
    try {
      out = fn(r, ex);
    } catch (err) {
      out = failed(err, opts, r);
    }
    const finish = (o: Reply) => replied(r, o, ex, opts);
    if (out instanceof Promise) out.catch((err) => failed(err, opts, r)).then(finish);
    else finish(out);
  };
}

/**
 * A route with a body. `precheck` runs synchronously before the body is read (KServe refuses an
 * unknown or unready model before reading), so a refused request costs no body copy.
 */
export function bodyRoute(fn: BodyHandler, opts: RouteOptions, precheck?: (req: Req) => void) {
  return (req: IncomingMessage, res: ServerResponse, params: string[]): void => {
    const r = copyReq(req, params);
    const ex = new Exchange(res, req);
    let pre: unknown;
    let codings: string[] = [];
    const unreadable = transferCodingError(r.headers['transfer-encoding']);
    try {
      if (unreadable) throw unreadable;
      precheck?.(r);
      codings = bodyCodings(r.headers['content-encoding']);
    } catch (err) {
      pre = err;
    }
    const finish = (o: Reply) => replied(r, o, ex, opts);
    // A body in a transfer coding Node does not undo is not worth reading either.
    const oversize = Number(r.headers['content-length'] ?? 0) > opts.maxBodyBytes || unreadable !== undefined;
    if (pre !== undefined) {
      // Refused before reading: Node reads and discards the unread body to keep the connection, unless it is over the
      // limit, then the connection closes after the answer.
      const out = failed(pre, opts, r);
      finish(oversize ? { ...out, headers: { ...out.headers, connection: 'close' } } : out);
      return;
    }
    // `Expect: 100-continue` (curl for large bodies): the client sends the body only once told to, here, after the
    // request passed its checks and declares a size within the limit; a refusal above goes out instead, so the client
    // sees its answer rather than a connection closed under an upload (base.ts leaves the 100 to the routes).
    if (/^100-continue$/i.test(r.headers.expect ?? '') && !oversize) res.writeContinue();
    const body = readBody(req, opts.maxBodyBytes, r.headers['content-length'] ?? '', codings);
    body
      .then((b) => fn(r, b, ex))
      .catch((err) => failed(err, opts, r))
      .then(finish);
  };
}

/** `text`, unless it holds nothing but whitespace: then V8's "Unexpected end of JSON input" would not say why. */
export function nonEmpty(text: string): string {
  if (text.trim() === '') throw new Error('the body is empty; send a JSON object');
  return text;
}
