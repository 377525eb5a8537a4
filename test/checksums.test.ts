import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { Crc32cJs, Crc64NvmeJs } from '@aws-sdk/checksums/crc';
import { checksumExpected, crcCombine, md5Etag, newDigest, type Algorithm } from '../src/storage/checksums.js';
import { detBytes } from './helpers/s3.js';

const digestOf = (alg: Algorithm, ...bufs: Buffer[]) => {
  const d = newDigest(alg);
  for (const b of bufs) d.update(b);
  return d.digest();
};

/** The AWS SDK's own JavaScript CRCs (@aws-sdk/checksums, a dependency of the S3 client): an independent implementation. */
async function sdkCrc(alg: 'crc32c' | 'crc64nvme', b: Buffer): Promise<Buffer> {
  const h = alg === 'crc32c' ? new Crc32cJs() : new Crc64NvmeJs();
  h.update(b);
  return Buffer.from(await h.digest());
}

describe('the CRCs S3 checksums use', () => {
  it('give the catalogued check values of "123456789" (CRC-32/ISO-HDLC, CRC-32/ISCSI, CRC-64/NVME)', () => {
    const nine = Buffer.from('123456789');
    expect(digestOf('crc32', nine).toString('hex')).toBe('cbf43926');
    expect(digestOf('crc32c', nine).toString('hex')).toBe('e3069283');
    expect(digestOf('crc64nvme', nine).toString('hex')).toBe('ae8b14860a799888');
  });

  it('agree with the AWS SDK\'s on data of every length around the 8-byte steps, fed whole or in pieces', async () => {
    const data = detBytes(70_001, 9);
    for (const n of [0, 1, 7, 8, 9, 15, 16, 17, 1000, 70_001]) {
      const b = data.subarray(0, n);
      for (const alg of ['crc32c', 'crc64nvme'] as const) {
        const want = await sdkCrc(alg, b);
        expect(digestOf(alg, b).equals(want), `${alg} of ${n} bytes`).toBe(true);
        expect(digestOf(alg, b.subarray(0, n >> 1), b.subarray(n >> 1)).equals(want), `${alg} of ${n} bytes in two`).toBe(true);
      }
    }
  });

  it('S3\'s own example values: the base64 of the big-endian CRC', () => {
    // Values AWS's docs and SDK tests give for "Hello world": CRC32 i9aeUg==, CRC32C crUfeA==, CRC64NVME OOJZ0D8xKts=.
    const hello = Buffer.from('Hello world');
    expect(digestOf('crc32', hello).toString('base64')).toBe('i9aeUg==');
    expect(digestOf('crc32c', hello).toString('base64')).toBe('crUfeA==');
    expect(digestOf('crc64nvme', hello).toString('base64')).toBe('OOJZ0D8xKts=');
  });

  it('combine: the CRC of A then B from those of A and B, as if computed in one pass', () => {
    const data = detBytes(300_007, 4);
    for (const alg of ['crc32', 'crc32c', 'crc64nvme'] as const) {
      for (const cut of [0, 1, 8, 4096, 150_000, 300_006, 300_007]) {
        const a = digestOf(alg, data.subarray(0, cut));
        const b = digestOf(alg, data.subarray(cut));
        expect(crcCombine(alg, a, b, data.length - cut).equals(digestOf(alg, data)), `${alg} cut at ${cut}`).toBe(true);
      }
    }
  });

  it('md5 and the SHAs are node:crypto\'s', () => {
    const b = detBytes(1234, 2);
    for (const alg of ['md5', 'sha1', 'sha256'] as const) expect(digestOf(alg, b).equals(createHash(alg).update(b).digest())).toBe(true);
  });
});

describe('what a checksum answer promises', () => {
  it('a full-object value, a composite one with its part count, and values it cannot use', () => {
    expect(checksumExpected({ alg: 'crc64nvme', value: 'OOJZ0D8xKts=', type: 'FULL_OBJECT' })).toEqual({ alg: 'crc64nvme', value: 'OOJZ0D8xKts=', parts: 0, source: 'checksum' });
    expect(checksumExpected({ alg: 'crc32', value: 'i9aeUg==-3', type: 'COMPOSITE' })).toEqual({ alg: 'crc32', value: 'i9aeUg==', parts: 3, source: 'checksum' });
    expect(checksumExpected({ alg: 'crc32', value: 'i9aeUg==' })).toMatchObject({ parts: 0 });
    // The wrong length for the algorithm, not base64, a composite without its count, a part count S3 never makes.
    for (const [alg, value, type] of [['crc32', 'OOJZ0D8xKts=', undefined], ['crc64nvme', 'not base64!', undefined], ['crc32c', 'crUfeA==', 'COMPOSITE'],
      ['crc32', 'i9aeUg==-0', undefined], ['crc32', 'i9aeUg==-10001', undefined]] as const) {
      expect(checksumExpected({ alg, value, ...(type ? { type } : {}) }), value).toHaveProperty('why');
    }
  });

  it('of a multipart upload, a value with neither a part count nor a type may be of its parts: not used, but a CRC64NVME (whole-object only)', () => {
    expect(checksumExpected({ alg: 'crc32', value: 'i9aeUg==' }, true)).toHaveProperty('why', expect.stringContaining('may be of its parts'));
    expect(checksumExpected({ alg: 'crc32', value: 'i9aeUg==', type: 'FULL_OBJECT' }, true)).toMatchObject({ parts: 0 });
    expect(checksumExpected({ alg: 'crc64nvme', value: 'OOJZ0D8xKts=' }, true)).toMatchObject({ parts: 0 });
    expect(checksumExpected({ alg: 'crc32', value: 'i9aeUg==' }, false)).toMatchObject({ parts: 0 });
  });

  it('MD5 ETags, single-part and multipart, quoted or not, and nothing else', () => {
    expect(md5Etag('"0123456789ABCDEF0123456789abcdef"')).toEqual({ alg: 'md5', value: '0123456789abcdef0123456789abcdef', parts: 0, source: 'ETag' });
    expect(md5Etag('0123456789abcdef0123456789abcdef-12')).toMatchObject({ value: '0123456789abcdef0123456789abcdef', parts: 12 });
    for (const e of ['', 'W/"0123456789abcdef0123456789abcdef"', '"0123456789abcdef0123456789abcde"', '"0123456789abcdef0123456789abcdef-0"',
      '"0123456789abcdef0123456789abcdef-10001"', '"x123456789abcdef0123456789abcdef"', '"3858f62230ac3c915f300c664312c63f:1"']) expect(md5Etag(e), e).toBeUndefined();
  });
});
