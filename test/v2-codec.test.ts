/** The V2 tensor codec on its own (no server): binary tensor data in every datatype, problems named together, answers. */
import { describe, expect, it } from 'vitest';
import type { TaskResult } from '../src/runtime/engine.js';
import { encodeInferResponse, fieldSource, parseInferRequest, shortestFloat32, toInstances, v2Relabel } from '../src/server/v2-codec.js';

/** A binary-extension body: the JSON header, then each input's bytes; and its headers. */
function binaryBody(inputs: Array<{ name: string; datatype: string; shape: number[]; bytes: Buffer }>, extra: Record<string, unknown> = {}) {
  const header = Buffer.from(JSON.stringify({ ...extra, inputs: inputs.map(({ bytes, ...t }) => ({ ...t, parameters: { binary_data_size: bytes.length } })) }));
  return { headers: { 'inference-header-content-length': String(header.length) }, body: Buffer.concat([header, ...inputs.map((i) => i.bytes)]) };
}
const bytesElems = (...xs: Array<string | Buffer>) => Buffer.concat(xs.flatMap((x) => {
  const b = typeof x === 'string' ? Buffer.from(x) : x;
  const n = Buffer.alloc(4);
  n.writeUInt32LE(b.length);
  return [n, b];
}));
const json = (v: unknown) => Buffer.from(JSON.stringify(v));

/** Runs `fn` and returns how many times it called Buffer's `method` (how the decoder reads an element). */
function reads(method: 'readFloatLE' | 'readUInt32LE', fn: () => void): number {
  const original = Buffer.prototype[method];
  let n = 0;
  Buffer.prototype[method] = function (this: Buffer, offset?: number) {
    n++;
    return original.call(this, offset);
  };
  try {
    fn();
  } finally {
    Buffer.prototype[method] = original;
  }
  return n;
}

