/**
 * The provider module is the one place the pipeline learns what a provider means (provider.ts): what ONNX Runtime is
 * asked for, and which providers count as a GPU for priming, auxiliary threads and the optimised-graph cache.
 */
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { auxThreadOf } from '../src/pipeline/aux-placement.js';
import { cudaStartFailure, ortBinaryDir, providerLoadError } from '../src/pipeline/cuda.js';
import { sessionOptions } from '../src/pipeline/onnx.js';
import { fusedIsFast, onGpu, ortProviders } from '../src/pipeline/provider.js';
import { ROOT, startServer, tempDir } from './helpers/server.js';

/**
 * ONNX Runtime's errors when the CUDA provider does not start. CudaCall (onnxruntime/core/providers/cuda/cuda_call.cc)
 * throws "<lib> failure <code>: <text> ; GPU=… ; hostname=… ; file=… ; line=… ; expr=…" behind two source locations and
 * C++ signatures (ORT_WHERE); the driver one is ORT's text as onnxruntime/mobius issue #316 quotes it (2026-05), the
 * others the same with cudaGetErrorString's text for their code. The last two are what onnxruntime-node 1.30.0 throws
 * on this machine (no provider library), without and with CUDA_PROVIDER_OPTIONS' module.
 */
const WHERE = (line: number) =>
  `/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:${line} std::conditional_t<THRW, void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, SUCCTYPE, const char*, const char*, int) [with ERRTYPE = cudaError; bool THRW = true; SUCCTYPE = cudaError; std::conditional_t<THRW, void, common::Status> = void] `;
const cudaCall = (code: number, text: string, expr = 'cudaSetDevice(info_.device_id)') =>
  `${WHERE(122)}${WHERE(114)}CUDA failure ${code}: ${text} ; GPU=-1 ; hostname=c4327188c000000 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc ; line=336 ; expr=${expr}; \n`;
const PROVIDER_DIR = '/srv/app/node_modules/onnxruntime-node/bin/napi-v6/linux/x64';

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

  it('says which provider the fused export is made for (the slow-path hint), apart from which ones run on a GPU', () => {
    expect(fusedIsFast('cuda')).toBe(true);
    expect(fusedIsFast('cpu')).toBe(false);
  });
});

