/**
 * Boot over a real socket: liveness at once and readiness only after warm-up (a process of its own: the cold start's
 * order), failures visible (in-process), EP fallback (its stderr), exit codes and the SIGTERM drain (signals).
 */
import { cpSync, rmSync, symlinkSync, truncateSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import WebSocket from 'ws';
import { afterEach, describe, expect, it } from 'vitest';
import { buildDemoModel, ensureDemoModel } from '../src/demo/index.js';
import { checkCuda } from '../src/pipeline/cuda.js';
import { nativeRandn } from '../src/pipeline/random.js';
import { metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, sharedCacheDir, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';

const live: ServerHandle[] = [];
const inProcess: RuntimeHandle[] = [];
afterEach(async () => {
  for (const s of live.splice(0)) await s.stop('SIGKILL');
  for (const s of inProcess.splice(0)) await s.stop(0);
});
const startIn = async (...a: Parameters<typeof startRuntime>) => {
  const s = await startRuntime(...a);
  inProcess.push(s);
  return s;
};
const start = async (...a: Parameters<typeof startServer>) => {
  const s = await startServer(...a);
  live.push(s);
  return s;
};

describe('boot', () => {
  it('answers liveness at once and readiness only after the warm-up generation', async () => {
    // A long warm-up keeps the runtime in `warming` long enough to watch it.
    const srv = await start({ STORAGE_URI: undefined, WARMUP_STEPS: '100', EXECUTION_PROVIDER: 'cpu' });
    const live0 = await fetch(`${srv.url}/v2/health/live`);
    expect(live0.status).toBe(200);
    // Routes are polled one after another; each must go 503 → 200 exactly once, never back.
    const routes = ['/v1/models/model', '/v1/models/model/ready', '/v2/health/ready'];
    const history = new Map<string, number[]>(routes.map((r) => [r, []]));
    const states = new Set<string>();
    let sawPredict503 = false;
    const deadline = performance.now() + 90_000;
    for (let i = 0; performance.now() < deadline; i++) {
      const route = routes[i % routes.length]!;
      const res = await fetch(`${srv.url}${route}`);
      const body = (await res.json()) as { state?: string; ready?: boolean; progress?: unknown; error?: string };
      history.get(route)!.push(res.status);
      if (route === '/v1/models/model') {
        if (res.status === 503) {
          expect(body.error).toBe('Model with name model is not ready.');
          expect((body as { code?: string }).code).toBe('MODEL_NOT_READY');
          expect(body.progress).toBeTypeOf('object');
          states.add(body.state!);
        } else {
          expect([res.status, body]).toEqual([200, { name: 'model', ready: true }]);
        }
      }
      if (!sawPredict503 && res.status === 503) {
        const p = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'early' }] });
        if (p.status === 503) {
          expect(p.headers.get('retry-after')).toMatch(/^\d+$/);
          sawPredict503 = true;
        }
      }
      if ([...history.values()].every((h) => h.at(-1) === 200)) break;
      await new Promise((r) => setTimeout(r, 15));
    }
    for (const [route, h] of history) {
      const first200 = h.indexOf(200);
      expect(first200, route).toBeGreaterThan(0); // at least one 503 before ready
      expect(h.slice(first200).every((x) => x === 200), route).toBe(true);
    }
    expect(states.has('warming')).toBe(true);
    expect(sawPredict503).toBe(true);
    expect(srv.events('warmup-done')).toHaveLength(1);
    expect(srv.events('state').map((l) => l.state)).toEqual(['loading', 'warming', 'ready']);
    const metrics = await (await fetch(`${srv.url}/metrics`)).text();
    expect(metrics).toMatch(/boot_phase_duration_seconds\{model_name="model",phase="warming"\} [0-9.]+/);
    expect(metrics).toMatch(/model_load_time_seconds\{model_name="model"\} [0-9.]+/);
  });

  it('a missing model fails boot with the reason on the model endpoint, liveness still answers', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const srv = await startIn({ STORAGE_URI: path.join(dir, 'no-such-model') });
      const failed = await srv.waitFor('state', (s) => s.state === 'failed');
      expect(String(failed.reason)).toMatch(/does not exist/);
      const m = await fetch(`${srv.url}/v1/models/model`);
      const body = (await m.json()) as { state: string; reason: string };
      expect(m.status).toBe(503);
      expect(body.state).toBe('failed');
      expect(body.reason).toMatch(/does not exist/);
      // A client-facing reason names the setting, never the local path behind it.
      expect(body.reason).not.toContain(dir);
      expect((await fetch(`${srv.url}/v2/health/live`)).status).toBe(200);
      expect((await fetch(`${srv.url}/`)).status).toBe(200);
    } finally {
      cleanup();
    }
  });

  it('a modelcar (MODEL_INIT_MODE=async): a model folder linked only after start is waited for, then served', async () => {
    // KServe's modelcar sidecar runs `ln -sf /proc/$$/root/models /mnt/models` as it starts, beside this container.
    const model = await ensureDemoModel(sharedCacheDir());
    const { dir, cleanup } = tempDir();
    try {
      const link = path.join(dir, 'models');
      const srv = await startIn({ STORAGE_URI: link, MODEL_INIT_MODE: 'async' });
      await until(() => srv.logs.some((l) => String(l.msg).startsWith('waiting for the model folder STORAGE_URI names to appear')));
      const before = await fetch(`${srv.url}/v1/models/model`);
      expect(before.status).toBe(503);
      expect(((await before.json()) as { state: string }).state).not.toBe('failed');
      symlinkSync(model, link);
      await srv.waitReady();
      expect((await fetch(`${srv.url}/v2/health/ready`)).status).toBe(200);
    } finally {
      cleanup();
    }
  });

  it('a folder that is not an ONNX export fails boot with a clear reason', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const srv = await startIn({ STORAGE_URI: dir });
      const failed = await srv.waitFor('state', (s) => s.state === 'failed');
      expect(String(failed.reason)).toMatch(/not an ONNX diffusers export: missing text_encoder\/model\.onnx/);
    } finally {
      cleanup();
    }
  });

  it('a model folder with a file missing or cut short: the reason names the component and file, never the folder\'s absolute path', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const good = path.join(dir, 'good');
      await buildDemoModel(good, { padBytes: 2e6 }); // padded: every component keeps its weights in model.onnx_data
      const cases: Array<[string, (m: string) => void, RegExp]> = [
        ['no-merges', (m) => rmSync(path.join(m, 'tokenizer', 'merges.txt')), /^MODEL_FORMAT: not an ONNX diffusers export: missing tokenizer\/merges\.txt$/],
        ['no-weights', (m) => rmSync(path.join(m, 'vae_decoder', 'model.onnx_data')), /^MODEL_FORMAT: vae_decoder\/model\.onnx could not be loaded: .*"vae_decoder\/model\.onnx_data"/],
        ['short-weights', (m) => truncateSync(path.join(m, 'unet', 'model.onnx_data'), 1000), /^MODEL_FORMAT: unet\/model\.onnx could not be loaded: .*out of bounds/],
        ['empty-graph', (m) => truncateSync(path.join(m, 'text_encoder', 'model.onnx'), 0),
          /^MODEL_FORMAT: text_encoder\/model\.onnx could not be loaded: Load model from text_encoder\/model\.onnx failed:ModelProto does not have a graph\.$/],
      ];
      for (const [name, spoil, reason] of cases) {
        const m = path.join(dir, name);
        cpSync(good, m, { recursive: true });
        spoil(m);
        const srv = await startIn({ STORAGE_URI: m });
        const failed = await srv.waitFor('state', (s) => s.state === 'failed');
        expect(String(failed.reason), name).toMatch(reason);
        const body = await (await fetch(`${srv.url}/v1/models/model`)).text();
        expect(body, name).not.toContain(dir);
        // Nor ONNX Runtime's source locations and C++ signatures (its build machine's paths).
        expect(body, name).not.toMatch(/onnxruntime_src|onnxruntime::/);
        await srv.stop(0);
      }
    } finally {
      cleanup();
    }
  });

  it('under EXECUTION_PROVIDER=auto on a CPU-only install, logs one calm line, nothing from ONNX Runtime on stderr, and serves on CPU', async () => {
    expect(checkCuda().ok).toBe(false); // this case is about machines without the CUDA provider library
    const srv = await start({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'auto', WARMUP_STEPS: '1' }, { ready: true });
    const lines = srv.logs.filter((l) => /execution provider|cuda/i.test(String(l.msg)));
    expect(lines.map((l) => [l.level, l.msg])).toEqual([['info', 'execution provider cpu: CUDA is not available']]);
    expect(String(lines[0]!.reason)).toMatch(/no CUDA provider library \(libonnxruntime_providers_cuda\.so/);
    expect(srv.stderr.join('')).not.toMatch(/Failed to load|providers_shared|onnxruntime/i);
    expect(srv.events('session').map((l) => [l.component, l.provider]).sort()).toEqual([['text_encoder', 'cpu'], ['unet', 'cpu'], ['vae_decoder', 'cpu'], ['vae_encoder', 'cpu']]);
    // and which torch.randn the worker runs: the native block the build made (as this process loads it), else JavaScript
    const imported = srv.logs.filter((l) => l.msg === 'onnxruntime-node imported');
    expect(imported.map((l) => l.randn)).toEqual([nativeRandn?.path ?? 'javascript']);
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'cpu', num_inference_steps: 2, height: 64, width: 64 }] });
    expect(r.status).toBe(200);
  });

  // About installs without the CUDA provider library: one with it (the image's, ONNXRUNTIME_NODE_INSTALL=cuda12) asks ORT.
  it.skipIf(checkCuda().missing !== 'provider')('under EXECUTION_PROVIDER=cuda on a CPU-only install, fails boot saying the CUDA provider library is missing and how to get it', async () => {
    const srv = await start({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cuda' });
    const failed = await srv.waitFor('state', (s) => s.state === 'failed');
    // Not ONNX Runtime's "Failed to load shared library" with a hint about CUDA and cuDNN: none of those is the cause.
    expect(String(failed.reason)).toBe(
      'PROVIDER: EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start: onnxruntime-node has no CUDA provider library ' +
        '(libonnxruntime_providers_cuda.so, libonnxruntime_providers_shared.so): a CPU-only install; install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 (the image does)',
    );
    expect(srv.stderr.join('')).not.toMatch(/Failed to load|providers_shared|onnxruntime/i);
  });

  it('exits non-zero on boot failure when EXIT_ON_BOOT_FAILURE is set', async () => {
    const { dir, cleanup } = tempDir();
    try {
      const srv = await start({ STORAGE_URI: path.join(dir, 'missing'), EXIT_ON_BOOT_FAILURE: 'true' });
      const code = await new Promise<number | null>((r) => srv.proc.once('exit', (c) => r(c)));
      expect(code).toBe(1);
    } finally {
      cleanup();
    }
  });

  it('stops with one clear line on a bad environment variable', async () => {
    await expect(startServer({ PORT: 'abc' }, { timeoutMs: 5_000 })).rejects.toThrow(/PORT must be an integer/);
  });
});

