/**
 * S3 over TLS, as on clusters whose object store has a certificate from an internal CA (ODF, MinIO): a loopback TLS
 * front with the test CA's certificate (test/fixtures/tls) before s3rver. A trusted endpoint serves the model through
 * both transports; an untrusted certificate or an https:// endpoint that speaks plain HTTP fails at once with
 * STORAGE_TLS saying what to set, instead of eight retries ending in "gave up".
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/log.js';
import { resolveModel } from '../src/storage/fetch.js';
import { CREDS, detBytes, rejection, type S3Server, startS3, testConfig } from './helpers/s3.js';
import { TLS_FIXTURES, tlsFront, type TlsFront } from './helpers/tls-front.js';

const CA = path.join(TLS_FIXTURES, 'ca.pem');
const log = silentLogger();
const files: Record<string, Buffer> = { 'model_index.json': Buffer.from('{}'), 'unet/model.onnx': detBytes(300_000, 7) };

let s3: S3Server;
let tmp: string;
// A refused certificate must not be retried: the front counts connections.
let front: TlsFront;

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'storage-tls-'));
  s3 = await startS3(['models']);
  for (const [rel, body] of Object.entries(files)) await s3.put('models', `sd/${rel}`, body);
  front = await tlsFront(s3.port);
});

afterAll(async () => {
  await front?.close();
  await s3?.stop();
  await fsp.rm(s3.dir, { recursive: true, force: true });
  await fsp.rm(tmp, { recursive: true, force: true });
});

describe.each(['lite', 'sdk'] as const)('S3 over TLS (S3_TRANSPORT=%s)', (transport) => {
  const https = () => `https://127.0.0.1:${front.port}`;
  const cfg = async (endpoint: string, extra: Record<string, string> = {}) =>
    testConfig(endpoint, await fsp.mkdtemp(path.join(tmp, 'cache-')), { S3_TRANSPORT: transport, S3_MAX_ATTEMPTS: '8', ...extra });

  it('fetches through an endpoint whose CA is given as AWS_CA_BUNDLE', async () => {
    const r = await resolveModel('s3://models/sd', { cfg: await cfg(https(), { S3_USE_HTTPS: '1', AWS_CA_BUNDLE: CA }), log });
    for (const [rel, body] of Object.entries(files)) expect((await fsp.readFile(path.join(r.dir, rel))).equals(body), rel).toBe(true);
  });

  it('fetches with S3_VERIFY_SSL=0 and no CA bundle', async () => {
    const r = await resolveModel('s3://models/sd', { cfg: await cfg(https(), { S3_USE_HTTPS: '1', S3_VERIFY_SSL: '0' }), log });
    expect((await fsp.readFile(path.join(r.dir, 'unet/model.onnx'))).equals(files['unet/model.onnx']!)).toBe(true);
  });

  it('an untrusted certificate fails at once with STORAGE_TLS naming AWS_CA_BUNDLE, not after retries', async () => {
    const before = front.connections();
    const e = await rejection(resolveModel('s3://models/sd', { cfg: await cfg(https(), { S3_USE_HTTPS: '1' }), log }));
    expect(e.code).toBe('STORAGE_TLS');
    expect(e.message.startsWith(`cannot list s3://models/sd/: TLS to the S3 endpoint ${https()} failed (UNABLE_TO_VERIFY_LEAF_SIGNATURE); the endpoint's certificate is not trusted: give its CA bundle as AWS_CA_BUNDLE`), e.message).toBe(true);
    // One connection: the client does not come back seven more times for the same certificate.
    expect(front.connections() - before).toBe(1);
  });

  it('an https:// endpoint that speaks plain HTTP fails at once with STORAGE_TLS saying so', async () => {
    const e = await rejection(resolveModel('s3://models/sd', { cfg: await cfg(`https://127.0.0.1:${s3.port}`), log }));
    expect(e.code).toBe('STORAGE_TLS');
    expect(e.message.startsWith(`cannot list s3://models/sd/: TLS to the S3 endpoint https://127.0.0.1:${s3.port} failed (EPROTO); the endpoint answers plain HTTP: use an http:// AWS_ENDPOINT_URL`), e.message).toBe(true);
  });
});
