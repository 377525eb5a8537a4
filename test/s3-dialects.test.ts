/**
 * The S3-compatible stores users point STORAGE_URI at answer some requests unlike AWS S3 and unlike s3rver. Each case
 * here reproduces one store's documented or reported behaviour with a loopback store (test/helpers/s3-dialect.ts, every
 * request's SigV4 signature checked from the bytes on the socket) and runs the real fetch engine through both
 * transports: keys as users name them, listings that page oddly, ETags without quotes, ranges answered whole or
 * elsewhere, a bucket in another region, an endpoint with a path or an IPv6 literal. docs/DESIGN.md ("S3-compatible
 * stores") says which store each behaviour comes from.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { createImageSource } from '../src/runtime/image-source.js';
import type { EncodedImage } from '../src/runtime/engine.js';
import { createOutputStore } from '../src/runtime/output.js';
import { createRequestS3 } from '../src/storage/request-s3.js';
import { silentLogger } from '../src/log.js';
import { chooseTransport, openTransport } from '../src/storage/choose-transport.js';
import { resolveModel } from '../src/storage/fetch.js';
import { detBytes, rejection } from './helpers/s3.js';
import { DIALECT_CREDS, type Dialect, type DialectStore, startDialectStore } from './helpers/s3-dialect.js';

let tmp: string;
const saved: Record<string, string | undefined> = {};
const stores: DialectStore[] = [];

beforeAll(async () => {
  for (const k of ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_REGION', 'AWS_PROFILE']) saved[k] = process.env[k];
  delete process.env.AWS_SESSION_TOKEN;
  delete process.env.AWS_PROFILE;
  Object.assign(process.env, DIALECT_CREDS, { AWS_REGION: 'us-east-1' });
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 's3-dialects-'));
});

afterAll(async () => {
  await Promise.all(stores.map((s) => s.close()));
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  await fsp.rm(tmp, { recursive: true, force: true });
});

async function store(dialect: Dialect, files: Record<string, Buffer | string>, ipv6 = false): Promise<DialectStore> {
  const s = await startDialectStore('models', dialect, ipv6);
  stores.push(s);
  for (const [k, b] of Object.entries(files)) s.put(k, b);
  return s;
}

const env = (endpoint: string, cache: string, extra: Record<string, string> = {}) => ({
  ...DIALECT_CREDS, AWS_REGION: 'us-east-1', AWS_ENDPOINT_URL: endpoint, MODEL_CACHE_DIR: cache, LOG_LEVEL: 'silent',
  S3_PART_SIZE: '65536', S3_MAX_CONCURRENCY: '4', S3_MAX_ATTEMPTS: '3', ...extra,
});
const fetchFrom = async (s: { endpoint: string }, transport: string, extra: Record<string, string> = {}, uri = 's3://models/sd/') => {
  const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
  const cfg = loadConfig(env(s.endpoint, cache, { S3_TRANSPORT: transport, ...extra }));
  // The SDK-free transport serves every case but an endpoint with a path, which it leaves to the SDK.
  expect(chooseTransport(cfg.s3, 'models').name).toBe(new URL(s.endpoint).pathname === '/' ? transport : 'sdk');
  return resolveModel(uri, { cfg, log: silentLogger() });
};
/** Whether no request was sent twice (the same method, URL and range): none was retried. */
const notRepeated = (seen: ReadonlyArray<{ method: string; url: string; range?: string }>) =>
  new Set(seen.map((x) => `${x.method} ${x.url} ${x.range ?? ''}`)).size === seen.length;
const readAll = async (dir: string, files: Record<string, Buffer | string>, prefix = 'sd/') => {
  for (const [k, b] of Object.entries(files)) {
    if (!k.startsWith(prefix) || k.endsWith('/')) continue;
    expect((await fsp.readFile(path.join(dir, k.slice(prefix.length)))).equals(Buffer.from(b)), JSON.stringify(k)).toBe(true);
  }
};

