/**
 * @module How the answers of S3-compatible stores are read alike, whichever transport reads them: listed keys decoded
 * only where the store says it encoded them, ETags quoted, listings that cannot be paged refused, ranged answers checked
 * against the range asked for. docs/DESIGN.md ("S3-compatible stores") names the store behind each case. Light on
 * purpose (the SDK-free transport imports it before the boot has loaded anything else).
 */
import { RuntimeError } from '../errors.js';
import type { RemoteObject } from './transport.js';

/** A key as messages show it: quoted, and shortened in the middle when long. */
export const showKey = (k: string) => JSON.stringify(k.length > 120 ? `${k.slice(0, 70)}…${k.slice(-40)}` : k);

/**
 * A key of a listing asked for with `encoding-type=url`, as the store sent it: url-decoded (form encoding, a '+' is a
 * space, as AWS S3 and MinIO encode) only when the page says `<EncodingType>url</EncodingType>`. A store that ignores
 * the parameter sends raw keys and says nothing, and its keys are used as they are: never decoded twice.
 */
function listedKey(key: string, urlEncoded: boolean): string {
  if (!urlEncoded) return key;
  try {
    return decodeURIComponent(key.replace(/\+/g, ' '));
  } catch {
    throw new RuntimeError('STORAGE_UNSUPPORTED',
      `the store said it url-encoded the listed key ${showKey(key)} (EncodingType url), but it is not valid url encoding; the store answers ListObjectsV2's encoding-type=url wrongly`);
  }
}

/**
 * An ETag as S3 writes it: quoted. NetApp ONTAP and some Ceph RGW versions list ETags without their quotes while
 * their GETs send them quoted (RFC 9110); quoting the listed one makes both compare equal and If-Match well formed.
 */
function quotedEtag(etag: string): string {
  return etag === '' || etag.startsWith('"') || etag.startsWith('W/') ? etag : `"${etag}"`;
}

/** Whether two ETags name the same version, however each was quoted. */
export const sameEtag = (a: string, b: string): boolean => a.replace(/^"(.*)"$/, '$1') === b.replace(/^"(.*)"$/, '$1');

/**
 * One listing page's objects as the cache lists them, appended to `out`: keys decoded where the store encoded them,
 * folder markers (keys ending in '/') skipped, ETags quoted, paths relative to `prefix`. Both transports list so.
 * A size that is no byte count (missing, negative, fractional, past 2^53) is refused: the download plans its ranges,
 * and an empty file needs no GET at all, from it.
 */
export function addListed(out: RemoteObject[], objects: Iterable<{ key: string; size: number; etag: string }>, urlEncoded: boolean, prefix: string): void {
  for (const o of objects) {
    const key = listedKey(o.key, urlEncoded);
    if (key.endsWith('/')) continue;
    if (!Number.isSafeInteger(o.size) || o.size < 0) {
      throw new RuntimeError('STORAGE_UNSUPPORTED',
        `the listing gave the object ${showKey(key)} ${Number.isNaN(o.size) ? 'no readable size' : `the size ${o.size}`}, which is not a byte count; `
        + 'the store, or a proxy in front of it, answers ListObjectsV2 wrongly');
    }
    out.push({ key, rel: key.slice(prefix.length), size: o.size, etag: quotedEtag(o.etag) });
  }
}

/** The name of the error a listing's 200 answer gets when it is no ListBucketResult (s3-errors.ts names the endpoint). */
export const NOT_A_LISTING = 'NotAnS3Listing';

/**
 * A 200 answer to ListObjectsV2 that carries none of a ListBucketResult's fields (the SDK's parser reads a web page, a
 * MinIO console's say, as an empty page): not the store's answer, where listing it would say the prefix is empty.
 */
export function notAListing(status: number | undefined): Error {
  return Object.assign(new Error('the answer to the listing is no S3 ListBucketResult'), { name: NOT_A_LISTING, $metadata: { httpStatusCode: status ?? 200 } });
}

/** A whole listing in path order, as the cache's manifest and journal compare it. */
export function sortListing(out: RemoteObject[]): RemoteObject[] {
  return out.sort((a, b) => (a.rel < b.rel ? -1 : a.rel > b.rel ? 1 : 0));
}

/** Pages one listing may take: 10 million keys at S3's 1000 a page, far past any model. */
const MAX_PAGES = 10_000;

/**
 * The continuation token of the next page, or undefined after the last. Refuses what would end a listing early or
 * never: a page marked truncated without a NextContinuationToken (Ceph RGW releases that answer ListObjectsV2 as
 * ListObjects, Huawei OBS), and a token the store gave before (a store or proxy that drops continuation-token).
 */
export function nextToken(where: string, truncated: boolean, token: string | undefined, seen: Set<string>): string | undefined {
  if (!truncated) return undefined;
  if (token === undefined || token === '') {
    throw new RuntimeError('STORAGE_UNSUPPORTED',
      `the listing of ${where} is truncated but the store sent no NextContinuationToken, so the rest cannot be asked for: the store does not implement ListObjectsV2 paging (older Ceph RGW, Huawei OBS); upgrade it, or keep the prefix under the store's page size (1000 objects)`);
  }
  if (seen.has(token) || seen.size >= MAX_PAGES) {
    throw new RuntimeError('STORAGE_UNSUPPORTED',
      `the listing of ${where} did not advance: the store sent a continuation token it had sent before (it, or a proxy in front of it, ignores continuation-token)`);
  }
  seen.add(token);
  return token;
}

/**
 * Checks a GET's answer against the range asked for (`asked`, inclusive; undefined for the whole object) before any
 * byte of it is written. 'changed': Content-Range gives another size than the listing (the object was replaced).
 * Throws STORAGE_UNSUPPORTED for a 200 to a ranged GET (the whole object, from its first byte: a proxy that drops
 * Range, or GCS serving a gzip-encoded object decompressed, which ignores Range) and for a 206 of another range.
 */
export function checkRangeAnswer(ans: { status?: number | undefined; contentRange?: string }, asked: { start: number; end: number } | undefined,
  size: number, where: string): 'ok' | 'changed' {
  if (asked === undefined) return 'ok';
  if (ans.status === 200) {
    throw new RuntimeError('STORAGE_UNSUPPORTED',
      `${where}: the store answered a GET of bytes ${asked.start}-${asked.end} with the whole object (HTTP 200, not 206): it, or a proxy in front of it, ignores Range headers, `
      + 'which the parallel download needs. Google Cloud Storage does so for objects stored with Content-Encoding: gzip (it decompresses them as it serves them): '
      + 'upload the model files without Content-Encoding. Otherwise point AWS_ENDPOINT_URL at the store itself, not at a proxy that drops Range');
  }
  if (ans.contentRange === undefined) return 'ok'; // some proxies drop it from a 206; the length is checked by the reader
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(ans.contentRange.trim());
  if (m !== null && m[3] !== '*' && Number(m[3]) !== size) return 'changed';
  if (m === null || Number(m[1]) !== asked.start || Number(m[2]) !== asked.end) {
    throw new RuntimeError('STORAGE_UNSUPPORTED',
      `${where}: the store answered a GET of bytes ${asked.start}-${asked.end} with Content-Range ${JSON.stringify(ans.contentRange.slice(0, 80))}, another range than asked; `
      + 'nothing of it was written. A proxy or cache in front of the store answers ranges wrongly: point AWS_ENDPOINT_URL at the store itself');
  }
  return 'ok';
}
