/** @module Messages between a pipeline worker and the thread of one adapter set (lora-thread.ts). */
import type { AdapterRef } from './job.js';
import type { GraphOptimizationLevel, Feed, IoMeta } from './onnx.js';
import type { LoraComponent } from './lora-keys.js';
import type { SessionProvider } from './provider.js';
import type { FailedReply, RanReply, ThreadLogMessage } from './thread-replies.js';

export interface LoraInit {
  /** The set's key (for logs). */
  key: string;
  provider: SessionProvider;
  intraOpThreads: number;
  graphOptimizationLevel?: GraphOptimizationLevel;
  deviceId?: number;
  /** This set's own folder for its merged graphs (removed when the thread ends). */
  workDir: string;
  /** LORA_CACHE_MB in bytes: a set whose components are bigger is refused before anything is merged or created. */
  maxBytes?: number;
}

export type ToLora =
  /** `components`: the model's graph files an adapter may touch (model.onnx paths); only those touched are built. */
  | { t: 'build'; id: number; adapters: AdapterRef[]; components: Partial<Record<LoraComponent, string>> }
  | { t: 'run'; id: number; session: number; feeds: Record<string, Feed>; outputs?: string[] }
  | { t: 'close' };

export type FromLora =
  | {
      t: 'built';
      id: number;
      sessions: Array<{ component: LoraComponent; session: number; inputs: IoMeta[]; outputs: IoMeta[]; ms: number; weights: number }>;
      /** Bytes of weights the merge changed, and of the merged components as a whole (what their sessions hold). */
      patchedBytes: number;
      totalBytes: number;
      ms: { read: number; merge: number; sessions: number };
      formats: Record<string, string>;
    }
  | RanReply
  | FailedReply
  | ThreadLogMessage;
