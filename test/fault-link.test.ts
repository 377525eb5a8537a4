/**
 * The fault link (test/helpers/fault-link.ts) stands in for a flaky network in the fault suite and the soak: it may cut
 * a body short (a reset, a stall) but, like TCP, never send bytes out of order. A body that skips bytes would make the
 * runtime write wrong data that no real store sends, and the fault suite would blame the runtime for it.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { startFaultLink, type FaultLink } from './helpers/fault-link.js';

const BODY = randomBytes(2 << 20);
let upstream: http.Server;
let link: FaultLink;

beforeAll(async () => {
  // Small writes, one per turn of the event loop (so one per socket read at the link), so that whenever the link holds
  // the upstream back (pacing) several chunks wait in its buffer.
  upstream = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-length': BODY.length, etag: '"x"' });
    let at = 0;
    const more = () => {
      if (res.destroyed) return;
      if (at >= BODY.length) return void res.end();
      const end = Math.min(BODY.length, at + 4096);
      const ok = res.write(BODY.subarray(at, end));
      at = end;
      if (ok) setImmediate(more);
      else res.once('drain', more);
    };
    more();
  });
  await new Promise<void>((r) => upstream.listen(0, '127.0.0.1', r));
  link = await startFaultLink((upstream.address() as AddressInfo).port, { seed: 7, pace: { totalBps: 20e6 } });
});

afterAll(async () => {
  link?.dropAll();
  await link?.close();
  await new Promise((r) => upstream?.close(r));
});

/** One GET through the link: every byte received until the body ends, the socket closes or nothing comes for 300 ms. */
function get(): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const req = http.get({ host: '127.0.0.1', port: link.port, path: '/bucket/key', agent: false }, (res) => {
      let idle = setTimeout(() => req.destroy(), 300);
      res.on('data', (c: Buffer) => {
        chunks.push(c);
        idle.refresh();
      });
      res.on('close', () => {
        clearTimeout(idle);
        resolve(Buffer.concat(chunks));
      });
      res.on('error', () => undefined);
    });
    req.on('error', () => resolve(Buffer.concat(chunks)));
  });
}

it('a body cut by a reset or a stall is a prefix of the upstream body: nothing skipped, nothing repeated', async () => {
  link.faults = { resetP: 0.5, stallP: 0.5, burstP: 0, burstMax: 0 };
  const cutsBefore = link.stats.cutOffsets.length;
  const bodies: Buffer[] = [];
  for (let i = 0; i < 24; i++) bodies.push(await get());
  link.faults = undefined;
  const cuts = link.stats.cutOffsets.slice(cutsBefore);
  expect(cuts.length).toBe(24);
  for (const [i, b] of bodies.entries()) {
    // What the link says it sent is what arrived, and it is the upstream's own first bytes.
    expect(b.length, `GET ${i}`).toBe(cuts[i]);
    expect(b.equals(BODY.subarray(0, b.length)), `GET ${i}: ${b.length} bytes, not the body's first ${b.length}`).toBe(true);
  }
}, 60_000);
