/**
 * @module CloudEvents on V1 `:predict` (and V2 `/infer`, binary mode), read and answered as KServe's Python server does
 * (Knative Eventing delivers to an InferenceService this way). Binary mode: the `ce-*` headers carry the event's
 * attributes and the body is the V1 (V2) body. Structured mode (`Content-Type: application/cloudevents+json`): the body
 * is the event, the V1 body its `data` (or `data_base64`). The answer is an event in the request's mode; an error is not
 * (KServe's neither). OpenAI's route refuses events (refuseEvent).
 */
import { randomUUID } from 'node:crypto';
import type { Config } from '../config.js';
import { RuntimeError } from '../errors.js';
import { isObj, typeName } from '../runtime/fields.js';
import { assertSafeJson } from '../runtime/request.js';
import type { Reply } from './http.js';

/** The specversions the CloudEvents SDK KServe uses reads. */
const VERSIONS = ['1.0', '0.3'];
/** A binary event has all four (the SDK's has_binary_headers); fewer, the request is an ordinary one. */
const BINARY = ['ce-specversion', 'ce-id', 'ce-source', 'ce-type'];
const hasBinaryHeaders = (headers: Record<string, string>): boolean => BINARY.every((h) => headers[h] !== undefined);
const REQUIRED = ['specversion', 'id', 'source', 'type'];
const STRUCTURED = 'application/cloudevents+json';
const BATCH = 'application/cloudevents-batch+json';

export interface InboundEvent {
  binary: boolean;
  /** The request's context attributes and extensions (binary: from the headers, names without `ce-`). */
  attributes: Record<string, unknown>;
}

/** What `:predict` reads: the V1 body, and the event it came in, if any. */
export interface Decoded {
  body: unknown;
  event?: InboundEvent;
}

/** A Content-Type's media type, lower-cased, without its parameters. */
const mediaType = (h: string | undefined): string => (h ?? '').split(';')[0]!.trim().toLowerCase();

const invalid = (msg: string): RuntimeError => new RuntimeError('INVALID_INPUT', msg);

function checkVersion(v: unknown, where: string): void {
  if (!VERSIONS.includes(v as string)) {
    throw invalid(`${where} is ${JSON.stringify(v)}: this server reads CloudEvents ${VERSIONS.join(' and ')}`);
  }
}

/**
 * The V1 body of a request and its event. `parse` is `:predict`'s JSON parse (its 400 for a body that does not parse).
 * A JSON body that is a whole event (specversion, id, source, type and data) sent as `application/json` is unwrapped
 * too, as KServe does, and answered as a plain request, as there.
 */
export function decodeEvent(headers: Record<string, string>, raw: Buffer, parse: (b: Buffer) => unknown): Decoded {
  // The Content-Type picks the mode before any ce-* header does, as the HTTP binding says and Knative's Go SDK reads:
  // a structured event that carries the headers too is read from its body, not taken for a binary event's data.
  const type = mediaType(headers['content-type']);
  if (type === BATCH) throw invalid(`a batch of CloudEvents (Content-Type: ${BATCH}) is not read: send each event in a request of its own`);
  if (type === STRUCTURED) return structured(parse(raw), parse);
  if (type.startsWith('application/cloudevents')) {
    throw invalid(`a CloudEvent in the format ${type} is not read: send it as ${STRUCTURED}, or in binary mode (ce-* headers, the V1 body as the body)`);
  }
  const binary = binaryEvent(headers);
  if (binary) return { body: parse(raw), event: binary };
  const body = parse(raw);
  if (isObj(body) && [...REQUIRED, 'data'].every((k) => Object.hasOwn(body, k)) && !Object.hasOwn(body, 'instances') && !Object.hasOwn(body, 'inputs')) {
    return { body: structured(body, parse).body };
  }
  return { body };
}

/**
 * The binary-mode event whose attributes a request's ce-* headers carry, if they carry one; its data is the body,
 * whatever that is (a V1 body, a V2 one). Not a structured event: decodeEvent reads the Content-Type first.
 */
export function binaryEvent(headers: Record<string, string>): InboundEvent | undefined {
  if (!hasBinaryHeaders(headers)) return undefined;
  const attributes: Record<string, string> = {};
  for (const [k, v] of Object.entries(headers)) if (k.startsWith('ce-') && k.length > 3) attributes[k.slice(3)] = headerValue(k, v);
  checkVersion(attributes.specversion, 'the ce-specversion header');
  const empty = BINARY.filter((h) => attributes[h.slice(3)] === '');
  if (empty.length > 0) throw invalid(`the ${empty.join(', ')} header${empty.length > 1 ? 's are' : ' is'} empty: a CloudEvent's id, source and type are non-empty`);
  if (headers['content-type'] !== undefined) attributes.datacontenttype = headers['content-type'];
  return { binary: true, attributes };
}

