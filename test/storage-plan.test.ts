import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { RuntimeError } from '../src/errors.js';
import { backoffMs, cacheKey, containedPath, parseStorageUri, planParts } from '../src/storage/fetch.js';
import { keyProblem, parseS3Prefix, parseS3Url, underS3Prefix, type S3Prefix } from '../src/storage/uri.js';
import { describeConfig, loadConfig, maskUri, maskUserInfo } from '../src/config.js';
import { classify, endpointName, permanentError } from '../src/storage/s3-errors.js';

describe('planParts', () => {
  it('gives [] for an empty file', () => {
    expect(planParts(0, 8)).toEqual([]);
  });

  it('covers [0, size) with contiguous ranges no longer than partBytes (random sizes)', () => {
    let seed = 42;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let k = 0; k < 2000; k++) {
      // Keep parts per file bounded (<= ~2000) so the check stays fast; both edges still get hit.
      const partBytes = 1 + rnd(k % 3 === 0 ? 7 : 5000);
      const size = rnd(k % 5 === 0 ? 3 : partBytes * 2000);
      const parts = planParts(size, partBytes);
      expect(parts.length).toBe(Math.ceil(size / partBytes));
      let next = 0;
      let ok = true;
      for (const p of parts) {
        ok &&= p.start === next && p.end >= p.start && p.end - p.start + 1 <= partBytes;
        next = p.end + 1;
      }
      expect(ok, `size=${size} partBytes=${partBytes}`).toBe(true);
      expect(next).toBe(size);
      expect(parts.slice(0, -1).every((p) => p.end - p.start + 1 === partBytes)).toBe(true);
    }
  });

  it('handles sizes past 4 GiB without overflow and rejects bad input', () => {
    const parts = planParts(5 * 2 ** 30 + 3, 2 ** 30);
    expect(parts).toHaveLength(6);
    expect(parts.at(-1)).toEqual({ start: 5 * 2 ** 30, end: 5 * 2 ** 30 + 2 });
    expect(() => planParts(-1, 8)).toThrow(RangeError);
    expect(() => planParts(10, 0)).toThrow(RangeError);
    expect(() => planParts(1.5, 8)).toThrow(RangeError);
  });
});

describe('backoffMs', () => {
  it('grows exponentially with full jitter and a cap', () => {
    expect(backoffMs(0, () => 0.999)).toBeLessThanOrEqual(200);
    expect(backoffMs(3, () => 0.999)).toBeGreaterThan(1500);
    expect(backoffMs(30, () => 0.999)).toBeLessThanOrEqual(5000);
    expect(backoffMs(2, () => 0)).toBe(20);
  });
});

