/**
 * @module Worker-thread entry: owns the ONNX sessions and runs generations. ORT's run blocks the
 * thread that calls it, so none of this may run on the main thread (liveness, probes, metrics).
 * Images leave as raw pixels; the main thread encodes them (engine.ts), so sharp is not this thread's work, and
 * prompts arrive as token ids the main thread encoded, so neither is the tokenizer (it parsed there meanwhile).
 */
import { mkdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { asShortage, REQUEST_ADVICE } from '../descriptors.js';
import { RuntimeError, isRuntimeError } from '../errors.js';
import { AuxClient } from './aux-client.js';
import { Cancels } from './cancels.js';
import { auxThreadOf, type AuxThread } from './aux-placement.js';
import { exportInfo, needsCudaError, slowPathWarning, type ExportInfo } from './export-info.js';
import { readLayout, type Component } from './model.js';
import { SessionFactory, loadOrt, type ModelSession } from './onnx.js';
import { primeSpec } from './prime.js';
import { fusedIsFast, onGpu, type SessionProvider } from './provider.js';
import { Pipeline, latentPreview, type NoiseMaker } from './pipeline.js';
import { nativeRandn } from './random.js';
import type { AdapterRef } from './job.js';
import type { FromWorker, ToWorker, TransferImage, WorkerInit } from './protocol.js';
import { LORA_COMPONENTS } from './lora-keys.js';
import { failureReply, loadError } from './failures.js';
import { LoraSetThread } from './lora-client.js';
import { AdapterSetCache, setTooLarge, type CachedSet } from './lora-sets.js';

const port = parentPort;
if (!port) throw new Error('worker.ts must run in a worker thread');
const init = workerData as WorkerInit;

const post = (m: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);
const log = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) =>
  post({ t: 'log', level, msg, obj: { worker: init.workerIndex, ...(init.deviceId !== undefined ? { device: init.deviceId } : {}), ...obj } });

// ORT loads now, in parallel with whatever the main thread is fetching.
const importStart = performance.now();
const imported = loadOrt().then(() => post({ t: 'imported', ms: performance.now() - importStart, randn: nativeRandn?.path ?? 'javascript' }));
imported.catch(() => {}); // reported by the first session creation instead

const factory = new SessionFactory({
  ep: init.ep,
  intraOpThreads: init.intraOpThreads,
  optimizedModelCache: init.optimizedModelCache,
  ...(init.graphOptimizationLevel ? { graphOptimizationLevel: init.graphOptimizationLevel } : {}),
  ...(init.deviceId !== undefined ? { deviceId: init.deviceId } : {}),
  log: (level, msg, obj) => log(level, msg, obj as Record<string, unknown>),
});
// Loads the CUDA provider and starts its context now, while the weights still download (no-op on cpu).
void factory.prestart();
const sessions = new Map<string, Promise<ModelSession>>();
/**
 * The auxiliary session threads (aux.ts) by name; which component goes to which, and when, is aux-placement.ts's. The
 * UNet stays on this thread.
 * The text encoders, the VAE encoder (image input) and the VAE decoder get a thread each, as a thread runs one thing
 * at a time: on CUDA each one's first run is a kernel search (the decoder's ~1 s at 512×512, the encoder's ~0.6 s),
 * and none of them may hold up another's priming or a request's run (the warm-up's text encoding, an image request's
 * encoding behind the previous batch's decode). On the CPU (AUX_THREADS=auto) they stay on this thread: ORT's intra-op
 * pool already spreads a run over the cores, and the threads' starts cost a 2-core boot more than they overlap.
 */
const aux = new Map<AuxThread, AuxClient>();
/** A generation (the first is the warm-up) has ended since these sessions were made. */
let generated = false;

/**
 * Resolves once every auxiliary thread has done what it was asked for before, its priming runs among them: the warm-up
 * (and a load whose last sessions came after it) ends only then, so ready means every session is primed. `release`: the
 * warm-up has ended, so the priming runs held for that (WARMUP_VAE_ENCODER=after-ready) run now.
 */
