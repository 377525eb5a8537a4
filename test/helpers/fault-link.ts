/**
 * @module A flaky S3 link on loopback, for the fault suite (test/faults.test.ts) and its soak (scripts/bench-faults.ts):
 * an HTTP proxy in front of an S3 server that, from a seeded random stream, cuts bodies by a reset or a stall at a
 * uniformly random offset (so past 1 MiB into 2 MiB ranges about half the time), answers bursts of 503 SlowDown and
 * 500 InternalError, flips a byte of one body where asked, and paces bytes like a link with a per-connection and a total cap. Only node:http: the soak
 * script imports it from dist/ without the test dependencies.
 */
import http from 'node:http';
import type { Socket } from 'node:net';
import { mulberry32 } from '../../src/demo/graph.js';
import { listenLoopback } from './loopback.js';

export interface LinkFaults {
  /** Probability that a 2xx GET body is cut by a connection reset at a random offset. */
  resetP: number;
  /** Probability that a 2xx GET body stops at a random offset with the socket left open (a stall). */
  stallP: number;
  /** Probability that a request starts a burst of 503 SlowDown / 500 InternalError answers. */
  burstP: number;
  /** A burst answers 1 to burstMax requests in a row (GETs and listings alike). */
  burstMax: number;
  /**
   * The first GET body longer than this many bytes while these faults apply is reset past it, at a random offset,
   * whatever the roll: a suite that must meet a cut deep into a range meets one with every seed and timing.
   */
  deepCutPast?: number;
  /**
   * One byte of the first GET body longer than this while these faults apply is flipped (at a random offset past it;
   * a body cut before it passes the flip on to the next one): damage that only a check of the content catches.
   */
  flipPast?: number;
}

export interface LinkPace {
  /** Bytes per second per connection; 0: unpaced. */
  connBps: number;
  /** Bytes per second for the whole link; 0: unpaced. */
  totalBps: number;
}

export interface LinkStats {
  requests: number;
  gets: number;
  lists: number;
  /** 2xx GET body bytes sent to clients. */
  bodyBytes: number;
  resets: number;
  stalls: number;
  slowDowns: number;
  internalErrors: number;
  /** Offset into the body (bytes) of every reset and stall. */
  cutOffsets: number[];
  /** Bytes flipped (flipPast). */
  flips: number;
  /** Connections open now, and GET bodies still being sent. */
  open: number;
}

export interface FaultLink {
  readonly port: number;
  readonly endpoint: string;
  readonly stats: LinkStats;
  /** Faults from now on (undefined: none). */
  faults: LinkFaults | undefined;
  pace: LinkPace;
  /** A new random stream (each run of a soak gets its own seed, printed on failure). */
  reseed(seed: number): void;
  /** Drops every open connection (what the client sees when the link dies). */
  dropAll(): void;
  close(): Promise<void>;
}

/** A small seeded generator (mulberry32), so a failing run can be replayed with its seed. */
export const rng = mulberry32;

const s3Error = (code: string) => `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>from the fault link</Message><RequestId>1</RequestId></Error>`;

