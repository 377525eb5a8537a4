/**
 * DEFAULT_SCHEDULER / DEFAULT_STEPS on the built server over real sockets: what a request that names neither runs,
 * the same image as a request naming them, a WebSocket client seeing that many UNet runs; a default the model cannot
 * run fails the boot with a CONFIG reason on the model endpoint.
 */
import WebSocket from 'ws';
import { afterAll, describe, expect, it } from 'vitest';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';

const servers: ServerHandle[] = [];
afterAll(async () => void (await Promise.all(servers.map((s) => s.stop()))));

const b64 = (r: { json: Record<string, unknown> }) => (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

describe('DEFAULT_SCHEDULER and DEFAULT_STEPS', () => {
  it('run for a request that names neither, exactly as a request naming them; one naming others is unchanged', async () => {
    const common = { STORAGE_URI: undefined, WARMUP_STEPS: '1', RESULT_CACHE_MB: '0' };
    const [srv, plain] = await Promise.all([
      startServer({ ...common, DEFAULT_SCHEDULER: 'unipc', DEFAULT_STEPS: '7' }, { ready: true }),
      startServer(common, { ready: true }),
    ]);
    servers.push(srv, plain);
    const base = { prompt: 'a lighthouse at dusk', seed: 11, height: 64, width: 64 };
    const predict = (s: ServerHandle, inst: Record<string, unknown>) => postJson(`${s.url}/v1/models/model:predict`, { instances: [inst] });
    const defaulted = await predict(srv, base);
    expect(defaulted.status, JSON.stringify(defaulted.json).slice(0, 300)).toBe(200);
    const named = await predict(plain, { ...base, scheduler: 'unipc', num_inference_steps: 7 });
    expect(b64(defaulted) === b64(named)).toBe(true);
    expect(b64(defaulted) === b64(await predict(plain, base))).toBe(false);
    const other = { ...base, scheduler: 'euler_a', num_inference_steps: 3 };
    expect(b64(await predict(srv, other)) === b64(await predict(plain, other))).toBe(true);

    const messages: Array<Record<string, unknown>> = [];
    const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/model/stream`);
    await new Promise<void>((resolve, reject) => {
      ws.on('open', () => ws.send(JSON.stringify(base)));
      ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
      ws.on('close', () => resolve());
      ws.on('error', reject);
    });
    expect(messages.filter((m) => m.type === 'progress').map((m) => m.of)).toEqual(Array(7).fill(7));
  });

  it('a request whose scheduler cannot run DEFAULT_STEPS is told the steps are the server\'s default, not its own', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '1', DEFAULT_STEPS: '60' }, { ready: true });
    servers.push(srv);
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'x', scheduler: 'lcm', height: 64, width: 64 }] });
    expect([r.status, r.json]).toEqual([400, { code: 'INVALID_INPUT', error: 'instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm '
      + "(original_inference_steps is 50), got 60 (not sent: the server's default, DEFAULT_STEPS; send num_inference_steps)" }]);
    // Sent, the same value is the client's own.
    const sent = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'x', scheduler: 'lcm', num_inference_steps: 60, height: 64, width: 64 }] });
    expect(sent.json.error).toBe('instances[0].num_inference_steps must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 60');
  });

  it('a default the model cannot run fails the boot with a CONFIG reason naming the variable', async () => {
    const srv = await startServer({ STORAGE_URI: undefined, DEFAULT_SCHEDULER: 'lcm', DEFAULT_STEPS: '60' });
    servers.push(srv);
    const failed = await srv.waitFor('state', (s) => s.state === 'failed');
    expect(String(failed.reason)).toBe('CONFIG: DEFAULT_STEPS must be from 1 to 50 for scheduler lcm (original_inference_steps is 50), got 60');
    const m = await fetch(`${srv.url}/v1/models/model`);
    expect(m.status).toBe(503);
    expect(((await m.json()) as { reason: string }).reason).toMatch(/^CONFIG: DEFAULT_STEPS must be from 1 to 50 for scheduler lcm/);
  });
});
