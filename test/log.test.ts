/**
 * The log's redaction of credentials, on the logger the runtime uses: an S3 error left unwrapped (a defect) must not
 * print the signed request S3's SignatureDoesNotMatch answer carries, nor the access key id. A long boot's progress
 * lines. The server process's own faults (a Node warning, a rejection nothing handles) as JSON lines.
 */
import path from 'node:path';
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { batchIds, createLogger, LOGGED_IDS } from '../src/log.js';
import { traceContext } from '../src/server/trace.js';
import WebSocket from 'ws';
import { holdWorker, startRuntime } from './helpers/runtime.js';
import { postJson, startServer, until } from './helpers/server.js';

function capture() {
  const lines: string[] = [];
  const stream = new Writable({ write: (chunk: Buffer, _enc, done) => (lines.push(chunk.toString()), done()) });
  return { log: createLogger('info', 'test', stream), lines };
}

describe('log redaction', () => {
  it("an AWS SDK SignatureDoesNotMatch error's signed request, access key id and signature are not printed", () => {
    const { log, lines } = capture();
    // The fields S3's error XML has, as the SDK copies them onto its exception.
    const err = Object.assign(new Error('The request signature we calculated does not match the signature you provided.'), {
      name: 'SignatureDoesNotMatch',
      Code: 'SignatureDoesNotMatch',
      AWSAccessKeyId: 'ASIAEXAMPLEKEYID1234',
      StringToSign: 'AWS4-HMAC-SHA256\n20261206T000000Z\n20261206/us-east-1/s3/aws4_request\nabc',
      StringToSignBytes: '41 57 53 34',
      SignatureProvided: 'f00dfeedf00dfeed',
      CanonicalRequest: 'GET\n/models/sd15/unet/model.onnx\n\nhost:s3.amazonaws.com\nx-amz-security-token:SESSIONTOKENSECRET\n',
      CanonicalRequestBytes: '47 45 54',
      RequestId: 'R1',
    });
    log.error({ err }, 'unhandled error in request');
    // Wrapped: the serializer leaves a cause's fields out; an error held in another field is written below it.
    log.error({ err: new Error('cannot read s3://models/sd15/', { cause: err }) }, 'boot crashed');
    log.error({ err: Object.assign(new Error('upload failed'), { upstream: err }) }, 'boot crashed');
    expect(lines).toHaveLength(3);
    for (const secret of ['SESSIONTOKENSECRET', 'ASIAEXAMPLEKEYID1234', 'f00dfeedf00dfeed', 'AWS4-HMAC-SHA256', '41 57 53 34', '47 45 54']) {
      for (const l of lines) expect(l).not.toContain(secret);
    }
    expect((JSON.parse(lines[2]!) as { err: { upstream: Record<string, unknown> } }).err.upstream.RequestId).toBe('R1');
    const line = JSON.parse(lines[0]!) as { err: Record<string, unknown> };
    // What helps, kept: the code, the message, the request id.
    expect([line.err.Code, line.err.RequestId, line.err.CanonicalRequest]).toEqual(['SignatureDoesNotMatch', 'R1', '***']);
  });
});

describe('a long boot', () => {
  it('a load or warm-up that takes long logs where it is at each interval (a download does), and stops once it has moved on', async () => {
    // The worker never answers the warm-up generation: the boot stays in warming.
    const h = await startRuntime({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', ORT_OPTIMIZED_CACHE: 'off' }, { workers: [holdWorker()], progressLogMs: 50 });
    const still = () => h.logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith('boot still'));
    try {
      await h.waitFor('state', (d) => d.state === 'warming');
      const warming = () => still().filter((l) => l.state === 'warming');
      await until(() => warming().length >= 2, 10_000);
      expect(warming()[0]).toMatchObject({ level: 'info', msg: 'boot still warming', seconds: expect.any(Number), sessions: expect.any(Object) });
    } finally {
      await h.stop(0);
    }
    const after = still().length;
    await new Promise((r) => setTimeout(r, 300));
    expect(still()).toHaveLength(after);
  });
});

describe("the server process's own faults", () => {
  it('a Node warning is a warn line and an unhandled rejection one fatal line with its stack, then exit 1: nothing on stderr', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, NODE_OPTIONS: `--require=${path.resolve('test/helpers/fault-signal.cjs')}` }, { ready: true });
    const exited = new Promise<number | null>((r) => srv.proc.once('exit', r));
    try {
      srv.proc.kill('SIGUSR2');
      expect(await exited).toBe(1);
    } finally {
      await srv.stop();
    }
    expect([srv.stderr.join(''), srv.logs.filter((l) => l.raw)]).toEqual(['', []]);
    expect(srv.logs.filter((l) => l.level === 'warn' || l.level === 'fatal')).toEqual([
      expect.objectContaining({ level: 'warn', warning: 'TestWarning', msg: 'a warning of the test' }),
      expect.objectContaining({ level: 'fatal', msg: 'unhandled promise rejection: exiting', err: expect.objectContaining({ message: 'a fault of the test\nits second line', stack: expect.stringContaining('fault-signal.cjs') }) }),
    ]);
  });
});

