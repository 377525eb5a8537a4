/**
 * @module An input image's JavaScript decoding off the event loop: on a decoding thread (decode-thread.ts), as sharp
 * decodes on libuv's. A BMP is decoded there whole; a GIF's first frame is found and cut out there for libvips. In
 * JavaScript on the main thread a 4096 × 4096 BMP held health probes, metrics and every other request's I/O for ~100
 * ms, a 46 MB GIF of one-byte sub-blocks 250–360 ms (npm run bench:decode). At most the cores but one decode at once.
 * A thread is kept between pictures: started per picture, its start and its modules' load cost a 512² GIF ~40–55 ms
 * on the loaded 2-core machine, for 0.07 ms of parsing. A kept thread keeps no process from ending and ends once idle
 * for a while; one stopped by a cancel is not kept, nor one that a picture left much garbage on.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { setImmediate as turn } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import { Slots } from '../slots.js';
import type { GifFirstFrame } from './gif.js';

/**
 * The thread's module: beside this one once built; from the source tree (as the tests import it), the built one, since
 * Node runs no TypeScript on a thread.
 */
const ENTRY = ['./decode-thread.js', '../../dist/src/runtime/decode-thread.js'].map((rel) => new URL(rel, import.meta.url)).find((u) => existsSync(fileURLToPath(u)));

/**
 * Decoding threads at once, process-wide: the cores but one, 1 to 4. Node counts the node's CPUs, not the pod's limit,
 * and each thread, busy or kept, holds ~9 MB outside the input budget.
 */
export const DECODE_THREADS = Math.max(1, Math.min(4, availableParallelism() - 1));

/** How long a thread is kept with no picture to decode: its ~9 MB are given back when the pictures stop. */
export const DECODE_THREAD_IDLE_MS = 30_000;

/**
 * The most a thread's last picture may have had it allocate for it to be kept: an RLE BMP's index per pixel is left on
 * its heap (all else it allocates goes back with the answer) until its next collection, ~8 s later when idle here.
 */
const KEEP_AFTER_BYTES = 4 << 20;

/** What a thread does with a file: a BMP's RGB pixels, or a GIF's first frame for libvips. */
export type ThreadJob = 'bmp' | 'gif';
interface Answers {
  bmp: Uint8Array;
  gif: GifFirstFrame;
}
/** A thread's reply to a picture: the file's copy comes back with it, to be collected here rather than on the thread. */
export type ThreadReply<A = unknown> = ({ answer: A } | { error: string }) & { bytes: Uint8Array };

/** A decode that ends hands its turn over (it is not counted free meanwhile, for a newcomer to take). */
const turns = new Slots(DECODE_THREADS);
/** Threads with no picture, the latest kept last, each with the timer that ends it. */
const kept: Array<{ worker: Worker; timer: NodeJS.Timeout }> = [];
let started = 0;

/** Decodes holding a thread's turn (copying the file, or on their thread, which is kept or has ended once it is no longer counted). */
export const decodesRunning = (): number => turns.held;

/** Decoding threads started since the process began, and those kept now, waiting for a picture. */
export const decodeThreads = (): { started: number; kept: number } => ({ started, kept: kept.length });

/**
 * `job` done on `bytes` on a thread. `atTurn` is called once the decode has its turn, before the thread's copy of the
 * file is made: what it reserves is held by decodes under way only, not by those waiting for a thread. `working`: what
 * the decode allocates on its thread beyond the file's copy and the answer. Throws what `atTurn` throws; the decoder's
 * Error (its message is the format's reason) for a file it refuses; a RuntimeError CANCELLED once `signal` aborts, the
 * thread then stopped at once.
 */
