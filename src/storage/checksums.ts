/**
 * @module What a downloaded file's content must hash to, and the hashes themselves: an MD5 ETag, or one of S3's
 * additional checksums (CRC64NVME, which S3 adds to every object uploaded without one since 2025; CRC32, CRC32C, SHA-1,
 * SHA-256, which SDKs send). A checksum is of the whole object (FULL_OBJECT), or of its parts' checksums (COMPOSITE,
 * `<base64>-<parts>`, as a multipart ETag is of its parts' MD5s). Unlike an ETag it is the same under SSE-KMS. The CRCs
 * are plain JavaScript, in a string that the hashing threads (content-check.ts) and this module both run.
 */
import { createHash } from 'node:crypto';
import zlib from 'node:zlib';

export type Algorithm = 'md5' | 'crc32' | 'crc32c' | 'crc64nvme' | 'sha1' | 'sha256';

/** What a file's content must hash to. */
export interface Expected {
  readonly alg: Algorithm;
  /** The digest as the store wrote it: lower-case hex for an ETag, base64 for a checksum; no `-parts`. */
  readonly value: string;
  /** 0: the digest of the whole content; n: the digest of its n parts' digests (a multipart ETag, a COMPOSITE checksum). */
  readonly parts: number;
  readonly source: 'ETag' | 'checksum';
}

/** The bytes of each algorithm's digest. */
export const DIGEST_BYTES: Readonly<Record<Algorithm, number>> = { md5: 16, crc32: 4, crc32c: 4, crc64nvme: 8, sha1: 20, sha256: 32 };

const NAMES: Readonly<Record<Algorithm, string>> = { md5: 'MD5', crc32: 'CRC32', crc32c: 'CRC32C', crc64nvme: 'CRC64NVME', sha1: 'SHA1', sha256: 'SHA256' };

/** A digest as `e` writes one: hex or base64, `-parts` where composite. */
export const formatDigest = (e: Pick<Expected, 'source' | 'parts'>, raw: Buffer) =>
  `${raw.toString(e.source === 'ETag' ? 'hex' : 'base64')}${e.parts > 0 ? `-${e.parts}` : ''}`;

/** `e`'s digest as the store wrote it, `-parts` included. */
export const expectedDigest = (e: Expected) => `${e.value}${e.parts > 0 ? `-${e.parts}` : ''}`;

/** How messages name what a file was checked against: `ETag (MD5 …)`, `checksum (CRC64NVME …)`. */
export const describeExpected = (e: Expected, digest = expectedDigest(e)) => `${NAMES[e.alg]} ${digest}`;

/** S3 allows at most this many parts. */
const MAX_PARTS = 10_000;

/** The MD5 an ETag names, or undefined where it names none (a weak ETag, a store's own scheme). */
export function md5Etag(etag: string): Expected | undefined {
  const m = /^"?([0-9a-fA-F]{32})(?:-(\d{1,5}))?"?$/.exec(etag);
  if (m === null) return undefined;
  const parts = m[2] === undefined ? 0 : Number(m[2]);
  if (m[2] !== undefined && (parts < 1 || parts > MAX_PARTS)) return undefined;
  return { alg: 'md5', value: m[1]!.toLowerCase(), parts, source: 'ETag' };
}

/** The checksum headers of a HEAD with `x-amz-checksum-mode: ENABLED`, by algorithm, in the order preferred. */
export const CHECKSUM_HEADERS: ReadonlyArray<readonly [Algorithm, string]> = [
  ['crc64nvme', 'x-amz-checksum-crc64nvme'], ['crc32c', 'x-amz-checksum-crc32c'], ['crc32', 'x-amz-checksum-crc32'],
  ['sha256', 'x-amz-checksum-sha256'], ['sha1', 'x-amz-checksum-sha1'],
];

/** A store's checksum answer, as a transport passes it on: the algorithm, the value as sent, and x-amz-checksum-type. */
export interface ChecksumAnswer {
  readonly alg: Algorithm;
  readonly value: string;
  readonly type?: string;
}

