/** @module What a session thread (aux.ts, lora-thread.ts) answers its pipeline worker: declared I/O, outputs, a failure. */
import { asShortage, REQUEST_ADVICE } from '../descriptors.js';
import { isRuntimeError } from '../errors.js';
import type { IoMeta, OnnxSession } from './onnx.js';

/** A session's declared inputs or outputs, as plain data to post (session-thread.ts rebuilds them). */
export const ioMeta = (s: OnnxSession, which: 'inputMetadata' | 'outputMetadata'): IoMeta[] =>
  s.session[which].map((m) => ({ name: m.name, isTensor: true, type: String((m as { type?: unknown }).type), shape: [...((m as { shape?: Array<number | string> }).shape ?? [])] }));

/** A session thread's answer to a run. */
export type RanReply = { t: 'ran'; id: number; out: Record<string, { data: Float32Array; dims: number[] }> };
/** Its answer to a request that failed. */
export type FailedReply = { t: 'failed'; id: number; code: string; message: string };
/** A log line it sends its pipeline worker. */
export type ThreadLogMessage = { t: 'log'; level: 'info' | 'warn' | 'error'; msg: string; obj?: Record<string, unknown> };

/** The answer to a run. */
export const ranReply = (id: number, out: Record<string, { data: Float32Array; dims: readonly number[] }>): RanReply =>
  ({ t: 'ran', id, out: Object.fromEntries(Object.entries(out).map(([k, v]) => [k, { data: v.data, dims: [...v.dims] }])) });

/** The answer to a request that failed: its RuntimeError code (a file the thread ran out of descriptors for too), else INTERNAL. */
export const failedReply = (id: number, err: unknown): FailedReply => {
  const e = asShortage(err, 'a file could not be opened', REQUEST_ADVICE);
  return { t: 'failed', id, code: isRuntimeError(e) ? e.code : 'INTERNAL', message: String((e as Error)?.message ?? e) };
};
