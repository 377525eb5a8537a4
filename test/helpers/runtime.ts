/**
 * The in-process harness: the built runtime (dist/, so its pipeline workers are the real worker threads) created in
 * the test's own process — createRuntime(cfg) → listen(0) → boot → close() — and served over a real socket. Tests
 * wait on its typed boot events (src/runtime/boot-events.ts), never on log wording; its log lines are kept too.
 * Signals, exit codes, stderr and the cold start's order need a process of their own: helpers/server.ts.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { beforeAll } from 'vitest';
import type { BootEvent, BootEventMap, BootEventName } from '../../src/runtime/boot-events.js';
import type { Runtime } from '../../src/runtime/runtime.js';
import type { SpawnedWorker } from '../../src/runtime/workers.js';
import { Slots } from '../../src/slots.js';
import { ROOT, sharedCacheDir, type LogLine } from './server.js';

const dist = (p: string) => path.join(ROOT, 'dist', 'src', p);

/**
 * Variables the runtime's libraries read from the process environment itself (the AWS SDK's credentials chain and the
 * SDK-free reader's static keys), as they would in a pod; the runtime's own settings go through loadConfig.
 */
const PROCESS_ENV = ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN'];

export interface RuntimeHandle {
  url: string;
  port: number;
  rt: Runtime;
  /** Every log line so far (the runtime's and its workers'), parsed. */
  logs: LogLine[];
  cacheDir: string;
  /** Every event so far, in order. */
  events: BootEvent[];
  /** The first event `name` (past or to come) for which `pred` holds. */
  waitFor<K extends BootEventName>(name: K, pred?: (d: BootEventMap[K]) => boolean, timeoutMs?: number): Promise<BootEventMap[K]>;
  /** The data of every event `name` so far. */
  all<K extends BootEventName>(name: K): Array<BootEventMap[K]>;
  /** Resolves on `ready`; rejects with the reason if the boot fails. */
  waitReady(timeoutMs?: number): Promise<void>;
  /** rt.close(): drains, stops the workers, closes the listener and its connections. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * A runtime on loopback port 0 with `env` as its environment (the test process's, with these changes; `undefined`
 * removes a variable, as for a spawned server). `ready`: returns once it is ready. `workers`: stand-ins for the
 * pipeline workers it would spawn. `progressLogMs`: how often a long load or warm-up logs where it is.
 */
export async function startRuntime(env: Record<string, string | undefined> = {}, opts: { ready?: boolean; timeoutMs?: number; workers?: SpawnedWorker[]; progressLogMs?: number } = {}): Promise<RuntimeHandle> {
  const [{ loadConfig }, { createLogger }, { createRuntime, listen }, { bootRuntime }] = await Promise.all([
    import(dist('config.js')) as Promise<typeof import('../../src/config.js')>,
    import(dist('log.js')) as Promise<typeof import('../../src/log.js')>,
    import(dist('main.js')) as Promise<typeof import('../../src/main.js')>,
    import(dist('runtime/boot-sequence.js')) as Promise<typeof import('../../src/runtime/boot-sequence.js')>,
  ]);
  const cacheDir = env.MODEL_CACHE_DIR ?? sharedCacheDir();
  const merged: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', MODEL_CACHE_DIR: cacheDir, ...env })) {
    if (v !== undefined) merged[k] = v;
  }
  for (const k of PROCESS_ENV) if (merged[k] !== undefined) process.env[k] = merged[k];
  const cfg = loadConfig(merged);

