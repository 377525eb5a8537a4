/** @module Structured JSON logs (pino), one line per event; credentials are redacted by path. */
import { pino, type DestinationStream, type Logger } from 'pino';

export type { Logger };

const REDACT = [
  'accessKeyId', 'secretAccessKey', 'sessionToken', 'authorization', 'password',
  '*.accessKeyId', '*.secretAccessKey', '*.sessionToken', '*.authorization', '*.password',
  'headers.authorization', 'headers["x-amz-security-token"]',
];

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
    },
    typeof to === 'number' ? pino.destination({ fd: to, sync: true }) : to,
  );
}

/** A logger for tests and tools that must stay quiet. */
export const silentLogger = (): Logger => pino({ level: 'silent' });
