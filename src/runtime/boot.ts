/**
 * @module The boot state machine: resolving → fetching → loading → warming → ready, or failed; a transient failure is
 * `retrying` until the next attempt (boot-retry.ts); each phase timed.
 */
import { S3_OPERATIONS, S3_OUTCOMES, type Metrics } from '../metrics.js';
import { BOOT_RETRY, type RetriedCode } from './boot-retry.js';
import type { FetchProgress } from '../storage/fetch.js';

export const BOOT_STATES = ['resolving', 'fetching', 'loading', 'warming', 'ready', 'retrying', 'failed', 'stopping'] as const;
export type BootState = (typeof BOOT_STATES)[number];

/** The model fetch's progress (each report is copied in, boot-sequence.ts), under the boot's phase; and the sessions made. */
export interface BootProgress extends Omit<FetchProgress, 'phase'> {
  phase: string;
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
  /** Entering `retrying`: the attempts failed so far, and the seconds until the next one. */
  attempt?: number;
  retryInSeconds?: number;
}

/** A boot being tried again: the attempts that failed (transiently) so far, and when the next begins (while `retrying`). */
interface Retry {
  attempts: number;
  /** Date.now() of the next attempt's start. */
  nextAt: number;
}

export class Boot {
  #state: BootState = 'resolving';
  #since = performance.now();
  #reason: string | undefined;
  #wasReady = false;
  #retry: Retry | undefined;
  readonly phases: Partial<Record<BootState, number>> = {};
  readonly progress: BootProgress = { phase: 'resolving', bytesDone: 0, bytesTotal: 0, filesDone: 0, filesTotal: 0, bytesPerSecond: 0, sessions: {} };
  readonly #labels: { model_name: string };

  constructor(
    modelName: string,
    /** Told every move, with its log message and level. */
    private readonly onChange: (c: StateChange, msg: string, level: 'info' | 'warn' | 'error') => void,
    private readonly metrics: Metrics,
  ) {
    this.#labels = { model_name: modelName };
    // The download, cache and S3 throttling counters at 0 from the start, as every series with known labels (engine.ts
    // #startAtZero).
    for (const c of [metrics.fetchedBytes, metrics.damagedFiles, metrics.cacheEvictions, metrics.cacheEvictedBytes, metrics.cacheHits]) c.inc(this.#labels, 0);
    for (const operation of S3_OPERATIONS) {
      metrics.s3Throttled.inc({ ...this.#labels, operation }, 0);
      for (const outcome of S3_OUTCOMES) metrics.s3Requests.inc({ ...this.#labels, operation, outcome }, 0);
    }
    for (const code of BOOT_RETRY.codes) metrics.bootRetries.inc({ ...this.#labels, code }, 0);
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

  /**
   * Attempt `attempts` failed for a reason that can pass (`code`): `retrying` until the next attempt, in `waitMs`; the
   * boot's reason is this failure's. One log line (warn) says what failed, which attempt, and when the next one begins.
   */
  retrying(code: RetriedCode, reason: string, attempts: number, waitMs: number): void {
    if (this.#state === 'stopping' || this.#state === 'failed') return;
    this.#retry = { attempts, nextAt: Date.now() + waitMs };
    this.metrics.bootRetries.inc({ ...this.#labels, code });
    const inSeconds = Number((waitMs / 1000).toFixed(1));
    this.to('retrying', reason, { attempt: attempts, retryInSeconds: inSeconds }, `boot attempt ${attempts} failed; trying again in ${inSeconds} s: ${reason}`);
  }

  /** Moves to `next`, closing the current phase's timer. Terminal states (failed, stopping) stay terminal. */
  to(next: BootState, reason?: string, retry?: { attempt: number; retryInSeconds: number }, msg?: string): void {
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
    const change: StateChange = { state: next, previous: prev, previousSeconds: Number(secs.toFixed(3)), ...(reason ? { reason } : {}), ...retry };
    if (next === 'failed') this.onChange(change, `boot failed: ${reason ?? 'unknown reason'}`, 'error');
    else this.onChange(change, msg ?? `boot ${next}`, next === 'retrying' ? 'warn' : 'info');
  }

  #publish(): void {
    for (const s of BOOT_STATES) this.metrics.bootState.set({ ...this.#labels, state: s }, s === this.#state ? 1 : 0);
  }

  /**
   * After a transient failure: the attempts failed so far, and while `retrying` when the next begins (ISO time and
   * seconds from now). Undefined before any.
   */
  retry(): { attempts: number; nextAttemptAt?: string; nextAttemptInSeconds?: number } | undefined {
    const r = this.#retry;
    if (r === undefined) return undefined;
    if (this.#state !== 'retrying') return { attempts: r.attempts };
    return { attempts: r.attempts, nextAttemptAt: new Date(r.nextAt).toISOString(), nextAttemptInSeconds: Math.max(0, Number(((r.nextAt - Date.now()) / 1000).toFixed(1))) };
  }

  /** The body fields DESIGN.md adds to KServe's 503 while booting. */
  describe(): Record<string, unknown> {
    const retry = this.retry();
    return {
      state: this.#state,
      progress: { ...this.progress, sessions: { ...this.progress.sessions } },
      ...(this.#reason ? { reason: this.#reason } : {}),
      ...(retry ? { retry } : {}),
    };
  }
}
