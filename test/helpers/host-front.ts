/**
 * @module A loopback front for s3rver that records the Host header and path of every request, to tell virtual-hosted
 * requests (`Host: <bucket>.s3.test:<port>`, path `/<key>`) from path-style ones (`Host: s3.test:<port>`, path
 * `/<bucket>/<key>`). With `virtualOnly` it refuses path-style requests the way Alibaba OSS does (403
 * SecondLevelDomainForbidden), as stores that serve virtual-hosted addressing only answer.
 */
import http from 'node:http';
import { listenLoopback } from './loopback.js';

export interface SeenRequest {
  method: string;
  /** The Host header as sent (name and port). */
  host: string;
  /** The request target without its query. */
  path: string;
  query: string;
  /** The AWS SDK names itself in its user agent; the SDK-free transport sends none. */
  sdk: boolean;
}

export interface HostFront {
  readonly port: number;
  readonly seen: SeenRequest[];
  /** `zone` is the endpoint's own host name: a request to it (not to `<bucket>.<zone>`) is path-style. */
  virtualOnly?: { zone: string };
  close(): Promise<void>;
}

const FORBIDDEN = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SecondLevelDomainForbidden</Code>'
  + '<Message>Please use virtual hosted style to access.</Message><RequestId>1</RequestId></Error>';

export async function startHostFront(upstreamPort: number): Promise<HostFront> {
  const front: HostFront = { port: 0, seen: [], close: async () => undefined };
  const server = http.createServer((req, res) => {
    const [p, q = ''] = (req.url ?? '').split('?', 2) as [string, string?];
    const host = req.headers.host ?? '';
    front.seen.push({ method: req.method ?? '', host, path: p, query: q, sdk: /aws-sdk/.test(req.headers['user-agent'] ?? '') });
    const zone = front.virtualOnly?.zone;
    if (zone !== undefined && host.replace(/:\d+$/, '').toLowerCase() === zone) {
      req.resume();
      res.writeHead(403, { 'content-type': 'application/xml' }).end(FORBIDDEN);
      return;
    }
    // The Host header travels unchanged: s3rver reads the bucket from it, and the signature covers it.
    const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      upRes.pipe(res);
    });
    up.on('error', () => res.destroy());
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  const l = await listenLoopback(server);
  return Object.assign(front, { port: l.port, close: l.close });
}
