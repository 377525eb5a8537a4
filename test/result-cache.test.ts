/**
 * The result cache's memory against RESULT_CACHE_MB, measured on the heap after a full GC: a file of its own, so no
 * server of another test allocates in this process while it measures.
 */
import { runInNewContext } from 'node:vm';
import { setFlagsFromString } from 'node:v8';
import { describe, expect, it } from 'vitest';
import { createResultCache } from '../src/runtime/result-cache.js';
import type { GenerationRequest } from '../src/runtime/request.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;
/**
 * The heap in use once every unreachable object is collected. Not the ArrayBuffers: their backing stores are freed by
 * a background sweep after the collection, so the evicted images' come back late; the images' bytes are c.bytes.
 */
const used = (): number => {
  gc();
  return process.memoryUsage().heapUsed;
};

const req = (prompt: string, negativePrompt: string): GenerationRequest => ({
  shape: { steps: 1, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0 },
  items: [{ prompt, negativePrompt, seed: 1, numImages: 1 }],
  seedsGiven: true,
  output: { format: 'jpeg', quality: 1, uri: undefined },
  previewEvery: 0,
});

describe('result cache memory', () => {
  it('holds no more than RESULT_CACHE_MB, however long the prompts and small the images', () => {
    const maxBytes = 1024 * 1024;
    const c = createResultCache('m', maxBytes);
    // Prompts at their 10,000-character limit; 306 bytes is a 64x64 JPEG at quality 1 from the demo model.
    const long = 'x'.repeat(9_990);
    const before = used();
    for (let i = 0; i < 20_000; i++) {
      const k = c.keyOf(req(`${long}${i}`, long))!;
      c.put(k, [{ data: new Uint8Array(306).fill(i & 255).buffer, seed: 1, width: 64, height: 64, format: 'jpeg' }]);
    }
    const held = used() - before;
    expect(c.bytes).toBeLessThanOrEqual(maxBytes);
    // Keyed by the fields themselves (20,000 characters an entry), 3,400 entries held 34 MB.
    expect(held, `${(held / 1048576).toFixed(1)} MB held by a 1 MB cache of ${c.entries} entries`).toBeLessThan(maxBytes);
    // What is held still answers: the newest entry, and not one with another prompt.
    expect(c.get(c.keyOf(req(`${long}19999`, long))!)?.[0]!.data.byteLength).toBe(306);
    expect(c.get(c.keyOf(req(`${long}19999`, `${long}!`))!)).toBeUndefined();
  });
});
