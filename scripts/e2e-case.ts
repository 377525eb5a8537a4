/**
 * @module One diffusers reference case (e2e/cases/<id> of the reference data: test/fixtures/reference or ../shared/reference): what test/e2e.test.ts and
 * scripts/parity-check.ts both read, ask the server for, and compare pixel by pixel.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export interface E2eCase {
  id: string;
  prompt: string;
  negative_prompt: string;
  seed: number;
  steps: number;
  guidance: number;
  height: number;
  width: number;
  num_images_per_prompt: number;
  scheduler: { class: string; config: Record<string, unknown> };
}

export const readCase = (casesDir: string, id: string): E2eCase => JSON.parse(readFileSync(path.join(casesDir, id, 'case.json'), 'utf8')) as E2eCase;

/**
 * Gives a copy of the reference model the case's scheduler, as diffusers built it: its config, and its class in
 * model_index.json too (the class a pipeline loads is the one listed there, as `save_pretrained` writes it).
 */
export function writeCaseScheduler(modelDir: string, c: E2eCase): void {
  writeFileSync(path.join(modelDir, 'scheduler', 'scheduler_config.json'), JSON.stringify({ ...c.scheduler.config, _class_name: c.scheduler.class }, null, 2));
  const indexFile = path.join(modelDir, 'model_index.json');
  if (!existsSync(indexFile)) return;
  const index = JSON.parse(readFileSync(indexFile, 'utf8')) as Record<string, unknown>;
  writeFileSync(indexFile, JSON.stringify({ ...index, scheduler: ['diffusers', c.scheduler.class] }, null, 2));
}

/** The V1 predict body that asks for the case's image. */
export const caseRequest = (c: E2eCase) => ({
  instances: [
    {
      prompt: c.prompt,
      negative_prompt: c.negative_prompt,
      seed: c.seed,
      num_inference_steps: c.steps,
      guidance_scale: c.guidance,
      height: c.height,
      width: c.width,
      num_images_per_prompt: c.num_images_per_prompt,
    },
  ],
});

/** Counts the 8-bit values that differ by one and by more, and the largest difference. */
export function pixelDiff(got: Uint8Array, want: Uint8Array): { values: number; offByOne: number; offByMore: number; maxDiff: number } {
  let offByOne = 0;
  let offByMore = 0;
  let maxDiff = 0;
  for (let i = 0; i < want.length; i++) {
    const d = Math.abs(got[i]! - want[i]!);
    if (d > maxDiff) maxDiff = d;
    if (d === 1) offByOne++;
    else if (d > 1) offByMore++;
  }
  return { values: want.length, offByOne, offByMore, maxDiff };
}
