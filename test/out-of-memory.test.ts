/**
 * A generation that runs out of memory: ONNX Runtime's allocation failures told apart from other errors (the texts
 * onnxruntime-node rejects with), and the built server answering one with 507 OUT_OF_MEMORY, running a batch that ran
 * out of memory again one request at a time, and serving on. The memory runs out for real: the server's address space
 * is capped (prlimit --as) once it is ready, and the demo model's UNet asks for more than is left.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, renameSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RuntimeError } from '../src/errors.js';
import ort from 'onnxruntime-node';
import { allocationText, failureReply, loadError, outOfMemory, readFailure, withoutSourceLocations } from '../src/pipeline/failures.js';
import { fixtureVariant } from './fixtures/index.js';
import { metric } from './helpers/runtime.js';
import { postJson, startServer, tempDir, until, type ServerHandle } from './helpers/server.js';

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

describe('loadError: a session that could not be created, as the boot reason says it', () => {
  // A real, readable file: what ORT failed on is read again to tell the volume's fault from the format's.
  const tmp = tempDir('dr-load-error-');
  const model = path.join(tmp.dir, 'unet', 'model.onnx');
  mkdirSync(path.dirname(model));
  writeFileSync(model, 'not a graph');
  afterAll(() => tmp.cleanup());
  it.each(OOM.filter(([what]) => !what.startsWith('V8')))('OUT_OF_MEMORY for %s, with the allocation alone', async (_, text) => {
    const err = (await loadError('unet', model, new Error(text))) as RuntimeError;
    expect(err.code).toBe('OUT_OF_MEMORY');
    expect(err.message).toMatch(/^unet\/model\.onnx could not be loaded: out of memory while its session was created \(.+\); it needs a GPU \(or a memory limit\) with more room/);
    // What the allocation was, never where in ORT's sources it failed nor the node's host name.
    expect(err.message).toContain(allocationText(text.split('\n')[0]!));
    for (const leak of ['/onnxruntime_src', 'hostname=', 'GPU=0', 'Status Message']) expect(err.message).not.toContain(leak);
  });
  it('names the allocation', () => {
    expect(allocationText(OOM[0]![1].split('\n')[0]!)).toBe('Failed to allocate memory for requested buffer of size 635830272');
    expect(allocationText(OOM[3]![1])).toBe('CUDA failure 2: out of memory');
    expect(allocationText(OOM[6]![1])).toBe('CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED');
  });
  it.each([
    // Measured: onnxruntime-node 1.30.0 creating a session under prlimit --as (the model's path is the binding's).
    [`Load model from ${model} failed:std::bad_alloc`],
    ['Exception during initialization: std::bad_alloc'],
    // ORT's CUDA_CALL_THROW (cuda_call.cc): its source location and template arguments come first.
    ['/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:129 std::conditional_t<THRW, void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, SUCCTYPE, const char*, const char*, int) [with ERRTYPE = cudaError; bool THRW = true; SUCCTYPE = cudaError; std::conditional_t<THRW, void, onnxruntime::common::Status> = void] /onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:121 std::conditional_t<THRW, void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, SUCCTYPE, const char*, const char*, int) [with ERRTYPE = cudaError; bool THRW = true; SUCCTYPE = cudaError; std::conditional_t<THRW, void, onnxruntime::common::Status> = void] CUDA failure 2: out of memory ; GPU=0 ; hostname=sd-predictor-00001 ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_allocator.cc ; line=51 ; expr=cudaMalloc((void**)&p, size); '],
  ])('a session creation that ran out: %s', async (text) => {
    const err = (await loadError('unet', model, new Error(text))) as RuntimeError;
    expect(err.code).toBe('OUT_OF_MEMORY');
    expect(err.message).toMatch(/^unet\/model\.onnx could not be loaded: out of memory while its session was created \((std::bad_alloc|CUDA failure 2: out of memory)\); /);
    for (const leak of [tmp.dir, '/onnxruntime_src', 'hostname=', 'ERRTYPE']) expect(err.message).not.toContain(leak);
  });
  it('MODEL_FORMAT for anything else, without the model folder', async () => {
    const err = (await loadError('unet', model, new Error(`Load model from ${model} failed:Protobuf parsing failed.`))) as RuntimeError;
    expect([err.code, err.message]).toEqual(['MODEL_FORMAT', 'unet/model.onnx could not be loaded: Load model from unet/model.onnx failed:Protobuf parsing failed.']);
    // Measured (a weights file cut short): ORT's source location and the throwing constructor's signature go.
    const short = (await loadError('unet', model, new Error('Exception during initialization: /onnxruntime_src/onnxruntime/core/optimizer/initializer.cc:79 '
      + 'onnxruntime::Initializer::Initializer(const onnxruntime::Graph&, const onnx::TensorProto&, const std::filesystem::__cxx11::path&, bool) '
      + '[ONNXRuntimeError] : 1 : FAIL : tensorprotoutils.cc:1763 GetExtDataFromTensorProto External initializer: conv_in.weight offset: 12288 size to read: 1152 given file_length: 1000 are out of bounds or can not be read in full.'))) as RuntimeError;
    expect(short.message).toBe('unet/model.onnx could not be loaded: Exception during initialization: [ONNXRuntimeError] : 1 : FAIL : tensorprotoutils.cc:1763 '
      + 'GetExtDataFromTensorProto External initializer: conv_in.weight offset: 12288 size to read: 1152 given file_length: 1000 are out of bounds or can not be read in full.');
    // A lambda's signature, and text that only looks like a location, kept.
    expect(withoutSourceLocations('/onnxruntime_src/onnxruntime/core/session/inference_session.cc:2200 onnxruntime::common::Status '
      + 'onnxruntime::InferenceSession::Initialize()::<lambda()> const [ONNXRuntimeError] : 1 : FAIL : x')).toBe('[ONNXRuntimeError] : 1 : FAIL : x');
    expect(withoutSourceLocations('/onnxruntime_src/a.cc:1 no signature (here')).toBe('/onnxruntime_src/a.cc:1 no signature (here');
    const own = new RuntimeError('PROVIDER', 'the CUDA execution provider did not start');
    expect(await loadError('unet', model, own)).toBe(own);
  });
});

describe('failureReply: what a client is told of a failed generation or adapter set build', () => {
  const reply = (err: unknown) => failureReply(err, 'generation failed', 'the generation ran out of memory');
  it('passes the runtime\'s own refusals on as they are', () => {
    expect(reply(new RuntimeError('INVALID_INPUT', 'instances[0].image does not decode'))).toEqual({ code: 'INVALID_INPUT', message: 'instances[0].image does not decode' });
  });
  it.each(OOM)('answers OUT_OF_MEMORY for %s, ORT\'s text for the log only', (_, text) => {
    for (const err of [new Error(text), new RuntimeError('INTERNAL', text)]) {
      const r = reply(err);
      expect([r.code, r.message, r.detail]).toEqual(['OUT_OF_MEMORY', 'the generation ran out of memory', text.split('\n')[0]!.trim()]);
    }
  });
  it.each(NOT_OOM)('answers %s as a defect, without its text', (_, text) => {
    // An auxiliary session thread's failure arrives as an INTERNAL RuntimeError carrying ORT's text (build paths, the
    // node's host name): the client is told the generation failed, the log gets the text.
    for (const err of [new Error(text), new RuntimeError('INTERNAL', text)]) {
      const r = reply(err);
      expect([r.code, r.message]).toEqual(['INTERNAL', 'generation failed']);
      expect(r.detail).toContain(text);
    }
  });
});

const canLimit = process.platform === 'linux' && (() => {
  try {
    execFileSync('prlimit', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/**
 * Measured on 2 cores (onnxruntime-node 1.30.0): after a 1024x1024 image the server's address space grows by ~0.4 GB
 * and stays there (ORT's arenas keep what they took); 63 images at 1024x1024 need one 636 MB buffer in the UNet's
 * attention (126 rows × 128² pixels × 77 tokens × 4 bytes) on top of ~0.3 GB the arena took before it, and fail
 * within 3 s. 640 MB above the primed server leaves room for that 0.3 GB and for 1-image requests after it, never for
 * the 636 MB: the failure is ONNX Runtime's, not V8's or a thread's.
 */