// ignoreBOM: a percent-encoded U+FEFF at the start is part of the value, not a mark to drop.
const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * A ce-* header's value as the HTTP binding says to read it (3.1.3.2): a double-quoted string unescaped, then one round
 * of percent-decoding, the bytes UTF-8. Node hands header bytes over as latin1, so a sender that writes UTF-8 verbatim
 * (Knative's Go SDK writes and reads values as they are) is read as it meant too. A '%' without two hex digits after it
 * is kept, as Python's unquote keeps it; bytes that are not UTF-8 are refused, as the binding says.
 */
function headerValue(name: string, raw: string): string {
  let v = raw;
  if (v.length >= 2 && v.startsWith('"') && v.endsWith('"')) v = v.slice(1, -1).replace(/\\([\s\S])/g, '$1');
  if (!/%[0-9A-Fa-f]{2}|[^\x00-\x7f]/.test(v)) return v;
  const bytes = Buffer.from(v.replace(/%([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16))), 'latin1');
  try {
    return STRICT_UTF8.decode(bytes);
  } catch {
    throw invalid(`the ${name} header is not UTF-8 once percent-decoded (${JSON.stringify(raw.length > 80 ? `${raw.slice(0, 80)}…` : raw)}): write each character outside printable ASCII, and space, '"' and '%', as the %XX of its UTF-8 bytes`);
  }
}

/**
 * An attribute as a ce-* header value (HTTP binding 3.1.3.2): space, '"', '%' and every character outside printable
 * ASCII as the %XX of its UTF-8 bytes, upper-case hex; the rest as it is.
 */
const encodeHeaderValue = (v: string): string =>
  v.replace(/[^\x21\x23\x24\x26-\x7e]/gu, (c) => Array.from(Buffer.from(c, 'utf8'), (b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join(''));

/** Whether the Content-Type is one of CloudEvents' formats (structured, batch, or another encoding). */
const eventFormat = (headers: Record<string, string>): boolean => mediaType(headers['content-type']).startsWith('application/cloudevents');

/** V2's `/infer` reads binary-mode events only (KServe's does not unwrap a structured one there either). */
export function v2Event(headers: Record<string, string>): InboundEvent | undefined {
  if (eventFormat(headers)) {
    throw invalid('V2 /infer reads a CloudEvent in binary mode only (ce-* headers, the V2 body as the body); send a structured one to V1 :predict');
  }
  return binaryEvent(headers);
}

/**
 * A route that reads no CloudEvents (OpenAI's): an event is a 400 before its body is read. Answered as an ordinary
 * request, a binary one would go back to a Knative broker as no event, which it takes for a failed delivery and sends
 * again, each time generating anew; a 400 it does not send again.
 */
export function refuseEvent(headers: Record<string, string>, route: string): void {
  if (eventFormat(headers) || hasBinaryHeaders(headers)) {
    throw invalid(`${route} reads no CloudEvents: send the event to POST /v1/models/{name}:predict (binary or structured, the V1 body as its data) or POST /v2/models/{name}/infer (binary)`);
  }
}

function structured(json: unknown, parse: (b: Buffer) => unknown): Decoded {
  if (!isObj(json)) throw invalid(`a structured CloudEvent (Content-Type: ${STRUCTURED}) is a JSON object, got ${typeName(json)}`);
  // An attribute written as null is one left out (JSON format, section 3); `"data": null` is a null payload.
  const ev = Object.fromEntries(Object.entries(json).filter(([k, v]) => v !== null || k === 'data'));
  const missing = REQUIRED.filter((k) => !Object.hasOwn(ev, k));
  if (missing.length > 0) {
    throw invalid(`the CloudEvent has no ${missing.map((k) => JSON.stringify(k)).join(', ')}: a structured event needs ${REQUIRED.join(', ')}, and the V1 body in "data"`);
  }
  checkVersion(ev.specversion, 'the CloudEvent\'s "specversion"');
  for (const k of ['id', 'source', 'type']) {
    if (typeof ev[k] !== 'string' || ev[k] === '') throw invalid(`the CloudEvent's ${JSON.stringify(k)} must be a non-empty string, got ${JSON.stringify(ev[k])}`);
  }
  const contentType = ev.datacontenttype;
  if (contentType !== undefined && !/^(?:application|text)\/(?:[^;]*\+)?json\s*(?:;|$)/i.test(String(contentType))) {
    throw invalid(`the CloudEvent's datacontenttype is ${JSON.stringify(contentType)}: its data must be a V1 JSON body (application/json)`);
  }
  const { data, data_base64: base64, ...attributes } = ev;
  // The attributes as a body is checked (depth, forbidden keys): CE_MERGE writes them into the answer, whose
  // JSON.stringify overflowed the stack on a deeply nested one, a 500 once the images were made. The data is the body.
  assertSafeJson(attributes, 'the CloudEvent');
  let body: unknown;
  // CloudEvents 0.3 had no data_base64: its binary data is a base64 string in "data" with "datacontentencoding": "base64"
  // (RFC 2045's names), read as the CloudEvents SDK for Python reads it. In 1.0 the attribute is an extension like any other.
  const encoding = ev.specversion === '0.3' ? ev.datacontentencoding : undefined;
  if (encoding !== undefined) {
    if (typeof encoding !== 'string' || encoding.toLowerCase() !== 'base64') {
      throw invalid(`the CloudEvent's datacontentencoding is ${JSON.stringify(encoding)}: the only encoding read is "base64" (data a string of base64), or leave it out and put the V1 body in "data"`);
    }
    if (!Object.hasOwn(ev, 'data')) throw invalid('the CloudEvent has "datacontentencoding": "base64" but no "data": the V1 body goes in its data, as base64');
    body = fromBase64(data, 'data (datacontentencoding base64)', parse);
  } else if (Object.hasOwn(ev, 'data')) {
    if (base64 !== undefined) throw invalid('the CloudEvent has both "data" and "data_base64": an event holds one of them (the V1 body in "data")');
    body = data;
  } else if (base64 !== undefined) {
    body = fromBase64(base64, 'data_base64', parse);
  } else throw invalid('the CloudEvent has no "data": the V1 body ({"instances":[…]}) goes in its data');
  return { body, event: { binary: false, attributes } };
}

/** The JSON body a structured event's base64 `field` holds. */
function fromBase64(b64: unknown, field: string, parse: (b: Buffer) => unknown): unknown {
  if (typeof b64 !== 'string') throw invalid(`the CloudEvent's ${field} must be a string of base64, got ${typeName(b64)}`);
  // Buffer.from skips what is not base64: a JSON text put in data_base64 would decode to bytes that name nothing.
  const bad = notBase64(b64);
  if (bad) {
    throw invalid(`the CloudEvent's ${field} is not base64: ${JSON.stringify(bad.char)} at character ${bad.at} (base64 is A-Z, a-z, 0-9, '+' and '/', '=' only at the end)`);
  }
  try {
    return parse(Buffer.from(b64, 'base64'));
  } catch (err) {
    throw invalid(`the CloudEvent's ${field} does not hold a JSON body: ${(err as Error).message.replace(/^Unrecognized request format: /, '')}`);
  }
}

/**
 * The first character that keeps `s` from being base64 (line breaks and spaces allowed), or undefined. In linear time: a
 * regex looking ahead from each '=' for a later character (`=(?=[\s=]*[^\s=])`) was quadratic in a run of '=', and
 * 60,000 of them held the event loop 7 s (a 1 MiB body: half an hour).
 */
function notBase64(s: string): { char: string; at: number } | undefined {
  const stray = /[^A-Za-z0-9+/=\s]/.exec(s);
  const pad = s.indexOf('=');
  // The first '=' is out of place when anything but padding or whitespace comes after it.
  if (pad >= 0 && (stray ? stray.index > pad : /[^\s=]/.test(s.slice(pad)))) return { char: '=', at: pad };
  return stray ? { char: stray[0], at: stray.index } : undefined;
}

/** CE_TYPE, CE_SOURCE and CE_MERGE, as KServe names them. */
export type EventSettings = Pick<Config, 'ceType' | 'ceSource' | 'ceMerge'>;

/**
 * The answer to `event` holding `data` (the V1 answer's JSON bytes): a new id and time, `type` and `source` KServe's
 * (or CE_TYPE / CE_SOURCE); with CE_MERGE, the request's other attributes and extensions too.
 */
export function eventReply(event: InboundEvent, data: Uint8Array, modelName: string, cfg: EventSettings, now = new Date()): Reply {
  const attributes = answerAttributes(event, modelName, cfg, now);
  if (event.binary) return { status: 200, body: data, contentType: 'application/json', headers: binaryHeaders(attributes) };
  const head = Buffer.from(`${JSON.stringify(attributes).slice(0, -1)},"data":`);
  return { status: 200, body: Buffer.concat([head, data, Buffer.from('}')]), contentType: STRUCTURED };
}

/** The ce-* headers that make an answer (V2's, whatever its body and type) the answer event to a binary-mode `event`. */
export const eventHeaders = (event: InboundEvent, modelName: string, cfg: EventSettings, now = new Date()): Record<string, string> =>
  binaryHeaders(answerAttributes(event, modelName, cfg, now));

function answerAttributes(event: InboundEvent, modelName: string, cfg: EventSettings, now: Date): Record<string, unknown> {
  const attributes: Record<string, unknown> = { specversion: '1.0' };
  if (cfg.ceMerge) {
    // Not the request's data encoding either: the answer's data is JSON, never a 0.3 event's base64.
    const dropped = (k: string) => k === 'id' || k === 'time' || (event.binary && k === 'datacontenttype') || (event.attributes.specversion === '0.3' && k === 'datacontentencoding');
    for (const [k, v] of Object.entries(event.attributes)) if (!dropped(k)) attributes[k] = v;
  }
  return Object.assign(attributes, {
    id: randomUUID(),
    time: now.toISOString(),
    type: cfg.ceType ?? 'io.kserve.inference.response',
    source: cfg.ceSource ?? `io.kserve.inference.${modelName}`,
  });
}

function binaryHeaders(attributes: Record<string, unknown>): Record<string, string> {
  const headers: Record<string, string> = {};
  // Percent-encoded as the binding says: a merged value read from a header was decoded there (CE_TYPE and CE_SOURCE
  // hold nothing to encode: config.ts).
  for (const [k, v] of Object.entries(attributes)) headers[`ce-${k}`] = encodeHeaderValue(String(v));
  return headers;
}
