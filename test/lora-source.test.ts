/**
 * Where adapters come from: the model's loras/ folder first, then LORA_URI — a local folder, or an S3 prefix fetched
 * through the model cache (a real S3 server on loopback, s3rver).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { httpStatus } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { AdapterSource, adapterWritesAtOnce, threadPoolSize } from '../src/runtime/adapters.js';
import { removeEntry } from '../src/storage/entries.js';
import { CREDS, destroyS3, rejection, startFaultProxy, startS3, testConfig, type S3Server } from './helpers/s3.js';
import { tempDir } from './helpers/server.js';
import { pathToFileURL } from 'node:url';

describe('adapter source', () => {
  let s3: S3Server;
  const tmp = tempDir('lora-source-');
  const model = path.join(tmp.dir, 'model');
  const local = path.join(tmp.dir, 'local-loras');
  const bytes = Buffer.from('not parsed here: the worker thread reads the file');

  beforeAll(async () => {
    // The S3 clients take credentials from the environment, as in a pod.
    Object.assign(process.env, CREDS);
    s3 = await startS3(['loras']);
    await s3.put('loras', 'adapters/from-s3/pytorch_lora_weights.safetensors', bytes);
    await s3.put('loras', 'adapters/two-files/a.safetensors', bytes);
    await s3.put('loras', 'adapters/two-files/b.safetensors', bytes);
    mkdirSync(path.join(model, 'loras'), { recursive: true });
    writeFileSync(path.join(model, 'loras', 'in-model.safetensors'), bytes);
    mkdirSync(local, { recursive: true });
    writeFileSync(path.join(local, 'local-one.safetensors'), bytes);
  });
  afterAll(async () => {
    await destroyS3(s3);
    tmp.cleanup();
  });

  it('fetches an adapter folder from an S3 LORA_URI into the cache, once', async () => {
    const cache = path.join(tmp.dir, 'cache');
    const src = new AdapterSource(testConfig(s3.endpoint, cache, { LORA_URI: 's3://loras/adapters' }), createLogger('silent'));
    src.setModelDir(model);
    const [ref] = await src.resolve([{ name: 'from-s3', scale: 0.5 }]);
    expect(ref!.name).toBe('from-s3');
    expect(ref!.scale).toBe(0.5);
    expect(ref!.file.startsWith(path.resolve(cache) + path.sep)).toBe(true);
    expect(readFileSync(ref!.file)).toEqual(bytes);
    // A committed cache entry, as for models.
    expect(existsSync(path.join(path.dirname(ref!.file), '.complete.json'))).toBe(true);
    // The model's own adapters come first and need no S3.
    const [own] = await src.resolve([{ name: 'in-model', scale: 1 }]);
    expect(own!.file).toBe(path.join(model, 'loras', 'in-model.safetensors'));
    // Resolved once per process: S3 gone, the name still resolves.
    await s3.stop();
    try {
      expect((await src.resolve([{ name: 'from-s3', scale: 1 }]))[0]!.file).toBe(ref!.file);
    } finally {
      await s3.restart();
    }
    // Its entry evicted to make room (adapter entries are not leased): the next request fetches it again.
    expect(await removeEntry(cache, path.basename(path.dirname(ref!.file)))).toMatchObject({ removed: true });
    const [again] = await src.resolve([{ name: 'from-s3', scale: 1 }]);
    expect(readFileSync(again!.file)).toEqual(bytes);
  });

  it('answers 400 naming every unknown adapter, and refuses a folder with several files', async () => {
    const src = new AdapterSource(testConfig(s3.endpoint, path.join(tmp.dir, 'cache2'), { LORA_URI: 's3://loras/adapters/' }), createLogger('silent'));
    src.setModelDir(model);
    await expect(src.resolve([{ name: 'nope', scale: 1 }, { name: 'in-model', scale: 1 }, { name: 'gone', scale: 1 }])).rejects.toThrow(
      /^unknown LoRA adapters "nope", "gone": not found in the model's loras\/ folder or LORA_URI; the model has in-model$/,
    );
    await expect(src.resolve([{ name: 'two-files', scale: 1 }])).rejects.toThrow(/adapter "two-files" is a folder with 2 .safetensors files; keep one per adapter/);
  });

  it("answers 502 naming what S3 said when LORA_URI's bucket is missing or S3 fails otherwise, not that the adapter is unknown", async () => {
    const noBucket = new AdapterSource(testConfig(s3.endpoint, path.join(tmp.dir, 'cache6'), { LORA_URI: 's3://no-such-bucket/adapters' }), createLogger('silent'));
    noBucket.setModelDir(model);
    const missing = await rejection(noBucket.resolve([{ name: 'from-s3', scale: 1 }]));
    expect([missing.code, missing.message]).toEqual(['UPSTREAM', 'adapter "from-s3" could not be fetched from LORA_URI: cannot list: bucket "no-such-bucket" does not exist (NoSuchBucket)']);
    const proxy = await startFaultProxy(s3.port, { failLists: { count: 1, status: 400, code: 'InvalidArgument' } });
    try {
      const src = new AdapterSource(testConfig(proxy.endpoint, path.join(tmp.dir, 'cache7'), { LORA_URI: 's3://loras/adapters' }), createLogger('silent'));
      src.setModelDir(model);
      const failed = await rejection(src.resolve([{ name: 'from-s3', scale: 1 }]));
      expect([failed.code, failed.message]).toEqual(['UPSTREAM', 'adapter "from-s3" could not be fetched from LORA_URI: cannot list s3://loras/adapters/from-s3/: InvalidArgument']);
      // A failed lookup is forgotten: once S3 answers, the adapter is there.
      expect(readFileSync((await src.resolve([{ name: 'from-s3', scale: 1 }]))[0]!.file)).toEqual(bytes);
    } finally {
      await proxy.close();
    }
  });

  it('an adapter stored with a customer-provided key (SSE-C): STORAGE_SSE_C naming the adapter, the object and what to do, not a 502 to retry', async () => {
    const proxy = await startFaultProxy(s3.port, { customerKey: /^adapters\/from-s3\// });
    try {
      const src = new AdapterSource(testConfig(proxy.endpoint, path.join(tmp.dir, 'cache8'), { LORA_URI: 's3://loras/adapters' }), createLogger('silent'));
      src.setModelDir(model);
      const err = await rejection(src.resolve([{ name: 'from-s3', scale: 1 }]));
      const uri = 's3://loras/adapters/from-s3/pytorch_lora_weights.safetensors';
      // Before: UPSTREAM (502) "… could not be fetched from LORA_URI: cannot read …: InvalidRequest".
      expect([err.code, httpStatus(err.code), err.message]).toEqual(['STORAGE_SSE_C', 400, `adapter "from-s3" on LORA_URI cannot be read: cannot read ${uri}: the object is `
        + 'encrypted with a customer-provided key (SSE-C; S3 answered InvalidRequest); this runtime does not read SSE-C objects (it is given no customer key); '
        + `store it with SSE-S3 or SSE-KMS instead, e.g. aws s3 cp ${uri} ${uri} --sse-c-copy-source AES256 --sse-c-copy-source-key fileb://<key file> --sse aws:kms`]);
    } finally {
      await proxy.close();
    }
  });

  it('reads a local LORA_URI folder', async () => {
    const src = new AdapterSource(testConfig(s3.endpoint, path.join(tmp.dir, 'cache3'), { LORA_URI: local }), createLogger('silent'));
    src.setModelDir(model);
    expect((await src.resolve([{ name: 'local-one', scale: 1 }]))[0]!.file).toBe(path.join(local, 'local-one.safetensors'));
    await expect(src.resolve([{ name: 'nope', scale: 1 }])).rejects.toThrow(/unknown LoRA adapter "nope"/);
    // As a file:// URL, read as STORAGE_URI is (percent-decoded): a folder with a space in its name.
    const spaced = path.join(tmp.dir, 'lora dir');
    mkdirSync(spaced, { recursive: true });
    writeFileSync(path.join(spaced, 'local-two.safetensors'), bytes);
    const byUrl = new AdapterSource(testConfig(s3.endpoint, path.join(tmp.dir, 'cache4'), { LORA_URI: pathToFileURL(spaced).href }), createLogger('silent'));
    byUrl.setModelDir(model);
    expect((await byUrl.resolve([{ name: 'local-two', scale: 1 }]))[0]!.file).toBe(path.join(spaced, 'local-two.safetensors'));
  });

  it('one request that leaves while an S3 adapter downloads fails only itself: another waiting for it gets it', async () => {
    await s3.put('loras', 'adapters/shared/pytorch_lora_weights.safetensors', bytes);
    let release!: () => void;
    const proxy = await startFaultProxy(s3.port, { hold: { keys: /adapters\/shared\//, release: new Promise<void>((r) => (release = r)) } });
    try {
      const src = new AdapterSource(testConfig(proxy.endpoint, path.join(tmp.dir, 'cache5'), { LORA_URI: 's3://loras/adapters' }), createLogger('silent'));
      src.setModelDir(model);
      const leaves = new AbortController();
      const a = src.resolve([{ name: 'shared', scale: 1 }], leaves.signal);
      const b = src.resolve([{ name: 'shared', scale: 0.5 }], new AbortController().signal);
      await until(() => proxy.stats.held > 0);
      leaves.abort();
      release();
      const [left, stayed] = await Promise.allSettled([a, b]);
      expect(stayed.status === 'fulfilled' && readFileSync(stayed.value[0]!.file)).toEqual(bytes);
      // The request that left is told so (not that S3 failed it), as soon as it leaves.
      expect(left.status === 'rejected' && [left.reason.code, left.reason.message]).toEqual(['CANCELLED', 'the client left']);

      // When every request waiting for a download has left, it stops: the next request for the name fetches it afresh.
      await s3.put('loras', 'adapters/alone/pytorch_lora_weights.safetensors', bytes);
      let again!: () => void;
      proxy.faults.hold = { keys: /adapters\/alone\//, release: new Promise<void>((r) => (again = r)) };
      const held = proxy.stats.held;
      const only = new AbortController();
      const first = src.resolve([{ name: 'alone', scale: 1 }], only.signal);
      await until(() => proxy.stats.held > held);
      only.abort();
      expect((await rejection(first)).code).toBe('CANCELLED');
      const next = src.resolve([{ name: 'alone', scale: 1 }], new AbortController().signal);
      await until(() => proxy.stats.held > held + 1);
      again();
      expect(readFileSync((await next)[0]!.file)).toEqual(bytes);
    } finally {
      release();
      await proxy.close();
    }
  });

  it('a request that leaves while its adapter\'s lookup still looks at the cache, before the fetch from S3 begins: no fetch goes on for nobody', async () => {
    await s3.put('loras', 'adapters/early/pytorch_lora_weights.safetensors', bytes);
    const proxy = await startFaultProxy(s3.port);
    try {
      const src = new AdapterSource(testConfig(proxy.endpoint, path.join(tmp.dir, 'cache9'), { LORA_URI: 's3://loras/adapters' }), createLogger('silent'));
      src.setModelDir(model);
      const leaves = new AbortController();
      const first = src.resolve([{ name: 'early', scale: 1 }], leaves.signal);
      // Gone in the same turn: the lookup is still looking at the model's loras/ and the cache's folder.
      leaves.abort();
      expect((await rejection(first)).code).toBe('CANCELLED');
      // close() waits for every lookup still running. Before, the stop came before the fetch listened for it: the
      // adapter was listed and downloaded for nobody (and close() waited for that).
      await src.close();
      expect({ lists: proxy.stats.lists, gets: proxy.stats.gets }).toEqual({ lists: 0, gets: 0 });
    } finally {
      await proxy.close();
    }
  });
});

async function until(ok: () => boolean): Promise<void> {
  for (const t0 = Date.now(); !ok(); await new Promise((r) => setTimeout(r, 20))) {
    if (Date.now() - t0 > 10_000) throw new Error('timed out waiting');
  }
}

describe('the bound on LORA_URI fetches\' writes', () => {
  it('is the pool less the threads kept for the rest: 8 of the image\'s 16, 1 of the default 4; the pool read as libuv reads it', () => {
    expect([16, 4, 9, 8, 1, 32].map((n) => adapterWritesAtOnce(n))).toEqual([8, 1, 1, 1, 1, 24]);
    expect([undefined, '16', '0', '', 'x', '2048'].map((v) => threadPoolSize(v === undefined ? {} : { UV_THREADPOOL_SIZE: v }))).toEqual([4, 16, 1, 1, 1, 1024]);
  });

  // libuv starts every thread of its pool at its first use, and reads the variable with atoi() into an unsigned int: a
  // negative value wraps, then is clamped to 1024. The threads a Node started with each value shows, counted here.
  it.skipIf(process.platform !== 'linux')('reads UV_THREADPOOL_SIZE as the pool of a Node started with it is', () => {
    const threads = (v: string) => Number(execFileSync(process.execPath, ['-e',
      "require('fs').stat('.', () => console.log(require('fs').readdirSync('/proc/self/task').length))"], { encoding: 'utf8', env: { ...process.env, UV_THREADPOOL_SIZE: v } }));
    const others = threads('1') - 1;
    for (const v of ['-1', '3', ' 5', 'x', '0', '2000']) expect(threadPoolSize({ UV_THREADPOOL_SIZE: v }), v).toBe(threads(v) - others);
  });
});
