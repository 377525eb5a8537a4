/**
 * CloudEvents on V1 `:predict` (and V2 `/infer` in binary mode), as KServe's Python server reads and answers them: over real sockets on the built
 * server with the demo model, a binary event (ce-* headers) and a structured one (application/cloudevents+json, the
 * body in data or data_base64) make the same image as the plain request and are answered by an event in their mode;
 * CE_TYPE, CE_SOURCE and CE_MERGE change the answer's attributes; what is not an event KServe reads is a 400 naming
 * what is wrong, and an error is never an event.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { decodeEvent, eventReply } from '../src/server/cloudevents.js';
import { parseJson } from '../src/server/context.js';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const V1 = { instances: [{ prompt: 'a lighthouse at dusk', seed: 5, height: 64, width: 64, num_inference_steps: 2 }] };
const BINARY = { 'ce-specversion': '1.0', 'ce-id': 'req-1', 'ce-source': 'knative://broker/default', 'ce-type': 'dev.example.generate' };
/** A browser page's origin, which the CE_MERGE server lets read its answers (CORS_ALLOW_ORIGINS). */
const PAGE = 'https://app.example.com';
const EVENT = { specversion: '1.0', id: 'req-2', source: '/client', type: 'dev.example.generate', time: '2026-12-06T10:00:00Z' };

const decode = (headers: Record<string, string>, body: unknown) =>
  decodeEvent(headers, Buffer.from(typeof body === 'string' ? body : JSON.stringify(body)), parseJson);
const refused = (headers: Record<string, string>, body: unknown): string => {
  try {
    decode(headers, body);
  } catch (err) {
    return `${(err as { code: string }).code}: ${(err as Error).message}`;
  }
  throw new Error('not refused');
};

