/**
 * @module A look at the cache without the AWS SDK: the committed entry of an S3 STORAGE_URI, if its files are all
 * on disk. The runtime starts sessions from it while S3 is asked whether it is still current.
 */
import type { Config } from '../config.js';
import { manifestFilesPresent, readManifest, type Manifest } from './cache.js';
import { cacheKey, containedPath, parseStorageUri } from './uri.js';

export interface CommittedEntry {
  dir: string;
  manifest: Manifest;
}

/** The committed entry for `uri` (an s3:// URI) with every file present, or undefined. Never throws. */
export async function peekCommitted(uri: string, cfg: Pick<Config, 'cacheDir' | 's3'>): Promise<CommittedEntry | undefined> {
  try {
    const src = parseStorageUri(uri);
    if (src.kind !== 's3') return undefined;
    const dir = containedPath(cfg.cacheDir, cacheKey(src, cfg.s3.endpoint));
    const manifest = await readManifest(dir);
    if (manifest === undefined || manifest.uri !== src.uri) return undefined;
    // Keys were contained when the entry was written; check again, the manifest is only a file on a shared volume.
    for (const f of manifest.files) containedPath(dir, f.path);
    return (await manifestFilesPresent(dir, manifest)) ? { dir, manifest } : undefined;
  } catch {
    return undefined;
  }
}

/** True when two manifests describe the same committed content (same write, same objects). */
export function sameCommit(a: Manifest, b: Manifest): boolean {
  return a.completedAt === b.completedAt && JSON.stringify(a.files) === JSON.stringify(b.files);
}
