/**
 * s3:// input images are read with the server's own credentials, so only under INPUT_URI_PREFIXES and never from the
 * model or the LoRA adapters it loads: over real HTTP against the real runtime, s3rver behind the counting proxy. A
 * refused input is a 400 naming the field, the same whether the object exists or not, and no request reaches S3.
 */
import { readdirSync } from 'node:fs';
import sharp from 'sharp';
import WebSocket from 'ws';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixtureModel } from './fixtures/index.js';
import { CREDS, destroyS3, putFolder, rejection, s3Env, startFaultProxy, startS3, settledCount, type FaultProxy, type S3Server } from './helpers/s3.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson } from './helpers/server.js';
import { loadConfig } from '../src/config.js';
import { createImageSource } from '../src/runtime/image-source.js';
import { createRequestS3 } from '../src/storage/request-s3.js';

let s3: S3Server;
let proxy: FaultProxy;
/** STORAGE_URI and LORA_URI on S3, inputs allowed under three prefixes (one of them inside the model's). */
let open: RuntimeHandle;
/** INPUT_URI_PREFIXES unset. */
let closed: RuntimeHandle;
let pic: Buffer;

const PREFIXES = 's3://inputs/team-a/, s3://models, s3://models/sd/in';
const inst = { prompt: 'a castle', num_inference_steps: 2, seed: 5, strength: 0.5 };
const predict = (s: RuntimeHandle, body: Record<string, unknown>) => postJson(`${s.url}/v1/models/model:predict`, { instances: [{ ...inst, ...body }] });

/** What `fn` sent to S3: the proxy's request count once it has settled, before and after. */
async function s3Requests(fn: () => Promise<void>): Promise<number> {
  const before = await settledCount(() => proxy.stats.requests);
  await fn();
  return (await settledCount(() => proxy.stats.requests)) - before;
}