async function settleAux(release: boolean): Promise<void> {
  await Promise.all([...aux.values()].map((c) => c.settle(release).catch(() => 0)));
}
/** The export kind per model folder, read once (the manifest is a layout file, whole before any session starts). */
const exports = new Map<string, ExportInfo>();
let slowPathLogged = false;
const providers: Record<string, SessionProvider> = {};
/** `partial`: loaded from the listing while weights still download (load's `listed`); `dir` as given to load. */
let pipeline: (Pipeline & { partial?: boolean; dir?: string }) | undefined;
const cancels = new Cancels();
let queue: Promise<void> = Promise.resolve();

/** LoRA adapter sets: each one's merged sessions live on a thread of its own (lora-thread.ts). */
interface AdapterSet {
  thread: LoraSetThread;
  pipeline: Pipeline;
}
const adapterSets = new AdapterSetCache<AdapterSet>({ maxSets: init.lora?.maxSets ?? 2, maxBytes: init.lora?.maxBytes ?? 4096 * 2 ** 20 });
const building = new Map<string, Promise<CachedSet<AdapterSet>>>();

/** Bumped by reset(): a creation started before it reports nothing (its session is released, not used). */
let epoch = 0;
/** `reset` messages not yet run (they wait in the queue behind a running generation). */
let resetsQueued = 0;
/**
 * The model (its folder, in this epoch) whose config rewrites were logged: a model is loaded as listed, then whole, and
 * the operator should read each rewrite once.
 */
let rewritesLoggedFor: string | undefined;

/**
 * Components whose files are whole ('component' messages), and the waits of a pipeline loaded before them (a
 * warm-up that starts while weights download awaits its later sessions through these).
 */
const announced = new Map<string, string>();
const awaiting = new Map<string, Array<{ resolve: (p: string) => void; reject: (e: unknown) => void }>>();

function whenAnnounced(component: string): Promise<string> {
  const p = announced.get(component);
  if (p !== undefined) return Promise.resolve(p);
  return new Promise((resolve, reject) => {
    if (!awaiting.has(component)) awaiting.set(component, []);
    awaiting.get(component)!.push({ resolve, reject });
  });
}

/** A cancelled warm-up, a reset or close: whatever waits for a component that may never come gives up. */
function abandonWaits(why: string): void {
  const err = new RuntimeError('CANCELLED', why);
  for (const ws of awaiting.values()) for (const w of ws) w.reject(err);
  awaiting.clear();
  // A pipeline that was waiting can no longer finish; the next load builds one from the files.
  if (pipeline?.partial) pipeline = undefined;
}

function session(component: string, file: string): Promise<ModelSession> {
  let p = sessions.get(component);
  if (!p) {
    const mine = epoch;
    p = create(component, file).catch(async (err: unknown) => {
      throw await loadError(component, file, err);
    }).then(({ session: s, provider, ms, cache, thread }) => {
      if (mine === epoch) {
        providers[component] = provider;
        post({ t: 'session', component, provider, ms, cache, thread });
      }
      return s;
    });
    // A failed creation is forgotten so a later load retries it.
    p.catch(() => sessions.delete(component));
    sessions.set(component, p);
  }
  return p;
}

/** One component's session: the UNet on this thread, the others on their auxiliary thread, after the export checks. */
async function create(component: string, modelPath: string): Promise<{ session: ModelSession; provider: SessionProvider; ms: number; cache: string; thread: string }> {
  const provider = await factory.provider();
  const dir = path.dirname(path.dirname(modelPath));
  const info = exportOf(dir);
  const cudaOnly = info.cudaOnlyOps[component] ?? [];
  if (!onGpu(provider) && (cudaOnly.length > 0 || (info.variant === 'fused' && info.source === 'manifest' && component === 'unet'))) {
    throw needsCudaError(component, cudaOnly.length > 0 ? cudaOnly : ['fused operators'], `${info.source === 'manifest' ? 'onnx_export.json' : 'its graph'} says so`, factory.fallbackReason);
  }
  const thread = auxThreadOf(component, provider, init.auxThreads);
  if (thread === undefined) {
    const made = await factory.create(component, modelPath);
    if (fusedIsFast(provider) && component === 'unet') logSlowPath(info);
    return { ...made, thread: 'worker' };
  }
  let client = aux.get(thread);
  if (!client) {
    const init_ = {
      intraOpThreads: init.intraOpThreads,
      optimizedModelCache: init.optimizedModelCache,
      ...(init.graphOptimizationLevel ? { graphOptimizationLevel: init.graphOptimizationLevel } : {}),
      ...(init.deviceId !== undefined ? { deviceId: init.deviceId } : {}),
    };
    client = new AuxClient({ ...init_, name: thread }, log, (err) => {
      // Its sessions died with it: this worker cannot generate any more, and the engine replaces a worker that exits.
      log('error', 'an auxiliary session thread died; the pipeline worker exits', { thread, reason: err.message });
      process.exit(1);
    });
    aux.set(thread, client);
  }
  const prime = onGpu(provider) ? primeSpec(dir, component, init.vaeEncoderWarmup ?? 'before-ready') : undefined;
  const r = await client.create(component, modelPath, provider, prime);
  factory.cacheOutcomes[modelPath] = r.cache as never;
  if (r.deferred && !factory.deferredWrites.some((w) => w.path === modelPath)) factory.deferredWrites.push(r.deferred);
  return { session: r.session, provider, ms: r.ms, cache: r.cache, thread };
}

