/**
 * @module How a fill meets throttling (503 SlowDown, 429, …: s3-errors.ts throttled), apart from other transient errors.
 * A reset or a 500 is the range's own bad luck and counts against its S3_MAX_ATTEMPTS; a throttled answer says the
 * store wants fewer requests from everyone, so it costs no attempt and the whole fill slows down instead:
 *
 * - ranges in flight are halved once per round (answers to requests sent before the last cut say nothing of the new
 *   limit), and every answer that is not throttled, to a request sent at the current limit, gives one range back, up
 *   to S3_MAX_CONCURRENCY: the limit shrinks fast under a storm and comes back within a round or two after it, as
 *   TCP's congestion window and the AWS SDK's adaptive retry mode do;
 * - a throttled range keeps its place while it waits, so the limit bounds requests and waits together, and then queues
 *   for a place again: a fill at one range sends one request per wait;
 * - the wait is full-jitter exponential in the rounds throttled in a row, from THROTTLE.baseMs up to THROTTLE.maxMs and
 *   never more than a quarter of S3_THROTTLE_TIMEOUT_S. A Retry-After lengthens it by at most THROTTLE.hintExtraMs and
 *   never past that cap: S3 sends none with SlowDown, and MinIO sends a fixed one (120 s, 60 s in newer releases) with
 *   every 503, no estimate of when it will serve again; honoured whole it would hold a boot minutes after a storm of
 *   seconds;
 * - a fill throttled for S3_THROTTLE_TIMEOUT_S without receiving a byte gives up (giveUp says so, and what to do).
 *
 * The same rules hold beyond the model's fill: a LORA_URI adapter's fetch is a fill; the requests of an output_uri
 * upload (or of the warm-up CLI's push) share one Throttle per upload, as ranges do; an s3:// input image's GET has one
 * of its own. ThrottledTries runs one request's tries under a Throttle. A client's request bounds its waits by its
 * deadline (their signal), and ThrottleNote lets the work it stopped say that the store was throttling it.
 */
import { deadlineReached } from '../deadline.js';
import { RuntimeError } from '../errors.js';
import type { Logger } from '../log.js';
import { backoffMs, THROTTLE } from './plan.js';
import { errorStatus, retryAfterMs, s3Code, throttled as isThrottled } from './s3-errors.js';

/** A place among the ranges in flight, taken for one request and what follows it (its body, or its wait). */
export interface Slot {
  /** The round the request was sent in (Throttle.round then); -1 for a request that holds no place (a HEAD). */
  readonly round: number;
  /** Gives the place back; a second call does nothing. */
  release(): void;
}

/**
 * What a Throttle slows down, as its log lines and giveUp name it: a fill's download (its ranges, the default) or its
 * listing; the requests of an upload (output_uri, a push); the GET of an s3:// input image.
 */
export type ThrottledWork = 'download' | 'listing' | 'upload' | 'read' | 'cache check' | 'push\'s listing' | 'push\'s delete' | 'abort';

/**
 * Per work: what fails, what ends a throttled spell (as the first log line and giveUp say it), and what to do once it
 * gave up. Work bounded by S3_THROTTLE_TIMEOUT_S is told to raise it (TAIL); a cache check and a cleanup (an abort)
 * have bounds of their own, and leave something behind that their callers name.
 */
const TAIL = 'raise S3_THROTTLE_TIMEOUT_S to wait longer (on MinIO or Ceph, check the server\'s load and its request limits)';
const FILL = { fails: 'the fill fails', served: ['receiving a byte', 'a byte received'], advice: `start fewer pods at once (a slower rollout or scale-up), lower S3_MAX_CONCURRENCY, or ${TAIL}` } as const;
const ANSWERED = ['an answer', 'an answer'] as const;
const WORK: Readonly<Record<ThrottledWork, { fails: string; served: readonly [string, string]; advice: string }>> = {
  download: FILL,
  listing: FILL,
  upload: { fails: 'the upload fails', served: ['a request accepted', 'a request accepted'], advice: `send fewer uploads at once (a push: lower S3_MAX_CONCURRENCY), or ${TAIL}` },
  read: { fails: 'the read fails', served: ['receiving a byte', 'a byte received'], advice: `retry later, or ${TAIL}` },
  'cache check': { fails: 'the committed cache entry is served as it is', served: ANSWERED, advice: 'start fewer pods at once (a slower rollout or scale-up)' },
  'push\'s listing': { fails: 'the push fails', served: ANSWERED, advice: `push later, or ${TAIL}` },
  'push\'s delete': { fails: 'the push fails', served: ANSWERED, advice: `push again later (with --replace), or ${TAIL}` },
  abort: { fails: 'the multipart upload is left', served: ANSWERED, advice: 'its parts are billed until it is aborted (aws s3api abort-multipart-upload) or a lifecycle rule (AbortIncompleteMultipartUpload) removes it' },
};

