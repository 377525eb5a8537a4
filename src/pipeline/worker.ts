/**
 * @module Worker-thread entry: owns the ONNX sessions and runs generations. ORT's run blocks the
 * thread that calls it, so none of this may run on the main thread (liveness, probes, metrics).
 * Images leave as raw pixels; the main thread encodes them (engine.ts), so sharp is not this thread's work.
 */
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { RuntimeError, isRuntimeError } from '../errors.js';
import { readLayout, type Component } from './model.js';
import { SessionFactory, loadOrt, type OnnxSession } from './onnx.js';
import { Pipeline, latentPreview } from './pipeline.js';
import { ClipTokenizer } from './tokenizer.js';
import type { FromWorker, RawImage, ToWorker, WorkerInit } from './protocol.js';

const port = parentPort;
if (!port) throw new Error('worker.ts must run in a worker thread');
const init = workerData as WorkerInit;

const post = (m: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);
const log = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) => post({ t: 'log', level, msg, obj: { worker: init.workerIndex, ...obj } });

// ORT loads now, in parallel with whatever the main thread is fetching.
const importStart = performance.now();
const imported = loadOrt().then(() => post({ t: 'imported', ms: performance.now() - importStart }));
imported.catch(() => {}); // reported by the first session creation instead

const factory = new SessionFactory({ ep: init.ep, intraOpThreads: init.intraOpThreads, optimizedModelCache: init.optimizedModelCache, log: (level, msg, obj) => log(level, msg, obj as Record<string, unknown>) });
// Loads the CUDA provider and starts its context now, while the weights still download (no-op on cpu).
void factory.prestart();
const sessions = new Map<string, Promise<OnnxSession>>();
const providers: Record<string, string> = {};
let pipeline: Pipeline | undefined;
const cancelled = new Set<number>();
// Tokenizers parse (vocab.json, merges.txt) as soon as their small files are whole, while weights still arrive.
const tokenizers = new Map<string, Promise<ClipTokenizer>>();
let queue: Promise<void> = Promise.resolve();

/** Bumped by reset(): a creation started before it reports nothing (its session is released, not used). */
let epoch = 0;

function session(component: string, path: string): Promise<OnnxSession> {
  let p = sessions.get(component);
  if (!p) {
    const mine = epoch;
    p = factory.create(component, path).then(({ session: s, provider, ms, cache }) => {
      if (mine === epoch) {
        providers[component] = provider;
        post({ t: 'session', component, provider, ms, cache });
      }
      return s;
    });
    // A failed creation is forgotten so a later load retries it.
    p.catch(() => sessions.delete(component));
    sessions.set(component, p);
  }
  return p;
}

async function load(dir: string): Promise<void> {
  try {
    const layout = readLayout(dir);
    const need: Component[] = layout.isXL ? ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder'] : ['text_encoder', 'unet', 'vae_decoder'];
    const got = await Promise.all(need.map((c) => session(c, layout.onnx[c]!)));
    const byName = new Map(need.map((c, i) => [c, got[i]!] as const));
    pipeline = await Pipeline.create(layout, {
      text_encoder: byName.get('text_encoder')!,
      unet: byName.get('unet')!,
      vae_decoder: byName.get('vae_decoder')!,
      ...(byName.has('text_encoder_2') ? { text_encoder_2: byName.get('text_encoder_2')! } : {}),
    }, tokenizers);
    const fallbackReason = factory.fallbackReason;
    post({ t: 'loaded', defaults: pipeline.defaults(), providers: { ...providers }, ...(fallbackReason ? { fallbackReason } : {}), optimize: factory.deferredWrites.splice(0) });
  } catch (err) {
    post({ t: 'load-failed', code: isRuntimeError(err) ? err.code : 'MODEL_FORMAT', message: (err as Error).message ?? String(err) });
  }
}

/** Forgets every session and tokenizer (the files they came from were replaced); the next load starts afresh. */
async function reset(): Promise<void> {
  epoch++;
  const all = [...sessions.values()];
  sessions.clear();
  tokenizers.clear();
  pipeline = undefined;
  await Promise.allSettled(all.map(async (s) => (await s).release()));
  // After the old creations have settled, so none of them puts anything back.
  for (const k of Object.keys(providers)) delete providers[k];
  factory.deferredWrites.splice(0);
}

async function generate(m: Extract<ToWorker, { t: 'generate' }>): Promise<void> {
  const { id } = m;
  try {
    if (!pipeline) throw new RuntimeError('MODEL_NOT_READY', 'the model is not loaded');
    const p = pipeline;
    const { height, width } = m.job.shape;
    const vsf = p.layout.vae.scaleFactor;
    const { images, times } = await p.generate(m.job, {
      cancelled: () => cancelled.has(id),
      onStep: (step, of, latents) => {
        let previews: RawImage[] | undefined;
        if (m.previewEvery > 0 && (step % m.previewEvery === 0 || step === of)) {
          const h = height / vsf;
          const w = width / vsf;
          const per = 4 * h * w;
          previews = [];
          // One preview per item (its first image), so each request of a batch watches its own latents.
          let image = 0;
          for (const item of m.job.items) {
            previews.push({ rgb: ownBuffer(latentPreview(latents.subarray(image * per, (image + 1) * per), h, w)), width: w, height: h });
            image += item.numImages;
          }
        }
        post({ t: 'progress', id, step, of, ...(previews ? { previews } : {}) }, previews?.map((p) => p.rgb) ?? []);
      },
    });
    const raw = images.map((img) => ({ rgb: ownBuffer(img.rgb), width: img.width, height: img.height, seed: img.seed }));
    post({ t: 'result', id, images: raw, times }, raw.map((r) => r.rgb));
  } catch (err) {
    const code = isRuntimeError(err) ? err.code : 'INTERNAL';
    if (!isRuntimeError(err)) log('error', 'generation failed', { err: String((err as Error)?.stack ?? err) });
    post({ t: 'error', id, code, message: isRuntimeError(err) ? err.message : 'generation failed' });
  } finally {
    cancelled.delete(id);
  }
}

/** The bytes of `a` as a buffer of their own, so transferring it moves nothing else. */
function ownBuffer(a: Uint8Array): ArrayBuffer {
  return a.byteOffset === 0 && a.byteLength === a.buffer.byteLength ? (a.buffer as ArrayBuffer) : (a.slice().buffer as ArrayBuffer);
}

port.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'component':
      session(m.component, m.path).catch(() => {}); // reported by load
      break;
    case 'tokenizer': {
      const dir = path.resolve(m.dir);
      if (!tokenizers.has(dir)) {
        const p = ClipTokenizer.load(dir);
        p.catch(() => tokenizers.delete(dir)); // reported by load, which retries
        tokenizers.set(dir, p);
      }
      break;
    }
    case 'load':
      queue = queue.then(() => load(m.dir));
      break;
    case 'reset':
      queue = queue.then(reset);
      break;
    case 'generate':
      queue = queue.then(() => generate(m));
      break;
    case 'cancel':
      cancelled.add(m.id);
      break;
    case 'close':
      void queue.then(async () => {
        await Promise.allSettled([...sessions.values()].map(async (s) => (await s).release()));
        process.exit(0);
      });
      break;
  }
});
