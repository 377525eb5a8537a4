/**
 * Throttling (503 SlowDown) of the S3 requests around uploads: the push's LIST and its --replace deletes wait it out as
 * its uploads do, and the abort of a failed upload's multipart upload (cleanup) waits it out within the cleanup's own
 * bound, then says S3 kept throttling it. An output_uri upload's cleanup requests are each counted once
 * (s3_throttled_responses_total{operation="output_cleanup"}, through createOutputStore's callback): lib-storage's own
 * abort, and the look for an upload that a lost CreateMultipartUpload made with its abort. s3rver on loopback behind
 * the fault proxy, a real warm-up CLI process for the push, the runtime's own S3 client for the aborts.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { CreateMultipartUploadCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { createLogger } from '../src/log.js';
import type { EncodedImage } from '../src/runtime/engine.js';
import { createOutputStore } from '../src/runtime/output.js';
import { abortUploads, cleanupReason } from '../src/storage/multipart.js';
import { createRequestS3 } from '../src/storage/request-s3.js';
import { createS3 } from '../src/storage/s3-sdk.js';
import { cleanUpS3, CREDS, detBytes, type FaultProxy, rejection, s3Env, type S3Server, startS3WithProxy, testConfig, unfinishedUploads } from './helpers/s3.js';
import { runWarmupCli as cli } from './helpers/warmup-cli.js';

let s3: S3Server;
let proxy: FaultProxy;
let tmp: string;
let local: string;

beforeAll(async () => {
  Object.assign(process.env, CREDS);
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'cleanup-throttle-'));
  local = path.join(tmp, 'export');
  await fsp.mkdir(local);
  await fsp.writeFile(path.join(local, 'model_index.json'), '{"_class_name":"StableDiffusionPipeline"}');
  await fsp.writeFile(path.join(local, 'unet.onnx'), detBytes(70_000, 7));
  ({ s3, proxy } = await startS3WithProxy());
});

cleanUpS3(() => ({ s3, proxy, tmp }));

const keys = async (prefix: string) => ((await s3.client.send(new ListObjectsV2Command({ Bucket: 'models', Prefix: prefix }))).Contents ?? []).map((o) => o.Key!).sort();
// S3_THROTTLE_TIMEOUT_S=6: no wait longer than 1.5 s, and the 5 throttled answers below (4 waits, at most 5.5 s) never reach it.
const env = () => s3Env(proxy.endpoint, path.join(tmp, 'unused'), { S3_THROTTLE_TIMEOUT_S: '6', LOG_LEVEL: 'warn' });

describe('the push waits throttling out', () => {
  it('its LIST: five SlowDowns in a row (its five tries) and the push goes on', async () => {
    const before = proxy.stats.slowDowns;
    proxy.faults = { listScript: [{ answer: 'slowDown', count: 5 }] };
    const r = await cli(['push', local, 's3://models/push/list'], env());
    // Before: each SlowDown spent one of its 5 tries, and the push failed "cannot list … SlowDown (gave up after retries)".
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.stats.slowDowns - before).toBe(5);
    expect(r.stderr).toContain('S3 is throttling the push\'s listing (SlowDown): backing off; the push fails once throttled for 6 s (S3_THROTTLE_TIMEOUT_S) without an answer');
    expect(await keys('push/list/')).toEqual(['push/list/model_index.json', 'push/list/unet.onnx']);
  }, 60_000);

  it('its --replace deletes: five SlowDowns in a row (its five tries) and the stale objects still go', async () => {
    expect((await cli(['push', local, 's3://models/push/re'], env())).code).toBe(0);
    await s3.put('models', 'push/re/vae_encoder/model.onnx', 'old');
    const before = proxy.stats.slowDowns;
    proxy.faults = { slowDown: { deletes: true, count: 5 } };
    const r = await cli(['push', local, 's3://models/push/re', '--replace'], env());
    // Before: "uploaded, but 1 object(s) the export does not have are still under the prefix: … SlowDown".
    expect(r.code, r.stderr).toBe(0);
    expect(proxy.stats.slowDowns - before).toBe(5);
    expect(r.stderr).toContain('push: deleted 1 object(s) the export does not have');
    expect(await keys('push/re/')).toEqual(['push/re/model_index.json', 'push/re/unet.onnx']);
  }, 60_000);

  it('a storm on its deletes that outlasts S3_THROTTLE_TIMEOUT_S fails naming throttling and what is left', async () => {
    expect((await cli(['push', local, 's3://models/push/gone'], env())).code).toBe(0);
    await s3.put('models', 'push/gone/vae_encoder/model.onnx', 'old');
    proxy.faults = { slowDown: { deletes: true } };
    const r = await cli(['push', local, 's3://models/push/gone', '--replace'], { ...env(), S3_THROTTLE_TIMEOUT_S: '2' });
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n').at(-1)).toMatch(new RegExp('^warmup: STORAGE_TRANSIENT: uploaded, but 1 object\\(s\\) the export does not have are still under the prefix: '
      + 'cannot delete s3://models/push/gone/vae_encoder/model\\.onnx: S3 kept throttling the push\'s delete \\(SlowDown, \\d+ throttled answers\\) for 2 s '
      + '\\(S3_THROTTLE_TIMEOUT_S\\) without an answer; the store is asked for more than it serves: push again later \\(with --replace\\)'));
  }, 60_000);
});

describe('the abort of a failed upload\'s multipart upload, throttled', () => {
  const created = async (client: ReturnType<typeof createS3>['client'], key: string) =>
    [(await client.send(new CreateMultipartUploadCommand({ Bucket: 'models', Key: key }))).UploadId!, key] as const;

  it('waits a short storm out, each throttled answer counted', async () => {
    proxy.faults = { abortUploads: true };
    const s3c = createS3(testConfig(proxy.endpoint, tmp).s3);
    try {
      const uploads = [await created(s3c.client, 'out/a.png'), await created(s3c.client, 'out/b.png')];
      let counted = 0;
      const before = proxy.stats.slowDowns;
      proxy.faults.slowDown = { forMs: 1_500, aborts: true };
      const got = await abortUploads(s3c.client, 'models', uploads, 10_000, 5_000, { watch: { throttled: () => void counted++ } });
      expect(got.map((g) => g.status)).toEqual(['fulfilled', 'fulfilled']);
      expect(proxy.stats.multipart.aborted).toEqual(expect.arrayContaining(uploads.map(([id]) => id)));
      expect(proxy.stats.slowDowns - before).toBeGreaterThanOrEqual(2);
      // Before: nothing heard them (the metric's output_cleanup stayed at 0).
      expect(counted).toBe(proxy.stats.slowDowns - before);
    } finally {
      s3c.destroy();
    }
  }, 30_000);

  it('a storm past the cleanup\'s bound: the abort gives up within it, saying S3 kept throttling it; the upload is left', async () => {
    proxy.faults = { abortUploads: true };
    const s3c = createS3(testConfig(proxy.endpoint, tmp).s3);
    const lines: Array<Record<string, unknown>> = [];
    const log = createLogger('info', 'test', { write: (l: string) => void lines.push(JSON.parse(l) as Record<string, unknown>) });
    try {
      const upload = await created(s3c.client, 'out/c.png');
      proxy.faults.slowDown = { aborts: true };
      const t0 = performance.now();
      const [got] = await abortUploads(s3c.client, 'models', [upload], 2_000, 5_000, { log });
      expect(performance.now() - t0).toBeLessThan(6_000);
      expect(got!.status).toBe('rejected');
      // Before: "SlowDown", as if the store had refused it, after its 8 tries.
      expect(cleanupReason((got as PromiseRejectedResult).reason, 2_000)).toBe('SlowDown: S3 kept throttling the cleanup for its 2 s');
      expect(proxy.stats.multipart.aborted).not.toContain(upload[0]);
      expect(lines.find((l) => /throttling the abort/.test(String(l.msg)))).toMatchObject({ level: 'warn',
        msg: 'S3 is throttling the abort (SlowDown): backing off; the multipart upload is left once throttled for 2 s (the cleanup\'s bound) without an answer' });
    } finally {
      s3c.destroy();
    }
  }, 30_000);
  it('the bound running out in the try after a throttled answer (S3 throttled it, then left it unanswered): the failure is the throttling, not the cut', async () => {
    proxy.faults = { abortUploads: true };
    const s3c = createS3(testConfig(proxy.endpoint, tmp).s3);
    try {
      const upload = await created(s3c.client, 'out/d.png');
      proxy.faults.slowDown = { aborts: true, count: 1 };
      proxy.faults.stallAborts = { keys: /^out\/d\.png$/, count: 1 };
      const [got] = await abortUploads(s3c.client, 'models', [upload], 2_000, 5_000);
      expect(proxy.faults.stallAborts.count).toBe(0);
      expect(got!.status).toBe('rejected');
      // Before: "AbortError" (the cut of the unanswered try), as a loaded machine's slow SlowDown answer gave too.
      expect(cleanupReason((got as PromiseRejectedResult).reason, 2_000)).toBe('SlowDown: S3 kept throttling the cleanup for its 2 s');
      expect(proxy.stats.multipart.aborted).not.toContain(upload[0]);
    } finally {
      s3c.destroy();
    }
  }, 30_000);
});

describe('an output_uri upload\'s cleanup requests, throttled, count as output_cleanup once each', () => {
  const MiB = 1 << 20;
  // 11 MiB: a multipart upload (5 MiB parts).
  const image = (seed: number): EncodedImage => {
    const b = detBytes(11 * MiB, seed);
    return { data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, seed, width: 8, height: 8, format: 'png' };
  };
  const store = () => {
    const requestS3 = createRequestS3(testConfig(proxy.endpoint, tmp).s3);
    const heard = { upload: [] as string[], cleanup: [] as string[] };
    const out = createOutputStore(requestS3, undefined, (c) => void heard.upload.push(c), (c) => void heard.cleanup.push(c));
    return { requestS3, out, heard };
  };
  const left = (prefix: string) => Object.values(unfinishedUploads(proxy)).filter((k) => k.startsWith(prefix));

  it('lib-storage\'s own AbortMultipartUpload of a failed upload, answered SlowDown: counted, and the upload aborted again', async () => {
    const { requestS3, out, heard } = store();
    try {
      // Every part refused: lib-storage sends its one abort, which S3 throttles; the output store aborts it again.
      proxy.faults = { abortUploads: true, failAborts: { count: 1, status: 503, code: 'SlowDown' }, failPuts: { keys: /^out\/refused\.png$/, every: { status: 403, code: 'AccessDenied' } } };
      const err = await rejection(out.upload('s3://models/out/refused.png', [image(1)]));
      expect(err.code).toBe('STORAGE_DENIED');
      await out.settled(15_000);
      expect(proxy.faults.failAborts!.count).toBe(0);
      expect(left('out/refused')).toEqual([]);
      // Before: [] (that abort has one attempt and no Throttle: nothing heard its answer).
      expect(heard).toEqual({ upload: [], cleanup: ['SlowDown'] });
    } finally {
      requestS3.destroy();
    }
  }, 30_000);

  it('the look for the upload a lost CreateMultipartUpload made (ListMultipartUploads) and its abort, each answered SlowDown once: two counted', async () => {
    const { requestS3, out, heard } = store();
    try {
      // The listing goes first (slowDown matches it: no abort is sent before it), then the lost upload's abort (failAborts).
      proxy.faults = { abortUploads: true, listUploads: true, loseCreates: { keys: /^out\/lost\.png$/, count: 1 }, slowDown: { aborts: true, count: 1 },
        failAborts: { count: 1, status: 503, code: 'SlowDown' } };
      const listings = proxy.stats.uploadListings;
      expect(await out.upload('s3://models/out/lost.png', [image(2)])).toEqual(['s3://models/out/lost.png']);
      expect([proxy.faults.loseCreates!.count, proxy.faults.slowDown!.count, proxy.faults.failAborts!.count]).toEqual([0, 0, 0]);
      expect(proxy.stats.uploadListings - listings).toBe(1);
      expect(left('out/lost')).toEqual([]);
      // Before: [] (the look's Throttle had no watch). Each once: the abort's own Throttle counts it, the client's
      // middleware, which sees lib-storage's abort, leaves it alone.
      expect(heard).toEqual({ upload: [], cleanup: ['SlowDown', 'SlowDown'] });
    } finally {
      requestS3.destroy();
    }
  }, 30_000);
});
