/**
 * @module The thread of one adapter set: it reads the adapters, merges them into copies of the components they touch
 * (lora-merge.ts), creates those sessions and runs them. One thread per set, so merging and session creation (which
 * ORT does synchronously on the calling thread) never hold up the pipeline worker's base sessions, and evicting a set
 * is ending its thread.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { RuntimeError } from '../errors.js';
import { parseAdapter } from './lora-keys.js';
import { componentBytes, planAdapterSet, writeMergedComponent } from './lora-merge.js';
import { setTooLarge } from './lora-sets.js';
import type { FromLora, LoraInit, ToLora } from './lora-protocol.js';
import { openSafetensors, type SafeTensorsFile } from './lora-safetensors.js';
import { failedReply, ioMeta, ranReply } from './thread-replies.js';
import { SessionFactory, type OnnxSession } from './onnx.js';
import { NO_OPTIMIZED_CACHE } from './ortcache.js';

const port = parentPort;
if (!port) throw new Error('lora-thread.ts must run in a worker thread');
const init = workerData as LoraInit;
const post = (m: FromLora) => port.postMessage(m);
const log = (level: 'info' | 'warn', msg: string, obj?: object) => post({ t: 'log', level, msg, obj: { set: init.key, ...(obj as Record<string, unknown>) } });

const factory = new SessionFactory({
  ep: init.provider,
  decided: init.provider,
  intraOpThreads: init.intraOpThreads,
  // The merged graphs live only as long as this thread: no optimised copy is worth writing for them.
  optimizedModelCache: NO_OPTIMIZED_CACHE,
  ...(init.graphOptimizationLevel ? { graphOptimizationLevel: init.graphOptimizationLevel } : {}),
  ...(init.deviceId !== undefined ? { deviceId: init.deviceId } : {}),
  log,
});
const sessions = new Map<number, OnnxSession>();
let next = 1;

const fail = (id: number, err: unknown) => post(failedReply(id, err));

async function build(m: Extract<ToLora, { t: 'build' }>): Promise<void> {
  const t0 = performance.now();
  // Each adapter file stays open, read tensor by tensor, until the set's components are merged.
  const opening = m.adapters.map((a) => openSafetensors(a.file, `adapter "${a.name}"`));
  try {
    await buildFrom(m, await Promise.all(opening), t0);
  } finally {
    // Every file that opened, those that opened after another had failed included.
    await Promise.allSettled(opening.map((p) => p.then((st) => st.close())));
  }
}

async function buildFrom(m: Extract<ToLora, { t: 'build' }>, files: SafeTensorsFile[], t0: number): Promise<void> {
  const adapters = m.adapters.map((a, i) => ({ parsed: parseAdapter(files[i]!, a.name), st: files[i]!, scale: a.scale }));
  const { byComponent, problems } = planAdapterSet(adapters, m.components);
  if (problems.length > 0) throw new RuntimeError('INVALID_INPUT', problems.join('; '));
  // What the sessions would hold is known from the files: a set that could never be kept is refused before its merge
  // and its sessions (on CUDA a whole UNet in the GPU memory LORA_CACHE_MB keeps free) are paid for.
  if (init.maxBytes !== undefined) {
    let need = 0;
    for (const c of byComponent.keys()) need += await componentBytes(m.components[c]!);
    if (need > init.maxBytes) throw setTooLarge(init.key, need, init.maxBytes);
  }
  const t1 = performance.now();
  const built: Extract<FromLora, { t: 'built' }>['sessions'] = [];
  let patchedBytes = 0;
  let totalBytes = 0;
  let mergeMs = 0;
  const data: string[] = [];
  for (const [component, list] of byComponent) {
    const m0 = performance.now();
    let merged = await writeMergedComponent(m.components[component]!, list, path.join(init.workDir, component));
    mergeMs += performance.now() - m0;
    let made: Awaited<ReturnType<SessionFactory['create']>>;
    try {
      made = await factory.create(component, merged.modelPath);
    } catch (err) {
      // A runtime that refuses data files with several hard links (onnx's own loader does, as a guard against link
      // attacks) gets a copy instead.
      if (merged.data !== 'linked') throw err;
      log('warn', 'ONNX Runtime refused the hard-linked weights; copying them for this set', { component, reason: String((err as Error)?.message ?? err).split('\n')[0] });
      merged = await writeMergedComponent(m.components[component]!, list, path.join(init.workDir, component), { link: false });
      made = await factory.create(component, merged.modelPath);
    }
    if (merged.data === 'copied') data.push(component);
    const id = next++;
    sessions.set(id, made.session);
    patchedBytes += merged.patchedBytes;
    totalBytes += merged.totalBytes;
    built.push({ component, session: id, inputs: ioMeta(made.session, 'inputMetadata'), outputs: ioMeta(made.session, 'outputMetadata'), ms: made.ms, weights: list.length });
  }
  // A copy costs disk and time per set: say so once per set, with what to change.
  if (data.length > 0) log('warn', 'the model\'s weights were copied for this adapter set (MODEL_CACHE_DIR is on another file system than the model, so they could not be hard-linked)', { components: data });
  post({
    t: 'built',
    id: m.id,
    sessions: built,
    patchedBytes,
    totalBytes,
    ms: { read: Math.round(t1 - t0), merge: Math.round(mergeMs), sessions: Math.round(built.reduce((n, b) => n + b.ms, 0)) },
    formats: Object.fromEntries(adapters.map((a) => [a.parsed.name, a.parsed.format])),
  });
}

async function run(m: Extract<ToLora, { t: 'run' }>): Promise<void> {
  const s = sessions.get(m.session);
  if (!s) throw new RuntimeError('INTERNAL', `no session ${m.session} on the adapter thread`);
  const out = await s.run(m.feeds, m.outputs);
  post(ranReply(m.id, out));
}

// One thing at a time: ORT creates and runs synchronously on this thread anyway.
let queue: Promise<void> = Promise.resolve();
port.on('message', (m: ToLora) => {
  switch (m.t) {
    case 'build':
      queue = queue.then(() => build(m).catch((err) => fail(m.id, err)));
      break;
    case 'run':
      queue = queue.then(() => run(m).catch((err) => fail(m.id, err)));
      break;
    case 'close':
      void queue.then(async () => {
        await Promise.allSettled([...sessions.values()].map((s) => s.release()));
        await rm(init.workDir, { recursive: true, force: true }).catch(() => undefined);
        process.exit(0);
      });
      break;
  }
});
