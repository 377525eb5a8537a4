/**
 * S3_USER_VIRTUAL_BUCKET=1 end to end: a custom endpoint addressed virtual-hosted (`http://<bucket>.s3.test:<port>/<key>`),
 * as Alibaba OSS and some AWS setups need. The spawned server and warm-up CLI get a preload (helpers/wildcard-dns.cjs)
 * that resolves `s3.test` and every name under it to 127.0.0.1, as a wildcard DNS record would; the real AWS SDK and
 * real sockets do the rest. A front (helpers/host-front.ts) records the Host header and path of every request, and
 * s3rver reads the bucket from the Host header (`serviceEndpoint: 'test'`).
 */
import { spawn, spawnSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { GetObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { buildDemoModel, type DemoManifest } from '../src/demo/index.js';
import { startHostFront, type HostFront, type SeenRequest } from './helpers/host-front.js';
import { TLS_FIXTURES, tlsFront, type TlsFront } from './helpers/tls-front.js';
import { CREDS, destroyS3, startS3, type S3Server, putFolder } from './helpers/s3.js';
import { loadConfig } from '../src/config.js';
import { VIRTUAL_HOSTED_FALLBACK, virtualHostedFallback } from '../src/storage/addressing.js';
import { postJson, ROOT, startServer, tempDir, type ServerHandle } from './helpers/server.js';

const ZONE = 's3.test';
const DNS_HOOK = path.join(ROOT, 'test', 'helpers', 'wildcard-dns.cjs');
const CLI = path.join(ROOT, 'dist', 'warmup', 'main.js');
const PREFIX = 'demo/';

let s3: S3Server;
let front: HostFront;
/** HTTPS before the recording front, with a certificate for s3.test and *.s3.test from the test CA. */
let https: TlsFront;
let model: DemoManifest;
const dirs: Array<() => void> = [];
const live: ServerHandle[] = [];

beforeAll(async () => {
  const m = tempDir('dr-vhost-model-');
  dirs.push(m.cleanup);
  model = await buildDemoModel(m.dir, { withVaeEncoder: true });
  s3 = await startS3(['models', 'my.models', 'team.models'], { serviceEndpoint: 'test' });
  for (const bucket of ['models', 'my.models', 'team.models']) {
    await putFolder(s3, bucket, PREFIX, model.dir, model.files.map((f) => f.path));
  }
  front = await startHostFront(s3.port);
  https = await tlsFront(front.port, 'vhost');
}, 60_000);

afterEach(async () => {
  for (const s of live.splice(0)) await s.stop('SIGKILL');
  delete front.virtualOnly;
});

afterAll(async () => {
  await https?.close();
  await front?.close();
  if (s3) await destroyS3(s3);
  for (const c of dirs) c();
});

/** What a pod with a wildcard DNS name for the store gets: the endpoint by name, resolved to loopback. */
function env(extra: Record<string, string | undefined> = {}): Record<string, string | undefined> {
  const cache = tempDir('dr-vhost-cache-');
  dirs.push(cache.cleanup);
  // Nothing of this machine's own AWS setup (a profile, a config file, FIPS, another endpoint) may reach the child.
  const inherited = Object.fromEntries(Object.keys(process.env).filter((k) => /^(AWS|S3)_/.test(k)).map((k) => [k, undefined]));
  return {
    ...inherited, HOME: cache.dir,
    ...CREDS, AWS_ENDPOINT_URL: `http://${ZONE}:${front.port}`, S3_USE_HTTPS: '0', S3_USER_VIRTUAL_BUCKET: '1',
    STORAGE_URI: `s3://models/${PREFIX}`, MODEL_CACHE_DIR: cache.dir, EXECUTION_PROVIDER: 'cpu',
    INPUT_URI_PREFIXES: 's3://models/out/,s3://team.models,s3://my.models',
    NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require=${JSON.stringify(DNS_HOOK)}`.trim(), TEST_DNS_ZONE: ZONE, ...extra,
  };
}

async function serve(e: Record<string, string | undefined>): Promise<ServerHandle> {
  const s = await startServer(e);
  live.push(s);
  return s;
}

/** The requests the front saw from here on. */
function mark(): () => SeenRequest[] {
  const from = front.seen.length;
  return () => front.seen.slice(from);
}

const virtualHosted = (bucket: string) => (r: SeenRequest) => r.host === `${bucket}.${ZONE}:${front.port}` && !r.path.startsWith(`/${bucket}/`);
const pathStyle = (bucket: string) => (r: SeenRequest) => r.host === `${ZONE}:${front.port}` && r.path.startsWith(`/${bucket}/`);
/** ListObjectsV2 and the model's GETs, as the front saw them. */
const lists = (seen: SeenRequest[]) => seen.filter((r) => r.method === 'GET' && /(^|&)list-type=2(&|$)/.test(r.query));
const gets = (seen: SeenRequest[]) => seen.filter((r) => r.method === 'GET' && !/(^|&)list-type=2(&|$)/.test(r.query));

interface Run { code: number | null; stdout: string; stderr: string }
function cli(args: string[], e: Record<string, string | undefined>): Promise<Run> {
  return new Promise((resolve, reject) => {
    const childEnv: Record<string, string> = { PATH: process.env.PATH ?? '' };
    for (const [k, v] of Object.entries(e)) if (v !== undefined) childEnv[k] = v;
    const child = spawn(process.execPath, [CLI, ...args], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code) => (clearTimeout(timer), resolve({ code, stdout, stderr })));
  });
}

async function predict(srv: ServerHandle, instance: Record<string, unknown>) {
  return postJson(`${srv.url}/v1/models/model:predict`, { instances: [instance] });
}

describe('S3_USER_VIRTUAL_BUCKET=1 with a custom endpoint', () => {
  it('boots, serves, uploads output_uri and reads an s3:// input all virtual-hosted; without it, path-style', async () => {
    const seen = mark();
    const srv = await serve(env());
    await srv.waitReady();
    const boot = seen();
    expect(lists(boot).length).toBeGreaterThan(0);
    expect(gets(boot).length).toBeGreaterThanOrEqual(model.files.length);
    expect(boot.filter((r) => !virtualHosted('models')(r)), 'every request virtual-hosted').toEqual([]);
    expect(srv.logs.filter((l) => l.msg === VIRTUAL_HOSTED_FALLBACK)).toEqual([]);

    const inst = { prompt: 'a lighthouse at dusk', seed: 7, num_inference_steps: 2, height: 64, width: 64 };
    const plain = await predict(srv, inst);
    expect(plain.status, JSON.stringify(plain.json)).toBe(200);
    const png = (plain.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

    const up = mark();
    const stored = await predict(srv, { ...inst, output_uri: 's3://models/out/lighthouse.png' });
    expect(stored.status, JSON.stringify(stored.json)).toBe(200);
    expect((stored.json.predictions as Array<{ image: unknown }>)[0]!.image).toEqual({ uri: 's3://models/out/lighthouse.png' });
    const put = up().filter((r) => r.method === 'PUT');
    expect(put.map((r) => [r.host, r.path])).toEqual([[`models.${ZONE}:${front.port}`, '/out/lighthouse.png']]);
    const body = await s3.client.send(new GetObjectCommand({ Bucket: 'models', Key: 'out/lighthouse.png' }));
    expect(Buffer.from(await body.Body!.transformToByteArray()).toString('base64') === png).toBe(true);

    const read = mark();
    const img2img = await predict(srv, { ...inst, image: 's3://models/out/lighthouse.png', strength: 0.5 });
    expect(img2img.status, JSON.stringify(img2img.json)).toBe(200);
    expect(read().filter((r) => r.method === 'GET').map((r) => [r.host, r.path])).toEqual([[`models.${ZONE}:${front.port}`, '/out/lighthouse.png']]);

    // The control: the same endpoint without S3_USER_VIRTUAL_BUCKET is addressed path-style.
    const control = mark();
    const pathSrv = await serve(env({ S3_USER_VIRTUAL_BUCKET: undefined }));
    await pathSrv.waitReady();
    expect(gets(control()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(control().filter((r) => !pathStyle('models')(r)), 'every request path-style').toEqual([]);
  }, 60_000);

  it('S3_TRANSPORT=lite steps aside (one log line saying why) and the AWS SDK boots it virtual-hosted', async () => {
    const seen = mark();
    const srv = await serve(env({ S3_TRANSPORT: 'lite' }));
    await srv.waitReady();
    const aside = srv.logs.filter((l) => l.msg === 'S3_TRANSPORT=lite cannot serve this bucket; the AWS SDK reads it');
    expect(aside.map((l) => l.reason)).toEqual(['the endpoint is addressed virtual-hosted']);
    expect(gets(seen()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(seen().filter((r) => !(virtualHosted('models')(r) && r.sdk))).toEqual([]);
  }, 30_000);

  it('over HTTPS with an internal CA: a wildcard certificate serves every bucket; a dotted one goes path-style, as the SDK says', async () => {
    const tlsEnv = { AWS_ENDPOINT_URL: `https://${ZONE}:${https.port}`, S3_USE_HTTPS: '1', AWS_CA_BUNDLE: path.join(TLS_FIXTURES, 'ca.pem') };
    const seen = mark();
    const r = await cli([], env(tlsEnv));
    expect(r.code, r.stderr).toBe(0);
    expect(gets(seen()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(seen().filter((x) => x.host !== `models.${ZONE}:${https.port}` || x.path.startsWith('/models/')), 'every request virtual-hosted').toEqual([]);
    expect(logLines(r.stderr).filter((l) => l.msg === FALLBACK)).toEqual([]);

    const dotted = mark();
    const d = await cli([], env({ ...tlsEnv, STORAGE_URI: `s3://team.models/${PREFIX}` }));
    expect(d.code, d.stderr).toBe(0);
    expect(dotted().filter((x) => x.host !== `${ZONE}:${https.port}` || !x.path.startsWith('/team.models/')), 'every request path-style').toEqual([]);
    expect(logLines(d.stderr).filter((l) => l.msg === FALLBACK).map((l) => l.reason)).toEqual(['bucket "team.models" has dots, which over https cannot match the store\'s wildcard certificate']);
  }, 30_000);

  it('the warm-up CLI pushes and fills through the virtual-hosted endpoint', async () => {
    const seen = mark();
    const pushed = await cli(['push', model.dir, 's3://models/pushed'], env());
    expect(pushed.code, pushed.stderr).toBe(0);
    const puts = seen().filter((r) => r.method === 'PUT');
    expect(puts.length).toBe(model.files.length);
    expect(puts.filter((r) => !virtualHosted('models')(r))).toEqual([]);

    const fill = mark();
    const e = env({ STORAGE_URI: 's3://models/pushed' });
    const r = await cli([], e);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as { modelDir: string; files: number; fromCache: boolean };
    expect(out).toMatchObject({ files: model.files.length, fromCache: false });
    for (const f of model.files) {
      expect((await fsp.readFile(path.join(out.modelDir, f.path))).equals(await fsp.readFile(path.join(model.dir, f.path))), f.path).toBe(true);
    }
    expect(gets(fill()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(fill().filter((r) => !virtualHosted('models')(r))).toEqual([]);
  }, 30_000);
});

/** The JSON log lines a process wrote among its other output. */
const logLines = (text: string) => text.split('\n').flatMap((l) => {
  try {
    const v = JSON.parse(l) as unknown;
    return typeof v === 'object' && v !== null ? [v as Record<string, unknown>] : [];
  } catch {
    return [];
  }
});
const FALLBACK = VIRTUAL_HOSTED_FALLBACK;

describe('a bucket name that cannot be a host name, under S3_USER_VIRTUAL_BUCKET=1', () => {
  it('follows the AWS SDK\'s own endpoint rules, as a real S3Client resolves them (no request sent)', async () => {
    /** Where the SDK sends a listing of `bucket`: virtual-hosted, path-style, or nowhere (it builds an invalid URL). */
    const sdkAddressing = async (endpoint: string, bucket: string, forcePathStyle = false): Promise<string> => {
      const c = new S3Client({ endpoint, forcePathStyle, region: 'us-east-1', maxAttempts: 1, credentials: { accessKeyId: 'a', secretAccessKey: 'b' } });
      c.middlewareStack.add(() => async (args) => {
        const r = args.request as { hostname: string; path: string };
        throw Object.assign(new Error('resolved'), { to: r.hostname.startsWith(`${bucket}.`) ? 'virtual' : r.path.startsWith(`/${bucket}`) ? 'path' : `? ${r.hostname}${r.path}` });
      }, { step: 'finalizeRequest' });
      try {
        await c.send(new ListObjectsV2Command({ Bucket: bucket }));
        return 'sent';
      } catch (e) {
        return (e as { to?: string }).to ?? `invalid (${(e as Error).name})`;
      } finally {
        c.destroy();
      }
    };
    const quiet = vi.spyOn(console, 'error').mockImplementation(() => undefined); // the SDK prints the URL it cannot build
    try {
      const buckets = ['models', 'a-b-9', 'team.models', 'models.prod.eu1', 'my.models', 'a.b.c', 'x..y', 'Models', 'my_models', 'ab',
        'x'.repeat(63), 'x'.repeat(64), '-models', 'models-', '192.168.1.1',
        // Names S3 itself forbids, whose addressing the SDK still decides: IP-like, numeric, punycode.
        '111.222.333.444', '111.222.333.444.555', '1111.222.333.444', 'abc.222.333.444', '111.222.333', '123', 'xn--abc', 'xn--bcher-kva', 'team.xn--abc', 'xn--abc.team'];
      const endpoints = ['http://s3.test:9000', 'https://s3.test:9000', 'http://10.0.0.5:9000', 'https://10.0.0.5:9000', 'http://[fd00::5]:9000'];
      const seen = new Set<string>();
      for (const endpoint of endpoints) {
        for (const env of [{ S3_USER_VIRTUAL_BUCKET: '1' }, { S3_FORCE_PATH_STYLE: '0' }]) {
          const settings = loadConfig({ AWS_ENDPOINT_URL: endpoint, ...env }).s3;
          expect(settings.forcePathStyle).toBe(false);
          for (const bucket of buckets) {
            const sdk = await sdkAddressing(endpoint, bucket);
            const f = virtualHostedFallback(settings, bucket);
            const ours = f === undefined ? 'virtual' : f.unaddressable ? 'invalid' : 'path';
            expect(`${endpoint} ${bucket}: ${ours}`).toBe(`${endpoint} ${bucket}: ${sdk.startsWith('invalid') ? 'invalid' : sdk}`);
            seen.add(ours);
          }
        }
      }
      expect([...seen].sort()).toEqual(['invalid', 'path', 'virtual']);
      // Path-style asked for, or no custom endpoint (the SDK-free transport's rules cover AWS's own): nothing to say.
      expect(await sdkAddressing('http://s3.test:9000', 'team.models', true)).toBe('path');
      expect(virtualHostedFallback(loadConfig({ AWS_ENDPOINT_URL: 'http://s3.test:9000' }).s3, 'my.models')).toBeUndefined();
      expect(virtualHostedFallback(loadConfig({}).s3, 'my.models')).toBeUndefined();
    } finally {
      quiet.mockRestore();
    }
    const reason = (endpoint: string, bucket: string) => virtualHostedFallback(loadConfig({ AWS_ENDPOINT_URL: endpoint, S3_USER_VIRTUAL_BUCKET: '1' }).s3, bucket)?.reason;
    expect(reason('http://s3.test:9000', 'my.models')).toBe('bucket "my.models" is not a host name (3-63 lower-case letters, digits and hyphens, or such parts joined by dots)');
    expect(reason('https://s3.test:9000', 'team.models')).toBe('bucket "team.models" has dots, which over https cannot match the store\'s wildcard certificate');
    expect(reason('http://10.0.0.5:9000', 'models')).toBe("the endpoint's host is an IP address");
    expect(reason('http://10.0.0.5:9000', 'team.models')).toMatch(/^bucket "team\.models" has dots and the endpoint's host is an IP address: /);
  }, 30_000);

  it('a dotted bucket over http is virtual-hosted, as the SDK addresses it, with no warning', async () => {
    front.virtualOnly = { zone: ZONE };
    const seen = mark();
    const r = await cli([], env({ STORAGE_URI: `s3://team.models/${PREFIX}` }));
    expect(r.code, r.stderr).toBe(0);
    expect(gets(seen()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(seen().filter((x) => !virtualHosted('team.models')(x)), 'every request virtual-hosted').toEqual([]);
    expect(logLines(r.stderr).filter((l) => l.msg === FALLBACK)).toEqual([]);
  }, 30_000);

  it('a dotted bucket on an IP-address endpoint over http, which the SDK cannot address: refused at once, no request', async () => {
    const seen = mark();
    const r = await cli([], env({ STORAGE_URI: `s3://team.models/${PREFIX}`, AWS_ENDPOINT_URL: `http://127.0.0.1:${front.port}` }));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/CONFIG: STORAGE_URI: bucket "team\.models" has dots and the endpoint's host is an IP address: .*; give AWS_ENDPOINT_URL as a DNS name, or read it path-style/);
    // The server says so for LORA_URI too, at start, as for any bad variable.
    const childEnv: Record<string, string> = { PATH: process.env.PATH ?? '' };
    for (const [k, v] of Object.entries(env({ LORA_URI: 's3://team.models/loras/', AWS_ENDPOINT_URL: `http://127.0.0.1:${front.port}`, PORT: '0' }))) if (v !== undefined) childEnv[k] = v;
    const server = spawnSync(process.execPath, [path.join(ROOT, 'dist', 'src', 'main.js')], { env: childEnv, encoding: 'utf8', timeout: 20_000 });
    expect(server.status).toBe(2);
    expect(server.stderr.trim()).toMatch(/^diffusers-runtime: invalid configuration: LORA_URI: bucket "team\.models" has dots and the endpoint's host is an IP address/);
    expect(seen()).toEqual([]);
    const pushed = await cli(['push', model.dir, 's3://team.models/pushed'], env({ AWS_ENDPOINT_URL: `http://127.0.0.1:${front.port}` }));
    expect(pushed.code).toBe(1);
    expect(pushed.stderr).toMatch(/CONFIG: s3:\/\/team\.models\/pushed\/: bucket "team\.models" has dots and the endpoint's host is an IP address/);
    expect(seen()).toEqual([]);

    // A server on that endpoint (its own bucket, path-style) refuses such an output_uri or input before generating.
    const srv = await serve(env({ AWS_ENDPOINT_URL: `http://127.0.0.1:${front.port}` }));
    await srv.waitReady();
    const before = mark();
    const inst = { prompt: 'a lighthouse at dusk', seed: 7, num_inference_steps: 2, height: 64, width: 64 };
    const out = await predict(srv, { ...inst, output_uri: 's3://team.models/out/x.png' });
    expect([out.status, out.json.code]).toEqual([400, 'INVALID_INPUT']);
    expect(String(out.json.error)).toMatch(/^instances\[0\]\.output_uri: bucket "team\.models" has dots and the endpoint's host is an IP address: /);
    const read = await predict(srv, { ...inst, image: 's3://team.models/demo/x.png', strength: 0.5 });
    expect([read.status, read.json.code]).toEqual([400, 'INVALID_INPUT']);
    expect(String(read.json.error)).toMatch(/^instances\[0\]\.image: bucket "team\.models" has dots and the endpoint's host is an IP address: /);
    expect(before()).toEqual([]);
  }, 30_000);

  it('is read path-style, as the AWS SDK falls back, with one warning naming why', async () => {
    const seen = mark();
    const r = await cli([], env({ STORAGE_URI: `s3://my.models/${PREFIX}` }));
    expect(r.code, r.stderr).toBe(0);
    expect(gets(seen()).length).toBeGreaterThanOrEqual(model.files.length);
    expect(seen().filter((x) => !pathStyle('my.models')(x)), 'every request path-style').toEqual([]);
    const warned = logLines(r.stderr).filter((l) => l.msg === FALLBACK);
    expect(warned.map((l) => [l.level, l.reason])).toEqual([['warn', expect.stringMatching(/^bucket "my\.models" is not a host name/)]]);
  }, 30_000);

  it('a store that serves virtual-hosted requests only: the boot and the warm-up CLI name the cause', async () => {
    front.virtualOnly = { zone: ZONE };
    const cause = /\(SecondLevelDomainForbidden\).*; requests for it went path-style although virtual-hosted addressing \(S3_USER_VIRTUAL_BUCKET=1 or S3_FORCE_PATH_STYLE=0\) is on: bucket "my\.models" is not a host name.*; read it path-style/;
    const r = await cli([], env({ STORAGE_URI: `s3://my.models/${PREFIX}` }));
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n').at(-1)).toMatch(cause);

    const srv = await serve(env({ STORAGE_URI: `s3://my.models/${PREFIX}` }));
    const failed = await srv.waitReady().then(() => 'ready', (e: Error) => e.message);
    expect(failed).toMatch(cause);
    expect(srv.logs.filter((l) => l.msg === FALLBACK)).toHaveLength(1);

    const pushed = await cli(['push', model.dir, 's3://my.models/pushed'], env());
    expect(pushed.code).toBe(1);
    expect(pushed.stderr).toMatch(cause);
    expect(pushed.stderr).toContain(`push: ${FALLBACK}: bucket "my.models" is not a host name`);
  }, 30_000);

  it('output_uri and s3:// inputs in such a bucket: their errors name the path-style fallback, not only the denial', async () => {
    const srv = await serve(env());
    await srv.waitReady();
    front.virtualOnly = { zone: ZONE };
    const inst = { prompt: 'a lighthouse at dusk', seed: 7, num_inference_steps: 2, height: 64, width: 64 };
    const note = /\(SecondLevelDomainForbidden\)(; check the server's S3 credentials and the bucket policy)?; requests for it went path-style although virtual-hosted addressing \(S3_USER_VIRTUAL_BUCKET=1 or S3_FORCE_PATH_STYLE=0\) is on: bucket "my\.models" is not a host name.*; read it path-style/;
    const out = await predict(srv, { ...inst, output_uri: 's3://my.models/out/x.png' });
    expect([out.status, out.json.code]).toEqual([500, 'STORAGE_DENIED']);
    expect(String(out.json.error)).toMatch(/^output_uri: access denied writing s3:\/\/my\.models\/out\/x\.png /);
    expect(String(out.json.error)).toMatch(note);
    const read = await predict(srv, { ...inst, image: `s3://my.models/${PREFIX}${model.files[0]!.path}`, strength: 0.5 });
    expect([read.status, read.json.code]).toEqual([400, 'INVALID_INPUT']);
    expect(String(read.json.error)).toMatch(note);
    // A bucket that is one DNS label, through the same store, carries no such note.
    const fine = await predict(srv, { ...inst, output_uri: 's3://models/out/y.png' });
    expect(fine.status, JSON.stringify(fine.json)).toBe(200);
  }, 30_000);
});
