/**
 * CUDA_PROVIDER_OPTIONS: the config check, and native/cuda-provider-options.c hooked into the real onnxruntime-node
 * of this machine (CPU only: ONNX Runtime answers the options call by trying to load its CUDA provider library, which
 * is what tells that the hook calls the right entries). Runs in child processes: the module stays in the process.
 */
import { execFile } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { checkCuda } from '../src/pipeline/cuda.js';
import { postJson, startServer, tempDir, until } from './helpers/server.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const DIST = path.join(ROOT, 'dist', 'src', 'pipeline');
const execFileP = promisify(execFile);
const tmp = tempDir('dr-provopt-');
afterAll(() => tmp.cleanup());

/** Runs `body` (an ES module's top level; `po`, `ort` loader and `probeModel` in scope) in a fresh node, env added. */
async function inChild(body: string, env: Record<string, string> = {}): Promise<Record<string, unknown>> {
  const file = path.join(tmp.dir, `child-${Math.random().toString(36).slice(2)}.mjs`);
  const url = (f: string) => JSON.stringify(pathToFileURL(path.join(DIST, f)).href);
  writeFileSync(file, [
    `const po = await import(${url('provider-options.js')});`,
    `const { loadOrt } = await import(${url('onnx.js')});`,
    `const { probeModel } = await import(${url('probe.js')});`,
    `const out = {};`,
    body,
    `console.log(JSON.stringify(out));`,
  ].join('\n'));
  const r = await execFileP(process.execPath, [file], { cwd: ROOT, env: { ...process.env, ...env }, timeout: 60_000 });
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
}

/** A CUDA session attempt (fails here: no GPU), then a CPU session that must run as ever, the probe's y = x·I. */
const ATTEMPT = `
const ort = await loadOrt();
try {
  await ort.InferenceSession.create(probeModel(), { executionProviders: [{ name: 'cuda', deviceId: 1 }, 'cpu'] });
  out.cuda = 'created';
} catch (e) { out.cuda = String(e.message); }
const s = await ort.InferenceSession.create(probeModel(), { executionProviders: ['cpu'] });
const r = await s.run({ x: new ort.Tensor('float32', Float32Array.from([1, 2, 3, 4]), [1, 4]) });
out.cpu = Array.from(Object.values(r)[0].data);
out.stats = po.providerOptionsStats() ?? null;
`;