function exportOf(dir: string): ExportInfo {
  let info = exports.get(dir);
  if (!info) {
    info = exportInfo(dir);
    // A UNet graph still downloading gives no verdict yet: ask again for the next session.
    if (info.source !== 'none') exports.set(dir, info);
  }
  return info;
}

/** Once per worker: a UNet not fused, on the provider the fused export is made for (fusedIsFast), runs on the slow path, and the operator should know why. */
function logSlowPath(info: ExportInfo): void {
  const warning = slowPathWarning(info);
  if (slowPathLogged || !warning) return;
  slowPathLogged = true;
  log('warn', 'the UNet is not fused for CUDA: slow path', warning);
}

/**
 * Builds the pipeline of `dir`. With `listed` (the model's files as listed, weights still arriving): the layout comes
 * from the listing and each session is awaited where a generation first needs it, so 'loaded' is sent once the UNet
 * exists and a warm-up can encode and denoise while the rest downloads. Without it, every session first.
 */
async function load(dir: string, listed?: string[]): Promise<void> {
  try {
    const layout = readLayout(dir, listed ? new Set(listed) : undefined);
    const logKey = `${epoch}:${path.resolve(dir)}`;
    if (rewritesLoggedFor !== logKey) for (const r of layout.rewrites) log('warn', r.message, { config: r.key, from: r.from, to: r.to });
    rewritesLoggedFor = logKey;
    const need: Component[] = layout.isXL ? ['text_encoder', 'text_encoder_2', 'unet', 'vae_decoder'] : ['text_encoder', 'unet', 'vae_decoder'];
    // Image-to-image and inpainting encode their input with it: ready means ready for those requests too.
    if (layout.onnx.vae_encoder) need.push('vae_encoder');
    const get = (c: Component): Promise<ModelSession> => {
      if (!listed) return session(c, layout.onnx[c]!);
      const p = whenAnnounced(c).then((file) => session(c, file));
      p.catch(() => {}); // awaited by generate and ready(), which report it
      return p;
    };
    const byName = new Map(need.map((c) => [c, get(c)] as const));
    if (!listed) await Promise.all(byName.values());
    const p: NonNullable<typeof pipeline> = await Pipeline.create(layout, {
      text_encoder: byName.get('text_encoder')!,
      unet: byName.get('unet')!,
      vae_decoder: byName.get('vae_decoder')!,
      ...(byName.has('text_encoder_2') ? { text_encoder_2: byName.get('text_encoder_2')! } : {}),
      ...(byName.has('vae_encoder') ? { vae_encoder: byName.get('vae_encoder')! } : {}),
    }, 'external');
    p.partial = listed !== undefined;
    p.dir = dir;
    pipeline = p;
    postLoaded(p);
  } catch (err) {
    postLoadFailed(err);
  }
}

/** A partial pipeline of `dir` whose files are all whole now: 'loaded' once its last sessions exist. */
async function complete(p: NonNullable<typeof pipeline>): Promise<void> {
  try {
    await p.ready();
    // Sessions made after a warm-up begun early are primed before the load counts as done (and ready with it); one
    // held for the warm-up's end (its files came after it) is released once the load is reported.
    await settleAux(false);
    p.partial = false;
    postLoaded(p);
    if (generated) void settleAux(true);
  } catch (err) {
    postLoadFailed(err);
  }
}

