/**
 * @module The pipeline worker's side of one of its auxiliary session threads (aux.ts): sessions created and run there
 * look like local ones to the pipeline (ModelSession), and runs there overlap whatever this thread runs meanwhile.
 */
import type { BrownianQuery } from './types.js';
import type { OptimizeItem } from './ortcache.js';
import type { AuxInit, FromAux, PrimeSpec, ToAux } from './protocol.js';
import type { SessionProvider } from './provider.js';
import { RemoteSession, SessionThread, type ThreadLog } from './session-thread.js';

type Reply = Exclude<FromAux, { t: 'log' }>;

export interface AuxCreated {
  session: RemoteSession;
  ms: number;
  cache: string;
  deferred?: OptimizeItem;
}

export class AuxClient {
  readonly #thread: SessionThread<ToAux, Reply>;

  /** `onDeath`: the thread ended without being closed (its sessions are gone with it). */
  constructor(init: AuxInit, log: ThreadLog, onDeath: (err: Error) => void) {
    this.#thread = new SessionThread<ToAux, Reply>(new URL('./aux.js', import.meta.url), init, log, {
      ended: (err, closed) => new Error(closed ? 'the auxiliary session thread was closed' : `the auxiliary session thread exited (${err.message})`, { cause: err }),
      onDeath,
    });
  }

  async create(component: string, path: string, provider: SessionProvider, prime?: PrimeSpec): Promise<AuxCreated> {
    const t = this.#thread;
    const r = t.expect(await t.ask({ t: 'create', component, path, provider, ...(prime ? { prime } : {}) }), 'created', 'create');
    const session = RemoteSession.fromMeta(component, r.session, r.inputs, r.outputs, this);
    return { session, ms: r.ms, cache: r.cache, ...(r.deferred ? { deferred: r.deferred } : {}) };
  }

  run(session: number, feeds: Parameters<RemoteSession['run']>[0], outputs?: string[]): ReturnType<RemoteSession['run']> {
    return this.#thread.run(session, feeds, outputs);
  }

  /**
   * Resolves once the thread has done everything asked for before (its priming runs among them). `release`: the warm-up
   * has ended, so it then runs the priming runs it held for that; resolves with how many.
   */
  async settle(release: boolean): Promise<number> {
    const t = this.#thread;
    return t.expect(await t.ask({ t: 'settle', release }), 'settled', 'settle').released;
  }

  /** DPM++ SDE's noise for `query`, made on the thread (it fails as a RuntimeError, and with the thread). */
  async noise(query: BrownianQuery): Promise<Float32Array> {
    const t = this.#thread;
    return t.expect(await t.ask({ t: 'noise', query }), 'noise', 'noise').z;
  }

  /** The thread can drop the Brownian motion it keeps for the last batch. */
  async forgetNoise(): Promise<void> {
    if (this.#thread.ended) return;
    await this.#thread.ask({ t: 'forget-noise' }).catch(() => undefined);
  }

  async release(session: number): Promise<void> {
    if (this.#thread.ended) return;
    await this.#thread.ask({ t: 'release', session }).catch(() => undefined);
  }

  /** Releases every session there and ends the thread; one stuck in a native call is terminated after `graceMs`. */
  close(graceMs = 5_000): Promise<void> {
    return this.#thread.close(graceMs);
  }

  /** Ends the thread at once, as a crash would: whatever waits on it fails, and `onDeath` is told. */
  kill(): Promise<void> {
    return this.#thread.kill();
  }
}
