/**
 * A server that serves for weeks must keep nothing per request: the in-process runtime on the embedded demo model, over
 * real sockets, serves rounds of every kind of request (V1, V2, OpenAI, a CloudEvent, identical requests at once, bad
 * bodies, unknown paths, models and adapters by random names, WebSocket generations, clients that leave) and the
 * things that live as long as the process or a kept-alive connection must not gain listeners, handles or metric
 * series. Counted, not timed (the memory itself: `npm run bench:soak`, docs/BENCHMARKS.md "Long serving").
 */
import { getEventListeners } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import WebSocket from 'ws';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';

let srv: RuntimeHandle;
beforeAll(async () => {
  srv = await startRuntime({ STORAGE_URI: undefined, MAX_QUEUE: '16', REQUEST_TIMEOUT_S: '30' }, { ready: true });
});
afterAll(async () => {
  await srv?.stop();
});

/** The server's ends of the connections open now. */
const serverSockets = () => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles()
  .filter((h): h is net.Socket => h instanceof net.Socket && h.localPort === srv.port);
const listenersOf = (e: NodeJS.EventEmitter) => Object.fromEntries(e.eventNames().map((n) => [String(n), e.listenerCount(n)]));

function request(agent: http.Agent | false, method: string, p: string, body?: string, headers: Record<string, string> = {}, leaveAfterMs?: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const r = http.request(`${srv.url}${p}`, { method, agent, headers: { 'content-type': 'application/json', ...headers } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode!));
    });
    r.on('error', (err: NodeJS.ErrnoException) => (leaveAfterMs !== undefined ? resolve(499) : reject(err)));
    r.end(body);
    if (leaveAfterMs !== undefined) setTimeout(() => r.destroy(), leaveAfterMs);
  });
}

const inst = (i: number) => ({ prompt: `a fox ${i % 3}`, height: 64, width: 64, num_inference_steps: 1, seed: i % 4 });

/** One round on the kept-alive connection of `agent`, and identical requests at once on connections of their own. */
async function round(agent: http.Agent, i: number): Promise<number[]> {
  const v1 = JSON.stringify({ instances: [inst(i)] });
  const statuses = [
    await request(agent, 'POST', '/v1/models/model:predict', v1),
    await request(agent, 'POST', '/v2/models/model/infer', JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['x'] }], parameters: { height: 64, width: 64, num_inference_steps: 1 } })),
    await request(agent, 'POST', '/openai/v1/images/generations', JSON.stringify({ prompt: 'x', size: '64x64', num_inference_steps: 1 })),
    await request(agent, 'POST', '/v1/models/model:predict', v1, { 'ce-specversion': '1.0', 'ce-id': `e${i}`, 'ce-source': `/s/${i}`, 'ce-type': 't' }),
    await request(agent, 'GET', `/no/such/${i}`),
    await request(agent, 'POST', `/v1/models/m${i}:predict`, v1),
    await request(agent, 'GET', `/v2/models/m${i}/ready`),
    await request(agent, 'POST', '/openai/v1/images/generations', JSON.stringify({ model: `m${i}`, prompt: 'x' })),
    await request(agent, 'POST', '/v1/models/model:predict', '{"instances":[{'),
    await request(agent, 'POST', '/v1/models/model:predict', JSON.stringify({ instances: [{ prompt: 'x', loras: [`nope${i}`] }] })),
  ];
  // A fresh seed: three identical requests, one generation (the others wait for its images), one client leaving.
  const same = JSON.stringify({ instances: [{ ...inst(i), num_inference_steps: 3, seed: 1000 + i }] });
  const at = await Promise.all([0, 1, 2].map((k) => request(false, 'POST', '/v1/models/model:predict', same, {}, k === i % 3 ? 1 + (i % 20) : undefined)));
  return [...statuses, ...at];
}

