/**
 * @module The first thing the process does: listen with liveness routes only. It imports nothing but Node's http, the
 * open-file limit's reader (descriptors.ts), the error codes (a module of constants) and OpenAI's error shape
 * (openai-errors.ts, importing nothing), so `/` and `/v2/health/live` answer within milliseconds of process start while
 * the runtime (logging, metrics, pipeline workers) is still being imported.
 *
 * Node's HTTP/1.1 server (llhttp) rather than uWebSockets.js: uWS 20.30 closes a keep-alive connection without an
 * answer when a request is pipelined behind one still running ("denying async pipelining", HttpContext.h), holds a
 * malformed request line or a NUL in a header until its 10 s idle timeout and drops oversize heads without a
 * status. Here pipelined requests are answered in order and bad requests get 400/431/413 at once.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { descriptorLimit, unloadedCode } from '../descriptors.js';
import { httpStatus, type HttpErrorCode } from '../errors.js';
import { corsHandler, type CorsHandler } from './cors.js';
import { isOpenAI, openaiErrorBody, openaiErrorHeaders } from './openai-errors.js';

/** A request handler; `params` holds the `:name` segments of its pattern, raw (not percent-decoded). */
export type RouteHandler = (req: IncomingMessage, res: ServerResponse, params: string[]) => void;
/** An HTTP upgrade (WebSocket) handler for a matching path. */
export type UpgradeHandler = (req: IncomingMessage, socket: Duplex, head: Buffer, params: string[]) => void;

export interface App {
  get(pattern: string, h: RouteHandler): void;
  post(pattern: string, h: RouteHandler): void;
  /** Upgrade requests (WebSocket) on `pattern`. */
  upgrade(pattern: string, h: UpgradeHandler): void;
}

export interface BaseServer {
  readonly app: App;
  /** Node's server underneath (tests, embedding). */
  readonly server: http.Server;
  readonly port: number;
  /** Replaces the answer for every request no route matches (before the runtime attaches: 503 starting). */
  setFallback(h: RouteHandler): void;
  /** The methods `path` answers (HEAD wherever GET is), for a 405's `Allow` (OPTIONS is a 405 too); empty if none. */
  allowed(path: string): string[];
  /** Whether `path` is served as a WebSocket (an upgrade route matches it with GET, the handshake's method). */
  websocket(path: string): boolean;
  /**
   * Cross-origin headers and preflights (cors.ts) once the routes are known, in place of ListenOptions.corsAllowOrigins'
   * (which knows the liveness routes only); none when CORS_ALLOW_ORIGINS is unset.
   */
  setCors(h: CorsHandler | undefined): void;
  /** Stops accepting connections; requests on open connections (keep-alive included) go on. Idempotent. */
  closeListener(): void;
  /**
   * Resolves once no request is being answered: each one received has had its answer handed to the OS, or its client
   * left, and each WebSocket has closed. A request still sending its body, or a client still reading a large answer,
   * counts: closeConnections() would cut it.
   */
  answered(): Promise<void>;
  /** Closes every connection still open (after the drain). */
  closeConnections(): void;
  /** Connection counts, live (metrics read them at scrape time). */
  readonly connections: ConnectionStats;
  /** Where the overload warnings go (the runtime's logger once it exists; one JSON line on stderr before). */
  setWarn(w: Warn): void;
}

export interface ListenOptions {
  /**
   * MAX_CONNECTIONS: connections served as usual at once. A connection opened beyond it may still ask for health
   * (answered) and is then closed; any other request on it is answered 503. 0: no cap. Unset: the descriptor limit less
   * a reserve (autoMaxConnections).
   */
  maxConnections?: number | undefined;
  /**
   * CORS_ALLOW_ORIGINS, for the answers given before the runtime attaches its routes and handler (the 503 "not ready",
   * a connection past the cap): a page reads them only with the CORS headers it gets from the routes later.
   */
  corsAllowOrigins?: readonly string[];
}

