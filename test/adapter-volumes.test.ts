/**
 * The adapters' folders on volumes of their own (the model's loras/, a local LORA_URI, MODEL_CACHE_DIR): one that stops
 * answering for real (test/native/stuck-fs: every call on it waits, a stat included) is refused alone. The look-ups
 * run in this process: the hung stat holds one of its pool threads until the mount is released after the test.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isRuntimeError } from '../src/errors.js';
import { createLogger } from '../src/log.js';
import { AdapterSource } from '../src/runtime/adapters.js';
import { testConfig } from './helpers/s3.js';
import { tempDir } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const tmp = tempDir('adapter-volumes-');
const noFuse = stuckFsUnavailable();
stuckFsForTests();
afterAll(() => tmp.cleanup());

/** What a look-up ended as: the files, or its error's code and message. */
const outcome = (p: Promise<Array<{ file: string }>>) => p.then((refs) => ({ files: refs.map((r) => r.file) }), (e: unknown) => (isRuntimeError(e) ? { code: e.code, message: e.message } : { error: String(e) }));

describe.skipIf(noFuse)('adapter look-ups on several volumes', () => {
  it('a local LORA_URI that stops answering: its adapters are answered CACHE_STUCK, the model\'s own adapters and MODEL_CACHE_DIR still served', async () => {
    const model = path.join(tmp.dir, 'model');
    mkdirSync(path.join(model, 'loras'), { recursive: true });
    writeFileSync(path.join(model, 'loras', 'in-model.safetensors'), 'not parsed here');
    const backing = path.join(tmp.dir, 'lora-backing');
    mkdirSync(backing, { recursive: true });
    writeFileSync(path.join(backing, 'on-lora-uri.safetensors'), 'not parsed here');
    const fs = await mountStuckFs(backing, path.join(tmp.dir, 'lora-uri'));
    const cache = path.join(tmp.dir, 'cache');
    mkdirSync(cache);
    const src = new AdapterSource(testConfig('http://127.0.0.1:9', cache, { LORA_URI: fs.dir }), createLogger('silent'));
    src.setModelDir(model);
    await fs.hang();
    // Not in the model's folder: looked for on LORA_URI, whose stat never answers.
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toEqual({
      code: 'CACHE_STUCK', message: expect.stringMatching(new RegExp(`^adapter "on-lora-uri": the LoRA volume \\(LORA_URI\\) is not answering: stat ${fs.dir}/on-lora-uri\\.safetensors still pending after \\d+ s; `)),
    });
    // Before, one gate watched every folder: its slot held by the hung stat, this look-up was refused too, at once.
    expect(await outcome(src.resolve([{ name: 'in-model', scale: 1 }]))).toEqual({ files: [path.join(model, 'loras', 'in-model.safetensors')] });
    // The cache volume answers its watch (an adapter set's build's): nothing is told stuck.
    const stop = new AbortController();
    const told: string[] = [];
    src.watch(stop.signal, (err) => told.push(err.message));
    await new Promise((r) => setTimeout(r, 6_000));
    stop.abort();
    expect(told).toEqual([]);
    // Still hung: still refused, without a second call on it.
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toMatchObject({ code: 'CACHE_STUCK' });
  }, 60_000);
});