describe('CUDA_PROVIDER_OPTIONS', () => {
  it('config: key=value pairs separated by commas or semicolons, known options and values only, each named when refused', () => {
    expect(loadConfig({}).cudaProviderOptions).toEqual([]);
    expect(loadConfig({ CUDA_PROVIDER_OPTIONS: ' cudnn_conv_algo_search = HEURISTIC, prefer_nhwc=1;cudnn_conv_use_max_workspace=0\n' }).cudaProviderOptions)
      .toEqual([['cudnn_conv_algo_search', 'HEURISTIC'], ['prefer_nhwc', '1'], ['cudnn_conv_use_max_workspace', '0']]);
    const refused = (v: string) => () => loadConfig({ CUDA_PROVIDER_OPTIONS: v });
    expect(refused('cudnn_conv_algo_search')).toThrow('CUDA_PROVIDER_OPTIONS entries must be key=value (separated by commas), got "cudnn_conv_algo_search"');
    expect(refused('prefer_nhwc=1=1')).toThrow(/entries must be key=value/);
    expect(refused('device_id=1')).toThrow("CUDA_PROVIDER_OPTIONS must not set device_id: each worker's GPU is the runtime's (GPUS, WORKERS)");
    expect(refused('use_tf32=1')).toThrow("CUDA_PROVIDER_OPTIONS must not set use_tf32: TF32 is CUDA_TF32's");
    expect(refused('cudnn_conv_algo_serach=HEURISTIC')).toThrow(/"cudnn_conv_algo_serach" is not an option the runtime passes; one of cudnn_conv_algo_search, /);
    expect(refused('user_compute_stream=12345')).toThrow(/"user_compute_stream" is not an option the runtime passes/);
    // Names every object has are no options either: refused as unknown, not a TypeError.
    for (const k of ['constructor', 'toString', '__proto__', 'hasOwnProperty']) expect(refused(`${k}=1`)).toThrow(`CUDA_PROVIDER_OPTIONS: "${k}" is not an option the runtime passes`);
    expect(refused('cudnn_conv_algo_search=heuristic')).toThrow('CUDA_PROVIDER_OPTIONS: cudnn_conv_algo_search="heuristic" is not a value ONNX Runtime takes ((EXHAUSTIVE|HEURISTIC|DEFAULT))');
    expect(refused('prefer_nhwc=1,prefer_nhwc=0')).toThrow('CUDA_PROVIDER_OPTIONS sets prefer_nhwc twice');
    expect(refused('prefer_nhwc=\u00e9')).toThrow('CUDA_PROVIDER_OPTIONS must be ASCII text');
  });

  it('the native module parses the variable as the config check does (every value the check lets through)', async () => {
    const inputs = [
      'cudnn_conv_algo_search=HEURISTIC',
      ' cudnn_conv_algo_search = HEURISTIC , prefer_nhwc=1 ',
      'prefer_nhwc=1;cudnn_conv_use_max_workspace=0\n',
      '\tgpu_mem_limit=8589934592,,;arena_extend_strategy=kSameAsRequested\r\n',
      ',;sdpa_kernel=2;',
    ];
    const r = await inChild(`
const ort = await loadOrt();
out.pairs = [];
for (const v of ${JSON.stringify(inputs)}) {
  process.env.CUDA_PROVIDER_OPTIONS = v;
  await ort.InferenceSession.create(probeModel(), { executionProviders: [{ name: 'cuda', deviceId: 0 }] }).catch(() => {});
  out.pairs.push(po.providerOptionsStats().pairs);
}`, { CUDA_PROVIDER_OPTIONS: 'prefer_nhwc=1' });
    expect(r.pairs).toEqual(inputs.map((v) => loadConfig({ CUDA_PROVIDER_OPTIONS: v }).cudaProviderOptions.map(([k, x]) => `${k}=${x}`).join(',')));
  });

  it('npm run build made the native module', () => {
    expect(existsSync(path.join(ROOT, 'dist', 'native', 'cuda-provider-options.node')), 'scripts/build-native.sh needs a C compiler (cc)').toBe(true);
  });

  it("hooks the binding's CUDA append: the options reach ONNX Runtime's options call, every other call is untouched", async () => {
    expect(checkCuda().ok).toBe(false); // the CUDA provider library is absent here, so ONNX Runtime's answer names it
    const hooked = await inChild(ATTEMPT, { CUDA_PROVIDER_OPTIONS: 'cudnn_conv_algo_search=HEURISTIC' });
    // UpdateCUDAProviderOptions loads the CUDA provider's libraries first: the failure to load them is its answer here.
    expect(hooked.cuda).toMatch(/^CUDA_PROVIDER_OPTIONS: Failed to load library .*libonnxruntime_providers_shared\.so/);
    expect(hooked.cuda).not.toMatch(/onnxruntime_src|ONNXRuntimeError/); // ONNX Runtime's own message, not its source location
    expect(hooked.stats).toMatchObject({ patched: true, appends: 1, applied: 0, options: '', pairs: 'cudnn_conv_algo_search=HEURISTIC' });
    expect(String((hooked.stats as Record<string, unknown>).lastError).trim()).toBe(String(hooked.cuda).trim());
    expect(hooked.cpu).toEqual([1, 2, 3, 4]);

    // Without the variable the module is not loaded and the binding's own append answers (another message).
    const plain = await inChild(ATTEMPT);
    expect(plain.stats).toBeNull();
    expect(plain.cuda).not.toMatch(/CUDA_PROVIDER_OPTIONS/);
    expect(plain.cuda).toMatch(/Failed to load shared library/);
    expect(plain.cpu).toEqual([1, 2, 3, 4]);
  });

  it('entries the config check would refuse are refused by the module too, before ONNX Runtime sees them', async () => {
    const r = await inChild(ATTEMPT, { CUDA_PROVIDER_OPTIONS: 'cudnn_conv_algo_search' });
    expect(r.cuda).toBe('CUDA_PROVIDER_OPTIONS: each entry must be key=value');
    expect(r.stats).toMatchObject({ patched: true, appends: 1, applied: 0 });
  });

  it('set, with no native module in the build: the import fails with CONFIG naming the variable', async () => {
    const r = await inChild(`
try { po.loadProviderOptions(process.env, ${JSON.stringify(path.join(tmp.dir, 'absent.node'))}); out.loaded = true; }
catch (e) { out.code = e.code; out.message = e.message; }`, { CUDA_PROVIDER_OPTIONS: 'prefer_nhwc=1' });
    expect(r.code).toBe('CONFIG');
    expect(r.message).toMatch(/^CUDA_PROVIDER_OPTIONS is set, but this build has no native\/cuda-provider-options module/);
  });

  it('the server: under cuda on a CPU-only machine the boot fails on the missing provider, not the variable; under auto it serves on the CPU; under cpu it warns the variable does nothing', async () => {
    const cuda = await startServer({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cuda', CUDA_PROVIDER_OPTIONS: 'cudnn_conv_algo_search=HEURISTIC' });
    try {
      const failed = await cuda.waitFor('state', (s) => s.state === 'failed');
      expect(String(failed.reason)).toMatch(/EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start: onnxruntime-node has no CUDA provider library/);
      expect(String(failed.reason)).not.toContain('node_modules'); // the reason reaches clients: no install path
    } finally {
      await cuda.stop();
    }
    const auto = await startServer({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'auto', WARMUP_STEPS: '1', CUDA_PROVIDER_OPTIONS: 'cudnn_conv_algo_search=HEURISTIC' }, { ready: true });
    try {
      const r = await postJson(`${auto.url}/v1/models/model:predict`, { instances: [{ prompt: 'cpu', num_inference_steps: 2, height: 64, width: 64 }] });
      expect(r.status).toBe(200);
    } finally {
      await auto.stop();
    }
    const cpu = await startServer({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cpu', CUDA_PROVIDER_OPTIONS: 'prefer_nhwc=1' });
    try {
      await until(() => cpu.logs.some((l) => l.msg === 'CUDA_PROVIDER_OPTIONS has no effect with EXECUTION_PROVIDER=cpu' && l.level === 'warn'));
    } finally {
      await cpu.stop();
    }
    await expect(startServer({ CUDA_PROVIDER_OPTIONS: 'device_id=0' }, { timeoutMs: 5_000 })).rejects.toThrow(/CUDA_PROVIDER_OPTIONS must not set device_id/);
  });
});
