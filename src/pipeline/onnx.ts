/** @module Every onnxruntime-node import lives here: lazy loading, execution-provider choice, dtype-correct feeds. */
import type * as OrtModule from 'onnxruntime-node';
import type { InferenceSession, Tensor } from 'onnxruntime-node';
import { RuntimeError, isRuntimeError } from '../errors.js';
import type { ExecutionProvider } from '../config.js';
import { f16ToF32, f32ToF16 } from './half.js';
import { probeModel } from './probe.js';
import { createWithOptimizedCache, NO_OPTIMIZED_CACHE, type CacheOutcome, type OptimizedCachePolicy, type OptimizeItem } from './ortcache.js';
import { checkCuda, cudaStartFailure, ortBinaryDir } from './cuda.js';
import { loadProviderOptions, providerOptionsStats } from './provider-options.js';
import { missingCudaOnlyKernel, needsCudaError } from './export-info.js';
import path from 'node:path';
import { ortProviders, type SessionProvider } from './provider.js';

type Ort = typeof OrtModule;
let ortPromise: Promise<Ort> | undefined;

/** onnxruntime-node is heavy (native library, ~100 MB): it is imported once, after the server listens. */
export function loadOrt(): Promise<Ort> {
  return (ortPromise ??= (async () => {
    loadProviderOptions(); // before the binding binds ONNX Runtime's API (provider-options.ts)
    return import('onnxruntime-node');
  })());
}

export type TensorType = 'float32' | 'float16' | 'int64' | 'int32';

export interface IoInfo {
  name: string;
  type: TensorType;
  /** Dims as the model declares them: numbers for fixed, strings for symbolic ones. */
  shape: readonly (number | string)[];
}

/** Session metadata as it crosses threads (onnxruntime-node's ValueMetadata, tensors only). */
export interface IoMeta {
  name: string;
  isTensor: true;
  type: string;
  shape: Array<number | string>;
}

export interface SessionFactoryOptions {
  ep: ExecutionProvider;
  intraOpThreads: number;
  deviceId?: number;
  log?: (level: 'info' | 'warn', msg: string, obj?: object) => void;
  /** The provider another factory of this process decided already (the auxiliary threads' sessions follow it). */
  decided?: SessionProvider;
  /** ORT's graph optimisation level for every session (ORT_GRAPH_OPTIMIZATION); default `all`. */
  graphOptimizationLevel?: GraphOptimizationLevel;
  /**
   * Keep ORT's optimised graph next to each model (`<component>/model.<ortVersion>.<provider>.opt.onnx`, see
   * ortcache.ts) and load it with optimisation off on the next start. The runtime passes `auto` with its cache
   * entries' markers: only models in a cache entry it filled from S3; a folder that cannot be written (read-only, low
   * disk) loads the source. Default: off.
   */
  optimizedModelCache?: OptimizedCachePolicy;
}

export type GraphOptimizationLevel = 'disabled' | 'basic' | 'extended' | 'all';

/**
 * The session options every session of the runtime gets (exported so benchmarks build the very same sessions).
 * Level `all`: measured on the padded demo model and the e2e reference model (CPU), `basic`/`extended` created
 * sessions no faster and ran no faster; the optimized-model cache removes the optimisers from later starts anyway.
 */
export function sessionOptions(
  provider: SessionProvider,
  o: { intraOpThreads: number; deviceId?: number; graphOptimizationLevel?: GraphOptimizationLevel },
): InferenceSession.SessionOptions {
  return {
    executionProviders: ortProviders(provider, o.deviceId),
    graphOptimizationLevel: o.graphOptimizationLevel ?? 'all',
    // Fatal only: a session's errors (a failed run, out of memory) reach the caller as the rejection, which the runtime
    // logs as JSON; ONNX Runtime would print each again on stderr, coloured and over two lines, outside the JSON log.
    logSeverityLevel: 4,
    ...(o.intraOpThreads > 0 ? { intraOpNumThreads: o.intraOpThreads } : {}),
    // CPU: no pre-packing of MatMul/Gemm weights. Packing copies every such weight at session creation (1.2 s and
    // +130 MB peak RSS for the 300 MB benchmark model) and bought no run-time speed (npm run bench:session).
    ...(provider === 'cpu' ? { extra: { session: { disable_prepacking: '1' } } } : {}),
    // onnxruntime-node 1.30 passes only deviceId to the CUDA provider (its binding reads no other key); other CUDA
    // provider options come from CUDA_PROVIDER_OPTIONS (provider-options.ts).
  };
}

