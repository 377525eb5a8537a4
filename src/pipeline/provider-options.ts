/**
 * @module CUDA provider options that onnxruntime-node cannot pass (its binding gives the CUDA provider a device id
 * only). native/cuda-provider-options.c, loaded into the process before the binding, applies CUDA_PROVIDER_OPTIONS to
 * every CUDA provider the binding appends (docs/DESIGN.md, "CUDA provider options").
 */
import { existsSync } from 'node:fs';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { RuntimeError } from '../errors.js';

/** What the native module saw: whether it hooked ONNX Runtime's API table, CUDA appends, and those it configured. */
export interface ProviderOptionsStats {
  patched: boolean;
  appends: number;
  applied: number;
  lastError: string;
  options: string;
}

/** dist/native/, where `npm run build` puts the module (scripts/build-native.sh). */
export const NATIVE_MODULE = fileURLToPath(new URL('../../native/cuda-provider-options.node', import.meta.url));

let native: { stats(): ProviderOptionsStats } | undefined;

/**
 * Loads the native module when CUDA_PROVIDER_OPTIONS is set (the worker threads read the process environment, as the
 * module does), before onnxruntime-node: it must be in the process's global symbol scope when the binding binds
 * OrtGetApiBase. Every thread calls it before its first onnxruntime-node import (onnx.ts loadOrt).
 */
export function loadProviderOptions(env: NodeJS.ProcessEnv = process.env, file = NATIVE_MODULE): void {
  if (native || !env.CUDA_PROVIDER_OPTIONS?.trim()) return;
  if (!existsSync(file)) {
    throw new RuntimeError('CONFIG', 'CUDA_PROVIDER_OPTIONS is set, but this build has no native/cuda-provider-options module (npm run build makes it where a C compiler is installed; the image has it)');
  }
  const m = { exports: {} as { stats(): ProviderOptionsStats } };
  process.dlopen(m, file, os.constants.dlopen.RTLD_NOW | os.constants.dlopen.RTLD_GLOBAL);
  native = m.exports;
}

/** The native module's counters, or undefined when CUDA_PROVIDER_OPTIONS is not in use. */
export function providerOptionsStats(): ProviderOptionsStats | undefined {
  return native?.stats();
}
