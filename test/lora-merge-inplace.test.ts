/**
 * A merge whose output folder is the model's own component folder (`lora:merge MODEL_DIR MODEL_DIR ...`, baking an
 * adapter in place) is refused before anything is removed: the writers clear their output folder first.
 */
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseAdapter, resolveAdapters, type LoraComponent } from '../src/pipeline/lora-keys.js';
import { readLoraMap } from '../src/pipeline/lora-map.js';
import { writeMergedComponent, writeMergedCopy } from '../src/pipeline/lora-merge.js';
import { parseSafetensors } from '../src/pipeline/lora-safetensors.js';
import { fixtureModel } from './fixtures/index.js';

describe('a merge into the model\'s own folder', () => {
  it('is refused, and the model\'s files stay as they were (the folder itself, or through a link to it)', async () => {
    const src = await fixtureModel({ externalData: true });
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'lora-inplace-'));
    try {
      const dir = path.join(tmp, 'model');
      cpSync(src, dir, { recursive: true });
      symlinkSync(dir, path.join(tmp, 'alias'));
      const st = parseSafetensors(readFileSync(path.join(dir, 'loras', 'demo-style.safetensors')), 'demo-style');
      const map = readLoraMap(path.join(dir, 'unet'))!;
      const { updates } = resolveAdapters([{ parsed: parseAdapter(st, 'demo-style'), st, scale: 0.9 }], new Map<LoraComponent, typeof map>([['unet', map]]));
      const list = [...updates.values()].filter((u) => u.component === 'unet');
      expect(list.length).toBeGreaterThan(0);
      const unet = path.join(dir, 'unet');
      const before = Object.fromEntries(readdirSync(unet).sort().map((f) => [f, readFileSync(path.join(unet, f))]));
      for (const write of [writeMergedCopy, writeMergedComponent]) {
        for (const out of [unet, `${unet}/`, path.join(tmp, 'alias', 'unet')]) {
          await expect(write(path.join(unet, 'model.onnx'), list, out), `${write.name} ${out}`).rejects.toThrow(/is the model's own folder/);
          expect(readdirSync(unet).sort()).toEqual(Object.keys(before));
          for (const [f, b] of Object.entries(before)) expect(Buffer.compare(readFileSync(path.join(unet, f)), b), f).toBe(0);
        }
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });
});
