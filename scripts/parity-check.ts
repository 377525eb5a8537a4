/**
 * @module Parity against the images diffusers made (../shared/reference/e2e), on whatever execution provider the
 * environment selects: `node dist/scripts/parity-check.js MODEL_DIR CASES_DIR`. For each case it boots the runtime
 * on a copy of the model with the case's scheduler config, asks for the case's image over HTTP and counts pixel
 * values that differ. The test suite (test/e2e.test.ts) does the same on CPU and fails on any difference above 1;
 * this script only reports, so a CUDA machine can show how close its kernels come.
 */
import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { freePort, startChild } from './bench-common.js';

interface Case {
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

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'src', 'main.js');

async function checkCase(model: string, casesDir: string, id: string): Promise<Record<string, unknown>> {
  const c = JSON.parse(readFileSync(path.join(casesDir, id, 'case.json'), 'utf8')) as Case;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'dr-parity-'));
  const copy = path.join(dir, 'model');
  cpSync(model, copy, { recursive: true });
  writeFileSync(path.join(copy, 'scheduler', 'scheduler_config.json'), JSON.stringify({ ...c.scheduler.config, _class_name: c.scheduler.class }));
  const port = await freePort();
  const env = { ...process.env, STORAGE_URI: copy, MODEL_CACHE_DIR: path.join(dir, 'cache'), PORT: String(port), HOST: '127.0.0.1', WARMUP_STEPS: '1', LOG_LEVEL: 'info' };
  const { child, up } = startChild(process.execPath, [MAIN], /"msg":"(model ready|boot failed[^"]*)"/, env);
  try {
    const log = await up;
    const failed = log.split('\n').find((l) => l.includes('"msg":"boot failed'));
    if (failed) return { id, error: (JSON.parse(failed) as { msg: string }).msg };
    const providers = /"providers":(\{[^}]*\})/.exec(log)?.[1] ?? '?';
    const t0 = performance.now();
    const r = await fetch(`http://127.0.0.1:${port}/v1/models/model:predict`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        instances: [{ prompt: c.prompt, negative_prompt: c.negative_prompt, seed: c.seed, num_inference_steps: c.steps, guidance_scale: c.guidance, height: c.height, width: c.width, num_images_per_prompt: c.num_images_per_prompt }],
      }),
    });
    const ms = Math.round(performance.now() - t0);
    const j = (await r.json()) as { predictions?: Array<{ image: { b64: string } }>; error?: string };
    if (r.status !== 200 || !j.predictions) return { id, status: r.status, error: j.error ?? 'no predictions' };
    const got = await sharp(Buffer.from(j.predictions[0]!.image.b64, 'base64')).raw().toBuffer();
    const want = await sharp(path.join(casesDir, id, 'image.png')).removeAlpha().raw().toBuffer();
    if (got.length !== want.length) return { id, error: `image is ${got.length} values, the reference ${want.length}` };
    let off1 = 0;
    let worse = 0;
    let maxDiff = 0;
    for (let i = 0; i < want.length; i++) {
      const d = Math.abs(got[i]! - want[i]!);
      if (d > maxDiff) maxDiff = d;
      if (d === 1) off1++;
      else if (d > 1) worse++;
    }
    return { id, providers: JSON.parse(providers) as unknown, values: want.length, off_by_one: off1, off_by_more: worse, max_abs_diff: maxDiff, predict_ms: ms };
  } finally {
    child.kill('SIGTERM');
    await new Promise((res) => (child.exitCode !== null ? res(null) : child.once('exit', res)));
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<number> {
  const [model, casesDir] = process.argv.slice(2);
  if (!model || !casesDir) {
    process.stderr.write('usage: parity-check.js MODEL_DIR CASES_DIR   (EXECUTION_PROVIDER picks the provider)\n');
    return 2;
  }
  for (const id of readdirSync(casesDir).sort()) {
    try {
      process.stdout.write(`${JSON.stringify(await checkCase(model, casesDir, id))}\n`);
    } catch (err) {
      process.stdout.write(`${JSON.stringify({ id, error: (err as Error).message.slice(0, 400) })}\n`);
    }
  }
  return 0;
}

process.exitCode = await main();
