/**
 * An S3 endpoint that cannot be reached (nothing listens on its port): each error that says so names the endpoint the
 * runtime tried, its scheme, host and port only, for the model fill, a LoRA adapter, an input image and output_uri.
 * Over real sockets on the demo model. And one where something other than S3 answers (the warm-up CLI's fill).
 */
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../scripts/bench-common.js';
import { endpointName } from '../src/storage/s3-errors.js';
import { listenLoopback } from './helpers/loopback.js';
import { CREDS } from './helpers/s3.js';
import { runWarmupCli } from './helpers/warmup-cli.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, startServer, type ServerHandle } from './helpers/server.js';

let port: number;
let origin: string;
let env: Record<string, string | undefined>;
let srv: RuntimeHandle;

beforeAll(async () => {
  port = await freePort();
  origin = `http://127.0.0.1:${port}`;
  // User info, a path and a query the runtime never repeats.
  env = { ...CREDS, AWS_ENDPOINT_URL: `http://key:s3cr3t@127.0.0.1:${port}/base?token=abc`, S3_MAX_ATTEMPTS: '1', WARMUP_STEPS: '0', RESULT_CACHE_MB: '0', EXECUTION_PROVIDER: 'cpu' };
  srv = await startRuntime({ ...env, STORAGE_URI: undefined, LORA_URI: 's3://loras/', INPUT_URI_PREFIXES: 's3://inputs/' }, { ready: true });
}, 120_000);
afterAll(async () => void (await srv?.stop()));

const predict = (inst: Record<string, unknown>) => postJson(`${srv.url}/v1/models/model:predict`, { instances: [{ prompt: 'a', num_inference_steps: 1, height: 64, width: 64, seed: 1, ...inst }] });
const noSecrets = (msg: string) => {
  for (const s of ['s3cr3t', 'key:', '/base', 'token']) expect(msg).not.toContain(s);
};

describe('an S3 endpoint that refuses connections is named in the error', () => {
  it('the model fill: the boot\'s attempt fails naming it (and waits to try again)', async () => {
    const down = await startRuntime({ ...env, STORAGE_URI: 's3://models/sd/' });
    try {
      const failed = await down.waitFor('state', (s) => s.state === 'retrying', 60_000);
      // Before: "ECONNREFUSED at the S3 endpoint … (gave up after retries)", the check left to the reader.
      expect(failed.reason).toContain(`cannot list (1 attempt) s3://models/sd/: nothing listens at the S3 endpoint ${origin} (ECONNREFUSED): `
        + 'check the port in AWS_ENDPOINT_URL (or S3_ENDPOINT, AWS_S3_ENDPOINT), and that the store is up (gave up after retries)');
      noSecrets(failed.reason!);
    } finally {
      await down.stop();
    }
  });

  it('a LoRA adapter on LORA_URI', async () => {
    const r = await predict({ loras: [{ name: 'style' }] });
    expect([r.status, r.json.code]).toEqual([502, 'UPSTREAM']);
    expect(r.json.error).toContain(`adapter "style" could not be fetched from LORA_URI: cannot list (1 attempt) s3://loras/style/: nothing listens at the S3 endpoint ${origin} (ECONNREFUSED)`);
    noSecrets(String(r.json.error));
  });

  it('an s3:// input image', async () => {
    const r = await predict({ image: 's3://inputs/pic.png', strength: 0.5 });
    expect([r.status, r.json]).toEqual([502, { code: 'UPSTREAM', error: `instances[0].image: reading s3://inputs/pic.png failed (ECONNREFUSED at the S3 endpoint ${origin}); retry later` }]);
  });

  it('output_uri', async () => {
    const r = await predict({ output_uri: 's3://out/pic.png' });
    expect(r.json.code).toBe('STORAGE_TRANSIENT');
    expect(r.json.error).toContain(`output_uri: upload to s3://out/pic.png failed (ECONNREFUSED at the S3 endpoint ${origin}); the images were generated but not stored`);
    noSecrets(String(r.json.error));
  });
});