describe("a request's log lines", () => {
  it('its access line names the error code and its X-Request-ID, over HTTP and the WebSocket; an unknown error is logged with both', async () => {
    const srv = await startRuntime({ STORAGE_URI: undefined }, { ready: true });
    try {
      const post = (path: string, body: unknown, id: string) => postJson(`${srv.url}${path}`, body, { headers: { 'content-type': 'application/json', 'x-request-id': id } });
      const inst = { prompt: 'a', num_inference_steps: 1, height: 64, width: 64 };
      await post('/v1/models/model:predict', { instances: [inst] }, 'id-ok');
      await post('/v1/models/model:predict', { instances: [{ prompt: 7 }] }, 'id-bad');
      await post('/openai/v1/images/generations', { model: 'other', prompt: 'a' }, 'id-openai');
      const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/other/stream`, { headers: { 'x-request-id': 'id-ws' } });
      await new Promise((r) => ws.once('close', r));
      // A defect (no input reaches one): the generation path throws an error that is not the runtime's.
      srv.rt.generation.generate = () => Promise.reject(new TypeError('a defect of the test'));
      await post('/v1/models/model:predict', { instances: [inst] }, 'id-defect');
      const access = srv.logs.filter((l) => l.msg === 'inference request').map((l) => [l.route, l.status, l.code, l.requestId]);
      expect(access).toEqual([
        ['/v1/models/model:predict', 200, undefined, 'id-ok'],
        ['/v1/models/model:predict', 400, 'INVALID_INPUT', 'id-bad'],
        ['/openai/v1/images/generations', 404, 'MODEL_NOT_FOUND', 'id-openai'],
        ['/v1/models/other/stream', 404, 'MODEL_NOT_FOUND', 'id-ws'],
        ['/v1/models/model:predict', 500, 'INTERNAL', 'id-defect'],
      ]);
      expect(srv.logs.filter((l) => l.msg === 'unhandled error in request')).toEqual([
        expect.objectContaining({ level: 'error', route: '/v1/models/model:predict', requestId: 'id-defect', err: expect.objectContaining({ message: 'a defect of the test' }) }),
      ]);
    } finally {
      await srv.stop();
    }
  });
});

describe('W3C trace context in the log', () => {
  const T = '4bf92f3577b34da6a3ce929d0e0e4736';
  const S = '00f067aa0ba902b7';
  const TP = `00-${T}-${S}-01`;

  it('reads traceparent as the spec says, and takes nothing of an invalid one', () => {
    expect(traceContext(TP)).toEqual({ traceId: T, spanId: S });
    expect(traceContext(`00-${T}-${S}-00`)).toEqual({ traceId: T, spanId: S });
    // A later version may append fields after a '-': its first four are read.
    expect(traceContext(`cc-${T}-${S}-01-whatever`)).toEqual({ traceId: T, spanId: S });
    for (const bad of [undefined, '', 'hello', `ff-${T}-${S}-01`, `00-${'0'.repeat(32)}-${S}-01`, `00-${T}-${'0'.repeat(16)}-01`,
      `00-${T.toUpperCase()}-${S}-01`, `00-${T}-${S}-01-extra`, `cc-${T}-${S}-01x`, `${TP}, ${TP}`, `00-${T.slice(1)}-${S}-01`, `00-${T}-${S}-1`, ` ${TP}`]) {
      expect(traceContext(bad), String(bad)).toBeUndefined();
    }
  });

  it("a request's lines name the trace and the caller's span of its traceparent: V1, V2, OpenAI, a CloudEvent, the WebSocket", async () => {
    const srv = await startRuntime({ STORAGE_URI: undefined }, { ready: true });
    try {
      const post = (path: string, body: unknown, headers: Record<string, string>) => postJson(`${srv.url}${path}`, body, { headers: { 'content-type': 'application/json', ...headers } });
      const none = { instances: [] };
      await post('/v1/models/model:predict', none, { 'x-request-id': 'v1', traceparent: TP });
      await post('/v2/models/model/infer', { inputs: [] }, { 'x-request-id': 'v2', traceparent: TP });
      await post('/openai/v1/images/generations', { model: 'other', prompt: 'a' }, { 'x-request-id': 'openai', traceparent: TP });
      // A binary CloudEvent whose ce-traceparent (the event's own trace) differs: the request's header wins.
      const ce = { 'ce-specversion': '1.0', 'ce-id': '1', 'ce-source': 'test', 'ce-type': 'dev.example.generate' };
      await post('/v1/models/model:predict', none, { ...ce, 'x-request-id': 'ce', traceparent: TP, 'ce-traceparent': `00-${'a'.repeat(32)}-${'b'.repeat(16)}-01` });
      const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/other/stream`, { headers: { 'x-request-id': 'ws', traceparent: TP } });
      await new Promise((r) => ws.once('close', r));
      // Invalid values are ignored, never echoed into the log.
      const bad = ['hello-garbage', `00-${T.toUpperCase()}-${S}-01`, `00-${'0'.repeat(32)}-${S}-01`, `ff-${T}-${S}-01`, `00-${T}-${S}-01-zzextrazz`];
      for (const [i, tp] of bad.entries()) await post('/v1/models/model:predict', none, { 'x-request-id': `bad${i}`, traceparent: tp });
      srv.rt.generation.generate = () => Promise.reject(new TypeError('a defect of the test'));
      await post('/v1/models/model:predict', { instances: [{ prompt: 'a', num_inference_steps: 1, height: 64, width: 64 }] }, { 'x-request-id': 'defect', traceparent: TP });
      const access = srv.logs.filter((l) => l.msg === 'inference request').map((l) => [l.requestId, l.status, l.traceId, l.spanId]);
      expect(access).toEqual([
        ['v1', 200, T, S], ['v2', 400, T, S], ['openai', 404, T, S], ['ce', 200, T, S], ['ws', 404, T, S],
        ...bad.map((_, i) => [`bad${i}`, 200, undefined, undefined]),
        ['defect', 500, T, S],
      ]);
      expect(srv.logs.filter((l) => l.msg === 'unhandled error in request')).toEqual([expect.objectContaining({ requestId: 'defect', traceId: T, spanId: S })]);
      const text = JSON.stringify(srv.logs);
      for (const b of ['hello-garbage', T.toUpperCase(), 'zzextrazz']) expect(text).not.toContain(b);
    } finally {
      await srv.stop();
    }
  });
});

