/**
 * @module Spawning pipeline worker threads. Kept apart from the engine so `main` can start the
 * workers before it even listens: their boot and onnxruntime-node import then overlap the main
 * thread's own imports instead of following them.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { Config } from '../config.js';
import type { FromWorker, WorkerInit } from '../pipeline/protocol.js';
import { isThreadEndedNote, processMemoryTrimmer, type ThreadEndedNote } from '../pipeline/lora-memory.js';
import { ENTRY_MARKERS, LORA_SETS } from '../storage/cache.js';

/** A worker plus what it sent, or how it died, before anyone listened (replayed, never lost). */
export interface SpawnedWorker {
  worker: Worker;
  /** Hands the buffered and all later messages, errors and the exit to the three callbacks. */
  attach(onMessage: (m: FromWorker) => void, onError: (err: Error) => void, onExit: (code: number) => void): void;
}

/**
 * TF32 off unless CUDA_TF32=true: ORT's CUDA provider lets cuBLAS and cuDNN round float32 operands to TF32, and on an
 * H100 that put 8-13% of the reference images' pixel values one step off (2 values two off); with TF32 off the
 * counts match the CPU's. NVIDIA's libraries read NVIDIA_TF32_OVERRIDE when they start, so it is set in the process
 * environment before any worker loads them; a value the operator set stays.
 */
export function applyTf32(cfg: Pick<Config, 'cudaTf32' | 'executionProvider'>, env: NodeJS.ProcessEnv = process.env): void {
  if (cfg.executionProvider === 'cpu' || cfg.cudaTf32 || env.NVIDIA_TF32_OVERRIDE !== undefined) return;
  env.NVIDIA_TF32_OVERRIDE = '0';
}

type WorkerConfig = Pick<Config, 'workers' | 'intraOpThreads' | 'executionProvider' | 'optimizedModelCache' | 'optimizedCacheMaxMb' | 'cudaTf32' | 'graphOptimization' | 'gpus'> &
  Partial<Pick<Config, 'loraMaxSets' | 'loraCacheMb' | 'cacheDir' | 'warmupVaeEncoder' | 'warmupSteps' | 'auxThreads'>>;

export function spawnWorkers(cfg: WorkerConfig): SpawnedWorker[] {
  return Array.from({ length: cfg.workers }, (_, i) => spawnWorker(cfg, i));
}

/** This process's folder under `.lora-sets/`, its workers' adapter sets each in `w<k>/` inside. */
const LORA_WORK = `${os.hostname().replace(/[^A-Za-z0-9.-]/g, '_').slice(0, 64)}-${process.pid}-${randomBytes(4).toString('hex')}`;
/** After the boot, so the sweep never competes with a start. */
const LORA_SWEEP_DELAY_MS = 60_000;
let loraLeased: string | undefined;

/** `<cacheDir>/.lora-sets/<this process>`: its workers' adapter sets, each worker's in `w<k>/` inside. */
function loraWorkDir(cacheDir: string): string {
  return path.join(cacheDir, LORA_SETS, LORA_WORK);
}

/**
 * Leases this process's adapter-set folder (storage/lease.ts) before any worker can write in it; a minute later the
 * folders no live process leases (a crash's, an OOM-killed pod's: up to a patched UNet's weights each) are removed.
 * A pid cannot tell whose a folder is: a restarted container has a new pid namespace, and hostNetwork pods share a
 * host name.
 */
function leaseLoraWork(dir: string): void {
  if (loraLeased === dir) return;
  loraLeased = dir;
  void import('../storage/lease.js')
    .then(async ({ leaseEntry, sweepUnleased }) => {
      await leaseEntry(dir);
      setTimeout(() => void sweepUnleased(path.dirname(dir)).catch(() => undefined), LORA_SWEEP_DELAY_MS).unref();
    })
    .catch(() => undefined); // an unwritable cache fails the sets' own writes, with their own message
}