describe('an endpoint that is not an S3 API (a MinIO console port, a router\'s page, a web server) is named as such', () => {
  // What answers there: no S3 error code with an error, no ListBucketResult with a 200. Before, these read as a missing
  // prefix ("s3://models/sd/ does not exist (NotFound)", "no objects under s3://models/sd/"), a refusal ("access denied
  // … (Unknown); check the credentials and the bucket policy") or "Unknown (gave up after retries)".
  const PAGES: Record<string, [number, string, string]> = {
    '/empty-404': [404, 'text/plain', ''],
    '/console': [200, 'text/html', '<!doctype html><html><head><title>MinIO Console</title></head><body><div id="root"></div></body></html>'],
    '/forbidden': [403, 'text/html', '<html><body>Forbidden</body></html>'],
    '/router': [503, 'text/html', '<html><body><h1>Application is not available</h1></body></html>'],
  };
  let web: Awaited<ReturnType<typeof listenLoopback>>;
  beforeAll(async () => {
    // Path-style requests: /<bucket>?list-type=2…, so the bucket picks the page.
    web = await listenLoopback(http.createServer((req, res) => {
      const [status, type, body] = PAGES[`/${new URL(req.url!, 'http://x').pathname.split('/')[1]}`] ?? [404, 'text/plain', 'not found'];
      res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) }).end(body);
    }));
  });
  afterAll(async () => void (await web?.close()));

  const advice = "so something other than an S3 API answered (a web console, a router's page, a proxy); AWS_ENDPOINT_URL must be the "
    + "store's S3 API endpoint (MinIO: its API port, 9000 by default, not the console's 9001)";
  it.each(['sdk', 'lite'])('the warm-up through the %s transport', async (transport) => {
    const cache = await fsp.mkdtemp(path.join(os.tmpdir(), 'not-s3-'));
    try {
      const run = (bucket: string) => runWarmupCli([], { ...CREDS, AWS_ENDPOINT_URL: web.endpoint, S3_TRANSPORT: transport, S3_MAX_ATTEMPTS: '2', STORAGE_URI: `s3://${bucket}/sd`, MODEL_CACHE_DIR: cache })
        .then((r) => `${r.code} ${r.stderr.trim().split('\n').at(-1)}`);
      const at = `the S3 endpoint ${web.endpoint} answered`;
      expect(await run('empty-404')).toBe(`1 warmup: CONFIG: cannot list s3://empty-404/sd/: ${at} HTTP 404 without an S3 error code, ${advice}`);
      expect(await run('console')).toBe(`1 warmup: CONFIG: cannot list s3://console/sd/: ${at} HTTP 200 with no S3 listing, ${advice}`);
      expect(await run('forbidden')).toBe(`1 warmup: CONFIG: cannot list s3://forbidden/sd/: ${at} HTTP 403 without an S3 error code, ${advice}`);
      expect(await run('router')).toBe(`1 warmup: STORAGE_TRANSIENT: cannot list (2 attempts) s3://router/sd/: ${at} HTTP 503 without an S3 error code, ${advice}, with the store behind it up`);
    } finally {
      await fsp.rm(cache, { recursive: true, force: true });
    }
  }, 60_000);
});

