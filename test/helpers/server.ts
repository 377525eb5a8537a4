/**
 * Starts the real built server (`node dist/src/main.js`) as a child process on an ephemeral port: for what only a
 * process shows (signals, exit codes, stderr, the cold start's order). Everything else runs in-process (runtime.ts).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { referenceDir } from '../../scripts/reference.js';
import type { BootEventMap, BootEventName } from '../../src/runtime/boot-events.js';

export const ROOT = path.resolve(import.meta.dirname, '..', '..');
export const ENTRY = path.join(ROOT, 'dist', 'src', 'main.js');
/** The reference data: SHARED_DIR/reference when SHARED_DIR is set, else the in-repository copy (test/fixtures/reference). */
export const REFERENCE = (): string => (process.env.SHARED_DIR ? path.resolve(process.env.SHARED_DIR, 'reference') : referenceDir());

export interface LogLine {
  msg?: string;
  level?: string;
  [k: string]: unknown;
}

/** A boot event as its log line carries it (src/runtime/boot-events.ts): the data, plus `event`, `msg`, `level`, … */
export type EventLine<K extends BootEventName> = BootEventMap[K] & LogLine;

export interface ServerHandle {
  url: string;
  port: number;
  proc: ChildProcess;
  logs: LogLine[];
  stderr: string[];
  cacheDir: string;
  spawnedAt: number;
  /** The first event `name` (already logged, or to come) for which `pred` holds; rejects if the process exits first. */
  waitFor<K extends BootEventName>(name: K, pred?: (d: EventLine<K>) => boolean, timeoutMs?: number): Promise<EventLine<K>>;
  /** Every event `name` logged so far, in order. */
  events<K extends BootEventName>(name: K): Array<EventLine<K>>;
  /** Resolves on `ready`; rejects with the reason if the boot fails. */
  waitReady(timeoutMs?: number): Promise<void>;
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Polls `cond` every `stepMs` until it holds; throws once `ms` have passed without. */
export async function until(cond: () => boolean | Promise<boolean>, ms = 20_000, stepMs = 10): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

/** Whether process `pid` still exists (signal 0 checks without sending anything). */
export const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** A shared cache dir per test process, so the demo model is generated once per test file. */
let sharedCache: string | undefined;
export function sharedCacheDir(): string {
  // Under the run's folder (test/global-setup.ts), which the run removes.
  return (sharedCache ??= mkdtempSync(path.join(process.env.DR_TEST_RUN_DIR ?? os.tmpdir(), 'dr-test-cache-')));
}

/** Whether a log line is event `name` and `pred` holds for it. */
export const isEvent = <K extends BootEventName>(l: LogLine, name: K, pred?: (d: EventLine<K>) => boolean): l is EventLine<K> =>
  l.event === name && (pred === undefined || pred(l as EventLine<K>));

/** A boot that ended: `ready`, or the `state` event that says it failed. */
export const bootEnded = (l: LogLine): boolean => isEvent(l, 'ready') || isEvent(l, 'state', (d) => d.state === 'failed');

/**
 * `live`: return as soon as liveness answers on env.PORT (which must be set), before the runtime has loaded and
 * logged 'listening'.
 */
export async function startServer(env: Record<string, string | undefined> = {},
  opts: {
    ready?: boolean;
    timeoutMs?: number;
    live?: boolean;
    /** A command the server runs under (`unshare …`): node and the entry are its last arguments. */
    prefix?: readonly string[];
    /** Another copy of the built server's main.js (beside node_modules of its own); default ENTRY. */
    entry?: string;
  } = {}): Promise<ServerHandle> {
  if (!existsSync(ENTRY)) throw new Error(`${ENTRY} is missing: run \`npm run build\` (npm test does it first)`);
  const cacheDir = env.MODEL_CACHE_DIR ?? sharedCacheDir();
  const childEnv: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', MODEL_CACHE_DIR: cacheDir, ...env })) {
    if (v !== undefined) childEnv[k] = v;
  }
  const spawnedAt = performance.now();
  const [file, ...args] = [...(opts.prefix ?? []), process.execPath, opts.entry ?? ENTRY];
  const proc = spawn(file!, args, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: LogLine[] = [];
  const stderr: string[] = [];
  const waiters: Array<{ pred: (l: LogLine) => boolean; resolve: (l: LogLine) => void }> = [];
  let buf = '';
  proc.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    buf += chunk;
    let i: number;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let parsed: LogLine;
      try {
        parsed = JSON.parse(line) as LogLine;
      } catch {
        parsed = { msg: line, raw: true };
      }
      logs.push(parsed);
      for (const w of [...waiters]) {
        if (w.pred(parsed)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(parsed);
        }
      }
    }
  });
  proc.stderr!.setEncoding('utf8').on('data', (c: string) => stderr.push(c));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.once('exit', (code, signal) => r({ code, signal })));
  const context = () => `last lines:\n${logs.slice(-8).map((l) => JSON.stringify(l)).join('\n')}\nstderr: ${stderr.join('').slice(-2000)}`;

  const waitLine = (what: string, pred: (l: LogLine) => boolean, timeoutMs = opts.timeoutMs ?? 60_000): Promise<LogLine> => {
    const hit = logs.find(pred);
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}; ${context()}`)), timeoutMs);
      const w = { pred, resolve: (l: LogLine) => (clearTimeout(timer), resolve(l)) };
      waiters.push(w);
      void exited.then(({ code }) => {
        if (waiters.includes(w)) {
          clearTimeout(timer);
          reject(new Error(`server exited (code ${code}) before ${what}; ${context()}`));
        }
      });
    });
  };
  const waitFor = <K extends BootEventName>(name: K, pred?: (d: EventLine<K>) => boolean, timeoutMs?: number) =>
    waitLine(`the "${name}" event`, (l) => isEvent(l, name, pred), timeoutMs) as Promise<EventLine<K>>;

  let port: number;
  try {
    port = opts.live
      ? await waitLive(Number(env.PORT), exited, context, opts.timeoutMs ?? 60_000)
      : (await waitFor('listening')).port;
  } catch (err) {
    // No handle for the caller to stop: not left running (on a volume that stopped answering it would stay for good).
    proc.kill('SIGKILL');
    throw err;
  }
  const url = `http://127.0.0.1:${port}`;
  const handle: ServerHandle = {
    url,
    port,
    proc,
    logs,
    stderr,
    cacheDir,
    spawnedAt,
    waitFor,
    events: <K extends BootEventName>(name: K) => logs.filter((l): l is EventLine<K> => isEvent(l, name)),
    waitReady: async (timeoutMs = opts.timeoutMs ?? 120_000) => {
      const l = await waitLine('the end of the boot', bootEnded, timeoutMs);
      if (!isEvent(l, 'ready')) throw new Error(`boot failed: ${String(l.reason)}`);
    },
    stop: async (signal = 'SIGTERM', timeoutMs = 30_000) => {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), timeoutMs);
      const r = await exited;
      clearTimeout(timer);
      return r;
    },
  };
  if (opts.ready) await handle.waitReady();
  return handle;
}

