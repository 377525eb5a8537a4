/**
 * @module An auxiliary session thread of a pipeline worker: each owns the text encoders, the VAE encoder or the VAE
 * decoder (worker.ts ON_AUX), the worker owns the UNet. ORT runs a session synchronously on the thread that calls it,
 * so with one thread a boot creates every session in turn and a warm-up pays each first run in turn. On these threads
 * the small sessions are created, and on CUDA run once on zeros (cuDNN's algorithm search, lazy kernel loads), while
 * the worker still builds the UNet; the warm-up generation then only pays the UNet's first run. A session no
 * text-to-image request uses (the VAE encoder) can be primed once the worker's warm-up has ended instead, off the path
 * to ready.
 */
import { parentPort, workerData, type TransferListItem } from 'node:worker_threads';
import { BrownianNoise, sameSpec } from './brownian.js';
import { SessionFactory, type Feed, type OnnxSession } from './onnx.js';
import type { AuxInit, FromAux, PrimeSpec, ToAux } from './protocol.js';
import type { SessionProvider } from './provider.js';
import { failedReply, ioMeta, ranReply } from './thread-replies.js';

const port = parentPort;
if (!port) throw new Error('aux.ts must run in a worker thread');
const init = workerData as AuxInit;
const post = (m: FromAux, transfer: TransferListItem[] = []) => port.postMessage(m, transfer);
const log = (level: 'info' | 'warn', msg: string, obj?: object) => post({ t: 'log', level, msg, obj: { thread: init.name, ...(obj as Record<string, unknown>) } });

const factories = new Map<SessionProvider, SessionFactory>();
const sessions = new Map<number, OnnxSession>();
let next = 1;

function factory(provider: SessionProvider): SessionFactory {
  let f = factories.get(provider);
  if (!f) {
    f = new SessionFactory({
      ep: provider,
      decided: provider,
      intraOpThreads: init.intraOpThreads,
      optimizedModelCache: init.optimizedModelCache,
      ...(init.graphOptimizationLevel ? { graphOptimizationLevel: init.graphOptimizationLevel } : {}),
      ...(init.deviceId !== undefined ? { deviceId: init.deviceId } : {}),
      log,
    });
    factories.set(provider, f);
  }
  return f;
}

/** Zeros at the served size for each input the component is known to take; undefined for anything else. */
function primeFeeds(component: string, s: OnnxSession, p: PrimeSpec): Record<string, Feed> | undefined {
  const dim = (name: string, i: number, dflt: number) => {
    const d = s.inputs.get(name)?.shape[i];
    return typeof d === 'number' && d > 0 ? d : dflt;
  };
  const zeros = (dims: number[]): Feed => ({ data: new Float32Array(dims.reduce((a, b) => a * b, 1)), dims });
  if (component.startsWith('text_encoder') && s.has('input_ids')) {
    const n = dim('input_ids', 1, 77);
    return { input_ids: { data: new Array<number>(n).fill(0), dims: [1, n] } };
  }
  if (component === 'vae_decoder' && s.has('latent_sample')) return { latent_sample: zeros([1, dim('latent_sample', 1, 4), p.latentHeight, p.latentWidth]) };
  if (component === 'vae_encoder' && s.has('sample')) return { sample: zeros([1, dim('sample', 1, 3), p.latentHeight * p.vaeScale, p.latentWidth * p.vaeScale]) };
  return undefined;
}

const fail = (id: number, err: unknown) => post(failedReply(id, err));

/** Priming runs held until the worker says its warm-up has ended (`after: 'warm-up'`, `settle`), by session id. */
const held = new Map<number, { component: string; feeds: Record<string, Feed> }>();

/**
 * Creates the session and answers at once. Its priming run goes to the end of this thread's queue, behind the
 * creations already asked for (a load asks for all its sessions together): the load waits for every session to
 * exist, not for another's kernel search, and a run asked for after the answer still finds the session primed.
 */
