/**
 * One trim policy per process: malloc_trim gives back the free memory of every thread's arena, so the quiet time that
 * decides it is the process's, not a pipeline worker's. The built runtime with two real pipeline workers, one of which
 * ends a set's thread once and then stays quiet while the other keeps switching sets: no trim until both are quiet.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, postJson, tempDir, type LogLine } from './helpers/server.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';

// Longer than worker 0's switches take apart (a request each, about 3 s apart once under load ~19 with 3 s here: the
// process was then quiet for real between two, and trimmed, as it should).
const QUIET_MS = 5_000;
const TRIMMED = 'memory of ended LoRA adapter set threads given back';
const tmp = tempDir('dr-lora-trim-');
let srv: RuntimeHandle | undefined;
let memory: typeof import('../src/pipeline/lora-memory.js') | undefined;
afterAll(async () => {
  await srv?.stop();
  memory?.setProcessTrimPolicy();
  tmp.cleanup();
});

const at = (l: LogLine) => Date.parse(String(l.time));

describe('the trim policy is one per process', () => {
  // Four sets, LORA_MAX_SETS=1 per worker: a set no worker holds is built by the worker holding fewest (the first of
  // equals, runtime/engine.ts), so once each holds one, every new set goes to worker 0 and evicts its last one.
  const A = ['demo-style'];
  const B = ['demo-kohya'];
  const C = [{ name: 'demo-style', scale: 0.5 }, 'demo-kohya'];
  const D = [{ name: 'demo-style', scale: 0.25 }];

  it('a worker that ended a set thread and went quiet does not trim while the other worker still switches sets', async () => {
    memory = (await import(pathToFileURL(path.join(ROOT, 'dist', 'src', 'pipeline', 'lora-memory.js')).href)) as typeof import('../src/pipeline/lora-memory.js');
    memory.setProcessTrimPolicy({ quietMs: QUIET_MS, maxDelayMs: 600_000 });
    srv = await startRuntime({ STORAGE_URI: undefined, MODEL_CACHE_DIR: path.join(tmp.dir, 'cache'), EXECUTION_PROVIDER: 'cpu', WORKERS: '2', MAX_BATCH_SIZE: '1', LORA_MAX_SETS: '1', RESULT_CACHE_MB: '0', WARMUP_STEPS: '1' }, { ready: true });
    let k = 0;
    const predict = async (loras: unknown[]) => {
      const r = await postJson(`${srv!.url}/v1/models/model:predict`, { instances: [{ prompt: `p${k}`, seed: k++, height: 64, width: 64, num_inference_steps: 1, loras }] });
      expect(r.status, JSON.stringify(r.json)).toBe(200);
    };
    const evictions = () => srv!.logs.filter((l) => l.msg === 'adapter set evicted');
    // Each worker builds one set; then C and D at once: worker 0 builds C (evicting A) and, while it does, holds two,
    // so worker 1 builds D (evicting B): one set thread ended in each worker.
    await predict(A);
    await predict(B);
    await Promise.all([predict(C), predict(D)]);
    const quietOne = evictions().find((l) => l.worker === 1);
    expect(quietOne, JSON.stringify(evictions())).toBeDefined();
    // Worker 0 alone switches between A and C (worker 1 keeps D) until worker 1 has been quiet for well past the
    // quiet time: a trim of worker 1's own would come in the middle of this.
    const until = at(quietOne!) + QUIET_MS + 2_500;
    let n = 0;
    while (Date.now() < until) await predict(n++ % 2 === 0 ? A : C);
    const switched = evictions().filter((l) => l.worker === 0);
    const last = evictions().at(-1)!;
    expect(evictions().filter((l) => l.worker === 1), 'worker 1 ended one set thread, then stayed quiet').toHaveLength(1);
    expect(at(switched.at(-1)!) - at(quietOne!), 'worker 0 went on switching after worker 1 was quiet').toBeGreaterThan(QUIET_MS);
    // The premise: worker 0 never stopped for the quiet time (else the process was quiet and a trim right).
    const gaps = switched.slice(1).map((e, i) => at(e) - at(switched[i]!));
    expect(Math.max(...gaps), `worker 0's switches came ${gaps} ms apart`).toBeLessThan(QUIET_MS);

    const deadline = Date.now() + QUIET_MS + 15_000;
    while (!srv.logs.some((l) => l.msg === TRIMMED && at(l) > at(last)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const trims = srv.logs.filter((l) => l.msg === TRIMMED);
    const seen = `trims at ${trims.map((t) => at(t) - at(quietOne!))} ms, evictions at ${evictions().map((e) => `${at(e) - at(quietOne!)}(w${String(e.worker)})`)} ms after worker 1's`;
    // No trim ever came within the quiet time after a set thread ended in either worker (an eviction logged under
    // a second before a trim may have ended after it: those are left out).
    for (const t of trims) {
      const recent = evictions().filter((e) => at(e) <= at(t) - 1_000 && at(t) - at(e) < QUIET_MS);
      expect(recent, `a trim ${at(t) - at(quietOne!)} ms in came within ${QUIET_MS} ms of an end; ${seen}`).toEqual([]);
    }
    // Once both are quiet: a trim, the time after the last end, logged once (by the process, not a worker).
    expect(trims.filter((t) => at(t) > at(last)), seen).toHaveLength(1);
    expect(at(trims.at(-1)!) - at(last), seen).toBeGreaterThanOrEqual(QUIET_MS);
    expect(trims.at(-1)!, seen).toMatchObject({ level: 'info', rssMB: expect.any(Number), returnedMB: expect.any(Number), ms: expect.any(Number) });
    expect(trims.at(-1)!.worker).toBeUndefined();
  }, 120_000);
});
