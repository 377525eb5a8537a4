/**
 * @module The calls that requests make on the cache volume (a LoRA adapter's look-ups), one at a time, each waited for
 * CACHE_CALL_WAIT_MS at most. libuv's thread pool (UV_THREADPOOL_SIZE: 4, 16 in the image) runs every file call, sharp's
 * encoding, dns.lookup and zlib of the process: on a volume that stopped answering (an NFS server gone away under a
 * hard mount) each call holds its thread for good, and one call a request filled the pool after a few requests, so that
 * requests not touching the volume (a plain generation, waiting for its encoder) stopped as well. Here a stuck call
 * holds the one slot, the only thread the gate can lose; its caller, and every later one, is answered CACHE_STUCK
 * (503) naming it, at once once it has been pending CACHE_CALL_WAIT_MS, instead of queueing behind it for good.
 */
import { stat } from 'node:fs/promises';
import { isRuntimeError, RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { Slots } from '../slots.js';
import { OTHER_VOLUME, pendingCall, trackIo, volumeOf, type Volume } from './pending-io.js';
import { silenceTimer } from './silence.js';

/** How long a request waits for a call on the volume, its own or the one ahead of it (a stat answers in microseconds). */
export const CACHE_CALL_WAIT_MS = 5_000;
/** Calls at once: each a pool thread that a volume that stops answering keeps. */
export const CACHE_CALLS_AT_ONCE = 1;
/** A CACHE_STUCK answer's Retry-After (s): an NFS server's failover takes tens of seconds. */
export const CACHE_STUCK_RETRY_AFTER = 10;

export interface VolumeGate {
  /**
   * Runs `call` (one call `op` on `file`) once a slot is free; recorded as pending-io's calls are. Rejects with
   * CACHE_STUCK once the call, or the one it waits behind, has been pending `waitMs` (the call itself goes on, holding
   * its slot until it returns), or with CANCELLED when `signal` aborts first.
   */
  run<T>(op: string, file: string, call: () => Promise<T>, signal?: AbortSignal): Promise<T>;
}

interface Running {
  readonly op: string;
  readonly file: string;
  readonly since: number;
}

/** `volumes`: those the server reads (serverVolumes), for its answers to name the one a call waits on. */
export function createVolumeGate(o: { volumes: readonly Volume[]; log: Logger; slots?: number; waitMs?: number }): VolumeGate {
  const slots = o.slots ?? CACHE_CALLS_AT_ONCE;
  const waitMs = o.waitMs ?? CACHE_CALL_WAIT_MS;
  if (!Number.isInteger(slots) || slots < 1) throw new TypeError(`slots must be an integer from 1 up, got ${slots}`);
  if (!(waitMs > 0)) throw new TypeError(`waitMs must be above 0, got ${waitMs}`);
  const running = new Set<Running>();
  /** Taken by the running calls, and by a waiter handed one that has not started its call yet. */
  const places = new Slots(slots);
  let warned = false;

  const stuck = (): RuntimeError => {
    const r = [...running].reduce<Running | undefined>((a, b) => (a === undefined || b.since < a.since ? b : a), undefined);
    const v = r === undefined ? undefined : volumeOf(o.volumes, r.file);
    const what = r === undefined ? 'calls still pending' : pendingCall(r, v);
    // The cache's files are named relative to its folder: the answer says which one that is. Another volume's (a local
    // STORAGE_URI's or LORA_URI's folder) are named whole.
    const name = v?.name ?? OTHER_VOLUME;
    if (!warned) {
      warned = true;
      o.log.warn({ pending: what }, `${name} is not answering: ${what}; requests that need it are answered CACHE_STUCK until it does`);
    }
    return new RuntimeError('CACHE_STUCK', `${v?.cache ? `${name} (MODEL_CACHE_DIR)` : name} is not answering: ${what}; check the volume's server (an NFS server gone away holds every call) and its mount on this node; retry later`, { retryAfter: CACHE_STUCK_RETRY_AFTER });
  };
  const release = () => {
    places.release();
    if (running.size === 0 && warned) {
      warned = false;
      o.log.info('the volume answers again');
    }
  };
  /** Waits until `p` settles, or `untilMs` (performance.now()) passes (CACHE_STUCK), or `signal` aborts (CANCELLED). */
  const bounded = <T>(p: Promise<T>, untilMs: number, signal: AbortSignal | undefined, onGiveUp?: () => void): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      let open = true;
      const end = (f: () => void) => {
        if (!open) return;
        open = false;
        timer.clear();
        signal?.removeEventListener('abort', left);
        f();
      };
      const left = () => end(() => (onGiveUp?.(), reject(new RuntimeError('CANCELLED', 'the client left'))));
      // A silence bound (silence.ts): a call that returned while this process was held, its completion read after the
      // timers, is not the volume's silence.
      const timer = silenceTimer(Math.max(0, untilMs - performance.now()), () => end(() => (onGiveUp?.(), reject(stuck()))));
      signal?.addEventListener('abort', left, { once: true });
      p.then((v) => end(() => resolve(v)), (err: unknown) => end(() => reject(err)));
    });

  return {
    async run(op, file, call, signal) {
      if (signal?.aborted) throw new RuntimeError('CANCELLED', 'the client left');
      if (!places.tryAcquire()) {
        // Every slot held by a call already past the wait: the volume is not answering, and queueing would only wait.
        const latest = running.size > 0 ? Math.max(...[...running].map((r) => r.since)) + waitMs : performance.now() + waitMs;
        if (latest <= performance.now()) throw stuck();
        const quit = new AbortController();
        const turn = places.acquire(quit.signal);
        // Given up: out of the queue, or, handed a slot meanwhile, the slot goes to the next.
        await bounded(turn, latest, signal, () => (quit.abort(), void turn.then(release, () => undefined)));
      }
      const r: Running = { op, file, since: performance.now() };
      running.add(r);
      const settled = trackIo(op, file, call).finally(() => {
        running.delete(r);
        release();
      });
      return bounded(settled, r.since + waitMs, signal);
    },
  };
}

/** How often a watch (watchVolume) looks at the volume while work that is not gated runs on it. */
export const WATCH_EVERY_MS = 1_000;

/**
 * Looks at `dir` through `gate` every `everyMs` until `signal` aborts; each look the gate answers CACHE_STUCK goes to
 * `onStuck`. For work on the volume whose own calls are many and not gated (a LoRA adapter's fetch, an adapter set's
 * build): on a volume that stopped answering they wait for good, and the requests waiting for that work with them, up
 * to REQUEST_TIMEOUT_S. This look tells them instead, within the gate's wait, and holds at most the gate's one slot.
 */
export function watchVolume(gate: VolumeGate, dir: string, signal: AbortSignal, onStuck: (err: RuntimeError) => void, everyMs = WATCH_EVERY_MS): void {
  const pause = () => new Promise<void>((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, everyMs);
    signal.addEventListener('abort', done, { once: true });
  });
  void (async () => {
    while (!signal.aborted) {
      try {
        await gate.run('stat', dir, () => stat(dir), signal);
      } catch (err) {
        // Not there yet (the cache's folder is made by the fetch), or its signal: only the volume's silence is told.
        if (!signal.aborted && isRuntimeError(err) && err.code === 'CACHE_STUCK') onStuck(err);
      }
      await pause();
    }
  })();
}
