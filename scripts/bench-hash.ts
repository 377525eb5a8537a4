/**
 * @module The content check's hashing rate (`npm run bench:hash`, i.e. `node dist/scripts/bench-hash.js`): a file of
 * BENCH_MB (default 1024) MB, written once so that it is in the page cache, hashed the ways a download hashes it: as a
 * whole object (one MD5 in order, one thread), and as a multipart upload of 8 MiB parts with 1 thread and with
 * BENCH_THREADS (default: the runtime's, the cores but one, 1 to 4; at least 2 here, to show the parts spread). Each
 * way BENCH_REPEAT (default 3) times, alternating; best of each, and the ratio of the threads to one. The file lives in
 * a temp dir removed at the end.
 */
import { mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Hasher } from '../src/storage/content-check.js';

const MB = 1 << 20;
const size = Number(process.env.BENCH_MB ?? 1024) * MB;
const repeat = Number(process.env.BENCH_REPEAT ?? 3);
const threads = Number(process.env.BENCH_THREADS ?? Math.max(2, Math.min(4, os.availableParallelism() - 1)));
const PART = 8 * MB;

async function main(): Promise<void> {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'bench-hash-'));
  try {
    const file = path.join(tmp, 'model.onnx_data');
    const fh = await fsp.open(file, 'w+');
    const block = Buffer.allocUnsafe(16 * MB);
    for (let i = 0; i < block.length; i += 4) block.writeUInt32LE((i * 2654435761) >>> 0, i);
    for (let at = 0; at < size; at += block.length) await fh.write(block, 0, Math.min(block.length, size - at), at);
    const spans = () => [[0, size] as [number, number]];
    const time = async (name: string, max: number, partSize: number) => {
      const h = new Hasher(max);
      const t0 = performance.now();
      const d = await h.open(fh.fd, size, partSize, spans).digest();
      const s = (performance.now() - t0) / 1000;
      await h.close();
      process.stderr.write(`bench-hash: ${name}: ${s.toFixed(2)} s, ${(size / MB / s).toFixed(0)} MB/s (${d.slice(0, 8)}…)\n`);
      return s;
    };
    const runs: Record<string, number[]> = { whole: [], 'parts, 1 thread': [], [`parts, ${threads} threads`]: [] };
    for (let r = 0; r < repeat; r++) {
      runs.whole!.push(await time('whole', 1, 0));
      runs['parts, 1 thread']!.push(await time('parts, 1 thread', 1, PART));
      runs[`parts, ${threads} threads`]!.push(await time(`parts, ${threads} threads`, threads, PART));
    }
    await fh.close();
    const best = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, Math.min(...v)]));
    const one = best['parts, 1 thread']!;
    const many = best[`parts, ${threads} threads`]!;
    process.stdout.write(`${Object.entries(best).map(([k, s]) => `${k}: ${s.toFixed(2)} s, ${(size / MB / s).toFixed(0)} MB/s`).join('\n')}\n`
      + `parts on ${threads} threads / 1 thread: ${(one / many).toFixed(2)}x (cores: ${os.availableParallelism()})\n`);
    process.stdout.write(`${JSON.stringify({ bench: 'hash', mb: size / MB, threads, cores: os.availableParallelism(), runs, speedup: +(one / many).toFixed(3) })}\n`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main().catch((e: unknown) => {
  process.stderr.write(`bench-hash: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
