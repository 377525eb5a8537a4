/**
 * An adapter from an S3 LORA_URI whose fetch fails on the cache volume (MODEL_CACHE_DIR full, read-only, or not a
 * folder) is answered with the cache's code, which names the volume, not 502 UPSTREAM, which blames S3; the next request
 * once the volume is fixed is served. A real server process, s3rver on loopback, and real volumes: a file where the
 * cache folder must be (anywhere), and a real tmpfs, full then read-only (where this test may mount one).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { READ_ONLY_CACHE } from '../src/storage/fetch.js';
import { fixtureModel } from './fixtures/index.js';
import { putStyleAdapter } from './helpers/big-adapter.js';
import { CREDS, destroyS3, startS3, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, type ServerHandle } from './helpers/server.js';
import { tmpfsForTests } from './helpers/tmpfs.js';

const tmp = tempDir('lora-cache-volume-');
let s3: S3Server;
let model: string;

beforeAll(async () => {
  model = await fixtureModel();
  s3 = await startS3(['loras']);
  // A valid kohya adapter of ~3 MB: more than a 1 MiB volume holds.
  await putStyleAdapter(s3, model, tmp.dir);
}, 60_000);

afterAll(async () => {
  if (s3) await destroyS3(s3);
  tmp.cleanup();
});

const serve = (cacheDir: string) => startServer({
  ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: cacheDir,
  EXECUTION_PROVIDER: 'cpu', LORA_URI: 's3://loras/adapters/', WARMUP_STEPS: '1',
}, { ready: true });

const styled = (srv: ServerHandle) => postJson(`${srv.url}/v1/models/model:predict`,
  { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 1, loras: [{ name: 'style', scale: 0.5 }] }] });

const stored = (why: string) => `adapter "style" from LORA_URI could not be stored: ${why}`;

describe('an S3 adapter the cache volume cannot take', () => {
  it('MODEL_CACHE_DIR a file: 500 CACHE_IO naming MODEL_CACHE_DIR, no local path; served once it is a folder', async () => {
    const cache = path.join(tmp.dir, 'cache-file');
    writeFileSync(cache, 'not a folder');
    const srv = await serve(cache);
    try {
      const r = await styled(srv);
      expect([r.status, r.json]).toEqual([500, { code: 'CACHE_IO', error: stored('cannot create the model cache directory (MODEL_CACHE_DIR): it, or a folder above it, is a file') }]);
      rmSync(cache);
      mkdirSync(cache);
      const again = await styled(srv);
      expect(again.status, JSON.stringify(again.json)).toBe(200);
      expect(readdirSync(cache).filter((d) => d.startsWith('s3-loras-adapters-style-'))).toHaveLength(1);
    } finally {
      await srv.stop();
    }
  }, 120_000);

  const mnt = path.join(tmp.dir, 'volume');
  // Where a tmpfs cannot be mounted (no CAP_SYS_ADMIN) the test above still runs.
  const mounted = tmpfsForTests(mnt, '1m');

  it.skipIf(!mounted)('a real 1 MiB tmpfs: 500 NO_SPACE; remounted read-only: 500 CACHE_IO (EROFS); enlarged: served', async () => {
    const srv = await serve(mnt);
    try {
      const full = await styled(srv);
      expect([full.status, full.json]).toEqual([500, {
        code: 'NO_SPACE',
        error: expect.stringMatching(new RegExp(`^${stored('not enough space in the model cache \\(MODEL_CACHE_DIR\\): need \\d\\.\\d MB more, \\d\\.\\d MB free; the cache holds no other entry; enlarge the PVC or remove entries not in use \\(warmup cache prune\\)')}$`)),
      }]);
      execFileSync('mount', ['-o', 'remount,ro', mnt]);
      const ro = await styled(srv);
      const advice = READ_ONLY_CACHE.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      expect([ro.status, ro.json]).toEqual([500, { code: 'CACHE_IO', error: expect.stringMatching(new RegExp(`^${stored(`the model cache \\(MODEL_CACHE_DIR\\) refused \\w+: EROFS \\(${advice}\\)`)}$`)) }]);
      for (const r of [full, ro]) expect(JSON.stringify(r.json)).not.toContain(tmp.dir);
      execFileSync('mount', ['-o', 'remount,rw,size=16m', mnt]);
      const again = await styled(srv);
      expect(again.status, JSON.stringify(again.json)).toBe(200);
    } finally {
      await srv.stop();
    }
  }, 120_000);
});