const SIZE = 1024;
const BIG = 63;
const MARGIN_MB = 640;

/** Each request names itself: the out-of-memory lines carry the ids of the requests of the batch. */
const trace = (p: string) => `${Buffer.from(p.padEnd(16, '.')).toString('hex').slice(0, 32)}`;
const headers = (inst: Record<string, unknown>) => ({ 'content-type': 'application/json', 'x-request-id': String(inst.prompt), traceparent: `00-${trace(String(inst.prompt))}-00f067aa0ba902b7-01` });
const predictOn = (srv: ServerHandle, inst: Record<string, unknown>) => postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst] }, { headers: headers(inst) });
/** A request whose client leaves when the socket is destroyed. */
function rawPredict(srv: ServerHandle, inst: Record<string, unknown>): net.Socket {
  const body = JSON.stringify({ instances: [inst] });
  const head = Object.entries({ ...headers(inst), 'content-length': String(Buffer.byteLength(body)) }).map(([k, v]) => `${k}: ${v}\r\n`).join('');
  const s = net.connect(srv.port, '127.0.0.1', () => s.write(`POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\n${head}\r\n${body}`));
  s.on('error', () => undefined);
  return s;
}
const big = { prompt: 'big', num_inference_steps: 1, height: SIZE, width: SIZE, num_images_per_prompt: BIG, seed: 7 };
const small = { prompt: 'small', num_inference_steps: 1, height: SIZE, width: SIZE, seed: 9 };
const normal = { prompt: 'normal', num_inference_steps: 2, height: 64, width: 64, seed: 3 };
/** A generation of another shape, which holds the worker while others queue; its client leaving then frees it. */
const hold = { prompt: 'hold', num_inference_steps: 500, height: 512, width: 512 };
const b64 = (r: { json: Record<string, unknown> }) => (r.json.predictions as Array<{ image: { b64: string } }>)[0]!.image.b64;

