/**
 * @module The generations a pipeline worker was told to stop. The engine sends `cancel` for a batch it still holds,
 * which may be one whose result is already on its way back: remembering every id asked for would keep those for the
 * life of the worker (ids are never reused), one more each time a client left in that window. Only the generations the
 * worker holds, queued or running, are remembered; so are those whose previews nobody wants any more (`previews`).
 */
export class Cancels {
  readonly #held = new Set<number>();
  readonly #cancelled = new Set<number>();
  readonly #quiet = new Set<number>();

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

  /** Whether `id`'s steps render previews (its preview_every): nobody may want them any more, or someone again. */
  previews(id: number, on: boolean): void {
    if (on) this.#quiet.delete(id);
    else if (this.#held.has(id)) this.#quiet.add(id);
  }

  /** False once told nobody wants `id`'s previews (until told again that someone does). */
  previewing(id: number): boolean {
    return !this.#quiet.has(id);
  }

  has(id: number): boolean {
    return this.#cancelled.has(id);
  }

  /** Generation `id` ended, whatever its outcome. */
  end(id: number): void {
    this.#held.delete(id);
    this.#cancelled.delete(id);
    this.#quiet.delete(id);
  }

  /** Ids remembered: the generations held, and those of them cancelled or without previews. */
  get size(): number {
    return this.#held.size + this.#cancelled.size + this.#quiet.size;
  }
}
