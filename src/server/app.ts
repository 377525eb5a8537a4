/** @module The HTTP app: health and metrics routes answered from the main thread, protocol routes, fallbacks. */
import { RuntimeError } from '../errors.js';
import { exposition } from '../metrics.js';
import { pathOf, type BaseServer } from './base.js';
import type { ServerContext } from './context.js';
import { corsHandler } from './cors.js';
import { errorReply, json, route, type Reply, type Req, type RouteOptions, type Exchange } from './http.js';
import { OPENAI_SERVED, openaiError, registerOpenAI } from './openai.js';
import { isOpenAI } from './openai-errors.js';
import { registerV1 } from './v1.js';
import { registerV2 } from './v2.js';
import { registerWs } from './ws.js';

const PREDICT_ROUTE = /^\/v[12]\/models\/[^/]+(:predict|\/infer)$|^\/openai\/v1\/images\/(generations|edits)$/;

/** `/v1/models/{target}`'s target, decoded segment by segment as the routes match it; undefined for other paths. */
function v1Target(path: string): string | undefined {
  const segs = path.split('/');
  if (segs.length !== 4 || segs[0] !== '' || segs[1] !== 'v1' || segs[2] !== 'models') return undefined;
  try {
    return decodeURIComponent(segs[3]!);
  } catch {
    return segs[3];
  }
}

/** Copies the server's connection counts into the metrics; called at each scrape. */
function connectionMetrics(base: BaseServer, ctx: ServerContext): () => void {
  const m = ctx.metrics;
  const l = { model_name: ctx.cfg.modelName };
  const c = base.connections;
  const seen = { over_limit: 0, dropped: 0, accept_failed: 0 };
  m.connectionsMax.set(l, c.max);
  for (const reason of Object.keys(seen)) m.connectionsRefused.inc({ ...l, reason }, 0);
  return () => {
    m.connectionsOpen.set({ ...l, state: 'within' }, c.open);
    m.connectionsOpen.set({ ...l, state: 'beyond' }, c.overflow);
    const now = { over_limit: c.overLimit, dropped: c.dropped, accept_failed: c.acceptFailed };
    for (const [reason, n] of Object.entries(now) as Array<[keyof typeof seen, number]>) {
      if (n > seen[reason]) m.connectionsRefused.inc({ ...l, reason }, n - seen[reason]);
      seen[reason] = n;
    }
  };
}