describe('V2 codec: requests', () => {
  it('decodes binary tensor data of each kind: BYTES text, raw image bytes, INT64, FP16, BF16, FP32 as typed', () => {
    const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
    const i64 = Buffer.alloc(16);
    i64.writeBigInt64LE(7n, 0);
    i64.writeBigInt64LE(9n, 8);
    const f16 = Buffer.from([0x00, 0x3c]); // 1.0
    const bf16 = Buffer.from([0x40, 0x3f]); // 0.75
    const f32 = Buffer.alloc(4);
    f32.writeFloatLE(0.7);
    const { headers, body } = binaryBody([
      { name: 'prompt', datatype: 'BYTES', shape: [2], bytes: bytesElems('a fox', 'é') },
      { name: 'image', datatype: 'BYTES', shape: [1], bytes: bytesElems(png) },
      { name: 'seed', datatype: 'INT64', shape: [2], bytes: i64 },
      { name: 'guidance_scale', datatype: 'FP16', shape: [1], bytes: f16 },
      { name: 'eta', datatype: 'BF16', shape: [1], bytes: bf16 },
      { name: 'strength', datatype: 'FP32', shape: [1], bytes: f32 },
    ], { id: 'x' });
    const req = parseInferRequest(headers, body);
    expect(req.id).toBe('x');
    expect(req.inputs.map((t) => [t.name, t.values])).toEqual([
      ['prompt', ['a fox', 'é']], ['image', [png]], ['seed', [7, 9]], ['guidance_scale', [1]], ['eta', [0.75]], ['strength', [0.7]],
    ]);
    expect(toInstances(req)).toEqual([
      { prompt: 'a fox', image: png, seed: 7, guidance_scale: 1, eta: 0.75, strength: 0.7 },
      { prompt: 'é', image: png, seed: 9, guidance_scale: 1, eta: 0.75, strength: 0.7 },
    ]);
  });

  it('reads a BYTES element as its bytes: a leading U+FEFF is text the prompt has (as in JSON), not a mark to drop', () => {
    const { headers, body } = binaryBody([{ name: 'prompt', datatype: 'BYTES', shape: [2], bytes: bytesElems('\ufeffa fox', '\ufeff') }]);
    expect(parseInferRequest(headers, body).inputs[0]!.values).toEqual(['\ufeffa fox', '\ufeff']);
  });

  it('names every problem of a body at once', () => {
    const body = json({ id: 3, parameters: { steps: 4, nested: { a: 1 } }, inputs: [{ name: 'prompt', shape: [2], datatype: 'BYTES', data: ['a'] }, { name: 'seed', shape: [1], datatype: 'FP32', data: [1] }] });
    expect(() => parseInferRequest({}, body)).toThrow(
      'id must be a string, got number; parameters.nested must be a string, number or boolean (parameters is a flat map), got object; '
      + 'parameters.steps is not a known field (AUTOMATIC1111\'s name); did you mean "num_inference_steps"?; '
      + 'input "prompt": shape [2] holds 2 elements but data has 1; input "seed" must have an integer datatype (INT32, INT64, …), got FP32',
    );
  });

  it('refuses a zero-length tensor, prompt or other, saying what to send (V1\'s empty list gets no prediction; V2 has no such clients to keep)', () => {
    const problem = (inputs: unknown[]) => {
      try {
        parseInferRequest({ 'content-type': 'application/json' }, Buffer.from(JSON.stringify({ inputs })));
      } catch (err) {
        return (err as Error).message;
      }
      throw new Error('not refused');
    };
    expect(problem([{ name: 'prompt', shape: [0], datatype: 'BYTES', data: [] }])).toBe('input "prompt" is empty (shape [0]): send at least one prompt, one element per image');
    expect(problem([{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['x'] }, { name: 'seed', shape: [0], datatype: 'INT64', data: [] }]))
      .toBe('input "seed" is empty (shape [0]): give it one element (for every prompt) or one per prompt, or leave it out');
  });

  it('names a top-level key the protocol does not have along with the other problems', () => {
    const body = json({ id: 3, instances: [{ prompt: 'a' }], seed: 1, inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['a'] }] });
    expect(() => parseInferRequest({}, body)).toThrow(
      '"instances" is V1\'s body (POST /v1/models/{name}:predict); a V2 request holds "id", "parameters", "inputs", "outputs"; '
      + '"seed" is not a known top-level field; a V2 request holds only "id", "parameters", "inputs", "outputs", and "model_name" and "model_version" as KServe\'s client sends them (generation fields go in "parameters" or as named inputs: {"inputs":[{"name":"prompt",…}],"parameters":{"num_inference_steps":…}}); '
      + 'id must be a string, got number',
    );
  });

  it('says where each per-prompt field came from: a one-element input, an element of a per-prompt one, a parameter', () => {
    const req = parseInferRequest({}, json({
      inputs: [{ name: 'prompt', shape: [2], datatype: 'BYTES', data: ['a', 'b'] }, { name: 'seed', shape: [1], datatype: 'INT64', data: [1] }, { name: 'eta', shape: [2], datatype: 'FP32', data: [0, 2] }],
      parameters: { seed: 5, guidance_scale: 'x' },
    }));
    expect([0, 1].map((i) => ['prompt', 'seed', 'eta', 'guidance_scale', 'width'].map((f) => fieldSource(req, i, f)))).toEqual([
      ['input "prompt" data[0]', 'input "seed"', 'input "eta" data[0]', 'parameters.guidance_scale', undefined],
      ['input "prompt" data[1]', 'input "seed"', 'input "eta" data[1]', 'parameters.guidance_scale', undefined],
    ]);
    const relabel = v2Relabel(req);
    expect(relabel('prompt[1].eta must be a number from 0 to 1, got 2', 1)).toBe('input "eta" data[1] must be a number from 0 to 1, got 2');
    expect(relabel('prompt[0].mask_image needs an prompt[0].image to work on', 0)).toBe('mask_image needs an image to work on');
    expect(relabel('prompt[0].loras[1].scale must be a number', 0)).toBe('loras[1].scale must be a number');
  });

  it('refuses binary sizes that do not add up, and a body too short for its header length', () => {
    const { headers, body } = binaryBody([{ name: 'prompt', datatype: 'BYTES', shape: [1], bytes: bytesElems('a') }]);
    expect(() => parseInferRequest(headers, Buffer.concat([body, Buffer.from([0])]))).toThrow(/the binary data is 6 bytes but the inputs' binary_data_size add up to 5/);
    expect(() => parseInferRequest({ 'inference-header-content-length': '9999' }, body)).toThrow(/inference-header-content-length must be an integer from 1 to the body length/);
    expect(() => parseInferRequest({ 'content-type': 'application/octet-stream' }, Buffer.from([1, 2]))).toThrow("received byte inputs, but the'inference-header-content-length' header is missing.");
  });

  it('names a header length that counts into the binary data as such, not as bytes that are not UTF-8', () => {
    const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    const { headers, body } = binaryBody([{ name: 'image', datatype: 'BYTES', shape: [1], bytes: bytesElems(png) }]);
    const n = Number(headers['inference-header-content-length']);
    // Five bytes more: the element's length prefix and the PNG's first byte, 0x89 (before: "invalid UTF-8 at byte …").
    for (const more of [3, 5]) {
      expect(() => parseInferRequest({ 'inference-header-content-length': String(n + more) }, body))
        .toThrow(`inference-header-content-length (${n + more}) counts past the end of the JSON header, which ends at byte ${n}; send the JSON header's length in bytes`);
    }
    // After a byte order mark (skipped when the header parses), the end counts it.
    const bom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), body]);
    expect(() => parseInferRequest({ 'inference-header-content-length': String(n + 3 + 5) }, bom))
      .toThrow(`inference-header-content-length (${n + 8}) counts past the end of the JSON header, which ends at byte ${n + 3}; send the JSON header's length in bytes`);
    // A header that is itself not UTF-8 still says so.
    const latin1 = Buffer.concat([Buffer.from('{"inputs":"caf'), Buffer.from([0xe9]), Buffer.from('"}')]);
    expect(() => parseInferRequest({ 'inference-header-content-length': String(latin1.length) }, latin1)).toThrow(/invalid UTF-8 at byte 14/);
    // Both at once: the header's bad byte is named, not a JSON end counted on U+FFFD's three bytes (before: "counts past
    // the end of the JSON header, which ends at byte 19", for a length of 19 and a header of 17 bytes).
    const both = Buffer.concat([latin1, png]);
    expect(() => parseInferRequest({ 'inference-header-content-length': String(latin1.length + 2) }, both)).toThrow(/invalid UTF-8 at byte 14/);
  });

  it('refuses binary data holding more elements than the shape by its size, without decoding them one by one', () => {
    // 16 MB: 4 M FP32 values (decoded one by one, ~4 s of a blocked event loop), 4 M empty BYTES elements.
    const f32 = Buffer.alloc(16 * 1024 * 1024);
    for (let o = 0; o < f32.length; o += 4) f32.writeFloatLE(0.3 + o / 1e9, o);
    const prompt = { name: 'prompt', datatype: 'BYTES', shape: [1], bytes: bytesElems('a') };
    const floats = binaryBody([prompt, { name: 'eta', datatype: 'FP32', shape: [1], bytes: f32 }]);
    const empties = binaryBody([{ ...prompt, bytes: Buffer.alloc(16 * 1024 * 1024) }]);
    // Counted reads, not time: no FP32 value is read, and one BYTES length per element of the shape (the prompt's).
    expect(reads('readFloatLE', () => expect(() => parseInferRequest(floats.headers, floats.body))
      .toThrow('input "eta": shape [1] holds 1 elements (4 bytes of FP32) but binary_data_size is 16777216 (4194304 elements)'))).toBe(0);
    expect(reads('readUInt32LE', () => expect(() => parseInferRequest(empties.headers, empties.body))
      .toThrow('input "prompt": shape [1] holds 1 elements but its binary data has more (16777212 bytes left after element 1)'))).toBe(1);
    // Fewer elements than the shape: named as before.
    const short = binaryBody([{ ...prompt, shape: [2] }]);
    expect(() => parseInferRequest(short.headers, short.body)).toThrow('input "prompt": shape [2] holds 2 elements but data has 1');
  });

  it('reads each binary input from its own bytes when an input before it is refused (no problem named for a good one)', () => {
    const f32 = Buffer.alloc(4);
    f32.writeFloatLE(20);
    const prompt = { name: 'prompt', datatype: 'BYTES', shape: [1], bytes: bytesElems('a fox') };
    const cases: Array<[{ name: string; datatype: string; shape: number[] }, string | RegExp]> = [
      [{ name: 'num_inference_steps', datatype: 'FP32', shape: [1] }, 'input "num_inference_steps" must have an integer datatype (INT32, INT64, …), got FP32'],
      [{ name: 'seed', datatype: 'INT32', shape: [2] }, 'input "seed": shape [2] holds 2 elements (8 bytes of INT32) but binary_data_size is 4 (1 elements)'],
      [{ name: 'stepz', datatype: 'INT32', shape: [1] }, /^input "stepz" is not a known field; known fields: [a-z_, ]+$/],
    ];
    for (const [first, problem] of cases) {
      const { headers, body } = binaryBody([{ ...first, bytes: f32 }, prompt]);
      let message = '';
      try {
        parseInferRequest(headers, body);
      } catch (err) {
        message = (err as Error).message;
      }
      // The prompt's 4-byte length would otherwise be read from the refused input's bytes (20 as FP32: 1101004800).
      if (problem instanceof RegExp) expect(message).toMatch(problem);
      else expect(message).toBe(problem);
    }
  });

  it('reads an FP32 as the shortest decimal that is the same float32', () => {
    expect([shortestFloat32(Math.fround(0.7)), shortestFloat32(Math.fround(1 / 3)), shortestFloat32(0), shortestFloat32(-Infinity)]).toEqual([0.7, 0.33333334, 0, -Infinity]);
  });
});