async function waitLive(port: number, exited: Promise<unknown>, context: () => string, timeoutMs: number): Promise<number> {
  if (!(port > 0)) throw new Error('startServer({ live: true }) needs env.PORT');
  let gone = false;
  void exited.then(() => (gone = true));
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (gone) throw new Error(`server exited before liveness answered; ${context()}`);
    if (performance.now() > deadline) throw new Error(`liveness did not answer on port ${port} within ${timeoutMs} ms; ${context()}`);
    const ok = await fetch(`http://127.0.0.1:${port}/v2/health/live`).then((r) => r.ok, () => false);
    if (ok) return port;
    await new Promise((r) => setTimeout(r, 5));
  }
}

export function tempDir(prefix = 'dr-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** PNG width/height from the IHDR chunk (no decoder needed). */
export function pngSize(buf: Buffer): { width: number; height: number } {
  const sig = buf.subarray(0, 8).toString('hex');
  if (sig !== '89504e470d0a1a0a') throw new Error('not a PNG');
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

export async function postJson(url: string, body: unknown, init: RequestInit = {}): Promise<{ status: number; json: Record<string, unknown>; headers: Headers }> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body), ...init });
  const text = await res.text();
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(text) as Record<string, unknown>;
  } catch {
    json = { _raw: text };
  }
  return { status: res.status, json, headers: res.headers };
}
