/**
 * @module Child-process entry that writes optimised-model copies (ortcache.ts) in the background after ready. ORT
 * builds the throwaway session synchronously, for seconds on a large graph, and native code cannot be interrupted:
 * in a worker thread it would hold up the server's exit on SIGTERM. A child process can be killed at once. One
 * component at a time, one intra-op thread, sessions released at once. The runtime sends one OptimizerInit.
 */
import path from 'node:path';
import { loadOrt, sessionOptions } from './onnx.js';
import { writeOptimizedCopy } from './ortcache.js';
import type { FromOptimizer, OptimizerInit } from './protocol.js';

if (!process.send) throw new Error('optimizer.js runs as a child process of the runtime (child_process.fork)');
const send = (m: FromOptimizer) => process.send!(m);

async function run(init: OptimizerInit): Promise<void> {
  const ort = await loadOrt();
  const outcomes: Record<string, string> = {};
  for (const item of init.items) {
    const component = path.basename(path.dirname(item.path));
    const options = sessionOptions(item.provider, { intraOpThreads: 1, ...(item.deviceId !== undefined ? { deviceId: item.deviceId } : {}) });
    try {
      const log = (level: 'info' | 'warn', msg: string, obj?: object) => send({ t: 'log', level, msg, obj: obj as Record<string, unknown> });
      outcomes[component] = await writeOptimizedCopy(ort, item.path, item.provider, options, log, init.policy, (paths) => send({ t: 'files', paths }));
    } catch (err) {
      // writeOptimizedCopy reports its own failures; this is only a bug's last line.
      outcomes[component] = 'failed';
      send({ t: 'log', level: 'warn', msg: 'could not write the optimized model cache', obj: { component, reason: String((err as Error)?.message ?? err).split('\n')[0] } });
    }
  }
  send({ t: 'done', outcomes });
}

// The runtime went away: there is nobody left to write for.
process.once('disconnect', () => process.exit(0));
process.once('message', (init: OptimizerInit) => {
  void run(init).finally(() => process.disconnect());
});