function postLoaded(p: NonNullable<typeof pipeline>): void {
  const fallbackReason = factory.fallbackReason;
  // The writes to defer are handed over once, with the load that has every session (a partial one has not).
  const optimize = p.partial ? [] : factory.deferredWrites.splice(0);
  post({ t: 'loaded', defaults: p.defaults(), tokenizerDirs: p.layout.tokenizerDirs.map((d) => path.resolve(d)), providers: { ...providers }, ...(fallbackReason ? { fallbackReason } : {}), optimize });
}

function postLoadFailed(err: unknown): void {
  // The errno of a volume's failure goes along: whether a boot tries again depends on it (boot-retry.ts).
  const errno = isRuntimeError(err) && err.code === 'CACHE_IO' ? (err.cause as NodeJS.ErrnoException | undefined)?.code : undefined;
  post({ t: 'load-failed', code: isRuntimeError(err) ? err.code : 'MODEL_FORMAT', message: (err as Error).message ?? String(err), ...(errno ? { errno } : {}) });
}

/** Forgets every session (the files they came from were replaced); the next load starts afresh. */
async function reset(): Promise<void> {
  resetsQueued--;
  epoch++;
  abandonWaits('the model files changed');
  announced.clear();
  exports.clear();
  const all = [...sessions.values()];
  sessions.clear();
  pipeline = undefined;
  // The sessions made next wait for the next warm-up.
  generated = false;
  await dropAdapterSets();
  await Promise.allSettled(all.map(async (s) => (await s).release()));
  // After the old creations have settled, so none of them puts anything back.
  for (const k of Object.keys(providers)) delete providers[k];
  factory.deferredWrites.splice(0);
}

let noiseLogged = false;

/**
 * DPM++ SDE's Brownian noise is made on the text encoders' thread, where there is one (AUX_THREADS), during each UNet
 * run: that thread is idle while this one denoises, and the noise costs milliseconds of CPU per run and image. A
 * failure there only moves the work back here, for the rest of the generation.
 */
function noiseMaker(): NoiseMaker | undefined {
  const client = aux.get('encode');
  if (!client) return undefined;
  let asked = false;
  let failed = false;
  return {
    make: async (query) => {
      if (failed) return undefined;
      asked = true;
      try {
        const z = await client.noise(query);
        if (!noiseLogged) log('info', 'DPM++ SDE noise is made on an auxiliary thread during the UNet runs', { thread: 'encode' });
        noiseLogged = true;
        return z;
      } catch (err) {
        failed = true;
        log('warn', 'the auxiliary thread could not make DPM++ SDE noise; the worker makes it', { reason: String((err as Error)?.message ?? err) });
        return undefined;
      }
    },
    done: () => {
      if (asked) void client.forgetNoise();
    },
  };
}

