/**
 * @module Giving back the memory an ended adapter set's thread leaves behind. Each set's thread allocates in a glibc
 * malloc arena of its own (merge buffers, ONNX Runtime's sessions and their thread pool); when the thread ends that
 * memory is free but stays resident, scattered through the arena, which the next set's thread reuses and fragments
 * further, so RSS climbed with every set built and evicted (docs/BENCHMARKS.md, "Long serving"). Once sets stop
 * switching (TRIM_POLICY), native/malloc-trim.c runs malloc_trim(0) on libuv's thread pool. Before any set's thread
 * starts, the process's mmap threshold is fixed (MMAP_THRESHOLD_BYTES), so that large buffers are mapped and unmapped
 * instead of left in the arenas: with it, RSS stays level while sets keep switching.
 *
 * malloc_trim works on the whole process, so there is one policy per process, in the main thread: pipeline workers
 * tell it when one of their sets' threads has ended (threadEndSink, relayed by runtime/workers.ts), and it trims once
 * no worker's set thread has ended for the quiet time. A worker's own timer would trim while another worker is still
 * switching sets, slowing that worker's builds for nothing.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { isMainThread, parentPort } from 'node:worker_threads';
import type { ThreadLog } from './session-thread.js';

/** dist/native/, where `npm run build` puts the module (scripts/build-native.sh). */
export const MALLOC_TRIM_MODULE = fileURLToPath(new URL('../../native/malloc-trim.node', import.meta.url));

/** One malloc_trim(0): whether it gave memory back, the process's resident bytes around it, and its duration. */
export interface TrimReport {
  released: boolean;
  rssBefore: number;
  rssAfter: number;
  ms: number;
}

/**
 * When to trim: once adapter sets have stopped switching for `quietMs` (no set's thread ended meanwhile, in any of
 * the process's pipeline workers). A trim
 * gives back every free page; while sets keep switching, the next builds fault most of them straight back in, so
 * trims then slow builds down and hold RSS down only for moments (docs/BENCHMARKS.md, "Long serving"). Once sets stop
 * switching, one trim gives the memory back for as long as they stay stopped. Sets that never stop switching still get
 * one trim every `maxDelayMs` at most, so the arenas' free memory cannot pile up for ever (one slower build each time).
 */
export interface TrimPolicy {
  quietMs: number;
  maxDelayMs?: number;
}

export const TRIM_POLICY: TrimPolicy = Object.freeze({ quietMs: 10_000, maxDelayMs: 300_000 });

/**
 * glibc's mmap threshold, fixed: buffers from this size up are mapped, and unmapped when freed. Left dynamic, glibc
 * raises it (up to 32 MiB) whenever a mapped buffer is freed; from then on such buffers (merge buffers, ONNX Runtime's
 * arena extensions) are carved from the malloc arenas and stay there, fragmented, after the set's thread has ended.
 * Measured in docs/BENCHMARKS.md ("Long serving"): with sets switching without pause, RSS ~390 MB and level instead of
 * 740-870 MB and rising; set builds 13-33 % slower where page faults are as dear as on that machine. 128 KiB (glibc's
 * own starting value) kept RSS lower still but slowed base requests too.
 */
export const MMAP_THRESHOLD_BYTES = 1024 * 1024;

export interface MemoryTrimmer {
  /** Why trims do nothing in this process (no module, no malloc_trim), once the first trim has looked; else undefined. */
  readonly unavailable: string | undefined;
  /** Trims that ran. */
  readonly runs: number;
  /**
   * Trims once every thread that ended before the call is gone: a caller that comes while a trim runs gets the next
   * one (that run may have walked the arenas before its thread's memory was free). Never rejects: undefined when no
   * trim can run here (logged once) or it failed (logged).
   */
  trim(): Promise<TrimReport | undefined>;
  /**
   * An adapter set's thread has ended: trims once no other has ended for the policy's quiet time. Resolves with that
   * trim's report (shared by every thread it covers), undefined when none can run here.
   */
  threadEnded(): Promise<TrimReport | undefined>;
  /**
   * Fixes glibc's mmap threshold at MMAP_THRESHOLD_BYTES (once per trimmer): 'fixed', 'operator' when the environment
   * sets it already (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES: theirs stays), undefined when the module cannot here.
   */
  fixMmapThreshold(env?: NodeJS.ProcessEnv): 'fixed' | 'operator' | undefined;
}

export interface TrimmerOptions {
  /** The native module (default: the build's). */
  file?: string;
  policy?: TrimPolicy;
}

interface NativeTrim {
  available: boolean;
  trim?: () => Promise<TrimReport>;
  setMmapThreshold?: (bytes: number) => boolean;
}

