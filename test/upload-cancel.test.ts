/**
 * A request whose output_uri upload is being retried (the store answers every PUT 500 InternalError) and that is
 * cancelled, by its client leaving or by REQUEST_TIMEOUT_S: the upload's retries stop with it (a throttled upload's
 * waits do too: test/request-throttle.test.ts). lib-storage gives the requests it
 * sends no signal, and its abort() stopped none of them, so the runtime went on sending PUTs for up to ~3 s of backoff
 * for a request already answered. A real server process, s3rver behind the fault proxy, which counts every PUT. And a
 * SIGTERM right after a client left mid multipart upload: the server used to exit with the upload and its parts left.
 */
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { fixtureModel } from './fixtures/index.js';
import { metric } from './helpers/runtime.js';
import { cleanUpS3, CREDS, startFaultProxy, startS3, unfinishedUploads, type FaultProxy, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, until, type LogLine, type ServerHandle } from './helpers/server.js';
import { UPLOAD_ATTEMPTS } from '../src/storage/upload-retry.js';

const tmp = tempDir('upload-cancel-');
let s3: S3Server;
let proxy: FaultProxy;
let srv: ServerHandle;
/** Longer than the upload's backoff in all (200 + 400 + 800 + 1600 ms at most, upload-retry.ts): a PUT still due would come within it. */
const RETRIES_MS = 3_500;
const FAILING = { status: 500, code: 'InternalError' };

beforeAll(async () => {
  const model = await fixtureModel();
  s3 = await startS3(['out']);
  proxy = await startFaultProxy(s3.port);
  // REQUEST_TIMEOUT_S left at its default here: a short one fired first on a loaded machine, before the client left
  // (the request logged 504, not 499). The timeout's own case starts its own server.
  srv = await startServer(serverEnv(model), { ready: true });
}, 120_000);

const serverEnv = (model: string, extra: Record<string, string> = {}) => ({
  ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: path.join(tmp.dir, 'cache'),
  EXECUTION_PROVIDER: 'cpu', WARMUP_STEPS: '1', RESULT_CACHE_MB: '0', ...extra,
});

cleanUpS3(() => ({ s3, proxy, tmp: tmp.dir }));
// After-hooks run last registered first: the server stops before its store and folder go.
afterAll(async () => {
  await srv?.stop();
});

const instance = (seed: number, uri: string) => ({ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed, output_uri: uri });
const answered = (status: number) => (l: LogLine) => l.msg === 'inference request' && l.status === status;
const troubles = (from: number) => srv.logs.slice(from).filter((l) => l.level === 'warn' || l.level === 'error' || l.level === 'fatal');

it('a client that leaves while its upload backs off to retry: no PUT is sent after it left, and the request is logged 499', async () => {
  proxy.faults = { failPuts: { keys: /^left\//, every: FAILING } };
  const puts0 = proxy.stats.puts;
  const logs0 = srv.logs.length;
  const body = JSON.stringify({ instances: [instance(1, 's3://out/left/fox.png')] });
  const sock = net.connect(srv.port, '127.0.0.1', () => sock.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\n`
    + `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`));
  sock.on('error', () => undefined);
  // The first PUT refused: the upload waits out its backoff before the next of its 5 attempts.
  await until(() => proxy.stats.puts > puts0, 30_000, 2);
  // Its images made, the request is still in flight while it uploads them (OPERATIONS.md's definition of the gauge).
  expect(await metric(srv, 'inference_requests_in_flight')).toBe(1);
  sock.destroy();
  const left = proxy.stats.puts;
  await until(() => srv.logs.slice(logs0).some(answered(499)), 10_000);
  expect(await metric(srv, 'inference_requests_in_flight')).toBe(0);
  await sleep(RETRIES_MS);
  // One PUT may have been on its way as the client left; none after it.
  expect(proxy.stats.puts - left).toBeLessThanOrEqual(1);
  expect(troubles(logs0)).toEqual([]);
}, 60_000);

it('REQUEST_TIMEOUT_S passing while the upload is retried: answered 504 TIMEOUT, and no PUT is sent after it', async () => {
  const timed = await startServer(serverEnv(await fixtureModel(), { REQUEST_TIMEOUT_S: '2' }), { ready: true });
  let release!: () => void;
  try {
    // The first PUT refused at once; the retry's refusal held until the 504 is out, so the timeout comes while attempts
    // are left however late it fires (the first PUT has 2 s to come after a 64x64 step: 0.25 s on a loaded machine).
    // Released then: an upload still retrying sends its next PUTs within 1.2 s of backoff, well inside the wait below.
    proxy.faults = { failPuts: { keys: /^late\//, at: { [proxy.stats.puts + 1]: FAILING }, every: { ...FAILING, after: new Promise<void>((r) => (release = r)) } } };
    const puts0 = proxy.stats.puts;
    const r = await postJson(`${timed.url}/v1/models/model:predict`, { instances: [instance(2, 's3://out/late/fox.png')] });
    const timedOut = proxy.stats.puts;
    expect([r.status, r.json]).toEqual([504, { error: 'the request took longer than REQUEST_TIMEOUT_S=2s and was stopped', code: 'TIMEOUT' }]);
    // It timed out during the upload's attempts, not before them, nor after the last.
    expect(timedOut - puts0).toBeGreaterThanOrEqual(1);
    expect(timedOut - puts0).toBeLessThan(UPLOAD_ATTEMPTS);
    release();
    await sleep(RETRIES_MS);
    expect(proxy.stats.puts - timedOut).toBeLessThanOrEqual(1);
    expect(timed.logs.filter(answered(504))).toHaveLength(1);
    expect(timed.logs.filter((l) => l.level === 'warn' || l.level === 'error' || l.level === 'fatal')).toEqual([]);
  } finally {
    release();
    await timed.stop();
  }
}, 120_000);

it('SIGTERM just after a client left mid multipart upload: the server aborts the upload before it exits, none is left', async () => {
  // The shared server, last: this case stops it.
  const big = srv;
  const logs0 = big.logs.length;
  let release!: () => void;
  proxy.faults = { abortUploads: true, hold: { keys: /\/out\/term\/fox\.png\?/, method: 'PUT', release: new Promise<void>((r) => (release = r)) } };
  const created = () => Object.values(proxy.stats.multipart.created).includes('term/fox.png');
  const body = JSON.stringify({ instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 2048, width: 2048, seed: 3, output_uri: 's3://out/term/fox.png' }] });
  const sock = net.connect(big.port, '127.0.0.1', () => sock.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\n`
    + `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`));
  sock.on('error', () => undefined);
  try {
    // Over 5 MiB, so a multipart upload, whose parts the proxy holds.
    await until(created, 120_000, 20);
    sock.destroy();
    await until(() => big.logs.slice(logs0).some((l) => l.msg === 'inference request' && l.status === 499), 10_000);
    const stopped = big.stop('SIGTERM', 30_000);
    // The parts end after the signal: the abort can only go once they have.
    await sleep(500);
    release();
    expect((await stopped).code).toBe(0);
    expect(Object.values(unfinishedUploads(proxy)).filter((k) => k.startsWith('term/'))).toEqual([]);
    expect(big.logs.slice(logs0).filter((l) => l.level === 'warn' || l.level === 'error').map((l) => l.msg)).toEqual([]);
  } finally {
    release();
    sock.destroy();
    await big.stop();
  }
}, 180_000);
