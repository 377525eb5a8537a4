/**
 * What a long-running server meets from its clients, kept short, on the built server process (its stderr is what a
 * pod's log shows): a request with more instances, or more s3:// input images, than Node's default listener limit must
 * not print a MaxListenersExceededWarning, which reads as a leak; a V1 client that leaves is counted (499), as a WebSocket
 * one is, and the requests it pipelined are cancelled with it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import net from 'node:net';
import sharp from 'sharp';
import { CREDS, destroyS3, startS3, type S3Server } from './helpers/s3.js';
import { metric } from './helpers/runtime.js';
import { postJson, startServer, until, type ServerHandle } from './helpers/server.js';

describe('a request of many instances (MAX_IMAGES_PER_REQUEST=16)', () => {
  let srv: ServerHandle;
  let s3: S3Server;
  beforeAll(async () => {
    s3 = await startS3(['inputs']);
    // Twelve distinct input images: each is read from S3 once, all at the same time.
    for (let i = 0; i < 12; i++) {
      const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 20 * i, g: 100, b: 200 - 10 * i } } }).png().toBuffer();
      await s3.put('inputs', `in-${i}.png`, png);
    }
    srv = await startServer({ STORAGE_URI: undefined, ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', INPUT_URI_PREFIXES: 's3://inputs', MAX_IMAGES_PER_REQUEST: '16', MAX_BATCH_SIZE: '4', RESULT_CACHE_MB: '0' }, { ready: true });
  });
  afterAll(async () => {
    await srv?.stop();
    if (s3) await destroyS3(s3);
  });

  /** One V1 request of these instances: each answered with its own seed, in order, and no warning on stderr. */
  async function predictsWithoutWarning(instances: Array<{ seed: number } & Record<string, unknown>>): Promise<void> {
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances });
    expect(r.status).toBe(200);
    expect((r.json.predictions as Array<{ seed: number }>).map((p) => p.seed)).toEqual(instances.map((i) => i.seed));
    // A warning is written on a later tick than the answer; the liveness round trip gives it time to arrive.
    await fetch(`${srv.url}/`);
    await new Promise((res) => setTimeout(res, 100));
    expect(srv.stderr.join('')).not.toContain('MaxListenersExceededWarning');
  }

  it('answers 16 instances, each its own seed, twice, without a MaxListenersExceededWarning', async () => {
    for (const round of [0, 1]) {
      await predictsWithoutWarning(Array.from({ length: 16 }, (_, i) => ({ prompt: `many ${i}`, num_inference_steps: 1, height: 64, width: 64, seed: 100 * round + i })));
    }
  });

  it('reads twelve s3:// input images of one request at once without a MaxListenersExceededWarning', async () => {
    await predictsWithoutWarning(Array.from({ length: 12 }, (_, i) => ({ prompt: `in ${i}`, image: `s3://inputs/in-${i}.png`, strength: 0.5, num_inference_steps: 2, seed: i })));
  });

  it('uploads sixteen images of one request to output_uri at once without a MaxListenersExceededWarning', async () => {
    const r = await postJson(`${srv.url}/v1/models/model:predict`, { instances: [
      { prompt: 'many out', num_images_per_prompt: 16, num_inference_steps: 1, height: 64, width: 64, seed: 5, output_uri: 's3://inputs/out/many.png' }] });
    expect(r.status).toBe(200);
    expect((r.json.predictions as Array<{ image: { uri: string } }>).map((p) => p.image.uri)).toEqual(Array.from({ length: 16 }, (_, i) => `s3://inputs/out/many-${i}.png`));
    await fetch(`${srv.url}/`);
    await new Promise((res) => setTimeout(res, 100));
    expect(srv.stderr.join('')).not.toContain('MaxListenersExceededWarning');
  });

  it('counts a V1 client that leaves mid-generation as 499 in inference_request_count, as the WebSocket route does', async () => {
    const v1 = { model_name: 'model', protocol: 'v1' };
    const before = { gone: await metric(srv, 'inference_request_count', { ...v1, status: '499' }), all: await metric(srv, 'inference_request_count', v1) };
    const body = JSON.stringify({ instances: [{ prompt: 'left', num_inference_steps: 400, height: 1024, width: 1024, seed: 7 }] });
    const sock = net.connect(srv.port, '127.0.0.1', () => {
      sock.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    });
    sock.on('error', () => undefined);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1, 10_000, 25);
    sock.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0, 10_000, 25);
    expect((await metric(srv, 'inference_request_count', { ...v1, status: '499' })) - before.gone).toBe(1);
    expect((await metric(srv, 'inference_request_count', v1)) - before.all).toBe(1);
    // The access log names it too.
    await until(() => srv.logs.some((l) => l.msg === 'inference request' && l.status === 499), 5_000, 25);
  });

  it('cancels requests pipelined behind a running one when their client leaves: queue and in-flight back to 0', async () => {
    const cancelled0 = await metric(srv, 'inference_cancelled_total');
    // Step counts differ so that they never share a batch (MAX_BATCH_SIZE=4): one runs, two wait.
    const post = (seed: number) => {
      const body = JSON.stringify({ instances: [{ prompt: 'pipelined', num_inference_steps: 500 - seed, height: 1024, width: 1024, seed }] });
      return `POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
    };
    const sock = net.connect(srv.port, '127.0.0.1', () => sock.write(post(1) + post(2) + post(3)));
    sock.on('error', () => undefined);
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 2, 10_000, 25);
    sock.destroy();
    // Each of the three would run for seconds; left to run, the two behind would hold the queue and the device.
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 0, 1_500, 25);
    expect(await metric(srv, 'inference_queue_depth')).toBe(0);
    expect((await metric(srv, 'inference_cancelled_total')) - cancelled0).toBe(3);
  });
});
