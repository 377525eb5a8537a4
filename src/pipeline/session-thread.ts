/**
 * @module The pipeline worker's side of a thread that holds ONNX sessions (an auxiliary thread, an adapter set's
 * thread): numbered requests and their replies, the thread's logs, its death failing whatever waits on it, and its
 * close. A session there looks like a local one (RemoteSession).
 */
import { Worker } from 'node:worker_threads';
import { RuntimeError, type ErrorCode } from '../errors.js';
import type { InferenceSession } from 'onnxruntime-node';
import { ioInfo, SessionIo, type Feed, type IoInfo, type IoMeta, type ModelSession } from './onnx.js';
import type { FailedReply, RanReply, ThreadLogMessage } from './thread-replies.js';

export type ThreadLog = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) => void;
type Out = Record<string, { data: Float32Array; dims: readonly number[] }>;
/** A request as its sender writes it: the id is given when it is sent. */
export type Request<To> = To extends unknown ? Omit<To, 'id'> : never;

export interface SessionThreadOptions {
  /** What a request waiting on the thread (or asked after) fails with once it has ended (`closed`: by close()). */
  ended?: (err: Error, closed: boolean) => Error;
  /** The thread ended without being closed (told what `ended` made of it). */
  onDeath?: (err: Error) => void;
}

export class SessionThread<To extends { t: string }, Reply extends { t: string; id: number }> {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: unknown) => void }>();
  readonly #ended: (err: Error, closed: boolean) => Error;
  #next = 1;
  #dead: Error | undefined;
  #closed = false;

  constructor(entry: URL, workerData: unknown, log: ThreadLog, opts: SessionThreadOptions = {}) {
    this.#ended = opts.ended ?? ((err) => err);
    this.#worker = new Worker(entry, { workerData });
    this.#worker.on('message', (m: Reply | ThreadLogMessage) => {
      if (m.t === 'log') {
        const l = m as ThreadLogMessage;
        return log(l.level, l.msg, l.obj);
      }
      const id = (m as Reply).id;
      const p = this.#pending.get(id);
      this.#pending.delete(id);
      p?.resolve(m as Reply);
    });
    const die = (err: Error) => {
      if (this.#dead) return;
      this.#dead = err;
      const e = this.#ended(err, false);
      this.#rejectAll(e);
      opts.onDeath?.(e);
    };
    this.#worker.on('error', die);
    this.#worker.on('exit', (code) => {
      // Closed, but terminated before it answered everything (a run stuck in a native call): those fail now.
      if (this.#closed) this.#rejectAll(this.#ended(this.#dead!, true));
      die(new Error(`exit code ${code}`));
    });
  }

  #rejectAll(e: Error): void {
    for (const p of this.#pending.values()) p.reject(e);
    this.#pending.clear();
  }

  get ended(): boolean {
    return this.#dead !== undefined;
  }

  /** Sends `m` with a fresh id; resolves with the reply that carries it. */
  ask(m: Request<To>): Promise<Reply> {
    if (this.#dead) return Promise.reject(this.#ended(this.#dead, this.#closed));
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ ...m, id });
    });
  }

  /** The reply `t` to the request `what`, or the thread's failure as its RuntimeError. */
  expect<T extends string>(r: Reply, t: T, what: string): Extract<Reply, { t: T }> {
    if (r.t === 'failed') {
      const f = r as unknown as FailedReply;
      throw new RuntimeError(f.code as ErrorCode, f.message);
    }
    if (r.t !== t) throw new RuntimeError('INTERNAL', `unexpected reply ${r.t} to ${what}`);
    return r as Extract<Reply, { t: T }>;
  }

  async run(session: number, feeds: Record<string, Feed>, outputs?: string[]): Promise<Out> {
    const r = await this.ask({ t: 'run', session, feeds, ...(outputs ? { outputs } : {}) } as unknown as Request<To>);
    return (this.expect(r, 'ran', 'run') as unknown as RanReply).out;
  }

  /** Asks the thread to release its sessions and end; one stuck in a native call is terminated after `graceMs`. */
  close(graceMs = 5_000): Promise<void> {
    if (this.#dead) return Promise.resolve();
    this.#dead = new Error('closed');
    this.#closed = true;
    const exited = new Promise<void>((r) => this.#worker.once('exit', () => r()));
    const timer = setTimeout(() => void this.#worker.terminate(), graceMs);
    this.#worker.postMessage({ t: 'close' });
    return exited.finally(() => clearTimeout(timer));
  }

  /** Ends the thread at once, as a crash would: whatever waits on it fails, and `onDeath` is told. */
  async kill(): Promise<void> {
    await this.#worker.terminate();
  }
}

/** A session on another thread: the same inputs, outputs and run() as a local one. */
export class RemoteSession extends SessionIo implements ModelSession {
  constructor(
    name: string,
    private readonly id: number,
    inputs: ReadonlyMap<string, IoInfo>,
    outputs: ReadonlyMap<string, IoInfo>,
    private readonly host: { run(session: number, feeds: Record<string, Feed>, outputs?: string[]): Promise<Out>; release(session: number): Promise<void> },
  ) {
    super(name, inputs, outputs);
  }

  /** A session the thread created, from the declared inputs and outputs it posted (thread-replies.ts ioMeta). */
  static fromMeta(name: string, id: number, inputs: IoMeta[], outputs: IoMeta[], host: RemoteSession['host']): RemoteSession {
    const meta = (l: IoMeta[]) => l as unknown as InferenceSession.ValueMetadata[];
    return new RemoteSession(name, id, ioInfo(name, meta(inputs)), ioInfo(name, meta(outputs)), host);
  }

  run(feeds: Record<string, Feed>, outputs?: string[]): Promise<Out> {
    return this.host.run(this.id, feeds, outputs);
  }

  release(): Promise<void> {
    return this.host.release(this.id);
  }
}
