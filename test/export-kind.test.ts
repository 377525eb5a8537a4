/**
 * The fused (CUDA) and plain exports: the manifest scripts/export_sd.py writes, the graph inspection for folders
 * without one, the clear boot error for a fused graph on the CPU provider, and the CUDA check that keeps ONNX
 * Runtime from printing load errors on a CPU-only machine.
 */
import { cpSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import { afterAll, describe, expect, it } from 'vitest';
import { isRuntimeError } from '../src/errors.js';
import { checkCuda } from '../src/pipeline/cuda.js';
import { EXPORT_MANIFEST, exportInfo, graphOps, missingCudaOnlyKernel, nodeOpTypes, readExportManifest, slowPathWarning } from '../src/pipeline/export-info.js';
import { SessionFactory } from '../src/pipeline/onnx.js';
import { fixtureModel } from './fixtures/index.js';
import { startRuntime } from './helpers/runtime.js';
import { tempDir } from './helpers/server.js';

const { onnx } = onnxProto;
const scratch = tempDir('dr-export-kind-');
afterAll(() => scratch.cleanup());

/** A one-node graph with onnxruntime's CUDA-only GroupNorm (com.microsoft), as the transformer optimizer writes it. */
function groupNormGraph(file: string): void {
  const t = (name: string, dims: number[]) => ({ name, type: { tensorType: { elemType: 1, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } });
  const ones = new Float32Array(32).fill(1);
  const model = onnx.ModelProto.create({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 17 }, { domain: 'com.microsoft', version: 1 }],
    graph: {
      name: 'g',
      node: [{ opType: 'GroupNorm', domain: 'com.microsoft', input: ['x', 'gamma', 'beta'], output: ['y'], attribute: [
        { name: 'epsilon', type: onnx.AttributeProto.AttributeType.FLOAT, f: 1e-5 },
        { name: 'groups', type: onnx.AttributeProto.AttributeType.INT, i: 32 },
        { name: 'activation', type: onnx.AttributeProto.AttributeType.INT, i: 0 },
      ] }],
      initializer: ['gamma', 'beta'].map((name) => ({ name, dims: [32], dataType: 1, rawData: new Uint8Array(ones.buffer.slice(0)) })),
      input: [t('x', [1, 2, 2, 32])],
      output: [t('y', [1, 2, 2, 32])],
    },
  });
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, onnx.ModelProto.encode(model).finish());
}

const manifest = (variant: string, unetOps: Record<string, number>) =>
  JSON.stringify({ format: 1, variant, target: variant === 'fused' ? 'cuda' : 'any', components: { unet: { dtype: 'float16', cuda_only_ops: unetOps }, text_encoder: { cuda_only_ops: {} } } });

