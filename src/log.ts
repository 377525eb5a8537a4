/** @module Structured JSON logs (pino), one line per event; credentials are redacted by path. */
import { pino, type Logger } from 'pino';

export type { Logger };

const REDACT = [
  'accessKeyId', 'secretAccessKey', 'sessionToken', 'authorization', 'password',
  '*.accessKeyId', '*.secretAccessKey', '*.sessionToken', '*.authorization', '*.password',
  'headers.authorization', 'headers["x-amz-security-token"]',
];

export function createLogger(level: string, name = 'diffusers-runtime'): Logger {
  return pino({
    name,
    level,
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: { paths: REDACT, censor: '***' },
    formatters: { level: (label) => ({ level: label }) },
  });
}

/** A logger for tests and tools that must stay quiet. */
export const silentLogger = (): Logger => pino({ level: 'silent' });