export interface ConnectionStats {
  /** Connections open now within the cap (WebSocket ones included). */
  readonly open: number;
  /** Connections open now beyond it (waiting for their one request, or being answered). */
  readonly overflow: number;
  /** The cap in force; 0 when there is none. */
  readonly max: number;
  /** The process's open-file limit (RLIMIT_NOFILE, soft), when known. */
  readonly descriptorLimit: number | undefined;
  /** Requests and upgrades beyond the cap answered 503. */
  readonly overLimit: number;
  /** Connections beyond the cap closed without an answer (no request in time, or pushed out by newer ones). */
  readonly dropped: number;
  /** Accepts that failed and reached the server (EMFILE, ENFILE, …): those connections could not be accepted then. */
  readonly acceptFailed: number;
}

export type Warn = (fields: Record<string, unknown>, msg: string) => void;

/** Heads are capped (kubelet and Knative send ~10 header fields, ~1 kB); above either limit: 431. */
export const MAX_HEADER_BYTES = 16 * 1024;
export const MAX_HEADER_FIELDS = 100;
/** Time for a client to send a whole request head (slow-loris guard), and a whole request. */
const HEADERS_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 120_000;
/** How often Node sweeps the connections for those two timeouts (its default, 30 s, cut a slow head at 15-45 s). */
const TIMEOUT_SWEEP_MS = 1_000;
/**
 * Idle keep-alive connections stay open this long. Longer than the usual proxy idle timeouts (60 s), so a proxy
 * never sends a request on a connection this server is closing at that moment.
 */
const KEEP_ALIVE_MS = 75_000;

/** Connections beyond the cap waiting for their request at once; a newer one pushes the oldest out. */
const OVERFLOW_SLOTS = 32;
/** How long a connection beyond the cap has to send its request head (a probe sends it at once). */
const OVERFLOW_HEAD_MS = 2_000;
/** One overload warning of each kind per this many ms, with the counts since the last one. */
const WARN_EVERY_MS = 60_000;
/** Paths answered on a connection beyond the cap: kubelet's probes must not fail because clients hold connections. */
const HEALTH_PATHS = new Set(['/', '/v2/health/live', '/v2/health/ready']);
/** The per-model readiness routes, which the README offers as readiness probes too. */
const MODEL_READY = /^\/v[12]\/models\/[^/]+\/ready$/;
const isHealth = (path: string): boolean => HEALTH_PATHS.has(path) || MODEL_READY.test(path);

const STARTING = '{"error":"Server is not ready.","code":"MODEL_NOT_READY","ready":false,"state":"starting"}';
/** The same under /openai, where OpenAI's SDKs read their own error shape (and retry a 503). */
const OPENAI_STARTING = openaiErrorBody(503, 'MODEL_NOT_READY', 'Server is not ready.');

interface Route<H> {
  parts: string[];
  statics: number;
  h: H;
}

class Router<H> {
  #routes = new Map<string, Array<Route<H>>>();

  add(method: string, pattern: string, h: H): void {
    const parts = pattern.split('/');
    const list = this.#routes.get(method) ?? [];
    list.push({ parts, statics: parts.filter((p) => !p.startsWith(':')).length, h });
    // The most specific pattern wins where two match (a static segment beats a parameter).
    list.sort((a, b) => b.statics - a.statics);
    this.#routes.set(method, list);
  }

