/**
 * @module Cross-origin requests from browser pages (CORS_ALLOW_ORIGINS). Off unless set, as in KServe's own server:
 * then no CORS header is sent and OPTIONS is a 405. Set, a request from an allowed origin gets
 * `Access-Control-Allow-Origin` on every answer (errors too, so a page can read why it was refused), and a preflight
 * to a path some route answers gets 204 with the methods that path takes.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

/**
 * Answers what it must (a preflight) and returns true; otherwise sets its headers, if any, and returns false.
 * `answer` false: headers only, for a request the server refuses before its routes (a 503 past MAX_CONNECTIONS).
 */
export type CorsHandler = (req: IncomingMessage, res: ServerResponse, path: string, answer?: boolean) => boolean;

/** Response headers a page may read besides the CORS-safelisted ones (content-type, content-length, …). */
const EXPOSED = 'retry-after, allow, x-should-retry, inference-header-content-length, ce-specversion, ce-id, ce-source, ce-type, ce-time';
/** How long a browser may reuse a preflight's answer (browsers cap it: Chromium at 2 h, Firefox at 24 h). */
const MAX_AGE_S = 600;
/** `Access-Control-Request-Headers` as browsers send it: field names, comma-separated, lower-case. */
const FIELD_NAMES = /^[!#$%&'*+.^_`|~0-9a-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9a-z-]+)*$/i;

/**
 * `origins`: the origins allowed (as browsers send them in `Origin`: scheme://host[:port]), or `['*']` for any.
 * `allowed(path)`: the methods some route answers on `path` (empty: none).
 */
export function corsHandler(origins: readonly string[], allowed: (path: string) => string[]): CorsHandler | undefined {
  if (origins.length === 0) return undefined;
  const any = origins.includes('*');
  const set = new Set(origins);
  return (req, res, path, answer = true) => {
    const origin = req.headers.origin;
    // A cache in between must not serve one origin's answer to another, nor an answer without CORS headers (to a
    // request with no Origin, or another one) to a listed origin: with listed origins every answer varies on Origin;
    // with `*`, every answer carries it (Fetch standard, "CORS protocol and HTTP caches").
    if (!any) {
      res.setHeader('vary', 'origin');
      if (origin === undefined || !set.has(origin)) return false;
    }
    res.setHeader('access-control-allow-origin', any ? '*' : origin!);
    const method = req.headers['access-control-request-method'];
    if (req.method !== 'OPTIONS' || method === undefined || origin === undefined || !answer) {
      res.setHeader('access-control-expose-headers', EXPOSED);
      return false;
    }
    const methods = allowed(path);
    // A preflight to a path nothing answers is answered as any request there would be (404).
    if (methods.length === 0) return false;
    const headers: Record<string, string | number> = {
      'access-control-allow-methods': methods.join(', '),
      'access-control-max-age': MAX_AGE_S,
      'content-length': 0,
    };
    const asked = req.headers['access-control-request-headers']?.trim();
    if (asked && FIELD_NAMES.test(asked)) headers['access-control-allow-headers'] = asked;
    // The answer echoes the headers asked for: a cache must key it on them too.
    headers.vary = `${any ? '' : 'origin, '}access-control-request-method, access-control-request-headers`;
    // The methods the path takes, whatever was asked: the browser refuses one not among them and says so.
    res.writeHead(204, headers).end();
    return true;
  };
}

/**
 * Adds the `ce-*` headers an answer carries beyond EXPOSED's five (the extensions CE_MERGE copies into a binary
 * event's answer: `ce-traceparent`, `ce-subject`, …) to the headers a page may read; nothing on an answer without
 * CORS headers. A list written per answer, as those names come from the request.
 */
export function exposeEventHeaders(res: ServerResponse, headers: Readonly<Record<string, string>> | undefined): void {
  const exposed = res.getHeader('access-control-expose-headers');
  if (typeof exposed !== 'string' || headers === undefined) return;
  const listed = new Set(exposed.split(', '));
  const more = Object.keys(headers).map((k) => k.toLowerCase()).filter((k) => k.startsWith('ce-') && !listed.has(k));
  if (more.length > 0) res.setHeader('access-control-expose-headers', `${exposed}, ${more.join(', ')}`);
}

/**
 * Why a WebSocket handshake is refused for its `Origin`, or undefined. A browser lets any page open a WebSocket to any
 * server, cookies included, and applies no CORS check to it: behind a login proxy with cookie sessions a page of
 * another site could generate with its visitor's session and read the images (cross-site WebSocket hijacking). So a
 * handshake from a page is taken only from this server's own host (`Host`, or `X-Forwarded-Host` set by a proxy: a page
 * can set neither) or from an origin CORS_ALLOW_ORIGINS lists (`*`: any); one without `Origin` (not a browser) as ever.
 */
export function wsOriginRefusal(req: IncomingMessage, origins: readonly string[]): string | undefined {
  const origin = req.headers.origin;
  if (origin === undefined || origins.includes('*') || origins.includes(origin)) return undefined;
  let url: URL | undefined;
  try {
    url = new URL(origin);
  } catch {
    // 'null' (a sandboxed frame, a file:// page) or garbage: no host to compare.
  }
  if (url !== undefined && (url.protocol === 'http:' || url.protocol === 'https:')) {
    const forwarded = String(req.headers['x-forwarded-host'] ?? '').split(',');
    for (const host of [req.headers.host ?? '', ...forwarded].map((h) => h.trim()).filter((h) => h.length > 0)) {
      try {
        // The host as the origin's scheme writes it: a default port (`:443` for https) is dropped on both sides.
        if (new URL(`${url.protocol}//${host}`).host === url.host) return undefined;
      } catch {
        // not a host
      }
    }
  }
  const shown = JSON.stringify(origin.length > 100 ? `${origin.slice(0, 100)}…` : origin);
  return `WebSocket handshake from a page of origin ${shown} refused: a browser page may open the stream only from this server's own host or from an origin listed in CORS_ALLOW_ORIGINS`;
}
