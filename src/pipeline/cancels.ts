/**
 * @module The generations a pipeline worker was told to stop. The engine sends `cancel` for a batch it still holds,
 * which may be one whose result is already on its way back: remembering every id asked for would keep those for the
 * life of the worker (ids are never reused), one more each time a client left in that window. Only the generations the
 * worker holds, queued or running, are remembered.
 */
export class Cancels {
  readonly #held = new Set<number>();
  readonly #cancelled = new Set<number>();

  /** The worker took generation `id` (queued behind others or started). */
  begin(id: number): void {
    this.#held.add(id);
  }

  /** Stop `id` at its next step; ignored once it has ended. */
  cancel(id: number): void {
    if (this.#held.has(id)) this.#cancelled.add(id);
  }

  /** `id` goes on after all, where it has not stopped yet: a step it checks from now on finds it wanted. */
  resume(id: number): void {
    this.#cancelled.delete(id);
  }

  has(id: number): boolean {
    return this.#cancelled.has(id);
  }

  /** Generation `id` ended, whatever its outcome. */
  end(id: number): void {
    this.#held.delete(id);
    this.#cancelled.delete(id);
  }

  /** Ids remembered: the generations held, and those of them cancelled. */
  get size(): number {
    return this.#held.size + this.#cancelled.size;
  }
}
