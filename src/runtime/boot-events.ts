/**
 * @module The runtime's landmarks as typed events: listening, each boot state, each session, the model's files, the
 * warm-ups, ready, the optimized-model copies, LoRA adapter sets, the signal and the shutdown. Whoever embeds a runtime (tests, tools) subscribes to them
 * instead of matching log wording; each event is also one log line whose `event` field is its name, so a process's
 * log carries the same names for a test that spawns it.
 */
import type { Logger } from '../log.js';
import type { BootState, StateChange } from './boot.js';
import type { SessionProvider } from '../pipeline/provider.js';

export interface BootEventMap {
  /** SIGTERM or SIGINT reached the process (main emits it once its logger exists, before or after the runtime does). */
  signal: { signal: string };
  /** The HTTP server serves this runtime. */
  listening: { port: number; host: string; config: Record<string, unknown> };
  /** A boot state was entered (runtime/boot.ts); `previousSeconds` is the time spent in the one left. */
  state: StateChange;
  /** A component's ONNX session exists in a worker. */
  session: { component: string; provider: string; ms: number; optimizedCache: string; /** `worker` or an auxiliary thread (AUX_THREADS). */ thread: string };
  /**
   * A committed cache entry's check against S3 begins, `after` what: its warm-up was queued, the main thread's boot
   * work (tokenizers, sharp) was done first, that warm-up could not start, there is none (WARMUP_STEPS=0), or the wait
   * ran out (`waitedMs`: since the runtime began its boot).
   */
  'entry-check': { after: 'warm-up queued' | 'main thread free' | 'warm-up failed' | 'no warm-up' | 'wait ran out'; waitedMs: number };
  /** The model's files are all on disk: fetched, from the cache, or a local folder (not for the embedded demo model). */
  'files-ready': { dir: string; fromCache: boolean; bytes: number; files: number; seconds: number };
  /** Sessions were built from files that changed: they are dropped and created again. */
  'sessions-reset': { why: 'entry-changed' | 'objects-changed'; dir?: string };
  /** A warm-up generation began while weights were still downloading. */
  'warmup-early': { filesPending: number };
  /** One worker's warm-up generation finished. */
  'warmup-done': { ms: number; worker: number; steps: number; size: string; stages: Record<string, number> };
  /** Ready: every worker has warmed up. */
  ready: { seconds: number; phases: Partial<Record<BootState, number>>; providers: Record<string, SessionProvider> };
  /** After ready, the background writer started on the copies of these components (none left to write: no writer). */
  'optimized-cache-writing': { components: string[] };
  /** The background writer has written (or declined) the optimized-model copies. */
  'optimized-cache-written': { outcomes: Record<string, string>; ms: number };
  /** A worker merged a request's LoRA adapter set (`set`: its key); `waitedMs` counts from the first request for it. */
  'adapters-ready': { set: string; worker: number; waitedMs: number; ms: Record<string, number>; mergedMB: number; components: string[]; formats: Record<string, string> };
  /** close() began: readiness is false, in-flight requests finish within the grace period. */
  draining: { inflight: number; queued: number; graceMs: number; bootState: BootState };
  /** close() is done; `unfinished`: what it left after its CLEANUP_MS (runtime.ts), absent when everything finished. */
  'shut-down': { drained: boolean; unfinished?: string[] };
}

export type BootEventName = keyof BootEventMap;
export type BootEvent = { [K in BootEventName]: { name: K; data: BootEventMap[K] } }[BootEventName];

export class BootEvents {
  readonly #listeners = new Set<(e: BootEvent) => void>();

  constructor(private readonly log: Logger) {}

  /** Logs the event as one line (its data and `event`: its name) under `msg`, then tells the listeners. */
  emit<K extends BootEventName>(name: K, data: BootEventMap[K], msg: string, level: 'info' | 'warn' | 'error' = 'info'): void {
    const fields: Record<string, unknown> = { event: name, ...data };
    this.log[level](fields, msg);
    const e = { name, data } as BootEvent;
    for (const fn of this.#listeners) fn(e);
  }

  /** Calls `fn` for every later event, in order; returns what stops it. */
  on(fn: (e: BootEvent) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }
}
