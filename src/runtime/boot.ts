/** @module The boot state machine: resolving → fetching → loading → warming → ready, or failed; each phase timed. */
import { S3_OPERATIONS, type Metrics } from '../metrics.js';

export const BOOT_STATES = ['resolving', 'fetching', 'loading', 'warming', 'ready', 'failed', 'stopping'] as const;
export type BootState = (typeof BOOT_STATES)[number];

export interface BootProgress {
  phase: string;
  bytesDone: number;
  bytesTotal: number;
  filesDone: number;
  filesTotal: number;
  bytesPerSecond: number;
  sessions: Record<string, string>;
}

const TIMED: ReadonlySet<BootState> = new Set(['resolving', 'fetching', 'loading', 'warming']);

/** A move between states: what the runtime reports as its `state` event (boot-events.ts). */
export interface StateChange {
  state: BootState;
  previous: BootState;
  /** The time spent in the state left. */
  previousSeconds: number;
  reason?: string;
}

export class Boot {
  #state: BootState = 'resolving';
  #since = performance.now();
  #reason: string | undefined;
  #wasReady = false;
  readonly phases: Partial<Record<BootState, number>> = {};
  readonly progress: BootProgress = { phase: 'resolving', bytesDone: 0, bytesTotal: 0, filesDone: 0, filesTotal: 0, bytesPerSecond: 0, sessions: {} };
  readonly #labels: { model_name: string };

  constructor(
    modelName: string,
    /** Told every move, with its log message and level. */
    private readonly onChange: (c: StateChange, msg: string, level: 'info' | 'error') => void,
    private readonly metrics: Metrics,
  ) {
    this.#labels = { model_name: modelName };
    // The download, cache and S3 throttling counters at 0 from the start, as every series with known labels (engine.ts
    // #startAtZero).
    for (const c of [metrics.fetchedBytes, metrics.damagedFiles, metrics.cacheEvictions, metrics.cacheEvictedBytes, metrics.cacheHits]) c.inc(this.#labels, 0);
    for (const operation of S3_OPERATIONS) metrics.s3Throttled.inc({ ...this.#labels, operation }, 0);
    this.#publish();
  }

  get state(): BootState {
    return this.#state;
  }
  get reason(): string | undefined {
    return this.#reason;
  }
  get ready(): boolean {
    return this.#state === 'ready';
  }
  /** Reached ready once: a later `loading` is a pipeline worker being started again. */
  get wasReady(): boolean {
    return this.#wasReady;
  }

  /** Moves to `next`, closing the current phase's timer. Terminal states (failed, stopping) stay terminal. */
  to(next: BootState, reason?: string): void {
    if (this.#state === next) return;
    if (this.#state === 'stopping' || (this.#state === 'failed' && next !== 'stopping')) return;
    const now = performance.now();
    const prev = this.#state;
    const secs = (now - this.#since) / 1000;
    if (TIMED.has(prev)) {
      this.phases[prev] = secs;
      this.metrics.bootPhase.set({ ...this.#labels, phase: prev }, secs);
      this.metrics.bootPhaseHist.observe({ ...this.#labels, phase: prev }, secs);
    }
    this.#state = next;
    if (next === 'ready') this.#wasReady = true;
    this.#since = now;
    this.progress.phase = next;
    if (reason !== undefined) this.#reason = reason;
    this.#publish();
    const change: StateChange = { state: next, previous: prev, previousSeconds: Number(secs.toFixed(3)), ...(reason ? { reason } : {}) };
    if (next === 'failed') this.onChange(change, `boot failed: ${reason ?? 'unknown reason'}`, 'error');
    else this.onChange(change, `boot ${next}`, 'info');
  }

  #publish(): void {
    for (const s of BOOT_STATES) this.metrics.bootState.set({ ...this.#labels, state: s }, s === this.#state ? 1 : 0);
  }

  /** The body fields DESIGN.md adds to KServe's 503 while booting. */
  describe(): Record<string, unknown> {
    return {
      state: this.#state,
      progress: { ...this.progress, sessions: { ...this.progress.sessions } },
      ...(this.#reason ? { reason: this.#reason } : {}),
    };
  }
}
