/**
 * float16 feeds and outputs through a real ONNX Runtime session keep their exact bits on every Node the runtime
 * runs on: Node 20 (onnxruntime-common keeps float16 data as a Uint16Array) and Node >= 24, whose Float16Array
 * onnxruntime-common uses instead and the 1.30 binding reads as 0 bytes (see docs/OPERATIONS.md, "Node version").
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import onnxProto from 'onnx-proto';
import * as ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { fromHalfBits, toHalfBits } from '../src/pipeline/half.js';
import { float16Bits, float16Tensor, OnnxSession } from '../src/pipeline/onnx.js';
import { tempDir } from './helpers/server.js';

const { onnx } = onnxProto;
const scratch = tempDir('dr-float16-');
afterAll(() => scratch.cleanup());

/** y = Identity(x), z = Neg(x), all float16 [n]. */
function halfGraph(): string {
  const file = path.join(scratch.dir, 'half.onnx');
  if (existsSync(file)) return file;
  const t = (name: string) => ({ name, type: { tensorType: { elemType: 10, shape: { dim: [{ dimParam: 'n' }] } } } });
  const model = onnx.ModelProto.create({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 17 }],
    graph: {
      name: 'half',
      node: [
        { opType: 'Identity', input: ['x'], output: ['y'] },
        { opType: 'Neg', input: ['x'], output: ['z'] },
      ],
      input: [t('x')],
      output: [t('y'), t('z')],
    },
  });
  writeFileSync(file, onnx.ModelProto.encode(model).finish());
  return file;
}

/** Every binary16 bit pattern but the NaNs (whose payload Neg need not keep). */
function allHalves(): Uint16Array {
  const out: number[] = [];
  for (let h = 0; h < 0x10000; h++) if ((h & 0x7c00) !== 0x7c00 || (h & 0x3ff) === 0) out.push(h);
  return Uint16Array.from(out);
}

describe(`float16 IO (this Node ${process.version}: Float16Array ${typeof (globalThis as { Float16Array?: unknown }).Float16Array === 'function' ? 'present' : 'absent'})`, () => {
  it('every float16 value goes in and comes out bit-exact, and Neg flips only the sign bit', async () => {
    const session = await ort.InferenceSession.create(halfGraph());
    const bits = allHalves();
    const r = await session.run({ x: float16Tensor(ort, bits, [bits.length]) });
    const y = float16Bits(r.y!);
    const z = float16Bits(r.z!);
    expect(Buffer.from(y.buffer, y.byteOffset, y.byteLength).equals(Buffer.from(bits.buffer))).toBe(true);
    expect(Array.from(z).every((h, i) => h === (bits[i]! ^ 0x8000))).toBe(true);
    await session.release();
  });

  it('OnnxSession feeds float32 values to a float16 graph and widens its outputs to float32', async () => {
    const s = new OnnxSession('half', await ort.InferenceSession.create(halfGraph()));
    const values = Float32Array.from([0, -0, 1, -2.5, 0.1, 65504, -65520, 1e-7, 5.96e-8, 3.14159, Infinity]);
    const out = await s.run({ x: { data: values, dims: [values.length] } });
    const expected = Float32Array.from(values, (v) => fromHalfBits(toHalfBits(v)));
    expect(Array.from(out.y!.data)).toEqual(Array.from(expected));
    expect(Array.from(out.z!.data)).toEqual(Array.from(expected, (v) => -v));
    await s.release();
  });

  // The Float16Array branch of onnxruntime-common in a child: Node >= 24 has the real type; on Node 20 a typed
  // array that the binding does not take as float16 data stands in for it, so CI on Node 20 covers that branch too.
  it('works where onnxruntime-common keeps float16 data in a Float16Array', async () => {
    const onnxJs = path.resolve('dist/src/pipeline/onnx.js');
    if (!existsSync(onnxJs)) spawnSync(process.execPath, [path.resolve('node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'], { stdio: 'ignore' });
    const script = `
      const real = typeof globalThis.Float16Array === 'function';
      if (!real) globalThis.Float16Array = class Float16Array extends Int16Array {};
      const ort = await import('onnxruntime-node');
      const { float16Bits, float16Tensor } = await import(${JSON.stringify(onnxJs)});
      const branch = new ort.Tensor('float16', new Uint16Array(1), [1]).data.constructor.name;
      const bits = Uint16Array.from([0x0000, 0x8000, 0x3c00, 0xc100, 0x7bff, 0xfbff, 0x0001, 0x7c00, 0xfc00, 0x3555]);
      const s = await ort.InferenceSession.create(process.argv[1]);
      const r = await s.run({ x: float16Tensor(ort, bits, [bits.length]) });
      console.log(JSON.stringify({ real, branch, y: Array.from(float16Bits(r.y)), z: Array.from(float16Bits(r.z)), bits: Array.from(bits) }));
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script, halfGraph()], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(stderr).toBe('');
    expect(code).toBe(0);
    const r = JSON.parse(stdout) as { real: boolean; branch: string; y: number[]; z: number[]; bits: number[] };
    expect(r.real).toBe(typeof (globalThis as { Float16Array?: unknown }).Float16Array === 'function');
    expect(r.branch).toBe('Float16Array');
    expect(r.y).toEqual(r.bits);
    expect(r.z).toEqual(r.bits.map((h) => h ^ 0x8000));
  });
});