/**
 * What a checksum answer promises, or why it promises nothing usable: a value that is not base64 of the algorithm's
 * length, a COMPOSITE checksum without its part count. `multipart`: the object's ETag says it was uploaded in parts;
 * a value with neither a part count nor a type may then be of its parts (MinIO answered so until 2023), which only a
 * CRC64NVME (whole-object only) cannot be.
 */
export function checksumExpected(a: ChecksumAnswer, multipart = false): Expected | { why: string } {
  const m = /^([A-Za-z0-9+/]+={0,2})(?:-(\d{1,5}))?$/.exec(a.value.trim());
  const parts = m?.[2] === undefined ? 0 : Number(m[2]);
  if (m === null || Buffer.from(m[1]!, 'base64').length !== DIGEST_BYTES[a.alg] || (m[2] !== undefined && (parts < 1 || parts > MAX_PARTS))) {
    return { why: `its ${NAMES[a.alg]} checksum is not one this runtime reads` };
  }
  if (parts === 0 && a.type?.toUpperCase() === 'COMPOSITE') return { why: `its ${NAMES[a.alg]} checksum is COMPOSITE without a part count` };
  if (parts === 0 && multipart && a.type === undefined && a.alg !== 'crc64nvme') {
    return { why: `its ${NAMES[a.alg]} checksum may be of its parts (the store gave neither a part count nor a checksum type)` };
  }
  return { alg: a.alg, value: Buffer.from(m[1]!, 'base64').toString('base64'), parts, source: 'checksum' };
}

/** The CRCs' polynomials, reflected: written into CRC_SOURCE, and used by crcCombine. */
const POLY: Readonly<Record<string, bigint>> = { crc32: 0xedb88320n, crc32c: 0x82f63b78n, crc64nvme: 0x9a6c9329ac4bc9b5n };

/**
 * The CRCs, reflected, in plain JavaScript (no imports): CRC32 (zlib's), CRC32C, CRC64NVME, slicing by 8 bytes. A state
 * is [low 32 bits, high 32 bits] of the CRC register, started at all ones; the digest is the register's complement,
 * big-endian, as S3 encodes it. `makeDigest(alg, createHash, zlibCrc32)`: `{ update(buf), digest() }` for any algorithm.
 */
export const CRC_SOURCE = `
const CRC_POLYS = { ${Object.entries(POLY).map(([alg, p]) => `${alg}: 0x${p.toString(16)}n`).join(', ')} };
const CRC_TABLES = new Map();
function crcTables(alg) {
  let t = CRC_TABLES.get(alg);
  if (t !== undefined) return t;
  const wide = alg === 'crc64nvme';
  const poly = CRC_POLYS[alg];
  const lo = new Uint32Array(8 * 256);
  const hi = new Uint32Array(8 * 256);
  const base = [];
  for (let i = 0; i < 256; i++) {
    let c = BigInt(i);
    for (let k = 0; k < 8; k++) c = c & 1n ? (c >> 1n) ^ poly : c >> 1n;
    base.push(c);
  }
  for (let i = 0; i < 256; i++) {
    let c = base[i];
    for (let s = 0; s < 8; s++) {
      lo[s * 256 + i] = Number(c & 0xffffffffn);
      hi[s * 256 + i] = Number(c >> 32n);
      c = (c >> 8n) ^ base[Number(c & 255n)];
    }
  }
  t = { lo, hi, wide };
  CRC_TABLES.set(alg, t);
  return t;
}
function crcUpdate(t, state, buf) {
  const L = t.lo, H = t.hi, end = buf.length;
  let lo = state[0], hi = state[1], i = 0;
  for (; i + 8 <= end; i += 8) {
    const a = lo ^ (buf[i] | (buf[i + 1] << 8) | (buf[i + 2] << 16) | (buf[i + 3] << 24));
    const b = hi ^ (buf[i + 4] | (buf[i + 5] << 8) | (buf[i + 6] << 16) | (buf[i + 7] << 24));
    const x0 = 1792 + (a & 255), x1 = 1536 + ((a >>> 8) & 255), x2 = 1280 + ((a >>> 16) & 255), x3 = 1024 + (a >>> 24);
    const x4 = 768 + (b & 255), x5 = 512 + ((b >>> 8) & 255), x6 = 256 + ((b >>> 16) & 255), x7 = b >>> 24;
    lo = L[x0] ^ L[x1] ^ L[x2] ^ L[x3] ^ L[x4] ^ L[x5] ^ L[x6] ^ L[x7];
    hi = H[x0] ^ H[x1] ^ H[x2] ^ H[x3] ^ H[x4] ^ H[x5] ^ H[x6] ^ H[x7];
  }
  for (; i < end; i++) {
    const x = (lo ^ buf[i]) & 255;
    lo = ((lo >>> 8) | (hi << 24)) ^ L[x];
    hi = (hi >>> 8) ^ H[x];
  }
  state[0] = lo >>> 0;
  state[1] = hi >>> 0;
}
function makeDigest(alg, createHash, zlibCrc32) {
  if (alg === 'md5' || alg === 'sha1' || alg === 'sha256') {
    const h = createHash(alg);
    return { update: (b) => h.update(b), digest: () => h.digest() };
  }
  if (alg === 'crc32' && typeof zlibCrc32 === 'function') {
    let c = 0;
    return { update: (b) => { c = zlibCrc32(b, c); }, digest: () => { const d = Buffer.alloc(4); d.writeUInt32BE(c >>> 0); return d; } };
  }
  const t = crcTables(alg);
  const state = [0xffffffff, t.wide ? 0xffffffff : 0];
  return {
    update: (b) => crcUpdate(t, state, b),
    digest: () => {
      const d = Buffer.alloc(t.wide ? 8 : 4);
      if (t.wide) { d.writeUInt32BE((state[1] ^ 0xffffffff) >>> 0, 0); d.writeUInt32BE((state[0] ^ 0xffffffff) >>> 0, 4); }
      else d.writeUInt32BE((state[0] ^ 0xffffffff) >>> 0, 0);
      return d;
    },
  };
}
`;