  /** The methods with a route for `path`. */
  methods(path: string): string[] {
    return [...this.#routes.keys()].filter((m) => this.match(m, path) !== undefined);
  }

  match(method: string, path: string): { h: H; params: string[] } | undefined {
    // Segments are matched decoded, as KServe's server (Starlette) matches them: `model%3Apredict` is `model:predict`.
    const segs = path.split('/').map(decodeSegment);
    for (const r of this.#routes.get(method) ?? []) {
      if (r.parts.length !== segs.length) continue;
      const params: string[] = [];
      let ok = true;
      for (let i = 0; i < segs.length && ok; i++) {
        const p = r.parts[i]!;
        if (p.startsWith(':')) {
          if (segs[i] === '') ok = false;
          else params.push(segs[i]!);
        } else ok = p === segs[i];
      }
      if (ok) return { h: r.h, params };
    }
    return undefined;
  }
}

/** A path segment with its %XX escapes decoded; one that is not valid percent-encoded UTF-8 stays as sent. */
function decodeSegment(seg: string): string {
  if (!seg.includes('%')) return seg;
  try {
    return decodeURIComponent(seg);
  } catch {
    return seg;
  }
}

export const pathOf = (url: string | undefined): string => {
  let u = url ?? '/';
  // RFC 9112 3.2.2: a server must accept a target in absolute form (`GET http://host/v1/models`), as proxies send it.
  const origin = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i.exec(u)?.[0];
  if (origin !== undefined) {
    u = u.slice(origin.length);
    if (!u.startsWith('/')) u = `/${u}`; // an empty path is '/' (`http://x?probe=1` too)
  }
  const q = u.indexOf('?');
  const p = q < 0 ? u : u.slice(0, q);
  // One trailing slash is the same path (`/v2/health/ready/` in a probe copied from elsewhere): KServe's Python server
  // (Starlette) redirects it there, and kubelet follows; none of the routes ends with one.
  return p.length > 1 && p.endsWith('/') ? p.slice(0, -1) : p;
};

/** The error body every answer of this module carries: KServe's `error`, with our stable code beside it. */
const errorBody = (code: HttpErrorCode, error: string): string => JSON.stringify({ error, code });

/** How long a connection closed after an answer still takes (and drops) what the client sends. */
export const LINGER_MS = 2000;

/** Destroys `socket` LINGER_MS from now, unless it has closed by then. */
function destroyLater(socket: Duplex): void {
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
}

/**
 * Closing a socket with the client's bytes still unread makes the kernel answer with a reset, which can reach the
 * client before it has read the answer: a client that writes a whole oversize body before reading lost its 413 about
 * one time in seven. So, as web servers do ("lingering close"), the answer goes out with our FIN and the server reads
 * and drops what still comes until the client closes, for LINGER_MS at most, before it lets the socket go.
 */
export function lingerOnClose(res: ServerResponse): void {
  const socket = res.socket as (Socket & { destroySoon?: () => void }) | null;
  if (!socket || typeof socket.destroySoon !== 'function') return;
  // Node's server ends a `Connection: close` exchange with destroySoon(): end(), then destroy() once it is written.
  socket.destroySoon = () => {
    socket.end();
    res.req?.resume(); // the body's rest is read and dropped, not buffered
    destroyLater(socket);
    socket.once('end', () => socket.destroy());
  };
}

/**
 * Writes a whole JSON response on a raw socket (parse errors, timeouts, refused upgrades), then closes it. end() only
 * half-closes (the HTTP server allows half-open sockets): a client that never reads nor closes (a slow-loris one
 * answered 408) would hold the descriptor for good, so the socket is destroyed LINGER_MS later at the latest.
 */
function rawReply(socket: Duplex, status: number, json: string, extra = ''): void {
  if (!socket.writable) return void socket.destroy();
  const text = http.STATUS_CODES[status] ?? 'Error';
  socket.end(`HTTP/1.1 ${status} ${text}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(json)}\r\n${extra}connection: close\r\n\r\n${json}`);
  destroyLater(socket);
}

/** An error answer on a raw socket (a refused upgrade, a request that does not parse), its status from its code. */
export const rawError = (socket: Duplex, code: HttpErrorCode, error: string, extra = ''): void => rawReply(socket, httpStatus(code), errorBody(code, error), extra);

/**
 * Responses not yet finished on each connection, so a parse error is answered after them, in order: each waiter runs
 * once at most `left` of them remain.
 */
const pending = new WeakMap<Socket, { n: number; idle: Array<{ left: number; run: () => void }> }>();
/** The response to the last request each connection sent. */
const latest = new WeakMap<Socket, ServerResponse>();

function track(req: IncomingMessage, res: ServerResponse): void {
  const socket = req.socket;
  const p = pending.get(socket) ?? { n: 0, idle: [] };
  pending.set(socket, p);
  latest.set(socket, res);
  p.n++;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    p.n--;
    for (const w of p.idle.filter((x) => x.left >= p.n)) {
      p.idle.splice(p.idle.indexOf(w), 1);
      w.run();
    }
  };
  res.once('finish', finish);
  res.once('close', finish);
}