/**
 * The built server, MAX_BATCH_SIZE 64 (the big request and a small one fill one batch together), with `env`; each shape
 * the tests serve run once (the small request's image returned), then its address space capped: what they need again
 * comes from the arenas.
 */
async function startCapped(env: Record<string, string>): Promise<{ srv: ServerHandle; smallAlone: string }> {
  const srv = await startServer({ STORAGE_URI: undefined, MAX_IMAGE_SIZE: String(SIZE), MAX_IMAGES_PER_REQUEST: String(BIG), MAX_BATCH_SIZE: '64', ...env }, { ready: true });
  const primed = await predictOn(srv, small);
  expect(primed.status).toBe(200);
  expect((await predictOn(srv, normal)).status).toBe(200);
  const vmKb = Number(/^VmSize:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${srv.proc.pid}/status`, 'utf8'))![1]);
  execFileSync('prlimit', [`--pid=${srv.proc.pid}`, `--as=${(vmKb + MARGIN_MB * 1024) * 1024}`]);
  return { srv, smallAlone: b64(primed) };
}

describe.skipIf(!canLimit)('a generation out of memory (the built server, address space capped with prlimit --as)', () => {
  let srv: ServerHandle;
  let smallAlone: string;
  const predict = (inst: Record<string, unknown>) => predictOn(srv, inst);
  const logged = (msg: string) => srv.logs.filter((l) => l.msg === msg);

  // RESULT_CACHE_MB 0: each request generates, none is answered from another's images.
  beforeAll(async () => void ({ srv, smallAlone } = await startCapped({ RESULT_CACHE_MB: '0' })));
  afterAll(async () => void (await srv?.stop()));

  it('answers 507 OUT_OF_MEMORY naming what was asked and what to do, logs and counts it once, and serves on', async () => {
    const r = await predict(big);
    expect([r.status, r.json]).toEqual([507, {
      error: `out of memory: ${BIG} images of ${SIZE}x${SIZE} (height x width) do not fit in this server's memory, even run alone; ask for a smaller height and width or fewer images (num_images_per_prompt), or use a server with a bigger GPU`,
      code: 'OUT_OF_MEMORY',
    }]);
    expect(await metric(srv, 'inference_out_of_memory_total', { outcome: 'failed' })).toBe(1);
    expect(await metric(srv, 'inference_request_count', { status: '507' })).toBe(1);
    const lines = logged('a generation ran out of memory: answered OUT_OF_MEMORY');
    expect(lines).toEqual([expect.objectContaining({ level: 'warn', height: SIZE, width: SIZE, images: BIG, requests: 1, device: 'cpu', reason: expect.stringMatching(/Failed to allocate memory for requested buffer of size \d+$/),
      requestIds: ['big'], traceIds: [trace('big')] })]);
    expect(logged('generation failed')).toEqual([]);
    // That warning is all the process writes of it: ONNX Runtime's own line for the failed run (in colour, over two
    // lines, on stderr) would be the one line of the log that is not JSON.
    expect([srv.stderr.join(''), srv.logs.filter((l) => l.raw)]).toEqual(['', []]);
    // The worker serves on: a request of another shape, and one image of this one.
    expect((await predict(normal)).status).toBe(200);
    const again = await predict(small);
    expect(again.status).toBe(200);
    expect(b64(again) === smallAlone).toBe(true);
  }, 120_000);

  it('runs a batch that ran out of memory again one request at a time: the small request batched with the big one succeeds', async () => {
    const split0 = await metric(srv, 'inference_out_of_memory_total', { outcome: 'split' });
    const failed0 = await metric(srv, 'inference_out_of_memory_total', { outcome: 'failed' });
    const holding = rawPredict(srv, hold);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1, 30_000, 25);
    const answers = Promise.all([predict(big), predict(small)]);
    await until(async () => (await metric(srv, 'inference_queue_depth')) === 2, 30_000, 25);
    holding.destroy();
    const [b, s] = await answers;
    expect(s.status).toBe(200);
    expect([b.status, b.json.code]).toEqual([507, 'OUT_OF_MEMORY']);
    // Run alone, the small request's image is the one it gets alone.
    expect(b64(s) === smallAlone).toBe(true);
    const split = logged('a generation batch ran out of memory: its requests run again one at a time (a lower MAX_BATCH_SIZE avoids the retries)');
    expect(split).toEqual([expect.objectContaining({ height: SIZE, width: SIZE, images: BIG + 1, requests: 2,
      requestIds: expect.arrayContaining(['big', 'small']), traceIds: expect.arrayContaining([trace('big'), trace('small')]) })]);
    expect((await metric(srv, 'inference_out_of_memory_total', { outcome: 'split' })) - split0).toBe(1);
    // The big request alone, again.
    expect((await metric(srv, 'inference_out_of_memory_total', { outcome: 'failed' })) - failed0).toBe(1);
    expect((await predict(normal)).status).toBe(200);
  }, 120_000);
});

