/** The runtime (in-process) over a real socket on the embedded demo model: KServe V1, images, bad input. */
import net from 'node:net';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { metric, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { pngSize, postJson } from './helpers/server.js';

let srv: RuntimeHandle;
const predictUrl = () => `${srv.url}/v1/models/model:predict`;
const b64Of = (j: Record<string, unknown>, i = 0) => Buffer.from(((j.predictions as Array<{ image: { b64: string } }>)[i]!).image.b64, 'base64');

beforeAll(async () => {
  srv = await startRuntime({ STORAGE_URI: undefined, MAX_BODY_BYTES: '65536', MAX_IMAGE_SIZE: '1024', MAX_QUEUE: '8' }, { ready: true });
});
afterAll(async () => {
  await srv?.stop();
});

describe('routes', () => {
  it('answers liveness, model listing, status and readiness', async () => {
    expect(await (await fetch(`${srv.url}/`)).json()).toEqual({ status: 'alive' });
    expect(await (await fetch(`${srv.url}/v2/health/live`)).json()).toEqual({ live: true });
    expect(await (await fetch(`${srv.url}/v1/models`)).json()).toEqual({ models: ['model'] });
    const st = await fetch(`${srv.url}/v1/models/model`);
    expect([st.status, await st.json()]).toEqual([200, { name: 'model', ready: true }]);
    const rd = await fetch(`${srv.url}/v1/models/model/ready`);
    expect(rd.status).toBe(200);
    expect((await fetch(`${srv.url}/v2/health/ready`)).status).toBe(200);
  });

  it('404s an unknown model with KServe message and the name it serves, before reading the body', async () => {
    const r = await postJson(`${srv.url}/v1/models/nope:predict`, { instances: [{ prompt: 'x' }] });
    expect(r.status).toBe(404);
    expect(r.json.error).toBe('Model with name nope does not exist. This server serves "model" (GET /v1/models).');
    const g = await fetch(`${srv.url}/v1/models/nope`);
    expect([g.status, await g.json()]).toEqual([404, { error: 'Model with name nope does not exist. This server serves "model" (GET /v1/models).', code: 'MODEL_NOT_FOUND' }]);
  });

  it('answers unknown routes with 404 and wrong methods with 405, as JSON', async () => {
    const a = await fetch(`${srv.url}/nothing/here`);
    expect([a.status, await a.json()]).toEqual([404, { error: 'Not Found: /nothing/here', code: 'NOT_FOUND' }]);
    const b = await fetch(`${srv.url}/v1/models/model:predict`);
    expect([b.status, await b.json()]).toEqual([405, { error: 'GET is not allowed on /v1/models/model:predict; use POST', code: 'METHOD_NOT_ALLOWED' }]);
    const v = await fetch(`${srv.url}/v2/nothing`);
    expect([v.status, await v.json()]).toEqual([404, { error: 'Not Found: /v2/nothing', code: 'NOT_FOUND' }]);
    const c = await fetch(`${srv.url}/v1/models`, { method: 'DELETE' });
    expect(c.status).toBe(405);
    const d = await postJson(`${srv.url}/v1/models/model:explain`, { instances: [{ prompt: 'x' }] });
    expect(d.status).toBe(501);
  });

  it('serves Prometheus metrics with the seed names', async () => {
    const text = await (await fetch(`${srv.url}/metrics`)).text();
    for (const name of ['inference_request_count', 'inference_request_duration_seconds', 'model_load_time_seconds']) {
      expect(text).toContain(`# HELP ${name} `);
    }
    expect(text).not.toMatch(/gpu_memory_usage_bytes|gpu_utilization_percent/); // no GPU here: never invented
  });
});

describe('predict', () => {
  it('returns a PNG of the requested size with its seed, deterministic per seed', async () => {
    const body = { instances: [{ prompt: 'a red fox in the snow', num_inference_steps: 8, height: 256, width: 192, seed: 7 }] };
    const a = await postJson(predictUrl(), body);
    expect(a.status).toBe(200);
    const pred = (a.json.predictions as Array<Record<string, unknown>>)[0]!;
    expect(pred.seed).toBe(7);
    expect(pred.format).toBe('png');
    const png = b64Of(a.json);
    expect(pngSize(png)).toEqual({ width: 192, height: 256 });
    const meta = await sharp(png).metadata();
    expect([meta.width, meta.height, meta.channels]).toEqual([192, 256, 3]);
    const b = await postJson(predictUrl(), body);
    expect(b64Of(b.json).equals(png)).toBe(true);
  });

  it('gives a different image for a different prompt or seed, and varies with steps', async () => {
    const base = { prompt: 'a red fox in the snow', num_inference_steps: 6, height: 128, width: 128, seed: 11 };
    const img = async (over: Record<string, unknown>) => b64Of((await postJson(predictUrl(), { instances: [{ ...base, ...over }] })).json);
    const ref = await img({});
    const [p, s, n] = await Promise.all([img({ prompt: 'a blue whale' }), img({ seed: 12 }), img({ num_inference_steps: 7 })]);
    for (const other of [p, s, n]) {
      const [x, y] = await Promise.all([sharp(ref).raw().toBuffer(), sharp(other).raw().toBuffer()]);
      let diff = 0;
      for (let i = 0; i < x.length; i++) diff += Math.abs(x[i]! - y[i]!);
      expect(diff / x.length).toBeGreaterThan(0.5);
    }
  });

  it('serves the seed example request at 512x512 / 50 steps', async () => {
    const t0 = performance.now();
    const r = await postJson(predictUrl(), {
      instances: [{ prompt: 'a photo of a dog', negative_prompt: 'blurry, low quality', num_inference_steps: 50, guidance_scale: 7.5, height: 512, width: 512 }],
    });
    expect(r.status).toBe(200);
    expect(pngSize(b64Of(r.json))).toEqual({ width: 512, height: 512 });
    const seed = (r.json.predictions as Array<{ seed: number }>)[0]!.seed;
    expect(Number.isSafeInteger(seed)).toBe(true);
    console.log(`seed example 512x512/50 steps: ${(performance.now() - t0).toFixed(0)} ms`);
  });

  it('returns one prediction per image for several instances and num_images_per_prompt', async () => {
    const r = await postJson(predictUrl(), {
      instances: [
        { prompt: 'one', num_inference_steps: 3, height: 64, width: 64, seed: 100, num_images_per_prompt: 2 },
        { prompt: 'two', num_inference_steps: 3, height: 64, width: 64, seed: 5 },
      ],
    });
    expect(r.status).toBe(200);
    expect((r.json.predictions as Array<{ seed: number }>).map((p) => p.seed)).toEqual([100, 101, 5]);
  });

  it("takes TensorFlow Serving's default signature_name beside instances", async () => {
    const r = await postJson(predictUrl(), { signature_name: 'serving_default', instances: [{ prompt: 'one', num_inference_steps: 3, height: 64, width: 64, seed: 9 }] });
    expect([r.status, (r.json.predictions as Array<{ seed: number }>).map((p) => p.seed)]).toEqual([200, [9]]);
  });

  it('keeps answering liveness while a long generation runs', async () => {
    const started = performance.now();
    const long = postJson(predictUrl(), { instances: [{ prompt: 'long', num_inference_steps: 500, height: 1024, width: 1024, seed: 1 }] });
    let done = false;
    void long.then(() => (done = true));
    // Probes from when a worker holds the generation (not a fixed wait: a slow machine may still be reading the body).
    while ((await metric(srv, 'worker_busy')) === 0) await new Promise((r) => setTimeout(r, 20));
    const lat: number[] = [];
    const whileRunning: boolean[] = [];
    while (!done && lat.length < 40) {
      const t = performance.now();
      const res = await fetch(`${srv.url}/v2/health/live`);
      expect(res.status).toBe(200);
      lat.push(performance.now() - t);
      whileRunning.push(!done);
      await new Promise((r) => setTimeout(r, 50));
    }
    const r = await long;
    expect(r.status).toBe(200);
    const total = performance.now() - started;
    // Probes answered before the generation's own answer, each far faster than it. Measured against the generation in
    // the same run, not a fixed bound: a loaded machine slows every answer, the probes' too.
    expect(whileRunning.filter(Boolean).length).toBeGreaterThan(3);
    expect(Math.max(...lat)).toBeLessThan(total / 4);
  });
});

describe('bad input: a clear 400/413 and the server keeps serving', () => {
  const cases: Array<[string, string | object, number, RegExp]> = [
    ['malformed JSON', '{"instances": [', 400, /Unrecognized request format/],
    ['not an object', '[1,2]', 400, /JSON object/],
    ['no instances', {}, 400, /instances/],
    ['instances not a list', { instances: { prompt: 'x' } }, 400, /list/],
    ['missing prompt', { instances: [{}] }, 400, /instances\[0\]\.prompt is required/],
    ['prompt not a string', { instances: [{ prompt: 42 }] }, 400, /instances\[0\]\.prompt must be a string/],
    // diffusers' list of prompts, as a seed-runtime user may send it: the answer shows the V1 way.
    ['prompt a list', { instances: [{ prompt: ['a', 'b'] }] }, 400,
      /^instances\[0\]\.prompt must be a string, got a list \(one prompt per instance: \{"instances":\[\{"prompt":"a"\},\{"prompt":"b"\}\]\}\)$/],
    ['prompt an object', { instances: [{ prompt: { a: 1 } }] }, 400, /prompt must be a string, got an object/],
    ['steps zero', { instances: [{ prompt: 'x', num_inference_steps: 0 }] }, 400, /num_inference_steps/],
    ['steps too many', { instances: [{ prompt: 'x', num_inference_steps: 501 }] }, 400, /num_inference_steps/],
    ['steps fractional', { instances: [{ prompt: 'x', num_inference_steps: 2.5 }] }, 400, /num_inference_steps/],
    ['guidance a string', { instances: [{ prompt: 'x', guidance_scale: 'high' }] }, 400, /guidance_scale must be a number/],
    ['height not multiple of 8', { instances: [{ prompt: 'x', height: 500 }] }, 400, /height must be a positive multiple of 8/],
    ['width negative', { instances: [{ prompt: 'x', width: -8 }] }, 400, /width/],
    ['width above maximum', { instances: [{ prompt: 'x', width: 4096 }] }, 400, /up to 1024/],
    ['huge number', { instances: [{ prompt: 'x', height: 1e308 }] }, 400, /height/],
    ['overflowing number', '{"instances":[{"prompt":"x","guidance_scale":1e999}]}', 400, /guidance_scale/],
    // AUTOMATIC1111's "random" seed: the answer says how to ask for one here.
    ['negative seed', { instances: [{ prompt: 'x', seed: -1 }] }, 400,
      /^instances\[0\]\.seed must be an integer from 0 to 9007199254740991, got -1; leave seed out for a random one, returned with the image$/],
    ['seed too large', { instances: [{ prompt: 'x', seed: 2 ** 60 }] }, 400, /seed/],
    // 2^53 - 1 + 2 - 1 rounds to 2^53 - 1 in doubles: the check passed and the worker refused seed + 1 under no field's name.
    ['seed + images past 2^53 - 1', { instances: [{ prompt: 'x', seed: 2 ** 53 - 1, num_images_per_prompt: 2, num_inference_steps: 1, height: 64, width: 64 }] }, 400,
      /^instances\[0\]\.seed \+ num_images_per_prompt - 1 must be at most 9007199254740991 \(image i uses seed \+ i\), got 9007199254740991 with 2 images$/],
    ['unknown scheduler', { instances: [{ prompt: 'x', scheduler: 'warp9' }] }, 400, /scheduler.*euler/i],
    ['__proto__ key', '{"instances":[{"prompt":"x","__proto__":{"admin":true}}]}', 400, /forbidden key/],
    ['bad output format', { instances: [{ prompt: 'x', output_format: 'bmp' }] }, 400, /output_format/],
    ['several problems at once', { instances: [{ prompt: 1, height: 7 }] }, 400, /prompt.*; .*height/],
    // Top-level fields were ignored without a word: `parameters` (as other V1 servers take them) gave 50-step images.
    ['top-level parameters', { instances: [{ prompt: 'x' }], parameters: { num_inference_steps: 2 } }, 400,
      /^"parameters" is not a known top-level field; a V1 body holds only "instances", and every field goes in each instance/],
    // AUTOMATIC1111's adapter tag was read as prompt text: an image without the adapter, and no word about it.
    ['A1111 <lora:…> tag in the prompt', { instances: [{ prompt: 'a castle, <lora:demo-style:0.8>', seed: 1 }] }, 400,
      /^instances\[0\]\.prompt holds "<lora:demo-style:0\.8>", AUTOMATIC1111's LoRA syntax, .*; remove it and send instances\[0\]\.loras: \[\{"name":"demo-style","scale":0\.8\}\]$/],
    ['A1111 <lyco:…> tag in the negative prompt', { instances: [{ prompt: 'x', negative_prompt: 'blur <LYCO:detail>' }] }, 400,
      /^instances\[0\]\.negative_prompt holds "<LYCO:detail>", .*\[\{"name":"detail","scale":1\}\]$/],
    // TensorFlow Serving's signature_name: the default one is served (below), another is named.
    ['another signature', { signature_name: 'predict_v2', instances: [{ prompt: 'x' }] }, 400,
      /^signature_name: this model has one signature, "serving_default"; leave signature_name out or send that$/],
    ['instances and inputs together', { instances: [{ prompt: 'x' }], inputs: [{ prompt: 'y' }] }, 400, /^the body has both "instances" and "inputs"; send one of them$/],
  ];
  it.each(cases)('%s', async (_name, body, status, pattern) => {
    const r = await postJson(predictUrl(), body);
    expect(r.status).toBe(status);
    expect(r.json.error).toMatch(pattern);
    expect(JSON.stringify(r.json)).not.toMatch(/at .*\.js:\d+|TypeError|SyntaxError:/);
  });

  it('answers an empty list with no prediction (200), as the seed runtime and KServe\'s server do; no list at all is still a 400', async () => {
    for (const body of [{ instances: [] }, { inputs: [] }]) {
      const r = await fetch(predictUrl(), { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      expect([r.status, r.headers.get('content-type'), await r.text()]).toEqual([200, 'application/json', '{"predictions":[]}']);
    }
    // What an empty list does not excuse: a top-level field, a body that is not one.
    expect((await postJson(predictUrl(), { instances: [], parameters: {} })).status).toBe(400);
    expect((await postJson(predictUrl(), {})).json.error).toBe('the request body has no "instances" list: a V1 body is {"instances":[{"prompt":"…"}]}');
  });

  it('a body without "instances" is told the V1 shape, and which of its fields go in an instance; V2 tensors, where they go', async () => {
    // Before: 'the request body has no "instances" list', saying neither the shape nor that the prompt goes inside.
    expect((await postJson(predictUrl(), { prompt: 'a fox', num_inference_steps: 2, n: 1 })).json.error)
      .toBe('the request body has no "instances" list: a V1 body is {"instances":[{"prompt":"…"}]}; "prompt", "num_inference_steps" go in an instance');
    // Before: each tensor's name, shape, datatype and data named an unknown field, with every known field listed each time.
    const v2 = await postJson(predictUrl(), { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['a fox'] }] });
    expect([v2.status, v2.json.error]).toEqual([400, '"inputs" holds V2 tensors ({"name","datatype","shape","data"}): send them to POST /v2/models/model/infer; '
      + 'a V1 body is {"instances":[{"prompt":"…"}]}']);
  });

  it('refuses a body above the limit with 413', async () => {
    const r = await postJson(predictUrl(), { instances: [{ prompt: 'x'.repeat(70_000) }] });
    expect(r.status).toBe(413);
    expect(r.json.error).toMatch(/exceeds the limit of 65536 bytes/);
  });

  it('survives a client that disconnects mid-generation and keeps serving', async () => {
    const body = JSON.stringify({ instances: [{ prompt: 'gone', num_inference_steps: 60, height: 256, width: 256, seed: 3 }] });
    await new Promise<void>((resolve) => {
      const s = net.connect(srv.port, '127.0.0.1', () => {
        s.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
        setTimeout(() => {
          s.destroy();
          resolve();
        }, 200);
      });
    });
    const r = await postJson(predictUrl(), { instances: [{ prompt: 'after', num_inference_steps: 2, height: 64, width: 64, seed: 1 }] });
    expect(r.status).toBe(200);
    expect(srv.rt.boot.ready).toBe(true);
  });

  it('survives a bounded random fuzz of the predict route', async () => {
    // Deterministic PRNG so a failure reproduces.
    let s = 12345;
    const rnd = () => ((s = (s * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    const pick = <T>(xs: T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const values: unknown[] = [null, true, 0, -1, 1.5, 8, 64, 2 ** 53, -(2 ** 31), '', 'x', '64', [], [1], {}, { a: 1 }, 'é∂🙂', 1e308];
    const fields = ['prompt', 'negative_prompt', 'num_inference_steps', 'guidance_scale', 'height', 'width', 'seed', 'scheduler', 'num_images_per_prompt', 'output_format', 'quality', 'eta'];
    for (let i = 0; i < 60; i++) {
      const inst: Record<string, unknown> = { prompt: 'fuzz', num_inference_steps: 1, height: 64, width: 64 };
      for (let k = 0; k < 3; k++) inst[pick(fields)] = pick(values);
      const variants = [JSON.stringify({ instances: [inst] }), JSON.stringify({ instances: pick(values) }), JSON.stringify(inst).slice(0, Math.floor(rnd() * 40))];
      const r = await postJson(predictUrl(), pick(variants));
      expect([200, 400]).toContain(r.status);
      if (r.status === 400) expect([typeof r.json.error, r.json.code]).toEqual(['string', 'INVALID_INPUT']);
    }
    expect((await fetch(`${srv.url}/v2/health/live`)).status).toBe(200);
  });
});

describe('REQUEST_TIMEOUT_S', () => {
  it('stops a request that runs too long with 504 and keeps serving', async () => {
    const t = await startRuntime({ STORAGE_URI: undefined, REQUEST_TIMEOUT_S: '1', WARMUP_STEPS: '1', MAX_IMAGE_SIZE: '2048' }, { ready: true });
    try {
      const r = await postJson(`${t.url}/v1/models/model:predict`, { instances: [{ prompt: 'slow', num_inference_steps: 500, height: 1024, width: 1024, seed: 2 }] });
      expect(r.status).toBe(504);
      expect(r.json.error).toMatch(/REQUEST_TIMEOUT_S=1s/);
      // Counted as a timeout, not as a client that left.
      expect(await metric(t, 'inference_cancelled_total', { reason: 'timeout' })).toBe(1);
      expect(await metric(t, 'inference_cancelled_total')).toBe(1);
      // The one worker runs this within its own 1 s only if the slow generation stopped: not stopped, it holds the
      // worker for its ~9 s and this one gets 504 too (a fixed 10 s bound on the first answer stood for this).
      const ok = await postJson(`${t.url}/v1/models/model:predict`, { instances: [{ prompt: 'quick', num_inference_steps: 2, height: 64, width: 64 }] });
      expect(ok.status).toBe(200);
    } finally {
      await t.stop();
    }
  });
});

describe('large replies', () => {
  it('streams a multi-megabyte prediction intact to a slow reader', async () => {
    const body = JSON.stringify({ instances: [{ prompt: 'big', num_inference_steps: 1, height: 1024, width: 1024, seed: 77, num_images_per_prompt: 2 }] });
    const raw = await new Promise<Buffer>((resolve, reject) => {
      const s = net.connect(srv.port, '127.0.0.1', () => {
        s.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      });
      const chunks: Buffer[] = [];
      // Read slowly: pause after every chunk so the server sees backpressure.
      s.on('data', (c: Buffer) => {
        chunks.push(c);
        s.pause();
        setTimeout(() => s.resume(), 2);
      });
      s.on('end', () => resolve(Buffer.concat(chunks)));
      s.on('error', reject);
    });
    const sep = raw.indexOf('\r\n\r\n');
    const head = raw.subarray(0, sep).toString();
    expect(head).toMatch(/^HTTP\/1\.1 200 OK/);
    const len = Number(/content-length: (\d+)/i.exec(head)?.[1]);
    const json = JSON.parse(raw.subarray(sep + 4).toString()) as { predictions: Array<{ image: { b64: string } }> };
    expect(raw.length - sep - 4).toBe(len);
    expect(len).toBeGreaterThan(1_000_000);
    for (const p of json.predictions) expect(pngSize(Buffer.from(p.image.b64, 'base64'))).toEqual({ width: 1024, height: 1024 });
  });
});
