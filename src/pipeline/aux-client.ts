/**
 * @module The pipeline worker's side of its auxiliary session thread (aux.ts): sessions created and run there look
 * like local ones to the pipeline (ModelSession), and runs there overlap whatever this thread runs meanwhile.
 */
import { Worker } from 'node:worker_threads';
import { RuntimeError, type ErrorCode } from '../errors.js';
import { ioInfo, SessionIo, type Feed, type IoInfo, type ModelSession } from './onnx.js';
import type { InferenceSession } from 'onnxruntime-node';
import type { OptimizeItem } from './ortcache.js';
import type { AuxInit, FromAux, ToAux } from './protocol.js';

type Log = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) => void;
type Reply = Exclude<FromAux, { t: 'log' }>;

export interface AuxCreated {
  session: RemoteSession;
  ms: number;
  cache: string;
  deferred?: OptimizeItem;
}

export class AuxClient {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: unknown) => void }>();
  #next = 1;
  #dead: Error | undefined;

  /** `onDeath`: the thread ended without being closed (its sessions are gone with it). */
  constructor(init: AuxInit, private readonly log: Log, onDeath: (err: Error) => void) {
    this.#worker = new Worker(new URL('./aux.js', import.meta.url), { workerData: init });
    this.#worker.on('message', (m: FromAux) => {
      if (m.t === 'log') return this.log(m.level, m.msg, m.obj);
      const p = this.#pending.get(m.id);
      this.#pending.delete(m.id);
      p?.resolve(m);
    });
    const die = (err: Error) => {
      if (this.#dead) return;
      this.#dead = err;
      for (const p of this.#pending.values()) p.reject(err);
      this.#pending.clear();
      onDeath(err);
    };
    this.#worker.on('error', die);
    this.#worker.on('exit', (code) => die(new Error(`the auxiliary session thread exited with code ${code}`)));
  }

  #ask(m: ToAux & { id: number }): Promise<Reply> {
    if (this.#dead) return Promise.reject(this.#dead);
    return new Promise((resolve, reject) => {
      this.#pending.set(m.id, { resolve, reject });
      this.#worker.postMessage(m);
    });
  }

  async create(component: string, path: string, provider: 'cuda' | 'cpu', prime?: Extract<ToAux, { t: 'create' }>['prime']): Promise<AuxCreated> {
    const r = await this.#ask({ t: 'create', id: this.#next++, component, path, provider, ...(prime ? { prime } : {}) });
    if (r.t === 'failed') throw new RuntimeError(r.code as ErrorCode, r.message);
    if (r.t !== 'created') throw new RuntimeError('INTERNAL', `unexpected reply ${r.t} to create`);
    const meta = (l: typeof r.inputs) => l as unknown as InferenceSession.ValueMetadata[];
    const session = new RemoteSession(component, r.session, ioInfo(component, meta(r.inputs)), ioInfo(component, meta(r.outputs)), this);
    return { session, ms: r.ms, cache: r.cache, ...(r.deferred ? { deferred: r.deferred } : {}) };
  }

  async run(session: number, feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>> {
    const r = await this.#ask({ t: 'run', id: this.#next++, session, feeds, ...(outputs ? { outputs } : {}) });
    if (r.t === 'failed') throw new RuntimeError(r.code as ErrorCode, r.message);
    if (r.t !== 'ran') throw new RuntimeError('INTERNAL', `unexpected reply ${r.t} to run`);
    return r.out;
  }

  async release(session: number): Promise<void> {
    if (this.#dead) return;
    await this.#ask({ t: 'release', id: this.#next++, session }).catch(() => undefined);
  }

  /** Releases every session there and ends the thread; one stuck in a native call is terminated after `graceMs`. */
  close(graceMs = 5_000): Promise<void> {
    if (this.#dead) return Promise.resolve();
    this.#dead = new Error('the auxiliary session thread was closed');
    const exited = new Promise<void>((r) => this.#worker.once('exit', () => r()));
    const timer = setTimeout(() => void this.#worker.terminate(), graceMs);
    this.#worker.postMessage({ t: 'close' } satisfies ToAux);
    return exited.finally(() => clearTimeout(timer));
  }

  /** Ends the thread at once, as a crash would: whatever waits on it fails, and `onDeath` is told. */
  async kill(): Promise<void> {
    await this.#worker.terminate();
  }
}

/** A session on the auxiliary thread: the same inputs, outputs and run() as a local one. */
export class RemoteSession extends SessionIo implements ModelSession {
  constructor(
    name: string,
    private readonly id: number,
    inputs: ReadonlyMap<string, IoInfo>,
    outputs: ReadonlyMap<string, IoInfo>,
    private readonly client: AuxClient,
  ) {
    super(name, inputs, outputs);
  }

  run(feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>> {
    return this.client.run(this.id, feeds, outputs);
  }

  release(): Promise<void> {
    return this.client.release(this.id);
  }
}
