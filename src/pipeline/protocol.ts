/** @module Messages between the main thread (HTTP, queue, metrics) and a pipeline worker thread. */
import type { AuxThreads, EncoderWarmup, ExecutionProvider } from '../config.js';
import type { BrownianQuery } from './types.js';
import type { AdapterSet, Job, ModelDefaults, StageTimes } from './job.js';
import type { Feed, GraphOptimizationLevel, IoMeta } from './onnx.js';
import type { OptimizedCachePolicy, OptimizeItem } from './ortcache.js';
import type { SessionProvider } from './provider.js';
import type { FailedReply, RanReply, ThreadLogMessage } from './thread-replies.js';

export interface WorkerInit {
  ep: ExecutionProvider;
  intraOpThreads: number;
  workerIndex: number;
  optimizedModelCache: OptimizedCachePolicy;
  graphOptimizationLevel?: GraphOptimizationLevel;
  /** The CUDA device this worker's sessions run on (one worker per GPU); absent: device 0. */
  deviceId?: number;
  /**
   * LoRA adapter sets kept per worker (lora-sets.ts): LORA_MAX_SETS, LORA_CACHE_MB in bytes, and this process's folder their
   * merged graphs go to (under MODEL_CACHE_DIR, the file system the model's weights are on, so they can be hard-linked).
   */
  lora?: { maxSets: number; maxBytes: number; workDir: string };
  /** WARMUP_VAE_ENCODER: on CUDA, prime the VAE encoder before ready or after the warm-up (absent: before). */
  vaeEncoderWarmup?: EncoderWarmup;
  /** AUX_THREADS (absent: auto). */
  auxThreads?: AuxThreads;
}

/** An auxiliary session thread of a pipeline worker (aux.ts): the text encoders, the VAE encoder or the VAE decoder. */
export interface AuxInit {
  /** Which of the worker's auxiliary threads this is (for logs). */
  name: string;
  intraOpThreads: number;
  optimizedModelCache: OptimizedCachePolicy;
  graphOptimizationLevel?: GraphOptimizationLevel;
  deviceId?: number;
}

/** What a priming run needs: the served latent size and the VAE's scale; `after` as in ToAux's `create`. */
export interface PrimeSpec {
  latentHeight: number;
  latentWidth: number;
  vaeScale: number;
  after?: 'warm-up';
}

export type ToAux =
  /**
   * `prime`: run the new session once on zeros at this latent size, so its first real run pays no kernel search.
   * `after: 'warm-up'` holds that priming run until the worker says its warm-up has ended (`settle` with `release`),
   * so the path to ready does not wait for it; a run of the session itself at that size before then makes it unneeded.
   */
  | { t: 'create'; id: number; component: string; path: string; provider: SessionProvider; prime?: PrimeSpec }
  | { t: 'run'; id: number; session: number; feeds: Record<string, Feed>; outputs?: string[] }
  | { t: 'release'; id: number; session: number }
  /**
   * Answered once everything asked for before is done, priming runs included (the warm-up's end waits for that);
   * `release`: then queue the priming runs held for the warm-up's end (answered with how many).
   */
  | { t: 'settle'; id: number; release: boolean }
  /**
   * DPM++ SDE's noise for one read of a batch's Brownian motion (brownian.ts), made here while the worker runs the
   * UNet; the thread keeps the motion of the last batch asked for until `forget-noise`.
   */
  | { t: 'noise'; id: number; query: BrownianQuery }
  | { t: 'forget-noise'; id: number }
  | { t: 'close' };

export type FromAux =
  | { t: 'created'; id: number; session: number; inputs: IoMeta[]; outputs: IoMeta[]; ms: number; cache: string; deferred?: OptimizeItem }
  | RanReply
  | { t: 'released'; id: number }
  | { t: 'settled'; id: number; released: number }
  | { t: 'noise'; id: number; z: Float32Array }
  | { t: 'forgot-noise'; id: number }
  | FailedReply
  | ThreadLogMessage;

/** The background optimised-model writer (optimizer.ts, a child process): what to write, and the cache mode. */
export interface OptimizerInit {
  items: OptimizeItem[];
  policy: OptimizedCachePolicy;
}