export interface CreatedSession {
  session: OnnxSession;
  provider: SessionProvider;
  ms: number;
  cache: CacheOutcome;
}

/**
 * Creates sessions with one execution-provider decision per process: the first attempt (the probe, see prestart(),
 * or else the first session) tries CUDA (unless `cpu`), and every later session reuses the outcome, so a missing
 * CUDA costs one failed try.
 */
export class SessionFactory {
  #decision: Promise<SessionProvider> | undefined;
  #fallbackReason: string | undefined;
  /** A failure no provider choice gets past (CUDA_PROVIDER_OPTIONS refused): every later session fails with it. */
  #fatal: RuntimeError | undefined;
  constructor(private readonly opts: SessionFactoryOptions) {
    if (opts.decided) this.#decision = Promise.resolve(opts.decided);
  }

  get fallbackReason(): string | undefined {
    return this.#fallbackReason;
  }

  /**
   * The provider every session of this process gets, deciding it first if no session or probe has (sessions created
   * elsewhere, such as the auxiliary threads', follow it). Throws like create() when EXECUTION_PROVIDER=cuda cannot
   * start CUDA.
   */
  async provider(): Promise<SessionProvider> {
    if (this.opts.ep === 'cpu') return 'cpu';
    if (this.#decision === undefined) await this.prestart();
    if (this.#decision === undefined) await loadOrt(); // prestart gave up only because the import failed: report it
    return this.#usable(await this.#decision!);
  }

  /** The decided provider, unless the decision failed for good (#fatal) or left the CPU where CUDA is required. */
  #usable(provider: SessionProvider): SessionProvider {
    if (this.#fatal) throw this.#fatal;
    if (provider === 'cpu' && this.opts.ep === 'cuda') {
      throw new RuntimeError('PROVIDER', `EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start${this.#fallbackReason ? `: ${this.#fallbackReason}` : ''}`);
    }
    return provider;
  }

  async create(name: string, modelPath: string): Promise<CreatedSession> {
    const ort = await loadOrt();
    if (this.opts.ep === 'cpu') return this.#build(ort, name, modelPath, 'cpu');
    if (this.#decision === undefined && !this.#noCuda()) {
      const made = await this.#decide(name, () => this.#build(ort, name, modelPath, 'cuda'));
      if (made) return made;
    }
    return this.#build(ort, name, modelPath, this.#usable((await this.#decision)!));
  }

  /**
   * A session from a graph held in memory (a LoRA-merged component, lora-merge.ts), its external data files given as
   * buffers. No optimized-model cache: the graph exists only in memory.
   */
  async createFromBytes(name: string, model: Uint8Array, externalData: ReadonlyArray<{ path: string; data: Uint8Array }>): Promise<CreatedSession> {
    const ort = await loadOrt();
    const provider = await this.provider();
    const options: InferenceSession.SessionOptions = {
      ...sessionOptions(provider, {
        intraOpThreads: this.opts.intraOpThreads,
        ...(this.opts.deviceId !== undefined ? { deviceId: this.opts.deviceId } : {}),
        ...(this.opts.graphOptimizationLevel ? { graphOptimizationLevel: this.opts.graphOptimizationLevel } : {}),
      }),
      ...(externalData.length > 0 ? { externalData: [...externalData] } : {}),
    };
    const { s, ms } = await this.#serial(() => ort.InferenceSession.create(model, options));
    return { session: new OnnxSession(name, s), provider, ms, cache: 'skipped' };
  }

  /**
   * Makes the provider decision now, on a one-node probe model (probe.ts) created and run once, unless a session
   * already made it. On CUDA the first session pays for loading the provider and starting the context; the probe
   * pays it while the weights still download, instead of the first component whose files land. Never throws: a
   * failure under EXECUTION_PROVIDER=cuda reaches the first create().
   */
  async prestart(): Promise<void> {
    if (this.opts.ep === 'cpu' || this.#decision !== undefined) return;
    if (this.#noCuda()) return;
    let ort: Ort;
    try {
      ort = await loadOrt();
    } catch {
      return; // the first create() reports it
    }
    if (this.#decision !== undefined) return;
    const options = sessionOptions('cuda', { intraOpThreads: 1, ...(this.opts.deviceId !== undefined ? { deviceId: this.opts.deviceId } : {}) });
    if (this.#decision !== undefined) return;
    await this.#decide('provider probe', async () => {
      const { s } = await this.#serial(() => ort.InferenceSession.create(probeModel(), options));
      try {
        // One run: what the provider loads on a first run (cuBLAS, cuDNN handles) loads now too, and a library missing
        // at that point fails here (a fallback under auto) rather than in the warm-up.
        await s.run({ x: new ort.Tensor('float32', new Float32Array(4), [1, 4]) });
      } finally {
        await s.release();
      }
      return undefined;
    }).catch(() => undefined);
  }

  /**
   * Decides `cpu` without asking ORT when the CUDA provider library is missing, or under `auto` a driver too (asking
   * would only print a red load error, and ORT's exception names no library). Under `cuda` a missing provider library
   * fails the boot with the check's reason; a driver the search did not find is left for ORT to look for.
   */
  #noCuda(): boolean {
    if (this.opts.ep === 'cpu' || this.#decision !== undefined) return false;
    const check = checkCuda();
    if (check.ok || (this.opts.ep === 'cuda' && check.missing !== 'provider')) return false;
    this.#fallbackReason = check.reason;
    this.#decision = Promise.resolve('cpu');
    if (this.opts.ep === 'auto') this.opts.log?.('info', 'execution provider cpu: CUDA is not available', { reason: check.reason });
    return true;
  }

  /** The first CUDA attempt decides for the process; concurrent creations wait for it instead of all probing CUDA. */
  async #decide<T>(name: string, attempt: () => Promise<T>): Promise<T | undefined> {
    let resolveDecision!: (p: SessionProvider) => void;
    this.#decision = new Promise((r) => (resolveDecision = r));
    try {
      const made = await attempt();
      const options = providerOptionsStats();
      if (options && options.applied === 0) {
        // onnxruntime-node was loaded before the module could hook it: the sessions would run without the options.
        throw new RuntimeError('CONFIG', `CUDA_PROVIDER_OPTIONS were not applied (${options.lastError || 'the CUDA provider was appended without them'})`);
      }
      resolveDecision('cuda');
      this.opts.log?.('info', 'execution provider cuda started', { component: name, tf32: process.env.NVIDIA_TF32_OVERRIDE !== '0', ...(options ? { providerOptions: options.options } : {}) });
      return made;
    } catch (err) {
      // A boot reason reaches clients: no install folder, no ORT source locations (cudaStartFailure).
      const failure = cudaStartFailure(String((err as Error)?.message ?? err), this.opts.deviceId ?? 0, ortBinaryDir());
      const reason = failure.reason;
      this.#fallbackReason = reason;
      resolveDecision('cpu');
      // Options ONNX Runtime refused fail the boot under `auto` too: falling back to the CPU would hide a typo.
      if (isRuntimeError(err) && err.code === 'CONFIG') throw (this.#fatal = err);
      // So does a GPU that is not there (GPUS): that worker alone would serve on the CPU, beside the others on GPUs.
      if (failure.config) throw (this.#fatal = new RuntimeError('CONFIG', reason, { cause: err }));
      // ONNX Runtime refused an option (not: the CUDA provider cannot load here, where `auto` falls back as ever).
      if (/^CUDA_PROVIDER_OPTIONS: /.test(reason) && !/Failed to load|Provider not available|not enabled in this build/i.test(reason)) {
        throw (this.#fatal = new RuntimeError('CONFIG', reason, { cause: err }));
      }
      if (this.opts.ep === 'cuda') throw new RuntimeError('PROVIDER', `EXECUTION_PROVIDER=cuda but the CUDA execution provider failed to start: ${reason}`, { cause: err });
      this.opts.log?.('warn', 'execution provider cuda unavailable, falling back to cpu', { reason });
      return undefined;
    }
  }

  /** One session, created in turn (see #serial), with its own time and what the optimized-model cache did. */
  async #build(ort: Ort, name: string, modelPath: string, provider: SessionProvider): Promise<CreatedSession> {
    const { s, ms } = await this.#serial(() => this.#make(ort, modelPath, provider));
    return { session: new OnnxSession(name, s), provider, ms, cache: this.cacheOutcomes[modelPath] ?? 'skipped' };
  }

  #queue: Promise<unknown> = Promise.resolve();
  /**
   * ORT builds a session synchronously on the calling thread, so overlapping creations gain nothing; running them
   * one at a time, in the order asked, makes each reported time that session's own (not the sum of all in flight).
   */
  #serial(fn: () => Promise<InferenceSession>): Promise<{ s: InferenceSession; ms: number }> {
    const run = this.#queue.then(async () => {
      const t0 = performance.now();
      const s = await fn();
      return { s, ms: performance.now() - t0 };
    });
    this.#queue = run.catch(() => undefined);
    return run;
  }

  /** What the optimized-model cache did per model path ('hit', 'deferred', 'declined', 'skipped', 'failed'), for logs and benchmarks. */
  readonly cacheOutcomes: Record<string, CacheOutcome> = {};
  /** Sessions loaded from a source whose optimised copy is worth writing after ready (see optimizer.ts). */
  readonly deferredWrites: OptimizeItem[] = [];

  async #make(ort: Ort, modelPath: string, provider: SessionProvider): Promise<InferenceSession> {
    const options = sessionOptions(provider, {
      intraOpThreads: this.opts.intraOpThreads,
      ...(this.opts.deviceId !== undefined ? { deviceId: this.opts.deviceId } : {}),
      ...(this.opts.graphOptimizationLevel ? { graphOptimizationLevel: this.opts.graphOptimizationLevel } : {}),
    });
    let r: Awaited<ReturnType<typeof createWithOptimizedCache>>;
    try {
      // From a path, not a buffer: ORT resolves model.onnx_data relative to the model file.
      r = await createWithOptimizedCache(ort, modelPath, provider, options, this.opts.log, this.opts.optimizedModelCache ?? NO_OPTIMIZED_CACHE);
    } catch (err) {
      const op = provider === 'cpu' ? missingCudaOnlyKernel(String((err as Error)?.message ?? err)) : undefined;
      if (op) throw needsCudaError(path.basename(path.dirname(modelPath)), [op], 'its graph holds onnxruntime operators fused for CUDA', this.#fallbackReason);
      throw err;
    }
    this.cacheOutcomes[modelPath] = r.cache;
    // Once per file: a session created again (after a reset) must not queue a second write of the same copy.
    if (r.cache === 'deferred' && !this.deferredWrites.some((w) => w.path === modelPath)) this.deferredWrites.push({ path: modelPath, provider, ...(this.opts.deviceId !== undefined ? { deviceId: this.opts.deviceId } : {}) });
    return r.session;
  }
}

/** What the pipeline needs of a session: its declared inputs and outputs, and runs with float32 results. */
export interface ModelSession {
  readonly name: string;
  readonly inputs: ReadonlyMap<string, IoInfo>;
  readonly outputs: ReadonlyMap<string, IoInfo>;
  has(input: string): boolean;
  input(name: string): IoInfo;
  run(feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>>;
  release(): Promise<void>;
}

/** Reads IO metadata the way every session kind reports it (a remote session receives the same lists). */
export function ioInfo(name: string, list: readonly InferenceSession.ValueMetadata[]): Map<string, IoInfo> {
  return new Map(
    list.map((m) => {
      if (!m.isTensor) throw new RuntimeError('MODEL_FORMAT', `${name}: input/output "${m.name}" is not a tensor`);
      const type = m.type as string;
      if (!['float32', 'float16', 'int64', 'int32'].includes(type)) {
        throw new RuntimeError('MODEL_FORMAT', `${name}: "${m.name}" has unsupported type ${type}`);
      }
      return [m.name, { name: m.name, type: type as TensorType, shape: m.shape }];
    }),
  );
}

/** The declared inputs and outputs of a session, local (OnnxSession) or on another thread (RemoteSession). */
export abstract class SessionIo {
  constructor(
    readonly name: string,
    readonly inputs: ReadonlyMap<string, IoInfo>,
    readonly outputs: ReadonlyMap<string, IoInfo>,
  ) {}

  has(input: string): boolean {
    return this.inputs.has(input);
  }

  input(name: string): IoInfo {
    const i = this.inputs.get(name);
    if (!i) throw new RuntimeError('MODEL_FORMAT', `${this.name}: the model has no input "${name}" (it has ${[...this.inputs.keys()].join(', ')})`);
    return i;
  }
}

/** A session plus its declared inputs/outputs; feeds are cast to what the model declares. */
export class OnnxSession extends SessionIo implements ModelSession {
  constructor(
    name: string,
    readonly session: InferenceSession,
  ) {
    super(name, ioInfo(name, session.inputMetadata), ioInfo(name, session.outputMetadata));
  }

  /** Runs with float32/int feeds converted to the declared dtypes; returns float32 outputs (float16 widened). */
  async run(feeds: Record<string, Feed>, outputs?: string[]): Promise<Record<string, { data: Float32Array; dims: readonly number[] }>> {
    const ort = await loadOrt();
    const tensors: Record<string, Tensor> = {};
    for (const [k, f] of Object.entries(feeds)) tensors[k] = toTensor(ort, this.input(k), f);
    const res = await this.session.run(tensors, outputs ?? [...this.outputs.keys()]);
    const out: Record<string, { data: Float32Array; dims: readonly number[] }> = {};
    for (const [k, t] of Object.entries(res)) {
      out[k] = { data: toF32(t), dims: t.dims };
      t.dispose?.();
    }
    return out;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

export interface Feed {
  data: Float32Array | number[] | BigInt64Array | Int32Array;
  dims: readonly number[];
}

function toTensor(ort: Ort, info: IoInfo, f: Feed): Tensor {
  const n = f.dims.reduce((a, b) => a * b, 1);
  if (f.data.length !== n) throw new RuntimeError('INTERNAL', `${info.name}: ${f.data.length} values for dims [${f.dims.join(',')}]`);
  switch (info.type) {
    case 'float32':
      return new ort.Tensor('float32', f.data instanceof Float32Array ? f.data : Float32Array.from(f.data as ArrayLike<number>, Number), f.dims);
    case 'float16':
      return float16Tensor(ort, f32ToF16(f.data instanceof Float32Array ? f.data : Float32Array.from(f.data as ArrayLike<number>, Number)), f.dims);
    case 'int64':
      return new ort.Tensor('int64', f.data instanceof BigInt64Array ? f.data : BigInt64Array.from(f.data as ArrayLike<number>, (v) => BigInt(Math.trunc(Number(v)))), f.dims);
    case 'int32':
      return new ort.Tensor('int32', f.data instanceof Int32Array ? f.data : Int32Array.from(f.data as ArrayLike<number>, (v) => Math.trunc(Number(v))), f.dims);
  }
}

/**
 * A float16 tensor from IEEE binary16 bits that onnxruntime-node can read on every Node. Where the engine has
 * Float16Array (Node >= 24), onnxruntime-common keeps float16 data as a Float16Array view, whose byte length the
 * 1.30 binding reads as 0 ("not enough space: expected N, got 0"; microsoft/onnxruntime#32323): the tensor's
 * `data`, which the binding reads, is then the Uint16Array view of the same bytes.
 */
export function float16Tensor(ort: Ort, bits: Uint16Array, dims: readonly number[]): Tensor {
  const t = new ort.Tensor('float16', bits, dims);
  if (!(t.data instanceof Uint16Array)) Object.defineProperty(t, 'data', { value: bits, enumerable: true });
  return t;
}

/** The binary16 bits of a float16 tensor: its data is a Uint16Array on Node 20, a Float16Array (values) on Node >= 24. */
export function float16Bits(t: Tensor): Uint16Array {
  const d = t.data as Uint16Array | (ArrayBufferView & { readonly length: number });
  return d instanceof Uint16Array ? d : new Uint16Array(d.buffer, d.byteOffset, d.length);
}

function toF32(t: Tensor): Float32Array {
  switch (t.type) {
    case 'float32':
      return t.data as Float32Array;
    case 'float16':
      return f16ToF32(float16Bits(t));
    default:
      return Float32Array.from(t.data as ArrayLike<number | bigint>, Number);
  }
}
