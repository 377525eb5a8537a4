/**
 * Long S3 keys under LORA_URI. The cache entry of an adapter is named by a hash-suffixed, shortened form of its URI, so
 * a prefix near S3's 1024-byte key limit serves; a file in an adapter's folder whose name the filesystem cannot hold
 * (over 247 bytes, with the cache's `.partial`) is answered 400 naming the key and the limit, not 502 UPSTREAM: nothing
 * failed upstream, and every request for it would fail alike. A real server process, s3rver on loopback behind the
 * fault proxy (s3rver cannot store a name that long itself: the proxy puts it in the listing).
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fixtureModel } from './fixtures/index.js';
import { CREDS, destroyS3, startFaultProxy, startS3, type FaultProxy, type S3Server } from './helpers/s3.js';
import { postJson, startServer, tempDir, type ServerHandle } from './helpers/server.js';

const tmp = tempDir('lora-key-length-');
let s3: S3Server;
let proxy: FaultProxy;
let srv: ServerHandle;
const cache = path.join(tmp.dir, 'cache');
// Four 200-byte folders and a 128-byte adapter name (the longest LORA_NAME takes): a 965-byte key.
const prefix = Array.from({ length: 4 }, (_, i) => `${i}${'p'.repeat(199)}/`).join('');
const longName = `a${'n'.repeat(127)}`;
const longFile = `${'w'.repeat(288)}.safetensors`;

beforeAll(async () => {
  const model = await fixtureModel();
  s3 = await startS3(['loras']);
  proxy = await startFaultProxy(s3.port);
  const adapter = readFileSync(path.join(model, 'loras', 'demo-kohya.safetensors'));
  await s3.put('loras', `${prefix}${longName}/pytorch_lora_weights.safetensors`, adapter);
  await s3.put('loras', `${prefix}long-file/pytorch_lora_weights.safetensors`, adapter);
  // As a store that can hold it lists the adapter: its file name is 300 bytes.
  proxy.faults = { rewriteList: (xml) => xml.replace('long-file/pytorch_lora_weights.safetensors</Key>', `long-file/${longFile}</Key>`) };
  srv = await startServer({
    ...CREDS, AWS_ENDPOINT_URL: proxy.endpoint, S3_USE_HTTPS: '0', STORAGE_URI: model, MODEL_CACHE_DIR: cache,
    EXECUTION_PROVIDER: 'cpu', LORA_URI: `s3://loras/${prefix}`, WARMUP_STEPS: '1',
  }, { ready: true });
}, 120_000);

afterAll(async () => {
  await srv?.stop();
  await proxy?.close();
  if (s3) await destroyS3(s3);
  tmp.cleanup();
});

const styled = (name: string) => postJson(`${srv.url}/v1/models/model:predict`,
  { instances: [{ prompt: 'a fox', num_inference_steps: 1, height: 64, width: 64, seed: 1, loras: [{ name, scale: 0.5 }] }] });

describe('long S3 keys under LORA_URI', () => {
  it('an adapter 965 bytes deep into the bucket is fetched and applied; its cache entry\'s name stays short', async () => {
    const r = await styled(longName);
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    const entries = readdirSync(cache).filter((n) => n.startsWith('s3-loras-') && !n.endsWith('.lock'));
    expect(entries).toHaveLength(1);
    expect(Buffer.byteLength(entries[0]!)).toBeLessThanOrEqual(101);
  }, 60_000);

  it('a file name over the cache\'s limit in an adapter\'s folder: 400 naming the key and the limit, no local path', async () => {
    const r = await styled('long-file');
    expect([r.status, r.json]).toEqual([400, {
      code: 'INVALID_INPUT',
      error: expect.stringMatching(new RegExp('^adapter "long-file" on LORA_URI cannot be cached: object key "0p+.*" cannot be cached: '
        + 'its name "w+.*\\.safetensors" has 300 bytes, and the cache stores names of up to 247 bytes; rename the object$')),
    }]);
    expect(JSON.stringify(r.json)).not.toContain(tmp.dir);
    // Answered alike the next time (the failed lookup is forgotten, the listing read again), and the server serves on.
    expect((await styled('long-file')).status).toBe(400);
    expect((await styled(longName)).status).toBe(200);
  }, 60_000);
});