/** A trimmer that loads `file` on its first trim; without it (no C compiler at build, not glibc) one line says so. */
export function createMemoryTrimmer(log: ThreadLog, opts: TrimmerOptions = {}): MemoryTrimmer {
  const file = opts.file ?? MALLOC_TRIM_MODULE;
  const policy = opts.policy ?? TRIM_POLICY;
  let quiet: { timer: NodeJS.Timeout; done: Promise<TrimReport | undefined>; since: number } | undefined;
  let native: NativeTrim | undefined;
  let unavailable: string | undefined;
  let loaded = false;
  let runs = 0;
  let running: Promise<TrimReport | undefined> | undefined;
  let next: Promise<TrimReport | undefined> | undefined;
  let failures = 0;

  const load = (): void => {
    loaded = true;
    const what = 'memory that ended LoRA adapter set threads leave is not given back to the OS';
    if (!existsSync(file)) {
      unavailable = 'this build has no native/malloc-trim module (npm run build makes it where a C compiler is installed; the image has it)';
      log('info', `${what}: ${unavailable}`);
      return;
    }
    try {
      const m = { exports: {} as NativeTrim };
      process.dlopen(m, file);
      native = m.exports;
    } catch (err) {
      unavailable = `native/malloc-trim did not load: ${String((err as Error)?.message ?? err).split('\n')[0]}`;
      log('warn', `${what}: ${unavailable}`);
      return;
    }
    if (!native.available || typeof native.trim !== 'function') {
      unavailable = 'the C library has no malloc_trim (not glibc)';
      native = undefined;
      log('info', `${what}: ${unavailable}`);
    }
  };

  const run = async (): Promise<TrimReport | undefined> => {
    if (!loaded) load();
    if (!native) return undefined;
    try {
      const r = await native.trim!();
      runs++;
      return r;
    } catch (err) {
      // Once is enough to tell: the same cause would repeat on every eviction.
      if (failures++ === 0) log('warn', 'malloc_trim failed', { reason: String((err as Error)?.message ?? err) });
      return undefined;
    }
  };

  const trim = (): Promise<TrimReport | undefined> => {
    if (!running) {
      const r = run().finally(() => {
        running = undefined;
      });
      running = r;
      return r;
    }
    next ??= running.then(() => {
      next = undefined;
      return trim();
    });
    return next;
  };

  const logged = async (p: Promise<TrimReport | undefined>): Promise<TrimReport | undefined> => {
    const r = await p;
    if (r) log('info', 'memory of ended LoRA adapter set threads given back', { rssMB: mb(r.rssAfter), returnedMB: mb(r.rssBefore - r.rssAfter), ms: Math.round(r.ms) });
    return r;
  };

  const threadEnded = (): Promise<TrimReport | undefined> => {
    if (loaded && !native) return Promise.resolve(undefined);
    if (quiet) {
      if (performance.now() - quiet.since < (policy.maxDelayMs ?? Infinity)) quiet.timer.refresh();
      return quiet.done;
    }
    let fire!: () => void;
    const done = new Promise<void>((r) => (fire = r)).then(() => {
      quiet = undefined;
      return logged(trim());
    });
    // Unreferenced: a worker that is shutting down does not wait for it.
    quiet = { timer: setTimeout(() => fire(), policy.quietMs).unref(), done, since: performance.now() };
    return done;
  };

  let threshold: 'fixed' | 'operator' | undefined;
  let thresholdAsked = false;
  const fixMmapThreshold = (env: NodeJS.ProcessEnv = process.env): 'fixed' | 'operator' | undefined => {
    if (thresholdAsked) return threshold;
    thresholdAsked = true;
    if (env.MALLOC_MMAP_THRESHOLD_ !== undefined || /glibc\.malloc\.mmap_threshold/.test(env.GLIBC_TUNABLES ?? '')) return (threshold = 'operator');
    if (!loaded) load();
    if (!native?.setMmapThreshold) return undefined;
    if (native.setMmapThreshold(MMAP_THRESHOLD_BYTES)) return (threshold = 'fixed');
    log('warn', 'glibc did not take the mmap threshold for LoRA adapter sets (mallopt); their memory may stay resident while sets switch');
    return undefined;
  };

  return {
    fixMmapThreshold,
    threadEnded,
    get unavailable() {
      return unavailable;
    },
    get runs() {
      return runs;
    },
    trim,
  };
}

const mb = (bytes: number) => Math.round((bytes / 2 ** 20) * 10) / 10;

/** Where an adapter set's thread reports its end: the process's policy (or, in tests, a trimmer of their own). */
export type ThreadEndSink = Pick<MemoryTrimmer, 'threadEnded'>;

/** What a pipeline worker posts to the main thread when one of its sets' threads has ended. */
export interface ThreadEndedNote {
  t: 'lora-thread-ended';
}

export const isThreadEndedNote = (m: unknown): m is ThreadEndedNote => (m as ThreadEndedNote | null)?.t === 'lora-thread-ended';

let processTrimmer: MemoryTrimmer | undefined;
let processPolicy: TrimPolicy = TRIM_POLICY;
let processLog: ThreadLog | undefined;

/**
 * The process's one trimmer (main thread). Its lines go to the last `log` given (runtime/workers.ts passes the
 * engine's log through the worker that reported the end), or nowhere before one is given.
 */
export function processMemoryTrimmer(log?: ThreadLog): MemoryTrimmer {
  if (log) processLog = log;
  return (processTrimmer ??= createMemoryTrimmer((level, msg, obj) => processLog?.(level, msg, obj), { policy: processPolicy }));
}

/**
 * Sets the process's policy (tests shrink it to seconds); the trimmer made with the old one, if any, is dropped with
 * its pending timer (unreferenced) and the next end starts the new one.
 */
export function setProcessTrimPolicy(policy: TrimPolicy = TRIM_POLICY): void {
  processPolicy = policy;
  processTrimmer = undefined;
}

/**
 * Where this thread's adapter set threads report their ends: in a pipeline worker, a note to the main thread, whose
 * policy decides (resolves at once, undefined: the trim's report is logged there); in the main thread, its policy.
 */
export function threadEndSink(log: ThreadLog): ThreadEndSink {
  if (isMainThread || !parentPort) return processMemoryTrimmer(processLog ? undefined : log);
  const port = parentPort;
  return {
    threadEnded: () => {
      port.postMessage({ t: 'lora-thread-ended' } satisfies ThreadEndedNote);
      return Promise.resolve(undefined);
    },
  };
}
