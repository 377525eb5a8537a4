/**
 * The provider module is the one place the pipeline learns what a provider means (provider.ts): what ONNX Runtime is
 * asked for, and which providers count as a GPU for priming, auxiliary threads and the optimised-graph cache.
 */
import { describe, expect, it } from 'vitest';
import { auxThreadOf } from '../src/pipeline/aux-placement.js';
import { sessionOptions } from '../src/pipeline/onnx.js';
import { onGpu, ortProviders } from '../src/pipeline/provider.js';

describe('execution providers', () => {
  it('asks ONNX Runtime for the GPU provider on the given device, with the CPU behind it', () => {
    expect(ortProviders('cuda', 1)).toEqual([{ name: 'cuda', deviceId: 1 }, 'cpu']);
    expect(ortProviders('cuda')).toEqual([{ name: 'cuda', deviceId: 0 }, 'cpu']);
    expect(ortProviders('cpu', 1)).toEqual(['cpu']);
    // The session options every session gets carry the same list; only the CPU's skip weight pre-packing.
    expect(sessionOptions('cuda', { intraOpThreads: 0, deviceId: 2 }).executionProviders).toEqual([{ name: 'cuda', deviceId: 2 }, 'cpu']);
    expect(sessionOptions('cuda', { intraOpThreads: 0 }).extra).toBeUndefined();
    expect(sessionOptions('cpu', { intraOpThreads: 0 })).toMatchObject({ executionProviders: ['cpu'], extra: { session: { disable_prepacking: '1' } } });
  });

  it('treats every provider but the CPU as a GPU, and places auxiliary sessions by that alone', () => {
    expect(onGpu('cuda')).toBe(true);
    expect(onGpu('cpu')).toBe(false);
    expect(auxThreadOf('vae_decoder', 'cuda', 'auto')).toBeDefined();
    expect(auxThreadOf('vae_decoder', 'cpu', 'auto')).toBeUndefined();
    expect(auxThreadOf('vae_decoder', 'cpu', 'on')).toBeDefined();
    expect(auxThreadOf('unet', 'cuda', 'on')).toBeUndefined();
  });
});
