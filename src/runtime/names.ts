/** @module Request-time checks that need pipeline knowledge but not ONNX Runtime (safe on the main thread). */
import { createScheduler } from '../pipeline/schedulers/index.js';
import { randomSeed as torchRandomSeed } from '../pipeline/random.js';

/** Validates a per-request scheduler name exactly as the pipeline will build it; throws a 400 listing the known names. */
export function checkSchedulerName(name: string): string {
  createScheduler({ _class_name: 'PNDMScheduler', skip_prk_steps: true }, 10, { name });
  return name;
}

export const randomSeed = (): number => torchRandomSeed();
