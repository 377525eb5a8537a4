/**
 * OpenAI's Images API under /openai/v1 on the built server with the demo model, over real sockets: a body as OpenAI
 * clients send it makes the images the same V1 request makes, answered as `{created, data: [{b64_json}]}`; OpenAI's
 * own knobs that change nothing here are taken, those asking for what this runtime does not do are named; the field
 * names in a 400 are the ones the client sent; errors come in OpenAI's shape; an edit (multipart, a mask's
 * transparency) makes V1's image-to-image and inpainting images; the model list and the metrics.
 */
import http from 'node:http';
import net from 'node:net';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { listenBase } from '../src/server/base.js';
import { imagesBody, imagesInstance, openaiError } from '../src/server/openai.js';
import { metric, startFailedRuntime, startRuntime } from './helpers/runtime.js';
import { postJson, startServer, until, type ServerHandle } from './helpers/server.js';

/** `CODE: message` of what the body cannot ask for (the route joins these problems to the request's own). */
const refused = (body: unknown): string => {
  try {
    const refusal = imagesInstance(body, 'model').problems.error();
    if (refusal) return `${refusal.code}: ${refusal.message}`;
  } catch (err) {
    return `${(err as { code: string }).code}: ${(err as Error).message}`;
  }
  throw new Error('not refused');
};
const grey = (width: number, height: number) => sharp(Buffer.alloc(width * height * 3, 128), { raw: { width, height, channels: 3 } }).png().toBuffer();
const mapped = (body: unknown) => {
  const { instance, problems } = imagesInstance(body, 'model');
  expect(problems.list).toEqual([]);
  return instance;
};

describe('imagesInstance', () => {
  it('maps OpenAI\'s names onto the request\'s and passes the runtime\'s own fields through', () => {
    expect(mapped({ model: 'model', prompt: 'a fox', n: 2, size: '512x768', output_format: 'webp', output_compression: 80, seed: 3, negative_prompt: 'blur' }))
      .toEqual({ prompt: 'a fox', num_images_per_prompt: 2, width: 512, height: 768, output_format: 'webp', quality: 80, seed: 3, negative_prompt: 'blur' });
    // What clients send for OpenAI's own models and means nothing different here; null is a field left out.
    expect(mapped({ prompt: 'a fox', size: 'auto', response_format: 'b64_json', quality: 'hd', style: 'vivid', user: 'u-1', background: 'auto', moderation: 'low', stream: false, partial_images: 0, n: null }))
      .toEqual({ prompt: 'a fox' });
    expect(mapped({ prompt: 'a fox', quality: 'xhigh' })).toEqual({ prompt: 'a fox' });
    // OpenAI's 0 (most compressed) is the encoders' lowest quality.
    expect(mapped({ prompt: 'a fox', output_compression: 0 })).toEqual({ prompt: 'a fox', quality: 1 });
  });

  it('names what it cannot serve, every problem at once', () => {
    expect(refused({ prompt: 'x', size: '512', response_format: 'url', background: 'transparent', stream: true }))
      .toBe('INVALID_INPUT: size must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto" (the model\'s own), got "512"; '
        + 'response_format must be "b64_json" (or left out): this server returns the images themselves, not URLs, got "url"; '
        + 'background must be one of "auto", "opaque", got "transparent"; stream must be one of false (progress streams on the WebSocket route), got true');
    expect(refused({ prompt: 'x', quality: 90 })).toBe('INVALID_INPUT: quality is OpenAI\'s ("auto", "standard", "hd", …) here: send a JPEG or WebP quality as output_compression');
    expect(refused({ prompt: 'x', width: 512, num_images_per_prompt: 2, output_uri: 's3://b/k' })).toBe('INVALID_INPUT: width is sent as "size" here (OpenAI\'s name); '
      + 'num_images_per_prompt is sent as "n" here (OpenAI\'s name); output_uri is not taken here: the answer holds the images as b64_json; output_uri is V1\'s and V2\'s');
    expect(refused({ model: 'dall-e-3', prompt: 'x' })).toBe('MODEL_NOT_FOUND: Model with name dall-e-3 does not exist. This server serves "model" (GET /openai/v1/models).');
    // Named with OpenAI's range, 0 included, not the quality it becomes; a model that is no name is a 400.
    expect(refused({ prompt: 'x', output_compression: -3, model: 5 })).toBe('INVALID_INPUT: model must be a string, the served name "model", got number; output_compression must be an integer from 0 to 100, got -3');
    expect(refused({ prompt: 'x', output_compression: '90' })).toBe('INVALID_INPUT: output_compression must be an integer from 0 to 100, got "90"');
    // An unknown name is matched against the names a body here may use (size, not width).
    expect(refused({ prompt: 'x', sise: '64x64', negativ_prompt: 'y' })).toBe('INVALID_INPUT: sise is not a known field; did you mean "size"?; negativ_prompt is not a known field; did you mean "negative_prompt"?');
    const listed = refused({ prompt: 'x', widht: 3 });
    expect(listed).toMatch(/^INVALID_INPUT: widht is not a known field; known fields: model, n, size, /);
    expect(listed).not.toMatch(/\b(width|height|num_images_per_prompt|output_uri|preview_every)\b/);
    expect(refused(['x'])).toBe('INVALID_INPUT: the request body must be a JSON object with a "prompt"');
    // A list of prompts: told to send a request per prompt, not V1's {"instances":[…]}, which this route does not take.
    expect(refused({ prompt: ['a fox', 'an owl'], negative_prompt: ['blur'] })).toBe('INVALID_INPUT: prompt must be a string, got a list: the Images API takes one '
      + 'prompt per request (n images of it); send a request for each prompt; negative_prompt must be a string, got a list: the Images API takes one prompt per '
      + 'request (n images of it); send a request for each prompt');
  });
});

