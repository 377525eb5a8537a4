/**
 * @module Versions of one cache entry. A committed version's files never change while another process leases it: when
 * the objects under a prefix are replaced while pods serve from the entry, the fill writes a new version beside it
 * (unchanged files hard-linked, changed ones fetched) instead of rewriting the one they read.
 *
 *   <cacheDir>/<key>/      version 1, the entry as it always was
 *   <cacheDir>/<key>@2/    version 2, filled beside version 1 while a process leased it
 *   <cacheDir>/<key>@3/    …
 *
 * Each version is an entry of its own (manifest, journal, lock `<name>.lock`, leases `.leases/<name>/`), so eviction,
 * `cache list` and `cache prune` handle it as any other. The current version is the highest-numbered committed one:
 * its manifest's rename is the switch, so a kill leaves the old version current or the new one, never half of one.
 * Only the highest-numbered folder is ever written; a lower one stays as it is until it is removed.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { readManifest, type Manifest } from './cache.js';
import { trackIo } from './pending-io.js';

export interface EntryVersion {
  /** The folder's name under the cache. */
  readonly name: string;
  readonly dir: string;
  /** 1 for `<key>`, n for `<key>@n`. */
  readonly n: number;
}

const SEP = '@';

/** The folder name of version `n` of the entry `key`. */
export const versionName = (key: string, n: number): string => (n === 1 ? key : `${key}${SEP}${n}`);

/** The entry key and version number a folder name stands for (`<key>` is version 1). */
export function parseVersion(name: string): { key: string; n: number } {
  const m = /^(.+)@([1-9]\d*)$/.exec(name);
  return m && Number(m[2]) >= 2 ? { key: m[1]!, n: Number(m[2]) } : { key: name, n: 1 };
}

/**
 * Every version folder of the entry `key` under the cache, oldest first. Never throws. Recorded as pending (the boot's
 * first look at the cache: a stop names it when the volume does not answer).
 */
export async function versionsOf(cacheDir: string, key: string): Promise<EntryVersion[]> {
  const ents = await trackIo('readdir', cacheDir, () => fsp.readdir(cacheDir, { withFileTypes: true })).catch(() => []);
  const out: EntryVersion[] = [];
  for (const e of ents) {
    if (!e.isDirectory() || !e.name.startsWith(key)) continue;
    const v = parseVersion(e.name);
    if (v.key === key) out.push({ name: e.name, dir: path.resolve(cacheDir, e.name), n: v.n });
  }
  return out.sort((a, b) => a.n - b.n);
}

/** The current version of `key`: the highest-numbered committed one, with its manifest. */
export async function currentVersion(cacheDir: string, key: string, versions?: readonly EntryVersion[]): Promise<(EntryVersion & { manifest: Manifest }) | undefined> {
  const vs = versions ?? (await versionsOf(cacheDir, key));
  for (let i = vs.length - 1; i >= 0; i--) {
    const manifest = await readManifest(vs[i]!.dir);
    if (manifest) return { ...vs[i]!, manifest };
  }
  return undefined;
}