/** Keys as users have them: the cache must hold each under its own name, byte for byte. */
const ODD: Record<string, Buffer | string> = {
  'sd/model_index.json': '{"_class_name":"StableDiffusionPipeline"}',
  'sd/unet/model.onnx_data': detBytes(200_000, 1),
  'sd/a b.json': 'space',
  'sd/a+b.json': 'plus',
  'sd/100%25 done%.json': 'percent',
  'sd/h#sh?q=1&x=y.json': 'hash query',
  'sd/caf\u00e9.json': 'nfc',
  'sd/cafe\u0301.json': 'nfd',
  'sd/trailing .json ': 'trailing space',
  'sd/ leading.json': 'leading space',
  'sd/Case.json': 'upper',
  'sd/case.json': 'lower',
  'sd/lt<gt>amp&q"a\'.json': 'xml',
  'sd/cr\rlf\nx.json': 'line ends',
  'sd/ctl\u0001x.json': 'control',
  'sd/emoji😀/x.bin': 'astral',
  [`sd/${'long-'.repeat(47)}.bin`]: 'long',
  'sd/folder/': '',
  'sd/unet/': '',
};

describe.each(['sdk', 'lite'] as const)('an S3-compatible store, through S3_TRANSPORT=%s', (transport) => {
  it('keys as users name them: listed with encoding-type=url and decoded only where the store says it encoded them', async () => {
    // AWS S3 and MinIO url-encode keys when asked; s3rver and other stores ignore the parameter. A store that writes
    // control characters raw (as s3rver does) loses a carriage return to the SDK's XML parser unless it url-encodes.
    for (const dialect of [{ encoding: 'aws', escape: 'entities' }, { encoding: 'ignore', escape: 'refs' }] as const) {
      const s = await store({ ...dialect, pageSize: 5 }, ODD);
      const r = await fetchFrom(s, transport);
      expect(r.files, dialect.encoding).toBe(Object.keys(ODD).filter((k) => !k.endsWith('/')).length);
      await readAll(r.dir, ODD);
      expect(s.seen.filter((x) => !x.signed)).toEqual([]);
      const lists = s.seen.filter((x) => x.url.includes('list-type=2'));
      expect(lists.length).toBeGreaterThanOrEqual(4);
      for (const l of lists) expect(l.url).toContain('encoding-type=url');
    }
  });

  it('a listing the store says is truncated without a continuation token is refused, naming the store behaviour', async () => {
    const s = await store({ pageSize: 2, truncatedWithoutToken: true }, { 'sd/a': 'a', 'sd/b': 'b', 'sd/c': 'c' });
    const err = await rejection(fetchFrom(s, transport));
    expect(err.code).toBe('STORAGE_UNSUPPORTED');
    expect(err.message).toMatch(/truncated but the store sent no NextContinuationToken/);
  });

  it('a store that answers every page with the same continuation token stops the listing instead of looping', async () => {
    const s = await store({ pageSize: 2, ignoreToken: true }, { 'sd/a': 'a', 'sd/b': 'b', 'sd/c': 'c' });
    const cfg = loadConfig(env(s.endpoint, tmp, { S3_TRANSPORT: transport }));
    const t = await openTransport(chooseTransport(cfg.s3, 'models'), cfg.s3, 'models');
    try {
      const err = await rejection(t.list({ prefix: 'sd/', signal: AbortSignal.timeout(5_000) }));
      expect(err.code).toBe('STORAGE_UNSUPPORTED');
      expect(err.message).toMatch(/continuation token it had sent before/);
    } finally {
      t.destroy();
    }
    expect(s.seen.length).toBeLessThan(5);
  });

  it('ETags listed without their quotes (NetApp ONTAP, some Ceph RGW) match the quoted ones GETs carry', async () => {
    const files = { 'sd/model_index.json': '{}', 'sd/unet/model.onnx_data': detBytes(300_000, 2) };
    const s = await store({ bareListEtags: true }, files);
    const r = await fetchFrom(s, transport);
    await readAll(r.dir, files);
  });

  it('a cache entry whose manifest holds ETags without quotes (a release before listed ETags were quoted) is still a hit, and a refresh keeps its unchanged files', async () => {
    // A store that never quotes ETags: the releases before listed ETags were quoted wrote them bare into the manifest.
    const files: Record<string, Buffer | string> = { 'sd/model_index.json': '{}', 'sd/unet/model.onnx_data': detBytes(300_000, 3), 'sd/vae/model.onnx': detBytes(100_000, 5) };
    const s = await store({ bareListEtags: true, bareGetEtags: true }, files);
    const cache = await fsp.mkdtemp(path.join(tmp, 'cache-'));
    const cfg = loadConfig(env(s.endpoint, cache, { S3_TRANSPORT: transport }));
    const first = await resolveModel('s3://models/sd/', { cfg, log: silentLogger() });
    expect(first.fromCache).toBe(false);
    const manifest = path.join(first.dir, '.complete.json');
    const m = JSON.parse(await fsp.readFile(manifest, 'utf8')) as { files: Array<{ etag: string }> };
    for (const f of m.files) f.etag = f.etag.replace(/^"(.*)"$/, '$1');
    await fsp.writeFile(manifest, JSON.stringify(m, null, 1));
    const again = await resolveModel('s3://models/sd/', { cfg, log: silentLogger() });
    expect(again.fromCache).toBe(true);
    // One object replaced: only it is read again.
    s.put('sd/vae/model.onnx', detBytes(100_000, 6));
    const seen = s.seen.length;
    const refreshed = await resolveModel('s3://models/sd/', { cfg, log: silentLogger() });
    expect(refreshed.fromCache).toBe(false);
    const gets = s.seen.slice(seen).filter((x) => x.method === 'GET' && !x.url.includes('list-type=2')).map((x) => decodeURIComponent(x.url.split('?')[0]!));
    expect(new Set(gets)).toEqual(new Set(['/models/sd/vae/model.onnx']));
    await readAll(refreshed.dir, { ...files, 'sd/vae/model.onnx': detBytes(100_000, 6) });
  });

  it('a ranged GET answered 200 with the whole object is refused at once, no wrong byte kept', async () => {
    const files = { 'sd/model_index.json': '{}', 'sd/unet/model.onnx_data': detBytes(500_000, 4) };
    const s = await store({ ignoreRange: true }, files);
    const err = await rejection(fetchFrom(s, transport));
    expect(err.code).toBe('STORAGE_UNSUPPORTED');
    expect(err.message).toMatch(/whole object \(HTTP 200, not 206\).*ignores Range headers/);
    // At once: no request asked again (a retry would), counted rather than timed (a bound of 5 s stood for it).
    expect(notRepeated(s.seen)).toBe(true);
  });

  it('a ranged GET answered 206 with another range than asked is never written', async () => {
    const files = { 'sd/model_index.json': '{}', 'sd/unet/model.onnx_data': detBytes(500_000, 5) };
    const s = await store({ wrongRange: true }, files);
    const err = await rejection(fetchFrom(s, transport));
    expect(err.code).toBe('STORAGE_UNSUPPORTED');
    expect(err.message).toMatch(/Content-Range "bytes 0-/);
  });

  it.each(['aws', 'minio'] as const)('a bucket in another region (%s answer) fails at once, naming the region to set', async (wrongRegion) => {
    const s = await store({ region: 'eu-west-1', wrongRegion }, { 'sd/model_index.json': '{}' });
    const err = await rejection(fetchFrom(s, transport));
    expect(err.code).toBe('CONFIG');
    expect(err.message).toMatch(/the bucket is in region eu-west-1.*set AWS_REGION=eu-west-1/);
    // At once: LISTs only (the SDK-free transport hands such a bucket to the SDK, which lists too), none asked again;
    // counted rather than timed (a bound of 3 s stood for it).
    expect(s.seen.every((x) => x.url.includes('list-type=2'))).toBe(true);
    expect(notRepeated(s.seen)).toBe(true);
    const ok = await fetchFrom(s, transport, { AWS_REGION: 'eu-west-1' });
    expect(ok.files).toBe(1);
  });

  it('an endpoint with a path (a gateway that routes /s3 to the store)', async () => {
    const files = { 'sd/model_index.json': '{}', 'sd/a b+c.bin': detBytes(100_000, 6) };
    const s = await store({ basePath: '/s3' }, files);
    expect(s.endpoint).toMatch(/\/s3$/);
    await readAll((await fetchFrom(s, transport)).dir, files);
    expect(s.seen.filter((x) => !x.signed)).toEqual([]);
  });

  it('an IPv6 literal endpoint with a port (http://[::1]:port), signed for the bracketed host', async () => {
    const files = { 'sd/model_index.json': '{}', 'sd/unet/model.onnx_data': detBytes(150_000, 7) };
    const s = await store({}, files, true);
    expect(s.endpoint).toMatch(/^http:\/\/\[::1\]:\d+$/);
    await readAll((await fetchFrom(s, transport)).dir, files);
    expect(s.seen.filter((x) => !x.signed)).toEqual([]);
    expect(s.seen.filter((x) => x.range !== undefined).length).toBeGreaterThan(1);
  });
});

describe('warmup push', () => {
  const CLI = path.resolve('dist/warmup/main.js');
  const push = (args: string[], e: Record<string, string>) => new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [CLI, 'push', ...args], { env: { PATH: process.env.PATH ?? '', ...e }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });

  it('uploads each file under the key a fill reads it back from, odd names and symlinked files included, through both transports', async () => {
    const names: Record<string, Buffer> = {
      'model_index.json': Buffer.from('{}'), 'a b+c%41#h?q=1&x.json': Buffer.from('odd'), 'caf\u00e9/cafe\u0301.bin': detBytes(3_000, 8),
      'trailing .txt ': Buffer.from('sp'), 'Case.json': Buffer.from('U'), 'case.json': Buffer.from('l'), 'unet/model.onnx_data': detBytes(400_000, 9),
    };
    const local = await fsp.mkdtemp(path.join(tmp, 'export-'));
    for (const [rel, b] of Object.entries(names)) {
      await fsp.mkdir(path.dirname(path.join(local, rel)), { recursive: true });
      await fsp.writeFile(path.join(local, rel), b);
    }
    // A Hugging Face cache snapshot holds symlinks into blobs/: each is pushed as the file it points at.
    const blobs = await fsp.mkdtemp(path.join(tmp, 'blobs-'));
    await fsp.writeFile(path.join(blobs, 'abc123'), detBytes(5_000, 10));
    await fsp.mkdir(path.join(local, 'vae_decoder'));
    await fsp.symlink(path.join(blobs, 'abc123'), path.join(local, 'vae_decoder', 'model.onnx'));
    names['vae_decoder/model.onnx'] = detBytes(5_000, 10);
    const s = await store({}, {});
    const cache = await fsp.mkdtemp(path.join(tmp, 'unused-'));
    const r = await push([local, 's3://models/sd/'], env(s.endpoint, cache));
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!)).toMatchObject({ files: Object.keys(names).length });
    expect(s.seen.filter((x) => !x.signed)).toEqual([]);
    expect([...s.objects.keys()].sort()).toEqual(Object.keys(names).map((k) => `sd/${k}`).sort());
    for (const transport of ['sdk', 'lite']) {
      const got = await fetchFrom(s, transport);
      for (const [rel, b] of Object.entries(names)) expect((await fsp.readFile(path.join(got.dir, rel))).equals(b), `${transport} ${rel}`).toBe(true);
    }
  });
});