describe('imagesBody and openaiError', () => {
  it('the answer is OpenAI\'s ImagesResponse with each image\'s seed, and an error is OpenAI\'s error object', () => {
    const img = (b: string, seed: number) => ({ data: new TextEncoder().encode(b).buffer, seed, width: 64, height: 32, format: 'png' as const });
    const results = [{ images: [img('ab', 1), img('cde', 2)] }] as unknown as Parameters<typeof imagesBody>[0];
    expect(JSON.parse(imagesBody(results, 1_765_000_000_500).toString())).toEqual({
      created: 1_765_000_000,
      data: [{ b64_json: Buffer.from('ab').toString('base64'), seed: 1 }, { b64_json: Buffer.from('cde').toString('base64'), seed: 2 }],
      output_format: 'png', size: '64x32',
    });
    const shaped = (status: number, code: string, headers?: Record<string, string>) => {
      const out = openaiError({ status, body: JSON.stringify({ error: 'why', code, queued: 3 }), contentType: 'application/json', ...(headers ? { headers } : {}) });
      return { ...out, body: JSON.parse(String(out.body)) as unknown };
    };
    expect(shaped(503, 'BUSY', { 'retry-after': '1' })).toEqual({ status: 503, contentType: 'application/json', headers: { 'retry-after': '1' }, body: { error: { message: 'why', type: 'server_error', param: null, code: 'BUSY' } } });
    // OpenAI's own 404 for a model it does not have is an invalid_request_error.
    expect(shaped(404, 'MODEL_NOT_FOUND')).toEqual({ status: 404, contentType: 'application/json', body: { error: { message: 'why', type: 'invalid_request_error', param: null, code: 'MODEL_NOT_FOUND' } } });
    // OpenAI's SDKs retry every 5xx; these come back the same, so they are told not to. A 503 is still theirs to retry.
    for (const [status, code] of [[507, 'OUT_OF_MEMORY'], [504, 'TIMEOUT'], [501, 'UNSUPPORTED']] as const) expect(shaped(status, code).headers).toEqual({ 'x-should-retry': 'false' });
    for (const [status, code] of [[503, 'MODEL_NOT_READY'], [500, 'WORKER_DIED'], [500, 'INTERNAL']] as const) expect(shaped(status, code).headers).toBeUndefined();
  });
});

