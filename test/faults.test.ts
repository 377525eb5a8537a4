/**
 * The fault suite, bounded for CI (the long soak is `npm run bench:faults`, docs/FAULTS.md): a 28 MB, 19-file model
 * (the demo pipeline padded) in s3rver behind a flaky link (test/helpers/fault-link.ts: resets and stalls at random
 * offsets of the bodies, bursts of 503 SlowDown and 500 InternalError), fetched by the warm-up CLI and by the server.
 * What must hold: every run that exits 0 left the source's SHA-256 in every file; a kill -9 at a random moment never
 * leaves a committed entry with a missing or short file, and the re-run keeps >= 90% of the bytes that were on disk;
 * after SIGTERM the re-run fetches at most 10% of the model beyond what was missing. Disk state is measured from the
 * files themselves (test/helpers/fault-suite.ts), not from the journal under test.
 */
import { existsSync, promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WRITE_BYTES } from '../src/storage/fetch.js';
import { type FaultLink, type LinkFaults, rng, startFaultLink } from './helpers/fault-link.js';
import { bytesOnDisk, demoSource, entryIn, entryProblems, runWarmup, type SourceFile } from './helpers/fault-suite.js';
import { CREDS, destroyS3, s3Env, settledCount, type S3Server, startS3, putFolder } from './helpers/s3.js';
import { startServer } from './helpers/server.js';

const CLI = path.resolve('dist/warmup/main.js');
const PREFIX = 'faults/sd/';
const MiB = 1 << 20;
const FAULTS: LinkFaults = { resetP: 0.2, stallP: 0.06, burstP: 0.04, burstMax: 4 };
/** The same, with one reset past 1 MiB into a range made sure of (random cuts missed it with some seeds and timings). */
const DEEP: LinkFaults = { ...FAULTS, deepCutPast: MiB };
/** Printed with every failure: a run can be looked at again with the same random stream. */
const SEED = Number(process.env.FAULT_SEED ?? Math.floor(Math.random() * 2 ** 31));

let s3: S3Server;
let link: FaultLink;
let tmp: string;
let srcDir: string;
let source: SourceFile[];
let total: number;

const env = (cache: string, extra: Record<string, string> = {}) => s3Env(link.endpoint, cache, {
  STORAGE_URI: `s3://models/${PREFIX}`, S3_PART_SIZE: String(2 * MiB), S3_MAX_CONCURRENCY: '8', S3_STALL_TIMEOUT_S: '0.5', ...extra,
});
/** Runs alternate between the S3 transports: the opt-in SDK-free one on even runs, the AWS SDK (the default) on odd. */
const via = (i: number) => ({ S3_TRANSPORT: i % 2 ? 'sdk' : 'lite' });
const mb = (n: number) => (n / 1e6).toFixed(2);

beforeAll(async () => {
  tmp = await fsp.mkdtemp(path.join(os.tmpdir(), 'faults-'));
  srcDir = path.join(tmp, 'src');
  ({ source, total } = await demoSource(srcDir, 20e6));
  s3 = await startS3(['models']);
  await putFolder(s3, 'models', PREFIX, srcDir, source.map((f) => f.rel));
  link = await startFaultLink(s3.port, { seed: SEED });
}, 120_000);

afterAll(async () => {
  await link?.close();
  if (s3) await destroyS3(s3);
  await fsp.rm(tmp, { recursive: true, force: true });
});

