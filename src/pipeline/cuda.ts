/**
 * @module Whether the CUDA execution provider can start here, decided from files alone, and what ONNX Runtime's failure
 * to start it means. Asking ONNX Runtime instead (creating a session with the CUDA provider) makes it print a red
 * "Failed to load library" error on every CPU-only machine, so the runtime looks for the provider library and a CUDA
 * driver first.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { outOfMemory, withoutSourceLocations } from './failures.js';

export interface CudaCheck {
  ok: boolean;
  /** Why CUDA cannot start, for the log (absent when ok). */
  reason?: string;
  /**
   * What is missing: onnxruntime-node's CUDA provider library (then ONNX Runtime cannot load the provider, whatever the
   * machine has) or the driver (found by a search of the usual folders, which a driver elsewhere can escape).
   */
  missing?: 'provider' | 'driver';
  /** Where the provider library is (or would be). */
  providerDir: string;
}

/** The folder of onnxruntime-node's native libraries for this platform, where its CUDA provider is installed. */
export function ortBinaryDir(): string {
  const pkg = createRequire(import.meta.url).resolve('onnxruntime-node/package.json');
  return path.join(path.dirname(pkg), 'bin', 'napi-v6', process.platform, process.arch);
}

/** Folders the dynamic loader searches for libcuda.so.1 besides LD_LIBRARY_PATH and /etc/ld.so.cache. */
const DRIVER_DIRS = [
  '/usr/lib/x86_64-linux-gnu',
  '/usr/lib/aarch64-linux-gnu',
  '/usr/lib64',
  '/usr/lib',
  '/usr/local/nvidia/lib64',
  '/usr/local/nvidia/lib',
  '/usr/local/cuda/compat',
  '/usr/lib/wsl/lib',
];

export interface CudaCheckDeps {
  exists?: (p: string) => boolean;
  /** Reads /etc/ld.so.cache (or returns '' when it cannot). */
  ldCache?: () => string;
  env?: NodeJS.ProcessEnv;
  providerDir?: string;
  /** `platform/arch` (default this process's): onnxruntime-node's CUDA provider exists for linux/x64 only. */
  platform?: string;
}

/**
 * The CUDA provider needs `libonnxruntime_providers_cuda.so` (and `_shared.so`) beside onnxruntime-node's library,
 * which the image installs at build time, and the NVIDIA driver's `libcuda.so.1`, which the GPU device plugin mounts
 * into the container. Missing libraries of the CUDA toolkit (cuBLAS, cuDNN) are not looked for: a session attempt
 * reports them, and EXECUTION_PROVIDER=auto then falls back with a warning.
 */
export function checkCuda(deps: CudaCheckDeps = {}): CudaCheck {
  const exists = deps.exists ?? existsSync;
  const env = deps.env ?? process.env;
  let providerDir: string;
  try {
    providerDir = deps.providerDir ?? ortBinaryDir();
  } catch {
    return { ok: false, reason: 'onnxruntime-node is not installed', providerDir: '', missing: 'provider' };
  }
  const missing = ['libonnxruntime_providers_cuda.so', 'libonnxruntime_providers_shared.so'].filter((f) => !exists(path.join(providerDir, f)));
  if (missing.length > 0) {
    // Its install script downloads the CUDA provider on linux/x64 only (js/node/script/install.js); nothing to install elsewhere.
    const platform = deps.platform ?? `${process.platform}/${process.arch}`;
    const fix = platform === 'linux/x64' ? 'install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 (the image does)' : `onnxruntime-node has a CUDA provider for linux/x64 only, not ${platform}`;
    return { ok: false, providerDir, missing: 'provider', reason: `onnxruntime-node has no CUDA provider library (${missing.join(', ')}): a CPU-only install; ${fix}` };
  }
  const dirs = [...(env.LD_LIBRARY_PATH ?? '').split(':').filter(Boolean), ...DRIVER_DIRS];
  const found = dirs.some((d) => exists(path.join(d, 'libcuda.so.1'))) || (deps.ldCache ?? readLdCache)().includes('libcuda.so.1');
  if (!found) return { ok: false, providerDir, missing: 'driver', reason: 'no NVIDIA driver (libcuda.so.1 is not on the loader path): no GPU is attached to this container' };
  return { ok: true, providerDir };
}

function readLdCache(): string {
  try {
    return readFileSync('/etc/ld.so.cache', 'latin1');
  } catch {
    return '';
  }
}

/**
 * What to do about the CUDA runtime's failures that stop the CUDA provider from starting on a deployment (cudaError_t
 * codes, as CudaCall prints them: "CUDA failure <code>: <cudaGetErrorString>").
 */
