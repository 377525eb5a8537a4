/**
 * The provider probe: its embedded bytes are the model src/demo/graph.ts builds, ORT runs it, and the session
 * factory makes its provider decision with it before any component exists.
 */
import * as ort from 'onnxruntime-node';
import { describe, expect, it } from 'vitest';
import { GraphBuilder } from '../src/demo/graph.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { probeModel } from '../src/pipeline/probe.js';
import { checkCuda } from '../src/pipeline/cuda.js';
import { fixtureModel } from './fixtures/index.js';

describe('provider probe', () => {
  it('is the one-MatMul graph the demo builder makes, and computes x·I', async () => {
    const g = new GraphBuilder('provider_probe', 1);
    const x = g.input('x', 'float', [1, 4]);
    const w = g.floats('w', [4, 4], Array.from({ length: 16 }, (_, i) => (i % 5 === 0 ? 1 : 0)));
    g.output('y', g.op('MatMul', [x, w]), [1, 4]);
    expect(Buffer.from(probeModel()).equals(Buffer.from(g.serialize().model))).toBe(true);
    const s = await ort.InferenceSession.create(probeModel(), { executionProviders: ['cpu'] });
    const r = await s.run({ x: new ort.Tensor('float32', Float32Array.from([1, 2, 3, 4]), [1, 4]) });
    expect(Array.from(r.y!.data as Float32Array)).toEqual([1, 2, 3, 4]);
    await s.release();
  });

  it('decides the provider before the first session: auto falls back once, cuda keeps the reason for the first session', async () => {
    const dir = await fixtureModel({ family: 'sd15' });
    const logs: string[] = [];
    const auto = new SessionFactory({ ep: 'auto', intraOpThreads: 1, log: (_l, msg) => logs.push(msg) });
    await auto.prestart();
    // The probe made the decision (either way), so no component pays for a CUDA attempt.
    expect(logs).toHaveLength(1);
    const cudaHere = logs[0] === 'execution provider cuda started';
    if (!cudaHere) {
      // Without the provider library (a CPU-only install) the decision is made from the files, without asking ORT.
      expect(logs[0]).toBe(checkCuda().ok ? 'execution provider cuda unavailable, falling back to cpu' : 'execution provider cpu: CUDA is not available');
      expect(auto.fallbackReason).toBeDefined();
    }
    const made = await auto.create('vae_decoder', `${dir}/vae_decoder/model.onnx`);
    expect(made.provider).toBe(cudaHere ? 'cuda' : 'cpu');
    expect(logs).toHaveLength(1);
    await made.session.session.release();

    if (!cudaHere) {
      const strict = new SessionFactory({ ep: 'cuda', intraOpThreads: 1 });
      await expect(strict.prestart()).resolves.toBeUndefined();
      await expect(strict.create('vae_decoder', `${dir}/vae_decoder/model.onnx`)).rejects.toThrow(/EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start: .+/);
    }

    const cpu = new SessionFactory({ ep: 'cpu', intraOpThreads: 1, log: (_l, msg) => logs.push(msg) });
    await cpu.prestart();
    expect(logs).toHaveLength(1);
  });

  it('as the worker calls it (not awaited, a session asked for at once), the decision is still made once', async () => {
    const dir = await fixtureModel({ family: 'sd15' });
    const logs: string[] = [];
    const f = new SessionFactory({ ep: 'auto', intraOpThreads: 1, log: (_l, msg) => logs.push(msg) });
    const early = f.prestart();
    const [a, b] = await Promise.all([f.create('text_encoder', `${dir}/text_encoder/model.onnx`), f.create('vae_decoder', `${dir}/vae_decoder/model.onnx`)]);
    await early;
    expect(logs.filter((m) => m.startsWith('execution provider'))).toHaveLength(1);
    expect(a.provider).toBe(b.provider);
    await a.session.session.release();
    await b.session.session.release();
  });
});
