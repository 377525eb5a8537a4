/** @module The uWebSockets.js app: health and metrics routes answered from the main thread, protocol routes, fallbacks. */
import uWS from 'uWebSockets.js';
import type { ServerContext } from './context.js';
import { json, route, type Reply, type Req, type RouteOptions, type Exchange } from './http.js';
import { registerV1 } from './v1.js';

export interface HttpServer {
  readonly port: number;
  /** Stops accepting connections; requests on open connections go on. Idempotent. */
  closeListener(): void;
}

const PREDICT_ROUTE = /^\/v[12]\/models\/[^/]+(:predict|\/infer)$/;

export function createApp(ctx: ServerContext): uWS.TemplatedApp {
  const app = uWS.App();
  const opts: RouteOptions = {
    log: ctx.log,
    maxBodyBytes: ctx.cfg.maxBodyBytes,
    onReply: (r: Req, out: Reply, ex: Exchange) => {
      if (r.method === 'post' && PREDICT_ROUTE.test(r.url)) {
        const protocol = r.url.startsWith('/v2') ? 'v2' : 'v1';
        const labels = { model_name: ctx.cfg.modelName, protocol };
        ctx.metrics.requests.inc({ ...labels, status: String(out.status) });
        const secs = (performance.now() - ex.started) / 1000;
        if (out.status === 200) ctx.metrics.requestDuration.observe(labels, secs);
        ctx.log.info({ route: r.url, status: out.status, seconds: Number(secs.toFixed(3)), requestId: r.headers['x-request-id'] }, 'inference request');
      }
    },
  };

  // Liveness: 200 from the moment we listen, whatever the boot state (probes must never kill a cold download).
  app.get('/', route(() => json(200, { status: 'alive' }), opts));
  app.get('/v2/health/live', route(() => json(200, { live: true }), opts));
  app.get(
    '/v2/health/ready',
    route(() => (ctx.boot.ready && !ctx.stopping() ? json(200, { ready: true }) : json(503, { error: 'Server is not ready.', ready: false, state: ctx.boot.state })), opts),
  );
  app.get(
    '/metrics',
    route(async () => ({ status: 200, body: await ctx.metrics.registry.metrics(), contentType: ctx.metrics.registry.contentType }), opts),
  );

  registerV1(app, ctx, opts);
  for (const register of extraRoutes) register(app, ctx, opts);

  // Known paths with the wrong method → 405; anything else → 404. JSON bodies either way.
  const known = [/^\/$/, /^\/metrics$/, /^\/v1\/models(\/[^/]+(\/ready)?)?$/, /^\/v2(\/.*)?$/];
  app.any(
    '/*',
    route((r) => {
      const path = r.url;
      if (known.some((k) => k.test(path))) return json(405, { error: `Method Not Allowed: ${r.method.toUpperCase()} ${path}` });
      return json(404, { error: `Not Found: ${path}` });
    }, opts),
  );
  return app;
}

/** Protocol modules beyond V1 (V2, WebSocket) register here, so app.ts stays the one place routes are wired. */
export type RouteRegistrar = (app: uWS.TemplatedApp, ctx: ServerContext, opts: RouteOptions) => void;
const extraRoutes: RouteRegistrar[] = [];
export function addRoutes(r: RouteRegistrar): void {
  extraRoutes.push(r);
}

export function listen(app: uWS.TemplatedApp, host: string, port: number): Promise<HttpServer> {
  return new Promise((resolve, reject) => {
    app.listen(host, port, (token) => {
      if (!token) {
        reject(new Error(`could not listen on ${host}:${port} (port in use or not permitted)`));
        return;
      }
      let open = true;
      resolve({
        port: uWS.us_socket_local_port(token as unknown as uWS.us_socket),
        closeListener: () => {
          if (!open) return;
          open = false;
          uWS.us_listen_socket_close(token);
        },
      });
    });
  });
}
