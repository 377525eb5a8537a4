/** @module The pipeline worker's side of an adapter set's thread (lora-thread.ts): build it, run its sessions, end it. */
import { Worker } from 'node:worker_threads';
import type { InferenceSession } from 'onnxruntime-node';
import { RuntimeError, type ErrorCode } from '../errors.js';
import { ioInfo, type Feed, type IoInfo, type ModelSession } from './onnx.js';
import type { LoraComponent } from './lora-keys.js';
import type { AdapterRef } from './job.js';
import type { FromLora, LoraInit, ToLora } from './lora-protocol.js';

type Log = (level: 'info' | 'warn' | 'error', msg: string, obj?: Record<string, unknown>) => void;
type Reply = Exclude<FromLora, { t: 'log' }>;
export type Built = Extract<FromLora, { t: 'built' }>;

export class LoraSetThread {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: unknown) => void }>();
  #next = 1;
  #dead: Error | undefined;

  constructor(init: LoraInit, log: Log) {
    this.#worker = new Worker(new URL('./lora-thread.js', import.meta.url), { workerData: init });
    this.#worker.on('message', (m: FromLora) => {
      if (m.t === 'log') return log(m.level, m.msg, m.obj);
      const p = this.#pending.get(m.id);
      this.#pending.delete(m.id);
      p?.resolve(m);
    });
    const die = (err: Error) => {
      if (this.#dead) return;
      this.#dead = err;
      for (const p of this.#pending.values()) p.reject(new RuntimeError('INTERNAL', `the adapter set's thread ended: ${err.message}`));
      this.#pending.clear();
    };
    this.#worker.on('error', die);
    this.#worker.on('exit', (code) => die(new Error(`exit code ${code}`)));
  }

  #ask(m: ToLora & { id: number }): Promise<Reply> {
    if (this.#dead) return Promise.reject(new RuntimeError('INTERNAL', `the adapter set's thread ended: ${this.#dead.message}`));
    return new Promise((resolve, reject) => {
      this.#pending.set(m.id, { resolve, reject });
      this.#worker.postMessage(m);
    });
  }

  /** Merges and creates the set's sessions; each session comes back as a ModelSession run on this thread. */
  async build(adapters: AdapterRef[], components: Partial<Record<LoraComponent, string>>): Promise<{ built: Built; sessions: Map<LoraComponent, ModelSession> }> {
    const r = await this.#ask({ t: 'build', id: this.#next++, adapters, components });
    if (r.t === 'failed') throw new RuntimeError(r.code as ErrorCode, r.message);
    if (r.t !== 'built') throw new RuntimeError('INTERNAL', `unexpected reply ${r.t} to build`);
    const meta = (l: Built['sessions'][number]['inputs']) => l as unknown as InferenceSession.ValueMetadata[];
    const sessions = new Map<LoraComponent, ModelSession>();
    for (const s of r.sessions) sessions.set(s.component, new LoraSession(s.component, s.session, ioInfo(s.component, meta(s.inputs)), ioInfo(s.component, meta(s.outputs)), this));
    return { built: r, sessions };
  }

  async run(session: number, feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>> {
    const r = await this.#ask({ t: 'run', id: this.#next++, session, feeds, ...(outputs ? { outputs } : {}) });
    if (r.t === 'failed') throw new RuntimeError(r.code as ErrorCode, r.message);
    if (r.t !== 'ran') throw new RuntimeError('INTERNAL', `unexpected reply ${r.t} to run`);
    return r.out;
  }

  /** Releases the sessions and ends the thread (terminated after `graceMs` if stuck in a native call). */
  close(graceMs = 5_000): Promise<void> {
    if (this.#dead) return Promise.resolve();
    this.#dead = new Error('closed');
    const exited = new Promise<void>((r) => this.#worker.once('exit', () => r()));
    const timer = setTimeout(() => void this.#worker.terminate(), graceMs);
    this.#worker.postMessage({ t: 'close' } satisfies ToLora);
    return exited.finally(() => clearTimeout(timer));
  }
}

/** A merged session on its set's thread: the same inputs, outputs and run() as a local one. */
class LoraSession implements ModelSession {
  constructor(
    readonly name: string,
    private readonly id: number,
    readonly inputs: ReadonlyMap<string, IoInfo>,
    readonly outputs: ReadonlyMap<string, IoInfo>,
    private readonly thread: LoraSetThread,
  ) {}

  has(input: string): boolean {
    return this.inputs.has(input);
  }

  input(name: string): IoInfo {
    const i = this.inputs.get(name);
    if (!i) throw new RuntimeError('MODEL_FORMAT', `${this.name}: the model has no input "${name}" (it has ${[...this.inputs.keys()].join(', ')})`);
    return i;
  }

  run(feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>> {
    return this.thread.run(this.id, feeds, outputs);
  }

  /** Sessions end with their thread (LoraSetThread.close). */
  async release(): Promise<void> {}
}