describe(`fault suite (FAULT_SEED=${SEED})`, () => {
  it('has a model like the soak\'s, smaller: at least 15 files (19 today), tens of MB', () => {
    expect(source.length).toBeGreaterThanOrEqual(15);
    expect(total).toBeGreaterThan(20e6);
  });

  it('warm-ups through resets, stalls (past 1 MiB into ranges too), 500/503 bursts and a damaged byte exit 0 with the source\'s SHA-256 (s3-lite and the SDK)', async () => {
    const before = { ...link.stats, cutOffsets: link.stats.cutOffsets.length };
    for (let i = 0; i < 4; i++) {
      link.reseed(SEED + i);
      // A faults object of its own each run: each run meets its own flipped byte.
      link.faults = { ...DEEP, flipPast: 0 };
      const cache = path.join(tmp, `w${i}`);
      const r = await runWarmup(CLI, { ...env(cache), ...via(i), LOG_LEVEL: 'error' });
      link.faults = undefined;
      expect(r.code, `run ${i}: ${r.stderr.slice(-600)}`).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ bytes: total, files: source.length, fromCache: false });
      expect(await entryProblems(entryIn(cache)!, source), `run ${i}`).toEqual([]);
    }
    // The link really was flaky, in the ways the issue lists.
    const cuts = link.stats.cutOffsets.slice(before.cutOffsets);
    expect(link.stats.resets - before.resets).toBeGreaterThan(0);
    expect(link.stats.stalls - before.stalls).toBeGreaterThan(0);
    expect(link.stats.slowDowns - before.slowDowns + link.stats.internalErrors - before.internalErrors).toBeGreaterThan(0);
    expect(cuts.filter((o) => o > MiB).length).toBeGreaterThan(0);
    expect(link.stats.flips - before.flips).toBe(4);
  }, 120_000);

  it('kill -9 at random moments: nothing committed is ever short, and each re-run keeps >= 90% of the bytes on disk', async () => {
    // The kills fall at random points of the download counted in the model's bytes sent, not in time: under load a
    // moment measured on an idle machine fell before much was on disk. The pace lets a kill land close to its point.
    link.pace = { connBps: 0, totalBps: 30e6 };
    const rows: Array<{ at: number; onDisk: number; kept: number; committed: boolean }> = [];
    const random = rng(SEED + 100);
    for (let i = 0; i < 5; i++) {
      const cache = path.join(tmp, `k${i}`);
      const at = 0.05 + 0.9 * random();
      link.reseed(SEED + 100 + i);
      link.faults = FAULTS;
      const start = link.stats.bodyBytes;
      await runWarmup(CLI, { ...env(cache), ...via(i) }, { killWhen: () => link.stats.bodyBytes - start >= at * total });
      link.faults = undefined;
      const entry = entryIn(cache);
      let onDisk = 0;
      let committed = false;
      if (entry) {
        // Committed or not, the entry never claims what is not there.
        committed = existsSync(path.join(entry, '.complete.json'));
        if (committed) expect(await entryProblems(entry, source), `kill ${i}`).toEqual([]);
        onDisk = await bytesOnDisk(entry, srcDir, source);
      }
      link.pace = { connBps: 0, totalBps: 0 };
      const mid = await settledCount(() => link.stats.bodyBytes);
      // Fault-free: a stall there is only the machine's load, and the bytes its retry fetched again were never lost.
      const again = await runWarmup(CLI, { ...env(cache), S3_STALL_TIMEOUT_S: '30', LOG_LEVEL: 'error' });
      link.pace = { connBps: 0, totalBps: 30e6 };
      expect(again.code, again.stderr.slice(-600)).toBe(0);
      expect(await entryProblems(entryIn(cache)!, source)).toEqual([]);
      rows.push({ at, onDisk, kept: total - (link.stats.bodyBytes - mid), committed });
    }
    link.pace = { connBps: 0, totalBps: 0 };
    const report = rows.map((r) => `kill at ${(r.at * 100).toFixed(0)}%: ${mb(r.onDisk)} MB on disk${r.committed ? ' (committed)' : ''}, re-run kept ${mb(r.kept)} MB`).join('\n');
    for (const r of rows) {
      expect(r.kept, report).toBeGreaterThanOrEqual(0.9 * r.onDisk);
      // Never more lost than a write torn by the kill per range in flight (in practice: none, see storage-resume.test.ts).
      expect(r.onDisk - r.kept, report).toBeLessThanOrEqual(8 * WRITE_BYTES);
    }
    expect(Math.max(...rows.map((r) => r.onDisk)), report).toBeGreaterThan(0);
  }, 120_000);

  it('SIGTERM during the download: the re-run fetches at most 10% of the model beyond what was missing', async () => {
    for (let i = 0; i < 2; i++) {
      const cache = path.join(tmp, `t${i}`);
      link.pace = { connBps: 0, totalBps: 30e6 };
      const start = link.stats.bodyBytes;
      const at = [0.3, 0.7][i]!;
      const stopped = await runWarmup(CLI, env(cache), { killSignal: 'SIGTERM', killWhen: () => link.stats.bodyBytes - start >= at * total });
      link.pace = { connBps: 0, totalBps: 0 };
      expect(stopped.code).toBe(143);
      const missing = total - (await bytesOnDisk(entryIn(cache)!, srcDir, source));
      const mid = await settledCount(() => link.stats.bodyBytes);
      const again = await runWarmup(CLI, { ...env(cache), LOG_LEVEL: 'error' });
      expect(again.code, again.stderr.slice(-600)).toBe(0);
      expect(await entryProblems(entryIn(cache)!, source)).toEqual([]);
      const refetched = link.stats.bodyBytes - mid;
      expect(refetched - missing, `stopped at ${at * 100}%: ${mb(missing)} MB missing, ${mb(refetched)} MB fetched again`).toBeLessThanOrEqual(0.1 * total);
    }
  }, 60_000);

  it('a server boot from s3:// through the same faults becomes ready on the source\'s bytes', async () => {
    const cache = path.join(tmp, 'boot');
    link.reseed(SEED + 1000);
    link.faults = FAULTS;
    const srv = await startServer({ ...CREDS, ...env(cache), EXECUTION_PROVIDER: 'cpu', LOG_LEVEL: 'info' }, { ready: true, timeoutMs: 90_000 });
    try {
      const res = await fetch(`${srv.url}/v2/health/ready`);
      expect(res.status).toBe(200);
    } finally {
      link.faults = undefined;
      await srv.stop('SIGTERM');
    }
    expect(await entryProblems(entryIn(cache)!, source)).toEqual([]);
  }, 120_000);
});
