/**
 * @module Parity against the images diffusers made (the reference e2e cases), on whatever execution provider the
 * environment selects: `node dist/scripts/parity-check.js MODEL_DIR CASES_DIR`. For each case it boots the runtime
 * on a copy of the model with the case's scheduler config, asks for the case's image over HTTP and counts pixel
 * values that differ. The test suite (test/e2e.test.ts) does the same on CPU and fails on any difference above 1;
 * this script only reports, so a CUDA machine can show how close its kernels come.
 */
import { cpSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { freePort, startChild } from './bench-common.js';
import { caseRequest, pixelDiff, readCase, writeCaseScheduler } from './e2e-case.js';

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'src', 'main.js');

async function checkCase(model: string, casesDir: string, id: string): Promise<Record<string, unknown>> {
  const c = readCase(casesDir, id);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'dr-parity-'));
  const copy = path.join(dir, 'model');
  cpSync(model, copy, { recursive: true });
  writeCaseScheduler(copy, c);
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
      body: JSON.stringify(caseRequest(c)),
    });
    const ms = Math.round(performance.now() - t0);
    const j = (await r.json()) as { predictions?: Array<{ image: { b64: string } }>; error?: string };
    if (r.status !== 200 || !j.predictions) return { id, status: r.status, error: j.error ?? 'no predictions' };
    const got = await sharp(Buffer.from(j.predictions[0]!.image.b64, 'base64')).raw().toBuffer();
    const want = await sharp(path.join(casesDir, id, 'image.png')).removeAlpha().raw().toBuffer();
    if (got.length !== want.length) return { id, error: `image is ${got.length} values, the reference ${want.length}` };
    const d = pixelDiff(got, want);
    return { id, providers: JSON.parse(providers) as unknown, values: d.values, off_by_one: d.offByOne, off_by_more: d.offByMore, max_abs_diff: d.maxDiff, predict_ms: ms };
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