beforeAll(async () => {
  const px = Buffer.alloc(64 * 64 * 3);
  for (let i = 0; i < px.length; i++) px[i] = (i * 7) % 251;
  pic = await sharp(px, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
  s3 = await startS3(['models', 'inputs', 'private']);
  proxy = await startFaultProxy(s3.port);
  const model = await fixtureModel({ withVaeEncoder: true });
  const files = readdirSync(model, { recursive: true, withFileTypes: true }).filter((d) => d.isFile())
    .map((d) => `${d.parentPath}/${d.name}`.slice(model.length + 1));
  await putFolder(s3, 'models', 'sd/', model, files);
  for (const [bucket, key] of [['inputs', 'team-a/pic.png'], ['inputs', 'team-a-private/pic.png'], ['inputs', 'pic.png'], ['private', 'secret.png'],
    ['models', 'sd/in/pic.png'], ['models', 'loras/pic.png'], ['models', 'shared/pic.png']] as const) {
    await s3.put(bucket, key, pic);
  }
  const s3env = { ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', WARMUP_STEPS: '0', RESULT_CACHE_MB: '0', EXECUTION_PROVIDER: 'cpu' };
  [open, closed] = await Promise.all([
    startRuntime({ ...s3env, STORAGE_URI: 's3://models/sd/', LORA_URI: 's3://models/loras/', INPUT_URI_PREFIXES: PREFIXES }, { ready: true }),
    // The embedded demo (it has a vae_encoder), reading S3 through the same proxy.
    startRuntime({ ...s3env, STORAGE_URI: undefined, INPUT_URI_PREFIXES: undefined }, { ready: true }),
  ]);
}, 120_000);
afterAll(async () => {
  await Promise.all([open, closed].map((s) => s?.stop()));
  await proxy?.close();
  if (s3) await destroyS3(s3);
});

describe('INPUT_URI_PREFIXES', () => {
  it('reads an input under an allowed prefix (a whole bucket too): the object is fetched and used', async () => {
    for (const uri of ['s3://inputs/team-a/pic.png', 's3://models/shared/pic.png']) {
      const key = uri.slice('s3:/'.length);
      const before = proxy.stats.bytesByPath[key] ?? 0;
      const r = await predict(open, { image: uri, strength: 0 });
      expect(r.status, JSON.stringify(r.json)).toBe(200);
      expect((proxy.stats.bytesByPath[key] ?? 0) - before).toBe(pic.length);
    }
  });

  const outside = (uri: string) => `instances[0].image: ${JSON.stringify(uri)} is not under a prefix this server reads input images from (INPUT_URI_PREFIXES: s3://inputs/team-a/, s3://models, s3://models/sd/in)`;
  const served = (uri: string, what: string) => `instances[0].image: ${JSON.stringify(uri)} lies under the ${what} this server loads; input images are not read from there`;
  const unsafe = (uri: string, why: string) => `instances[0].image: ${JSON.stringify(uri)}: the key ${why}; name the object by its plain key`;
  it.each([
    ['another bucket the credentials read', 's3://private/secret.png', outside],
    ['…where no such object exists: the same answer', 's3://private/nothing.png', outside],
    ['a sibling prefix that starts with the same text', 's3://inputs/team-a-private/pic.png', outside],
    ['the allowed bucket outside the prefix', 's3://inputs/pic.png', outside],
    ['the folder prefix\'s own name', 's3://inputs/team-a', outside],
    ['the bucket in another case', 's3://Inputs/team-a/pic.png', outside],
    ['a \'..\' segment', 's3://inputs/team-a/../pic.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment")],
    ['a percent-encoded \'..\'', 's3://inputs/team-a/%2e%2e/pic.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment once percent-decoded")],
    ['an encoded \'/..\'', 's3://inputs/team-a/x%2F..%2Fpic.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment once percent-decoded")],
    ['a double-encoded \'..\'', 's3://inputs/team-a/%252e%252e/pic.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment once percent-decoded")],
    // A store's decoder that keeps a malformed escape as it is still turns the %2e%2e beside it into '..'.
    ['an encoded \'..\' beside a malformed escape', 's3://inputs/team-a/%2e%2e/pic%zz.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment once percent-decoded")],
    ['an encoded control character beside a malformed escape', 's3://inputs/team-a/%0a%E0.png', (u: string) => unsafe(u, 'has a control character once percent-decoded')],
    ['an empty segment', 's3://inputs/team-a//pic.png', (u: string) => unsafe(u, "has an empty, '.' or '..' path segment")],
    ['a backslash', 's3://inputs/team-a/..\\pic.png', (u: string) => unsafe(u, 'has a backslash')],
    ['the model\'s own files (STORAGE_URI), inside an allowed prefix', 's3://models/sd/in/pic.png', (u: string) => served(u, 'model (STORAGE_URI)')],
    ['…and the key of that prefix itself', 's3://models/sd/in', (u: string) => served(u, 'model (STORAGE_URI)')],
    ['the model\'s weights', 's3://models/sd/unet/model.onnx', (u: string) => served(u, 'model (STORAGE_URI)')],
    ['the LoRA adapters (LORA_URI)', 's3://models/loras/pic.png', (u: string) => served(u, 'LoRA adapters (LORA_URI)')],
  ])('refuses %s: a 400 naming the field, and nothing is sent to S3', async (_what, uri, message) => {
    let r: Awaited<ReturnType<typeof postJson>> | undefined;
    expect(await s3Requests(async () => void (r = await predict(open, { image: uri })))).toBe(0);
    expect([r!.status, r!.json]).toEqual([400, { error: message(uri), code: 'INVALID_INPUT' }]);
  });

  it('a refused mask refuses the whole request before the allowed image is read; V2 and the WebSocket refuse alike', async () => {
    let v1: Awaited<ReturnType<typeof postJson>> | undefined;
    let v2: Awaited<ReturnType<typeof postJson>> | undefined;
    let ws: Record<string, unknown> | undefined;
    const sent = await s3Requests(async () => {
      v1 = await predict(open, { image: 's3://inputs/team-a/pic.png', mask_image: 's3://private/secret.png', strength: 1 });
      v2 = await postJson(`${open.url}/v2/models/model/infer`, {
        inputs: [
          { name: 'prompt', datatype: 'BYTES', shape: [1], data: ['a castle'] },
          { name: 'image', datatype: 'BYTES', shape: [1], data: ['s3://private/secret.png'] },
        ],
        parameters: { num_inference_steps: 2, strength: 0.5 },
      });
      const sock = new WebSocket(`ws://127.0.0.1:${open.port}/v1/models/model/stream`);
      await new Promise((resolve, reject) => sock.once('open', resolve).once('error', reject));
      sock.send(JSON.stringify({ ...inst, image: 's3://private/secret.png' }));
      ws = await new Promise<Record<string, unknown>>((resolve) => sock.once('message', (m) => resolve(JSON.parse(String(m)) as Record<string, unknown>)));
      sock.close();
    });
    expect(sent).toBe(0);
    expect([v1!.status, v1!.json]).toEqual([400, { error: outside('s3://private/secret.png').replace('.image', '.mask_image'), code: 'INVALID_INPUT' }]);
    expect([v2!.status, v2!.json.code, v2!.json.error]).toEqual([400, 'INVALID_INPUT', expect.stringContaining('"s3://private/secret.png" is not under a prefix this server reads input images from')]);
    expect(ws).toMatchObject({ code: 'INVALID_INPUT', error: expect.stringContaining('"s3://private/secret.png" is not under a prefix this server reads input images from') });
  });

  it('the reader refuses on its own too, before its S3 client sends anything (no path reaches S3 unchecked)', async () => {
    const cfg = loadConfig(s3Env(proxy.endpoint, open.cacheDir, { INPUT_URI_PREFIXES: 's3://inputs/team-a/', STORAGE_URI: 's3://inputs/team-a/model/' }));
    const requestS3 = createRequestS3(cfg.s3);
    try {
      const source = createImageSource(requestS3, cfg);
      let errs: Error[] = [];
      expect(await s3Requests(async () => {
        errs = await Promise.all(['s3://private/secret.png', 's3://inputs/team-a/../pic.png', 's3://inputs/team-a/model/unet/model.onnx'].map((u) => rejection(source.read(u, 'instances[0].image', 1 << 20))));
      })).toBe(0);
      expect(errs.map((e) => [(e as { code?: string }).code, e.message])).toEqual([
        ['INVALID_INPUT', 'instances[0].image: "s3://private/secret.png" is not under a prefix this server reads input images from (INPUT_URI_PREFIXES: s3://inputs/team-a/)'],
        ['INVALID_INPUT', `instances[0].image: "s3://inputs/team-a/../pic.png": the key has an empty, '.' or '..' path segment; name the object by its plain key`],
        ['INVALID_INPUT', 'instances[0].image: "s3://inputs/team-a/model/unet/model.onnx" lies under the model (STORAGE_URI) this server loads; input images are not read from there'],
      ]);
      // The control: an allowed key is read through the same reader.
      expect((await source.read('s3://inputs/team-a/pic.png', 'instances[0].image', 1 << 20)).equals(pic)).toBe(true);
    } finally {
      requestS3.destroy();
    }
  });

  it('an input stored with a customer-provided key (SSE-C): a 400 STORAGE_SSE_C naming the field, the object and what to do', async () => {
    proxy.faults = { customerKey: /^team-a\/pic\.png$/ };
    try {
      const r = await predict(open, { image: 's3://inputs/team-a/pic.png' });
      // Before: 502 UPSTREAM "instances[0].image: reading s3://inputs/team-a/pic.png failed (InvalidRequest); retry later".
      expect([r.status, r.json.code, r.json.error]).toEqual([400, 'STORAGE_SSE_C', 'instances[0].image: s3://inputs/team-a/pic.png is encrypted with a customer-provided key '
        + '(SSE-C; S3 answered InvalidRequest); this runtime does not read SSE-C objects (it is given no customer key); store it with SSE-S3 or SSE-KMS instead, '
        + 'e.g. aws s3 cp s3://inputs/team-a/pic.png s3://inputs/team-a/pic.png --sse-c-copy-source AES256 --sse-c-copy-source-key fileb://<key file> --sse aws:kms']);
    } finally {
      proxy.faults = {};
    }
  });

  it('logs at boot an allowed prefix that lies under what the server loads, where nothing is ever read', () => {
    expect(open.logs.filter((l) => l.level === 'warn').map((l) => l.msg)).toContain('INPUT_URI_PREFIXES entry s3://models/sd/in lies under the model (STORAGE_URI): no input image is read from there');
  });

  it('unset: every s3:// input is refused, naming the variable, and nothing is sent to S3', async () => {
    let r: Awaited<ReturnType<typeof postJson>> | undefined;
    expect(await s3Requests(async () => void (r = await predict(closed, { image: 's3://inputs/team-a/pic.png' })))).toBe(0);
    expect([r!.status, r!.json]).toEqual([400, {
      error: 'instances[0].image: s3:// input images are not enabled on this server (the operator lists the prefixes it may read in INPUT_URI_PREFIXES); send the image as base64',
      code: 'INVALID_INPUT',
    }]);
    // base64 still works.
    const b64 = await predict(closed, { image: pic.toString('base64') });
    expect(b64.status, JSON.stringify(b64.json)).toBe(200);
  });
});
