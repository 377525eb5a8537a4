import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { nativeRandn, randomSeed, TorchGenerator } from '../src/pipeline/random.js';
import { readNpyF32, referenceDir } from '../scripts/reference.js';

interface RandnCase {
  seed: number;
  shape: number[];
  count: number;
  sum: number;
  sum_sq: number;
  sha256_f32le: string;
  values?: number[];
  head?: number[];
  tail?: number[];
}

const casesFile = process.env.TORCH_RANDN_CASES ?? path.join(referenceDir(), 'torch-randn', 'cases.json');
const ref = JSON.parse(readFileSync(casesFile, 'utf8')) as { torch_version: string; cases: RandnCase[] };

const sha256 = (a: Float32Array) => createHash('sha256').update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength)).digest('hex');

// Both paths where the build made the native one (native/torch-randn.c); the JavaScript one always.
describe.each(nativeRandn ? ['native', 'JavaScript'] : ['JavaScript'])(`torch.randn parity (${ref.cases.length} cases, torch ${ref.torch_version}), %s`, (kind) => {
  it('has cases', () => expect(ref.cases.length).toBeGreaterThan(0));

  for (const c of ref.cases) {
    it(`seed ${c.seed} shape [${c.shape.join(',')}]`, () => {
      const got = new TorchGenerator(c.seed, { native: kind === 'native' }).randn(c.count);
      expect(got.length).toBe(c.count);
      if (c.values) {
        expect(got).toEqual(Float32Array.from(c.values));
      } else {
        expect(got.subarray(0, c.head!.length)).toEqual(Float32Array.from(c.head!));
        expect(got.subarray(c.count - c.tail!.length)).toEqual(Float32Array.from(c.tail!));
        let sum = 0;
        let sumSq = 0;
        for (const v of got) {
          sum += v;
          sumSq += v * v;
        }
        expect(sum).toBeCloseTo(c.sum, 6);
        expect(sumSq).toBeCloseTo(c.sum_sq, 6);
      }
      expect(sha256(got)).toBe(c.sha256_f32le);
    });
  }
});


describe('one generator for latents and scheduler noise (e2e reference cases)', () => {
  const e2e = process.env.E2E_CASES_DIR ?? path.join(referenceDir(), 'e2e', 'cases');
  for (const id of ['a_pndm__torch', 'b_euler_a__torch']) {
    it(id, () => {
      const c = JSON.parse(readFileSync(path.join(e2e, id, 'case.json'), 'utf8')) as {
        seed: number;
        scheduler_noise_draws: { shape: number[] }[];
      };
      const g = new TorchGenerator(c.seed);
      const latents = readNpyF32(path.join(e2e, id, 'latents_init.npy'));
      expect(g.randn(latents.length)).toEqual(latents);
      if (c.scheduler_noise_draws.length === 0) return;
      const noise = readNpyF32(path.join(e2e, id, 'step_noise.npy'));
      const per = noise.length / c.scheduler_noise_draws.length;
      for (let k = 0; k < c.scheduler_noise_draws.length; k++) {
        expect(g.randn(per), `draw ${k}`).toEqual(noise.subarray(k * per, (k + 1) * per));
      }
    });
  }
});

describe('the native fill (native/torch-randn.c)', () => {
  it('loads wherever the build made it, with the block this CPU runs best', () => {
    expect(nativeRandn !== undefined).toBe(existsSync(path.resolve(import.meta.dirname, '../dist/native/torch-randn.node')));
    if (nativeRandn) expect(['avx2', 'fma', 'generic']).toContain(nativeRandn.path);
  });

  // Every block this CPU can run (AVX2's 8 lanes, one lane with the FMA instruction, one with libm's fmaf).
  const blocks = nativeRandn ? Object.entries({ avx2: nativeRandn.fillAvx2, fma: nativeRandn.fillFma, generic: nativeRandn.fillGeneric }).filter(([, f]) => f) : [];
  it.runIf(blocks.length > 0).each(blocks)("the %s block gives the JavaScript path's values bit for bit, and leaves the generator where it does", (_, fill) => {
    const sizes = [16, 17, 31, 32, 100, 623, 624, 625, 1248, 3, 16384, 5, 4 * 128 * 128 + 7];
    for (const seed of [0, 1, 42, 2 ** 32 + 5, 2 ** 53 - 1]) {
      const a = new TorchGenerator(seed, { native: fill! });
      const b = new TorchGenerator(seed, { native: false });
      for (const n of sizes) {
        const x = a.randn(n);
        const y = b.randn(n);
        expect(Buffer.from(x.buffer).equals(Buffer.from(y.buffer)), `seed ${seed}, ${n} values`).toBe(true);
      }
    }
  });
});

describe('TorchGenerator stream', () => {
  it('continues the stream across calls (vectorised path: n uniforms, +16 for a ragged tail)', () => {
    const g = new TorchGenerator(7);
    const a = g.randn(32);
    const b = g.randn(48);
    const h = new TorchGenerator(7);
    expect(h.randn(32)).toEqual(a);
    expect(h.randn(48)).toEqual(b);
    expect(b).not.toEqual(new TorchGenerator(7).randn(48));
    // Box-Muller pairs j with j+8 inside blocks of 16; with 32 a block multiple, one call of 80 gives the same values.
    const joint = new TorchGenerator(7).randn(80);
    expect(joint.subarray(0, 32)).toEqual(a);
    expect(joint.subarray(32)).toEqual(b);
  });

  it('keeps the cached Box-Muller value of the scalar path between calls', () => {
    const ref7 = new TorchGenerator(3).randn(7);
    const g = new TorchGenerator(3);
    const parts = [...g.randn(3), ...g.randn(4)];
    expect(Float32Array.from(parts)).toEqual(ref7);
  });

  it('uses the low 32 bits of the seed, like at::mt19937', () => {
    expect(new TorchGenerator(2 ** 32 + 5).randn(20)).toEqual(new TorchGenerator(5).randn(20));
    expect(new TorchGenerator(5n).randn(20)).toEqual(new TorchGenerator(5).randn(20));
    expect(new TorchGenerator(Number.MAX_SAFE_INTEGER).randn(4).length).toBe(4);
  });

  it('rejects seeds that are not non-negative integers', () => {
    for (const bad of [-1, 1.5, Number.NaN, 2 ** 53]) {
      expect(() => new TorchGenerator(bad)).toThrow(expect.objectContaining({ code: 'INVALID_INPUT' }));
    }
  });

  it('randomSeed is an integer in [0, 2^53 - 1]', () => {
    for (let i = 0; i < 100; i++) {
      const s = randomSeed();
      expect(Number.isSafeInteger(s) && s >= 0).toBe(true);
    }
  });

  it('draws a 4x128x128 latent in a few ms (printed, not asserted)', () => {
    const g = new TorchGenerator(1);
    g.randn(16384);
    const t0 = performance.now();
    for (let i = 0; i < 10; i++) g.randn(65536);
    console.log(`randn(65536): ${((performance.now() - t0) / 10).toFixed(2)} ms; randn(16384) ≈ a quarter of that`);
  });
});