describe('/openai/v1 over HTTP', () => {
  let srv: ServerHandle;
  beforeAll(async () => {
    srv = await startServer({ STORAGE_URI: undefined, WARMUP_STEPS: '0', RESULT_CACHE_MB: '0' }, { ready: true });
  }, 120_000);
  afterAll(async () => void (await srv?.stop()));
  const generate = (body: unknown) => postJson(`${srv.url}/openai/v1/images/generations`, body);

  it('a body as OpenAI clients send it makes the images the same V1 request makes', async () => {
    const before = Math.floor(Date.now() / 1000);
    const r = await generate({ model: 'model', prompt: 'a lighthouse at dusk', n: 2, size: '64x64', response_format: 'b64_json', quality: 'standard', user: 'u-1', seed: 5, num_inference_steps: 2 });
    expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
    const v1 = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a lighthouse at dusk', num_images_per_prompt: 2, width: 64, height: 64, seed: 5, num_inference_steps: 2 }] });
    const { created, data, ...rest } = r.json as { created: number; data: Array<{ b64_json: string; seed: number }> };
    expect(rest).toEqual({ output_format: 'png', size: '64x64' });
    expect(created).toBeGreaterThanOrEqual(before);
    expect(data.map((d) => d.seed)).toEqual([5, 6]);
    expect(data.map((d) => d.b64_json)).toEqual((v1.json.predictions as Array<{ image: { b64: string } }>).map((p) => p.image.b64));
    expect(await metric(srv, 'inference_request_count', { protocol: 'openai', status: '200' })).toBe(1);
  });

  it('errors in OpenAI\'s shape, naming the fields as the client sent them', async () => {
    // `param`: the parameter the (first) problem is about, as OpenAI's own 400s name it.
    const invalid = (message: string, param: string | null) => ({ error: { message, type: 'invalid_request_error', param, code: 'INVALID_INPUT' } });
    const r = await generate({ prompt: 'x', n: 0, size: '60x64', output_compression: 101, num_inference_steps: 2 });
    // Every problem at once: OpenAI's fields' own first, then the request's they make.
    expect([r.status, r.json]).toEqual([400, invalid('output_compression must be an integer from 0 to 100, got 101; '
      + 'size\'s width must be a positive multiple of 8 up to 2048, got 60; n must be an integer from 1 to 8, got 0', 'output_compression')]);
    const seed = await generate({ prompt: 'x', n: 2, seed: Number.MAX_SAFE_INTEGER, num_inference_steps: 2 });
    expect([seed.status, seed.json]).toEqual([400, invalid(`seed + n - 1 must be at most ${Number.MAX_SAFE_INTEGER} (image i uses seed + i), got ${Number.MAX_SAFE_INTEGER} with 2 images`, 'seed')]);
    // Found once the input images are read: named as sent too, `size` where V1 asks for height and width.
    const notImage = await generate({ prompt: 'x', image: Buffer.from('not an image').toString('base64'), num_inference_steps: 2 });
    expect([notImage.status, notImage.json]).toEqual([400, invalid('image is not an image format this server reads; send a PNG, JPEG, WebP, GIF, TIFF or BMP image', 'image')]);
    const wide = await generate({ prompt: 'x', image: (await grey(2056, 8)).toString('base64'), num_inference_steps: 2 });
    expect([wide.status, wide.json]).toEqual([400, invalid('image is 2056x8: without size the output takes the image\'s width (2056), over MAX_IMAGE_SIZE 2048; give size to resize it', 'image')]);
    // Before: V1's hint, `(one prompt per instance: {"instances":[…]})`, a body this route refuses.
    const prompts = await generate({ prompt: ['a fox', 'an owl'], num_inference_steps: 2 });
    expect([prompts.status, prompts.json]).toEqual([400, invalid('prompt must be a string, got a list: the Images API takes one prompt per request (n images of it); '
      + 'send a request for each prompt', 'prompt')]);
    const unknown = await generate({ model: 'dall-e-3', prompt: 'x' });
    expect([unknown.status, (unknown.json as { error: { type: string; code: string } }).error]).toMatchObject([404, { type: 'invalid_request_error', param: 'model', code: 'MODEL_NOT_FOUND' }]);
    const notJson = await postJson(`${srv.url}/openai/v1/images/generations`, '{"prompt":');
    expect([notJson.status, notJson.json]).toEqual([400, invalid('Unrecognized request format: Unexpected end of JSON input', null)]);
    // Refused before the body is read (a transfer coding Node does not undo): a retry meets the same 501, so OpenAI's
    // SDKs, which retry every 5xx, are told not to.
    const te = await new Promise<{ status: number; retry: unknown; body: string }>((resolve, reject) => {
      const req = http.request(`${srv.url}/openai/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json', 'transfer-encoding': 'gzip, chunked' } }, (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve({ status: res.statusCode!, retry: res.headers['x-should-retry'], body }));
      });
      req.on('error', reject);
      req.end('{"prompt":"x"}');
    });
    expect({ ...te, body: JSON.parse(te.body) as unknown }).toMatchObject({ status: 501, retry: 'false', body: { error: { type: 'server_error', code: 'UNSUPPORTED' } } });
  });

  it('param names the parameter as the client sent it: OpenAI\'s name for ours it replaces, ours as sent, one it does not know', async () => {
    const param = async (body: unknown) => ((await generate(body)).json.error as { param: unknown }).param;
    const cases: Array<[unknown, string]> = [
      [{ prompt: 'x', size: '64x60' }, 'size'], [{ prompt: 'x', n: 99 }, 'n'], [{ prompt: 'x', size: '64' }, 'size'],
      [{ prompt: 'x', output_format: 'gif' }, 'output_format'], [{ prompt: 'x', output_compression: -1 }, 'output_compression'],
      [{ prompt: 7 }, 'prompt'], [{ n: 1 }, 'prompt'], [{ prompt: 'x', response_format: 'url' }, 'response_format'], [{ prompt: 'x', model: 5 }, 'model'],
      [{ prompt: 'x', negative_prompt: 3 }, 'negative_prompt'], [{ prompt: 'x', num_inference_steps: 0 }, 'num_inference_steps'],
      [{ prompt: 'x', mask_image: 'AAAA' }, 'mask_image'], [{ prompt: 'x', widht: 64 }, 'widht'], [{ prompt: 'x', width: 64 }, 'width'],
    ];
    for (const [body, want] of cases) expect([body, await param(body)]).toEqual([body, want]);
    // None is named where the body as a whole is wrong.
    expect(await param(['x'])).toBeNull();
  });

  it('lists the model as OpenAI\'s model list does; a model\'s own route is its health', async () => {
    const list = await fetch(`${srv.url}/openai/v1/models`).then((x) => x.json()) as { object: string; data: Array<Record<string, unknown>> };
    expect(list).toMatchObject({ object: 'list', data: [{ id: 'model', object: 'model', owned_by: 'diffusers-runtime' }] });
    expect(typeof list.data[0]!.created).toBe('number');
    const one = await fetch(`${srv.url}/openai/v1/models/model`);
    expect([one.status, await one.json()]).toEqual([200, list.data[0]]);
    const other = await fetch(`${srv.url}/openai/v1/models/other`);
    expect([other.status, ((await other.json()) as { error: { message: string; code: string } }).error]).toMatchObject([404, {
      message: 'Model with name other does not exist. This server serves "model" (GET /openai/v1/models).', code: 'MODEL_NOT_FOUND' }]);
  });

  it('a CloudEvent is a 400 pointing to V1 and V2, not an ordinary answer a Knative broker would take for a failed delivery', async () => {
    const refusal = [400, { error: {
      message: 'POST /openai/v1/images/generations reads no CloudEvents: send the event to POST /v1/models/{name}:predict (binary or structured, the V1 body as its data) or POST /v2/models/{name}/infer (binary)',
      type: 'invalid_request_error', param: null, code: 'INVALID_INPUT' } }];
    const body = { prompt: 'a lighthouse at dusk', size: '64x64', seed: 5, num_inference_steps: 2 };
    const ce = { 'ce-specversion': '1.0', 'ce-id': 'req-1', 'ce-source': 'knative://broker/default', 'ce-type': 'dev.example.generate' };
    const binary = await postJson(`${srv.url}/openai/v1/images/generations`, body, { headers: { ...ce, 'content-type': 'application/json' } });
    expect([binary.status, binary.json]).toEqual(refusal);
    expect(binary.headers.get('ce-id')).toBeNull();
    const event = { specversion: '1.0', id: 'req-2', source: '/client', type: 'dev.example.generate', data: body };
    const structured = await postJson(`${srv.url}/openai/v1/images/generations`, event, { headers: { 'content-type': 'application/cloudevents+json' } });
    expect([structured.status, structured.json]).toEqual(refusal);
  });

  it('what is not served under /openai is refused in OpenAI\'s shape, saying what is; elsewhere in KServe\'s', async () => {
    const answer = async (res: Response) => [res.status, res.headers.get('allow'), await res.json()];
    // openai-python's chat.completions.create and images.create_variation against this base URL.
    expect(await answer(await fetch(`${srv.url}/openai/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"model":"model","messages":[]}' }))).toEqual([404, null, {
      error: { message: 'Not Found: /openai/v1/chat/completions; OpenAI\'s API here is POST /openai/v1/images/generations, POST /openai/v1/images/edits and GET /openai/v1/models', type: 'invalid_request_error', param: null, code: 'NOT_FOUND' },
    }]);
    expect((await answer(await fetch(`${srv.url}/openai/v1/images/variations`, { method: 'POST', body: new FormData() })))[0]).toBe(404);
    expect(await answer(await fetch(`${srv.url}/openai/v1/images/generations`))).toEqual([405, 'POST', {
      error: { message: 'Method Not Allowed: GET /openai/v1/images/generations', type: 'invalid_request_error', param: null, code: 'METHOD_NOT_ALLOWED' },
    }]);
    expect(await answer(await fetch(`${srv.url}/v1/chat/completions`))).toEqual([404, null, { error: 'Not Found: /v1/chat/completions', code: 'NOT_FOUND' }]);
  });

  // Edits: multipart, as OpenAI's SDKs send them.
  /**
   * A 64² picture, and OpenAI's mask for its left half: fully transparent where the edit goes, then a band of alpha 100
   * (a soft brush edge), which OpenAI's "fully transparent areas" leaves out.
   */
  const picture = () => sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 200, g: 80, b: 40 } } }).png().toBuffer();
  const alphaMask = async () => {
    const px = Buffer.alloc(64 * 64 * 4, 255);
    for (let y = 0; y < 64; y++) for (let x = 0; x < 48; x++) px[(y * 64 + x) * 4 + 3] = x < 32 ? 0 : 100;
    return sharp(px, { raw: { width: 64, height: 64, channels: 4 } }).png().toBuffer();
  };
  const form = (fields: Record<string, string | Buffer>) => {
    const f = new FormData();
    for (const [k, v] of Object.entries(fields)) f.append(k, typeof v === 'string' ? v : new Blob([v], { type: 'image/png' }), ...(typeof v === 'string' ? [] : [`${k}.png`]));
    return f;
  };
  const edit = async (f: FormData) => {
    const res = await fetch(`${srv.url}/openai/v1/images/edits`, { method: 'POST', body: f });
    return { status: res.status, json: await res.json() as Record<string, unknown> };
  };
  const v1 = async (inst: Record<string, unknown>) =>
    ((await postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst] })).json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;
  const first = (j: Record<string, unknown>) => (j.data as Array<{ b64_json: string }>)[0]!.b64_json;

  it('an image and fields as OpenAI\'s SDKs send them (multipart, numbers as text) make V1\'s image-to-image; a transparent mask, its inpainting', async () => {
    const [img, mask] = await Promise.all([picture(), alphaMask()]);
    const common = { prompt: 'a red door', seed: 4, num_inference_steps: 2 };
    const r = await edit(form({ image: img, prompt: 'a red door', seed: '4', num_inference_steps: '2', strength: '0.5', size: '64x64', response_format: 'b64_json', quality: 'max', input_fidelity: 'low' }));
    expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
    expect(first(r.json)).toBe(await v1({ ...common, image: img.toString('base64'), strength: 0.5, width: 64, height: 64 }));
    // The mask's fully transparent left half is V1's white (repaint) left half; the half-transparent band is kept.
    const white = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 0, g: 0, b: 0 } } })
      .composite([{ input: { create: { width: 32, height: 64, channels: 3, background: { r: 255, g: 255, b: 255 } } }, left: 0, top: 0 }]).png().toBuffer();
    const before = await metric(srv, 'inference_request_count', { protocol: 'openai', status: '200' });
    const m = await edit(form({ 'image[]': img, mask, prompt: 'a red door', seed: '4', num_inference_steps: '2' }));
    expect(m.status, JSON.stringify(m.json).slice(0, 300)).toBe(200);
    expect(first(m.json)).toBe(await v1({ ...common, image: img.toString('base64'), mask_image: white.toString('base64') }));
    expect(await metric(srv, 'inference_request_count', { protocol: 'openai', status: '200' })).toBe(before + 1);
  });

  it('without a mask, a picture\'s own fully transparent area is the one to edit (DALL·E 2\'s rule); an opaque one is image-to-image', async () => {
    // The picture with the mask's alpha: transparent left half, a band of alpha 100, opaque right quarter.
    const [img, mask] = await Promise.all([picture(), alphaMask()]);
    const cutout = await sharp(img).joinChannel(await sharp(mask).extractChannel('alpha').toBuffer()).png().toBuffer();
    const opaque = await sharp(img).ensureAlpha(1).png().toBuffer();
    const common = { prompt: 'a red door', seed: 4, num_inference_steps: 2 };
    const white = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 0, g: 0, b: 0 } } })
      .composite([{ input: { create: { width: 32, height: 64, channels: 3, background: { r: 255, g: 255, b: 255 } } }, left: 0, top: 0 }]).png().toBuffer();
    const own = await edit(form({ image: cutout, prompt: 'a red door', seed: '4', num_inference_steps: '2' }));
    expect(own.status, JSON.stringify(own.json).slice(0, 300)).toBe(200);
    // V1 drops the picture's alpha, as diffusers' load_image does.
    expect(first(own.json)).toBe(await v1({ ...common, image: cutout.toString('base64'), mask_image: white.toString('base64') }));
    const whole = await edit(form({ image: opaque, prompt: 'a red door', seed: '4', num_inference_steps: '2' }));
    expect(first(whole.json)).toBe(await v1({ ...common, image: opaque.toString('base64') }));
  });

  it('an edit as Open WebUI sends one (its model setting left empty, no size) is the picture\'s image-to-image at its size', async () => {
    const img = await picture();
    const f = form({ model: '', prompt: 'a red door', response_format: 'b64_json', num_inference_steps: '2', seed: '4' });
    f.append('image', new Blob([img], { type: 'image/png' }), '0b4e7c1a-5d3f-4c2e-9a51-2f8d6e3b7c90.png');
    const r = await edit(f);
    expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
    expect([r.json.size, first(r.json)]).toEqual(['64x64', await v1({ prompt: 'a red door', seed: 4, num_inference_steps: 2, image: img.toString('base64') })]);
  });

  it('a loras list as OpenAI\'s SDKs encode one in a form (loras[][name], loras[][scale]; loras[]) is V1\'s loras', async () => {
    const img = await picture();
    const loras = [{ name: 'demo-style', scale: 0.5 }, { name: 'demo-kohya', scale: 0.8 }];
    const want = await v1({ prompt: 'a red door', seed: 4, num_inference_steps: 2, width: 64, height: 64, image: img.toString('base64'), loras });
    const withLoras = (parts: string[][]) => {
      const f = form({ image: img, prompt: 'a red door', seed: '4', num_inference_steps: '2', size: '64x64' });
      for (const [k, v] of parts) f.append(k!, v!);
      return f;
    };
    // openai-node writes each object's keys in turn; openai-python (httpx, from one list per key) every name, then every scale.
    const node = [['loras[][name]', 'demo-style'], ['loras[][scale]', '0.5'], ['loras[][name]', 'demo-kohya'], ['loras[][scale]', '0.8']];
    const python = [['loras[][name]', 'demo-style'], ['loras[][name]', 'demo-kohya'], ['loras[][scale]', '0.5'], ['loras[][scale]', '0.8']];
    for (const parts of [node, python]) {
      const r = await edit(withLoras(parts));
      expect(r.status, JSON.stringify(r.json).slice(0, 300)).toBe(200);
      expect(first(r.json)).toBe(want);
    }
    const message = async (parts: string[][]) => ((await edit(withLoras(parts))).json.error as { message: string }).message;
    // Which adapter one scale of two belongs to is lost in python's order: named, not guessed.
    expect(await message(python.slice(0, 3))).toBe('loras: 2 loras[][name], 1 loras[][scale]: a form cannot say which adapter each belongs to; give every adapter its scale (1 is the default), or send loras as JSON text');
    // A list of names, its problems named as V1 names them.
    expect(await message([['loras[]', 'demo-style'], ['loras[]', 'nope']])).toBe('unknown LoRA adapter "nope": not found in the model\'s loras/ folder; the model has demo-kohya, demo-style');
  });

  it('names what an edit lacks or cannot be, in OpenAI\'s shape', async () => {
    const img = await picture();
    const message = (r: { json: Record<string, unknown> }) => (r.json.error as { message: string }).message;
    const param = (r: { json: Record<string, unknown> }) => (r.json.error as { param: unknown }).param;
    // param: the form field each refusal is about (the first, where there are several); none for a body not read.
    const params: Array<[Record<string, string | Buffer>, string]> = [
      [{ prompt: 'x' }, 'image'], [{ image: Buffer.alloc(0), prompt: 'x' }, 'image'], [{ image: img, mask: img, prompt: 'x' }, 'mask'],
      [{ image: img, prompt: 'x', n: 'two' }, 'n'], [{ image: img, prompt: 'x', mask: 'iVBORw0KGgo' }, 'mask'], [{ image: img, prompt: 'x', mask_image: 'iVBORw0KGgo' }, 'mask_image'],
      [{ image: img, prompt: 'x', input_fidelity: 'high' }, 'input_fidelity'], [{ image: img, prompt: 'x', size: '60x64' }, 'size'], [{ image: img, prompt: 'x', extra: img }, 'extra'],
      [{ image: img, mask: await sharp(await alphaMask()).resize(32, 32).png().toBuffer(), prompt: 'x', num_inference_steps: '2' }, 'mask'],
    ];
    for (const [fields, want] of params) expect([Object.keys(fields), param(await edit(form(fields)))]).toEqual([Object.keys(fields), want]);
    expect(param({ json: (await (await fetch(`${srv.url}/openai/v1/images/edits`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })).json()) as Record<string, unknown> })).toBeNull();
    const json = await fetch(`${srv.url}/openai/v1/images/edits`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"prompt":"x"}' });
    expect([json.status, ((await json.json()) as { error: { message: string } }).error.message])
      .toEqual([400, 'images/edits takes multipart/form-data (the image as a file, prompt and the rest as fields), as OpenAI\'s SDKs send it; got Content-Type "application/json"']);
    expect(message(await edit(form({ prompt: 'x' })))).toBe('image is required: the picture to edit, as a file');
    expect(message(await edit(form({ image: img, 'image[]': img, prompt: 'x' }))))
      .toBe('image: 2 images sent; this server edits one picture per request (OpenAI\'s GPT image models take several as references): send one');
    expect(message(await edit(form({ image: Buffer.alloc(0), mask: Buffer.alloc(0), prompt: 'x' })))).toBe('image is an empty file; mask is an empty file');
    expect(message(await edit(form({ image: img, mask: img, prompt: 'x' })))).toBe('mask has no alpha channel: OpenAI\'s mask marks the area to edit as transparent; send a PNG with transparency');
    expect(message(await edit(form({ image: img, prompt: 'x', n: 'two', num_inference_steps: '2' })))).toMatch(/^n must be an integer from 1 to 8, got "two"/);
    // A mask sent as text (curl's -F mask=<file), or under V1's name.
    expect(message(await edit(form({ image: img, prompt: 'x', mask: 'iVBORw0KGgo', mask_image: 'iVBORw0KGgo' })))).toBe('mask must be a file: a PNG whose fully '
      + 'transparent area is the one to edit; mask_image is sent as "mask" here (OpenAI\'s name): a PNG whose fully transparent area is the one to edit');
    expect(message(await edit(form({ image: img, prompt: 'x', input_fidelity: 'high' })))).toBe('input_fidelity must be "low" (or left out): to keep more of the picture, send a lower strength; got "high"');
    const small = await sharp(await alphaMask()).resize(32, 32).png().toBuffer();
    expect(message(await edit(form({ image: img, mask: small, prompt: 'x', num_inference_steps: '2' })))).toBe('mask is 32x32 but image is 64x64; they must have the same size');
  });

  it('names why a multipart body cannot be read, where the parser only says it failed', async () => {
    const message = async (contentType: string, body: string) => {
      const res = await fetch(`${srv.url}/openai/v1/images/edits`, { method: 'POST', headers: { 'content-type': contentType }, body });
      return [res.status, ((await res.json()) as { error: { message: string } }).error.message];
    };
    const part = '--b1\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n';
    // The Content-Type set by hand, as with requests' files= plus headers={'Content-Type': 'multipart/form-data'}.
    expect(await message('multipart/form-data', `${part}--b1--\r\n`))
      .toEqual([400, 'Content-Type "multipart/form-data" has no boundary; let the HTTP client set it with the form (it adds boundary=…), not by hand']);
    expect(await message('multipart/form-data; boundary=b2', `${part}--b1--\r\n`))
      .toEqual([400, 'the multipart body could not be read: the boundary "b2" its Content-Type declares is not in it']);
    expect(await message('multipart/form-data; boundary="b1"', part)).toEqual([400, 'the multipart body could not be read: it ends before its closing --b1-- (cut short?)']);
    expect(await message('multipart/form-data; boundary=b1', `${part.replace('Content-Disposition', 'Content-Type: text/plain\r\nX')}--b1--\r\n`)).toEqual([400,
      'the multipart body could not be read: nothing may come before the first boundary line or after the closing one, and each part needs Content-Disposition: form-data; name="…", then a blank line before its content']);
    // Read: a quoted boundary, other parameters beside it.
    expect(await message('Multipart/Form-Data; charset=utf-8; boundary="b1"', `${part}--b1--\r\n`)).toEqual([400, 'image is required: the picture to edit, as a file']);
  });
});

