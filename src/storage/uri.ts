/** @module STORAGE_URI parsing, cache keys, and the containment check for every path under the cache. */
import { createHash } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { maskUri, maskUserInfo } from '../config.js';
import { RuntimeError } from '../errors.js';
import { parseS3Url, type S3Prefix, type S3Url } from '../s3-url.js';
import { BOOKKEEPING, PARTIAL } from './cache.js';

export type StorageSource =
  | { readonly kind: 'local'; readonly path: string }
  | { readonly kind: 's3'; readonly bucket: string; /** '' or ends with '/' */ readonly prefix: string; readonly uri: string };

export { keyForms, keyProblem, parseS3Prefix, parseS3Url, type S3Prefix, type S3Url } from '../s3-url.js';

/** An s3:// URL that names one object: a bucket and a non-empty key (an input image, an output_uri). */
export function parseS3Object(uri: string): S3Url | undefined {
  const u = parseS3Url(uri);
  return u && u.key !== '' ? u : undefined;
}

/**
 * Whether `loc` lies under `p`: the same bucket (exact: S3 names are case-sensitive), and a key under the folder
 * `inputs/`, or for `inputs` that key itself or one under `inputs/` (never `inputs-private/a.png`). Keys are taken as
 * given; callers refuse unsafe ones first (keyProblem).
 */
export function underS3Prefix(loc: S3Url, p: S3Prefix): boolean {
  if (loc.bucket !== p.bucket) return false;
  if (p.key === '' || p.key.endsWith('/')) return loc.key.startsWith(p.key);
  return loc.key === p.key || loc.key.startsWith(`${p.key}/`);
}


/**
 * `s3://bucket/prefix`, `file:///abs/path`, or a plain path. Anything else is an INVALID_INPUT error that says what is
 * accepted, naming the URI as `name` (the variable or argument it came from).
 */
export function parseStorageUri(uri: string, name = 'STORAGE_URI'): StorageSource {
  const u = uri.trim();
  if (u === '') throw new RuntimeError('INVALID_INPUT', `${name} is empty; use s3://bucket/prefix, file:///path or a local path`);
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(u)?.[1]?.toLowerCase();
  // `s3:/bucket/prefix` or `s3:bucket/prefix` would be read as a local folder named "s3:", and found missing.
  if (scheme === undefined && /^s3:/i.test(u)) throw new RuntimeError('INVALID_INPUT', `${name} starts with "s3:" but not "s3://"; write s3://bucket/prefix`);
  if (scheme === undefined) return { kind: 'local', path: path.resolve(u) };
  // Messages reach logs and clients (the boot reason, a LORA_URI 400): never with the URI's user info.
  const shown = JSON.stringify(maskUri(u));
  if (scheme === 'file') {
    try {
      return { kind: 'local', path: path.resolve(fileURLToPath(u)) };
    } catch {
      throw new RuntimeError('INVALID_INPUT', `${name} ${shown} is not a valid file:// URL; use file:///absolute/path`);
    }
  }
  if (scheme === 'pvc') {
    throw new RuntimeError('INVALID_INPUT',
      `${name} ${shown}: pvc:// is mounted by KServe at /mnt/models; set STORAGE_URI to the mounted path (e.g. /mnt/models/<sub-path>) instead`);
  }
  if (scheme === 's3') {
    if (maskUserInfo(u) !== u) {
      throw new RuntimeError('INVALID_INPUT',
        `${name} ${shown} carries credentials; use s3://bucket/prefix and give the keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the storage Secret)`);
    }
    // A query string is no part of an S3 prefix (KServe's storage initializer drops it): most often a presigned URL's
    // signature or session token, which would otherwise become the prefix and reach the boot reason and the cache's
    // folder name.
    if (u.includes('?')) {
      throw new RuntimeError('INVALID_INPUT',
        `${name} ${shown} has a query string ('?'); use s3://bucket/prefix and give the keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (the storage Secret)`);
    }
    const s3 = parseS3Url(u);
    if (s3 === undefined) throw new RuntimeError('INVALID_INPUT', `${name} ${shown} has no valid bucket name; use s3://bucket/prefix`);
    const { bucket } = s3;
    let prefix = s3.key.replace(/^\/+/, '');
    if (prefix !== '' && !prefix.endsWith('/')) prefix += '/';
    if (prefix.split('/').slice(0, -1).some((s) => s === '' || s === '.' || s === '..')) {
      throw new RuntimeError('INVALID_INPUT', `${name} ${shown} has an empty, '.' or '..' path segment`);
    }
    return { kind: 's3', bucket, prefix, uri: `s3://${bucket}/${prefix}` };
  }
  throw new RuntimeError('INVALID_INPUT',
    `${name} scheme "${scheme}://" is not supported; use s3://bucket/prefix, file:///path or a local path (gs://, https:// and hf:// are not handled by this runtime)`);
}

/** A directory name for the cache entry of a source: readable, sanitised, with a hash suffix so distinct URIs never collide. */
export function cacheKey(src: Extract<StorageSource, { kind: 's3' }>, endpoint: string | undefined): string {
  const id = `${endpoint ?? 'aws'}|${src.bucket}|${src.prefix}`;
  const hash = createHash('sha256').update(id).digest('hex').slice(0, 16);
  const readable = `${src.bucket}-${src.prefix}`.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[-.]+|[-.]+$/g, '').slice(0, 80);
  return `s3-${readable || 'root'}-${hash}`;
}

/**
 * Resolves a relative path under a root and refuses anything that would leave it: `..`, absolute paths,
 * empty or '.' segments, NUL bytes, and our own reserved names (`*.partial`, dot-files of the cache).
 */
export function containedPath(root: string, rel: string): string {
  const bad = (why: string): never => {
    throw new RuntimeError('INVALID_INPUT', `object key ${JSON.stringify(rel)} refused: ${why}`);
  };
  if (rel === '') bad('empty');
  if (rel.includes('\0')) bad('contains a NUL byte');
  if (rel.includes('\\')) bad('contains a backslash');
  if (path.isAbsolute(rel) || rel.startsWith('/')) bad('absolute path');
  const segs = rel.split('/');
  if (segs.some((s) => s === '')) bad('empty path segment');
  if (segs.some((s) => s === '.' || s === '..')) bad("'.' or '..' segment would leave the cache directory");
  if (segs.some((s) => s.endsWith(PARTIAL) || BOOKKEEPING.includes(s))) bad('uses a name reserved by the cache');
  const base = path.resolve(root);
  const p = path.resolve(base, rel);
  if (!p.startsWith(base + path.sep)) bad('leaves the cache directory');
  return p;
}