describe("a first deploy's S3_ENDPOINT that reaches no S3 store: the server keeps trying, and each attempt says what to check", () => {
  // The variable as a data connection Secret names it, with user info, a path and a query the server never repeats.
  const boot = async (endpoint: string): Promise<{ srv: ServerHandle; reason: string }> => {
    const srv = await startServer({ ...CREDS, STORAGE_URI: 's3://models/sd/', S3_ENDPOINT: endpoint, S3_MAX_ATTEMPTS: '1', AWS_ENDPOINT_URL: undefined, AWS_S3_ENDPOINT: undefined });
    try {
      const failed = await srv.waitFor('state', (s) => s.state === 'retrying', 60_000);
      expect(failed.msg).toBe(`boot attempt 1 failed; trying again in ${failed.retryInSeconds} s: ${failed.reason}`);
      // The not-ready answer says the same (the retry goes on: its state is still retrying, or fetching again).
      const ready = await fetch(`${srv.url}/v2/models/model/ready`);
      const body = await ready.json() as { reason?: string };
      expect([ready.status, body.reason]).toEqual([503, failed.reason]);
      noSecrets(failed.reason! + JSON.stringify(body));
      // The listening line shows the endpoint's path (config), never its user info or query.
      for (const secret of ['s3cr3t', 'token=abc']) expect(JSON.stringify(srv.logs)).not.toContain(secret);
      return { srv, reason: failed.reason! };
    } catch (e) {
      await srv.stop();
      throw e;
    }
  };

  it('a host with no DNS record (a misspelled name, or a Service not made yet) is named, with the variable to check', async () => {
    const { srv, reason } = await boot('http://key:s3cr3t@no-such-host.invalid:9000/base?token=abc');
    try {
      // Before: "STORAGE_TRANSIENT: cannot list (1 attempt) s3://models/sd/: ENOTFOUND at the S3 endpoint http://no-such-host.invalid:9000 (gave up after retries)".
      expect(reason).toBe('STORAGE_TRANSIENT: cannot list (1 attempt) s3://models/sd/: the S3 endpoint\'s host no-such-host.invalid has no DNS record '
        + '(ENOTFOUND at http://no-such-host.invalid:9000): check the host in S3_ENDPOINT, and that the Service it names exists (gave up after retries)');
    } finally {
      await srv.stop();
    }
  }, 90_000);

  it('a web server answering 502 with an HTML page is named as not S3, with the variable set (S3_ENDPOINT)', async () => {
    const web = await listenLoopback(http.createServer((_req, res) => {
      const page = '<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>';
      res.writeHead(502, { 'content-type': 'text/html', 'content-length': Buffer.byteLength(page) }).end(page);
    }));
    const { srv, reason } = await boot(web.endpoint.replace('http://', 'http://key:s3cr3t@') + '/base?token=abc');
    try {
      // Before, the variable named was "AWS_ENDPOINT_URL (or AWS_S3_ENDPOINT)": not the one the operator set.
      expect(reason).toBe(`STORAGE_TRANSIENT: cannot list (1 attempt) s3://models/sd/: the S3 endpoint ${web.endpoint} answered HTTP 502 without an S3 error code, `
        + "so something other than an S3 API answered (a web console, a router's page, a proxy); S3_ENDPOINT must be the store's S3 API endpoint "
        + "(MinIO: its API port, 9000 by default, not the console's 9001), with the store behind it up");
    } finally {
      await srv.stop();
      await web.close();
    }
  }, 90_000);
});

describe('endpointName', () => {
  it("names AWS_ENDPOINT_URL's origin, or AWS's endpoint for the region when none is set", () => {
    expect(endpointName({ endpoint: 'https://minio.ns.svc:9000/base', region: 'us-east-1', forcePathStyle: true }, 'models')).toBe('https://minio.ns.svc:9000');
    const aws = '(AWS S3 in region eu-west-1: none of AWS_ENDPOINT_URL, S3_ENDPOINT, AWS_S3_ENDPOINT is set)';
    expect(endpointName({ endpoint: undefined, region: 'eu-west-1', forcePathStyle: false }, 'models')).toBe(`https://models.s3.eu-west-1.amazonaws.com ${aws}`);
    expect(endpointName({ endpoint: undefined, region: 'eu-west-1', forcePathStyle: false }, 'my.models')).toBe(`https://s3.eu-west-1.amazonaws.com ${aws}`);
    expect(endpointName({ endpoint: undefined, region: 'eu-west-1', forcePathStyle: true }, 'models')).toBe(`https://s3.eu-west-1.amazonaws.com ${aws}`);
  });
});