describe("a CloudEvent's traceparent attribute (the distributed-tracing extension) in the log", () => {
  const T = '4bf92f3577b34da6a3ce929d0e0e4736';
  const S = '00f067aa0ba902b7';
  const E = '0af7651916cd43dd8448eb211c80319c';
  const ES = 'b9c7c989f97918e1';
  const attrs = { specversion: '1.0', id: '1', source: 'test', type: 'dev.example.generate' };
  const binary = { 'ce-specversion': '1.0', 'ce-id': '1', 'ce-source': 'test', 'ce-type': 'dev.example.generate' };

  it('is read where the request has no valid traceparent header (structured, binary, V2); the header wins; an invalid one is ignored', async () => {
    const srv = await startRuntime({ STORAGE_URI: undefined }, { ready: true });
    try {
      const post = (path: string, body: unknown, headers: Record<string, string>) => postJson(`${srv.url}${path}`, body, { headers: { 'content-type': 'application/json', ...headers } });
      const structured = (id: string, event: Record<string, unknown>, headers: Record<string, string> = {}) =>
        post('/v1/models/model:predict', { ...attrs, ...event, data: { instances: [] } }, { 'content-type': 'application/cloudevents+json', 'x-request-id': id, ...headers });
      await structured('json', { traceparent: `00-${E}-${ES}-01`, tracestate: 'congo=t61rcWkgMzE' });
      await structured('json-header', { traceparent: `00-${E}-${ES}-01` }, { traceparent: `00-${T}-${S}-01` });
      await structured('json-bad', { traceparent: 'hello-event-garbage' });
      await structured('json-not-text', { traceparent: { id: E } });
      await structured('json-bad-header', { traceparent: `00-${E}-${ES}-01` }, { traceparent: `00-${T.toUpperCase()}-${S}-01` });
      await post('/v1/models/model:predict', { instances: [] }, { ...binary, 'x-request-id': 'binary', 'ce-traceparent': `00-${E}-${ES}-01` });
      await post('/v2/models/model/infer', { inputs: [] }, { ...binary, 'x-request-id': 'v2', 'ce-traceparent': `00-${E}-${ES}-01` });
      // An event the server refuses before reading it is logged with the header's context only (here none).
      await structured('unread', { specversion: '2.0', traceparent: `00-${E}-${ES}-01` });
      srv.rt.generation.generate = () => Promise.reject(new TypeError('a defect of the test'));
      await post('/v1/models/model:predict', { ...attrs, traceparent: `00-${E}-${ES}-01`, data: { instances: [{ prompt: 'a', num_inference_steps: 1, height: 64, width: 64 }] } },
        { 'content-type': 'application/cloudevents+json', 'x-request-id': 'defect' });
      const access = srv.logs.filter((l) => l.msg === 'inference request').map((l) => [l.requestId, l.status, l.traceId, l.spanId]);
      expect(access).toEqual([
        ['json', 200, E, ES], ['json-header', 200, T, S], ['json-bad', 200, undefined, undefined], ['json-not-text', 200, undefined, undefined],
        ['json-bad-header', 200, E, ES], ['binary', 200, E, ES], ['v2', 400, E, ES], ['unread', 400, undefined, undefined], ['defect', 500, E, ES],
      ]);
      expect(srv.logs.filter((l) => l.msg === 'unhandled error in request')).toEqual([expect.objectContaining({ requestId: 'defect', traceId: E, spanId: ES })]);
      expect(JSON.stringify(srv.logs)).not.toContain('hello-event-garbage');
    } finally {
      await srv.stop();
    }
  });

  it("names the event's trace in its generation batch's lines", async () => {
    const srv = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '0', RESULT_CACHE_MB: '0' }, { ready: true, workers: [holdWorker({ fail: true })] });
    try {
      const event = { ...attrs, traceparent: `00-${E}-${ES}-01`, data: { instances: [{ prompt: 'a', num_inference_steps: 2, height: 64, width: 64, seed: 1 }] } };
      const answer = await postJson(`${srv.url}/v1/models/model:predict`, event, { headers: { 'content-type': 'application/cloudevents+json', 'x-request-id': 'ce-batch' } });
      expect([answer.status, answer.json.code]).toEqual([500, 'INTERNAL']);
      expect(srv.logs.filter((l) => l.msg === 'generation failed')).toEqual([expect.objectContaining({ requestIds: ['ce-batch'], traceIds: [E] })]);
    } finally {
      await srv.stop(0);
    }
  });
});

