/**
 * @module The count of every HTTP request sent to S3 and how it ended (s3_requests_total), for both transports: the
 * work that sends them says what it is doing (countingRequests, an async context, as upload-signal.ts carries an
 * upload's), and each transport tells one request's end where it sees it: the SDK's request handler and deserializer
 * (s3-sdk.ts), the SDK-free reader's requests (s3-lite.ts). Each request counts once, when it ends: an answer with a
 * body streamed to its reader (a GET) once that body has been read to its end or given up; any other once it is
 * answered, or failed. Free of the AWS SDK, as upload-stall.ts.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { Readable } from 'node:stream';
import { RuntimeError } from '../errors.js';
import type { S3Outcome } from '../metrics.js';
import { classify, errorStatus, throttled } from './s3-errors.js';
import { stallCut } from './upload-stall.js';

/** Hears how each request of some work ended (the metric, with the work's operation as its label). */
export type RequestTally = (outcome: S3Outcome) => void;

const current = new AsyncLocalStorage<RequestTally>();

/** Runs `fn` so that the requests it sends to S3 are told to `tally`; without one, as the context it runs in says. */
export function countingRequests<T>(tally: RequestTally | undefined, fn: () => T): T {
  return tally === undefined ? fn() : current.run(tally, fn);
}

/** One request sent: what counts its end, once. */
export interface CountedRequest {
  /** It ended this way (an answer read whole: ok). */
  ended(outcome: S3Outcome): void;
  /** It failed with `err`: an error answer, or none (a reset, a stall, a stop). */
  failed(err: unknown): void;
  /** It was answered 2xx with `body`, which its reader reads: counted once that body has ended, or was given up. */
  streamed(body: Readable): void;
}

/**
 * What counts the request about to be sent (`signal`: the one it is sent with; `stopped`: whether its client has been
 * destroyed since, which ends what is in flight). Undefined where no work counts it, and where the signal has already
 * aborted (nothing is sent then).
 */
export function countRequest(signal?: AbortSignal, stopped?: () => boolean): CountedRequest | undefined {
  const tally = current.getStore();
  if (tally === undefined || signal?.aborted) return undefined;
  const cut = stallCut();
  let done = false;
  const ended = (outcome: S3Outcome) => {
    if (done) return;
    done = true;
    tally(outcome);
  };
  const failed = (err: unknown) => ended(outcomeOf(err, { signal, cut: cut(), stopped: stopped?.() === true }));
  return {
    ended,
    failed,
    streamed(body) {
      // Listeners only on the end, no 'error' one (the reader's handles it) and nothing per chunk.
      body.once('end', () => ended('ok'));
      body.once('close', () => (body.readableEnded ? ended('ok') : failed(body.errored ?? undefined)));
    },
  };
}

/** `answer` (a request answered whole when it resolves), counted by `counted` as ok or failed. */
export function counting<T>(counted: CountedRequest | undefined, answer: Promise<T>): Promise<T> {
  if (counted === undefined) return answer;
  return answer.then((a) => {
    counted.ended('ok');
    return a;
  }, (e: unknown) => {
    counted.failed(e);
    throw e;
  });
}

/**
 * How a request that did not end with an answer read whole ended. `cut`: the silence bound of an upload request or a
 * LIST page cut it (upload-stall.ts); `stopped`: its client was destroyed. A signal aborted with STORAGE_STALL is a
 * range's watchdog or a HEAD's bound, both S3_STALL_TIMEOUT_S; any other abort is the runtime's (a stop, a deadline).
 * An error without an HTTP status is the link's; a 2xx the runtime gave up on (a wrong length or ETag, too large) is
 * cancelled.
 */
export function outcomeOf(err: unknown, o: { signal?: AbortSignal | undefined; cut?: boolean; stopped?: boolean } = {}): S3Outcome {
  if (o.cut === true || isStall(err)) return 'stalled';
  if (o.signal?.aborted) return isStall(o.signal.reason) ? 'stalled' : 'cancelled';
  if (o.stopped === true) return 'cancelled';
  if (throttled(err)) return 'throttled';
  const status = errorStatus(err);
  if (status !== undefined) {
    if (status === 304) return 'ok';
    if (status >= 500) return 'server_error';
    return status >= 300 ? 'client_error' : 'cancelled';
  }
  return err === undefined || classify(err) === 'aborted' ? 'cancelled' : 'network';
}

const isStall = (e: unknown) => e instanceof RuntimeError && e.code === 'STORAGE_STALL';
