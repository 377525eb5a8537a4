/** ONNX Runtime's allocation failures told apart from other errors (the texts onnxruntime-node rejects with). */
import { describe, expect, it } from 'vitest';
import { RuntimeError } from '../src/errors.js';
import { outOfMemory } from '../src/pipeline/out-of-memory.js';

/**
 * Allocation failures as onnxruntime-node's run() rejects with them (Error.message: the binding throws ORT's what()).
 * The first two were measured here (onnxruntime-node 1.30.0, CPU, the demo model under prlimit --as); the others are
 * ORT's format strings filled in: bfc_arena.cc (BFCArena::Extend), cuda_call.cc (CudaCall: "<lib> failure <code>:
 * <text> ; GPU=… ; hostname=… ; file=… ; line=… ; expr=…"), cuda_kernel.h (CudaKernel::Compute), allocator.cc
 * (std::bad_alloc), wrapped by sequential_executor.cc when a kernel failed.
 */
const ARENA = '/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*)';
const OOM: Array<[string, string]> = [
  ['the CPU arena, in the UNet', `Non-zero status code returned while running FusedMatMul node. Name:'/MatMul_51/MatmulTransposeFusion//MatMulScaleFusion/' Status Message: ${ARENA} Failed to allocate memory for requested buffer of size 635830272\n`],
  ['the CPU arena, in the VAE decoder', `Non-zero status code returned while running Upsample node. Name:'/Resize_5_nchwc' Status Message: ${ARENA} Failed to allocate memory for requested buffer of size 67108864\n`],
  ['a CUDA arena at its gpu_mem_limit', `Non-zero status code returned while running Conv node. Name:'/up_blocks.3/resnets.2/conv1/Conv' Status Message: ${ARENA} Available memory of 1073741824 is smaller than requested bytes of 2147483648`],
  ['cudaMalloc outside the arena', 'CUDA failure 2: out of memory ; GPU=0 ; hostname=sd-predictor-00001 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc ; line=51 ; expr=cudaMalloc((void**)&p, size); '],
  ['a CUDA kernel', "Non-zero status code returned while running MultiHeadAttention node. Name:'Attention_0' Status Message: CUDA error cudaErrorMemoryAllocation:out of memory"],
  ['a cuBLAS handle', 'CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0 ; hostname=sd-predictor-00001 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc ; line=172 ; expr=cublasCreate(&cublas_handle_); '],
  ['a cuDNN 9 workspace', "Non-zero status code returned while running Conv node. Name:'/conv_in/Conv' Status Message: CUDNN failure 4004: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED ; GPU=0 ; hostname=sd-predictor-00001 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/nn/conv.cc ; line=456 ; expr=cudnnFindConvolutionForwardAlgorithmEx(...); "],
  ['cuDNN 8', 'CUDNN failure 2: CUDNN_STATUS_ALLOC_FAILED ; GPU=0 ; hostname=sd-predictor-00001 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_execution_provider.cc ; line=180 ; expr=cudnnCreate(&cudnn_handle_); '],
  ['the CPU allocator without an arena', "Non-zero status code returned while running Conv node. Name:'/conv_in/Conv' Status Message: std::bad_alloc"],
  ["V8, for the pipeline's typed arrays", 'Array buffer allocation failed'],
];
const NOT_OOM: Array<[string, string]> = [
  ['a shape error', "Non-zero status code returned while running Expand node. Name:'/bert/Expand' Status Message: /bert/Expand: left operand cannot broadcast on dim 1 LeftShape: {1,512}, RightShape: {18,513}"],
  ['another CUDA failure', 'CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; hostname=h ; file=f ; line=1 ; expr=cudaStreamSynchronize(s); '],
  ['another cuDNN failure', 'CUDNN failure 5000: CUDNN_STATUS_EXECUTION_FAILED ; GPU=0 ; hostname=h ; file=f ; line=1 ; expr=cudnnConvolutionForward(...); '],
  ['a typed array too long (a size, not memory)', 'Invalid typed array length: 4294967296'],
  ['a missing input', "input 'sample' is missing in 'feeds'."],
];

describe('outOfMemory: allocation failures told apart from other errors', () => {
  it.each(OOM)('%s', (_, text) => {
    const first = text.split('\n')[0]!.trim();
    expect(outOfMemory(new Error(text))).toBe(first);
    // An auxiliary thread's failure reaches the pipeline worker as INTERNAL with the same text.
    expect(outOfMemory(new RuntimeError('INTERNAL', text))).toBe(first);
  });
  it.each(NOT_OOM)('not %s', (_, text) => expect(outOfMemory(new Error(text))).toBeUndefined());
});
