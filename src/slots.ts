/**
 * @module A bounded number of holders at once; callers beyond it wait first come first served, and a release hands its
 * place straight to the first waiter (never counted free meanwhile, for a newcomer to take). A waiter that gives up
 * (its signal) leaves the queue holding nothing. A caller may ask to go ahead of those waiting (in order among those that
 * asked): a short call that must not wait behind a queue of long ones.
 */
export class Slots {
  #held = 0;
  readonly #queue: Array<() => void> = [];
  /** Waiters that asked to go ahead of #queue. */
  readonly #ahead: Array<() => void> = [];

  /** `size`: holders at once, 1 or more (Infinity: no bound). */
  constructor(readonly size: number) {
    if (!(size >= 1)) throw new TypeError(`size must be 1 or more, got ${size}`);
  }

  /** Places held now (a waiter handed one included). */
  get held(): number {
    return this.#held;
  }

  /** Takes a place now if one is free; false (nothing taken) otherwise. */
  tryAcquire(): boolean {
    if (this.#held >= this.size) return false;
    this.#held++;
    return true;
  }

  /**
   * A place, at once or in turn (`ahead`: before the waiters that did not ask to); rejects with `signal`'s reason,
   * holding nothing, if it aborts first.
   */
  acquire(signal?: AbortSignal, o: { ahead?: boolean } = {}): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.tryAcquire()) return Promise.resolve();
    const queue = o.ahead ? this.#ahead : this.#queue;
    return new Promise<void>((resolve, reject) => {
      const go = () => {
        signal?.removeEventListener('abort', leave);
        resolve();
      };
      const leave = () => {
        queue.splice(queue.indexOf(go), 1);
        reject(signal!.reason);
      };
      queue.push(go);
      signal?.addEventListener('abort', leave, { once: true });
    });
  }

  /** Gives a place back: to the first waiter, if any. */
  release(): void {
    const next = this.#ahead.shift() ?? this.#queue.shift();
    if (next) next();
    else this.#held--;
  }

  /** `call` run holding a place (`ahead`: as acquire's). */
  async run<T>(call: () => Promise<T>, o: { ahead?: boolean } = {}): Promise<T> {
    if (!this.tryAcquire()) await this.acquire(undefined, o);
    try {
      return await call();
    } finally {
      this.release();
    }
  }
}