describe('parseStorageUri', () => {
  it('parses s3, file and plain paths', () => {
    expect(parseStorageUri('s3://models/sd/v1.5')).toEqual({ kind: 's3', bucket: 'models', prefix: 'sd/v1.5/', uri: 's3://models/sd/v1.5/' });
    expect(parseStorageUri('s3://models')).toEqual({ kind: 's3', bucket: 'models', prefix: '', uri: 's3://models/' });
    expect(parseStorageUri('file:///mnt/models/sd')).toEqual({ kind: 'local', path: '/mnt/models/sd' });
    expect(parseStorageUri('/mnt/models')).toEqual({ kind: 'local', path: '/mnt/models' });
    expect(parseStorageUri('rel/dir')).toEqual({ kind: 'local', path: path.resolve('rel/dir') });
  });

  it('explains pvc:// and refuses unknown schemes and bad buckets', () => {
    const err = (u: string) => {
      try {
        parseStorageUri(u);
      } catch (e) {
        return e as RuntimeError;
      }
      throw new Error('no error');
    };
    expect(err('pvc://claim/sd').message).toMatch(/mounted by KServe at \/mnt\/models/);
    expect(err('pvc://claim/sd').code).toBe('INVALID_INPUT');
    expect(err('gs://b/p').message).toMatch(/scheme "gs:\/\/" is not supported/);
    expect(err('s3:///p').message).toMatch(/no valid bucket/);
    // Read as a local folder named "s3:" before, and answered only that the model folder does not exist.
    for (const u of ['s3:/models/sd', 'S3:models/sd']) expect([err(u).code, err(u).message]).toEqual(['INVALID_INPUT', 'STORAGE_URI starts with "s3:" but not "s3://"; write s3://bucket/prefix']);
    expect(err('s3://b/a/../c').message).toMatch(/'\.\.'/);
    expect(err('  ').code).toBe('INVALID_INPUT');
  });

  it('refuses keys in the URI without echoing them, whatever characters the secret holds', () => {
    // AWS secret keys hold '/' and '+' about half the time; a MinIO password may hold '@' or ':'.
    for (const secret of ['wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY', 'p@ss:w/rd', 'plain']) {
      const uri = `s3://AKIAEXAMPLE:${secret}@models/sd`;
      let e: RuntimeError | undefined;
      try {
        parseStorageUri(uri);
      } catch (x) {
        e = x as RuntimeError;
      }
      expect(e?.message, secret).toMatch(/^STORAGE_URI "s3:\/\/\*\*\*@models\/sd" carries credentials; /);
      expect(describeConfig(loadConfig({ STORAGE_URI: uri, LORA_URI: uri })).storageUri).toBe('s3://***@models/sd');
      expect(() => loadConfig({ LORA_URI: uri.replace('s3://', 'gs://') })).toThrow('LORA_URI must be s3://bucket/prefix, file:///path or an absolute path, got "gs://***@models/sd"');
    }
    // An '@' in a key is not user info.
    expect(maskUserInfo('s3://models/team@x/sd')).toBe('s3://models/team@x/sd');
    expect(parseStorageUri('s3://models/team@x/sd')).toMatchObject({ bucket: 'models', prefix: 'team@x/sd/' });
    expect(maskUserInfo('http://minio:9000')).toBe('http://minio:9000');
    expect(maskUserInfo('http://u:p@minio:9000/x')).toBe('http://***@minio:9000/x');
    // maskUri: a query string (a presigned URL's signature and token) too; a '?' inside a password is user info.
    expect(maskUri('https://b.s3.amazonaws.com/k?X-Amz-Signature=abc')).toBe('https://b.s3.amazonaws.com/k?***');
    expect(maskUri('s3://AKIAEXAMPLE:pa?ss@models/sd')).toBe('s3://***@models/sd');
    expect(maskUri('s3://models/sd')).toBe('s3://models/sd');
  });
});

describe('parseS3Url: the one reading of s3:// URLs', () => {
  it('splits bucket and key for STORAGE_URI and output_uri alike', async () => {
    const { parseOutputUri } = await import('../src/runtime/output.js');
    expect(parseS3Url('s3://models/sd/v1')).toEqual({ bucket: 'models', key: 'sd/v1' });
    expect(parseS3Url('S3://models')).toEqual({ bucket: 'models', key: '' });
    expect(parseS3Url('s3://out/a b/c.png')).toEqual({ bucket: 'out', key: 'a b/c.png' });
    for (const bad of ['s3:///k', 's3://bad bucket/k', 'http://b/k', 'b/k']) expect(parseS3Url(bad), bad).toBeUndefined();
    expect(parseStorageUri('S3://models/sd')).toMatchObject({ bucket: 'models', prefix: 'sd/' });
    expect(parseOutputUri('s3://out/run/fox.png')).toEqual({ bucket: 'out', key: 'run/fox.png' });
    for (const bad of ['s3://out', 's3://out/', 's3:///k', 'http://elsewhere/a.png']) {
      expect(() => parseOutputUri(bad), bad).toThrow(`output_uri must look like s3://bucket/key, got ${JSON.stringify(bad)}`);
    }
  });
});

describe('INPUT_URI_PREFIXES entries: a bucket, a folder, or a key and its folder', () => {
  const under = (prefix: string, uri: string) => underS3Prefix(parseS3Url(uri)!, parseS3Prefix(prefix) as S3Prefix);
  it('match at a \'/\' boundary or the key as given, the bucket exactly', () => {
    const cases: Array<[string, string, boolean]> = [
      ['s3://in', 's3://in/a.png', true], ['s3://in/', 's3://in/x/a.png', true], ['s3://in', 's3://In/a.png', false], ['s3://in', 's3://in2/a.png', false],
      ['s3://in/team/', 's3://in/team/a.png', true], ['s3://in/team/', 's3://in/team', false], ['s3://in/team/', 's3://in/team-b/a.png', false],
      ['s3://in/team', 's3://in/team', true], ['s3://in/team', 's3://in/team/a.png', true], ['s3://in/team', 's3://in/teamb/a.png', false],
      ['s3://in/Team/', 's3://in/team/a.png', false], ['s3://in/a.png', 's3://in/a.png', true], ['s3://in/a.png', 's3://in/a.png.bak', false],
    ];
    for (const [p, u, want] of cases) expect(under(p, u), `${p} ∋ ${u}`).toBe(want);
  });
  it('keys that a layer in front of S3 could resolve elsewhere are named', () => {
    for (const ok of ['a.png', 'team/a b.png', 'x/..a/b.png', '50%25 off.png', '100%.png']) expect(keyProblem(ok), ok).toBeUndefined();
    for (const [k, why] of [['a/../b', "has an empty, '.' or '..' path segment"], ['./a', "has an empty, '.' or '..' path segment"], ['a//b', "has an empty, '.' or '..' path segment"],
      ['/a', "has an empty, '.' or '..' path segment"], ['a/', "has an empty, '.' or '..' path segment"], ['a\\b', 'has a backslash'], ['a\nb', 'has a control character'],
      ['a/%2E%2E/b', "has an empty, '.' or '..' path segment once percent-decoded"], ['a%2f..%2fb', "has an empty, '.' or '..' path segment once percent-decoded"],
      ['a/%25252e%25252e/b', "has an empty, '.' or '..' path segment once percent-decoded"], ['a%5cb', 'has a backslash once percent-decoded'],
      ['a%00b', 'has a control character once percent-decoded']] as const) {
      expect(keyProblem(k), k).toBe(why);
    }
  });
});

