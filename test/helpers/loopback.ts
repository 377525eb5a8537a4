/** @module A test server on an ephemeral loopback port whose close() also cuts the connections still open. */
import type http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

/** Listens on 127.0.0.1:0; `sockets` is kept up to date (a fault link drops them all on demand). */
export async function listenLoopback(server: http.Server, sockets = new Set<Socket>()): Promise<{ port: number; endpoint: string; close(): Promise<void> }> {
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    endpoint: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}