describe.skipIf(!canLimit)('a batch out of memory that holds generations whose clients left while identical requests wait for their images (the result cache on)', () => {
  let srv: ServerHandle;
  const predict = (inst: Record<string, unknown>) => predictOn(srv, inst);
  const counts = async () => ({
    hits: await metric(srv, 'result_cache_hits_total'), split: await metric(srv, 'inference_out_of_memory_total', { outcome: 'split' }),
    failed: await metric(srv, 'inference_out_of_memory_total', { outcome: 'failed' }),
  });
  const bigTooMuch = `out of memory: ${BIG} images of ${SIZE}x${SIZE} (height x width) do not fit in this server's memory, even run alone`;

  beforeAll(async () => void ({ srv } = await startCapped({ RESULT_CACHE_MB: '64' })));
  afterAll(async () => void (await srv?.stop()));

  /**
   * The worker held while the requests `queued` wait behind it, one batch; then `joined` in flight, each joined to the
   * generation of its identical request; then the clients of `leaving` (of `queued`) leave, each generation kept in the
   * queue for the request joined to it; then the worker freed. Resolves with the answers of those still there, in order.
   */
  async function batchOutOfMemory(queued: Array<Record<string, unknown>>, leaving: ReadonlySet<Record<string, unknown>>, joined: Array<Record<string, unknown>>) {
    const holding = rawPredict(srv, hold);
    await until(async () => (await metric(srv, 'worker_busy')) === 1, 30_000, 25);
    const staying = queued.filter((q) => !leaving.has(q)).map(predict);
    const left = queued.filter((q) => leaving.has(q)).map((q) => rawPredict(srv, q));
    await until(async () => (await metric(srv, 'inference_queue_depth')) === queued.length, 30_000, 25);
    const waiting = joined.map(predict);
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1 + queued.length + joined.length, 30_000, 25);
    for (const s of left) s.destroy();
    await until(async () => (await metric(srv, 'inference_requests_in_flight')) === 1 + queued.length + joined.length - left.length, 30_000, 25);
    expect(await metric(srv, 'inference_queue_depth')).toBe(queued.length);
    holding.destroy();
    return Promise.all([...staying, ...waiting]);
  }

  it("runs the generation of a client that left again alone while an identical request waits for it: that request gets its image, not a generation of its own queued at the back", async () => {
    const before = await counts();
    const mine = { ...small, prompt: 'small that leaves', seed: 11 };
    const [b, j] = await batchOutOfMemory([big, mine], new Set([mine]), [mine]);
    expect([b.status, b.json.code]).toEqual([507, 'OUT_OF_MEMORY']);
    expect([j.status, (j.json.predictions as Array<{ seed: number }>)[0]!.seed]).toEqual([200, 11]);
    const after = await counts();
    // The batch split: the big request and, for the joined request, the small one alone (before: the small one was
    // dropped with its client, and the joined request queued a generation of its own: no hit).
    expect({ hits: after.hits - before.hits, split: after.split - before.split, failed: after.failed - before.failed }).toEqual({ hits: 1, split: 1, failed: 1 });
    const split = srv.logs.filter((l) => l.msg === 'a generation batch ran out of memory: its requests run again one at a time (a lower MAX_BATCH_SIZE avoids the retries)');
    expect(split.at(-1)).toMatchObject({ images: BIG + 1, requests: 2, requestIds: expect.arrayContaining(['big', 'small that leaves']) });
  }, 120_000);

  it("splits a batch out of memory whose clients all left, for the requests waiting for its generations: each is told of its own, not the first request's 507", async () => {
    const before = await counts();
    const mine = { ...small, prompt: 'small left with big', seed: 12 };
    const [jb, j] = await batchOutOfMemory([big, mine], new Set([big, mine]), [big, mine]);
    expect([jb.status, jb.json.code, String(jb.json.error).startsWith(bigTooMuch)]).toEqual([507, 'OUT_OF_MEMORY', true]);
    // Before, no client of the batch was left, so it was not split: its one error, the big request's, went to both.
    expect([j.status, j.json.error, (j.json.predictions as Array<{ seed: number }> | undefined)?.[0]?.seed]).toEqual([200, undefined, 12]);
    const after = await counts();
    expect({ hits: after.hits - before.hits, split: after.split - before.split, failed: after.failed - before.failed }).toEqual({ hits: 1, split: 1, failed: 1 });
  }, 120_000);
});

