/**
 * @module The execution providers a session can run on, in one place: their names, which of them run on a GPU, which
 * one the fused export is made for, and the list of ONNX Runtime providers each one asks for. The pipeline asks only
 * `onGpu` (kernel-search priming, auxiliary threads, GPU metrics) and `fusedIsFast` (the slow-path hint), so another
 * GPU provider (TensorRT, its engine cache on the PVC) is added here and in SessionFactory's decision (onnx.ts) without
 * touching the pipeline.
 */

/** What a created session runs on, once SessionFactory has decided (EXECUTION_PROVIDER's `auto` resolved). */
export type SessionProvider = 'cuda' | 'cpu';

/** Whether sessions on this provider run on a GPU: first-run kernel searches to prime, device memory to report. */
export function onGpu(provider: SessionProvider): boolean {
  return provider !== 'cpu';
}

/**
 * Whether onnxruntime's fused export (its contrib operators, scripts/export-onnx.sh's default) is this provider's fast
 * path, so that a plain UNet on it is the slow one. Only CUDA's: TensorRT fuses a plain graph itself and leaves the
 * contrib operators to the providers behind it.
 */
export function fusedIsFast(provider: SessionProvider): boolean {
  return provider === 'cuda';
}

/**
 * The providers ONNX Runtime is given for a session, in order of preference. The CPU follows every GPU provider, for
 * the few operators a GPU provider has no kernel for (ONNX Runtime places those on the CPU).
 */
export function ortProviders(provider: SessionProvider, deviceId = 0): Array<'cpu' | { name: 'cuda'; deviceId: number }> {
  switch (provider) {
    case 'cuda':
      return [{ name: 'cuda', deviceId }, 'cpu'];
    case 'cpu':
      return ['cpu'];
    default: {
      // A provider added to SessionProvider must say here what ONNX Runtime is asked for, or this does not compile.
      const unknown: never = provider;
      throw new Error(`no ONNX Runtime providers for ${String(unknown)}`);
    }
  }
}
