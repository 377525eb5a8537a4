/**
 * A TLS front on loopback before a plain TCP port (s3rver, or another front), with a certificate from test/fixtures/tls,
 * counting the connections it accepts: what an object store with a certificate from an internal CA looks like.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';

export const TLS_FIXTURES = path.join(import.meta.dirname, '..', 'fixtures', 'tls');

export interface TlsFront {
  port: number;
  connections(): number;
  close(): Promise<void>;
}

/** `cert`: the name of a key pair in test/fixtures/tls (`server`: 127.0.0.1 and localhost; `vhost`: s3.test, *.s3.test). */
export async function tlsFront(target: number, cert: 'server' | 'vhost' = 'server'): Promise<TlsFront> {
  const sockets = new Set<net.Socket>();
  let connections = 0;
  const server = tls.createServer({ key: readFileSync(path.join(TLS_FIXTURES, `${cert}.key`)), cert: readFileSync(path.join(TLS_FIXTURES, `${cert}.pem`)) }, (client) => {
    const up = net.connect(target, '127.0.0.1');
    sockets.add(up);
    client.pipe(up).pipe(client);
    const end = () => {
      client.destroy();
      up.destroy();
    };
    client.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  server.on('connection', (s: net.Socket) => {
    connections++;
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    connections: () => connections,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}
