/** @module File-system questions every layer asks, and a removal one call at a time; no dependency of its own. */
import { access, lstat, readdir, rm, rmdir, unlink } from 'node:fs/promises';
import path from 'node:path';

/**
 * Whether `p` exists (a link: what it points at); any error reads as no. Asked without blocking the event loop: the
 * path may be on a volume that stopped answering, and probes and a stop must still run.
 */
export const exists = (p: string): Promise<boolean> => access(p).then(() => true, () => false);

/** `file` relative to `dir` where it is `dir` ('') or lies under it (by path, links not followed); undefined otherwise. */
export function within(dir: string, file: string): string | undefined {
  const rel = path.relative(dir, file);
  return rel.startsWith('..') || path.isAbsolute(rel) ? undefined : rel;
}

/** The one of `items` whose folder (`dirOf`) is the deepest that holds `file` (by path), the first listed of those as deep. */
export function deepestHolding<T>(items: readonly T[], dirOf: (item: T) => string, file: string): T | undefined {
  let best: T | undefined;
  let depth = -1;
  for (const item of items) {
    const dir = path.resolve(dirOf(item));
    const d = dir === path.sep ? 0 : dir.split(path.sep).length;
    if (d > depth && within(dir, file) !== undefined) [best, depth] = [item, d];
  }
  return best;
}

/** Runs a call on a volume when the caller's bound lets it (a place among the pool threads it may hold). */
export type Bound = <T>(call: () => Promise<T>) => Promise<T>;

/** No bound: the call runs at once. */
export const direct: Bound = (call) => call();

/**
 * Deletes `p` and everything under it; nothing there: nothing to do. With `io` (a caller's bound on the pool threads a
 * volume that stops answering keeps), one call at a time, each in it: fs.rm's recursive removal starts every name of a
 * folder at once, and such a volume would hold as many threads as the folder has names. Without, fs.rm's.
 */
export async function removeTree(p: string, io?: Bound): Promise<void> {
  if (io === undefined) return rm(p, { recursive: true, force: true });
  const st = await io(() => lstat(p)).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined;
    throw e;
  });
  if (st === undefined) return;
  if (!st.isDirectory()) {
    await io(() => unlink(p));
    return;
  }
  for (const name of await io(() => readdir(p))) await removeTree(path.join(p, name), io);
  await io(() => rmdir(p));
}