/**
 * Hears a Throttle's answers: each throttled one (`code`: the store's, as errors name it), and each that is not, or
 * bytes arriving. For the s3_throttled_responses_total metric, and for ThrottleNote.
 */
export interface ThrottleWatch {
  throttled(code: string): void;
  served?(): void;
}

export interface ThrottleOptions {
  /** Ranges (or requests) in flight when not throttled (S3_MAX_CONCURRENCY, or fewer where descriptors are short). */
  concurrency: number;
  /** S3_THROTTLE_TIMEOUT_S, in ms (or the bound `bound` names). */
  timeoutMs: number;
  /** What sets timeoutMs, as messages name it (default S3_THROTTLE_TIMEOUT_S): a cache check's or a cleanup's own bound. */
  bound?: string;
  log: Logger;
  what?: ThrottledWork;
  /** Fields of its log lines beside the counts (the object an upload or a read is of). */
  fields?: Record<string, unknown>;
  /** Shared by the Throttles of one kind of request (each upload's, each read's): their lines, one at a time (ThrottleLog). */
  gate?: ThrottleLog;
  watch?: ThrottleWatch;
  now?: () => number;
  random?: () => number;
}

/** How often, at most, a fill still throttled says so again. */
const LOG_EVERY_MS = 30_000;

export class Throttle {
  /** Ranges allowed in flight now. */
  limit: number;
  /** Places taken (requests in flight, and throttled ranges waiting). */
  taken = 0;
  /** Bumped by every cut: a request sent before it is of an earlier round. */
  round = 0;
  /** Rounds throttled in a row, since the last answer that was not. */
  level = 0;
  /**
   * Throttled answers in a row to requests that hold no place (round -1: a content check's HEADs), since the last
   * answer that was not: their waits grow as a range's do, though they cut no round. Counted apart from `level`, which
   * only the ranges' rounds raise: a HEAD throttled while every range is done (the last file's check) would otherwise
   * ask again every second or less for the whole S3_THROTTLE_TIMEOUT_S.
   */
  aside = 0;
  /** Since when the fill has been throttled without receiving a byte. */
  since: number | undefined;
  /** The lowest limit of the current episode, and how many throttled answers it had, for the messages. */
  lowest: number;
  answers = 0;
  readonly #o: Required<Omit<ThrottleOptions, 'watch' | 'gate'>> & Pick<ThrottleOptions, 'watch' | 'gate'>;
  readonly #queue: Array<() => void> = [];
  #episode = false;
  #logged = 0;
  /** This spell's lines are logged (its gate let them through); else its answers count in the gate's summary. */
  #shown = true;

  constructor(o: ThrottleOptions) {
    this.#o = { now: Date.now, random: Math.random, what: 'download', fields: {}, bound: 'S3_THROTTLE_TIMEOUT_S', ...o };
    this.limit = o.concurrency;
    this.lowest = o.concurrency;
  }

