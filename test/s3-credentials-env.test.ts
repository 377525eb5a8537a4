/**
 * S3 credentials as Kubernetes delivers them: a Secret made with `kubectl create secret --from-file` keeps the file's
 * last newline in AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN. The store here is s3rver behind a
 * loopback front that checks each request's SigV4 signature with the real secret (s3rver itself does not), so a
 * newline signed into the key would be refused as S3 refuses it. Both transports, the warm-up CLI and the server.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { destroyS3, startS3, type S3Server } from './helpers/s3.js';
import { listenLoopback } from './helpers/loopback.js';
import { startServer } from './helpers/server.js';
import { verifySigV4 } from './helpers/sigv4-reference.js';

const CLI = path.resolve('dist/warmup/main.js');
const TOKEN = 'FwoGZXIvYXdzEXAMPLE//token+with/slashes=';
const MODEL: Record<string, string> = { 'model_index.json': '{"_class_name":"StableDiffusionPipeline"}', 'unet/model.onnx': 'x'.repeat(70_000) };

let s3: S3Server;
let front: { endpoint: string; close(): Promise<void> };
let tmp: string;
/** Why the front refused a request, for the failure message. */
const refused: string[] = [];

beforeAll(async () => {
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 's3-creds-'));
  s3 = await startS3(['models']);
  for (const [k, v] of Object.entries(MODEL)) await s3.put('models', `sd/${k}`, v);
  // Passes a request on to s3rver only when it is signed by key id S3RVER with secret S3RVER (and the session token
  // is exactly TOKEN where one is sent); otherwise answers 403 SignatureDoesNotMatch, as S3 does.
  const server = http.createServer((req, res) => {
    const check = verifySigV4(req, 'S3RVER');
    const keyId = /Credential=([^/]*)\//.exec(String(req.headers.authorization))?.[1];
    const token = req.headers['x-amz-security-token'];
    if (!check.ok || keyId !== 'S3RVER' || (token !== undefined && token !== TOKEN)) {
      refused.push(`${req.method} ${req.url}: ${check.why ?? `key id ${JSON.stringify(keyId)}, token ${JSON.stringify(token)}`}`);
      res.writeHead(403, { 'content-type': 'application/xml' })
        .end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the signature you provided.</Message></Error>');
      return;
    }
    const up = http.request({ host: '127.0.0.1', port: s3.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode!, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  front = await listenLoopback(server);
}, 20_000);

afterAll(async () => {
  await front?.close();
  if (s3) await destroyS3(s3);
  if (tmp) await fsp.rm(tmp, { recursive: true, force: true });
});

/** The data-connection Secret's keys, each with the newline `--from-file` leaves. */
const secretEnv = (cache: string, extra: Record<string, string> = {}): Record<string, string> => ({
  PATH: process.env.PATH ?? '',
  AWS_ACCESS_KEY_ID: 'S3RVER\n', AWS_SECRET_ACCESS_KEY: 'S3RVER\n', AWS_SESSION_TOKEN: `${TOKEN}\n`,
  AWS_S3_ENDPOINT: `${front.endpoint}\n`, AWS_DEFAULT_REGION: 'us-east-1\n', AWS_S3_BUCKET: 'models\n',
  STORAGE_URI: 's3://models/sd\n', MODEL_CACHE_DIR: cache, S3_MAX_ATTEMPTS: '2', ...extra,
});

function cli(env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('S3 credentials with the newline of `kubectl create secret --from-file`', () => {
  it.each(['sdk', 'lite'])('the warm-up Job fetches through the %s transport, and says which variables it trimmed', async (transport) => {
    refused.length = 0;
    const r = await cli(secretEnv(path.join(tmp, `cli-${transport}`), { S3_TRANSPORT: transport, LOG_LEVEL: 'warn' }));
    expect(r.code, `${r.stderr}\nrefused: ${refused.join('\n')}`).toBe(0);
    expect(refused).toEqual([]);
    expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!)).toMatchObject({ files: 2, fromCache: false });
    const warn = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => String(l.msg).startsWith('removed whitespace around S3 credentials'));
    expect(warn?.variables).toEqual(['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN']);
    expect(r.stderr).not.toContain(TOKEN);
    // Timeouts here guard a hang, not a speed: on a loaded 2-core machine the CLI took up to 6.9 s and the server's
    // start to files-ready up to 9.6 s, close to the 15 s these had.
  }, 60_000);

  it('the server fetches the model with them (the default transport)', async () => {
    refused.length = 0;
    const srv = await startServer({ ...secretEnv(path.join(tmp, 'server')), EXECUTION_PROVIDER: 'cpu' });
    try {
      const got = await srv.waitFor('files-ready', undefined, 45_000);
      expect(got).toMatchObject({ files: 2, fromCache: false });
      expect(refused).toEqual([]);
      expect(srv.logs.find((l) => String(l.msg).startsWith('removed whitespace around S3 credentials'))?.variables)
        .toEqual(['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN']);
      expect(JSON.stringify(srv.logs)).not.toContain(TOKEN);
    } finally {
      await srv.stop('SIGKILL');
    }
  }, 60_000);

  it('whitespace inside a key is a configuration error naming the variable, never showing the value', () => {
    const err = (() => {
      try {
        loadConfig({ AWS_ACCESS_KEY_ID: 'AKIA EXAMPLE', AWS_SECRET_ACCESS_KEY: 'wJalr\nXUtnFEMI', AWS_SESSION_TOKEN: ' ok-token\n' });
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).problems).toEqual([
      'AWS_ACCESS_KEY_ID has a space, line break or control character inside it; copy the key into the Secret again',
      'AWS_SECRET_ACCESS_KEY has a line break or control character inside it; copy the key into the Secret again',
    ]);
    expect((err as Error).message).not.toMatch(/AKIA|wJalr/);
    // A secret only keys the signature: a MinIO or Ceph password with spaces in it is a valid one.
    expect(() => loadConfig({ AWS_ACCESS_KEY_ID: 'minio-user', AWS_SECRET_ACCESS_KEY: 'my secret pass' })).not.toThrow();
  });
});

describe('a pod the data connection Secret did not reach (no envFrom, or a Secret without these keys)', () => {
  // Only the static keys: HOME has no ~/.aws and instance metadata is off, so the AWS SDK's chain finds nothing (on a
  // cloud VM it would find the machine's role).
  const noKeys = (cache: string, keys: Record<string, string>): Record<string, string> => {
    const { AWS_ACCESS_KEY_ID: _a, AWS_SECRET_ACCESS_KEY: _s, AWS_SESSION_TOKEN: _t, ...env } = secretEnv(cache);
    return { ...env, ...keys, HOME: cache, AWS_EC2_METADATA_DISABLED: 'true' };
  };

  it.each([
    ['neither key', {}, 'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set'],
    ['the key id alone', { AWS_ACCESS_KEY_ID: 'S3RVER' }, 'AWS_SECRET_ACCESS_KEY is not set (AWS_ACCESS_KEY_ID is)'],
  ])('%s: the warm-up names the variables missing, not "access denied … check the bucket policy"', async (_, keys, which) => {
    refused.length = 0;
    const cache = path.join(tmp, `no-keys-${Object.keys(keys).length}`);
    await fsp.mkdir(cache);
    const r = await cli(noKeys(cache, keys));
    expect([r.code, r.stderr.trim().split('\n').at(-1)]).toEqual([1, `warmup: STORAGE_DENIED: cannot list s3://models/sd/: no S3 credentials: ${which}, and the AWS SDK `
      + "found no other source (web identity, a profile, an instance role); give the pod the data connection Secret's keys with envFrom (templates/s3-secret.yaml)"]);
    // Nothing was sent unsigned or signed with half a key.
    expect(refused).toEqual([]);
  }, 60_000);
});