describe('V2 codec: answers', () => {
  const png = (n: number) => Uint8Array.from({ length: n }, (_, i) => i).buffer;
  const results = [{ images: [{ data: png(5), seed: 7, width: 8, height: 8, format: 'png' }, { data: png(3), seed: 8, width: 8, height: 8, format: 'png' }] }] as unknown as TaskResult[];

  it('encodes JSON outputs: base64 images and seeds', () => {
    const req = parseInferRequest({}, json({ id: 'r', inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['a'] }] }));
    const out = encodeInferResponse('model', req, results);
    expect(out.contentType).toBe('application/json');
    expect(out.headerLength).toBeUndefined();
    expect(JSON.parse(String(out.body))).toEqual({
      model_name: 'model', id: 'r',
      outputs: [
        { name: 'image', shape: [2], datatype: 'BYTES', data: [Buffer.from(png(5)).toString('base64'), Buffer.from(png(3)).toString('base64')] },
        { name: 'seed', shape: [2], datatype: 'INT64', data: [7, 8] },
      ],
    });
  });

  it('encodes binary outputs after the JSON header, each with its binary_data_size', () => {
    const req = parseInferRequest({}, json({ id: 'r', inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['a'] }], parameters: { binary_data_output: true } }));
    const out = encodeInferResponse('model', req, results);
    const body = out.body as Buffer;
    expect(out.contentType).toBe('application/octet-stream');
    const header = JSON.parse(body.subarray(0, out.headerLength).toString()) as { outputs: Array<{ parameters: { binary_data_size: number } }> };
    expect(header.outputs.map((o) => o.parameters.binary_data_size)).toEqual([4 + 5 + 4 + 3, 16]);
    const rest = body.subarray(out.headerLength);
    expect(rest.subarray(0, 16)).toEqual(bytesElems(Buffer.from(png(5)), Buffer.from(png(3))));
    expect([rest.readBigInt64LE(16), rest.readBigInt64LE(24)]).toEqual([7n, 8n]);
  });
});
