/** @module Structured JSON logs (pino), one line per event; credentials are redacted by path. */
import { pino, type DestinationStream, type Logger } from 'pino';
import { logLine, terminationReason } from './termination.js';

export type { Logger };

/**
 * S3's SignatureDoesNotMatch answer carries the request it signed, which the AWS SDK copies onto its error: the
 * canonical request holds the `x-amz-security-token` header (a session token) and the access key id. Such an error is
 * wrapped before it is logged; these keep one that is not (a defect) from printing them.
 */
const SIGNED_REQUEST = ['AWSAccessKeyId', 'CanonicalRequest', 'CanonicalRequestBytes', 'StringToSign', 'StringToSignBytes', 'SignatureProvided'];
const SECRETS = ['accessKeyId', 'secretAccessKey', 'sessionToken', 'authorization', 'password', ...SIGNED_REQUEST];
// Two levels down too: the err serializer writes an error held in another's field (not its cause) under that field.
const REDACT = [...SECRETS, ...SECRETS.map((k) => `*.${k}`), ...SIGNED_REQUEST.map((k) => `*.*.${k}`), 'headers.authorization', 'headers["x-amz-security-token"]'];

/**
 * `to` 2 sends the log to stderr, for tools whose stdout carries their result (the warm-up CLI); a stream takes the
 * lines of a runtime embedded in another process (tests).
 */
export function createLogger(level: string, name = 'diffusers-runtime', to: 1 | 2 | DestinationStream = 1): Logger {
  return pino(
    {
      name,
      level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: REDACT, censor: '***' },
      formatters: { level: (label) => ({ level: label }) },
      // Each line as written (redacted), for the termination message's tail; nothing is kept unless it asks.
      hooks: { streamWrite: (s) => (logLine(s), s) },
    },
    typeof to === 'number' ? pino.destination({ fd: to, sync: true }) : to,
  );
}

/**
 * The process's own faults as log lines, for the server's process (not a runtime embedded in another): an uncaught
 * exception or unhandled rejection is one `fatal` line with its stack, then exit 1 as Node would (Node prints the
 * stack over many plain lines on stderr, which a log collector reads as as many events); a Node warning is a `warn`
 * line, in place of Node's plain `(node:PID) Warning: …` print.
 */
export function logProcessFaults(log: Logger): void {
  // Node's own printer is the one listener so far.
  process.removeAllListeners('warning');
  process.on('warning', (w) => log.warn({ warning: w.name, code: (w as NodeJS.ErrnoException).code }, w.message));
  process.on('uncaughtException', (err, origin) => {
    const msg = origin === 'unhandledRejection' ? 'unhandled promise rejection: exiting' : 'uncaught exception: exiting';
    log.fatal({ err }, msg);
    terminationReason(`diffusers-runtime: ${msg}: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}

/**
 * What ties a log line to the client request it is about: its X-Request-ID, and the W3C trace context it came with
 * (server/trace.ts): the trace's id and the caller's span, which a search of the log by trace id finds.
 */
export interface RequestIds {
  requestId?: string | undefined;
  traceId?: string | undefined;
  spanId?: string | undefined;
}

/** A generation batch holds up to MAX_BATCH_SIZE (64) requests: its lines name this many of their ids at most. */
export const LOGGED_IDS = 16;
/** X-Request-ID is the client's to choose: a batch's lines keep this much of each. */
const ID_CHARS = 128;

/**
 * The distinct request ids and trace ids of a batch's requests, in request order, at most LOGGED_IDS of each: the
 * fields of a line about the batch (a failed generation, a worker that died holding it), absent when none has one.
 */
export function batchIds(all: ReadonlyArray<RequestIds | undefined>): { requestIds?: string[]; traceIds?: string[] } {
  const pick = (k: 'requestId' | 'traceId') => [...new Set(all.flatMap((ids) => (ids?.[k] === undefined ? [] : [ids[k]!.slice(0, ID_CHARS)])))].slice(0, LOGGED_IDS);
  const [requestIds, traceIds] = [pick('requestId'), pick('traceId')];
  return { ...(requestIds.length > 0 ? { requestIds } : {}), ...(traceIds.length > 0 ? { traceIds } : {}) };
}

/** A logger for tests and tools that must stay quiet. */
export const silentLogger = (): Logger => pino({ level: 'silent' });