/** Adds every route beyond liveness to the already-listening base server. */
export function registerRoutes(base: BaseServer, ctx: ServerContext): void {
  const { app } = base;
  const opts: RouteOptions = {
    log: ctx.log,
    maxBodyBytes: ctx.cfg.maxBodyBytes,
    onReply: (r: Req, out: Reply, ex: Exchange) => {
      if (r.method === 'post' && PREDICT_ROUTE.test(r.url)) {
        const protocol = r.url.startsWith('/v2') ? 'v2' : r.url.startsWith('/openai') ? 'openai' : 'v1';
        const labels = { model_name: ctx.cfg.modelName, protocol };
        ctx.metrics.requests.inc({ ...labels, status: String(out.status) });
        if (out.code === 'CACHE_STUCK') ctx.metrics.cacheStuck.inc({ model_name: ctx.cfg.modelName });
        const secs = (performance.now() - ex.started) / 1000;
        if (out.status === 200) ctx.metrics.requestDuration.observe(labels, secs);
        ctx.log.info({ route: r.url, status: out.status, code: out.code, seconds: Number(secs.toFixed(3)), ...r.ids }, 'inference request');
      }
    },
  };

  // Liveness (`/`, `/v2/health/live`) is answered by the base server from the moment it listens.
  app.get(
    '/v2/health/ready',
    route(() => {
      if (ctx.boot.ready && !ctx.stopping()) return json(200, { ready: true });
      // While a transient failure waits for its next attempt, why and until when.
      const retrying = ctx.boot.state === 'retrying' ? { reason: ctx.boot.reason, retry: ctx.boot.retry() } : {};
      throw new RuntimeError('MODEL_NOT_READY', 'Server is not ready.', { fields: { ready: false, state: ctx.boot.state, ...retrying } });
    }, opts),
  );
  // Each protocol's answered requests at 0 from the start: the first request of a pod, counted from nothing, is
  // missed by rate() and increase(). Other statuses appear with their first answer.
  for (const protocol of ['v1', 'v2', 'ws', 'openai']) {
    const labels = { model_name: ctx.cfg.modelName, protocol };
    ctx.metrics.requests.inc({ ...labels, status: '200' }, 0);
    ctx.metrics.requestDuration.zero(labels);
  }
  ctx.metrics.cacheStuck.inc({ model_name: ctx.cfg.modelName }, 0);
  for (const h of Object.values(ctx.metrics.kserveStages)) h.zero({ model_name: ctx.cfg.modelName });
  // Overload warnings (connection cap reached, accepts failing) go to the runtime's log from now on.
  base.setWarn((fields, msg) => ctx.log.warn(fields, msg));
  const syncConnections = connectionMetrics(base, ctx);
  app.get(
    '/metrics',
    route(async () => {
      syncConnections();
      return { status: 200, body: await exposition(ctx.metrics.registry), contentType: ctx.metrics.registry.contentType };
    }, opts),
  );

  registerV1(app, ctx, opts);
  registerV2(app, ctx, opts);
  registerWs(app, ctx, opts);
  registerOpenAI(app, ctx, opts);

  // `/v1/models/{name}:verb` also matches the GET status route's pattern, which refuses it: POST only. And
  // `/v1/models/{name}` the POST route's, which refuses it (no verb): GET and HEAD only. Matched as the routes match, decoded.
  const allowed = (path: string) => {
    const target = v1Target(path);
    if (target === undefined) return base.allowed(path);
    return base.allowed(path).filter((m) => (target.includes(':') ? m === 'POST' : m !== 'POST'));
  };
  base.setCors(corsHandler(ctx.cfg.corsAllowOrigins, allowed));

  // A path some route answers, asked with another method: 405 with the methods it takes in `Allow` (RFC 9110 15.5.6);
  // a path no route answers: 404 whatever the method (as KServe's FastAPI server). JSON bodies either way; under
  // /openai in OpenAI's shape, so an OpenAI client asking for what is not served here (chat, edits) reads why.
  const fallback = (o: RouteOptions) =>
    route((r) => {
      const path = r.url;
      // The stream, asked over plain HTTP (curl, fetch, a URL pasted into a browser): RFC 9110's 426 naming the protocol
      // to switch to, not a 404 that says the path is wrong.
      if (base.websocket(path)) {
        if (r.method !== 'get' && r.method !== 'head') {
          throw new RuntimeError('METHOD_NOT_ALLOWED', `Method Not Allowed: ${r.method.toUpperCase()} ${path} is a WebSocket endpoint, which takes GET with Upgrade: websocket`, { allow: ['GET'] });
        }
        const out = errorReply(new RuntimeError('UPGRADE_REQUIRED', `${path} is a WebSocket endpoint: connect to it with a WebSocket client (a ws:// or wss:// URL), which sends Upgrade: websocket`), o.log);
        // RFC 9110 7.8: whoever sends Upgrade names it in Connection too.
        return { ...out, headers: { ...out.headers, upgrade: 'websocket', connection: 'upgrade' } };
      }
      const allow = allowed(path);
      if (allow.length === 0) throw new RuntimeError('NOT_FOUND', `Not Found: ${path}${isOpenAI(path) ? OPENAI_SERVED : ''}`);
      throw new RuntimeError('METHOD_NOT_ALLOWED', `Method Not Allowed: ${r.method.toUpperCase()} ${path}`, { allow });
    }, o);
  const [kserve, openai] = [fallback(opts), fallback({ ...opts, errorShape: openaiError })];
  base.setFallback((req, res, params) => (isOpenAI(pathOf(req.url)) ? openai : kserve)(req, res, params));
}