interface Digest {
  update(b: Uint8Array): void;
  digest(): Buffer;
}

// The same source the threads run, for the digests of parts' digests and for tests.
// eslint-disable-next-line @typescript-eslint/no-implied-eval
const run = new Function('Buffer', `${CRC_SOURCE}\nreturn makeDigest;`)(Buffer) as (alg: Algorithm, h: typeof createHash, c?: typeof zlib.crc32) => Digest;

/** A digest of `alg`, as the hashing threads compute it. */
export const newDigest = (alg: Algorithm): Digest => run(alg, createHash, zlib.crc32);

export const isCrc = (alg: Algorithm) => alg === 'crc32' || alg === 'crc32c' || alg === 'crc64nvme';

/**
 * The CRC of A followed by B from the CRCs of A and B and B's length: A's CRC times x^(8·|B|) modulo the polynomial,
 * plus B's (the all-ones start and end of these CRCs cancel). Multiplication in GF(2), bits reflected.
 */
export function crcCombine(alg: Algorithm, a: Buffer, b: Buffer, lengthB: number): Buffer {
  const width = DIGEST_BYTES[alg] * 8;
  const poly = POLY[alg]!;
  const top = 1n << BigInt(width - 1);
  const mul = (x: bigint, y: bigint): bigint => {
    let p = 0n;
    for (let m = top; m > 0n; m >>= 1n) {
      if (x & m) p ^= y;
      y = y & 1n ? (y >> 1n) ^ poly : y >> 1n;
    }
    return p;
  };
  // x^(8·n): squares of x^1 for each bit of 8·n.
  let power = top; // x^0
  let square = top >> 1n; // x^1
  for (let n = BigInt(lengthB) * 8n; n > 0n; n >>= 1n) {
    if (n & 1n) power = mul(square, power);
    square = mul(square, square);
  }
  const v = mul(power, BigInt(`0x${a.toString('hex')}`)) ^ BigInt(`0x${b.toString('hex')}`);
  return Buffer.from(v.toString(16).padStart(width / 4, '0'), 'hex');
}

/** A checksum answer from what a HEAD carried, by algorithm (undefined: none the runtime reads). */
export function checksumFrom(values: Partial<Record<Algorithm, string | undefined>>, type: string | undefined): ChecksumAnswer | undefined {
  for (const [alg] of CHECKSUM_HEADERS) {
    const value = values[alg];
    if (value) return { alg, value, ...(type ? { type } : {}) };
  }
  return undefined;
}