describe('decodeEvent', () => {
  it('reads a binary event: the body is the V1 body, the ce-* headers and the content type its attributes', () => {
    expect(decode({ ...BINARY, 'content-type': 'application/json', 'ce-traceparent': '00-ab-cd-01', host: 'x' }, V1)).toEqual({
      body: V1,
      event: { binary: true, attributes: { specversion: '1.0', id: 'req-1', source: 'knative://broker/default', type: 'dev.example.generate', traceparent: '00-ab-cd-01', datacontenttype: 'application/json' } },
    });
  });

  it('reads a structured event: data or data_base64, the other members its attributes; a parameter on the media type is no matter', () => {
    const structured = { 'content-type': 'application/cloudevents+json; charset=utf-8' };
    expect(decode(structured, { ...EVENT, data: V1 })).toEqual({ body: V1, event: { binary: false, attributes: EVENT } });
    const b64 = { ...EVENT, datacontenttype: 'application/json', data_base64: Buffer.from(JSON.stringify(V1)).toString('base64') };
    expect(decode(structured, b64)).toEqual({ body: V1, event: { binary: false, attributes: { ...EVENT, datacontenttype: 'application/json' } } });
  });

  it('reads a 0.3 event\'s data as base64 when its datacontentencoding says base64, as the CloudEvents SDK does; another encoding is named', () => {
    const structured = { 'content-type': 'application/cloudevents+json' };
    const v03 = { ...EVENT, specversion: '0.3' };
    const b64 = Buffer.from(JSON.stringify(V1)).toString('base64');
    expect(decode(structured, { ...v03, datacontentencoding: 'base64', data: b64 }))
      .toEqual({ body: V1, event: { binary: false, attributes: { ...v03, datacontentencoding: 'base64' } } });
    expect(decode(structured, { ...v03, datacontentencoding: 'Base64', data: b64 }).body).toEqual(V1);
    expect(decode(structured, { ...v03, data: V1 }).body).toEqual(V1);
    // In 1.0 the attribute is an extension: data is read as it is.
    expect(decode(structured, { ...EVENT, datacontentencoding: 'base64', data: V1 }).body).toEqual(V1);
    expect(refused(structured, { ...v03, datacontentencoding: 'quoted-printable', data: V1 }))
      .toBe('INVALID_INPUT: the CloudEvent\'s datacontentencoding is "quoted-printable": the only encoding read is "base64" (data a string of base64), or leave it out and put the V1 body in "data"');
    expect(refused(structured, { ...v03, datacontentencoding: 'base64', data: V1 }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data (datacontentencoding base64) must be a string of base64, got an object');
    expect(refused(structured, { ...v03, datacontentencoding: 'base64', data: JSON.stringify(V1) }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data (datacontentencoding base64) is not base64: "{" at character 0 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)');
    expect(refused(structured, { ...v03, datacontentencoding: 'base64', data_base64: b64 }))
      .toBe('INVALID_INPUT: the CloudEvent has "datacontentencoding": "base64" but no "data": the V1 body goes in its data, as base64');
  });

  it('reads an attribute written as null as one left out (the JSON format lets an optional one be null)', () => {
    const structured = { 'content-type': 'application/cloudevents+json' };
    expect(decode(structured, { ...EVENT, datacontenttype: null, subject: null, data: V1 })).toEqual({ body: V1, event: { binary: false, attributes: EVENT } });
    expect(refused(structured, { ...EVENT, id: null, data: V1 }))
      .toBe('INVALID_INPUT: the CloudEvent has no "id": a structured event needs specversion, id, source, type, and the V1 body in "data"');
  });

  it('takes the mode from the Content-Type before the ce-* headers, as the HTTP binding says', () => {
    // A structured event that carries the binary headers too is read from its body.
    expect(decode({ ...BINARY, 'content-type': 'application/cloudevents+json' }, { ...EVENT, data: V1 })).toEqual({ body: V1, event: { binary: false, attributes: EVENT } });
    expect(refused({ ...BINARY, 'content-type': 'application/cloudevents-batch+json' }, [{ ...EVENT, data: V1 }]))
      .toBe('INVALID_INPUT: a batch of CloudEvents (Content-Type: application/cloudevents-batch+json) is not read: send each event in a request of its own');
    expect(refused({ ...BINARY, 'content-type': 'application/cloudevents+avro' }, 'Obj\u0001'))
      .toBe('INVALID_INPUT: a CloudEvent in the format application/cloudevents+avro is not read: send it as application/cloudevents+json, or in binary mode (ce-* headers, the V1 body as the body)');
  });

  it('takes a request with three of the four binary headers, or a plain body, as an ordinary request', () => {
    const { 'ce-id': _, ...three } = BINARY;
    expect(decode({ ...three, 'content-type': 'application/json' }, V1)).toEqual({ body: V1 });
    expect(decode({ 'content-type': 'application/json' }, V1)).toEqual({ body: V1 });
  });

  it('unwraps a whole event sent as application/json, as KServe does, and answers it as a plain request', () => {
    expect(decode({ 'content-type': 'application/json' }, { ...EVENT, data: V1 })).toEqual({ body: V1 });
  });

  it('refuses what is not an event it reads, naming what is wrong', () => {
    const structured = { 'content-type': 'application/cloudevents+json' };
    expect(refused({ ...BINARY, 'ce-specversion': '2.0' }, V1)).toBe('INVALID_INPUT: the ce-specversion header is "2.0": this server reads CloudEvents 1.0 and 0.3');
    expect(refused({ ...BINARY, 'ce-id': '', 'ce-type': '' }, V1)).toBe('INVALID_INPUT: the ce-id, ce-type headers are empty: a CloudEvent\'s id, source and type are non-empty');
    expect(refused({ ...BINARY, 'ce-source': '' }, V1)).toBe('INVALID_INPUT: the ce-source header is empty: a CloudEvent\'s id, source and type are non-empty');
    expect(refused(structured, { ...EVENT, specversion: 1, data: V1 })).toBe('INVALID_INPUT: the CloudEvent\'s "specversion" is 1: this server reads CloudEvents 1.0 and 0.3');
    const { id: _, source: __, ...noId } = EVENT;
    expect(refused(structured, { ...noId, data: V1 })).toBe('INVALID_INPUT: the CloudEvent has no "id", "source": a structured event needs specversion, id, source, type, and the V1 body in "data"');
    expect(refused(structured, { ...EVENT, id: '', data: V1 })).toBe('INVALID_INPUT: the CloudEvent\'s "id" must be a non-empty string, got ""');
    expect(refused(structured, EVENT)).toBe('INVALID_INPUT: the CloudEvent has no "data": the V1 body ({"instances":[…]}) goes in its data');
    expect(refused(structured, [EVENT])).toBe('INVALID_INPUT: a structured CloudEvent (Content-Type: application/cloudevents+json) is a JSON object, got a list');
    expect(refused(structured, { ...EVENT, datacontenttype: 'image/png', data_base64: 'iVBORw0K' }))
      .toBe('INVALID_INPUT: the CloudEvent\'s datacontenttype is "image/png": its data must be a V1 JSON body (application/json)');
    expect(refused(structured, { ...EVENT, data_base64: Buffer.from('{"instances":').toString('base64') }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data_base64 does not hold a JSON body: Unexpected end of JSON input');
    const b64 = Buffer.from(JSON.stringify(V1)).toString('base64');
    expect(refused(structured, { ...EVENT, data: V1, data_base64: b64 }))
      .toBe('INVALID_INPUT: the CloudEvent has both "data" and "data_base64": an event holds one of them (the V1 body in "data")');
    expect(refused(structured, { ...EVENT, data_base64: JSON.stringify(V1) }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data_base64 is not base64: "{" at character 0 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)');
    expect(refused(structured, { ...EVENT, data_base64: `${b64.slice(0, 8)}==${b64.slice(8)}` }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data_base64 is not base64: "=" at character 8 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)');
    // Padding followed only by padding and line breaks is padding; anything else after the first '=' names that '='.
    expect(refused(structured, { ...EVENT, data_base64: 'eyJ9 =\n=' })).toMatch(/does not hold a JSON body/);
    expect(refused(structured, { ...EVENT, data_base64: 'eyJ9=!' }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data_base64 is not base64: "=" at character 4 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)');
    expect(refused(structured, { ...EVENT, data_base64: 'ey!J9==' }))
      .toBe('INVALID_INPUT: the CloudEvent\'s data_base64 is not base64: "!" at character 2 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)');
    expect(refused(structured, { ...EVENT, data_base64: { instances: [] } })).toBe('INVALID_INPUT: the CloudEvent\'s data_base64 must be a string of base64, got an object');
    // Line breaks in the base64 (what many encoders write every 76 characters) are no matter.
    expect(decode(structured, { ...EVENT, data_base64: b64.replace(/(.{76})/g, '$1\r\n') }).body).toEqual(V1);
    expect(refused({ 'content-type': 'application/cloudevents-batch+json' }, [{ ...EVENT, data: V1 }]))
      .toBe('INVALID_INPUT: a batch of CloudEvents (Content-Type: application/cloudevents-batch+json) is not read: send each event in a request of its own');
    expect(refused(structured, '{"specversion"')).toMatch(/^INVALID_INPUT: Unrecognized request format: /);
  });
});

describe('ce-* header values (HTTP binding 3.1.3.2)', () => {
  const attrs = (headers: Record<string, string>) => decode({ ...BINARY, 'content-type': 'application/json', ...headers }, V1).event!.attributes;

  it('are percent-decoded once, after a double-quoted one is unescaped; a % without two hex digits is kept', () => {
    expect(attrs({
      'ce-subject': 'Euro%20%E2%82%AC%20%F0%9F%98%80', 'ce-source': '/a%2fb%25c', 'ce-ext': '"say \\"hi\\" 50%"', 'ce-twice': '%2541', 'ce-odd': '100%zz%',
    })).toMatchObject({ subject: 'Euro € 😀', source: '/a/b%c', ext: 'say "hi" 50%', twice: '%41', odd: '100%zz%' });
    // A sender that writes UTF-8 verbatim (Knative's Go SDK does): Node reads the bytes as latin1, the value is UTF-8.
    expect(attrs({ 'ce-subject': Buffer.from('café ☕').toString('latin1') }).subject).toBe('café ☕');
    // The checks read the decoded values.
    expect(attrs({ 'ce-specversion': '1%2E0' }).specversion).toBe('1.0');
    expect(refused({ ...BINARY, 'ce-specversion': '%322.0' }, V1)).toBe('INVALID_INPUT: the ce-specversion header is "22.0": this server reads CloudEvents 1.0 and 0.3');
    expect(refused({ ...BINARY, 'ce-id': '""' }, V1)).toBe('INVALID_INPUT: the ce-id header is empty: a CloudEvent\'s id, source and type are non-empty');
  });

  it('that are not UTF-8 once decoded are refused, naming the header (an overlong %C0%A0, a lone byte)', () => {
    const why = 'write each character outside printable ASCII, and space, \'"\' and \'%\', as the %XX of its UTF-8 bytes';
    expect(refused({ ...BINARY, 'ce-subject': 'a%C0%A0b' }, V1)).toBe(`INVALID_INPUT: the ce-subject header is not UTF-8 once percent-decoded ("a%C0%A0b"): ${why}`);
    expect(refused({ ...BINARY, 'ce-source': '/caf%E9' }, V1)).toBe(`INVALID_INPUT: the ce-source header is not UTF-8 once percent-decoded ("/caf%E9"): ${why}`);
    // A latin1 byte written verbatim is no more UTF-8 than its %XX.
    expect(refused({ ...BINARY, 'ce-source': '/caf\u00e9' }, V1)).toBe(`INVALID_INPUT: the ce-source header is not UTF-8 once percent-decoded ("/caf\u00e9"): ${why}`);
  });
});

describe('eventReply', () => {
  const data = Buffer.from('{"predictions":[]}');
  const now = new Date('2026-12-06T12:00:00.000Z');
  const settings = { ceType: undefined, ceSource: undefined, ceMerge: false };

  it('answers a binary event with ce-* headers (KServe\'s type and source, a new id and time) and the V1 answer as the body', () => {
    const r = eventReply({ binary: true, attributes: { specversion: '1.0', id: 'req-1', source: 's', type: 't', traceparent: 'tp' } }, data, 'sd', settings, now);
    expect(r.headers!['ce-id']).toMatch(UUID);
    expect({ ...r, headers: { ...r.headers, 'ce-id': 'ID' } }).toEqual({
      status: 200, body: data, contentType: 'application/json',
      headers: { 'ce-specversion': '1.0', 'ce-id': 'ID', 'ce-time': '2026-12-06T12:00:00.000Z', 'ce-type': 'io.kserve.inference.response', 'ce-source': 'io.kserve.inference.sd' },
    });
  });

  it('answers a structured event with one, the V1 answer its data; CE_MERGE carries the request\'s attributes over, id and time new', () => {
    const event = { binary: false, attributes: { specversion: '1.0', id: 'req-2', source: 's', type: 't', time: 'old', subject: 'cat', n: 3 } };
    const r = eventReply(event, data, 'sd', { ceType: 'my.type', ceSource: '/mine', ceMerge: true }, now);
    expect(r.contentType).toBe('application/cloudevents+json');
    const out = JSON.parse(Buffer.from(r.body).toString()) as Record<string, unknown>;
    expect(out.id).toMatch(UUID);
    expect(out).toEqual({ specversion: '1.0', id: out.id, time: '2026-12-06T12:00:00.000Z', type: 'my.type', source: '/mine', subject: 'cat', n: 3, data: { predictions: [] } });
    // A binary request's content type is the answer's own (application/json), not carried over.
    const bin = eventReply({ binary: true, attributes: { specversion: '1.0', id: 'i', source: 's', type: 't', datacontenttype: 'text/json', ext: 'e' } }, data, 'sd', { ...settings, ceMerge: true }, now);
    expect(Object.keys(bin.headers!).sort()).toEqual(['ce-ext', 'ce-id', 'ce-source', 'ce-specversion', 'ce-time', 'ce-type']);
  });

  it('percent-encodes the ce-* headers it writes: space, \'"\', \'%\' and what is not printable ASCII, as UTF-8 bytes in upper-case hex', () => {
    const event = { binary: true, attributes: { specversion: '1.0', id: 'i', source: 's', type: 't', subject: 'Euro € 😀', ext: 'say "hi"\t50%', url: 'https://x.example/a?b=c&d=e#f' } };
    const h = eventReply(event, data, 'sd', { ...settings, ceMerge: true }, now).headers!;
    expect([h['ce-subject'], h['ce-ext'], h['ce-url']]).toEqual(['Euro%20%E2%82%AC%20%F0%9F%98%80', 'say%20%22hi%22%0950%25', 'https://x.example/a?b=c&d=e#f']);
  });

  it('CE_MERGE: a 0.3 event\'s datacontentencoding is not carried over, the answer\'s data being JSON', () => {
    const event = { binary: false, attributes: { specversion: '0.3', id: 'i', source: 's', type: 't', datacontentencoding: 'base64', subject: 'cat' } };
    const out = JSON.parse(Buffer.from(eventReply(event, data, 'sd', { ...settings, ceMerge: true }, now).body).toString()) as Record<string, unknown>;
    expect(out).toEqual({ specversion: '0.3', id: out.id, time: '2026-12-06T12:00:00.000Z', type: 'io.kserve.inference.response', source: 'io.kserve.inference.sd', subject: 'cat', data: { predictions: [] } });
  });
});

describe('CE_TYPE, CE_SOURCE, CE_MERGE', () => {
  it('are read, and a value that cannot be a header is named', () => {
    expect(loadConfig({ CE_TYPE: 'my.type', CE_SOURCE: '/sd', CE_MERGE: 'true' })).toMatchObject({ ceType: 'my.type', ceSource: '/sd', ceMerge: true });
    expect(loadConfig({})).toMatchObject({ ceType: undefined, ceSource: undefined, ceMerge: false });
    expect(() => loadConfig({ CE_SOURCE: 'a\u0007b' })).toThrow(ConfigError);
    const why = 'printable ASCII characters without space, \'"\' or \'%\' (it is sent as a ce-* header, which receivers read either verbatim or percent-decoded)';
    expect(() => loadConfig({ CE_TYPE: 'tïpe' })).toThrow(`CE_TYPE must be at most 1024 ${why}, got "tïpe"`);
    // The three the HTTP binding percent-encodes: Knative's broker would read "a%20b" where a newer SDK reads "a b".
    expect(() => loadConfig({ CE_TYPE: 'dev.example image' })).toThrow(`CE_TYPE must be at most 1024 ${why}, got "dev.example image"`);
    expect(() => loadConfig({ CE_SOURCE: '/x%20y' })).toThrow(`CE_SOURCE must be at most 1024 ${why}, got "/x%20y"`);
    expect(() => loadConfig({ CE_TYPE: 'a"b' })).toThrow(`CE_TYPE must be at most 1024 ${why}, got "a\\"b"`);
    expect(loadConfig({ CE_SOURCE: 'https://example.com/sd?x=1#y' }).ceSource).toBe('https://example.com/sd?x=1#y');
  });
});

describe('CloudEvents over HTTP', () => {
  let srv: ServerHandle;
  let merged: ServerHandle;
  const common = { STORAGE_URI: undefined, WARMUP_STEPS: '0', RESULT_CACHE_MB: '0' };
  beforeAll(async () => {
    [srv, merged] = await Promise.all([
      startServer(common, { ready: true }),
      startServer({ ...common, MODEL_NAME: 'sd', CE_TYPE: 'dev.example.image', CE_SOURCE: '/diffusers', CE_MERGE: '1', CORS_ALLOW_ORIGINS: PAGE }, { ready: true }),
    ]);
  }, 120_000);
  afterAll(async () => void (await Promise.all([srv?.stop(), merged?.stop()])));

  const predict = (s: ServerHandle, body: unknown, headers: Record<string, string>, model = 'model') =>
    postJson(`${s.url}/v1/models/${model}:predict`, body, { headers });
  const image = (j: Record<string, unknown>) => (j.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

  it('a binary event makes the plain request\'s image and is answered with a binary event', async () => {
    const plain = await predict(srv, V1, { 'content-type': 'application/json' });
    expect(plain.status).toBe(200);
    expect(plain.headers.get('ce-id')).toBeNull();
    const before = Date.now();
    const r = await predict(srv, V1, { ...BINARY, 'content-type': 'application/json' });
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect(image(r.json) === image(plain.json)).toBe(true);
    expect(r.headers.get('content-type')).toBe('application/json');
    expect([r.headers.get('ce-specversion'), r.headers.get('ce-type'), r.headers.get('ce-source')]).toEqual(['1.0', 'io.kserve.inference.response', 'io.kserve.inference.model']);
    expect(r.headers.get('ce-id')).toMatch(UUID);
    const time = Date.parse(r.headers.get('ce-time')!);
    expect(time).toBeGreaterThanOrEqual(before - 1000);
    expect(time).toBeLessThanOrEqual(Date.now() + 1000);
  });

  it('a structured event (data or data_base64, ce-* headers or not) makes the same image and is answered with a structured event', async () => {
    const plain = await predict(srv, V1, { 'content-type': 'application/json' });
    const sends: Array<[unknown, Record<string, string>]> = [
      [{ ...EVENT, data: V1 }, {}],
      [{ ...EVENT, data_base64: Buffer.from(JSON.stringify(V1)).toString('base64') }, {}],
      // The Content-Type makes it structured, whatever ce-* headers come with it.
      [{ ...EVENT, data: V1 }, BINARY],
    ];
    for (const [event, headers] of sends) {
      const r = await predict(srv, event, { ...headers, 'content-type': 'application/cloudevents+json' });
      expect(r.status, JSON.stringify(r.json)).toBe(200);
      expect(r.headers.get('content-type')).toBe('application/cloudevents+json');
      expect(r.headers.get('ce-id')).toBeNull();
      const { data, id, time, ...attributes } = r.json as { data: Record<string, unknown>; id: string; time: string };
      expect(attributes).toEqual({ specversion: '1.0', type: 'io.kserve.inference.response', source: 'io.kserve.inference.model' });
      expect(id).toMatch(UUID);
      expect(Number.isNaN(Date.parse(time))).toBe(false);
      expect(image(data) === image(plain.json)).toBe(true);
    }
  });

  it('CE_TYPE, CE_SOURCE and CE_MERGE: the answer takes the server\'s type and source and the request\'s other attributes', async () => {
    const r = await predict(merged, V1, { ...BINARY, 'ce-traceparent': '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', 'content-type': 'application/json' }, 'sd');
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect([r.headers.get('ce-type'), r.headers.get('ce-source'), r.headers.get('ce-traceparent')])
      .toEqual(['dev.example.image', '/diffusers', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01']);
    expect(r.headers.get('ce-id')).not.toBe('req-1');
    // A page reads the extensions copied over as it reads the five fixed ce-* headers: each answer lists those it carries.
    const page = await predict(merged, V1, { ...BINARY, 'ce-traceparent': '00-ab-cd-01', 'ce-subject': 'cat', origin: PAGE, 'content-type': 'application/json' }, 'sd');
    expect([page.status, page.headers.get('access-control-allow-origin'), page.headers.get('ce-subject')]).toEqual([200, PAGE, 'cat']);
    expect(page.headers.get('access-control-expose-headers')).toBe('retry-after, allow, x-should-retry, inference-header-content-length, '
      + 'ce-specversion, ce-id, ce-source, ce-type, ce-time, ce-traceparent, ce-subject');
    const s = await predict(merged, { ...EVENT, subject: 'cat', data: V1 }, { 'content-type': 'application/cloudevents+json' }, 'sd');
    expect(s.status).toBe(200);
    expect(s.json).toMatchObject({ specversion: '1.0', type: 'dev.example.image', source: '/diffusers', subject: 'cat' });
    expect(s.json.id).not.toBe('req-2');
    expect(s.json.time).not.toBe(EVENT.time);
  });

  it('ce-* headers are percent-decoded on the way in and encoded on the way out (CE_MERGE), a value not UTF-8 a 400', async () => {
    const r = await predict(merged, V1, {
      ...BINARY, 'content-type': 'application/json',
      'ce-subject': 'Euro%20%E2%82%AC%20%F0%9F%98%80', 'ce-ext': '"50% \\"off\\""', 'ce-note': Buffer.from('café').toString('latin1'),
    }, 'sd');
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    expect([r.headers.get('ce-subject'), r.headers.get('ce-ext'), r.headers.get('ce-note')]).toEqual(['Euro%20%E2%82%AC%20%F0%9F%98%80', '50%25%20%22off%22', 'caf%C3%A9']);
    const bad = await predict(merged, V1, { ...BINARY, 'content-type': 'application/json', 'ce-source': '/x%C0%A0' }, 'sd');
    expect([bad.status, bad.json.error]).toEqual([400, 'the ce-source header is not UTF-8 once percent-decoded ("/x%C0%A0"): write each character outside printable ASCII, and space, \'"\' and \'%\', as the %XX of its UTF-8 bytes']);
  });

  it('a 0.3 structured event with datacontentencoding base64 makes the plain request\'s image; the answer (CE_MERGE: 0.3) has JSON data and no datacontentencoding', async () => {
    const plain = await predict(merged, V1, { 'content-type': 'application/json' }, 'sd');
    const event = { ...EVENT, specversion: '0.3', datacontentencoding: 'base64', data: Buffer.from(JSON.stringify(V1)).toString('base64') };
    const r = await predict(merged, event, { 'content-type': 'application/cloudevents+json' }, 'sd');
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    const { data, ...attributes } = r.json as { data: Record<string, unknown>; id: string; time: string };
    expect(attributes).toEqual({ specversion: '0.3', id: attributes.id, time: attributes.time, type: 'dev.example.image', source: '/diffusers' });
    expect(image(data) === image(plain.json)).toBe(true);
  });

  it('CE_MERGE: attributes are checked as a body is (depth, forbidden keys) before any image is made; a deeply nested one was a 500 after the generation', async () => {
    const send = (attrs: string) => fetch(`${merged.url}/v1/models/sd:predict`, {
      method: 'POST', headers: { 'content-type': 'application/cloudevents+json' },
      body: `{"specversion":"1.0","id":"e","source":"s","type":"t",${attrs},"data":${JSON.stringify(V1)}}`,
    }).then(async (r) => [r.status, ((await r.json()) as { error: string }).error]);
    const deep = await send(`"ext":${'['.repeat(100_000)}${']'.repeat(100_000)}`);
    expect(deep[0]).toBe(400);
    expect(deep[1]).toMatch(/^the CloudEvent\.ext(\[0\])+ is nested too deeply$/);
    expect(await send('"__proto__":{"x":1}')).toEqual([400, 'the CloudEvent has a forbidden key "__proto__"']);
  });

  it('a data_base64 of 1,000,000 \'=\' is answered at once (a regex quadratic in a run of \'=\' held the event loop ~30 minutes: 60,000 took 7 s)', async () => {
    const send = async (b64: string) => {
      const r = await predict(srv, { ...EVENT, data_base64: b64 }, { 'content-type': 'application/cloudevents+json' });
      return [r.status, r.json.error];
    };
    expect(await send('='.repeat(1_000_000))).toEqual([400, 'the CloudEvent\'s data_base64 does not hold a JSON body: the body is empty; send a JSON object']);
    expect(await send(`${'='.repeat(1_000_000)}A`))
      .toEqual([400, 'the CloudEvent\'s data_base64 is not base64: "=" at character 0 (base64 is A-Z, a-z, 0-9, \'+\' and \'/\', \'=\' only at the end)']);
  });

  it('an event the server refuses is answered with KServe\'s plain error, not an event', async () => {
    const r = await predict(srv, { ...EVENT, data: { instances: [{ prompt: 'x', height: 60, width: 64 }] } }, { 'content-type': 'application/cloudevents+json' });
    expect(r.status).toBe(400);
    expect(r.headers.get('content-type')).toBe('application/json');
    expect(r.json.error).toMatch(/height/);
    const b = await predict(srv, { instances: 'x' }, { ...BINARY, 'content-type': 'application/json' });
    expect([b.status, b.headers.get('ce-id')]).toEqual([400, null]);
    const d = await predict(srv, { ...EVENT, data: 'a lighthouse' }, { 'content-type': 'application/cloudevents+json' });
    expect([d.status, d.json.error]).toEqual([400, 'the CloudEvent\'s data must be a JSON object with "instances"']);
  });

  it('V2 /infer: a binary event gets the answer event\'s ce-* headers on its own body (JSON or binary tensor data); a structured one is named', async () => {
    const infer = (headers: Record<string, string>, extra: Record<string, unknown> = {}) => fetch(`${srv.url}/v2/models/model/infer`, {
      method: 'POST',
      headers,
      body: JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['a lighthouse at dusk'] }], parameters: { seed: 5, height: 64, width: 64, num_inference_steps: 2 }, ...extra }),
    });
    const plain = await infer({ 'content-type': 'application/json' });
    const event = await infer({ ...BINARY, 'content-type': 'application/json' });
    expect([plain.status, event.status]).toEqual([200, 200]);
    expect(plain.headers.get('ce-id')).toBeNull();
    expect([event.headers.get('content-type'), event.headers.get('ce-type'), event.headers.get('ce-source'), event.headers.get('ce-specversion')])
      .toEqual(['application/json', 'io.kserve.inference.response', 'io.kserve.inference.model', '1.0']);
    expect(event.headers.get('ce-id')).toMatch(UUID);
    const [p, e] = [await plain.json(), await event.json()] as Array<{ outputs: Array<{ name: string; data: unknown[] }> }>;
    expect(e.outputs.find((o) => o.name === 'image')!.data).toEqual(p.outputs.find((o) => o.name === 'image')!.data);

    const binary = await infer({ ...BINARY, 'content-type': 'application/json' }, { parameters: { seed: 5, height: 64, width: 64, num_inference_steps: 2, binary_data_output: true } });
    expect([binary.status, binary.headers.get('content-type'), binary.headers.get('ce-type')]).toEqual([200, 'application/octet-stream', 'io.kserve.inference.response']);
    expect(Number(binary.headers.get('inference-header-content-length'))).toBeGreaterThan(0);

    const structured = await infer({ 'content-type': 'application/cloudevents+json' });
    expect([structured.status, ((await structured.json()) as { error: string }).error])
      .toEqual([400, 'V2 /infer reads a CloudEvent in binary mode only (ce-* headers, the V2 body as the body); send a structured one to V1 :predict']);
  });
});
