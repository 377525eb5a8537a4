/** @module File-system questions every layer asks, with no dependency of its own. */
import { access } from 'node:fs/promises';
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
