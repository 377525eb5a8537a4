/**
 * @module The fault soak (`npm run bench:faults`, i.e. `node dist/scripts/bench-faults.js`); the bounded suite is
 * test/faults.test.ts, method and results in docs/FAULTS.md. Fixture: the demo pipeline padded to ~108 MB in 19 files
 * (a model the server really loads), in s3rver (its own process) behind a seeded flaky link in this process
 * (test/helpers/fault-link.ts: resets and stalls at random offsets of the bodies, so past 1 MiB into 2 MiB ranges
 * about half the time; bursts of 503 SlowDown and 500 InternalError). Every process is fresh (`node dist/...`).
 *   baseline     warm-ups on a fault-free, unpaced link: time and bytes, the ratio's denominator
 *   warm-ups     warm-ups through the faults: exit 0 and every file's SHA-256 equal to the source's
 *   boots        servers with STORAGE_URI=s3:// through the faults: ready, and the entry equal to the source
 *   kill -9      a warm-up on a paced link killed at a random moment (every third cycle: killed twice, the second
 *                time while resuming), then a fault-free re-run: an entry committed at the kill must be whole; bytes
 *                on disk at the kill (compared with the source, not read from the journal) against bytes the
 *                re-run did not fetch again
 *   SIGTERM      the same with SIGTERM: bytes fetched again beyond those missing at the stop
 * Prints a table, then one JSON line. Bounded: BENCH_WARMUPS (50), BENCH_BOOTS (10), BENCH_KILLS (100),
 * BENCH_TERMS (10), BENCH_BASELINE (3), BENCH_PAD_BYTES (100e6), BENCH_SEED (random), BENCH_DEADLINE_S (3600: later
 * phases are skipped, and say so, once it has passed), BENCH_PACE_MBPS (60: the link of the kill cycles), BENCH_FLIPS (1:
 * each warm-up also meets one body with a byte flipped, which the content check must catch; 0: none).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { childS3rver, envNumber, freePort, S3RVER_CREDS, startChild } from './bench-common.js';
import { type FaultLink, type LinkFaults, rng, startFaultLink } from '../test/helpers/fault-link.js';
import { bytesOnDisk, demoSource, entryIn, entryProblems, percentiles, runWarmup, type SourceFile } from '../test/helpers/fault-suite.js';

const SELF = fileURLToPath(import.meta.url);
const ROOT = process.cwd();
const CLI = path.join(ROOT, 'dist/warmup/main.js');
const SERVER = path.join(ROOT, 'dist/src/main.js');
const BUCKET = 'models';
const PREFIX = 'soak/sd/';
const MiB = 1 << 20;
const FAULTS: LinkFaults = { resetP: 0.15, stallP: 0.04, burstP: 0.03, burstMax: 5 };
const n = envNumber;
const COUNTS = { baseline: n('BENCH_BASELINE', 3), warmups: n('BENCH_WARMUPS', 50), boots: n('BENCH_BOOTS', 10), kills: n('BENCH_KILLS', 100), terms: n('BENCH_TERMS', 10) };
const SEED = n('BENCH_SEED', Math.floor(Math.random() * 2 ** 31));
const DEADLINE = Date.now() + n('BENCH_DEADLINE_S', 3600) * 1000;
const PACE = n('BENCH_PACE_MBPS', 60) * 1e6;
const FLIPS = n('BENCH_FLIPS', 1) > 0;
const mb = (x: number) => +(x / 1e6).toFixed(2);
const pct = (x: number) => +(x * 100).toFixed(1);
const median = (xs: number[]) => percentiles(xs, [0.5])[0]!;

interface Ctx {
  tmp: string;
  srcDir: string;
  source: SourceFile[];
  total: number;
  link: FaultLink;
}

const env = (c: Ctx, cache: string, extra: Record<string, string> = {}): Record<string, string> => ({
  ...S3RVER_CREDS, AWS_ENDPOINT_URL: c.link.endpoint, S3_USE_HTTPS: '0', MODEL_CACHE_DIR: cache, LOG_LEVEL: 'error',
  STORAGE_URI: `s3://${BUCKET}/${PREFIX}`, S3_PART_SIZE: String(2 * MiB), S3_MAX_CONCURRENCY: '16', S3_STALL_TIMEOUT_S: '1', ...extra,
});
/** Every other run through the AWS SDK (the default transport), the others through the opt-in SDK-free one. */
const sdkIf = (_c: Ctx, on: boolean): Record<string, string> => ({ S3_TRANSPORT: on ? 'sdk' : 'lite' });
const overdue = () => Date.now() > DEADLINE;

