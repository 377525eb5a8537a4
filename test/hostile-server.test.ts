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

/** A multipart/form-data body of `parts` ([name, content, filename?]) with boundary `b`. */
function form(parts: ReadonlyArray<readonly [string, string, string?]>): Buffer {
  return Buffer.from(parts.map(([name, v, file]) => `--b\r\nContent-Disposition: form-data; name="${name}"${file === undefined ? '' : `; filename="${file}"\r\nContent-Type: image/png`}\r\n\r\n${v}\r\n`).join('') + '--b--\r\n');
}

describe('OpenAI edits', () => {
  it('a form of many parts is refused by its count before it is parsed (10,000 empty files in 1 MiB held the event loop ~1 s, liveness with it)', async () => {
    const parts: Array<[string, string, string?]> = [['prompt', 'p']];
    for (let i = 0; i < 10_000; i++) parts.push([`f${i}`, 'x', 'a.png']);
    const body = form(parts);
    expect(body.length).toBeLessThan(1024 * 1024);
    // The boundary as undici reads it, however the Content-Type spells it: another reading would count other parts.
    for (const type of ['multipart/form-data; boundary=b', 'multipart/form-data; BOUNDARY="b"', 'multipart/form-data; boundary=b; boundary=x',
      'multipart/form-data; name="x; boundary=a"; boundary=b']) {
      const res = await fetch(`${rt.url}/openai/v1/images/edits`, { method: 'POST', headers: { 'content-type': type }, body });
      expect([res.status, ((await res.json()) as { error: { message: string } }).error.message], type).toEqual([400,
        'the multipart body has more than 256 parts; an edit sends image, mask and each field once (loras as loras[] or JSON text)']);
    }
  });

  it('a form of as many adapter columns as a raised MAX_BODY_BYTES holds is a 400, not a stack overflow (500)', async () => {
    const { editBody } = await import('../src/server/openai.js');
    const parts: Array<[string, string, string?]> = [['prompt', 'p'], ['image', 'x', 'a.png']];
    for (let i = 0; i < 200_000; i++) parts.push([`loras[][k${i}]`, 'a']);
    const err = await editBody('multipart/form-data; boundary=b', form(parts)).then(() => undefined, (e: unknown) => e as Error & { code?: string });
    expect([err?.name, err?.code]).toEqual(['RuntimeError', 'INVALID_INPUT']);
  });

  it('a form of a field for each of the 64 adapters MAX_LORAS allows, and every edit field, is read', async () => {
    const { editBody } = await import('../src/server/openai.js');
    const parts: Array<[string, string, string?]> = [['prompt', 'p'], ['image', 'x', 'a.png']];
    for (let i = 0; i < 64; i++) parts.push(['loras[][name]', `a${i}`], ['loras[][scale]', '0.5']);
    for (let i = 0; i < 60; i++) parts.push([`field${i}`, 'v']);
    const out = await editBody('multipart/form-data; boundary=b', form(parts));
    expect([(out.loras as unknown[]).length, out.field59]).toEqual([64, 'v']);
  });
});
