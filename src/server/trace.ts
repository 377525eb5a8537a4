/**
 * @module The request ids a request's log lines carry: X-Request-ID, and the W3C Trace Context `traceparent` header
 * (https://www.w3.org/TR/trace-context/, section 3.2) that KServe's and Knative's proxies pass on when tracing is on.
 * Read only, for the log: the runtime makes no spans and exports nothing (no OpenTelemetry collector).
 */
import type { RequestIds } from '../log.js';

/** version "-" trace-id "-" parent-id "-" trace-flags, lower-case hex only. */
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}/;
const ZEROS = /^0+$/;

/**
 * The trace id and the caller's span id of a `traceparent` value, or undefined for one the spec calls invalid (which a
 * receiver ignores, so nothing of it reaches the log): version ff, a trace id or parent id of zeros, upper-case hex,
 * anything but the 55 characters of version 00. A later version may add fields after a '-' (section 3.2.4): its first
 * four are read.
 */
export function traceContext(header: string | undefined): { traceId: string; spanId: string } | undefined {
  const m = header === undefined ? null : TRACEPARENT.exec(header);
  if (!m) return undefined;
  const [, version, traceId, spanId] = m as unknown as [string, string, string, string];
  if (version === 'ff' || ZEROS.test(traceId) || ZEROS.test(spanId)) return undefined;
  // Two traceparent headers arrive joined with ", ": past the 55th character, hence invalid, as the spec has it.
  if (header!.length > 55 && (version === '00' || header![55] !== '-')) return undefined;
  return { traceId, spanId };
}

/**
 * A request's ids once its CloudEvent is read: the trace of the event's `traceparent` attribute (CloudEvents'
 * distributed-tracing extension; a structured event's member, a binary one's `ce-traceparent` header) where the
 * request's own `traceparent` header gave none, a value the spec calls invalid ignored as there. The header wins: it is
 * this hop's context, whose spans the proxies export; the extension is the trace the event started in, which the
 * extension's spec says does not replace the protocol's headers, and is the same trace over a single hop.
 */
export function withEventTrace(ids: RequestIds, attributes: Readonly<Record<string, unknown>>): RequestIds {
  if (ids.traceId !== undefined) return ids;
  const trace = typeof attributes.traceparent === 'string' ? traceContext(attributes.traceparent) : undefined;
  return trace ? { ...ids, ...trace } : ids;
}

/** A request's ids from its headers (a repeated header's values joined, as Node joins them). */
export function requestIds(headers: Record<string, string | string[] | undefined>): RequestIds {
  const one = (h: string) => {
    const v = headers[h];
    return Array.isArray(v) ? v.join(', ') : v;
  };
  const trace = traceContext(one('traceparent'));
  return { requestId: one('x-request-id'), ...trace };
}