describe("the generation path's lines name the requests of their batch", () => {
  const T = (n: number) => `${String(n).padStart(2, '0')}f92f3577b34da6a3ce929d0e0e4736`;
  const headers = (n: number) => ({ 'content-type': 'application/json', 'x-request-id': `req-${n}`, traceparent: `00-${T(n)}-00f067aa0ba902b7-01` });
  const body = (seed: number) => ({ instances: [{ prompt: 'a', num_inference_steps: 2, height: 64, width: 64, seed }] });

  it('a generation that failed (a defect): its one error line names both requests of the batch and their traces', async () => {
    // Both requests fill one batch of two; the worker answers it as the real one answers a defect.
    const srv = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '0', MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '5000', RESULT_CACHE_MB: '0' },
      { ready: true, workers: [holdWorker({ fail: true })] });
    try {
      const answers = await Promise.all([1, 2].map((n) => postJson(`${srv.url}/v1/models/model:predict`, body(n), { headers: headers(n) })));
      expect(answers.map((a) => [a.status, a.json.code])).toEqual([[500, 'INTERNAL'], [500, 'INTERNAL']]);
      const lines = srv.logs.filter((l) => l.msg === 'generation failed');
      expect(lines).toEqual([expect.objectContaining({ level: 'error', worker: '0', device: 'cpu', err: expect.stringContaining('a defect of the test') })]);
      // In the order the requests reached the queue.
      expect([(lines[0]!.requestIds as string[]).toSorted(), (lines[0]!.traceIds as string[]).toSorted()]).toEqual([['req-1', 'req-2'], [T(1), T(2)]]);
    } finally {
      await srv.stop(0);
    }
  });

  it('a worker that died holding a generation: its line names the request it held', async () => {
    const worker = holdWorker();
    const srv = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '0' }, { ready: true, workers: [worker] });
    try {
      const held = postJson(`${srv.url}/v1/models/model:predict`, body(3), { headers: headers(3) });
      await until(() => srv.rt.engine.busy === 1, 30_000);
      await worker.worker.terminate();
      expect((await held).status).toBe(500);
      expect(srv.logs.filter((l) => l.msg === 'pipeline worker died')).toEqual([expect.objectContaining({ level: 'error', requestIds: ['req-3'], traceIds: [T(3)] })]);
    } finally {
      await srv.stop(0);
    }
  });

  it('names each request once, at most LOGGED_IDS of them, each id cut to 128 characters', () => {
    const one = { requestId: 'a', traceId: 't' };
    expect(batchIds([one, one, { requestId: 'b' }, undefined, {}])).toEqual({ requestIds: ['a', 'b'], traceIds: ['t'] });
    expect(batchIds([undefined, {}])).toEqual({});
    const many = Array.from({ length: 64 }, (_, i) => ({ requestId: `r${i}`.padEnd(300, 'x') }));
    const got = batchIds(many).requestIds!;
    expect([got.length, got[0], got.every((id) => id.length === 128)]).toEqual([LOGGED_IDS, many[0]!.requestId.slice(0, 128), true]);
  });
});