  /** The longest wait: THROTTLE.maxMs, or a quarter of the timeout where that is less. */
  get capMs(): number {
    return Math.min(THROTTLE.maxMs, this.#o.timeoutMs / 4);
  }

  /** Takes a place among the ranges in flight, waiting (in order) while the limit is reached. */
  enter(signal: AbortSignal): Promise<Slot> {
    signal.throwIfAborted();
    const slot = (): Slot => {
      this.taken++;
      let held = true;
      return {
        round: this.round,
        release: () => {
          if (!held) return;
          held = false;
          this.taken--;
          this.#wake();
        },
      };
    };
    if (this.taken < this.limit && this.#queue.length === 0) return Promise.resolve(slot());
    return new Promise((resolve, reject) => {
      const go = () => {
        signal.removeEventListener('abort', stop);
        resolve(slot());
      };
      const stop = () => {
        const i = this.#queue.indexOf(go);
        if (i >= 0) this.#queue.splice(i, 1);
        reject(signal.reason);
      };
      signal.addEventListener('abort', stop, { once: true });
      this.#queue.push(go);
    });
  }

  #wake(): void {
    while (this.taken < this.limit && this.#queue.length > 0) this.#queue.shift()!();
  }

  /** The store answered the request of `slot` with something other than throttling (its body, or another error). */
  answered(slot: Slot): void {
    this.#o.watch?.served?.();
    if (slot.round !== this.round) return;
    this.level = 0;
    this.aside = 0;
    if (this.limit < this.#o.concurrency) {
      this.limit++;
      this.#wake();
    }
    if (this.#episode && this.limit === this.#o.concurrency) {
      this.#episode = false;
      if (this.#shown) this.#o.log.info({ ...this.#o.fields, ...this.#limitField(), throttledAnswers: this.answers }, `S3 no longer throttles the ${this.#o.what}${this.#o.what === 'download' ? `: all ${this.limit} ranges in flight again` : ''}`);
    }
  }

  /** Bytes arrived: the fill is not stuck, whatever else is throttled. */
  progressed(): void {
    this.since = undefined;
    this.#o.watch?.served?.();
  }

  /**
   * The request of `slot` was throttled (`code`: the store's answer, as errors name it; `hintMs`: its Retry-After): how
   * long its range waits, holding its place, before it queues for one again; undefined once the fill has been throttled
   * for the timeout without receiving a byte, when it gives up (giveUp).
   */
  throttled(slot: Slot, code: string, hintMs?: number): number | undefined {
    const now = this.#o.now();
    this.since ??= now;
    this.answers++;
    this.#o.watch?.throttled(code);
    const left = this.since + this.#o.timeoutMs - now;
    if (left <= 0) return undefined;
    if (slot.round === this.round) {
      this.round++;
      this.level++;
      this.limit = Math.max(1, Math.floor(this.limit / 2));
      this.lowest = Math.min(this.lowest, this.limit);
    } else if (slot.round < 0) this.aside++;
    const cap = this.capMs;
    const rounds = slot.round < 0 ? Math.max(this.level, this.aside) : this.level;
    const backoff = backoffMs(rounds - 1, this.#o.random, { baseMs: Math.min(THROTTLE.baseMs, cap), maxMs: cap, factor: THROTTLE.factor });
    const hinted = hintMs === undefined ? backoff : Math.max(backoff, Math.min(hintMs, backoff + THROTTLE.hintExtraMs));
    const wait = Math.max(1, Math.min(hinted, cap, left));
    const fields = { ...this.#o.fields, code, ...this.#limitField(), maxConcurrency: this.#o.concurrency, waitMs: Math.round(wait), ...(hintMs !== undefined ? { retryAfterS: hintMs / 1000 } : {}) };
    if (!this.#episode) {
      this.#episode = true;
      this.#logged = now;
      this.#shown = this.#o.gate?.begin() ?? true;
      if (this.#shown) {
        this.#o.log.warn(fields, `S3 is throttling the ${this.#o.what} (${code}): ${this.#ranges()}backing off; `
          + `${WORK[this.#o.what].fails} once throttled for ${this.#o.timeoutMs / 1000} s (${this.#o.bound}) without ${WORK[this.#o.what].served[0]}`);
      }
    } else if (this.#shown && now - this.#logged >= LOG_EVERY_MS) {
      this.#logged = now;
      this.#o.log.warn({ ...fields, throttledS: Math.round((now - this.since) / 1000) }, `S3 is still throttling the ${this.#o.what} (${code}): ${this.#ranges()}backing off`);
    }
    if (!this.#shown) this.#o.gate!.held(this);
    return wait;
  }

  /** throttled() for the store's throttling answer `err`: its code, and its Retry-After. */
  throttledBy(slot: Slot, err: unknown): number | undefined {
    return this.throttled(slot, s3Code(err), retryAfterMs(err));
  }

  /** What work that gave up on `err` fails with: `cannot <action>: ` (`read s3://bucket/key`, `list …`) and giveUp. */
  gaveUp(action: string, err: unknown): RuntimeError {
    const out = new RuntimeError('STORAGE_TRANSIENT', `cannot ${action}: ${this.giveUp(s3Code(err))}`, { cause: err });
    gaveUpErrors.add(out);
    return out;
  }

  /** The limit as its log lines name it: a fill's ranges in flight, or an upload's or a read's requests. */
  #limitField(): { ranges: number } | { requestsInFlight: number } {
    return this.#o.what === 'download' ? { ranges: this.limit } : { requestsInFlight: this.limit };
  }

  #ranges(): string {
    return this.#o.what === 'download' ? `${this.limit} of ${this.#o.concurrency} ranges in flight, ` : '';
  }

  /** What work that gave up says, after `cannot read <what>: ` (or `cannot list …: `). */
  giveUp(code: string): string {
    const work = WORK[this.#o.what];
    return `S3 kept throttling the ${this.#o.what} (${code}, ${this.answers} throttled answers) for ${this.#o.timeoutMs / 1000} s (${this.#o.bound}) `
      + `without ${work.served[1]}${this.#o.what === 'download' ? `, with the ranges in flight cut from ${this.#o.concurrency} to ${this.lowest}` : ''}; `
      + `the store is asked for more than it serves: ${work.advice}`;
  }
}

/** The errors Throttle.gaveUp made. */
const gaveUpErrors = new WeakSet<object>();

/** Whether `e` is work that gave up because S3 kept throttling it (Throttle.gaveUp), not any other failure. */
export const gaveUpThrottled = (e: unknown): boolean => typeof e === 'object' && e !== null && gaveUpErrors.has(e);

/** Plural of a request's work in ThrottleLog's summary. */
const REQUESTS: Partial<Record<ThrottledWork, string>> = { upload: 'uploads', read: 'reads' };

/**
 * The log lines of many requests' Throttles (each output_uri upload's, each s3:// input's), one at a time: under
 * sustained throttling each request's spell would log its own lines. The first spell logs as a Throttle does; one that
 * begins within `everyMs` of the last line logged is held, and one summary `everyMs` after that line counts the
 * requests and answers held. A spell stays held while it lasts, and each of its answers starts the next summary's
 * timer, so a spell still throttled is summed up every `everyMs`, not only while new spells begin.
 * s3_throttled_responses_total still counts every answer.
 */
export class ThrottleLog {
  #last: number | undefined;
  /** The requests (their Throttles) with answers held since the last summary. */
  readonly #requests = new Set<object>();
  #answers = 0;
  #timer: NodeJS.Timeout | undefined;

  constructor(private readonly log: Logger, private readonly what: ThrottledWork, private readonly everyMs = LOG_EVERY_MS,
    private readonly now: () => number = Date.now) {}

  /** A Throttle's spell begins: whether it logs its lines, or is held for the summary. */
  begin(): boolean {
    const now = this.now();
    if (this.#last === undefined || now - this.#last >= this.everyMs) {
      this.#last = now;
      return true;
    }
    return false;
  }

  /** A throttled answer of a spell held (`request`: its Throttle, counted once a summary). */
  held(request: object): void {
    this.#requests.add(request);
    this.#answers++;
    this.#timer ??= setTimeout(() => this.#summary(), Math.max(0, this.#last! + this.everyMs - this.now())).unref();
  }

  /**
   * The summary of the spells held so far, now rather than at its time: their client is destroyed (a stop, the end of
   * a push), and the timer, unref'd so as not to keep a process alive, would never fire.
   */
  flush(): void {
    if (this.#timer === undefined) return;
    clearTimeout(this.#timer);
    this.#summary();
  }

  #summary(): void {
    this.#timer = undefined;
    const now = this.now();
    const s = Math.round((now - this.#last!) / 1000);
    this.#last = now;
    const n = this.#requests.size;
    this.log.warn({ requests: n, throttledAnswers: this.#answers, seconds: s },
      `S3 also throttled ${n} other ${n === 1 ? this.what : REQUESTS[this.what] ?? this.what} (${this.#answers} throttled answer${this.#answers === 1 ? '' : 's'}) in the last ${s} s; `
      + 'each is not logged on its own (s3_throttled_responses_total counts every answer)');
    this.#requests.clear();
    this.#answers = 0;
  }
}

/** A signal that never aborts: the place of a request that nothing stops (the push's requests outside an upload). */
const NEVER = new AbortController().signal;

/**
 * One request's tries under a Throttle, for retryTransient (its onThrottled): each try takes a place among the requests
 * in flight (those of one upload share a Throttle, as ranges do), and holds it through the wait that follows a throttled
 * answer; the next try gives it back and queues for one again. A throttled answer costs no try; any other answer, or a
 * failure other than throttling (not a try its signal stopped), ends the throttled spell (the next throttled answer
 * waits from the shortest wait again, and the S3_THROTTLE_TIMEOUT_S clock starts from it).
 */
export class ThrottledTries {
  #slot: Slot | undefined;
  /** The last throttled answer came once the work had been throttled for S3_THROTTLE_TIMEOUT_S: gaveUp() says so. */
  gaveUp = false;
  /**
   * The last answer, while S3 throttled it: cleared by any other answer, kept through tries that got none (a reset, a
   * cut). What work whose own bound ran out in the try after it failed on, rather than that try's cut.
   */
  throttledBy: unknown;

  constructor(readonly throttle: Throttle) {}

  /** Before each try (`signal`: what ends the wait for a place). */
  async #begin(signal: AbortSignal | undefined): Promise<void> {
    this.#slot?.release();
    this.#slot = undefined;
    this.#slot = await this.throttle.enter(signal ?? NEVER);
  }

  /**
   * After each try: `err` undefined where the store answered it. A try that `signal` stopped before any answer came is
   * none: the spell goes on, so that work its deadline stopped in the try after a throttled answer says S3 was throttling
   * it (ThrottleNote), as where the deadline came in the wait before that try.
   */
  #ended(signal: AbortSignal | undefined, err?: unknown): void {
    if (err === undefined || (!isThrottled(err) && errorStatus(err) !== undefined)) this.throttledBy = undefined;
    if (this.#slot === undefined || (err !== undefined && (isThrottled(err) || (signal?.aborted && errorStatus(err) === undefined)))) return;
    this.throttle.answered(this.#slot);
    this.throttle.progressed();
  }

  /** One try: a place taken (waiting while the store throttles), `send` run, and its outcome noted. */
  async attempt<T>(signal: AbortSignal | undefined, send: () => Promise<T>): Promise<T> {
    await this.#begin(signal);
    try {
      const out = await send();
      this.#ended(signal);
      return out;
    } catch (err) {
      this.#ended(signal, err);
      throw err;
    }
  }

  /** retryTransient's onThrottled: how long to wait before the next try, or undefined to give up. */
  readonly onThrottled = (err: unknown): number | undefined => {
    this.throttledBy = err;
    const wait = this.throttle.throttledBy(this.#slot ?? { round: -1, release: () => undefined }, err);
    this.gaveUp = wait === undefined;
    return wait;
  };

  /** After the last try, whatever its outcome: its place goes back. */
  done(): void {
    this.#slot?.release();
    this.#slot = undefined;
  }
}

/**
 * Whether the store is throttling a request's work now (its last answer was throttled: ThrottleWatch), so that the work
 * stopped by the request's deadline says so. `count` hears each throttled answer (the metric).
 */
export class ThrottleNote implements ThrottleWatch {
  #code = '';
  #answers = 0;
  #since: number | undefined;

  constructor(private readonly count?: (code: string) => void, private readonly now: () => number = performance.now.bind(performance)) {}

  throttled(code: string): void {
    this.count?.(code);
    this.#code = code;
    this.#answers++;
    this.#since ??= this.now();
  }

  served(): void {
    this.#since = undefined;
    this.#answers = 0;
  }

  /**
   * `S3 was throttling <what> (<code>, <n> throttled answers in <s> s)` where `signal` ended the work for its deadline
   * (deadline.ts) while the store was throttling it; undefined otherwise (the client left, or the store was serving).
   */
  stopped(signal: AbortSignal | undefined, what: string): string | undefined {
    if (this.#since === undefined || !deadlineReached(signal)) return undefined;
    const s = Math.round((this.now() - this.#since) / 100) / 10;
    return `S3 was throttling ${what} (${this.#code}, ${this.#answers} throttled answer${this.#answers === 1 ? '' : 's'} in ${s} s)`;
  }
}