/** One HTTP/1.1 exchange on an already-open socket; resolves with the status code, the head and the body. */
function exchange(sock: net.Socket, request: string): Promise<{ status: number; head: string; body: string }> {
  return new Promise((resolve, reject) => {
    const closed = () => reject(new Error('the connection closed without an answer'));
    if (sock.destroyed) return closed();
    let buf = Buffer.alloc(0);
    const onData = (c: Buffer) => {
      buf = Buffer.concat([buf, c]);
      const sep = buf.indexOf('\r\n\r\n');
      if (sep < 0) return;
      const head = buf.subarray(0, sep).toString();
      const len = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
      if (buf.length - sep - 4 < len) return;
      sock.off('data', onData);
      resolve({ status: Number(head.split(' ')[1]), head, body: buf.subarray(sep + 4, sep + 4 + len).toString() });
    };
    sock.on('data', onData);
    sock.once('error', reject);
    sock.once('close', closed);
    sock.write(request);
  });
}

describe('SIGTERM', () => {
  it('turns readiness false at once, finishes the in-flight request, refuses new work, exits 0', async () => {
    const srv = await start({ STORAGE_URI: undefined, WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '60' }, { ready: true });
    // Keep-alive connections opened before the signal: the listener closes, these stay until their next answer.
    const connect = async () => {
      const sock = net.connect(srv.port, '127.0.0.1');
      await new Promise((r) => sock.once('connect', r));
      expect((await exchange(sock, 'GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n')).head).not.toMatch(/^connection: close$/im);
      return { sock, closed: new Promise<void>((r) => sock.once('close', () => r())) };
    };
    const [a, b, c] = [await connect(), await connect(), await connect()];
    let finished = false;
    const inflight = postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'drain me', num_inference_steps: 400, height: 1024, width: 1024, seed: 9 }] });
    void inflight.then(() => (finished = true));
    // The signal comes once a worker runs the generation (scraped on one of those connections): after a fixed 500 ms a
    // busy machine might not have read the request yet, and it would be refused as a late one.
    const running = async () => /^worker_busy\{[^}]*\} 1$/m.test((await exchange(c.sock, 'GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n')).body);
    while (!(await running())) await new Promise((r) => setTimeout(r, 25));
    expect(finished).toBe(false);
    const exit = new Promise<number | null>((r) => srv.proc.once('exit', (c) => r(c)));
    srv.proc.kill('SIGTERM');
    await srv.waitFor('draining');
    // Each answer from now on closes its connection once written, so whoever holds one goes to another pod.
    const ready = await exchange(a.sock, 'GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n');
    expect(ready.status).toBe(503);
    expect(ready.head).toMatch(/^connection: close$/im);
    await a.closed;
    const body = '{"instances":[{"prompt":"late"}]}';
    const late = await exchange(b.sock, `POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
    expect(late.status).toBe(503);
    expect(JSON.parse(late.body).error).toMatch(/shutting down/);
    expect(late.head).toMatch(/^connection: close$/im);
    await b.closed;
    // The refusal is counted by its reason, for whoever scrapes during the drain.
    const scrape = await exchange(c.sock, 'GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n');
    expect(scrape.body).toMatch(/^inference_rejected_total\{model_name="model",reason="shutting_down"\} 1$/m);
    await c.closed;
    expect(finished).toBe(false);
    const r = await inflight;
    expect(r.status).toBe(200);
    expect(r.headers.get('connection')).toBe('close');
    expect(await exit).toBe(0);
    expect(srv.events('state').map((l) => l.state)).toContain('stopping');
    expect(srv.events('shut-down').map((l) => l.drained)).toEqual([true]);
  });

  it('waits for the answers still being written or read: a slow reader gets its whole reply, a body still arriving its 503', async () => {
    const srv = await start({ STORAGE_URI: undefined, WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '60' }, { ready: true });
    // Four 1024² images of the demo model: ~15 MB of JSON, far more than loopback's socket buffers hold.
    const big = JSON.stringify({ instances: [{ prompt: 'read me slowly', num_inference_steps: 4, height: 1024, width: 1024, seed: 4, num_images_per_prompt: 4 }] });
    const reader = net.connect(srv.port, '127.0.0.1');
    const chunks: Buffer[] = [];
    reader.on('data', (c: Buffer) => chunks.push(c));
    const readerClosed = new Promise<void>((r) => reader.once('close', () => r()));
    reader.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${big.length}\r\n\r\n${big}`);
    // A request whose head has come but whose body has not, all of it, when the signal does.
    const small = '{"instances":[{"prompt":"uploading"}]}';
    const uploader = net.connect(srv.port, '127.0.0.1');
    await new Promise((r) => uploader.once('connect', r));
    uploader.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${small.length}\r\n\r\n${small.slice(0, 5)}`);
    await until(() => chunks.length > 0);
    reader.pause();
    const exit = new Promise<number | null>((r) => srv.proc.once('exit', (c) => r(c)));
    srv.proc.kill('SIGTERM');
    await srv.waitFor('draining');
    // Time for a server that does not wait for them to exit; one that does waits for the rest of the body and the reads.
    await Promise.race([exit, new Promise((r) => setTimeout(r, 2_000))]);
    const late = await exchange(uploader, small.slice(5)).catch((err: Error) => ({ status: 0, head: '', body: err.message }));
    expect(late.status).toBe(503);
    expect(JSON.parse(late.body)).toMatchObject({ code: 'SHUTTING_DOWN' });
    reader.resume();
    await readerClosed;
    const all = Buffer.concat(chunks);
    const sep = all.indexOf('\r\n\r\n');
    const head = all.subarray(0, sep).toString();
    expect(head).toMatch(/^HTTP\/1\.1 200 /);
    expect(all.length - sep - 4).toBe(Number(/content-length: (\d+)/i.exec(head)![1]));
    expect((JSON.parse(all.subarray(sep + 4).toString()) as { predictions: unknown[] }).predictions).toHaveLength(4);
    expect(await exit).toBe(0);
    expect(srv.events('shut-down').map((l) => l.drained)).toEqual([true]);
  });

  it('answers what is still running when the grace period ends (503 / close 4503), and closes idle WebSockets with 4503 at once', async () => {
    // The WebSocket's and the HTTP request's generations share one batch (sent within its window), so both are running.
    const srv = await start({ STORAGE_URI: undefined, WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1', MAX_BATCH_SIZE: '2', BATCH_WINDOW_MS: '1000' }, { ready: true });
    // A generation far longer than the grace period (seconds even on a fast CPU).
    const long = { prompt: 'cut me', num_inference_steps: 500, height: 2048, width: 2048, seed: 3 };
    const stream = (msg?: object) => {
      const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/model/stream`);
      const types: string[] = [];
      const errors: Array<Record<string, unknown>> = [];
      const progressed = new Promise<void>((r) => ws.on('message', (d) => {
        const m = JSON.parse(String(d)) as Record<string, unknown>;
        types.push(String(m.type));
        if (m.type === 'error') errors.push(m);
        if (m.type === 'progress') r();
      }));
      const opened = new Promise<void>((r) => ws.once('open', () => (msg && ws.send(JSON.stringify(msg)), r())));
      const closed = new Promise<{ code: number; at: number }>((r) => ws.once('close', (code) => r({ code, at: Date.now() })));
      return { opened, progressed, closed, types, errors };
    };
    const idle = stream();
    const running = stream(long);
    // Another seed: an identical request would wait for the WebSocket's generation rather than share its batch.
    const http = postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ ...long, seed: 4 }] });
    await Promise.all([idle.opened, running.progressed]);
    const exit = new Promise<number | null>((r) => srv.proc.once('exit', (c) => r(c)));
    srv.proc.kill('SIGTERM');
    // The idle socket is told at once, before the grace period ends (not left to a reset, 1006, at the exit).
    const [idleClose, runningClose] = await Promise.all([idle.closed, running.closed]);
    expect(idleClose.code).toBe(4503);
    expect(idleClose.at).toBeLessThan(runningClose.at);
    expect(idle.errors).toEqual([{ type: 'error', code: 'SHUTTING_DOWN', error: 'Model with name model is not ready. The server is shutting down.', retry_after: 1 }]);
    const cut = 'the server shut down before the generation finished (SHUTDOWN_GRACE_S); retry';
    expect(runningClose.code).toBe(4503);
    expect(running.errors).toEqual([{ type: 'error', code: 'SHUTTING_DOWN', error: cut, retry_after: 1 }]);
    expect(running.types).not.toContain('result');
    const r = await http;
    expect(r.status).toBe(503);
    expect(r.json).toEqual({ error: cut, code: 'SHUTTING_DOWN' });
    expect(r.headers.get('retry-after')).toBe('1');
    expect(await exit).toBe(0);
    expect(srv.events('shut-down').map((l) => l.drained)).toEqual([false]);
  });

  it('answers a request waiting for the identical generation that the grace period cuts with that cut, not a refusal', async () => {
    const srv = await start({ STORAGE_URI: undefined, WARMUP_STEPS: '1', SHUTDOWN_GRACE_S: '1' }, { ready: true });
    const long = { prompt: 'cut me', num_inference_steps: 500, height: 2048, width: 2048, seed: 3 };
    const first = postJson(`${srv.url}/v1/models/model:predict`, { instances: [long] });
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 60_000, 20);
    const waiting = postJson(`${srv.url}/v1/models/model:predict`, { instances: [long] });
    // In flight is where it waits for the running generation (it joins it in the same turn).
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 2, 20_000, 10);
    const exit = new Promise<number | null>((r) => srv.proc.once('exit', (c) => r(c)));
    srv.proc.kill('SIGTERM');
    const cut = { error: 'the server shut down before the generation finished (SHUTDOWN_GRACE_S); retry', code: 'SHUTTING_DOWN' };
    // It ran its own instead, refused: "the server is shutting down".
    for (const r of await Promise.all([first, waiting])) expect([r.status, r.json]).toEqual([503, cut]);
    expect(await exit).toBe(0);
  });
});
