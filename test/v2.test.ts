/** KServe V2 / Open Inference Protocol over a real socket (the runtime in-process): metadata, infer, binary extension, errors. */
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFailedRuntime, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { pngSize, postJson } from './helpers/server.js';

let srv: RuntimeHandle;
const infer = (body: unknown, init: RequestInit = {}) => postJson(`${srv.url}/v2/models/model/infer`, body, init);
const prompt = (...p: string[]) => ({ name: 'prompt', shape: [p.length], datatype: 'BYTES', data: p });
const small = { num_inference_steps: 3, height: 64, width: 64 };

beforeAll(async () => {
  srv = await startRuntime({ STORAGE_URI: undefined, MAX_BODY_BYTES: '65536', MAX_IMAGE_SIZE: '1024' }, { ready: true });
});
afterAll(async () => {
  await srv?.stop();
});

describe('V2 metadata and health', () => {
  it('answers /v2, /v2/models, model metadata and readiness', async () => {
    const v2 = await fetch(`${srv.url}/v2`);
    expect([v2.status, await v2.json()]).toEqual([200, { name: 'diffusers-runtime', version: '0.1.0', extensions: ['binary_tensor_data'] }]);
    expect(await (await fetch(`${srv.url}/v2/models`)).json()).toEqual({ models: ['model'] });
    const meta = (await (await fetch(`${srv.url}/v2/models/model`)).json()) as Record<string, unknown>;
    expect(meta).toMatchObject({ name: 'model', versions: [], platform: 'onnx-diffusers', outputs: [{ name: 'image', datatype: 'BYTES', shape: [-1] }, { name: 'seed', datatype: 'INT64', shape: [-1] }] });
    const inputs = meta.inputs as Array<{ name: string; datatype: string; shape: number[] }>;
    expect(inputs[0]).toEqual({ name: 'prompt', datatype: 'BYTES', shape: [-1] });
    expect(inputs.map((i) => i.name)).toEqual(expect.arrayContaining(['negative_prompt', 'seed', 'num_inference_steps', 'guidance_scale', 'height', 'width', 'scheduler', 'output_format']));
    const rd = await fetch(`${srv.url}/v2/models/model/ready`);
    expect([rd.status, await rd.json()]).toEqual([200, { name: 'model', ready: true }]);
    expect(await (await fetch(`${srv.url}/v2/health/ready`)).json()).toEqual({ ready: true });
    const nf = await fetch(`${srv.url}/v2/models/nope`);
    expect([nf.status, await nf.json()]).toEqual([404, { error: 'Model with name nope does not exist. This server serves "model" (GET /v1/models).', code: 'MODEL_NOT_FOUND' }]);
    const nfr = await fetch(`${srv.url}/v2/models/nope/ready`);
    expect(nfr.status).toBe(404);
  });

  it('answers 501 for versions in the path, before reading the body', async () => {
    for (const p of ['/v2/models/model/versions/1', '/v2/models/model/versions/1/ready']) {
      const r = await fetch(srv.url + p);
      expect([r.status, await r.json()]).toEqual([501, { error: 'Model versioning not supported yet.', code: 'UNSUPPORTED' }]);
    }
    const r = await postJson(`${srv.url}/v2/models/model/versions/1/infer`, { inputs: [prompt('x')] });
    expect([r.status, r.json.error]).toEqual([501, 'Model versioning not supported yet.']);
  });
});

