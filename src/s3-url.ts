/**
 * @module The reading of s3:// URLs and key prefixes, with no dependency of its own: config.ts checks
 * INPUT_URI_PREFIXES with it, storage/uri.ts (STORAGE_URI, output_uri, inputs) builds on it.
 */

// Bucket names as S3 allows them (3-63 chars); S3-compatible stores are looser, so only the charset is enforced.
const BUCKET = /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/;

export interface S3Url {
  readonly bucket: string;
  /** Everything after the bucket's slash, as given ('' when there is none). */
  readonly key: string;
}

/**
 * The one reading of an s3:// URL, for STORAGE_URI, output_uri and the warm-up CLI's push: `s3://bucket[/key]`, the
 * scheme in any case (RFC 3986), the bucket as S3-compatible stores name them. Undefined when `uri` is not one.
 */
export function parseS3Url(uri: string): S3Url | undefined {
  const m = /^s3:\/\/([^/]*)(?:\/([\s\S]*))?$/i.exec(uri);
  if (m === null || !BUCKET.test(m[1]!)) return undefined;
  return { bucket: m[1]!, key: m[2] ?? '' };
}

/**
 * Why an object key may not be matched against a prefix (an s3:// input, an INPUT_URI_PREFIXES entry), or undefined.
 * S3 keys are literal, but an HTTP layer or a store in front of S3 may resolve `a/../b` or decode `%2e%2e`, so the key
 * read would no longer be the key checked: empty, '.' and '..' segments, backslashes and control characters are
 * refused, raw or after percent-decoding (repeated, for double encoding).
 */
export function keyProblem(key: string): string | undefined {
  const forms = keyForms(key);
  for (const [round, k] of forms.entries()) {
    const how = round === 0 ? '' : ' once percent-decoded';
    // eslint-disable-next-line no-control-regex
    if (/[\x00-\x1f\x7f]/.test(k)) return `has a control character${how}`;
    if (k.includes('\\')) return `has a backslash${how}`;
    if (k.split('/').some((s) => s === '' || s === '.' || s === '..')) return `has an empty, '.' or '..' path segment${how}`;
  }
  return forms.length > KEY_DECODES ? 'is percent-encoded too many times' : undefined;
}

/** How many times a key is percent-decoded to see what a store that decodes it would read. */
const KEY_DECODES = 3;

/**
 * A key as given, then as each round of percent-decoding makes it, while it changes (KEY_DECODES rounds; one more form
 * says it changes still). Only ASCII escapes are decoded, and each on its own: a decoder that leaves a malformed
 * escape as it is (`%zz`) still decodes the `%2e%2e` beside it, where decodeURIComponent throws for the whole key;
 * and only ASCII can spell a dot, a slash, a backslash or a control character.
 */
export function keyForms(key: string): string[] {
  const forms = [key];
  for (let round = 0; round <= KEY_DECODES; round++) {
    const k = forms.at(-1)!;
    const next = k.replace(/%([0-7][0-9a-f])/gi, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
    if (next === k) break;
    forms.push(next);
  }
  return forms;
}

/** An INPUT_URI_PREFIXES entry: a whole bucket (`key` ''), a folder (`key` ending in '/'), or a key and its folder. */
export interface S3Prefix {
  readonly bucket: string;
  /** As given after the bucket's slash: '' for the whole bucket. */
  readonly key: string;
  /** As the operator wrote it, for messages. */
  readonly uri: string;
}

/** `s3://bucket`, `s3://bucket/` or `s3://bucket/some/prefix[/]`; a string saying what is wrong otherwise. */
export function parseS3Prefix(uri: string): S3Prefix | string {
  const u = parseS3Url(uri);
  if (u === undefined) return 'must be s3://bucket or s3://bucket/prefix';
  const bare = u.key.endsWith('/') ? u.key.slice(0, -1) : u.key;
  const why = bare === '' ? undefined : keyProblem(bare);
  if (why !== undefined) return `${why}; write the prefix as the keys begin (s3://bucket/inputs/)`;
  return { bucket: u.bucket, key: bare === '' ? '' : u.key, uri };
}
