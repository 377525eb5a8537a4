/**
 * @module Session-options benchmark (`npm run bench:session`): the runtime's CPU sessions (weights not pre-packed)
 * against ORT's default (pre-packed), side by side in alternating fresh processes of scripts/bench-bare-boot.ts,
 * on the demo pipeline padded to ~300 MB (SD 1.5's split) and, when ../shared/reference is beside the repository, on
 * the tiny real SD 1.x export (real graph topology). Per model and option, medians over BENCH_REPS (default 3):
 *   sessions_ms  all sessions created;   gen_ms  one generation of BENCH_STEPS steps (default 20) after them;
 *   rss_mb       peak RSS of the process.
 * Prints a table, then one JSON line with the ratios (runtime / ORT default; below 1 is better).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { lastJson, median } from './bench-common.js';
import { sharedOrFixture } from './reference.js';
import { buildDemoModel } from '../src/demo/index.js';

const ROOT = process.cwd();
const BARE = path.join(ROOT, 'dist/scripts/bench-bare-boot.js');


function bare(dir: string, steps: number, prepack: boolean): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BARE, dir, '--steps', String(steps), ...(prepack ? ['--prepack'] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.once('exit', (code) => (code === 0 ? resolve(lastJson(out)) : reject(new Error(`bench-bare-boot exited ${code}: ${err.slice(-600)}`))));
  });
}

async function main(): Promise<void> {
  if (!existsSync(BARE)) throw new Error('dist/scripts/bench-bare-boot.js is missing (run `npm run build` from the repository root)');
  const reps = Number(process.env.BENCH_REPS ?? 3);
  const steps = Number(process.env.BENCH_STEPS ?? 20);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-session-'));
  const say = (m: string) => process.stderr.write(`bench: ${m}\n`);
  try {
    const models: Array<[string, string]> = [];
    const padded = await buildDemoModel(path.join(tmp, 'padded'), { padBytes: 300e6 });
    models.push([`demo padded ${(padded.totalBytes / 1e6).toFixed(0)} MB`, padded.dir]);
    const e2e = path.join(sharedOrFixture('e2e'), 'model');
    if (existsSync(path.join(e2e, 'model_index.json'))) models.push(['tiny real SD 1.x export', e2e]);
    else say(`${e2e} not found: the real-topology model is skipped`);

    const rows: string[] = [];
    const result: Record<string, number> = {};
    for (const [name, dir] of models) {
      const runs: Record<'runtime' | 'ort_default', Array<Record<string, unknown>>> = { runtime: [], ort_default: [] };
      for (let i = 0; i < reps; i++) {
        // Alternate, so drift on a shared machine hits both sides alike.
        runs.runtime.push(await bare(dir, steps, false));
        runs.ort_default.push(await bare(dir, steps, true));
        say(`${name}: rep ${i + 1} done`);
      }
      const pick = (side: keyof typeof runs, k: string) => median(runs[side].map((r) => Number(r[k])));
      for (const side of ['runtime', 'ort_default'] as const) {
        rows.push(`${name.padEnd(26)}${side.padEnd(13)}${String(Math.round(pick(side, 'sessionsMs'))).padEnd(13)}${String(Math.round(pick(side, 'warmupMs'))).padEnd(10)}${Math.round(pick(side, 'maxRssMb'))}`);
      }
      const key = name.startsWith('demo') ? 'padded' : 'real_topology';
      result[`${key}_sessions_ratio`] = +(pick('runtime', 'sessionsMs') / pick('ort_default', 'sessionsMs')).toFixed(3);
      result[`${key}_gen_ratio`] = +(pick('runtime', 'warmupMs') / pick('ort_default', 'warmupMs')).toFixed(3);
      result[`${key}_rss_ratio`] = +(pick('runtime', 'maxRssMb') / pick('ort_default', 'maxRssMb')).toFixed(3);
    }
    process.stdout.write(`CPU sessions: runtime (no weight pre-packing) vs ORT default (pre-packing), ${reps} reps, ${steps}-step generation, ${os.cpus().length} cores\n`);
    process.stdout.write(`${'model'.padEnd(26)}${'sessions'.padEnd(13)}${'sessions_ms'.padEnd(13)}${'gen_ms'.padEnd(10)}peak_rss_mb\n${rows.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main().catch((e: unknown) => {
  process.stderr.write(`bench: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