export async function decodeOnThread<J extends ThreadJob>(job: J, bytes: Uint8Array, field: string, signal?: AbortSignal, atTurn?: () => void, working = 0): Promise<Answers[J]> {
  const format = job.toUpperCase();
  const cancelled = () => new RuntimeError('CANCELLED', `${field}: decoding was cancelled`, { cause: signal?.reason });
  if (signal?.aborted) throw cancelled();
  if (!turns.tryAcquire()) await turns.acquire(signal).catch(() => { throw cancelled(); });
  try {
    if (signal?.aborted) throw cancelled();
    atTurn?.();
    if (!ENTRY) throw new RuntimeError('INTERNAL', `the ${format} decoding thread is not built (dist/src/runtime/decode-thread.js)`);
    const copy = await ownCopy(bytes, signal, cancelled);
    const worker = thread(ENTRY, field, format);
    let answered = false;
    let unlisten: () => void = () => undefined;
    try {
      return await new Promise<Answers[J]>((resolve, reject) => {
        const stop = () => {
          void worker.terminate();
          reject(cancelled());
        };
        const replied = (m: ThreadReply<Answers[J]>) => {
          answered = true;
          if ('answer' in m) resolve(m.answer);
          else reject(new Error(m.error));
        };
        const failed = (err: Error) => {
          // No descriptor for its event loop: over once others are freed, as for the other threads (descriptors.ts).
          const why = shortage(err);
          reject(why ? shortageError(`${field}: the ${format} decoding thread could not start`, why, REQUEST_ADVICE, err) : new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread failed: ${err.message}`, { cause: err }));
        };
        const exited = (code: number) => reject(new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread ended (exit code ${code}) without an answer`));
        unlisten = () => {
          signal?.removeEventListener('abort', stop);
          worker.off('message', replied).off('error', failed).off('exit', exited);
        };
        signal?.addEventListener('abort', stop, { once: true });
        worker.once('message', replied).once('error', failed).once('exit', exited);
        worker.postMessage({ job, bytes: copy }, [copy.buffer]);
      });
    } finally {
      unlisten();
      // Answered (a refusal included), the thread is kept unless the picture left much on it; otherwise the turn ends
      // once the thread has (one stopped mid-decode is not counted free while it still runs).
      if (answered && working <= KEEP_AFTER_BYTES && worker.threadId !== -1) keep(worker);
      else await worker.terminate();
    }
  } finally {
    turns.release();
  }
}

/** A kept thread, or a new one: counted by the caller's turn, so at most DECODE_THREADS exist. */
function thread(entry: URL, field: string, format: string): Worker {
  const last = kept.pop();
  if (last) {
    clearTimeout(last.timer);
    last.worker.ref();
    return last.worker;
  }
  let worker: Worker;
  try {
    worker = new Worker(entry);
  } catch (err) {
    // The system refused a thread (out of threads or memory): the server's trouble, not the image's.
    throw new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread could not start: ${(err as Error)?.message ?? String(err)}`, { cause: err });
  }
  started++;
  // A kept thread that fails (its exit follows) is no longer offered; a busy one's failure is its decode's.
  worker.on('error', () => forget(worker)).once('exit', () => forget(worker));
  return worker;
}

/** `worker` kept for the next picture: unreferenced, so that it keeps no process from ending, and ended once idle. */
function keep(worker: Worker): void {
  worker.unref();
  const timer = setTimeout(() => {
    // Forgotten first: a picture must not be handed to it while it ends.
    forget(worker);
    void worker.terminate();
  }, DECODE_THREAD_IDLE_MS);
  timer.unref();
  kept.push({ worker, timer });
}

/** `worker` no longer offered, if it was kept. */
function forget(worker: Worker): void {
  const i = kept.findIndex((k) => k.worker === worker);
  if (i < 0) return;
  clearTimeout(kept[i]!.timer);
  kept.splice(i, 1);
}

/** The copy ownCopy makes per turn of the event loop. */
const PIECE = 4 << 20;

/**
 * A copy of exactly the file, to move to the thread (cloning a view would clone all of its backing store; moving the
 * caller's own would empty it), made a piece per turn: one copy of a 48 MB file held the event loop 35–80 ms here.
 */
async function ownCopy(bytes: Uint8Array, signal: AbortSignal | undefined, cancelled: () => Error): Promise<Uint8Array<ArrayBuffer>> {
  const copy = new Uint8Array(bytes.length);
  for (let at = 0; at < bytes.length; at += PIECE) {
    if (at > 0) await turn();
    if (signal?.aborted) throw cancelled();
    copy.set(bytes.subarray(at, at + PIECE), at);
  }
  return copy;
}