export async function startFaultLink(upstreamPort: number, o: { seed: number; faults?: LinkFaults; pace?: Partial<LinkPace> }): Promise<FaultLink> {
  let random = rng(o.seed);
  const stats: LinkStats = { requests: 0, gets: 0, lists: 0, bodyBytes: 0, resets: 0, stalls: 0, slowDowns: 0, internalErrors: 0, cutOffsets: [], flips: 0, open: 0 };
  const sockets = new Set<Socket>();
  let burstLeft = 0;
  /** The faults whose deep cut (deepCutPast) was made. */
  let deepCutFor: LinkFaults | undefined;
  /** The faults whose flip (flipPast) was sent. */
  let flipFor: LinkFaults | undefined;
  // The time (ms, performance.now()) at which the link is free to send the next byte.
  let linkFree = 0;
  const link: FaultLink = {
    port: 0, endpoint: '', stats, faults: o.faults, pace: { connBps: o.pace?.connBps ?? 0, totalBps: o.pace?.totalBps ?? 0 },
    reseed: (seed) => {
      random = rng(seed);
      burstLeft = 0;
    },
    dropAll: () => {
      for (const s of sockets) s.destroy();
    },
    close: async () => undefined,
  };

  const server = http.createServer((req, res) => {
    stats.requests++;
    const f = link.faults;
    const isList = req.method === 'GET' && /[?&]list-type=2/.test(req.url ?? '');
    const isGet = req.method === 'GET' && !isList;
    if (isList) stats.lists++;
    if (isGet) stats.gets++;
    if (f && (isGet || isList)) {
      if (burstLeft === 0 && random() < f.burstP) burstLeft = 1 + Math.floor(random() * f.burstMax);
      if (burstLeft > 0) {
        burstLeft--;
        const slow = random() < 0.5;
        if (slow) stats.slowDowns++;
        else stats.internalErrors++;
        req.resume();
        res.writeHead(slow ? 503 : 500, { 'content-type': 'application/xml' }).end(s3Error(slow ? 'SlowDown' : 'InternalError'));
        return;
      }
    }
    const up = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      const body = isGet && (upRes.statusCode ?? 500) < 300;
      const length = Number(upRes.headers['content-length'] ?? 0);
      // Decided when the headers are out, from the seeded stream: which cut, and where in the body.
      const deep = body && f?.deepCutPast !== undefined && length > f.deepCutPast + 1 && deepCutFor !== f ? f.deepCutPast : undefined;
      if (deep !== undefined) deepCutFor = f;
      const roll = body && f && length > 1 ? random() : 1;
      const cut = !f ? undefined : deep !== undefined || roll < f.resetP ? 'reset' : roll < f.resetP + f.stallP ? 'stall' : undefined;
      const cutAt = !cut ? Infinity : deep !== undefined ? deep + 1 + Math.floor(random() * (length - deep - 1)) : Math.floor(random() * length);
      const flipAt = body && f?.flipPast !== undefined && length > f.flipPast + 1 && flipFor !== f ? f.flipPast + Math.floor(random() * (length - f.flipPast)) : Infinity;
      if (body) stats.open++;
      let counted = body;
      const done = () => {
        if (counted) stats.open--;
        counted = false;
      };
      res.on('close', done);
      let sent = 0;
      const t0 = performance.now();
      // The upstream reads on only once both the client has drained and the pace allows: a pacing timer that resumed
      // it while the client was still backed up added a 'drain' listener per chunk (MaxListenersExceededWarning).
      let waitDrain = false;
      let waitPace = false;
      const resume = () => {
        if (!waitDrain && !waitPace) upRes.resume();
      };
      let cutMade = false;
      upRes.on('data', (chunk: Buffer) => {
        // destroy() below does not stop the chunks already in upRes's buffer (Node 24's larger buffers often hold
        // some): written, they would follow the cut with bytes from further on, a skip that no real link makes.
        if (cutMade) return;
        if (sent + chunk.length > cutAt) {
          cutMade = true;
          res.write(chunk.subarray(0, cutAt - sent));
          stats.bodyBytes += cutAt - sent;
          stats.cutOffsets.push(cutAt);
          upRes.destroy();
          if (cut === 'reset') {
            stats.resets++;
            setTimeout(() => res.socket?.destroy(), 5);
          } else stats.stalls++; // the client sees an open socket that sends nothing more
          return;
        }
        if (flipAt >= sent && flipAt < sent + chunk.length && flipFor !== f) {
          flipFor = f;
          stats.flips++;
          chunk = Buffer.from(chunk);
          chunk[flipAt - sent] = chunk[flipAt - sent]! ^ 0xff;
        }
        sent += chunk.length;
        if (body) stats.bodyBytes += chunk.length;
        if (!res.write(chunk) && !waitDrain) {
          waitDrain = true;
          upRes.pause();
          res.once('drain', () => {
            waitDrain = false;
            resume();
          });
        }
        if (!body) return;
        const now = performance.now();
        const { connBps, totalBps } = link.pace;
        let due = 0;
        if (connBps > 0) due = Math.max(due, t0 + (sent / connBps) * 1000);
        if (totalBps > 0) {
          linkFree = Math.max(linkFree, now) + (chunk.length / totalBps) * 1000;
          due = Math.max(due, linkFree);
        }
        if (due > now && !waitPace) {
          waitPace = true;
          upRes.pause();
          setTimeout(() => {
            waitPace = false;
            resume();
          }, due - now);
        }
      });
      upRes.on('end', () => {
        if (sent < cutAt) res.end();
      });
      upRes.on('error', () => res.destroy());
    });
    up.on('error', () => res.destroy());
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  server.keepAliveTimeout = 30_000;
  return Object.assign(link, await listenLoopback(server, sockets));
}
