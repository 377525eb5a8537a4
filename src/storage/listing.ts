/** @module Checks a listing before anything of it touches the cache: every key inside the prefix, storable, once. */
import path from 'node:path';
import { RuntimeError } from '../errors.js';
import { PARTIAL } from './cache.js';
import type { RemoteObject } from './transport.js';
import { showKey } from './s3-compat.js';
import { containedPath } from './uri.js';

/** Bytes in one file name (NAME_MAX of Linux filesystems); a file is '<name>.partial' while it downloads. */
export const NAME_MAX = 255;
/** Bytes in a path passed to the kernel (PATH_MAX, with its NUL). */
export const PATH_MAX = 4096;

/**
 * Refuses a listing the cache cannot hold as it is: a key outside `prefix` (the store answered another request),
 * a key that leaves the entry or uses a reserved name (containedPath), a name longer than the filesystem allows,
 * a key listed twice, and a key that is also a folder of other keys. Messages name the key, never a local path.
 */
export function checkListing(listing: readonly RemoteObject[], bucket: string, prefix: string, entry: string): void {
  const where = `s3://${bucket}/${prefix}`;
  const rels = new Set<string>();
  for (const o of listing) {
    if (!o.key.startsWith(prefix) || o.rel !== o.key.slice(prefix.length)) {
      throw new RuntimeError('STORAGE_KEY_OUTSIDE_PREFIX',
        `the listing of ${where} returned the key ${showKey(o.key)}, which is outside that prefix; the store or a proxy in front of it answered another request`);
    }
    containedPath(entry, o.rel);
    for (const seg of o.rel.split('/')) {
      const bytes = Buffer.byteLength(seg);
      if (bytes + PARTIAL.length > NAME_MAX) {
        throw new RuntimeError('STORAGE_KEY_TOO_LONG',
          `object key ${showKey(o.key)} cannot be cached: its name ${showKey(seg)} has ${bytes} bytes, and the cache stores names of up to ${NAME_MAX - PARTIAL.length} bytes; rename the object`);
      }
    }
    if (Buffer.byteLength(path.join(entry, o.rel) + PARTIAL) >= PATH_MAX) {
      throw new RuntimeError('STORAGE_KEY_TOO_LONG',
        `object key ${showKey(o.key)} cannot be cached: with the cache directory its path would exceed ${PATH_MAX - 1} bytes; shorten the key or MODEL_CACHE_DIR`);
    }
    if (rels.has(o.rel)) {
      throw new RuntimeError('STORAGE_KEY_DUPLICATE', `the listing of ${where} names the key ${showKey(o.key)} more than once; the store returned an inconsistent listing, try again`);
    }
    rels.add(o.rel);
  }
  for (const rel of rels) {
    for (let i = rel.indexOf('/'); i > 0; i = rel.indexOf('/', i + 1)) {
      if (rels.has(rel.slice(0, i))) {
        throw new RuntimeError('STORAGE_KEY_DUPLICATE',
          `under ${where}, ${showKey(prefix + rel.slice(0, i))} is an object and also a folder of ${showKey(prefix + rel)}; a file and a folder cannot share a name in the cache`);
      }
    }
  }
}
