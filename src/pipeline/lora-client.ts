/** @module The pipeline worker's side of an adapter set's thread (lora-thread.ts): build it, run its sessions, end it. */
import { REQUEST_ADVICE, shortage, shortageError } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import type { ModelSession } from './onnx.js';
import type { LoraComponent } from './lora-keys.js';
import type { AdapterRef } from './job.js';
import type { FromLora, LoraInit, ToLora } from './lora-protocol.js';
import { RemoteSession, SessionThread, type ThreadLog } from './session-thread.js';
import { threadEndSink, type ThreadEndSink, type TrimReport } from './lora-memory.js';

type Reply = Exclude<FromLora, { t: 'log' }>;
export type Built = Extract<FromLora, { t: 'built' }>;

export class LoraSetThread {
  readonly #thread: SessionThread<ToLora, Reply>;
  readonly #trimmer: ThreadEndSink;
  #closing: Promise<void> | undefined;
  /**
   * Set by close once the thread has ended: the trim that covered it, where the trimmer given runs in this thread;
   * undefined in a pipeline worker, whose ends go to the main thread's policy (lora-memory.ts).
   */
  trimmed: Promise<TrimReport | undefined> | undefined;

  constructor(init: LoraInit, log: ThreadLog, trimmer: ThreadEndSink = threadEndSink(log)) {
    this.#trimmer = trimmer;
    this.#thread = new SessionThread<ToLora, Reply>(new URL('./lora-thread.js', import.meta.url), init, log, {
      ended: (err) => {
        // Its thread could not start (no descriptor for its event loop): over once others are freed.
        const why = shortage(err);
        return why ? shortageError("the adapter set's thread could not start", why, REQUEST_ADVICE, err) : new RuntimeError('INTERNAL', `the adapter set's thread ended: ${err.message}`);
      },
    });
  }

  /** Merges and creates the set's sessions; each session comes back as a ModelSession run on this thread. */
  async build(adapters: AdapterRef[], components: Partial<Record<LoraComponent, string>>): Promise<{ built: Built; sessions: Map<LoraComponent, ModelSession> }> {
    const t = this.#thread;
    const r = t.expect(await t.ask({ t: 'build', adapters, components }), 'built', 'build');
    const sessions = new Map<LoraComponent, ModelSession>();
    // Its sessions end with the thread (close), not one by one.
    const host = { run: this.run.bind(this), release: async () => undefined };
    for (const s of r.sessions) sessions.set(s.component, RemoteSession.fromMeta(s.component, s.session, s.inputs, s.outputs, host));
    return { built: r, sessions };
  }

  run(session: number, feeds: Parameters<RemoteSession['run']>[0], outputs?: string[]): ReturnType<RemoteSession['run']> {
    return this.#thread.run(session, feeds, outputs);
  }

  /**
   * Releases the sessions and ends the thread (terminated after `graceMs` if stuck in a native call); resolves once it
   * has ended. The memory it leaves in its malloc arena is given back once the process's sets stop switching (lora-memory.ts).
   */
  close(graceMs = 5_000): Promise<void> {
    return (this.#closing ??= this.#thread.close(graceMs).then(() => {
      this.trimmed = this.#trimmer.threadEnded();
    }));
  }
}
