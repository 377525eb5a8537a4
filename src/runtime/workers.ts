/**
 * @module Spawning pipeline worker threads. Kept apart from the engine so `main` can start the
 * workers right after listening: their onnxruntime-node and sharp imports then overlap the main
 * thread's own imports instead of following them.
 */
import { Worker } from 'node:worker_threads';
import type { Config } from '../config.js';
import type { FromWorker, WorkerInit } from '../pipeline/protocol.js';

/** A worker plus the messages it sent before anyone listened (they are replayed, never lost). */
export interface SpawnedWorker {
  worker: Worker;
  /** Hands the buffered and all later messages to `onMessage`. */
  attach(onMessage: (m: FromWorker) => void): void;
}

export function spawnWorkers(cfg: Pick<Config, 'workers' | 'intraOpThreads' | 'executionProvider' | 'optimizedModelCache'>): SpawnedWorker[] {
  // Several CPU workers share the cores instead of each grabbing all of them.
  const threads = cfg.intraOpThreads > 0 ? cfg.intraOpThreads : cfg.workers > 1 ? 1 : 0;
  return Array.from({ length: cfg.workers }, (_, i) => {
    const init: WorkerInit = { ep: cfg.executionProvider, intraOpThreads: threads, workerIndex: i, optimizedModelCache: cfg.optimizedModelCache };
    const worker = new Worker(new URL('../pipeline/worker.js', import.meta.url), { workerData: init });
    const early: FromWorker[] = [];
    let deliver: (m: FromWorker) => void = (m) => early.push(m);
    worker.on('message', (m: FromWorker) => deliver(m));
    return {
      worker,
      attach(onMessage) {
        deliver = onMessage;
        for (const m of early.splice(0)) onMessage(m);
      },
    };
  });
}