/** Runs `fn` `count` times unless the deadline passed; returns how many ran. */
async function loop(count: number, fn: (i: number) => Promise<void>): Promise<number> {
  let i = 0;
  for (; i < count && !overdue(); i++) await fn(i);
  return i;
}

async function baseline(c: Ctx) {
  const rows: Array<{ s: number; wire: number }> = [];
  await loop(COUNTS.baseline, async (i) => {
    const cache = path.join(c.tmp, `base${i}`);
    const before = c.link.stats.bodyBytes;
    const r = await runWarmup(CLI, env(c, cache, sdkIf(c, i % 2 === 1)));
    if (r.code !== 0) throw new Error(`baseline run ${i} failed: ${r.stderr.slice(-400)}`);
    rows.push({ s: r.ms / 1000, wire: c.link.stats.bodyBytes - before });
    rmSync(cache, { recursive: true, force: true });
  });
  return { runs: rows.length, medianS: median(rows.map((r) => r.s)), wireBytes: median(rows.map((r) => r.wire)) };
}

async function warmups(c: Ctx) {
  const rows: Array<{ s: number; wire: number; ok: boolean; why?: string }> = [];
  const s0 = { ...c.link.stats, cuts: c.link.stats.cutOffsets.length };
  await loop(COUNTS.warmups, async (i) => {
    const cache = path.join(c.tmp, `warm${i}`);
    c.link.reseed(SEED + i);
    // A faults object of its own per run: each run meets its own flipped byte.
    c.link.faults = FLIPS ? { ...FAULTS, flipPast: 0 } : FAULTS;
    const before = c.link.stats.bodyBytes;
    const r = await runWarmup(CLI, env(c, cache, sdkIf(c, i % 2 === 1)), { timeoutMs: 300_000 });
    c.link.faults = undefined;
    const entry = entryIn(cache);
    const problems = r.code === 0 && entry ? await entryProblems(entry, c.source) : [`exit ${r.code}: ${r.stderr.trim().split('\n').at(-1)}`];
    rows.push({ s: r.ms / 1000, wire: c.link.stats.bodyBytes - before, ok: problems.length === 0, ...(problems.length ? { why: problems.join('; ') } : {}) });
    rmSync(cache, { recursive: true, force: true });
  });
  const cuts = c.link.stats.cutOffsets.slice(s0.cuts);
  return {
    runs: rows.length, failures: rows.filter((r) => !r.ok).length, failed: rows.filter((r) => !r.ok).map((r) => r.why),
    medianS: median(rows.map((r) => r.s)), maxS: Math.max(...rows.map((r) => r.s)), medianWireBytes: median(rows.map((r) => r.wire)),
    extraBytes: rows.reduce((s, r) => s + r.wire, 0) - rows.length * c.total,
    resets: c.link.stats.resets - s0.resets, stalls: c.link.stats.stalls - s0.stalls, cutsPast1MiB: cuts.filter((o) => o > MiB).length,
    slowDowns: c.link.stats.slowDowns - s0.slowDowns, internalErrors: c.link.stats.internalErrors - s0.internalErrors,
    flips: c.link.stats.flips - s0.flips,
  };
}