/** The CUDA device of worker `index`: workers are spread over the visible GPUs in turn; none on the CPU provider. */
export function workerDevice(cfg: Pick<Config, 'gpus' | 'executionProvider'>, index: number): number | undefined {
  return cfg.executionProvider === 'cpu' || cfg.gpus === 0 ? undefined : index % cfg.gpus;
}

/** What pipeline worker `index` is started with. */
export function workerInit(cfg: WorkerConfig, index: number): WorkerInit {
  // Several CPU workers share the cores instead of each grabbing all of them.
  const threads = cfg.intraOpThreads > 0 ? cfg.intraOpThreads : cfg.workers > 1 ? 1 : 0;
  const device = workerDevice(cfg, index);
  return {
    ep: cfg.executionProvider,
    intraOpThreads: threads,
    workerIndex: index,
    optimizedModelCache: { mode: cfg.optimizedModelCache, entryMarkers: ENTRY_MARKERS, maxSourceBytes: cfg.optimizedCacheMaxMb * 2 ** 20 },
    graphOptimizationLevel: cfg.graphOptimization,
    ...(device !== undefined ? { deviceId: device } : {}),
    // With no warm-up there is no end of it to wait for: the encoder is primed with the others.
    ...(cfg.warmupVaeEncoder ? { vaeEncoderWarmup: cfg.warmupSteps === 0 ? 'before-ready' : cfg.warmupVaeEncoder } : {}),
    ...(cfg.auxThreads ? { auxThreads: cfg.auxThreads } : {}),
    ...(cfg.loraMaxSets !== undefined && cfg.cacheDir !== undefined
      ? { lora: { maxSets: cfg.loraMaxSets, maxBytes: Math.floor((cfg.loraCacheMb ?? 4096) * 2 ** 20), workDir: loraWorkDir(cfg.cacheDir) } }
      : {}),
  };
}

/** One pipeline worker, `index` of cfg.workers (also what the engine calls to replace a worker that died). */
export function spawnWorker(cfg: WorkerConfig, index: number): SpawnedWorker {
  applyTf32(cfg);
  const init = workerInit(cfg, index);
  if (init.lora) leaseLoraWork(init.lora.workDir);
  const worker = new Worker(new URL('../pipeline/worker.js', import.meta.url), { workerData: init });
  const early: FromWorker[] = [];
  let deliver: (m: FromWorker) => void = (m) => early.push(m);
  // Until the engine attaches, an error is kept: an 'error' event with no listener would end the process.
  let earlyError: Error | undefined;
  let earlyExit: number | undefined;
  let fail: (err: Error) => void = (err) => (earlyError ??= err);
  let exit: (code: number) => void = (code) => (earlyExit = code);
  const log = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) => deliver({ t: 'log', level, msg, ...(obj ? { obj } : {}) });
  // Before any adapter set's thread allocates: glibc's dynamic mmap threshold would leave their buffers in the malloc
  // arenas (lora-memory.ts, MMAP_THRESHOLD_BYTES).
  if (init.lora && init.lora.maxSets > 0) processMemoryTrimmer(log).fixMmapThreshold();
  worker.on('message', (m: FromWorker | ThreadEndedNote) => {
    // An adapter set's thread ended in this worker: the process's one trim policy (lora-memory.ts) decides, and its
    // line goes to the engine's log like the worker's own.
    if (isThreadEndedNote(m)) void processMemoryTrimmer(log).threadEnded();
    else deliver(m);
  });
  worker.on('error', (err) => fail(err));
  worker.on('exit', (code) => exit(code));
  return {
    worker,
    attach(onMessage, onError, onExit) {
      deliver = onMessage;
      fail = onError;
      exit = onExit;
      for (const m of early.splice(0)) onMessage(m);
      if (earlyError) onError(earlyError);
      if (earlyExit !== undefined) onExit(earlyExit);
    },
  };
}