describe('loadError: which failures read the component\'s files again', () => {
  // onnxruntime-node 1.30.0's texts, measured on the demo model (CPU; each path was the model's absolute one), and a
  // CUDA failure as cuda_call.cc writes one.
  it.each([
    ['a graph that is short or failed a read', 'Load model from /m/unet/model.onnx failed:Protobuf parsing failed.', 'graph'],
    ['a graph this uid may not open (EACCES)', 'Load model from /m/unet/model.onnx failed:system error number 13', 'graph'],
    ['a graph gone', "Load model from /m/unet/model.onnx failed:Load model /m/unet/model.onnx failed. File doesn't exist", 'graph'],
    ['weights this uid may not open (EACCES)', 'Exception during initialization: /onnxruntime_src/onnxruntime/core/optimizer/initializer.cc:79 onnxruntime::Initializer::Initializer(const onnxruntime::Graph&, const onnx::TensorProto&, const std::filesystem::__cxx11::path&, bool) SystemError : 13\n', 'all'],
    ['weights cut short', 'Exception during initialization: /onnxruntime_src/onnxruntime/core/optimizer/initializer.cc:79 onnxruntime::Initializer::Initializer(const onnxruntime::Graph&, const onnx::TensorProto&, const std::filesystem::__cxx11::path&, bool) [ONNXRuntimeError] : 1 : FAIL : tensorprotoutils.cc:1763 GetExtDataFromTensorProto External initializer: conv_in.weight offset: 12288 size to read: 1152 given file_length: 1000 are out of bounds or can not be read in full.\n', 'all'],
    ['weights gone', 'External data path validation failed for initializer: time_embedding.linear_1.weight. Error: tensorprotoutils.cc:461 ValidateExternalDataPathFromDir External data path does not exist: "/m/unet/model.onnx_data"', 'all'],
    ['weights whose path the volume fails to resolve (EIO)', 'External data path validation failed for initializer: time_embedding.linear_1.weight. Error: Failed to get the weakly canonical path: /m/unet/model.onnx_data - Input/output error', 'all'],
    ['weights linked into a folder this uid may not search', 'External data path validation failed for initializer: time_embedding.linear_1.weight. Error: Failed to get the weakly canonical path: /m/unet/model.onnx_data - Permission denied', 'all'],
    // Not about reading: passed on without a byte read again.
    ['an operator ORT does not know', 'Load model from /m/unet/model.onnx failed:This is an invalid model. In Node, ("/Mul_0", NoSuchOp, "", -1) : ("latent_sample": tensor(float),"/unscale": tensor(float),) -> ("/Mul_0",) , Error No Op registered for NoSuchOp with domain_version of 17', undefined],
    ['a CUDA failure', '/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:129 CUDA failure 100: no CUDA-capable device is detected ; GPU=0 ; hostname=h ; file=f ; line=1 ; expr=cudaSetDevice(info_.device_id); ', undefined],
    ['a folder given as the graph', 'The model path is a directory. Loading a model package from a directory path is not supported. Use the model package API (CreateModelPackageContext, SelectComponent, CreateSession) instead.', undefined],
  ])('%s', (_, text, which) => expect(readFailure(text)).toBe(which));

  it('weights linked from outside the graph\'s folder (ONNX Runtime refuses them): said so, without either absolute path', async () => {
    const tmp = tempDir('dr-linked-weights-');
    try {
      const model = await fixtureVariant(path.join(tmp.dir, 'model'), { family: 'sd15', externalData: true });
      const shared = path.join(tmp.dir, 'shared-weights');
      mkdirSync(shared);
      renameSync(path.join(model, 'unet', 'model.onnx_data'), path.join(shared, 'unet.bin'));
      symlinkSync(path.join(shared, 'unet.bin'), path.join(model, 'unet', 'model.onnx_data'));
      const graph = path.join(model, 'unet', 'model.onnx');
      const err = (await ort.InferenceSession.create(graph).then(() => undefined, (e: unknown) => loadError('unet', graph, e))) as RuntimeError;
      // Before: ORT's text, the folder outside the model whole ("… resolved path: \"/tmp/…/shared-weights/unet.bin\" allowed directory: …").
      expect([err.code, err.message]).toEqual(['MODEL_FORMAT', 'unet/model.onnx could not be loaded: its weights file unet/model.onnx_data is a symbolic link to a file outside the folder of '
        + 'unet/model.onnx (or model.onnx is a link into a folder that lacks it), and ONNX Runtime reads weights only from the graph\'s own folder: put the file itself in unet/, '
        + 'or link model.onnx and its weights into one folder (as a Hugging Face cache does)']);
      // A link inside the folder is followed: the same weights, linked under the graph's own folder, load.
      unlinkSync(path.join(model, 'unet', 'model.onnx_data'));
      renameSync(path.join(shared, 'unet.bin'), path.join(model, 'unet', 'weights.bin'));
      symlinkSync('weights.bin', path.join(model, 'unet', 'model.onnx_data'));
      await (await ort.InferenceSession.create(graph)).release();
    } finally {
      tmp.cleanup();
    }
  });
});