/** A server from s3:// through the faults, polled until ready (or failed); then SIGTERM. */
async function boot(c: Ctx, cache: string, i: number): Promise<{ ok: boolean; s: number; why?: string }> {
  const port = await freePort();
  const t0 = performance.now();
  const child = spawn(process.execPath, [SERVER], {
    env: { PATH: process.env.PATH ?? '', ...env(c, cache, { ...sdkIf(c, i % 2 === 1), EXECUTION_PROVIDER: 'cpu', PORT: String(port), HOST: '127.0.0.1', LOG_LEVEL: 'warn' }) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let why: string | undefined;
  let ready = false;
  const end = performance.now() + 300_000;
  while (!ready && why === undefined) {
    if (child.exitCode !== null) why = `exited ${child.exitCode}`;
    else if (performance.now() > end) why = 'not ready within 300 s';
    else {
      ready = await fetch(`http://127.0.0.1:${port}/v2/health/ready`).then((r) => r.status === 200, () => false);
      if (!ready) {
        const st = await fetch(`http://127.0.0.1:${port}/v1/models/model`).then((r) => r.json() as Promise<{ state?: string; reason?: string }>, () => undefined);
        if (st?.state === 'failed') why = `boot failed: ${st.reason}`;
        else await new Promise((r) => setTimeout(r, 100));
      }
    }
  }
  const s = (performance.now() - t0) / 1000;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
  if (ready) {
    const entry = entryIn(cache);
    const problems = entry ? await entryProblems(entry, c.source) : ['no cache entry'];
    if (problems.length) why = problems.join('; ');
  }
  return { ok: ready && why === undefined, s, ...(why ? { why: `${why} ${out.slice(-300)}` } : {}) };
}

async function boots(c: Ctx) {
  const rows: Array<{ ok: boolean; s: number; why?: string }> = [];
  await loop(COUNTS.boots, async (i) => {
    const cache = path.join(c.tmp, `boot${i}`);
    c.link.reseed(SEED + 10_000 + i);
    c.link.faults = FAULTS;
    rows.push(await boot(c, cache, i));
    c.link.faults = undefined;
    rmSync(cache, { recursive: true, force: true });
  });
  return { runs: rows.length, failures: rows.filter((r) => !r.ok).length, failed: rows.filter((r) => !r.ok).map((r) => r.why), medianReadyS: median(rows.map((r) => r.s)) };
}

/** How long a download on the paced link lasts, first byte to exit (the kills' time scale). */
async function pacedLength(c: Ctx): Promise<number> {
  c.link.pace = { connBps: 0, totalBps: PACE };
  const cache = path.join(c.tmp, 'paced');
  const start = c.link.stats.bodyBytes;
  let first = 0;
  const r = await runWarmup(CLI, env(c, cache), { killWhen: () => ((first ||= c.link.stats.bodyBytes > start ? performance.now() : 0), false) });
  const ms = performance.now() - first;
  rmSync(cache, { recursive: true, force: true });
  if (r.code !== 0) throw new Error(`paced run failed: ${r.stderr.slice(-400)}`);
  return ms;
}

/** A run on the paced link, stopped by `signal` at `at` (0..1) of `length` after its first byte; faults on. */
async function stopAt(c: Ctx, cache: string, at: number, length: number, signal: NodeJS.Signals, extra: Record<string, string>) {
  c.link.pace = { connBps: 0, totalBps: PACE };
  c.link.faults = FAULTS;
  const start = c.link.stats.bodyBytes;
  let first = 0;
  let stoppedAt = 0;
  const r = await runWarmup(CLI, env(c, cache, extra), {
    killSignal: signal,
    killWhen: () => {
      if (first === 0 && c.link.stats.bodyBytes > start) first = performance.now();
      return first > 0 && performance.now() - first >= at * length;
    },
    onKill: () => (stoppedAt = c.link.stats.bodyBytes - start),
  });
  c.link.faults = undefined;
  c.link.pace = { connBps: 0, totalBps: 0 };
  return { r, delivered: stoppedAt };
}

/**
 * A fault-free, unpaced re-run: the bytes it fetched, and whether it left the source's bytes. Nothing stalls on its
 * link: with the soak's 1 s stall timeout a busy machine alone made it give ranges up and read them again, bytes it
 * counted as lost to the kill (soak 6), so it waits as long as test/faults.test.ts's re-run does.
 */
async function rerun(c: Ctx, cache: string) {
  const before = c.link.stats.bodyBytes;
  const r = await runWarmup(CLI, env(c, cache, { S3_STALL_TIMEOUT_S: '30' }));
  const entry = entryIn(cache);
  const problems = r.code === 0 && entry ? await entryProblems(entry, c.source) : [`exit ${r.code}: ${r.stderr.trim().split('\n').at(-1)}`];
  return { fetched: c.link.stats.bodyBytes - before, problems };
}

async function kills(c: Ctx, length: number) {
  const random = rng(SEED + 20_000);
  const rows: Array<{ at: number; twice: boolean; committed: boolean; onDisk: number; kept: number; ratio: number; badCommit: string[]; rerunProblems: string[] }> = [];
  await loop(COUNTS.kills, async (i) => {
    const cache = path.join(c.tmp, `kill${i}`);
    const twice = i % 3 === 2;
    let at = 0.02 + 0.96 * random();
    c.link.reseed(SEED + 20_000 + i);
    if (twice) {
      // A first kill, then the resume killed too: what a crash-looping pod does.
      await stopAt(c, cache, 0.02 + 0.5 * random(), length, 'SIGKILL', sdkIf(c, i % 2 === 1));
      at = 0.02 + 0.96 * random();
    }
    await stopAt(c, cache, at, length, 'SIGKILL', sdkIf(c, i % 2 === 1));
    const entry = entryIn(cache);
    const committed = entry !== undefined && existsSync(path.join(entry, '.complete.json'));
    const badCommit = committed ? await entryProblems(entry!, c.source) : [];
    const onDisk = entry ? await bytesOnDisk(entry, c.srcDir, c.source) : 0;
    const again = await rerun(c, cache);
    const kept = c.total - again.fetched;
    rows.push({ at, twice, committed, onDisk, kept, ratio: onDisk > 0 ? kept / onDisk : 1, badCommit, rerunProblems: again.problems });
    rmSync(cache, { recursive: true, force: true });
  });
  const ratios = rows.map((r) => r.ratio);
  const lost = rows.map((r) => r.onDisk - r.kept);
  return {
    cycles: rows.length, killedTwice: rows.filter((r) => r.twice).length, committedAtKill: rows.filter((r) => r.committed).length,
    badCommits: rows.filter((r) => r.badCommit.length > 0).length, rerunFailures: rows.filter((r) => r.rerunProblems.length > 0).length,
    keptRatioPercentiles: Object.fromEntries(['min', 'p10', 'p50', 'p90', 'max'].map((k, j) => [k, pct(percentiles(ratios)[j]!)])),
    below90: rows.filter((r) => r.ratio < 0.9).map((r) => ({ at: pct(r.at), onDiskMB: mb(r.onDisk), keptMB: mb(r.kept) })),
    onDiskMBPercentiles: percentiles(rows.map((r) => r.onDisk)).map(mb),
    lostMBPercentiles: percentiles(lost).map(mb),
    /** On disk at the kill, fetched again by the re-run: what the resume wasted. */
    lostMB: mb(lost.reduce((a, b) => a + b, 0)),
    cyclesLosingBytes: lost.filter((x) => x > 0).length,
    refetchedMB: mb(rows.reduce((s, r) => s + c.total - r.kept, 0)),
  };
}

async function terms(c: Ctx, length: number) {
  const random = rng(SEED + 30_000);
  const rows: Array<{ at: number; code: number | null; delivered: number; missing: number; fetched: number; extra: number; problems: string[] }> = [];
  await loop(COUNTS.terms, async (i) => {
    const cache = path.join(c.tmp, `term${i}`);
    const at = 0.05 + 0.9 * random();
    c.link.reseed(SEED + 30_000 + i);
    const { r, delivered } = await stopAt(c, cache, at, length, 'SIGTERM', sdkIf(c, i % 2 === 1));
    const entry = entryIn(cache);
    const missing = c.total - (entry ? await bytesOnDisk(entry, c.srcDir, c.source) : 0);
    const again = await rerun(c, cache);
    rows.push({ at, code: r.code, delivered, missing, fetched: again.fetched, extra: again.fetched - missing, problems: again.problems });
    rmSync(cache, { recursive: true, force: true });
  });
  return {
    cycles: rows.length, exit143: rows.filter((r) => r.code === 143).length, rerunFailures: rows.filter((r) => r.problems.length > 0).length,
    maxExtraPercentOfModel: pct(Math.max(...rows.map((r) => r.extra)) / c.total),
    extraMB: rows.map((r) => mb(r.extra)),
    // What a resume fetched again of what had already crossed the link before the stop (socket buffers, bytes in memory).
    refetchedOfDeliveredPercent: rows.map((r) => pct(Math.max(0, r.fetched - (c.total - r.delivered)) / c.total)),
  };
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-faults-'));
  const s3d = startChild(process.execPath, [SELF, 's3rver', path.join(tmp, 's3rver')], /PORT \d+/);
  let link: FaultLink | undefined;
  try {
    const t0 = Date.now();
    const srcDir = path.join(tmp, 'src');
    const { source, total } = await demoSource(srcDir, n('BENCH_PAD_BYTES', 100e6));
    const port = Number(/PORT (\d+)/.exec(await s3d.up)![1]);
    const client = new S3Client({ endpoint: `http://127.0.0.1:${port}`, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } });
    for (const f of source) await client.send(new PutObjectCommand({ Bucket: BUCKET, Key: PREFIX + f.rel, Body: await fsp.readFile(path.join(srcDir, f.rel)) }));
    client.destroy();
    link = await startFaultLink(port, { seed: SEED });
    const c: Ctx = { tmp, srcDir, source, total, link };
    process.stderr.write(`bench-faults: model ${mb(c.total)} MB in ${source.length} files, seed ${SEED}, deadline ${n('BENCH_DEADLINE_S', 3600)} s\n`);
    const phase = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
      const p0 = Date.now();
      const r = await fn();
      process.stderr.write(`bench-faults: ${name} done in ${((Date.now() - p0) / 1000).toFixed(0)} s: ${JSON.stringify(r)}\n`);
      return r;
    };
    const base = await phase('baseline', () => baseline(c));
    const warm = await phase('warm-ups', () => warmups(c));
    const boot = await phase('boots', () => boots(c));
    const length = overdue() ? 0 : await pacedLength(c);
    const kill = await phase('kill -9', () => kills(c, length));
    const term = await phase('SIGTERM', () => terms(c, length));
    const lines = [
      `model ${mb(c.total)} MB, ${source.length} files; seed ${SEED}; ${((Date.now() - t0) / 60_000).toFixed(1)} min; cores ${os.cpus().length}`,
      `baseline (no faults)  ${base.runs} runs, median ${base.medianS.toFixed(2)} s, ${mb(base.wireBytes)} MB on the wire`,
      `warm-ups (faults)     ${warm.runs} runs, ${warm.failures} failures, median ${warm.medianS.toFixed(2)} s (x${(warm.medianS / base.medianS).toFixed(2)} of baseline), `
        + `wire/model ${(warm.medianWireBytes / c.total).toFixed(3)}; ${warm.resets} resets (${warm.cutsPast1MiB} cuts past 1 MiB), ${warm.stalls} stalls, ${warm.slowDowns} SlowDown, ${warm.internalErrors} InternalError, ${warm.flips} flipped bytes`,
      `boots from s3://      ${boot.runs} runs, ${boot.failures} failures, median ready ${boot.medianReadyS.toFixed(1)} s`,
      `kill -9 + re-run      ${kill.cycles} cycles (${kill.killedTwice} killed twice), ${kill.badCommits} committed entries short or missing a file, ${kill.rerunFailures} re-run failures; `
        + `kept/on-disk % ${JSON.stringify(kill.keptRatioPercentiles)}; ${kill.below90.length} below 90%; re-fetched ${kill.refetchedMB} MB in all, `
        + `of which ${kill.lostMB} MB had been on disk (${kill.cyclesLosingBytes} cycles)`,
      `SIGTERM + re-run      ${term.cycles} cycles, ${term.exit143} exited 143, ${term.rerunFailures} re-run failures; fetched again beyond what was missing: max ${term.maxExtraPercentOfModel}% of the model; `
        + `beyond what had crossed the link before the stop: max ${Math.max(...term.refetchedOfDeliveredPercent)}%`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify({ bench: 'faults', seed: SEED, modelBytes: c.total, files: source.length, counts: COUNTS, baseline: base, warmups: warm, boots: boot, kill, sigterm: term, deadlineHit: overdue() })}\n`);
    const failed = warm.failures + boot.failures + kill.badCommits + kill.rerunFailures + term.rerunFailures;
    if (failed > 0) process.exitCode = 1;
  } finally {
    await link?.close();
    s3d.child.kill('SIGKILL');
    rmSync(tmp, { recursive: true, force: true });
  }
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 's3rver') await childS3rver(args[0]!, BUCKET);
else await main();
