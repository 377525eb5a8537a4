/**
 * Bodies that decode to something other than what the client sent, over a real socket (the built runtime in-process):
 * bytes that are not UTF-8, lone surrogate escapes, V2 `data` nested otherwise than its shape. Each is a 400 naming
 * where it is wrong, never a prompt or tensor quietly changed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson } from './helpers/server.js';

let srv: RuntimeHandle;
beforeAll(async () => {
  srv = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '1' }, { ready: true });
});
afterAll(async () => {
  await srv?.stop();
});

const small = { num_inference_steps: 1, height: 64, width: 64 };
const post = async (p: string, body: Buffer | string, headers: Record<string, string> = { 'content-type': 'application/json' }) => {
  const r = await fetch(`${srv.url}${p}`, { method: 'POST', body, headers });
  return [r.status, (await r.json()) as Record<string, unknown>] as const;
};
const bad = (error: string) => [400, { error, code: 'INVALID_INPUT' }] as const;
/** `text` as UTF-8 with each `\xNN` in it replaced by that raw byte. */
const bytes = (text: string) => Buffer.concat(text.split(/(\\x[0-9a-f]{2})/).map((p) => (p.startsWith('\\x') ? Buffer.from([parseInt(p.slice(2), 16)]) : Buffer.from(p))));
const v1Body = (prompt: string) => `{"instances":[{"prompt":"${prompt}","num_inference_steps":1,"height":64,"width":64,"seed":3}]}`;
const v2Body = (prompt: string) => `{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["${prompt}"]}],"parameters":{"num_inference_steps":1,"height":64,"width":64,"seed":3}}`;
const streamReply = (message: Buffer): Promise<{ messages: Array<Record<string, unknown>>; code: number }> =>
  new Promise((resolve, reject) => {
    const messages: Array<Record<string, unknown>> = [];
    const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/v1/models/model/stream`);
    ws.on('open', () => ws.send(message, { binary: true }));
    ws.on('message', (m) => messages.push(JSON.parse(String(m)) as Record<string, unknown>));
    ws.on('close', (code) => resolve({ messages, code }));
    ws.on('error', reject);
  });

describe('a JSON body that is not UTF-8', () => {
  it('is a 400 naming the first bad byte and its offset (V1, V2 JSON, the V2 binary header), not a prompt with U+FFFD in it', async () => {
    // "café" as Latin-1 / Windows-1252 (what a client that sends its system's code page writes).
    const v1 = bytes(v1Body('caf\\xe9'));
    expect(await post('/v1/models/model:predict', v1)).toEqual(bad(`Unrecognized request format: invalid UTF-8 at byte ${v1.indexOf(0xe9)} (0xe9 0x22 0x2c 0x22): send the JSON as UTF-8`));
    const v2 = bytes(v2Body('caf\\xe9'));
    expect(await post('/v2/models/model/infer', v2)).toEqual(bad(`Unrecognized request format: invalid UTF-8 at byte ${v2.indexOf(0xe9)} (0xe9 0x22 0x5d 0x7d): send the JSON as UTF-8`));

    const header = bytes('{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":7}},{"name":"negative_prompt","shape":[1],"datatype":"BYTES","data":["caf\\xe9"]}]}');
    const binary = Buffer.concat([header, Buffer.from([3, 0, 0, 0]), Buffer.from('fox')]);
    expect(await post('/v2/models/model/infer', binary, { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) }))
      .toEqual(bad(`Unrecognized request format: the JSON header (the first ${header.length} bytes) does not parse: invalid UTF-8 at byte ${header.indexOf(0xe9)} (0xe9 0x22 0x5d 0x7d): send the JSON as UTF-8`));
  });

  it('names the first ill-formed sequence: an encoded surrogate, an overlong form, a character cut short at the end', async () => {
    for (const [seq, shown] of [['\\xed\\xa0\\x80', '0xed 0xa0 0x80 0x22'], ['\\xc0\\xaf', '0xc0 0xaf 0x22 0x2c'], ['\\xf4\\x90\\x80\\x80', '0xf4 0x90 0x80 0x80']] as const) {
      const body = bytes(v1Body(`ok \\xc3\\xa9 ${seq}`));
      expect(await post('/v1/models/model:predict', body)).toEqual(bad(`Unrecognized request format: invalid UTF-8 at byte ${body.indexOf(Buffer.from(shown.split(' ').map((x) => Number(x))))} (${shown}): send the JSON as UTF-8`));
    }
    const cut = Buffer.concat([Buffer.from(v1Body('x')), Buffer.from([0xe2, 0x82])]);
    expect(await post('/v1/models/model:predict', cut)).toEqual(bad(`Unrecognized request format: invalid UTF-8 at byte ${cut.length - 2} (0xe2 0x82): send the JSON as UTF-8`));
  });

  it('an empty body (or whitespace alone) is named as such, not as "Unexpected end of JSON input"', async () => {
    const empty = bad('Unrecognized request format: the body is empty; send a JSON object');
    for (const body of ['', ' \r\n', '\ufeff']) {
      expect(await post('/v1/models/model:predict', body)).toEqual(empty);
      expect(await post('/v2/models/model/infer', body)).toEqual(empty);
    }
    expect(await post('/v2/models/model/infer', '', { 'content-type': 'application/octet-stream' })).toEqual(empty);
  });

  it('says so when the body is UTF-16 (PowerShell 5 writes files as UTF-16LE with a byte order mark)', async () => {
    const body = Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(v1Body('fox'), 'utf16le')]);
    expect(await post('/v1/models/model:predict', body)).toEqual(bad('Unrecognized request format: invalid UTF-8 at byte 0 (0xff 0xfe 0x7b 0x00): the body starts with a UTF-16 byte order mark; send the JSON as UTF-8'));
  });

  it('is refused on the WebSocket stream too, where a binary message is not checked by the WebSocket layer', async () => {
    const { messages, code } = await streamReply(bytes('{"prompt":"caf\\xe9"}'));
    expect([messages, code]).toEqual([[{ type: 'error', code: 'INVALID_INPUT', error: 'Unrecognized request format: invalid UTF-8 at byte 14 (0xe9 0x22 0x7d): send the JSON as UTF-8' }], 4400]);
  });

  it('still takes UTF-8 text of every length, with or without a byte order mark: the same image as its \\u escapes', async () => {
    const text = 'café 日本 😀';
    const escaped = [...text].map((c) => (c.charCodeAt(0) < 0x80 ? c : c.split('').map((u) => `\\u${u.charCodeAt(0).toString(16).padStart(4, '0')}`).join(''))).join('');
    const b64 = (j: Record<string, unknown>) => (j.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;
    const raw = await post('/v1/models/model:predict', Buffer.from(v1Body(text)));
    const bom = await post('/v1/models/model:predict', Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(v1Body(text))]));
    const esc = await post('/v1/models/model:predict', Buffer.from(v1Body(escaped)));
    expect([raw[0], bom[0], esc[0]], JSON.stringify(esc[1].error)).toEqual([200, 200, 200]);
    expect(b64(bom[1])).toBe(b64(raw[1]));
    expect(b64(esc[1])).toBe(b64(raw[1]));
    // U+FFFD itself, sent as UTF-8, is a character like any other: only bytes that are not UTF-8 are refused.
    const ffd = await post('/v1/models/model:predict', Buffer.from(v1Body('caf\uFFFD')));
    expect(ffd[0]).toBe(200);
  });
});

describe('a lone surrogate escape ("\\ud800" without its pair)', () => {
  it('is a 400 naming the field (V1, V2, the stream), not a prompt the tokenizer reads with U+FFFD', async () => {
    expect(await post('/v1/models/model:predict', v1Body('fox \\ud83d'))).toEqual(
      bad('body.instances[0].prompt holds a lone surrogate "\\ud83d" (index 4 of the string), which is not a character; send the character itself, or both halves of its surrogate pair'));
    expect(await post('/v1/models/model:predict', v1Body('\\ude00 fox'))).toEqual(
      bad('body.instances[0].prompt holds a lone surrogate "\\ude00" (index 0 of the string), which is not a character; send the character itself, or both halves of its surrogate pair'));
    expect(await post('/v2/models/model/infer', v2Body('fox \\ud800'))).toEqual(
      bad('body.inputs[0].data[0] holds a lone surrogate "\\ud800" (index 4 of the string), which is not a character; send the character itself, or both halves of its surrogate pair'));
    const { messages, code } = await streamReply(Buffer.from('{"prompt":"fox","negative_prompt":"\\udfff"}'));
    expect([messages, code]).toEqual([[{ type: 'error', code: 'INVALID_INPUT', error: 'message.negative_prompt holds a lone surrogate "\\udfff" (index 0 of the string), which is not a character; send the character itself, or both halves of its surrogate pair' }], 4400]);
  });

  it('a key that holds one is named as such', async () => {
    expect(await post('/v1/models/model:predict', '{"instances":[{"prompt":"fox","\\ud800":1}]}')).toEqual(
      bad('body.instances[0] has a key that holds a lone surrogate "\\ud800" (index 0 of the string), which is not a character'));
  });
});

describe('V2 data nested otherwise than its shape', () => {
  const prompts = { name: 'prompt', shape: [4], datatype: 'BYTES', data: ['a', 'b', 'c', 'd'] };
  const seeds = (data: unknown) => ({ inputs: [prompts, { name: 'seed', shape: [2, 2], datatype: 'INT64', data }], parameters: small });
  const fix = 'nested data must follow the shape, or send the 4 elements flat, in row-major order';

  it('is a 400 naming the input, the element and the shape, even when the element count is right', async () => {
    for (const [data, where] of [
      [[[1], [2, 3, 4]], 'data[0] has 1 element, but shape [2,2] says 2'],
      [[[1, 2], [3], [4]], 'data has 3 elements, but shape [2,2] says 2'],
      [[[1, 2], [3, [4]]], 'data[1][1] is a list, but shape [2,2] has 2 dimensions'],
      [[[1, 2], 3, 4], 'data has 3 elements, but shape [2,2] says 2'],
      [[[1, 2, 3, 4]], 'data has 1 element, but shape [2,2] says 2'],
      [[1, [2, 3], 4], 'data has 3 elements, but shape [2,2] says 2'],
      [[[1, 2], 34], 'data[1] is 34, not a list of 2 as shape [2,2] says'],
    ] as const) {
      const r = await postJson(`${srv.url}/v2/models/model/infer`, seeds(data));
      expect([r.status, r.json], JSON.stringify(data)).toEqual(bad(`input "seed": ${where} (${fix})`));
    }
  });

  it('takes flat data of the shape\'s count, and nested data of the shape itself', async () => {
    const seedsOut = (j: Record<string, unknown>) => (j.outputs as Array<{ name: string; data: number[] }>).find((o) => o.name === 'seed')!.data;
    for (const data of [[11, 12, 13, 14], [[11, 12], [13, 14]]]) {
      const r = await postJson(`${srv.url}/v2/models/model/infer`, seeds(data));
      expect([r.status, seedsOut(r.json)], JSON.stringify(r.json.error)).toEqual([200, [11, 12, 13, 14]]);
    }
    const one = await postJson(`${srv.url}/v2/models/model/infer`, { inputs: [{ name: 'prompt', shape: [1, 1], datatype: 'BYTES', data: [['fox']] }], parameters: small });
    expect(one.status).toBe(200);
  });
});