describe('V2 infer', () => {
  it('generates one PNG per prompt with its seed, and echoes the id (the PROTOCOLS.md example)', async () => {
    const r = await infer({ id: '1', inputs: [prompt('a red fox')], parameters: { num_inference_steps: 4, seed: 7, height: 64, width: 64 } });
    expect(r.status).toBe(200);
    expect(r.json.model_name).toBe('model');
    expect(r.json.id).toBe('1');
    const [image, seed] = r.json.outputs as Array<{ name: string; shape: number[]; datatype: string; data: unknown[] }>;
    expect({ ...image!, data: undefined }).toEqual({ name: 'image', shape: [1], datatype: 'BYTES', data: undefined });
    expect(seed).toEqual({ name: 'seed', shape: [1], datatype: 'INT64', data: [7] });
    const png = Buffer.from(image!.data[0] as string, 'base64');
    expect(pngSize(png)).toEqual({ width: 64, height: 64 });
    // Same request through V1: the same bytes.
    const v1 = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a red fox', num_inference_steps: 4, seed: 7, height: 64, width: 64 }] });
    expect((v1.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64).toBe(image!.data[0]);
  });

  it('takes n prompts from shape [n], per-prompt named inputs and broadcast ones; generates a uuid4 id', async () => {
    const r = await infer({
      inputs: [
        prompt('one', 'two'),
        { name: 'seed', shape: [2], datatype: 'INT64', data: [5, 9] },
        { name: 'num_inference_steps', shape: [1], datatype: 'INT32', data: [2] },
        { name: 'negative_prompt', shape: [1, 1], datatype: 'BYTES', data: [['blurry']] },
      ],
      parameters: { height: 64, width: 64 },
    });
    expect(r.status).toBe(200);
    expect(r.json.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    const outs = r.json.outputs as Array<{ name: string; shape: number[]; data: unknown[] }>;
    expect(outs[0]!.shape).toEqual([2]);
    expect(outs[1]!.data).toEqual([5, 9]);
    expect(outs[0]!.data[0]).not.toBe(outs[0]!.data[1]);
  });

  it('returns only the requested outputs', async () => {
    const r = await infer({ inputs: [prompt('x')], parameters: { ...small, seed: 1 }, outputs: [{ name: 'seed' }] });
    expect(r.json.outputs).toEqual([{ name: 'seed', shape: [1], datatype: 'INT64', data: [1] }]);
    // An empty list is every output (as Triton reads it), not an answer without the image that was made.
    const all = await infer({ inputs: [prompt('x')], parameters: { ...small, seed: 1 }, outputs: [] });
    expect((all.json.outputs as Array<{ name: string }>).map((o) => o.name)).toEqual(['image', 'seed']);
  });

  it('encodes jpeg and webp on request', async () => {
    for (const fmt of ['jpeg', 'webp'] as const) {
      const r = await infer({ inputs: [prompt('x')], parameters: { ...small, seed: 3, output_format: fmt, quality: 80 } });
      expect(r.status).toBe(200);
      const buf = Buffer.from((r.json.outputs as Array<{ data: string[] }>)[0]!.data[0]!, 'base64');
      const meta = await sharp(buf).metadata();
      expect([meta.format, meta.width, meta.height]).toEqual([fmt, 64, 64]);
    }
  });

  it('sends the image as binary data after the JSON header (binary_data_output), BYTES elements length-prefixed', async () => {
    const body = { id: 'b', inputs: [prompt('fox', 'owl')], parameters: { ...small, seed: 21, binary_data_output: true } };
    const res = await fetch(`${srv.url}/v2/models/model/infer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/octet-stream');
    const raw = Buffer.from(await res.arrayBuffer());
    const n = Number(res.headers.get('inference-header-content-length'));
    const header = JSON.parse(raw.subarray(0, n).toString()) as { outputs: Array<{ name: string; parameters: { binary_data_size: number } }> };
    expect(header.outputs.map((o) => o.name)).toEqual(['image', 'seed']);
    const imgBytes = header.outputs[0]!.parameters.binary_data_size;
    expect(n + imgBytes + header.outputs[1]!.parameters.binary_data_size).toBe(raw.length);
    let o = n;
    const pngs: Buffer[] = [];
    while (o < n + imgBytes) {
      const len = raw.readUInt32LE(o);
      pngs.push(raw.subarray(o + 4, o + 4 + len));
      o += 4 + len;
    }
    expect(pngs.map((p) => pngSize(p))).toEqual([{ width: 64, height: 64 }, { width: 64, height: 64 }]);
    expect([raw.readBigInt64LE(o), raw.readBigInt64LE(o + 8)]).toEqual([21n, 21n]);
    // The JSON form of the same request carries the same bytes.
    const j = await infer({ ...body, parameters: { ...small, seed: 21 } });
    expect((j.json.outputs as Array<{ data: string[] }>)[0]!.data).toEqual(pngs.map((p) => p.toString('base64')));
  });

  it('binary output for one output only (per-output binary_data)', async () => {
    const res = await fetch(`${srv.url}/v2/models/model/infer`, {
      method: 'POST',
      body: JSON.stringify({ inputs: [prompt('x')], parameters: { ...small, seed: 2 }, outputs: [{ name: 'image', parameters: { binary_data: true } }, { name: 'seed' }] }),
    });
    const raw = Buffer.from(await res.arrayBuffer());
    const n = Number(res.headers.get('inference-header-content-length'));
    const header = JSON.parse(raw.subarray(0, n).toString()) as { outputs: Array<Record<string, unknown>> };
    expect(header.outputs[1]).toEqual({ name: 'seed', shape: [1], datatype: 'INT64', data: [2] });
    expect(raw.length - n).toBe((header.outputs[0]!.parameters as { binary_data_size: number }).binary_data_size);
  });

  it('accepts binary inputs (BYTES prompts, INT64 seed) after the JSON header', async () => {
    const bytesTensor = (xs: string[]) => Buffer.concat(xs.flatMap((x) => { const b = Buffer.from(x); const l = Buffer.alloc(4); l.writeUInt32LE(b.length); return [l, b]; }));
    const p = bytesTensor(['a red fox']);
    const seed = Buffer.alloc(8);
    seed.writeBigInt64LE(7n);
    const header = Buffer.from(JSON.stringify({
      inputs: [
        { name: 'prompt', shape: [1], datatype: 'BYTES', parameters: { binary_data_size: p.length } },
        { name: 'seed', shape: [1], datatype: 'INT64', parameters: { binary_data_size: 8 } },
      ],
      parameters: { num_inference_steps: 4, height: 64, width: 64 },
    }));
    const res = await fetch(`${srv.url}/v2/models/model/infer`, {
      method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) }, body: Buffer.concat([header, p, seed]),
    });
    expect(res.status).toBe(200);
    const j = (await res.json()) as { outputs: Array<{ data: unknown[] }> };
    const ref = await infer({ inputs: [prompt('a red fox')], parameters: { num_inference_steps: 4, seed: 7, height: 64, width: 64 } });
    expect(j.outputs[0]!.data).toEqual((ref.json.outputs as Array<{ data: unknown[] }>)[0]!.data);
    expect(j.outputs[1]!.data).toEqual([7]);
  });

  it('names the missing Inference-Header-Content-Length of a binary body sent as tritonclient frames it, without a Content-Type', async () => {
    const p = Buffer.concat([Buffer.from([9, 0, 0, 0]), Buffer.from('a red fox')]);
    const header = JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', parameters: { binary_data_size: p.length } }], parameters: { binary_data_output: true } });
    // fetch gives a Buffer body no Content-Type, as tritonclient sends none.
    const res = await fetch(`${srv.url}/v2/models/model/infer`, { method: 'POST', body: Buffer.concat([Buffer.from(header), p]) });
    expect([res.status, await res.json()]).toEqual([400, { code: 'INVALID_INPUT', error: "received byte inputs, but the'inference-header-content-length' header is missing." }]);
    // Two JSON requests in one body are no binary request: still a body that does not parse.
    const two = await fetch(`${srv.url}/v2/models/model/infer`, { method: 'POST', body: Buffer.from(JSON.stringify({ inputs: [prompt('x')] }).repeat(2)) });
    expect([two.status, await two.json()]).toEqual([400, { code: 'INVALID_INPUT', error: expect.stringMatching(/^Unrecognized request format: Unexpected non-whitespace character after JSON at position 74/) }]);
  });

  it('400s binary data that holds more elements than its shape, naming both sizes', async () => {
    const p = Buffer.from([1, 0, 0, 0, 0x78]);
    const eta = Buffer.alloc(60_000);
    const header = Buffer.from(JSON.stringify({
      inputs: [
        { name: 'prompt', shape: [1], datatype: 'BYTES', parameters: { binary_data_size: p.length } },
        { name: 'eta', shape: [1], datatype: 'FP32', parameters: { binary_data_size: eta.length } },
      ],
    }));
    const res = await fetch(`${srv.url}/v2/models/model/infer`, {
      method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) }, body: Buffer.concat([header, p, eta]),
    });
    expect([res.status, await res.json()]).toEqual([400, { code: 'INVALID_INPUT', error: 'input "eta": shape [1] holds 1 elements (4 bytes of FP32) but binary_data_size is 60000 (15000 elements)' }]);
  });

  it('a BYTES prompt with a leading U+FEFF draws as the same prompt in JSON (and without the mark, which ftfy drops)', async () => {
    const text = '\ufeffa red fox';
    const p = Buffer.concat([Buffer.alloc(4), Buffer.from(text)]);
    p.writeUInt32LE(p.length - 4);
    const header = Buffer.from(JSON.stringify({ inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', parameters: { binary_data_size: p.length } }], parameters: { ...small, seed: 7 } }));
    const res = await fetch(`${srv.url}/v2/models/model/infer`, {
      method: 'POST', headers: { 'content-type': 'application/octet-stream', 'inference-header-content-length': String(header.length) }, body: Buffer.concat([header, p]),
    });
    const bin = (await res.json()) as { outputs: Array<{ data: unknown[] }> };
    const ref = await infer({ inputs: [prompt(text)], parameters: { ...small, seed: 7 } });
    const plain = await infer({ inputs: [prompt('a red fox')], parameters: { ...small, seed: 7 } });
    const image = (j: { outputs: Array<{ data: unknown[] }> }) => j.outputs[0]!.data[0];
    // The codec keeps the mark (v2-codec.test); the tokenizer then drops it as ftfy does, so all three draw alike.
    expect(image(bin)).toEqual(image(ref.json as typeof bin));
    expect(image(ref.json as typeof bin)).toEqual(image(plain.json as typeof bin));
  });

  const cases: Array<[string, string | object, RegExp, Record<string, string>?]> = [
    ['malformed JSON', '{"inputs": [', /^Unrecognized request format/],
    ['not an object', '[1]', /JSON object/],
    ['no inputs', {}, /no "inputs"/],
    ['empty inputs', { inputs: [] }, /non-empty/],
    ['no prompt', { inputs: [{ name: 'seed', shape: [1], datatype: 'INT64', data: [1] }] }, /"prompt" is required/],
    ['prompt not BYTES', { inputs: [{ name: 'prompt', shape: [1], datatype: 'INT32', data: [1] }] }, /prompt" must have datatype BYTES/],
    ['prompt element not a string', { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: [1] }] }, /data\[0\] must be a string/],
    ['shape mismatch', { inputs: [{ name: 'prompt', shape: [2], datatype: 'BYTES', data: ['x'] }] }, /holds 2 elements but data has 1/],
    ['no shape', { inputs: [{ name: 'prompt', datatype: 'BYTES', data: ['x'] }] }, /^input "prompt": shape is missing \(a list of dimensions, e\.g\. \[1\] for one prompt\)$/],
    ['negative dims', { inputs: [{ name: 'prompt', shape: [-10, -10], datatype: 'BYTES', data: ['x'] }] }, /^input "prompt": shape must be a list of non-negative integers$/],
    ['unknown input', { inputs: [prompt('x'), { name: 'colour', shape: [1], datatype: 'BYTES', data: ['red'] }] }, /^input "colour" is not a known field; known fields: prompt, /],
    ['unknown datatype', { inputs: [{ name: 'prompt', shape: [1], datatype: 'STRING', data: ['x'] }] }, /datatype must be one of/],
    ['a value outside its integer datatype', { inputs: [prompt('x'), { name: 'num_inference_steps', shape: [1], datatype: 'INT8', data: [200] }] }, /^input "num_inference_steps": data\[0\] 200 is outside INT8's range, -128 to 127$/],
    ['a UINT64 seed past what a JSON number holds', { inputs: [prompt('x'), { name: 'seed', shape: [1], datatype: 'UINT64', data: [18446744073709551615] }] }, /^input "seed": data\[0\] 18446744073709552000 is outside UINT64's range, 0 to 9007199254740991 \(as a JSON number\)$/],
    ['a fraction in an integer tensor', { inputs: [prompt('x'), { name: 'seed', shape: [1], datatype: 'INT32', data: [1.5] }] }, /^input "seed": data\[0\] must be an integer for datatype INT32, got 1\.5$/],
    ['FP16 in JSON', { inputs: [prompt('x'), { name: 'guidance_scale', shape: [1], datatype: 'FP16', data: [7.5] }] }, /^Receiving FP16 data via JSON is not supported\. Please use the binary data format for input guidance_scale$/],
    ['nested parameters', { inputs: [prompt('x')], parameters: { seed: { value: 1 } } }, /parameters\.seed must be a string, number or boolean/],
    ['unknown parameter', { inputs: [prompt('x')], parameters: { stepz: 4 } }, /parameters\.stepz is not a known field/],
    ['bad parameter value', { inputs: [prompt('x')], parameters: { num_inference_steps: 0 } }, /num_inference_steps must be an integer/],
    ['per-prompt count mismatch', { inputs: [prompt('a', 'b', 'c'), { name: 'seed', shape: [2], datatype: 'INT64', data: [1, 2] }] }, /"seed" must have 1 element or one per prompt \(3\)/],
    ['id not a string', { id: 5, inputs: [prompt('x')] }, /id must be a string/],
    ['unknown output', { inputs: [prompt('x')], outputs: [{ name: 'latents' }] }, /outputs\[0\]\.name "latents" is unknown/],
    ['an output requested twice', { inputs: [prompt('x')], outputs: [{ name: 'seed' }, { name: 'image' }, { name: 'seed', parameters: { binary_data: true } }] }, /^outputs\[2\]: output "seed" is requested twice$/],
    ['binary input without the header', { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', parameters: { binary_data_size: 5 } }] }, /inference-header-content-length' header is missing/],
    ['octet-stream without the header', 'not json at all', /inference-header-content-length' header is missing/, { 'content-type': 'application/octet-stream' }],
    ['bad header length', '{"inputs":[]}', /inference-header-content-length must be an integer/, { 'inference-header-content-length': '999' }],
    ['several problems at once', { id: 1, inputs: [{ name: 'prompt', shape: [1], datatype: 'INT8', data: [1] }], parameters: { x: [1] } }, /id must be.*; .*parameters\.x.*; .*BYTES/],
  ];
  it.each(cases)('400 for %s, with an {"error"} body and no stack', async (_n, body, pattern, headers) => {
    const r = await infer(body, headers ? { headers: { 'content-type': 'application/json', ...headers } } : {});
    expect(r.status).toBe(400);
    expect(r.json.error).toMatch(pattern);
    expect(r.json.code).toBe('INVALID_INPUT');
    expect(JSON.stringify(r.json)).not.toMatch(/at .*\.js:\d+|TypeError|SyntaxError:|detail/);
  });

  it('400s a top-level key the protocol does not have, naming it, rather than ignoring it', async () => {
    const steps = await infer({ inputs: [prompt('x')], num_inference_steps: 4, model_name: 'model' });
    expect([steps.status, steps.json.error]).toEqual([400,
      '"num_inference_steps" is not a known top-level field; a V2 request holds only "id", "parameters", "inputs", "outputs", and "model_name" and "model_version" as KServe\'s client sends them (generation fields go in "parameters" or as named inputs: {"inputs":[{"name":"prompt",…}],"parameters":{"num_inference_steps":…}})']);
    // KServe's Python client (InferRequest.to_rest) sends the model's name beside id and inputs: taken when it is this
    // model, named when it is another; a version is refused as the versioned path is.
    const other = await infer({ inputs: [prompt('x')], model_name: 'sdxl', model_version: '2' });
    expect([other.status, other.json.error]).toEqual([400,
      'model_name "sdxl" is not the model this route serves ("model"); send the request to /v2/models/sdxl/infer or leave model_name out; '
      + 'model_version "2": this server has no model versions; leave model_version out (or empty)']);
    const sdk = await infer({ id: 'sdk-1', model_name: 'model', model_version: null, inputs: [prompt('a red fox')], parameters: { ...small, seed: 7 } });
    expect([sdk.status, sdk.json.id, sdk.json.model_name]).toEqual([200, 'sdk-1', 'model']);
    const v1 = await infer({ instances: [{ prompt: 'x' }] });
    expect([v1.status, v1.json.error]).toEqual([400, '"instances" is V1\'s body (POST /v1/models/{name}:predict); a V2 request holds "id", "parameters", "inputs", "outputs"; the request has no "inputs" list']);
    // The four keys, null ones included, are still taken.
    const ok = await infer({ id: null, inputs: [prompt('a red fox')], outputs: null, parameters: { ...small, seed: 7 } });
    expect(ok.status).toBe(200);
  });

  it('names a bad value where the client put it: the parameter, or the input tensor and its element', async () => {
    const two = (params: object, ...inputs: object[]) => infer({ inputs: [prompt('a', 'b'), ...inputs], parameters: { ...small, ...params } });
    const param = await two({ num_inference_steps: 'x' });
    // One problem for the parameter both prompts share, not one per prompt.
    expect([param.status, param.json.error]).toEqual([400, 'parameters.num_inference_steps must be an integer from 1 to 500, got "x"']);
    const perPrompt = await two({}, { name: 'guidance_scale', shape: [2], datatype: 'FP32', data: [7, 200] });
    expect(perPrompt.json.error).toBe('input "guidance_scale" data[1] must be a number from 0 to 100, got 200');
    // A named input wins over the parameter of the same name, and is what the message names.
    const shared = await two({ eta: 0.5 }, { name: 'eta', shape: [1], datatype: 'FP32', data: [3] });
    expect(shared.json.error).toBe('input "eta" must be a number from 0 to 1, got 3');
    const tag = await infer({ inputs: [prompt('a', 'b <lora:x:0.5>')], parameters: small });
    expect(tag.json.error).toBe('input "prompt" data[1] holds "<lora:x:0.5>", AUTOMATIC1111\'s LoRA syntax, which this runtime does not read from a prompt (it would be prompt text); remove it and send loras: [{"name":"x","scale":0.5}]');
    const loras = await two({ loras: '[{' });
    expect(loras.json.error).toMatch(/^parameters\.loras is not JSON: /);
    const several = await two({ output_format: 'gif' }, { name: 'seed', shape: [2], datatype: 'INT64', data: [1, -1] });
    expect(several.json.error).toBe(`parameters.output_format must be one of png, jpeg, webp, got "gif"; input "seed" data[1] must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}, got -1; leave seed out for a random one, returned with the image`);
  });

  it('takes Triton\'s request parameters as tritonclient sends them: timeout (µs) bounds the request with a 504, priority is read and not used', async () => {
    const params = { num_inference_steps: 2, seed: 11, height: 64, width: 64 };
    const plain = await infer({ inputs: [prompt('a harbour')], parameters: params });
    const given = await infer({ inputs: [prompt('a harbour')], parameters: { ...params, priority: 3, timeout: 600_000_000 } });
    expect([plain.status, given.status]).toEqual([200, 200]);
    expect(given.json.outputs).toEqual(plain.json.outputs);
    // No seed, so no cached answer: the generation runs, and 1 ms is over long before its 200 steps are.
    const slow = await infer({ inputs: [prompt('a slow harbour')], parameters: { num_inference_steps: 200, height: 256, width: 256, timeout: 1000 } });
    expect([slow.status, slow.json.code, slow.json.error]).toEqual([504, 'TIMEOUT', 'the request took longer than its parameters.timeout (1000 µs) and was stopped']);
    const bad = await infer({ inputs: [prompt('x')], parameters: { timeout: -1, priority: 1.5 } });
    expect([bad.status, bad.json.error]).toEqual([400, 'parameters.timeout must be a non-negative integer (microseconds, as Triton reads it; 0 for none), got -1; '
      + 'parameters.priority must be a non-negative integer (Triton\'s priority level; read and not used here, every request sharing one queue), got 1.5']);
    expect((await infer({ inputs: [prompt('a harbour')], parameters: { ...params, timeout: 0 } })).status).toBe(200);
  });

  it('404s an unknown model and 413s an oversize body', async () => {
    const r = await postJson(`${srv.url}/v2/models/nope/infer`, { inputs: [prompt('x')] });
    expect([r.status, r.json.error]).toEqual([404, 'Model with name nope does not exist. This server serves "model" (GET /v1/models).']);
    const big = await infer({ inputs: [prompt('x'.repeat(70_000))] });
    expect(big.status).toBe(413);
    const m = await fetch(`${srv.url}/v2/models/model/infer`);
    expect(m.status).toBe(405);
  });
});

describe('V2 on a server that is not ready', () => {
  it('503s infer and readiness with Retry-After before reading the body', async () => {
    const down = await startFailedRuntime();
    try {
      const r = await postJson(`${down.url}/v2/models/model/infer`, { inputs: [prompt('x')] });
      expect(r.status).toBe(503);
      expect(r.json.error).toMatch(/^Model with name model is not ready\./);
      expect(Number(r.headers.get('retry-after'))).toBeGreaterThan(0);
      const rd = await fetch(`${down.url}/v2/models/model/ready`);
      expect([rd.status, await rd.json()]).toMatchObject([503, { code: 'MODEL_NOT_READY', name: 'model', ready: false, state: 'failed' }]);
      const hr = await fetch(`${down.url}/v2/health/ready`);
      expect([hr.status, await hr.json()]).toEqual([503, { error: 'Server is not ready.', code: 'MODEL_NOT_READY', ready: false, state: 'failed' }]);
      expect((await fetch(`${down.url}/v2/health/live`)).status).toBe(200);
      const nf = await postJson(`${down.url}/v2/models/other/infer`, { inputs: [prompt('x')] });
      expect(nf.status).toBe(404);
    } finally {
      await down.stop();
    }
  });
});
