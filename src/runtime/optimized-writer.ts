/**
 * @module The background writer of optimized-model copies (pipeline/optimizer.ts, in a child process): started after
 * ready with what this start loaded without, so only later starts of the cache entry skip ORT's optimisers. A
 * process, not a thread, because ORT's session build cannot be interrupted: SIGTERM kills it at once.
 */
import { fork, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import { removeWriterTemps } from '../pipeline/ortcache.js';
import type { OptimizeItem } from '../pipeline/ortcache.js';
import { ENTRY_MARKERS } from '../storage/cache.js';
import type { FromOptimizer, OptimizerInit } from '../pipeline/protocol.js';
import type { BootEvents } from './boot-events.js';

export interface OptimizedWriter {
  /** Starts writing the copies of `items`; a failure to start only costs later starts their gain, so it is logged. */
  start(items: OptimizeItem[]): void;
  /** Kills a writer at once and removes its half-written files (never a copy it already committed). */
  stop(): Promise<void>;
}

export function createOptimizedWriter(
  cfg: Readonly<Config>,
  log: Logger,
  events: BootEvents,
  stopping: () => boolean,
): OptimizedWriter {
  let current: { child: ChildProcess; files: string[] } | undefined;

  const fork1 = (items: OptimizeItem[]) => {
    const init: OptimizerInit = { items, policy: { mode: cfg.optimizedModelCache, entryMarkers: ENTRY_MARKERS, maxSourceBytes: cfg.optimizedCacheMaxMb * 2 ** 20 } };
    const t0 = performance.now();
    events.emit('optimized-cache-writing', { components: items.map((i) => path.basename(path.dirname(i.path))) }, 'writing the optimized model cache in the background');
    const child = fork(fileURLToPath(new URL('../pipeline/optimizer.js', import.meta.url)), [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'], serialization: 'json' });
    const o = { child, files: [] as string[] };
    current = o;
    child.on('message', (m: FromOptimizer) => {
      if (m.t === 'log') log[m.level](m.obj ?? {}, m.msg);
      else if (m.t === 'files') o.files.push(...m.paths);
      else events.emit('optimized-cache-written', { outcomes: m.outcomes, ms: Math.round(performance.now() - t0) }, 'optimized model cache written');
    });
    child.on('error', (err) => log.warn({ reason: err.message }, 'the optimized model cache writer failed'));
    child.once('exit', (code, signal) => {
      if (current?.child === child) current = undefined;
      if (code !== 0 && !stopping()) log.warn({ code, signal }, 'the optimized model cache writer exited early');
    });
    child.send(init);
  };

  return {
    start(items) {
      if (items.length === 0) return;
      try {
        fork1(items);
      } catch (err) {
        // Only later starts would have gained: serving goes on.
        log.warn({ reason: (err as Error)?.message ?? String(err) }, 'could not start the optimized model cache writer');
      }
    },
    async stop() {
      const o = current;
      if (!o || o.child.exitCode !== null) return;
      const exited = new Promise((r) => o.child.once('exit', r));
      o.child.kill('SIGKILL');
      await exited;
      await removeWriterTemps(o.files);
    },
  };
}