/** The exchanges open on each connection, told when it closes: one listener per socket however many are pipelined. */
const onConnection = new WeakMap<Socket, Set<() => void>>();
/** Runs `f` when `socket` closes; returns what unregisters it. */
export function onSocketClose(socket: Socket, f: () => void): () => void {
  let set = onConnection.get(socket);
  if (!set) {
    const fs = new Set<() => void>();
    set = fs;
    onConnection.set(socket, fs);
    socket.once('close', () => {
      onConnection.delete(socket);
      for (const g of fs) g();
    });
  }
  set.add(f);
  const mine = set;
  return () => void mine.delete(f);
}

function clientError(err: NodeJS.ErrnoException & { reason?: string }, socket: Duplex): void {
  if (err.code === 'ECONNRESET' || !socket.writable) return void socket.destroy();
  const [code, msg]: [HttpErrorCode, string] =
    err.code === 'HPE_HEADER_OVERFLOW'
      ? ['HEADERS_TOO_LARGE', `request head larger than ${MAX_HEADER_BYTES} bytes`]
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? ['REQUEST_TIMEOUT', 'the request did not arrive in time']
        : err.code === 'HPE_INVALID_EOF_STATE'
          ? ['INVALID_INPUT', 'the connection was closed before the whole request body arrived']
          : ['INVALID_INPUT', `malformed HTTP request (${err.reason ?? err.code ?? 'parse error'})`];
  const answer = () => rawError(socket, code, msg);
  // A pipelined request that does not parse is answered after the ones before it, never ahead of them. The error may
  // also be in the body of the request being read (a bad chunk, the client closing or stalling mid-body): its route
  // waits for a body that will never end, so only the answers before it are waited for; closing the connection then
  // ends that request (its route sees the client gone) and frees the socket.
  const p = pending.get(socket as Socket);
  const last = latest.get(socket as Socket);
  const reading = last !== undefined && !last.req.complete && !last.writableEnded ? 1 : 0;
  if (p && p.n > reading) p.idle.push({ left: reading, run: answer });
  else answer();
}

/** Connection tokens and fields that ask for another protocol, dropped when a request is served without switching. */
const UPGRADE_FIELDS = new Set(['upgrade', 'http2-settings']);

const isWebSocketUpgrade = (req: IncomingMessage): boolean =>
  (req.headers.upgrade ?? '').split(',').some((p) => p.trim().toLowerCase() === 'websocket');

/**
 * Any Upgrade but WebSocket (`curl --http2` and Java's HttpClient ask for h2c on every plain-HTTP request) is ignored,
 * as RFC 9110 7.8 lets a server do: Node has already handed the socket over as an upgrade, so the request head is
 * written again without its upgrade fields, put back in front of the unread bytes (`head`: the body and any pipelined
 * requests) and the socket is given to the HTTP server as a new connection, which parses and answers it as usual.
 */