describe('s3:// input images and output_uri', () => {
  it.each(['aws', 'minio'] as const)('in a bucket of another region (%s answer) are the request\'s to fix (400 naming the region), not a 502 to retry', async (wrongRegion) => {
    const s = await store({ region: 'eu-west-1', wrongRegion }, { 'in/cat.png': detBytes(1000, 7) });
    const cfg = loadConfig(env(s.endpoint, tmp, { S3_MAX_ATTEMPTS: '1', INPUT_URI_PREFIXES: 's3://models/in/' }));
    const requestS3 = createRequestS3(cfg.s3);
    try {
      const err = await rejection(createImageSource(requestS3, cfg).read('s3://models/in/cat.png', 'instances[0].image', 1_000_000));
      expect(err.code).toBe('INVALID_INPUT');
      expect(err.message).toMatch(/^instances\[0\]\.image: bucket "models" is in region eu-west-1/);
    } finally {
      requestS3.destroy();
    }
  });

  it.each(['aws', 'minio'] as const)('output_uri in a bucket of another region (%s answer) is a 400 naming the region, not a transient failure', async (wrongRegion) => {
    const s = await store({ region: 'eu-west-1', wrongRegion }, {});
    const requestS3 = createRequestS3(loadConfig(env(s.endpoint, tmp, { S3_MAX_ATTEMPTS: '1' })).s3);
    try {
      const png = detBytes(100, 8);
      const image: EncodedImage = { data: png.buffer.slice(png.byteOffset, png.byteOffset + png.byteLength) as ArrayBuffer, seed: 1, width: 8, height: 8, format: 'png' };
      const err = await rejection(createOutputStore(requestS3).upload('s3://models/out/cat.png', [image]));
      expect(err.code).toBe('INVALID_INPUT');
      expect(err.message).toMatch(/^output_uri: cannot write s3:\/\/models\/out\/cat\.png: bucket "models" is in region eu-west-1/);
      expect(s.objects.has('out/cat.png')).toBe(false);
    } finally {
      requestS3.destroy();
    }
  });
});