describe('why the CUDA provider did not start, as a boot reason', () => {
  it('keeps the CUDA runtime\'s own words, not ORT\'s source locations (which alone filled the 300 characters kept before), and says what to do', () => {
    expect(cudaStartFailure(cudaCall(35, 'CUDA driver version is insufficient for CUDA runtime version'), 0, PROVIDER_DIR)).toEqual({
      reason: 'CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version; the node\'s NVIDIA driver is older than the CUDA the provider was built for (the image\'s: CUDA 12): update the driver (docs/OPERATIONS.md, "CUDA not found")',
      config: false,
    });
    expect(cudaStartFailure(cudaCall(100, 'no CUDA-capable device is detected'), 0, PROVIDER_DIR)).toEqual({
      reason: 'CUDA failure 100: no CUDA-capable device is detected; no GPU is visible in this container: request nvidia.com/gpu for the pod, and check CUDA_VISIBLE_DEVICES',
      config: false,
    });
    const taken = "the GPU's memory is taken (another process, or more WORKERS on one GPU than fit): free it or give the pod a GPU of its own";
    expect(cudaStartFailure(cudaCall(2, 'out of memory', 'cudaStreamCreate(&stream_)'), 0, PROVIDER_DIR).reason).toBe(`CUDA failure 2: out of memory; ${taken}`);
    // cuBLAS' handle, made on the probe's first run (CudaCall's format for cuBLAS statuses).
    const cublas = cudaCall(3, 'CUBLAS_STATUS_ALLOC_FAILED', 'cublasCreate(&cublas_handle_)').replace('CUDA failure', 'CUBLAS failure');
    expect(cudaStartFailure(cublas, 0, PROVIDER_DIR).reason).toBe(`CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED; ${taken}`);
    // A failure with no known remedy: ORT's text alone, still without the source locations and the host name.
    expect(cudaStartFailure(cudaCall(999, 'unknown error'), 0, PROVIDER_DIR)).toEqual({ reason: 'CUDA failure 999: unknown error', config: false });
  });

  it('a message of another shape: its first line that says something, never an empty reason', () => {
    expect(cudaStartFailure(`\n${cudaCall(100, 'no CUDA-capable device is detected')}`, 0, PROVIDER_DIR).reason).toMatch(/^CUDA failure 100: no CUDA-capable device is detected; no GPU/);
    expect(cudaStartFailure('', 0, PROVIDER_DIR)).toEqual({ reason: 'ONNX Runtime gave no reason', config: false });
    expect(cudaStartFailure(' \n\n', 0, PROVIDER_DIR)).toEqual({ reason: 'ONNX Runtime gave no reason', config: false });
  });

  it('a GPU that is not there is a setting to fix (GPUS), not a reason to serve that worker on the CPU', () => {
    expect(cudaStartFailure(cudaCall(101, 'invalid device ordinal'), 1, PROVIDER_DIR)).toEqual({
      reason: "CUDA failure 101: invalid device ordinal; GPU 1 does not exist in this container: GPUS (or WORKERS) asks for more GPUs than CUDA_VISIBLE_DEVICES or the pod's nvidia.com/gpu give; set GPUS to the GPUs the pod has",
      config: true,
    });
  });

  it('a provider library that does not load: the library the loader missed, and the loader path to check; never the install folder', () => {
    const hint = '; the CUDA provider needs the CUDA and cuDNN 9 libraries it was built for on the loader path (LD_LIBRARY_PATH), see README "GPU"';
    const bare = 'OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library';
    expect(cudaStartFailure(bare, 0, PROVIDER_DIR, () => `${PROVIDER_DIR}/libonnxruntime_providers_cuda.so: cannot open shared object file`).reason)
      .toBe(`${bare}: libonnxruntime_providers_cuda.so: cannot open shared object file${hint}`);
    expect(cudaStartFailure(bare, 0, PROVIDER_DIR, () => undefined).reason).toBe(`${bare} (ONNX Runtime printed the missing library on stderr)${hint}`);
    // CUDA_PROVIDER_OPTIONS' module has the loader's words already: no second look.
    const hooked = `CUDA_PROVIDER_OPTIONS: Failed to load library ${PROVIDER_DIR}/libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: No such file or directory\n`;
    expect(cudaStartFailure(hooked, 0, PROVIDER_DIR, () => 'not asked').reason)
      .toBe(`CUDA_PROVIDER_OPTIONS: Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: No such file or directory${hint}`);
  });

  it('finds the library that keeps the provider from loading by loading it as ORT does (real libraries, built here)', () => {
    // A provider folder as the image has it, with a cuDNN stand-in the CUDA provider library needs (found via its RUNPATH).
    const dir = libs.dir;
    const cc = (out: string, args: string[]) => execFileSync('cc', ['-shared', '-fPIC', '-o', path.join(dir, out), ...args], { cwd: dir });
    writeFileSync(path.join(dir, 'empty.c'), 'int provider_stub(void) { return 0; }\n');
    cc('libstubcudnn.so.9', ['-Wl,-soname,libstubcudnn.so.9', 'empty.c']);
    cc('libonnxruntime_providers_shared.so', ['empty.c']);
    cc('libonnxruntime_providers_cuda.so', ['empty.c', '-Wl,--no-as-needed', path.join(dir, 'libstubcudnn.so.9'), "-Wl,-rpath,$ORIGIN"]);
    expect(providerLoadError(dir)).toBeUndefined();
    rmSync(path.join(dir, 'libstubcudnn.so.9'));
    expect(providerLoadError(dir)).toBe('libstubcudnn.so.9: cannot open shared object file: No such file or directory');
    // What the boot reason says, from what onnxruntime-node 1.30.0 throws.
    expect(cudaStartFailure('OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library', 0, dir).reason).toMatch(
      /^OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library: libstubcudnn\.so\.9: cannot open shared object file: No such file or directory; the CUDA provider needs/,
    );
    rmSync(path.join(dir, 'libonnxruntime_providers_shared.so'));
    expect(providerLoadError(dir)).toBe('libonnxruntime_providers_shared.so: cannot open shared object file: No such file or directory');
  });
});

/** Builds `out` as a shared library from C `source` (cc, as npm run build's native modules need), with `args` after. */
function cc(dir: string, out: string, source: string, args: string[] = []): void {
  writeFileSync(path.join(dir, `${out}.c`), source);
  execFileSync('cc', ['-shared', '-fPIC', '-o', path.join(dir, out), `${out}.c`, ...args], { cwd: dir });
}