describe('cache keys and containment', () => {
  it('derives a readable, hashed, distinct key per URI and endpoint', () => {
    const a = cacheKey({ kind: 's3', bucket: 'models', prefix: 'sd/v1/', uri: '' }, undefined);
    const b = cacheKey({ kind: 's3', bucket: 'models', prefix: 'sd/v1/', uri: '' }, 'http://minio:9000');
    const c = cacheKey({ kind: 's3', bucket: 'models', prefix: 'sd-v1/', uri: '' }, undefined);
    expect(a).toMatch(/^s3-models-sd-v1-[0-9a-f]{16}$/);
    expect(new Set([a, b, c]).size).toBe(3);
  });

  it('refuses keys that would leave the cache dir', () => {
    const root = '/cache/entry';
    expect(containedPath(root, 'unet/model.onnx')).toBe('/cache/entry/unet/model.onnx');
    for (const bad of ['../x', 'a/../../x', '/etc/passwd', 'a//b', '', './a', 'a/.', 'a\\..\\b', 'a\0b', 'x.partial', '.complete.json', '.complete.held.json', '.progress.jsonl', 'unet/.progress.jsonl']) {
      expect(() => containedPath(root, bad), bad).toThrow(RuntimeError);
    }
  });
});

describe('classify', () => {
  // The SDK's service errors carry the code S3 sent both as their name and as `Code` (from the error's XML).
  const sdk = (name: string, status?: number) => Object.assign(new Error(name), { name, Code: name, $metadata: { httpStatusCode: status } });
  it('never retries denied or missing, retries resets, 5xx, 429 and timeouts', () => {
    expect(classify(sdk('AccessDenied', 403))).toBe('denied');
    expect(classify(sdk('InvalidAccessKeyId', 403))).toBe('denied');
    expect(classify(sdk('SignatureDoesNotMatch', 403))).toBe('denied');
    expect(classify(sdk('NoSuchBucket', 404))).toBe('missing');
    expect(classify(sdk('NoSuchKey', 404))).toBe('missing');
    expect(classify(sdk('PreconditionFailed', 412))).toBe('changed');
    expect(classify(sdk('SlowDown', 503))).toBe('transient');
    expect(classify(sdk('InternalError', 500))).toBe('transient');
    expect(classify(sdk('TooManyRequests', 429))).toBe('transient');
    expect(classify(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }))).toBe('transient');
    expect(classify(Object.assign(new Error('t'), { name: 'TimeoutError' }))).toBe('transient');
    // 416 comes from a range past the end of an object that shrank since it was listed: list again.
    expect(classify(sdk('InvalidRange', 416))).toBe('changed');
    // The clients correct their clock from S3's Date header, so a skewed request time is retried, not denied.
    expect(classify(sdk('RequestTimeTooSkewed', 403))).toBe('transient');
    expect(classify(sdk('BadDigest', 400))).toBe('fatal');
  });

  it('a request time S3 kept refusing is named for what it is: the clock', () => {
    const e = permanentError(sdk('RequestTimeTooSkewed', 403), 'models', 'sd/', 'list (8 attempts)');
    expect([e.code, e.message]).toEqual(['STORAGE_CLOCK_SKEW', expect.stringMatching(/^S3 refused the request time to list \(8 attempts\) s3:\/\/models\/sd\/ \(RequestTimeTooSkewed\): .*time synchronisation \(NTP\)$/)]);
  });

  it('a certificate this pod refuses is named by what fixes it, and never retried', () => {
    const tls = (code: string) => Object.assign(new Error(`certificate problem ${code}`), { code });
    const cases: Array<[string, RegExp]> = [
      ['SELF_SIGNED_CERT_IN_CHAIN', /is not trusted: give its CA bundle as AWS_CA_BUNDLE/],
      ['CERT_HAS_EXPIRED', /is outside its validity dates: renew it, or check this node's clock/],
      ['CERT_NOT_YET_VALID', /is outside its validity dates/],
      ['ERR_TLS_CERT_ALTNAME_INVALID', /does not name the host in AWS_ENDPOINT_URL/],
    ];
    for (const [code, hint] of cases) {
      expect(classify(tls(code)), code).toBe('tls');
      const e = permanentError(tls(code), 'models', 'sd/', 'list');
      expect([e.code, e.message], code).toEqual(['STORAGE_TLS', expect.stringMatching(new RegExp(`^cannot list s3://models/sd/: TLS to the S3 endpoint failed \\(${code}\\); the endpoint's certificate ${hint.source}`))]);
    }
    // A reset during a handshake is the network, not the configuration: retried.
    expect(classify(Object.assign(new Error('Client network socket disconnected before secure TLS connection was established'), { code: 'ECONNRESET' }))).toBe('transient');
  });

  it("a host with no DNS record on AWS's own endpoint (no endpoint variable set) points at the region, which made the host", () => {
    const endpoint = endpointName({ endpoint: undefined, region: 'eu-wset-1', forcePathStyle: false }, 'models');
    const err = Object.assign(new Error('getaddrinfo ENOTFOUND models.s3.eu-wset-1.amazonaws.com'), { code: 'ENOTFOUND', hostname: 'models.s3.eu-wset-1.amazonaws.com' });
    const e = permanentError(err, 'models', 'sd/', 'list (1 attempt)', endpoint);
    // Before: "check the host in AWS_ENDPOINT_URL (or S3_ENDPOINT, AWS_S3_ENDPOINT), and that the Service it names exists", none of them set.
    expect([e.code, e.message]).toEqual(['STORAGE_TRANSIENT', `cannot list (1 attempt) s3://models/sd/: the S3 endpoint's host models.s3.eu-wset-1.amazonaws.com has no DNS `
      + `record (ENOTFOUND at ${endpoint}): check AWS_REGION (else AWS_DEFAULT_REGION), which names the AWS region whose S3 host is used, and this pod's DNS; `
      + 'for a store other than AWS S3 set AWS_ENDPOINT_URL (gave up after retries)']);
  });

  it('a stalled or short ranged read is the one error class, retried, and named by its code when the retries run out', () => {
    for (const code of ['STORAGE_STALL', 'STORAGE_SHORT_READ'] as const) {
      const err = new RuntimeError(code, 'range ended after 3 of 8 bytes');
      expect(classify(err), code).toBe('transient');
      const e = permanentError(err, 'models', 'sd/unet/model.onnx', 'read (8 attempts)');
      expect([e.code, e.message]).toEqual(['STORAGE_TRANSIENT', `cannot read (8 attempts) s3://models/sd/unet/model.onnx: ${code} (gave up after retries)`]);
    }
  });
});

describe('splitTail', () => {
  it('slices only the last `concurrency` parts, covering the same bytes', async () => {
    const { splitTail } = await import('../src/storage/download.js');
    const MiB = 1 << 20;
    const tasks = planParts(40 * MiB + 5, 8 * MiB).map((range, idx) => ({ idx, range }));
    const out = splitTail(tasks, 3, 4, MiB, (t, r) => ({ ...t, range: r }));
    expect(out.slice(0, 3)).toEqual(tasks.slice(0, 3));
    // part 3 (8 MiB) → 4 slices; part 5 (5 bytes) is too small to split
    expect(out.slice(3).map((t) => [t.idx, t.range.end - t.range.start + 1])).toEqual([[3, 2 * MiB], [3, 2 * MiB], [3, 2 * MiB], [3, 2 * MiB], [4, 2 * MiB], [4, 2 * MiB], [4, 2 * MiB], [4, 2 * MiB], [5, 5]]);
    let next = 0;
    for (const t of out) {
      expect(t.range.start).toBe(next);
      next = t.range.end + 1;
    }
    expect(next).toBe(40 * MiB + 5);
  });
});