describe('export kind', () => {
  it('reads the manifest, and judges a folder without one from its UNet graph', async () => {
    const demo = await fixtureModel();
    expect(readExportManifest(demo)).toBeUndefined();
    expect(exportInfo(demo)).toEqual({ variant: 'plain', source: 'graph', cudaOnlyOps: {} });

    const fused = path.join(scratch.dir, 'fused');
    cpSync(demo, fused, { recursive: true });
    writeFileSync(path.join(fused, EXPORT_MANIFEST), manifest('fused', { NhwcConv: 97, GroupNorm: 16, MultiHeadAttention: 32 }));
    // MultiHeadAttention also has a CPU kernel: only the CUDA-only operators are listed.
    expect(exportInfo(fused)).toEqual({ variant: 'fused', source: 'manifest', cudaOnlyOps: { unet: ['NhwcConv', 'GroupNorm'], text_encoder: [] } });

    const inspected = path.join(scratch.dir, 'inspected');
    cpSync(demo, inspected, { recursive: true });
    groupNormGraph(path.join(inspected, 'unet', 'model.onnx'));
    expect(graphOps(path.join(inspected, 'unet', 'model.onnx'))).toEqual(new Set(['GroupNorm']));
    expect(exportInfo(inspected)).toEqual({ variant: 'fused', source: 'graph', cudaOnlyOps: { unet: ['GroupNorm'] } });

    writeFileSync(path.join(inspected, EXPORT_MANIFEST), '{"variant": "fused",');
    expect(() => readExportManifest(inspected)).toThrow(/onnx_export\.json is not valid JSON/);
  });

  it("reads a graph's operators as the ONNX protobuf decoder reads them, skipping the weights and a subgraph's nodes", async () => {
    const decoded = (buf: Uint8Array) => new Set((onnx.ModelProto.decode(buf).graph?.node ?? []).map((n) => n.opType ?? ''));
    // Every component of the demo, its weights inline and in model.onnx_data.
    for (const opts of [{ withVaeEncoder: true }, { externalData: true }]) {
      const dir = await fixtureModel(opts);
      for (const c of ['unet', 'text_encoder', 'vae_decoder', 'vae_encoder']) {
        const file = path.join(dir, c, 'model.onnx');
        let buf: Buffer;
        try {
          buf = readFileSync(file);
        } catch {
          continue;
        }
        const ops = nodeOpTypes(buf);
        expect(ops.size, file).toBeGreaterThan(2);
        expect(ops, file).toEqual(decoded(buf));
      }
    }
    // Fields of every wire type around the nodes, a node without op_type, an If whose branches hold nodes of their own
    // (not the graph's), and a graph field written twice (a decoder keeps the last).
    const If = onnx.AttributeProto.AttributeType;
    const sub = (op: string) => ({ name: op, node: [{ opType: op, input: ['a'], output: ['b'] }] });
    const graph = (ops: string[]) => ({
      name: 'g', docString: 'd',
      node: [...ops.map((opType) => ({ opType, domain: 'com.microsoft', name: opType, input: ['x'], output: ['y'], attribute: [{ name: 'f', type: If.FLOAT, f: 0.5 }, { name: 'i', type: If.INT, i: -7 }] })),
        { input: ['x'], output: ['z'] },
        { opType: 'If', input: ['c'], output: ['w'], attribute: [{ name: 'then_branch', type: If.GRAPH, g: sub('ThenOnly') }, { name: 'else_branch', type: If.GRAPH, g: sub('ElseOnly') }] }],
      initializer: [{ name: 'w', dims: [4], dataType: 11, doubleData: [1, 2, 3, 4] }, { name: 'v', dims: [2], dataType: 7, int64Data: [-1, 2 ** 40] }],
    });
    const first = onnx.ModelProto.encode(onnx.ModelProto.create({ irVersion: 8, producerName: 'p', modelVersion: -3, graph: graph(['Stale']) })).finish();
    const second = onnx.ModelProto.encode(onnx.ModelProto.create({ opsetImport: [{ domain: '', version: 17 }], graph: graph(['GroupNorm', 'Conv', 'GroupNorm']) })).finish();
    const both = Buffer.concat([first, second]);
    expect(nodeOpTypes(both)).toEqual(new Set(['GroupNorm', 'Conv', '', 'If']));
    expect(nodeOpTypes(both)).toEqual(decoded(both));
    expect(nodeOpTypes(new Uint8Array(0))).toEqual(new Set());
    // Cut short: no verdict rather than a guess (graphOps gives undefined).
    expect(() => nodeOpTypes(second.subarray(0, second.length - 3))).toThrow(RangeError);
    const cut = path.join(scratch.dir, 'cut.onnx');
    writeFileSync(cut, second.subarray(0, second.length - 3));
    expect(graphOps(cut)).toBeUndefined();
  });

  it("recognises ORT's missing-kernel errors for CUDA-only operators, and only those", () => {
    expect(missingCudaOnlyKernel("Failed to find kernel for com.microsoft.NhwcConv(1) (node:'NhwcConv_0-/m/conv_in/Conv' ep:'CPUExecutionProvider'). Kernel not found")).toBe('NhwcConv');
    expect(missingCudaOnlyKernel('Could not find an implementation for GroupNorm(1) node with name "x"')).toBe('GroupNorm');
    expect(missingCudaOnlyKernel("Failed to find kernel for Conv(11) (node:'c' ep:'CPUExecutionProvider')")).toBeUndefined();
  });

  it('a CUDA-only graph on the CPU provider fails with the way out, not ORT\'s kernel message', async () => {
    const file = path.join(scratch.dir, 'gn', 'unet', 'model.onnx');
    groupNormGraph(file);
    const f = new SessionFactory({ ep: 'cpu', intraOpThreads: 1 });
    const err: unknown = await f.create('unet', file).then(() => undefined, (e: unknown) => e);
    expect(isRuntimeError(err) && err.code).toBe('MODEL_FORMAT');
    expect((err as Error).message).toMatch(/^unet is fused for CUDA \(its graph holds onnxruntime operators fused for CUDA: GroupNorm run only on the CUDA execution provider\).*EXECUTION_PROVIDER=cuda or auto.*scripts\/export-onnx\.sh MODEL OUT --plain/);
  });

  it('a fused export fails the boot on a CPU node with one clear line; the same folder without the manifest boots', async () => {
    const fused = path.join(scratch.dir, 'fused-boot');
    cpSync(await fixtureModel(), fused, { recursive: true });
    writeFileSync(path.join(fused, EXPORT_MANIFEST), manifest('fused', { NhwcConv: 97, GroupNorm: 16 }));
    const s = await startRuntime({ STORAGE_URI: fused, EXECUTION_PROVIDER: 'auto', MODEL_CACHE_DIR: path.join(scratch.dir, 'c1') });
    try {
      const failed = await s.waitFor('state', (st) => st.state === 'failed');
      // Why the CPU, where `auto` looked for CUDA: on a GPU node whose CUDA did not start, that is the thing to fix.
      expect(checkCuda().ok).toBe(false);
      expect(failed.reason).toBe(
        'MODEL_FORMAT: unet is fused for CUDA (onnx_export.json says so: NhwcConv, GroupNorm run only on the CUDA execution provider) but this process runs on the CPU provider ' +
          `(CUDA did not start: ${checkCuda().reason}); serve it on a GPU node (EXECUTION_PROVIDER=cuda or auto), or export the model for CPU with \`scripts/export-onnx.sh MODEL OUT --plain\``,
      );
      expect(s.logs.filter((l) => l.level === 'error')).toHaveLength(1);
      const r = await fetch(`${s.url}/v1/models/model`);
      expect(r.status).toBe(503);
      expect(JSON.stringify(await r.json())).toContain('is fused for CUDA');
    } finally {
      await s.stop();
    }
    writeFileSync(path.join(fused, EXPORT_MANIFEST), manifest('plain', {}));
    const ok = await startRuntime({ STORAGE_URI: fused, EXECUTION_PROVIDER: 'cpu', MODEL_CACHE_DIR: path.join(scratch.dir, 'c2') }, { ready: true });
    await ok.stop();
  });
});

