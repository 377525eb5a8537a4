/**
 * @module An input image's JavaScript decoding off the event loop: on a thread of its own (decode-thread.ts), as sharp
 * decodes on libuv's. A BMP is decoded there whole; a GIF's first frame is found and cut out there for libvips. In
 * JavaScript on the main thread a 4096 × 4096 BMP held health probes, metrics and every other request's I/O for ~100
 * ms, a 46 MB GIF of one-byte sub-blocks 250–360 ms (npm run bench:decode). A thread per picture, at most the cores
 * but one at once: such pictures are rare, and a thread that ends with its picture leaves nothing behind (its copy of
 * the file, its heap), nor one stuck on a cancelled decode.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { setImmediate as turn } from 'node:timers/promises';
import { Worker } from 'node:worker_threads';
import { REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import type { GifFirstFrame } from './gif.js';

/**
 * The thread's module: beside this one once built; from the source tree (as the tests import it), the built one, since
 * Node runs no TypeScript on a thread.
 */
const ENTRY = ['./decode-thread.js', '../../dist/src/runtime/decode-thread.js'].map((rel) => new URL(rel, import.meta.url)).find((u) => existsSync(fileURLToPath(u)));

/**
 * Decoding threads at once, process-wide: the cores but one, 1 to 4. Node counts the node's CPUs, not the pod's limit,
 * and each thread holds ~7 MB outside the input budget.
 */
export const DECODE_THREADS = Math.max(1, Math.min(4, availableParallelism() - 1));

/** What a thread does with a file: a BMP's RGB pixels, or a GIF's first frame for libvips. */
export type ThreadJob = 'bmp' | 'gif';
interface Answers {
  bmp: Uint8Array;
  gif: GifFirstFrame;
}

let running = 0;
const waiting: Array<() => void> = [];

/** Decodes holding a thread's turn (copying the file, or on their thread, which has ended once it is no longer counted). */
export const decodesRunning = (): number => running;

/**
 * `job` done on `bytes` on a thread. `atTurn` is called once the decode has its turn, before the thread's copy of the
 * file is made: what it reserves is held by decodes under way only, not by those waiting for a thread. Throws what
 * `atTurn` throws; the decoder's Error (its message is the format's reason) for a file it refuses; a RuntimeError
 * CANCELLED once `signal` aborts, the thread then stopped at once.
 */
export async function decodeOnThread<J extends ThreadJob>(job: J, bytes: Uint8Array, field: string, signal?: AbortSignal, atTurn?: () => void): Promise<Answers[J]> {
  const format = job.toUpperCase();
  const cancelled = () => new RuntimeError('CANCELLED', `${field}: decoding was cancelled`, { cause: signal?.reason });
  if (signal?.aborted) throw cancelled();
  if (running >= DECODE_THREADS) {
    // A decode that ends hands its turn over (it is not counted free meanwhile, for a newcomer to take).
    await new Promise<void>((resolve, reject) => {
      const go = () => {
        signal?.removeEventListener('abort', leave);
        resolve();
      };
      const leave = () => {
        waiting.splice(waiting.indexOf(go), 1);
        reject(cancelled());
      };
      waiting.push(go);
      signal?.addEventListener('abort', leave, { once: true });
    });
  } else running++;
  try {
    if (signal?.aborted) throw cancelled();
    atTurn?.();
    if (!ENTRY) throw new RuntimeError('INTERNAL', `the ${format} decoding thread is not built (dist/src/runtime/decode-thread.js)`);
    const copy = await ownCopy(bytes, signal, cancelled);
    let worker: Worker;
    try {
      worker = new Worker(ENTRY, { workerData: { job, bytes: copy }, transferList: [copy.buffer] });
    } catch (err) {
      // The system refused a thread (out of threads or memory): the server's trouble, not the image's.
      throw new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread could not start: ${(err as Error)?.message ?? String(err)}`, { cause: err });
    }
    return await new Promise<Answers[J]>((resolve, reject) => {
      const stop = () => {
        void worker.terminate();
        reject(cancelled());
      };
      signal?.addEventListener('abort', stop, { once: true });
      worker.once('message', (m: { answer: Answers[J] } | { error: string }) => ('answer' in m ? resolve(m.answer) : reject(new Error(m.error))));
      worker.once('error', (err) => {
        // No descriptor for its event loop: over once others are freed, as for the other threads (descriptors.ts).
        const why = shortage(err);
        reject(why ? shortageError(`${field}: the ${format} decoding thread could not start`, why, REQUEST_ADVICE, err) : new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread failed: ${err.message}`, { cause: err }));
      });
      worker.once('exit', (code) => {
        signal?.removeEventListener('abort', stop);
        reject(new RuntimeError('INTERNAL', `${field}: the ${format} decoding thread ended (exit code ${code}) without an answer`));
      });
    }).finally(() => new Promise<void>((r) => (worker.threadId === -1 ? r() : worker.once('exit', () => r()))));
  } finally {
    const next = waiting.shift();
    if (next) next();
    else running--;
  }
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