describe('/openai/v1 on a server that is not ready', () => {
  it('the model\'s route and a generation are 503 in OpenAI\'s shape with Retry-After, before the body is read', async () => {
    const down = await startFailedRuntime();
    try {
      const notReady = async (res: Response) => [res.status, Number(res.headers.get('retry-after')) > 0, ((await res.json()) as { error: unknown }).error];
      expect(await notReady(await fetch(`${down.url}/openai/v1/models/model`))).toEqual([503, true, {
        message: 'Model with name model is not ready.', type: 'server_error', param: null, code: 'MODEL_NOT_READY' }]);
      // A body that does not parse: the 503 comes before it is read.
      const gen = await fetch(`${down.url}/openai/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"prompt":' });
      expect(await notReady(gen)).toMatchObject([503, true, { type: 'server_error', param: null, code: 'MODEL_NOT_READY' }]);
    } finally {
      await down.stop();
    }
  });
});

describe('/openai/v1 during the SIGTERM drain', () => {
  it('an edit whose body came after the signal is refused 503 before its picture is decoded, as the other routes refuse before reading their inputs', async () => {
    const own = await startRuntime({ STORAGE_URI: undefined, WARMUP_STEPS: '0', RESULT_CACHE_MB: '0' }, { ready: true });
    const sock = net.connect(own.port, '127.0.0.1');
    try {
      let got = '';
      sock.on('data', (c: Buffer) => (got += c.toString()));
      // A picture with an alpha channel whose pixels are cut off: decoded for its transparent area before the refusal,
      // it was answered 400 (it could not be decoded), not the 503.
      const png = await sharp(Buffer.alloc(64 * 64 * 4, 200), { raw: { width: 64, height: 64, channels: 4 } }).png().toBuffer();
      const f = new FormData();
      f.append('prompt', 'a fox');
      f.append('image', new Blob([png.subarray(0, png.length - 40)], { type: 'image/png' }), 'image.png');
      const form = new Request('http://x', { method: 'POST', body: f });
      const body = Buffer.from(await form.arrayBuffer());
      // Read in-process: the server closes its connections as the drain ends.
      const shuttingDownRefused = async () => (await own.rt.metrics.rejected.get()).values.find((v) => v.labels.reason === 'shutting_down')?.value ?? 0;
      const rejected0 = await shuttingDownRefused();
      // The head is taken (its 100 Continue says the checks before the body passed) before the signal; the body after.
      sock.write(`POST /openai/v1/images/edits HTTP/1.1\r\nhost: x\r\ncontent-type: ${form.headers.get('content-type')}\r\ncontent-length: ${body.length}\r\nexpect: 100-continue\r\n\r\n`);
      await until(() => got.startsWith('HTTP/1.1 100 '));
      const stopped = own.stop(30_000);
      await own.waitFor('draining');
      sock.write(body);
      await until(() => /\r\n\r\n[^]*\r\n\r\n\{[^]*\}$/.test(got), 20_000);
      expect(got).toMatch(/\r\n\r\nHTTP\/1\.1 503 [^]*"code":"SHUTTING_DOWN"/);
      // Refused once, there.
      expect(await shuttingDownRefused()).toBe(rejected0 + 1);
      await stopped;
      expect(own.all('shut-down')).toEqual([{ drained: true }]);
    } finally {
      sock.destroy();
      await own.stop();
    }
  });
});

describe('/openai/v1 on the base server, before any route runs', () => {
  /** A POST on a connection of its own (one pooled would count within the cap), closed after the answer. */
  const post = (port: number, path: string) => new Promise<{ status: number; retryAfter: unknown; shouldRetry: unknown; body: unknown }>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path, method: 'POST', agent: false, headers: { 'content-type': 'application/json', connection: 'close' } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (c: string) => (text += c)).on('end', () =>
        resolve({ status: res.statusCode!, retryAfter: res.headers['retry-after'], shouldRetry: res.headers['x-should-retry'], body: JSON.parse(text) as unknown }));
    });
    req.on('error', reject);
    req.end('{"prompt":"x"}');
  });
  // No x-should-retry: OpenAI's SDKs retry a 503, which these are worth retrying.
  const openai = (code: string, message: string) => ({ status: 503, retryAfter: '1', shouldRetry: undefined, body: { error: { message, type: 'server_error', param: null, code } } });

  it('the 503 before the routes attach is OpenAI\'s under /openai, KServe\'s elsewhere', async () => {
    const base = await listenBase('127.0.0.1', 0, { maxConnections: 0 });
    try {
      expect(await post(base.port, '/openai/v1/images/generations')).toEqual(openai('MODEL_NOT_READY', 'Server is not ready.'));
      expect(await post(base.port, '/v1/models/model:predict')).toEqual({ status: 503, retryAfter: '1', shouldRetry: undefined,
        body: { error: 'Server is not ready.', code: 'MODEL_NOT_READY', ready: false, state: 'starting' } });
    } finally {
      base.closeListener();
      base.closeConnections();
    }
  });

  it('past MAX_CONNECTIONS the 503 BUSY is OpenAI\'s under /openai, KServe\'s elsewhere', async () => {
    const base = await listenBase('127.0.0.1', 0, { maxConnections: 1 });
    base.setWarn(() => undefined);
    const held = net.connect(base.port, '127.0.0.1');
    held.on('error', () => undefined);
    try {
      await until(() => base.connections.open === 1, 5_000);
      const busy = 'too many open connections (MAX_CONNECTIONS=1): retry shortly, or reuse a kept-alive connection';
      expect(await post(base.port, '/openai/v1/images/generations')).toEqual(openai('BUSY', busy));
      expect(await post(base.port, '/v1/models/model:predict')).toEqual({ status: 503, retryAfter: '1', shouldRetry: undefined, body: { error: busy, code: 'BUSY' } });
      expect(base.connections.overLimit).toBe(2);
    } finally {
      held.destroy();
      base.closeListener();
      base.closeConnections();
    }
  });
});
