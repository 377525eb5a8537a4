/**
 * The S3 seam (src/storage/transport.ts): one suite, run against every transport — the AWS SDK (the default) and the
 * SDK-free reader (S3_TRANSPORT=lite) — over real sockets to s3rver behind the fault proxy. Each case states what the
 * fetch engine relies on whichever transport serves it: the same listing, the same bytes and headers for a range, and
 * error answers that s3-errors.ts sorts into the same kinds, with no credential in any message. Per-transport details
 * (signing, when the SDK-free reader steps aside, clock skew) are in s3-lite.test.ts and warmup.test.ts.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chooseTransport, openTransport } from '../src/storage/choose-transport.js';
import { classify } from '../src/storage/s3-errors.js';
import type { S3Transport, TransportName } from '../src/storage/transport.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, rejection, type S3Server, startS3WithProxy, testConfig } from './helpers/s3.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
const BODIES: Record<string, Buffer> = {
  'sd/model_index.json': Buffer.from('{"_class_name":"StableDiffusionPipeline"}'),
  'sd/unet/model.onnx_data': detBytes(300_000, 3),
  'sd/ünï/çødé & co+x=y.json': detBytes(1_234, 4),
  "sd/per%cent/quote'\"s (1)*!.bin": detBytes(77, 5),
  'sd/empty.txt': Buffer.alloc(0),
  'sdx/outside-the-prefix.bin': detBytes(10, 6),
};
const md5 = (b: Buffer) => `"${createHash('md5').update(b).digest('hex')}"`;

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 's3-transport-'));
  ({ s3, proxy } = await startS3WithProxy());
  for (const [k, b] of Object.entries(BODIES)) await s3.put('models', k, b);
  await s3.put('models', 'sd/folder-marker/', Buffer.alloc(0));
});

cleanUpS3(() => ({ s3, proxy, tmp }));

const body = async (r: Readable): Promise<Buffer> => {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(c as Buffer);
  return Buffer.concat(parts);
};
const signal = () => AbortSignal.timeout(10_000);

describe.each(['sdk', 'lite'] as const)('S3Transport (%s)', (name: TransportName) => {
  const open = async (bucket = 'models', env: Record<string, string> = {}): Promise<S3Transport> => {
    const cfg = testConfig(proxy.endpoint, tmp, { S3_TRANSPORT: name });
    const choice = chooseTransport(cfg.s3, bucket, { ...process.env, ...env });
    return openTransport(choice, cfg.s3, bucket);
  };
  let t: S3Transport;
  beforeAll(async () => {
    t = await open();
  });
  afterAll(() => t?.destroy());

  it('is the transport S3_TRANSPORT names', () => {
    expect(t.name).toBe(name);
  });

  it('lists a prefix: every object under it, sorted by path, folder markers skipped, sizes and ETags as stored', async () => {
    const want = Object.entries(BODIES).filter(([k]) => k.startsWith('sd/'))
      .map(([key, b]) => ({ key, rel: key.slice(3), size: b.length, etag: md5(b) }))
      .sort((a, b) => (a.rel < b.rel ? -1 : 1));
    expect(await t.list({ prefix: 'sd/', signal: signal() })).toEqual(want);
    const all = await t.list({ prefix: '', signal: signal() });
    expect(all.map((o) => o.key)).toContain('sdx/outside-the-prefix.bin');
    expect(all.every((o) => o.rel === o.key)).toBe(true);
  });

  it('GETs a whole object and a range with the body, ETag and length the reader checks, odd keys included', async () => {
    for (const [key, b] of Object.entries(BODIES)) {
      if (b.length === 0) continue;
      const whole = await t.get({ key, signal: signal() });
      expect([whole.etag, whole.contentLength], key).toEqual([md5(b), b.length]);
      expect((await body(whole.body)).equals(b), key).toBe(true);
    }
    const key = 'sd/unet/model.onnx_data';
    const part = await t.get({ key, range: 'bytes=65536-131071', ifMatch: md5(BODIES[key]!), signal: signal() });
    expect([part.etag, part.contentLength]).toEqual([md5(BODIES[key]!), 65536]);
    expect((await body(part.body)).equals(BODIES[key]!.subarray(65536, 131072))).toBe(true);
  });

  it.each([
    [412, 'PreconditionFailed', 'changed'],
    [416, 'InvalidRange', 'changed'],
    [503, 'SlowDown', 'transient'],
    [500, 'InternalError', 'transient'],
    [403, 'AccessDenied', 'denied'],
  ] as const)('a GET answered %i %s is %s', async (status, code, kind) => {
    proxy.faults = { failGets: { count: 1, status, code } };
    const err = await rejection(t.get({ key: 'sd/model_index.json', range: 'bytes=0-3', signal: signal() }));
    expect(classify(err)).toBe(kind);
    expect(`${err.name} ${err.message}`).toContain(code);
    expect(err.message).not.toMatch(/echoed-secret/);
  });

  it('missing buckets and keys are `missing`, unknown keys `denied`, and no message carries a credential', async () => {
    const nope = await open('no-such-bucket');
    try {
      const err = await rejection(nope.list({ prefix: 'sd/', signal: signal() }));
      expect([err.name, classify(err)]).toEqual(['NoSuchBucket', 'missing']);
    } finally {
      nope.destroy();
    }
    const noKey = await rejection(t.get({ key: 'sd/not-there.bin', signal: signal() }));
    expect([noKey.name, classify(noKey)]).toEqual(['NoSuchKey', 'missing']);
    const wrong = { AWS_ACCESS_KEY_ID: 'WRONGKEY', AWS_SECRET_ACCESS_KEY: 'sekrit-value-123' };
    Object.assign(process.env, wrong);
    try {
      const bad = await open('models', wrong);
      try {
        const err = await rejection(bad.list({ prefix: 'sd/', signal: signal() }));
        expect([err.name, classify(err)]).toEqual(['InvalidAccessKeyId', 'denied']);
        expect(`${err.name} ${err.message}`).not.toMatch(/sekrit|WRONGKEY/);
      } finally {
        bad.destroy();
      }
    } finally {
      Object.assign(process.env, CREDS);
    }
  });

  it("an abort stops a body that stalls (the reader's watchdog relies on it)", async () => {
    proxy.faults = { stallAfterBytes: 10_000, stalls: 1 };
    const ac = new AbortController();
    const res = await t.get({ key: 'sd/unet/model.onnx_data', signal: ac.signal });
    let got = 0;
    res.body.on('data', (c: Buffer) => (got += c.length));
    setTimeout(() => ac.abort(), 200);
    // Without the abort the body would never end: the proxy holds the socket open.
    await expect(body(res.body)).rejects.toThrow();
    expect(got).toBeLessThanOrEqual(10_000);
  });
});
