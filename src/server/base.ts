/**
 * @module The first thing the process does: listen with liveness routes only. It imports nothing but
 * uWebSockets.js, so `/` and `/v2/health/live` answer within milliseconds of process start while the
 * runtime (logging, metrics, pipeline workers) is still being imported.
 */
import uWS from 'uWebSockets.js';

export type RouteHandler = (res: uWS.HttpResponse, req: uWS.HttpRequest) => void;

export interface BaseServer {
  readonly app: uWS.TemplatedApp;
  readonly port: number;
  /** Replaces the answer for every route not registered yet (before the runtime attaches: 503 starting). */
  setFallback(h: RouteHandler): void;
  /** Stops accepting connections; requests on open connections go on. Idempotent. */
  closeListener(): void;
}

const STARTING = '{"error":"Server is not ready.","ready":false,"state":"starting"}';

export function listenBase(host: string, port: number): Promise<BaseServer> {
  const app = uWS.App();
  const alive = (body: string): RouteHandler => (res) => {
    res.writeHeader('content-type', 'application/json').end(body);
  };
  app.get('/', alive('{"status":"alive"}'));
  app.get('/v2/health/live', alive('{"live":true}'));
  let fallback: RouteHandler = (res) => {
    res.writeStatus('503 Service Unavailable').writeHeader('content-type', 'application/json').writeHeader('retry-after', '1').end(STARTING, true);
  };
  app.any('/*', (res, req) => fallback(res, req));
  return new Promise((resolve, reject) => {
    app.listen(host, port, (token) => {
      if (!token) {
        reject(new Error(`could not listen on ${host}:${port} (port in use or not permitted)`));
        return;
      }
      let open = true;
      resolve({
        app,
        port: uWS.us_socket_local_port(token as unknown as uWS.us_socket),
        setFallback: (h) => {
          fallback = h;
        },
        closeListener: () => {
          if (!open) return;
          open = false;
          uWS.us_listen_socket_close(token);
        },
      });
    });
  });
}