const START_FAILURES: Record<number, (deviceId: number) => string> = {
  35: () => 'the node\'s NVIDIA driver is older than the CUDA the provider was built for (the image\'s: CUDA 12): update the driver (docs/OPERATIONS.md, "CUDA not found")',
  100: () => 'no GPU is visible in this container: request nvidia.com/gpu for the pod, and check CUDA_VISIBLE_DEVICES',
  101: (d) => `GPU ${d} does not exist in this container: GPUS (or WORKERS) asks for more GPUs than CUDA_VISIBLE_DEVICES or the pod's nvidia.com/gpu give; set GPUS to the GPUs the pod has`,
};

const GPU_MEMORY_TAKEN = "the GPU's memory is taken (another process, or more WORKERS on one GPU than fit): free it or give the pod a GPU of its own";

export interface CudaStartFailure {
  /** ONNX Runtime's message as one line for a boot reason, with what to do where the cause is known. */
  reason: string;
  /** A setting of the runtime's is wrong (a GPU that is not there): no provider choice gets past it. */
  config: boolean;
}

/**
 * ONNX Runtime's error when the CUDA provider did not start, as a boot reason reaching clients: without ORT's source
 * locations and C++ signatures (two of them, ~500 characters, come before the CUDA runtime's own text), without what
 * CudaCall appends (" ; GPU=… ; hostname=… ; file=… ; expr=…") and without onnxruntime-node's install folder; then what
 * to do, for the failures a deployment meets (START_FAILURES; a provider library that does not load, with the library
 * the loader could not find, which ORT's exception leaves out: `loadError`).
 */
export function cudaStartFailure(
  message: string,
  deviceId: number,
  providerDir: string,
  loadError: (providerDir: string) => string | undefined = providerLoadError,
): CudaStartFailure {
  const local = (t: string) => (providerDir ? t.split(providerDir + path.sep).join('') : t);
  // The first line that says something: a message may begin with a blank one.
  const first = local(message).split('\n').find((l) => l.trim() !== '') ?? '';
  let text = withoutSourceLocations(first).trim().replace(/ ; GPU=-?\d+ ; hostname=.*$/, '').trim();
  if (text === '') text = 'ONNX Runtime gave no reason';
  const cuda = /\bCUDA failure (\d+): /.exec(text);
  const code = cuda ? Number(cuda[1]) : undefined;
  // Out of memory before any model is loaded (cudaMalloc, cuBLAS' or cuDNN's handle, the arena: failures.ts's signs).
  const hint = outOfMemory(text) ? GPU_MEMORY_TAKEN : code !== undefined ? START_FAILURES[code]?.(deviceId) : undefined;
  if (hint) return { reason: `${text.slice(0, 300)}; ${hint}`, config: code === 101 };
  if (/Failed to load (shared )?library/i.test(text)) {
    // The CUDA_PROVIDER_OPTIONS module's message has the loader's words already ("… with error: libcudnn.so.9: …").
    const named = / with error: /.test(text);
    const missing = named ? undefined : loadError(providerDir);
    const what = named ? text.slice(0, 400) : missing ? `${text.slice(0, 200)}: ${local(missing).slice(0, 200)}` : `${text.slice(0, 300)} (ONNX Runtime printed the missing library on stderr)`;
    return { reason: `${what}; the CUDA provider needs the CUDA and cuDNN 9 libraries it was built for on the loader path (LD_LIBRARY_PATH), see README "GPU"`, config: false };
  }
  return { reason: text.slice(0, 300), config: false };
}

/** The provider libraries in the order ORT loads them (provider_bridge_ort.cc): RTLD_NOW, the first RTLD_GLOBAL. */
const LOAD_ORDER = [
  ['libonnxruntime_providers_shared.so', 'RTLD_GLOBAL'],
  ['libonnxruntime_providers_cuda.so', 'RTLD_LOCAL'],
] as const;

/**
 * Why the CUDA provider's libraries do not load, in the dynamic loader's words ("libcudnn.so.9: cannot open shared
 * object file: No such file or directory", the provider folder cut), or undefined when they load. They are loaded as
 * ORT loads them, in a child process: nothing stays loaded here, and it costs a Node start on a failed start only.
 * Node's dlopen of a library that is no Node module fails after the load ("did not self-register"): that one loaded.
 */
export function providerLoadError(providerDir: string): string | undefined {
  const child = `
const { constants } = require('node:os');
const { join } = require('node:path');
for (const [file, scope] of JSON.parse(process.env.LOAD_ORDER)) {
  try { process.dlopen({ exports: {} }, join(process.env.PROVIDER_DIR, file), constants.dlopen.RTLD_NOW | constants.dlopen[scope]); }
  catch (e) { if (!/did not self-register|napi_register_module/.test(e.message)) { process.stdout.write(e.message.split('\\n')[0].split(process.env.PROVIDER_DIR + '/').join('')); break; } }
}`;
  const r = spawnSync(process.execPath, ['-e', child], {
    encoding: 'utf8',
    timeout: 10_000,
    env: { ...process.env, PROVIDER_DIR: providerDir, LOAD_ORDER: JSON.stringify(LOAD_ORDER) },
  });
  const out = r.stdout?.trim();
  return out ? out : undefined;
}