  const logs: LogLine[] = [];
  const log = createLogger(cfg.logLevel, 'diffusers-runtime', { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) });
  const rt = await createRuntime(cfg, { log, ...(opts.workers ? { workers: opts.workers } : {}), ...(opts.progressLogMs ? { progressLogMs: opts.progressLogMs } : {}) });
  const events: BootEvent[] = [];
  const waiters = new Set<(e: BootEvent) => void>();
  rt.events.on((e) => {
    events.push(e);
    for (const w of [...waiters]) w(e);
  });
  const port = await listen(rt);
  void bootRuntime(rt);

  /** The first event (past or to come) that `match` accepts. */
  const waitEvent = (what: string, match: (e: BootEvent) => boolean, timeoutMs = opts.timeoutMs ?? 120_000): Promise<BootEvent> => {
    const hit = events.find(match);
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.delete(w);
        reject(new Error(`timed out waiting for ${what}; last lines:\n${logs.slice(-8).map((l) => JSON.stringify(l)).join('\n')}`));
      }, timeoutMs);
      const w = (e: BootEvent) => {
        if (!match(e)) return;
        waiters.delete(w);
        clearTimeout(timer);
        resolve(e);
      };
      waiters.add(w);
    });
  };
  const waitFor = async <K extends BootEventName>(name: K, pred?: (d: BootEventMap[K]) => boolean, timeoutMs?: number): Promise<BootEventMap[K]> =>
    (await waitEvent(`the "${name}" event`, (e) => e.name === name && (pred === undefined || pred(e.data as BootEventMap[K])), timeoutMs)).data as BootEventMap[K];
  const handle: RuntimeHandle = {
    url: `http://127.0.0.1:${port}`,
    port,
    rt,
    logs,
    cacheDir,
    events,
    waitFor,
    all: <K extends BootEventName>(name: K) => events.filter((e) => e.name === name).map((e) => e.data as BootEventMap[K]),
    waitReady: async (timeoutMs?: number) => {
      const end = await waitEvent('the end of the boot', (e) => e.name === 'ready' || (e.name === 'state' && e.data.state === 'failed'), timeoutMs);
      if (end.name === 'state') throw new Error(`boot failed: ${end.data.reason ?? 'unknown reason'}`);
    },
    stop: (graceMs?: number) => rt.close(graceMs),
  };
  if (opts.ready) {
    try {
      await handle.waitReady();
    } catch (err) {
      await rt.close(0);
      throw err;
    }
  }
  return handle;
}

/**
 * For a file of describe.concurrent suites that each start a runtime of their own: a function each such describe calls
 * first, so that it holds one of `n` lanes from its beforeAll to its end. At most `n` of them run at once, the others
 * waiting their turn in file order: side by side they fill the time one spends waiting, and so few that a loaded
 * machine does not stretch a case past its timeout.
 */
export function lanes(n: number): () => void {
  const slots = new Slots(n);
  return () => beforeAll(async () => {
    await slots.acquire();
    return () => slots.release();
  }, 600_000);
}

/** A runtime whose boot failed (its STORAGE_URI names no folder), once it says so: what refusals are tested on. */
export async function startFailedRuntime(): Promise<RuntimeHandle> {
  const down = await startRuntime({ STORAGE_URI: '/nonexistent/model-dir' });
  try {
    await down.waitFor('state', (s) => s.state === 'failed', 30_000);
  } catch (err) {
    await down.stop();
    throw err;
  }
  return down;
}

/** Sum of the samples of `name` (all label sets, or those matching `labels`) in a Prometheus text page. */
export async function metric(s: Pick<RuntimeHandle, 'url'>, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(`${s.url}/metrics`)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    if (!Object.entries(labels).every(([k, v]) => (m[2] ?? '').includes(`${k}="${v}"`))) continue;
    sum += Number(m[3]);
  }
  return sum;
}

/**
 * A pipeline worker that loads nothing and holds every generation it is given, warm-up included (helpers/hold-worker.mjs):
 * for startRuntime's `workers`. `fail`: it answers each generation with a defect's INTERNAL error instead.
 */
export function holdWorker(o: { fail?: boolean } = {}): SpawnedWorker {
  const worker = new Worker(path.join(ROOT, 'test', 'helpers', 'hold-worker.mjs'), { workerData: { fail: o.fail === true } });
  return {
    worker,
    attach(onMessage, onError, onExit) {
      worker.on('message', onMessage);
      worker.on('error', onError);
      worker.on('exit', onExit);
    },
  };
}