export type FromOptimizer =
  | { t: 'log'; level: 'info' | 'warn'; msg: string; obj?: Record<string, unknown> }
  /** Files the writer is about to create; removed by the runtime if it has to kill the writer. */
  | { t: 'files'; paths: string[] }
  | { t: 'done'; outcomes: Record<string, string> };

export type ToWorker =
  | { t: 'component'; component: string; path: string }
  /** `listed`: the model's relative file paths while its weights still download (a partial load, see worker.ts). */
  | { t: 'load'; dir: string; listed?: string[] }
  /** Drop every session and tokenizer before the next load (their files changed); queued before that load. */
  | { t: 'reset' }
  /** `adapters`: the LoRA set the job runs with (its key and files); built first if the worker does not hold it. */
  | { t: 'generate'; id: number; job: Job; previewEvery: number; adapters?: AdapterSet }
  /** Build (merge, create sessions of) a LoRA adapter set now, beside the base model's sessions, which keep serving. */
  | { t: 'adapters'; key: string; refs: AdapterSet['refs'] }
  | { t: 'cancel'; id: number }
  /** Go on with `id` after all (a request joined it after its cancel); nothing if it already stopped or ended. */
  | { t: 'resume'; id: number }
  /** Whether `id`'s steps render its previews (preview_every): off while no party of the generation wants them. */
  | { t: 'previews'; id: number; on: boolean }
  | { t: 'close' };

/**
 * Pixels as the worker hands them over (transferred, not copied): RGB, 3 bytes a pixel, row by row. The main thread
 * encodes them (engine.ts), so sharp never loads in the worker and the worker starts its next generation at once.
 */
export interface TransferImage {
  rgb: ArrayBuffer;
  width: number;
  height: number;
}

export type FromWorker =
  /** onnxruntime-node has loaded in the worker. */
  | { t: 'imported'; ms: number; /** torch.randn's path: the native block (avx2, fma, generic) or javascript. */ randn: string }
  /** `cache`: what the optimized-model cache did for this session (ortcache.ts). */
  /** `thread`: where the session runs: `worker` (the pipeline worker's own) or an auxiliary thread's name. */
  | { t: 'session'; component: string; provider: SessionProvider; ms: number; cache: string; thread: string }
  /**
   * `tokenizerDirs`: the model's tokenizer folders in order (tokenizer, tokenizer_2); jobs carry ids from each.
   * `optimize`: sources loaded without an optimised copy that is worth writing in the background after ready.
   */
  | { t: 'loaded'; defaults: ModelDefaults; tokenizerDirs: string[]; providers: Record<string, SessionProvider>; fallbackReason?: string; optimize: OptimizeItem[] }
  /** errno: a CACHE_IO's (EIO, ENOENT…), the cause a boot retry looks at. */
  | { t: 'load-failed'; code: string; message: string; errno?: string }
  /** `previews`: one low-resolution image per job item (its first image), when previews were asked for at this step. */
  | { t: 'progress'; id: number; step: number; of: number; previews?: TransferImage[] }
  /** The generation's UNet steps are done; its VAE decodes run on the decode thread, and the worker takes the next job. */
  | { t: 'denoised'; id: number }
  | { t: 'result'; id: number; images: Array<TransferImage & { seed: number }>; times: StageTimes }
  /**
   * `detail`, for the log (never a client's answer): with OUT_OF_MEMORY, ONNX Runtime's text of the failed allocation;
   * with INTERNAL (a defect), the error's stack.
   */
  | { t: 'error'; id: number; code: string; message: string; detail?: string }
  /** An adapter set is built (`ms`: read, merge, session creation; `bytes`: merged components' size). */
  | { t: 'adapters-ready'; key: string; ms: { read: number; merge: number; sessions: number; total: number }; bytes: number; patchedBytes: number; components: string[]; formats: Record<string, string> }
  /** `detail`: ORT's text of a failure that is not the runtime's own refusal, for the log (never a client's answer). */
  | { t: 'adapters-failed'; key: string; code: string; message: string; detail?: string }
  /** The worker dropped an adapter set (least recently used, over LORA_MAX_SETS or LORA_CACHE_MB). */
  | { t: 'adapters-evicted'; key: string }
  | { t: 'log'; level: 'info' | 'warn' | 'error'; msg: string; obj?: Record<string, unknown> };
