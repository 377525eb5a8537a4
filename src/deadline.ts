/**
 * @module A signal that aborts with its parent or once a time has passed. Not `AbortSignal.any([s,
 * AbortSignal.timeout(ms)])`: on Node 20 nothing holds that timeout signal but its weak timer, and a garbage collection
 * before it fires loses it, so the wait it should bound never ends (nodejs/node#57736: a HEAD or LIST the store left
 * unanswered held the download for good).
 */

export interface Deadline {
  readonly signal: AbortSignal;
  /** The time ran out (not the parent's abort). */
  readonly timedOut: boolean;
  /** Drops the timer and the listener on the parent: call it once the wait is over. */
  clear(): void;
}

/**
 * `parent`'s abort, or a TimeoutError (as AbortSignal.timeout's; `reason`'s instead, where given) once `ms` have passed.
 * `afterInput`: for a bound on an answer's silence, the time is judged to have run out only after the event loop has
 * read what its sockets hold (storage/silence.ts): an answer that came while this process was held, before the timer
 * could fire, is read and clear()s it first.
 */
export function deadline(parent: AbortSignal | undefined, ms: number, reason?: () => unknown, o: { afterInput?: boolean } = {}): Deadline {
  const ac = new AbortController();
  let timedOut = false;
  let check: NodeJS.Immediate | undefined;
  const onAbort = () => {
    clearTimeout(timer);
    ac.abort(parent!.reason);
  };
  const expire = () => {
    check = undefined;
    if (ac.signal.aborted) return;
    timedOut = true;
    parent?.removeEventListener('abort', onAbort);
    ac.abort(reason ? reason() : new DOMException('The operation was aborted due to timeout', 'TimeoutError'));
  };
  const timer = setTimeout(() => {
    if (o.afterInput) check = setImmediate(expire);
    else expire();
  }, ms);
  // Like AbortSignal.timeout's: the wait it bounds keeps the process alive, not the timer.
  timer.unref();
  if (parent?.aborted) onAbort();
  else parent?.addEventListener('abort', onAbort, { once: true });
  return {
    signal: ac.signal,
    get timedOut() {
      return timedOut;
    },
    clear() {
      clearTimeout(timer);
      if (check !== undefined) clearImmediate(check);
      parent?.removeEventListener('abort', onAbort);
    },
  };
}

/** Whether `signal` was aborted by a deadline (this module's, or AbortSignal.timeout's TimeoutError), not by its caller. */
export function deadlineReached(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true && (signal.reason as { name?: unknown } | undefined)?.name === 'TimeoutError';
}