/** A WebSocket client: a generation (with previews), one that leaves once accepted, one that sends nothing, or an unknown model. */
function ws(name: string, how: 'generate' | 'leave' | 'silent'): Promise<string> {
  return new Promise((resolve) => {
    const w = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/${name}/stream`);
    let out = 'closed';
    w.on('open', () => {
      if (how === 'silent') setTimeout(() => w.close(), 20);
      else w.send(JSON.stringify({ prompt: 'x', height: 64, width: 64, num_inference_steps: 2, preview_every: 1 }));
    });
    w.on('message', (d) => {
      const m = JSON.parse(String(d)) as { type: string; code?: string };
      out = m.type === 'error' ? m.code! : m.type;
      if (m.type === 'accepted' && how === 'leave') w.terminate();
    });
    w.on('error', () => undefined);
    w.on('close', () => resolve(out));
  });
}

/** WebSocket clients of every kind, `n` of them. */
async function wsRound(n: number, from: number): Promise<Set<string>> {
  const outs = new Set<string>();
  for (let i = from; i < from + n; i++) outs.add(await ws(i % 4 === 3 ? `m${i}` : 'model', (['generate', 'leave', 'silent', 'generate'] as const)[i % 4]));
  return outs;
}

/** The metric series (names and labels), scraped on a connection of its own, closed after it. */
async function seriesKeys(): Promise<string[]> {
  const text = await new Promise<string>((resolve, reject) => {
    http.get(`${srv.url}/metrics`, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve(body));
    }).on('error', reject);
  });
  // Not the process's own gauges: their `type` labels are Node's kinds of handle alive at the scrape (a closed set).
  return text.split('\n').filter((l) => l !== '' && !l.startsWith('#') && !l.startsWith('process_runtime_')).map((l) => l.slice(0, l.lastIndexOf(' ')));
}

it('keeps no listener, handle or metric series per request, kept-alive connection or WebSocket', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const shutdown = getEventListeners(srv.rt.shutdown, 'abort').length;
  const processListeners = listenersOf(process);
  // Every answer the rounds give, and every label set they make, once before counting.
  for (let i = 0; i < 6; i++) {
    const got = await round(agent, i);
    expect(got.slice(0, 10)).toEqual([200, 200, 200, 200, 404, 404, 404, 404, 400, 400]);
    expect(got.slice(10).filter((s, k) => k !== i % 3)).toEqual([200, 200]);
  }
  expect(await wsRound(8, 0)).toEqual(new Set(['result', 'accepted', 'closed', 'MODEL_NOT_FOUND']));
  // A client surely leaving mid-generation: a cancellation's series exist before counting, however fast the rounds' own
  // leavers' generations end on this machine.
  // 512², not 64²: 400 steps of 64² ended within the 100 ms on an idle machine (answered 200).
  const long = JSON.stringify({ instances: [{ ...inst(0), height: 512, width: 512, num_inference_steps: 400, seed: 99 }] });
  expect(await request(false, 'POST', '/v1/models/model:predict', long, {}, 100)).toBe(499);
  await expect.poll(async () => (await seriesKeys()).some((k) => k.includes('reason="client_left"')), { timeout: 10_000 }).toBe(true);
  const live = () => serverSockets().filter((s) => !s.destroyed);
  await expect.poll(() => live().length, { timeout: 10_000 }).toBe(1);
  const [kept] = live();
  const before = { socket: listenersOf(kept!), series: await seriesKeys() };
  for (let i = 6; i < 30; i++) {
    await round(agent, i);
    if (i % 4 === 0) await wsRound(4, i);
  }
  // The same kept-alive connection served every round: its listeners are what they were after the first rounds.
  expect(live()).toContain(kept);
  expect(listenersOf(kept!)).toEqual(before.socket);
  // Each WebSocket listened for the shutdown until it closed.
  await expect.poll(() => getEventListeners(srv.rt.shutdown, 'abort').length, { timeout: 10_000 }).toBe(shutdown);
  expect(listenersOf(process)).toEqual(processListeners);
  // Random model names, paths, adapters and event sources make no series.
  expect(await seriesKeys()).toEqual(before.series);
  agent.destroy();
  await expect.poll(() => live().length, { timeout: 10_000 }).toBe(0);
});
