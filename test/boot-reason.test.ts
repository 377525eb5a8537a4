/**
 * @module A failed boot names its stable code (docs/OPERATIONS.md: "the boot fails with `NO_SPACE` …", README:
 * "fails the boot at once as `STORAGE_TLS`"): on the model endpoint's 503 and in the `state` event / log line, in the
 * warm-up CLI's `CODE: reason` form.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { READ_ONLY_CACHE } from '../src/storage/fetch.js';
import { fixtureVariant } from './fixtures/index.js';
import { startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { CREDS, destroyS3, startS3 } from './helpers/s3.js';

describe('a failed boot', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'boot-reason-'));
  let h: RuntimeHandle | undefined;
  afterAll(async () => {
    await h?.stop(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('shows its code before the reason, on /v1/models/{name} and in the state event', async () => {
    h = await startRuntime({ STORAGE_URI: path.join(dir, 'no-such-model'), MODEL_CACHE_DIR: path.join(dir, 'cache') }, { ready: false });
    const failed = await h.waitFor('state', (s) => s.state === 'failed');
    expect(String(failed.reason)).toMatch(/^STORAGE_MISSING: .*does not exist/);
    const res = await fetch(`${h.url}/v1/models/model`);
    const body = (await res.json()) as { code: string; state: string; reason: string };
    expect([res.status, body.code, body.state]).toEqual([503, 'MODEL_NOT_READY', 'failed']);
    expect(body.reason).toMatch(/^STORAGE_MISSING: .*does not exist/);
  });

  it('the demo model on a MODEL_CACHE_DIR that cannot be a folder: CACHE_IO, no local path (it was "unexpected error: … mkdir \'/abs/…\'")', async () => {
    await h?.stop(0);
    const file = path.join(dir, 'a-file');
    writeFileSync(file, '');
    h = await startRuntime({ STORAGE_URI: undefined, MODEL_CACHE_DIR: path.join(file, 'cache') }, { ready: false });
    const failed = await h.waitFor('state', (s) => s.state === 'failed');
    expect(failed.reason).toBe('CACHE_IO: cannot create the model cache directory (MODEL_CACHE_DIR): it, or a folder above it, is a file');
    const body = (await (await fetch(`${h.url}/v1/models/model`)).json()) as { reason: string };
    expect(body.reason).toBe('CACHE_IO: cannot create the model cache directory (MODEL_CACHE_DIR): it, or a folder above it, is a file');
  });

  it.skipIf(process.getuid?.() !== 0)('the demo model on a read-only volume: CACHE_IO naming EROFS (it was ENOENT, as if the folder were missing)', async () => {
    await h?.stop(0);
    // A read-only /tmp, where MODEL_CACHE_DIR defaults when /mnt/cache is not writable.
    const ro = path.join(dir, 'ro');
    mkdirSync(ro);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', ro]);
    try {
      h = await startRuntime({ STORAGE_URI: undefined, MODEL_CACHE_DIR: path.join(ro, 'diffusers-runtime-cache') }, { ready: false });
      const failed = await h.waitFor('state', (s) => s.state === 'failed');
      expect(failed.reason).toBe(`CACHE_IO: cannot create the model cache directory (MODEL_CACHE_DIR): EROFS (${READ_ONLY_CACHE})`);
    } finally {
      execFileSync('umount', [ro]);
    }
  });

  it.skipIf(process.getuid?.() !== 0)('the demo model on a MODEL_CACHE_DIR that is itself read-only (the image\'s /mnt/cache with no PVC mounted): EROFS and what to mount (it was "refused mkdir: ENOENT")', async () => {
    await h?.stop(0);
    const ro = path.join(dir, 'ro-root');
    mkdirSync(ro);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'tmpfs', ro]);
    try {
      h = await startRuntime({ STORAGE_URI: undefined, MODEL_CACHE_DIR: ro }, { ready: false });
      const failed = await h.waitFor('state', (s) => s.state === 'failed');
      expect(failed.reason).toBe(`CACHE_IO: the model cache (MODEL_CACHE_DIR) refused mkdir: EROFS (${READ_ONLY_CACHE})`);
    } finally {
      await h?.stop(0);
      execFileSync('umount', [ro]);
    }
  });

  it('a model config that is not JSON is named by its path inside the model, not the model folder\'s name (it was "model_index.json (acme-sd15/model_index.json)")', async () => {
    await h?.stop(0);
    const model = await fixtureVariant(path.join(dir, 'acme-sd15'), { family: 'sd15' }, (d) => writeFileSync(path.join(d, 'model_index.json'), '{"_class_name": '));
    h = await startRuntime({ STORAGE_URI: model, MODEL_CACHE_DIR: path.join(dir, 'cache') }, { ready: false });
    const failed = await h.waitFor('state', (s) => s.state === 'failed');
    expect(String(failed.reason)).toMatch(/^MODEL_FORMAT: model_index\.json is not valid JSON: /);
    const body = (await (await fetch(`${h.url}/v1/models/model`)).json()) as { reason: string };
    expect(body.reason).toBe(failed.reason);
    expect(body.reason).not.toContain('acme-sd15');
  });

  it('weights that are Git LFS pointers (a clone without git-lfs) are named as such, not as "Protobuf parsing failed"', async () => {
    await h?.stop(0);
    const pointer = 'version https://git-lfs.github.com/spec/v1\noid sha256:' + 'ab'.repeat(32) + '\nsize 1719312\n';
    const model = await fixtureVariant(path.join(dir, 'lfs-clone'), { family: 'sd15' }, (d) => writeFileSync(path.join(d, 'unet', 'model.onnx'), pointer));
    h = await startRuntime({ STORAGE_URI: model, MODEL_CACHE_DIR: path.join(dir, 'cache') }, { ready: false });
    const failed = await h.waitFor('state', (s) => s.state === 'failed');
    expect(failed.reason).toBe(
      'MODEL_FORMAT: unet/model.onnx could not be loaded: unet/model.onnx is a Git LFS pointer, not the weights (a repository cloned without git-lfs): ' +
        'fetch them (`git lfs pull`, or download the files) and upload the model again',
    );
  });

  it('a STORAGE_URI with a query string (a presigned URL\'s token) is refused without showing it, on /v1/models/{name} and in the log (it became the prefix: "STORAGE_MISSING: no objects under s3://models/sd?X-Amz-Security-Token=…/")', async () => {
    await h?.stop(0);
    const s3 = await startS3(['models']);
    try {
      const token = 'FwoGZXIvYXdzEXAMPLESESSIONTOKEN';
      h = await startRuntime({ ...CREDS, AWS_ENDPOINT_URL: s3.endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: path.join(dir, 'cache'),
        STORAGE_URI: `s3://models/sd?X-Amz-Security-Token=${token}` }, { ready: false });
      const failed = await h.waitFor('state', (s) => s.state === 'failed');
      const reason = 'INVALID_INPUT: STORAGE_URI "s3://models/sd?***" has a query string (\'?\'); use s3://bucket/prefix and give the keys as '
        + 'AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (the storage Secret)';
      expect(failed.reason).toBe(reason);
      const res = await fetch(`${h.url}/v1/models/model`);
      expect(((await res.json()) as { reason: string }).reason).toBe(reason);
      expect(JSON.stringify(h.logs)).not.toContain(token);
      expect(JSON.stringify(h.logs)).toContain('"storageUri":"s3://models/sd?***"');
    } finally {
      await destroyS3(s3);
    }
  });

  it('a presigned https:// STORAGE_URI (not served) leaves its signature and token out of the listening line', async () => {
    await h?.stop(0);
    const uri = 'https://models.s3.amazonaws.com/sd/model_index.json?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261206'
      + '&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLESESSIONTOKEN&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0';
    h = await startRuntime({ STORAGE_URI: uri, MODEL_CACHE_DIR: path.join(dir, 'cache') }, { ready: false });
    await h.waitFor('state', (s) => s.state === 'failed');
    const logs = JSON.stringify(h.logs);
    for (const secret of ['AKIAEXAMPLE', 'FwoGZXIvYXdzEXAMPLESESSIONTOKEN', '0f1e2d3c4b5a69788796a5b4c3d2e1f0']) expect(logs).not.toContain(secret);
    expect(logs).toContain('"storageUri":"https://models.s3.amazonaws.com/sd/model_index.json?***"');
  });
});
