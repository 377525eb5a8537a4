/**
 * Hostile clients against the real server (in-process runtime on the demo model, real sockets): inputs small to send
 * and costly to answer. docs/FAULTS.md ("Hostile input") lists what is bounded and how.
 */
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';

let rt: RuntimeHandle;

beforeAll(async () => {
  rt = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0' }, { ready: true });
}, 120_000);

afterAll(async () => {
  await rt?.stop();
});

/** A masked client text frame (RFC 6455 5.2), with a zero mask: the payload goes as is. */
function textFrame(payload: string): Buffer {
  const p = Buffer.from(payload);
  const len = p.length < 126 ? Buffer.from([0x80 | p.length]) : Buffer.from([0x80 | 126, p.length >> 8, p.length & 255]);
  return Buffer.concat([Buffer.from([0x81]), len, Buffer.alloc(4), p]);
}

/** The server's (unmasked) frames in `buf`: opcode and payload, until a frame is incomplete. */
function serverFrames(buf: Buffer): Array<{ op: number; text: string }> {
  const out: Array<{ op: number; text: string }> = [];
  for (let o = 0; o + 2 <= buf.length; ) {
    let len = buf[o + 1]! & 0x7f;
    let head = 2;
    if (len === 126) [len, head] = [buf.readUInt16BE(o + 2), 4];
    else if (len === 127) [len, head] = [Number(buf.readBigUInt64BE(o + 2)), 10];
    if (o + head + len > buf.length) break;
    out.push({ op: buf[o]! & 0x0f, text: buf.subarray(o + head, o + head + len).toString('utf8') });
    o += head + len;
  }
  return out;
}

describe('WebSocket', () => {
  it('answers messages after the request once, however many come: a client that sends without reading cannot make it buffer', async () => {
    const sock = net.connect(rt.port, '127.0.0.1');
    let got = Buffer.alloc(0);
    let onClose = () => undefined as void;
    // Ends at the server's close frame (or the socket's end).
    const closed = new Promise<void>((resolve) => (onClose = resolve));
    sock.on('close', () => onClose());
    sock.on('error', () => undefined);
    sock.write(`GET /v1/models/model/stream HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    await new Promise<void>((resolve) => sock.once('data', (d: Buffer) => {
      expect(d.toString('latin1')).toMatch(/^HTTP\/1\.1 101 /);
      resolve();
    }));
    sock.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (serverFrames(got).some((f) => f.op === 8)) onClose();
    });
    // The request and 2,000 more messages in one write: all of them arrive while the generation runs.
    const req = textFrame(JSON.stringify({ prompt: 'p', num_inference_steps: 2, height: 64, width: 64, seed: 1 }));
    sock.write(Buffer.concat([req, ...Array<Buffer>(2000).fill(textFrame('{"prompt":"again"}'))]));
    await Promise.race([closed, new Promise((r) => setTimeout(r, 30_000))]);
    sock.destroy();
    const msgs = serverFrames(got).filter((f) => f.op === 1).map((f) => JSON.parse(f.text) as { type: string; error?: string });
    expect(msgs.filter((m) => m.type === 'error')).toEqual([{ type: 'error', code: 'INVALID_INPUT', error: 'one generation per connection: open a new socket for the next one' }]);
    expect(msgs.map((m) => m.type)).toContain('result');
  }, 60_000);
});

describe('V2 tensors', () => {
  it('a nested data list of any length is checked against its shape (400), never a stack overflow (500)', async () => {
    for (const inner of [Array<number>(200_000).fill(1), Array<string>(150_000).fill('a')]) {
      const res = await fetch(`${rt.url}/v2/models/model/infer`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: [inner] }] }),
      });
      const body = (await res.json()) as { code: string; error: string };
      expect(res.status, body.error).toBe(400);
      expect(body.code).toBe('INVALID_INPUT');
    }
  });
});
