/**
 * @module The reference data (diffusers, torch and CLIP outputs) kept in the repository under
 * test/fixtures/reference, large files gzip-compressed. `referenceDir()` unpacks it once into
 * .cache/reference-<content hash>/ and returns that folder, laid out like ../shared/reference.
 * `node dist/scripts/reference.js [SUB]` prints the folder (or SUB inside it) for shell scripts.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';

/** The package root: scripts/reference.ts and dist/scripts/reference.js both sit below it. */
function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string };
      if (pkg.name === 'diffusers-runtime') return dir;
    } catch {
      /* not here */
    }
    dir = path.dirname(dir);
  }
  throw new Error('reference: package root (package.json of diffusers-runtime) not found above this file');
}

export const ROOT = packageRoot();
export const FIXTURES = path.join(ROOT, 'test', 'fixtures', 'reference');

function files(dir: string, rel = ''): string[] {
  return readdirSync(path.join(dir, rel), { withFileTypes: true })
    .sort((a, b) => (a.name < b.name ? -1 : 1))
    .flatMap((e) => (e.isDirectory() ? files(dir, path.join(rel, e.name)) : [path.join(rel, e.name)]));
}

let unpacked: string | undefined;

/** The in-repository reference data, unpacked (once per content) into .cache/; safe when several processes race. */
export function referenceDir(): string {
  if (unpacked) return unpacked;
  if (!existsSync(FIXTURES)) throw new Error(`reference data missing: ${FIXTURES} (a partial checkout?)`);
  const list = files(FIXTURES);
  const hash = createHash('sha256');
  for (const f of list) hash.update(f).update('\0').update(readFileSync(path.join(FIXTURES, f)));
  const cacheRoot = path.join(ROOT, '.cache');
  const dest = path.join(cacheRoot, `reference-${hash.digest('hex').slice(0, 16)}`);
  if (!existsSync(dest)) {
    const tmp = path.join(cacheRoot, `.reference-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      for (const f of list) {
        const data = readFileSync(path.join(FIXTURES, f));
        const out = path.join(tmp, f.endsWith('.gz') ? f.slice(0, -3) : f);
        mkdirSync(path.dirname(out), { recursive: true });
        writeFileSync(out, f.endsWith('.gz') ? gunzipSync(data) : data);
      }
      // A directory rename is atomic: readers see a whole folder or none. Another process may have won the race.
      renameSync(tmp, dest);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      if (!existsSync(dest)) throw err;
    }
  }
  return (unpacked = dest);
}

/**
 * For scripts: `../shared/reference/<sub>` when the shared folder is beside the repository (its original), else the
 * in-repository copy.
 */
export function sharedOrFixture(sub: string): string {
  const shared = path.resolve(ROOT, '..', 'shared', 'reference', sub);
  if (existsSync(shared) && statSync(shared).isDirectory()) return shared;
  return path.join(referenceDir(), sub);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.stdout.write(`${path.join(referenceDir(), process.argv[2] ?? '')}\n`);
}

/** A float32 little-endian C-order .npy (what the reference scripts write) as a Float32Array. */
export function readNpyF32(file: string): Float32Array {
  const buf = readFileSync(file);
  if (buf.toString('latin1', 0, 6) !== '\x93NUMPY') throw new Error(`${file}: not a .npy file`);
  // Format 1.x has a 2-byte header length; 2.x and 3.x a 4-byte one.
  const [lenBytes, headerLen] = buf[6] === 1 ? [2, buf.readUInt16LE(8)] : [4, buf.readUInt32LE(8)];
  const start = 8 + lenBytes;
  const header = buf.subarray(start, start + headerLen).toString('latin1');
  if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) throw new Error(`${file}: not C-order float32`);
  const body = buf.subarray(start + headerLen);
  return new Float32Array(body.buffer.slice(body.byteOffset, body.byteOffset + body.byteLength));
}
