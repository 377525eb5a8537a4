/**
 * @module Which mount a path lies on, read from /proc/self/mountinfo: for the gates on the volumes the adapters are read
 * from (runtime/adapters.ts), one a device. A stat of the path would tell its device too, but on a volume that stopped
 * answering that stat is the very call that hangs; the kernel writes the mount table from what it holds, without a call
 * to any of the volumes mounted.
 */
import { readFileSync } from 'node:fs';
import { deepestHolding } from '../files.js';

export interface Mount {
  /** Where it is mounted. */
  readonly dir: string;
  /** Its device, `major:minor` (stat's dev): two mounts of one file system (a bind mount of a folder of it) share it. */
  readonly dev: string;
}

/** The mounts of a mountinfo table (proc(5)), in its order: a mount over another at the same point comes after it. */
export function parseMountInfo(text: string): Mount[] {
  const out: Mount[] = [];
  for (const line of text.split('\n')) {
    // ID PARENT MAJ:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER-OPTIONS
    const f = line.split(' ');
    if (f.length < 5 || !/^\d+:\d+$/.test(f[2]!)) continue;
    // Spaces, tabs, newlines and backslashes in the point are written as octal escapes (\040).
    out.push({ dir: f[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))), dev: f[2]! });
  }
  return out;
}

/**
 * The mount `file` lies on: the deepest mount point holding it, the last mounted of those at one point (it hides the
 * others). By path: a link on the way to the file is not followed (it is judged by where the link lies).
 */
export function mountOf(mounts: readonly Mount[], file: string): Mount | undefined {
  return deepestHolding([...mounts].reverse(), (m) => m.dir, file);
}

/**
 * This process's mounts, or undefined where there is no /proc/self/mountinfo (not Linux). Read synchronously: procfs
 * answers from the kernel's memory whatever the volumes do, and a read in libuv's pool would wait behind the calls a
 * volume that stopped answering holds there, the very calls the gates keep few.
 */
export function readMounts(file = '/proc/self/mountinfo'): Mount[] | undefined {
  try {
    const mounts = parseMountInfo(readFileSync(file, 'utf8'));
    return mounts.length > 0 ? mounts : undefined;
  } catch {
    return undefined;
  }
}
