/**
 * @module Worker-thread entry that writes optimised-model copies (ortcache.ts) in the background after ready. ORT
 * builds the throwaway session synchronously, for seconds on a large graph, so it runs on its own thread: requests
 * on the pipeline workers never wait for it. One component at a time, one intra-op thread, sessions released at once.
 */
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { loadOrt, sessionOptions } from './onnx.js';
import { writeOptimizedCopy } from './ortcache.js';
import type { FromOptimizer, OptimizerInit } from './protocol.js';

const port = parentPort;
if (!port) throw new Error('optimizer.ts must run in a worker thread');
const init = workerData as OptimizerInit;
const post = (m: FromOptimizer) => port.postMessage(m);

const ort = await loadOrt();
const outcomes: Record<string, string> = {};
for (const item of init.items) {
  const component = path.basename(path.dirname(item.path));
  const options = sessionOptions(item.provider, { intraOpThreads: 1, ...(item.deviceId !== undefined ? { deviceId: item.deviceId } : {}) });
  try {
    outcomes[component] = await writeOptimizedCopy(ort, item.path, item.provider, options, (level, msg, obj) => post({ t: 'log', level, msg, obj: obj as Record<string, unknown> }), init.mode);
  } catch (err) {
    // writeOptimizedCopy reports its own failures; this is only a bug's last line.
    outcomes[component] = 'failed';
    post({ t: 'log', level: 'warn', msg: 'could not write the optimized model cache', obj: { component, reason: String((err as Error)?.message ?? err).split('\n')[0] } });
  }
}
post({ t: 'done', outcomes });
