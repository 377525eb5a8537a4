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
import { within } from '../src/files.js';
import { AdapterSource } from '../src/runtime/adapters.js';
import { pendingIo } from '../src/storage/pending-io.js';
import { testConfig } from './helpers/s3.js';
import { tempDir, until } from './helpers/server.js';
import { mountStuckFs, stuckFsForTests, stuckFsUnavailable } from './helpers/stuck-fs.js';

const tmp = tempDir('adapter-volumes-');
const noFuse = stuckFsUnavailable();
stuckFsForTests();
afterAll(() => tmp.cleanup());

/** What a look-up ended as: the files, or its error's code and message. */
const outcome = (p: Promise<Array<{ file: string }>>) => p.then((refs) => ({ files: refs.map((r) => r.file) }), (e: unknown) => (isRuntimeError(e) ? { code: e.code, message: e.message } : { error: String(e) }));
/** What a look-up of `on-lora-uri` answers while LORA_URI's volume (mounted at `dir`) holds its stat. */
const loraUriStuck = (dir: string) => ({
  code: 'CACHE_STUCK', message: expect.stringMatching(new RegExp(`^adapter "on-lora-uri": the LoRA volume \\(LORA_URI\\) is not answering: stat ${dir}/on-lora-uri\\.safetensors still pending after \\d+ s; `)),
});
/** What the cache's watch (an adapter set's build's) is told in `ms`. */
const toldWithin = async (src: AdapterSource, ms: number): Promise<string[]> => {
  const stop = new AbortController();
  const told: string[] = [];
  src.watch(stop.signal, (err) => told.push(err.message));
  await new Promise((r) => setTimeout(r, ms));
  stop.abort();
  return told;
};

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
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toEqual(loraUriStuck(fs.dir));
    // Before, one gate watched every folder: its slot held by the hung stat, this look-up was refused too, at once.
    expect(await outcome(src.resolve([{ name: 'in-model', scale: 1 }]))).toEqual({ files: [path.join(model, 'loras', 'in-model.safetensors')] });
    // The cache volume answers its watch (an adapter set's build's): nothing is told stuck.
    expect(await toldWithin(src, 6_000)).toEqual([]);
    // Still hung: still refused, without a second call on it.
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toMatchObject({ code: 'CACHE_STUCK' });
  }, 60_000);

  it('a LORA_URI folder mounted inside MODEL_CACHE_DIR\'s folder has a gate of its own: stuck, it leaves the cache served', async () => {
    const model = path.join(tmp.dir, 'model-nested');
    mkdirSync(path.join(model, 'loras'), { recursive: true });
    writeFileSync(path.join(model, 'loras', 'in-model.safetensors'), 'not parsed here');
    const cache = path.join(tmp.dir, 'cache-nested');
    const backing = path.join(tmp.dir, 'nested-lora-backing');
    mkdirSync(backing, { recursive: true });
    writeFileSync(path.join(backing, 'on-lora-uri.safetensors'), 'not parsed here');
    // The cache's folder is on this machine's disk; its loras/ is another volume, mounted there.
    const fs = await mountStuckFs(backing, path.join(cache, 'loras'));
    const src = new AdapterSource(testConfig('http://127.0.0.1:9', cache, { LORA_URI: fs.dir }), createLogger('silent'));
    src.setModelDir(model);
    await fs.hang();
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toEqual(loraUriStuck(fs.dir));
    // Before, the file took the gate of the first folder holding it, the cache's: its slot held by the hung stat, the
    // cache's watch (an adapter set's build's) was told the cache does not answer.
    expect(await toldWithin(src, 6_000)).toEqual([]);
    expect(await outcome(src.resolve([{ name: 'in-model', scale: 1 }]))).toEqual({ files: [path.join(model, 'loras', 'in-model.safetensors')] });
  }, 60_000);

  it('MODEL_CACHE_DIR and a LORA_URI folder on one volume share its gate: stuck, it keeps one call, not one a folder', async () => {
    const model = path.join(tmp.dir, 'model-shared');
    mkdirSync(path.join(model, 'loras'), { recursive: true });
    const backing = path.join(tmp.dir, 'shared-backing');
    mkdirSync(path.join(backing, 'cache'), { recursive: true });
    mkdirSync(path.join(backing, 'loras'), { recursive: true });
    writeFileSync(path.join(backing, 'loras', 'on-lora-uri.safetensors'), 'not parsed here');
    // Two folders of one volume.
    const fs = await mountStuckFs(backing, path.join(tmp.dir, 'shared'));
    const src = new AdapterSource(testConfig('http://127.0.0.1:9', path.join(fs.dir, 'cache'), { LORA_URI: path.join(fs.dir, 'loras') }), createLogger('silent'));
    src.setModelDir(model);
    await fs.hang();
    expect(await outcome(src.resolve([{ name: 'on-lora-uri', scale: 1 }]))).toMatchObject({ code: 'CACHE_STUCK' });
    // The cache's watch is told at once, by the gate the hung stat holds, without a call of its own.
    const stop = new AbortController();
    const told: string[] = [];
    src.watch(stop.signal, (err) => told.push(err.message));
    await until(() => told.length > 0, 20_000);
    stop.abort();
    expect(told[0]).toMatch(new RegExp(`^the LoRA volume \\(LORA_URI\\) is not answering: stat ${fs.dir}/loras/on-lora-uri\\.safetensors still pending after \\d+ s; `));
    // Before, each folder had a gate: the watch's stat of the cache's folder was a second call held by the volume.
    expect(pendingIo().filter((p) => within(fs.dir, p.file) !== undefined).map((p) => `${p.op} ${p.file}`)).toEqual([`stat ${fs.dir}/loras/on-lora-uri.safetensors`]);
  }, 60_000);
});