/**
 * The built server beside a copy of onnxruntime-node whose CUDA provider cannot load, as on a GPU node without cuDNN:
 * stand-ins built here for libonnxruntime_providers_shared.so (ORT looks up Provider_SetHost in it first) and
 * libonnxruntime_providers_cuda.so, which needs libstubcudnn.so.9, absent. The real ORT then tries the provider and
 * fails as it would there. Every other package is the repository's own (linked). Returns the copy's main.js.
 */
function serverWithoutCudnn(root: string): string {
  const modules = realpathSync(path.join(ROOT, 'node_modules'));
  mkdirSync(path.join(root, 'node_modules', 'onnxruntime-node'), { recursive: true });
  for (const name of readdirSync(modules)) if (name !== 'onnxruntime-node') symlinkSync(path.join(modules, name), path.join(root, 'node_modules', name));
  const ort = path.join(modules, 'onnxruntime-node');
  const bin = path.relative(ort, ortBinaryDir());
  for (const part of ['package.json', 'dist', bin]) cpSync(path.join(ort, part), path.join(root, 'node_modules', 'onnxruntime-node', part), { recursive: true });
  cpSync(path.join(ROOT, 'dist'), path.join(root, 'dist'), { recursive: true });
  cpSync(path.join(ROOT, 'package.json'), path.join(root, 'package.json')); // the demo model's assets are found beside it
  mkdirSync(path.join(root, 'src', 'demo'), { recursive: true });
  symlinkSync(path.join(ROOT, 'src', 'demo', 'assets'), path.join(root, 'src', 'demo', 'assets'));
  const x = path.join(root, 'node_modules', 'onnxruntime-node', bin);
  cc(x, 'libstubcudnn.so.9', 'int stub_cudnn(void) { return 0; }\n', ['-Wl,-soname,libstubcudnn.so.9']);
  cc(x, 'libonnxruntime_providers_shared.so', 'void Provider_SetHost(void *host) { (void)host; }\n');
  cc(x, 'libonnxruntime_providers_cuda.so', 'int stub_provider(void) { return 0; }\n', ['-Wl,--no-as-needed', path.join(x, 'libstubcudnn.so.9'), '-Wl,-rpath,$ORIGIN']);
  rmSync(path.join(x, 'libstubcudnn.so.9'));
  // A driver library where checkCuda looks (LD_LIBRARY_PATH), so that `auto` asks ORT too.
  mkdirSync(path.join(root, 'driver'));
  cc(path.join(root, 'driver'), 'libcuda.so.1', 'int stub_driver(void) { return 0; }\n');
  return path.join(root, 'dist', 'src', 'main.js');
}

describe('a server whose CUDA provider library cannot load cuDNN (real ORT, stand-in libraries)', () => {
  it('cuda: the boot reason names the missing library and the loader path; auto: serves on the CPU, the warning saying the same', async () => {
    const entry = serverWithoutCudnn(copy.dir);
    const missing = 'libstubcudnn.so.9: cannot open shared object file: No such file or directory; the CUDA provider needs the CUDA and cuDNN 9 libraries it was built for on the loader path (LD_LIBRARY_PATH), see README "GPU"';
    const cuda = await startServer({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'cuda', MODEL_CACHE_DIR: path.join(copy.dir, 'cache') }, { entry });
    try {
      const failed = await cuda.waitFor('state', (st) => st.state === 'failed');
      expect(failed.reason).toBe(`PROVIDER: EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start: OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library: ${missing}`);
    } finally {
      await cuda.stop();
    }
    const driver = path.join(copy.dir, 'driver');
    const auto = await startServer({ STORAGE_URI: undefined, EXECUTION_PROVIDER: 'auto', WARMUP_STEPS: '1', MODEL_CACHE_DIR: path.join(copy.dir, 'cache'), LD_LIBRARY_PATH: driver }, { entry, ready: true });
    try {
      const fallback = auto.logs.filter((l) => l.msg === 'execution provider cuda unavailable, falling back to cpu');
      expect(fallback.map((l) => [l.level, l.reason])).toEqual([['warn', `OrtSessionOptionsAppendExecutionProvider_Cuda: Failed to load shared library: ${missing}`]]);
      expect(auto.events('session').every((l) => l.provider === 'cpu')).toBe(true);
    } finally {
      await auto.stop();
    }
  }, 60_000);
});

const libs = tempDir('dr-provider-libs-');
const copy = tempDir('dr-provider-copy-');
afterAll(() => {
  libs.cleanup();
  copy.cleanup();
});