describe('the slow-path line (a UNet on a GPU that is not fused)', () => {
  it('is logged for a plain or unknown export only, and its speed-up is the one README\'s GPU table measured', () => {
    expect(slowPathWarning({ variant: 'fused', source: 'manifest', cudaOnlyOps: {} })).toBeUndefined();
    expect(slowPathWarning({ variant: 'unknown', source: 'none', cudaOnlyOps: {} })?.export).toMatch(/^an export of unknown kind/);
    const plain = slowPathWarning({ variant: 'plain', source: 'graph', cudaOnlyOps: {} });
    expect(plain?.export).toBe('a plain (unfused) export');
    // README: "| runtime, plain fp16 export | 1.55 / 1.46 s |" and the fused row's "**0.54 / 0.61 s**" (50 steps, two runs).
    const readme = readFileSync(path.join(import.meta.dirname, '..', 'README.md'), 'utf8');
    const times = (row: RegExp) => row.exec(readme)!.slice(1, 3).map(Number);
    const slow = times(/^\| runtime, plain fp16 export \| ([\d.]+) \/ ([\d.]+) s \|/m);
    const fast = times(/^\| \*\*runtime, fused fp16 export \(default\)\*\* \| \*\*([\d.]+) \/ ([\d.]+) s\*\* \|/m);
    const ratios = slow.map((t, i) => t / fast[i]!).sort((a, b) => a - b);
    expect(plain?.hint).toContain(`${ratios[0]!.toFixed(1)}-${ratios[1]!.toFixed(1)}x faster per image on an H200`);
  });
});

describe('CUDA check', () => {
  const dir = '/opt/ort/bin';
  const lib = (f: string) => path.join(dir, f);
  const has = (...files: string[]) => (p: string) => files.includes(p);

  it('needs the provider libraries beside onnxruntime and a driver on the loader path', () => {
    const both = [lib('libonnxruntime_providers_cuda.so'), lib('libonnxruntime_providers_shared.so')];
    expect(checkCuda({ providerDir: dir, exists: has(), ldCache: () => '', env: {}, platform: 'linux/x64' })).toEqual({
      ok: false,
      providerDir: dir,
      missing: 'provider',
      reason: 'onnxruntime-node has no CUDA provider library (libonnxruntime_providers_cuda.so, libonnxruntime_providers_shared.so): a CPU-only install; install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 (the image does)',
    });
    // Where onnxruntime-node has no CUDA provider to install, the reason does not send anyone to install it.
    expect(checkCuda({ providerDir: dir, exists: has(), ldCache: () => '', env: {}, platform: 'linux/arm64' }).reason).toMatch(/: a CPU-only install; onnxruntime-node has a CUDA provider for linux\/x64 only, not linux\/arm64$/);
    expect(checkCuda({ providerDir: dir, exists: has(...both), ldCache: () => '', env: {} })).toMatchObject({ ok: false, missing: 'driver', reason: expect.stringMatching(/^no NVIDIA driver/) });
    expect(checkCuda({ providerDir: dir, exists: has(...both, '/drv/libcuda.so.1'), ldCache: () => '', env: { LD_LIBRARY_PATH: '/x:/drv' } }).ok).toBe(true);
    expect(checkCuda({ providerDir: dir, exists: has(...both, '/usr/local/nvidia/lib64/libcuda.so.1'), ldCache: () => '', env: {} }).ok).toBe(true);
    expect(checkCuda({ providerDir: dir, exists: has(...both), ldCache: () => '\0libcuda.so.1\0/usr/lib/x/libcuda.so.1', env: {} }).ok).toBe(true);
  });
});