async function create(m: Extract<ToAux, { t: 'create' }>): Promise<void> {
  let id: number | undefined;
  try {
    const f = factory(m.provider);
    const made = await f.create(m.component, m.path);
    const sid = (id = next++);
    sessions.set(sid, made.session);
    const feeds = m.prime ? primeFeeds(m.component, made.session, m.prime) : undefined;
    if (feeds && m.prime?.after === 'warm-up') held.set(sid, { component: m.component, feeds });
    else if (feeds) queue = queue.then(() => prime(sid, m.component, feeds));
    const deferred = f.deferredWrites.find((w) => w.path === m.path);
    post({ t: 'created', id: m.id, session: sid, inputs: ioMeta(made.session, 'inputMetadata'), outputs: ioMeta(made.session, 'outputMetadata'), ms: made.ms, cache: made.cache, ...(deferred ? { deferred } : {}) });
  } catch (err) {
    // A session made before the failure is not the client's: it must not outlive the answer.
    if (id !== undefined) await sessions.get(id)?.release().catch(() => undefined);
    if (id !== undefined) sessions.delete(id);
    return fail(m.id, err);
  }
}

async function prime(id: number, component: string, feeds: Record<string, Feed>): Promise<void> {
  const s = sessions.get(id);
  if (!s) return; // released before its turn
  const t0 = performance.now();
  try {
    await s.run(feeds);
    log('info', 'session primed', { component, ms: Math.round(performance.now() - t0) });
  } catch (err) {
    // Only the first real run gets slower; that run reports a real failure itself.
    log('warn', 'priming run failed', { component, reason: String((err as Error)?.message ?? err).split('\n')[0] });
  }
}

async function run(m: Extract<ToAux, { t: 'run' }>): Promise<void> {
  // A run at the priming size pays the session's kernel search itself: the priming run held for it would repeat it.
  const h = held.get(m.session);
  if (h && Object.entries(h.feeds).every(([k, f]) => sameDims(m.feeds[k]?.dims, f.dims))) held.delete(m.session);
  try {
    const s = sessions.get(m.session);
    if (!s) throw new Error(`no session ${m.session} on the auxiliary thread`);
    const out = await s.run(m.feeds, m.outputs);
    post(ranReply(m.id, out));
  } catch (err) {
    fail(m.id, err);
  }
}

/** Runs in turn, so everything asked for before is done; then the held priming runs go to the end of the queue. */
function settle(m: Extract<ToAux, { t: 'settle' }>): void {
  const released = m.release ? held.size : 0;
  if (m.release) {
    for (const [sid, h] of held) queue = queue.then(() => prime(sid, h.component, h.feeds));
    held.clear();
  }
  post({ t: 'settled', id: m.id, released });
}

const sameDims = (a: readonly number[] | undefined, b: readonly number[]) => a !== undefined && a.length === b.length && a.every((d, i) => d === b[i]);

async function release(m: Extract<ToAux, { t: 'release' }>): Promise<void> {
  const s = sessions.get(m.session);
  sessions.delete(m.session);
  held.delete(m.session);
  await s?.release().catch(() => undefined);
  post({ t: 'released', id: m.id });
}

/** The Brownian motion of the batch whose noise was asked for last (its trees keep the nodes the next reads share). */
let motion: BrownianNoise | undefined;

function noise(m: Extract<ToAux, { t: 'noise' }>): void {
  try {
    const { spec, ta, tb } = m.query;
    if (!motion || !sameSpec(motion.spec, spec)) motion = new BrownianNoise(spec);
    const z = motion.noise(ta, tb);
    post({ t: 'noise', id: m.id, z }, [z.buffer]);
  } catch (err) {
    fail(m.id, err);
  }
}

/** What a message asks for, done in its turn. */
async function handle(m: ToAux): Promise<void> {
  switch (m.t) {
    case 'create':
      return create(m);
    case 'run':
      return run(m);
    case 'release':
      return release(m);
    case 'settle':
      return settle(m);
    case 'noise':
      return noise(m);
    case 'forget-noise':
      motion = undefined;
      post({ t: 'forgot-noise', id: m.id });
      return;
    case 'close': {
      const all = [...sessions.values()];
      sessions.clear(); // a priming run queued behind this one finds nothing to run
      held.clear();
      await Promise.allSettled(all.map((s) => s.release()));
      process.exit(0);
    }
  }
}

// One thing at a time, in arrival order: ORT creates and runs synchronously on this thread anyway.
let queue: Promise<void> = Promise.resolve();
port.on('message', (m: ToAux) => {
  queue = queue.then(() => handle(m));
});
