/**
 * @module A bound on the silence of each upload request, and of each LIST of a fill: once nothing has been sent or
 * received on its socket for S3_STALL_TIMEOUT_S, the attempt ends as stalled (upload-retry.ts, the push and the fill's
 * listing retry it), as the download's watchdog abandons a range. Silence, not total time: a part crossing a slow link
 * keeps its socket writing, and a CompleteMultipartUpload that takes minutes keeps it reading the whitespace S3 sends
 * meanwhile. The SDK's own socketTimeout is one per client, and the client also downloads (whose ranges have their
 * watchdog), and a middleware cannot hand the HTTP handler anything per attempt; so an attempt runs under
 * boundedAttempt() and the client's agents (boundSilence) set the bound on the request that attempt creates (the
 * SDK-free listing, on no agent of ours, calls boundRequest). Free of the AWS SDK, as upload-signal.ts.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type http from 'node:http';
import { RuntimeError } from '../errors.js';
import { boundSocketSilence } from './silence.js';

interface Attempt {
  readonly ms: number;
  stalled: boolean;
  settled: boolean;
}

const current = new AsyncLocalStorage<Attempt>();

/**
 * Runs `fn`, one attempt of an S3 request, with its requests bounded to `ms` of silence. If the bound cut it, the
 * error `fn` rejects with (whatever the transport makes of the cut socket) is replaced by `stalled(cause)`.
 */
export async function boundedAttempt<T>(ms: number, fn: () => Promise<T>, stalled: (cause: unknown) => Error): Promise<T> {
  const attempt: Attempt = { ms, stalled: false, settled: false };
  try {
    return await current.run(attempt, fn);
  } catch (e) {
    throw attempt.stalled ? stalled(e) : e;
  } finally {
    attempt.settled = true;
  }
}

/**
 * The error of attempt `attempt` (from 0) of `attempts` that the bound cut, for `request` (`UploadPart (part 2)`):
 * transient (classify), so retried. The callers add which object (output.ts, the push).
 */
export function stallError(request: string, ms: number, attempt: number, attempts: number, cause: unknown): RuntimeError {
  return new RuntimeError('STORAGE_STALL', `${request} stalled: nothing sent or received for ${ms / 1000} s (S3_STALL_TIMEOUT_S) on attempt ${attempt + 1} of ${attempts}`, { cause });
}

/**
 * Whether the bound of the boundedAttempt() this runs in (if any) has cut its request, asked later: how a request sent
 * now ended (s3-requests.ts), once its error no longer says (a socket destroyed under a body being read).
 */
export function stallCut(): () => boolean {
  const attempt = current.getStore();
  return attempt === undefined ? () => false : () => attempt.stalled;
}

type AddRequest = (req: http.ClientRequest, options: unknown) => void;

/**
 * Makes `agent` bound each request a boundedAttempt() sends through it; other requests (downloads) are left as they
 * are. Agent#addRequest is where Node hands an agent each new request, synchronously in http.request, so in the
 * attempt's async context (undocumented, and what proxy agents override too).
 */
export function boundSilence<A extends http.Agent>(agent: A): A {
  const own = agent as unknown as { addRequest: AddRequest };
  const add = own.addRequest.bind(agent);
  own.addRequest = (req, options) => {
    boundRequest(req);
    add(req, options);
  };
  return agent;
}

/**
 * Bounds `req` as boundSilence's agents do, when it is sent during a boundedAttempt(): for a request that goes through
 * no agent of ours (the SDK-free transport's listing pages, on Node's global agent).
 */
export function boundRequest(req: http.ClientRequest): void {
  const attempt = current.getStore();
  if (attempt !== undefined) watch(req, attempt);
}

function watch(req: http.ClientRequest, attempt: Attempt): void {
  let res: http.IncomingMessage | undefined;
  req.once('response', (r: http.IncomingMessage) => (res = r));
  boundSocketSilence(req, attempt.ms, () => {
    if (attempt.settled) return;
    attempt.stalled = true;
    const err = Object.assign(new Error(`nothing sent or received for ${attempt.ms} ms`), { name: 'TimeoutError' });
    // A body being read (a Complete's answer after its 200) fails too, rather than wait for a socket that is gone.
    res?.destroy(err);
    req.destroy(err);
  });
}
