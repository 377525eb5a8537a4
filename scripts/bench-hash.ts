/**
 * @module The content check's hashing rate (`npm run bench:hash`, i.e. `node dist/scripts/bench-hash.js`): a file of
 * BENCH_MB (default 1024) MB, written once so that it is in the page cache, hashed the ways a download hashes it: as a
 * whole object (one MD5 in order, one thread), as a multipart upload of 8 MiB parts, and by a whole-object CRC64NVME
 * checksum (pieces combined), each of the last two with 1 thread and with BENCH_THREADS (default: the runtime's, the
 * cores but one, 1 to 4; at least 2 here, to show the work spread). Each way BENCH_REPEAT (default 3) times,
 * alternating; best of each, and the ratios of the threads to one. The file lives in a temp dir removed at the end.
 */
import { mkdtempSync, promises as fsp, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Algorithm } from '../src/storage/checksums.js';
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
    const time = async (name: string, max: number, alg: Algorithm, partSize: number) => {
      const h = new Hasher(max);
      const t0 = performance.now();
      const d = (await h.open(fh.fd, size, { alg, partSize }, spans).digest()).toString('hex');
      const s = (performance.now() - t0) / 1000;
      await h.close();
      process.stderr.write(`bench-hash: ${name}: ${s.toFixed(2)} s, ${(size / MB / s).toFixed(0)} MB/s (${d.slice(0, 8)}…)\n`);
      return s;
    };
    const ways: Array<[string, number, Algorithm, number]> = [
      ['whole', 1, 'md5', 0], ['parts, 1 thread', 1, 'md5', PART], [`parts, ${threads} threads`, threads, 'md5', PART],
      ['crc64nvme, 1 thread', 1, 'crc64nvme', 0], [`crc64nvme, ${threads} threads`, threads, 'crc64nvme', 0],
    ];
    const runs: Record<string, number[]> = Object.fromEntries(ways.map(([name]) => [name, []]));
    for (let r = 0; r < repeat; r++) for (const [name, max, alg, partSize] of ways) runs[name]!.push(await time(name, max, alg, partSize));
    await fh.close();
    const best = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, Math.min(...v)]));
    const speedup = (what: string) => +(best[`${what}, 1 thread`]! / best[`${what}, ${threads} threads`]!).toFixed(3);
    process.stdout.write(`${Object.entries(best).map(([k, s]) => `${k}: ${s.toFixed(2)} s, ${(size / MB / s).toFixed(0)} MB/s`).join('\n')}\n`
      + `parts on ${threads} threads / 1 thread: ${speedup('parts').toFixed(2)}x; crc64nvme: ${speedup('crc64nvme').toFixed(2)}x (cores: ${os.availableParallelism()})\n`);
    process.stdout.write(`${JSON.stringify({ bench: 'hash', mb: size / MB, threads, cores: os.availableParallelism(), runs, speedup: speedup('parts'), crcSpeedup: speedup('crc64nvme') })}\n`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main().catch((e: unknown) => {
  process.stderr.write(`bench-hash: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