/** `denoised`: called once the UNet is free (after its last step, or when the generation ends before that). */
async function generate(m: Extract<ToWorker, { t: 'generate' }>, denoised: () => void): Promise<void> {
  const { id } = m;
  // The first generation of these sessions to succeed is the warm-up (a reset while it runs makes it another's; one
  // that fails leaves the part to the next, as the boot warms up again).
  const mine = epoch;
  let set: CachedSet<AdapterSet> | undefined;
  const unuse = () => {
    if (!set) return;
    set.inUse--;
    set = undefined;
    // A set held over the limits by this generation can go now.
    for (const s of adapterSets.evictable()) void evict(s);
  };
  try {
    if (!pipeline) throw new RuntimeError('MODEL_NOT_READY', 'the model is not loaded');
    let p = pipeline;
    if (m.adapters) {
      // Built already, unless it was evicted after the engine was told it was ready (then it is built again here).
      set = await adapterSet(m.adapters.key, m.adapters.refs);
      set.inUse++;
      p = set.value.pipeline;
    }
    const { height, width } = m.job.shape;
    const vsf = p.layout.vae.scaleFactor;
    const noise = noiseMaker();
    const { images, times } = await p.generate(m.job, {
      ...(noise ? { noise } : {}),
      cancelled: () => cancels.has(id),
      onDenoised: () => {
        unuse();
        post({ t: 'denoised', id });
        denoised();
      },
      onStep: (step, of, latents) => {
        let previews: TransferImage[] | undefined;
        if (m.previewEvery > 0 && (step % m.previewEvery === 0 || step === of) && cancels.previewing(id)) {
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
    if (mine === epoch && !generated) {
      // Ready only once every session is primed; what waits for the warm-up's end is released at once.
      generated = true;
      await settleAux(true);
    }
    post({ t: 'result', id, images: raw, times }, raw.map((r) => r.rgb));
  } catch (err) {
    // An allocation failure, here or on an auxiliary thread (which answers it as INTERNAL): the engine reruns a batch
    // of several requests one by one, and logs it once with the shape (engine.ts). A defect's text goes to the engine
    // too, which logs it with the ids of the batch's requests.
    const { code, message, detail } = failureReply(err, 'generation failed', 'the generation ran out of memory');
    post({ t: 'error', id, code, message, ...(detail !== undefined ? { detail } : {}) });
  } finally {
    unuse();
    cancels.end(id);
  }
}

/**
 * The adapter set `key` of the loaded model: the cached one, the one being built, or a new build. Its sessions are the
 * base model's except for the components the adapters touch, which are merged and created on the set's own thread.
 */
function adapterSet(key: string, refs: AdapterRef[]): Promise<CachedSet<AdapterSet>> {
  const cached = adapterSets.get(key);
  if (cached) return Promise.resolve(cached);
  let b = building.get(key);
  if (!b) {
    b = buildSet(key, refs);
    building.set(key, b);
    const forget = () => building.delete(key);
    b.then(forget, forget);
  }
  return b;
}

async function buildSet(key: string, refs: AdapterRef[]): Promise<CachedSet<AdapterSet>> {
  const base = pipeline;
  if (!base || base.partial) throw new RuntimeError('MODEL_NOT_READY', 'the model is not loaded');
  if (init.lora?.maxSets === 0) throw new RuntimeError('INVALID_INPUT', 'LoRA adapters are turned off on this server (LORA_MAX_SETS=0)');
  const mine = epoch;
  const t0 = performance.now();
  const provider = await factory.provider();
  const workDir = await loraWorkDir();
  const thread = new LoraSetThread({ key, provider, intraOpThreads: init.intraOpThreads, workDir, maxBytes: adapterSets.maxBytes, ...(init.deviceId !== undefined ? { deviceId: init.deviceId } : {}), ...(init.graphOptimizationLevel ? { graphOptimizationLevel: init.graphOptimizationLevel } : {}) }, log);
  try {
    const layout = base.layout;
    const graphs = Object.fromEntries(LORA_COMPONENTS.filter((c) => layout.onnx[c] !== undefined).map((c) => [c, layout.onnx[c]!]));
    const { built, sessions: merged } = await thread.build(refs, graphs);
    if (!adapterSets.fits(built.totalBytes)) throw setTooLarge(key, built.totalBytes, adapterSets.maxBytes);
    // Every other session (the VAE decoder and encoder) is the base pipeline's.
    const p = await base.withSessions(Object.fromEntries(merged));
    // The model files changed while this set was built: it belongs to the old ones.
    if (mine !== epoch) throw new RuntimeError('MODEL_NOT_READY', 'the model was reloaded while the adapter set was built');
    const total = performance.now() - t0;
    const components = built.sessions.map((s) => s.component);
    log('info', 'adapter set built', { set: key, components, weights: built.sessions.reduce((n, s) => n + s.weights, 0), mergedMB: mb(built.totalBytes), patchedMB: mb(built.patchedBytes), formats: built.formats, ms: { ...built.ms, total: Math.round(total) } });
    const entry = { thread, pipeline: p };
    for (const s of adapterSets.add(key, built.totalBytes, entry)) void evict(s);
    const cached = adapterSets.get(key)!;
    post({ t: 'adapters-ready', key, ms: { ...built.ms, total: Math.round(total) }, bytes: built.totalBytes, patchedBytes: built.patchedBytes, components, formats: built.formats });
    return cached;
  } catch (err) {
    await thread.close();
    throw err;
  }
}

const mb = (bytes: number) => Math.round((bytes / 2 ** 20) * 10) / 10;

/**
 * A new folder for one set's merged graphs: `<workDir>/w<worker>/<n>`, where workDir is this process's folder under
 * `<MODEL_CACHE_DIR>/.lora-sets/` (the runtime leases it and sweeps the folders of processes gone: runtime/workers.ts),
 * on the file system of the cached model, so the unchanged weights are hard links, not copies. A worker started again
 * in the same process clears what its predecessor left.
 */
let workRoot: Promise<string> | undefined;
let workSeq = 0;
async function loraWorkDir(): Promise<string> {
  workRoot ??= (async () => {
    const base = init.lora?.workDir ?? path.join(os.tmpdir(), 'diffusers-runtime-lora', String(process.pid));
    const root = path.join(base, `w${init.workerIndex}`);
    await rm(root, { recursive: true, force: true });
    await mkdir(root, { recursive: true });
    return root;
  })();
  return path.join(await workRoot, String(++workSeq));
}

async function evict(s: CachedSet<AdapterSet>): Promise<void> {
  log('info', 'adapter set evicted', { set: s.key, mergedMB: mb(s.bytes), cached: adapterSets.size });
  post({ t: 'adapters-evicted', key: s.key });
  await s.value.thread.close();
}

async function dropAdapterSets(): Promise<void> {
  const all = adapterSets.values();
  for (const s of all) {
    adapterSets.delete(s.key);
    post({ t: 'adapters-evicted', key: s.key });
  }
  await Promise.allSettled(all.map((s) => s.value.thread.close()));
}

/** The bytes of `a` as a buffer of their own, so transferring it moves nothing else. */
function ownBuffer(a: Uint8Array): ArrayBuffer {
  return a.byteOffset === 0 && a.byteLength === a.buffer.byteLength ? (a.buffer as ArrayBuffer) : (a.slice().buffer as ArrayBuffer);
}

port.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'component': {
      announced.set(m.component, m.path);
      for (const w of awaiting.get(m.component)?.splice(0) ?? []) w.resolve(m.path);
      session(m.component, m.path).catch(() => {}); // reported by load
      break;
    }
    case 'load':
      // The files of a partial pipeline are whole: no need to wait for the warm-up that may be running on it.
      if (!m.listed && pipeline?.partial && path.resolve(pipeline.dir!) === path.resolve(m.dir) && resetsQueued === 0) void complete(pipeline);
      else queue = queue.then(() => load(m.dir, m.listed));
      break;
    case 'reset':
      resetsQueued++;
      queue = queue.then(reset);
      break;
    case 'generate':
      // Held from now: a cancel while it waits behind another generation stops it before its first step.
      cancels.begin(m.id);
      // The next message waits only for this generation's UNet steps: its VAE decodes overlap what comes next.
      queue = queue.then(
        () =>
          new Promise<void>((free) => {
            void generate(m, free).finally(free);
          }),
      );
      break;
    case 'adapters':
      // Beside the queue: the base model goes on serving while the set is merged on its own thread.
      adapterSet(m.key, m.refs).then(
        () => undefined,
        (failure: unknown) => post({
          t: 'adapters-failed',
          key: m.key,
          ...failureReply(asShortage(failure, 'the adapter set could not be built', REQUEST_ADVICE), 'the adapter set could not be built',
            'out of memory while the LoRA adapter set was built (its merged weights and sessions): hold fewer sets (LORA_MAX_SETS) or use a bigger GPU'),
        }),
      );
      break;
    case 'cancel':
      cancels.cancel(m.id);
      // Only a warm-up started during the download can be waiting for a component: it stops now.
      abandonWaits('generation cancelled');
      break;
    case 'resume':
      cancels.resume(m.id);
      break;
    case 'previews':
      cancels.previews(m.id, m.on);
      break;
    case 'close':
      abandonWaits('the worker is closing');
      void queue.then(async () => {
        await Promise.allSettled([...sessions.values()].map(async (s) => (await s).release()));
        await Promise.all([...aux.values()].map((a) => a.close()));
        await dropAdapterSets();
        process.exit(0);
      });
      break;
  }
});