function serveWithoutUpgrade(server: http.Server, req: IncomingMessage, socket: Duplex, head: Buffer): void {
  const lines = [`${req.method} ${req.url} HTTP/${req.httpVersion}`];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!;
    let value = req.rawHeaders[i + 1]!;
    const lower = name.toLowerCase();
    if (UPGRADE_FIELDS.has(lower)) continue;
    if (lower === 'connection') {
      value = value.split(',').map((t) => t.trim()).filter((t) => t !== '' && !UPGRADE_FIELDS.has(t.toLowerCase())).join(', ');
      if (value === '') continue;
    }
    lines.push(`${name}: ${value}`);
  }
  const serve = () => {
    if (socket.destroyed) return;
    // The idle timer the old connection armed once its last answer went out would cut a long request served here.
    (socket as Socket).setTimeout(0);
    socket.unshift(Buffer.concat([Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1'), head]));
    server.emit('connection', socket);
  };
  // Pipelined behind a request still being answered: the new connection starts once that answer is written.
  const p = pending.get(socket as Socket);
  if (p && p.n > 0) p.idle.push({ left: 0, run: serve });
  else serve();
}

/**
 * The cap when MAX_CONNECTIONS is unset: the descriptor limit less a reserve (an eighth, at least 256) for what else
 * needs descriptors (model and cache files, S3 sockets, adapter reads, ORT's optimized-model writer, the workers' pipes,
 * connections beyond the cap asking for health). Node raises the soft limit to the hard one at start, so this is the
 * hard limit in practice. No cap where the limit is unknown.
 */
export const autoMaxConnections = (limit: number | undefined): number =>
  limit === undefined ? 0 : Math.max(64, limit - Math.max(256, Math.floor(limit / 8)));

const writeWarn: Warn = (fields, msg) => void process.stderr.write(`${JSON.stringify({ level: 'warn', msg, ...fields })}\n`);

export function listenBase(host: string, port: number, opts: ListenOptions = {}): Promise<BaseServer> {
  const routes = new Router<RouteHandler>();
  const upgrades = new Router<UpgradeHandler>();
  const alive = (body: string): RouteHandler => (_req, res) => {
    // Code that could not be loaded stays so in this process (descriptors.ts firstUse): only a restart serves again.
    const broken = unloadedCode();
    const out = broken === undefined ? body : JSON.stringify({ live: false, error: `${broken} could not be loaded (the process ran out of file descriptors while loading it) and cannot be loaded again in this process: restart it` });
    res.writeHead(broken === undefined ? 200 : 503, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(out) }).end(out);
  };
  routes.add('GET', '/', alive('{"status":"alive"}'));
  routes.add('GET', '/v2/health/live', alive('{"live":true}'));
  let fallback: RouteHandler = (req, res) => {
    const body = isOpenAI(pathOf(req.url)) ? OPENAI_STARTING : STARTING;
    res.writeHead(503, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'retry-after': '1' }).end(body);
  };

  let open = true;
  /** The methods some route answers on `path` (HEAD wherever GET is). */
  const allowed = (path: string): string[] => {
    const methods = routes.methods(path);
    return methods.includes('GET') ? [...methods, 'HEAD'] : methods;
  };
  let cors: CorsHandler | undefined = corsHandler(opts.corsAllowOrigins ?? [], allowed);
  /** Responses not yet handed to the OS and WebSockets not yet closed (answered()). */
  let answering = 0;
  const answeredWaiters: Array<() => void> = [];
  /** Counts one answer until the first of `events` on `emitter`; returns what ends it sooner (once, whoever calls it). */
  const answeringUntil = (emitter: NodeJS.EventEmitter, events: string[]): (() => void) => {
    answering++;
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      if (--answering === 0) for (const w of answeredWaiters.splice(0)) w();
    };
    for (const e of events) emitter.once(e, end);
    return end;
  };

  const fdLimit = descriptorLimit();
  const maxConnections = opts.maxConnections ?? autoMaxConnections(fdLimit);
  let within = 0;
  let overflowOpen = 0;
  const counts = { overLimit: 0, dropped: 0, acceptFailed: 0 };
  /** Sockets already counted: one given back to the server as a new connection (serveWithoutUpgrade) is not counted twice. */
  const counted = new WeakSet<Socket>();
  /** Connections opened beyond the cap; they get one answer, then close. */
  const beyond = new WeakSet<Socket>();
  /** Those that have had their request (a later one pipelined behind it gets no answer). */
  const answeredBeyond = new WeakSet<Socket>();
  /** Those still waiting for their request, oldest first. */
  const waiting = new Set<Socket>();
  let warn = writeWarn;
  const lastWarn = new Map<string, { at: number; suppressed: number }>();
  /** One warning of each kind per WARN_EVERY_MS; the next one says how many were not logged in between. */
  const warnEvery = (kind: string, fields: () => Record<string, unknown>, msg: () => string): void => {
    const now = Date.now();
    const last = lastWarn.get(kind);
    if (last && now - last.at < WARN_EVERY_MS) return void last.suppressed++;
    lastWarn.set(kind, { at: now, suppressed: 0 });
    warn({ ...fields(), ...(last ? { suppressed: last.suppressed } : {}) }, msg());
  };
  const overflowFields = () => ({ maxConnections, open: within, beyond: overflowOpen, descriptorLimit: fdLimit ?? null });

  /**
   * Once the listener is closed (SIGTERM), every answer closes its connection after it is written: a proxy or client
   * holding a kept-alive connection gets its answer (or the 503 "shutting down") and then opens a new one, to another
   * pod, instead of sending more to this one or meeting a reset at the exit.
   */
  class Response extends http.ServerResponse {
    override writeHead(...args: unknown[]): this {
      // Only on the connection's last request: those pipelined behind this one are answered first. A connection beyond
      // the cap gets one answer.
      if ((!open && latest.get(this.req.socket) === this) || beyond.has(this.req.socket)) {
        // `close` joins the answer's own Connection options (a 426's `upgrade`), which would otherwise replace it.
        const given = args.find((a): a is Record<string, unknown> => typeof a === 'object' && a !== null && !Array.isArray(a));
        const own = String(given?.connection ?? this.getHeader('connection') ?? '');
        const value = own === '' || /\bclose\b/i.test(own) ? 'close' : `${own}, close`;
        if (given?.connection !== undefined) given.connection = value;
        else this.setHeader('connection', value);
      }
      return (super.writeHead as (...a: unknown[]) => this)(...args);
    }
  }

  const server = http.createServer(
    { ServerResponse: Response, maxHeaderSize: MAX_HEADER_BYTES, requireHostHeader: false, headersTimeout: HEADERS_TIMEOUT_MS, requestTimeout: REQUEST_TIMEOUT_MS,
      connectionsCheckingInterval: TIMEOUT_SWEEP_MS, keepAliveTimeout: KEEP_ALIVE_MS },
    (req, res) => {
      track(req, res);
      const release = answeringUntil(res, ['finish', 'close']);
      // A response queued behind a pipelined one gets neither event when its client leaves (Node closes only the
      // response on the socket), and never will: the socket's close ends it, or every later drain would wait its grace.
      const off = onSocketClose(req.socket, release);
      res.once('finish', off);
      res.once('close', off);
      const refuse = (code: HttpErrorCode, error: string, headers: Record<string, string> = {}) => {
        const path = pathOf(req.url);
        // Under /openai in OpenAI's shape, as the routes there answer: its SDKs read no other.
        const openai = isOpenAI(path);
        const body = openai ? openaiErrorBody(httpStatus(code), code, error) : errorBody(code, error);
        // A page reads a refusal (and its Retry-After) only with the CORS headers it would get from a route.
        cors?.(req, res, path, false);
        res.writeHead(httpStatus(code), { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers,
          ...(openai ? openaiErrorHeaders(code) : {}), connection: 'close' }).end(body);
      };
      if (beyond.has(req.socket)) {
        waiting.delete(req.socket);
        // Only the connection's first answer is written (it closes the connection): one pipelined behind it is not
        // counted as refused, since no 503 reaches its client.
        const first = !answeredBeyond.has(req.socket);
        answeredBeyond.add(req.socket);
        if (!((req.method === 'GET' || req.method === 'HEAD') && isHealth(pathOf(req.url)))) {
          if (first) counts.overLimit++;
          // A body still arriving is read and dropped, and the connection lingers, so the answer is not lost to a reset.
          req.resume();
          lingerOnClose(res);
          return refuse('BUSY', overLimitMessage(maxConnections), { 'retry-after': '1' });
        }
      }
      if (req.rawHeaders.length / 2 > MAX_HEADER_FIELDS) return refuse('HEADERS_TOO_LARGE', `too many header fields (at most ${MAX_HEADER_FIELDS})`);
      // RFC 9112 3.2: an HTTP/1.1 request without Host is a 400. HTTP/1.0 has no Host requirement and is served.
      if (req.httpVersion === '1.1' && req.headers.host === undefined) return refuse('INVALID_INPUT', 'malformed HTTP request: an HTTP/1.1 request needs a Host header');
      const path = pathOf(req.url);
      if (cors?.(req, res, path)) return;
      // RFC 9110 9.3.2: HEAD is GET without the body (Node's response writes the headers only for a HEAD request).
      const hit = routes.match(req.method === 'HEAD' ? 'GET' : (req.method ?? 'GET'), path);
      if (hit) hit.h(req, res, hit.params);
      else fallback(req, res, []);
    },
  );
  // No field count in Node's parser: past maxHeadersCount Node 20 drops fields and Node 24 fails the parse with the
  // HPE_HEADER_OVERFLOW of an oversize head, so a 1 kB head of 150 fields would be told it is over 16 kB. The handler
  // counts the fields; MAX_HEADER_BYTES bounds how many a head can carry.
  server.maxHeadersCount = 0;
  server.on('clientError', clientError);
  // Node would answer `Expect: 100-continue` with 100 before any route ran; a route with a body sends it once the
  // request may go on (http.ts bodyRoute), so a refused one is answered without the client uploading its body first.
  server.on('checkContinue', (req: IncomingMessage, res: http.ServerResponse) => server.emit('request', req, res));
  // CONNECT comes from a client whose HTTPS_PROXY names this server; without a listener Node closes the socket unanswered.
  server.on('connect', (req: IncomingMessage, socket: Duplex) => {
    const answer = () => rawReply(socket, 405, errorBody('METHOD_NOT_ALLOWED',
      `CONNECT ${req.url ?? ''} is not served: this is a model server, not a proxy (check the client's HTTPS_PROXY)`), 'allow: GET, HEAD, POST\r\n');
    // Pipelined behind requests still being answered: after them, not in the place of the first.
    const p = pending.get(socket as Socket);
    if (p && p.n > 0) p.idle.push({ left: 0, run: answer });
    else answer();
  });
  let attached = false;
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    if (!isWebSocketUpgrade(req)) return void serveWithoutUpgrade(server, req, socket, head);
    if (beyond.has(socket as Socket)) {
      waiting.delete(socket as Socket);
      counts.overLimit++;
      return void rawReply(socket, 503, errorBody('BUSY', overLimitMessage(maxConnections)), 'retry-after: 1\r\n');
    }
    const path = pathOf(req.url);
    const hit = upgrades.match(req.method ?? 'GET', path);
    if (hit) {
      answeringUntil(socket, ['close']);
      hit.h(req, socket, head, hit.params);
    }
    else if (!attached) rawReply(socket, 503, STARTING);
    // The endpoint, asked with another method: a WebSocket handshake is a GET (RFC 6455 4.1).
    else if (upgrades.match('GET', path)) rawError(socket, 'METHOD_NOT_ALLOWED', `${req.method ?? ''} ${path}: a WebSocket handshake is a GET request`, 'allow: GET\r\n');
    else rawError(socket, 'NOT_FOUND', `no WebSocket endpoint at ${path}`);
  });

  // Counted after Node's own listener has set the connection up. Within the cap a connection is served as usual;
  // beyond it, it waits for its one request (health is answered, anything else 503) for OVERFLOW_HEAD_MS at most, and
  // at most OVERFLOW_SLOTS such connections wait at once: a newer one pushes the oldest out, so a flood of idle
  // connections cannot keep a probe from being answered.
  server.on('connection', (socket: Socket) => {
    if (counted.has(socket)) return;
    counted.add(socket);
    if (maxConnections === 0 || within < maxConnections) {
      within++;
      socket.once('close', () => within--);
      return;
    }
    overflowOpen++;
    beyond.add(socket);
    warnEvery('over-limit', overflowFields, () => `connection limit reached (MAX_CONNECTIONS=${maxConnections}): new connections get health answers and 503 for anything else until some close`);
    if (waiting.size >= OVERFLOW_SLOTS) {
      const oldest = waiting.values().next().value!;
      waiting.delete(oldest);
      counts.dropped++;
      oldest.destroy();
    }
    waiting.add(socket);
    const timer = setTimeout(() => {
      if (!waiting.delete(socket)) return;
      counts.dropped++;
      socket.destroy();
    }, OVERFLOW_HEAD_MS);
    timer.unref();
    socket.once('close', () => {
      overflowOpen--;
      waiting.delete(socket);
      clearTimeout(timer);
    });
  });

  const app: App = {
    get: (p, h) => routes.add('GET', p, h),
    post: (p, h) => routes.add('POST', p, h),
    upgrade: (p, h) => upgrades.add('GET', p, h),
  };

  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => reject(new ListenError(host, port, err));
    server.once('error', onError);
    // Node sets no SO_REUSEPORT (uWS did), and `exclusive` keeps cluster workers from sharing the handle: a second server
    // on the same port fails here with EADDRINUSE instead of taking part of the traffic.
    server.listen({ host, port, exclusive: true }, () => {
      server.off('error', onError);
      // From here on net.Server emits the accepts that failed: libuv closes the connections waiting in the backlog when
      // the process is out of descriptors (EMFILE) and says nothing, but where that fails (another thread took the
      // descriptor it freed) the error comes here, and without a listener it would end the process.
      server.on('error', (err: NodeJS.ErrnoException) => {
        counts.acceptFailed++;
        const atLimit = err.code === 'EMFILE' || err.code === 'ENFILE';
        warnEvery(`accept-${err.code}`, () => ({ code: err.code ?? null, syscall: err.syscall ?? null, ...overflowFields() }), () =>
          atLimit
            ? `accepting a connection failed (${err.code}): the process is at its open-file limit (${err.code === 'ENFILE' ? 'the system-wide table' : fdLimit ?? 'unknown'}); new connections cannot be accepted until descriptors are freed`
            : `accepting a connection failed (${err.code ?? err.message}); that connection could not be accepted`);
      });
      resolve({
        server,
        app,
        port: (server.address() as { port: number }).port,
        setFallback: (h) => {
          fallback = h;
          attached = true;
        },
        allowed,
        websocket: (path) => upgrades.match('GET', path) !== undefined,
        setCors: (h) => {
          cors = h;
        },
        closeListener: () => {
          if (!open) return;
          open = false;
          // net.Server's close, not http.Server's: the latter also drops idle keep-alive connections, and a proxy
          // holding one would see a reset instead of the 503 "shutting down" answer.
          Object.getPrototypeOf(http.Server.prototype).close.call(server);
        },
        answered: () => (answering === 0 ? Promise.resolve() : new Promise((r) => answeredWaiters.push(r))),
        closeConnections: () => server.closeAllConnections(),
        connections: {
          get open() {
            return within;
          },
          get overflow() {
            return overflowOpen;
          },
          max: maxConnections,
          descriptorLimit: fdLimit,
          get overLimit() {
            return counts.overLimit;
          },
          get dropped() {
            return counts.dropped;
          },
          get acceptFailed() {
            return counts.acceptFailed;
          },
        },
        setWarn: (w) => {
          warn = w;
        },
      });
    });
  });
}

const overLimitMessage = (max: number): string =>
  `too many open connections (MAX_CONNECTIONS=${max}): retry shortly, or reuse a kept-alive connection`;

/** Why listening failed, as one line an operator can act on. */
export class ListenError extends Error {
  constructor(host: string, port: number, override readonly cause: NodeJS.ErrnoException) {
    const where = `${host}:${port}`;
    const why =
      cause.code === 'EADDRINUSE'
        ? `port ${port} is already in use on ${host} (another server is listening there): stop it or set PORT to a free port`
        : cause.code === 'EACCES'
          ? `not permitted to listen on ${where} (ports below 1024 need privileges): set PORT to 1024 or above`
          : cause.code === 'EADDRNOTAVAIL'
            ? `HOST ${host} is not an address of this machine`
            : `could not listen on ${where}: ${cause.code ?? cause.message}`;
    super(why);
    this.name = 'ListenError';
  }
}
