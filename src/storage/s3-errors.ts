/**
 * @module What an S3 failure means, without the AWS SDK: classification into retry / denied / missing / changed, and
 * the RuntimeError an operator reads. Shared by both transports (s3-sdk.ts, s3-lite.ts), whose errors are shaped alike.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { S3Settings } from '../config.js';
import { shortage, shortageError, S3_ADVICE } from '../descriptors.js';
import { RuntimeError } from '../errors.js';
import { backoffMs, RETRY, THROTTLE } from './plan.js';
import { NOT_A_LISTING } from './s3-compat.js';

export type ErrorKind = 'denied' | 'missing' | 'changed' | 'transient' | 'aborted' | 'tls' | 'fatal';

/** Node's codes for a server certificate this pod refuses, by what fixes it. The same on every attempt: never retried. */
const CERT_PROBLEMS: Readonly<Record<string, 'untrusted' | 'dates' | 'name'>> = Object.freeze({
  DEPTH_ZERO_SELF_SIGNED_CERT: 'untrusted',
  SELF_SIGNED_CERT_IN_CHAIN: 'untrusted',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'untrusted',
  UNABLE_TO_GET_ISSUER_CERT: 'untrusted',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'untrusted',
  CERT_UNTRUSTED: 'untrusted',
  CERT_SIGNATURE_FAILURE: 'untrusted',
  CERT_HAS_EXPIRED: 'dates',
  CERT_NOT_YET_VALID: 'dates',
  ERR_TLS_CERT_ALTNAME_INVALID: 'name',
});
type TlsProblem = 'untrusted' | 'dates' | 'name' | 'plain-http';

const TLS_HINTS: Readonly<Record<TlsProblem, string>> = Object.freeze({
  untrusted: "the endpoint's certificate is not trusted: give its CA bundle as AWS_CA_BUNDLE (S3_VERIFY_SSL=0 skips the check)",
  dates: "the endpoint's certificate is outside its validity dates: renew it, or check this node's clock (NTP)",
  name: "the endpoint's certificate does not name the host in AWS_ENDPOINT_URL: use a name the certificate lists",
  'plain-http': 'the endpoint answers plain HTTP: use an http:// AWS_ENDPOINT_URL (or S3_USE_HTTPS=0 with a bare host:port)',
});

/**
 * What a failed TLS handshake with the endpoint says about the configuration: a certificate this pod refuses, or an
 * endpoint that answers plain HTTP to https:// (OpenSSL's "wrong version number"). Undefined for anything else.
 */
function tlsProblem(err: unknown): TlsProblem | undefined {
  for (let e = err as (SdkLikeError & { message?: string }) | undefined, depth = 0; e && depth < 3; e = e.cause as typeof e, depth++) {
    const code = e.code ?? '';
    if (Object.hasOwn(CERT_PROBLEMS, code)) return CERT_PROBLEMS[code];
    if ((code === 'EPROTO' || code === 'ERR_SSL_WRONG_VERSION_NUMBER') && /wrong version number/i.test(e.message ?? '')) return 'plain-http';
  }
  return undefined;
}

interface SdkLikeError {
  name?: string;
  code?: string;
  Code?: string;
  $metadata?: { httpStatusCode?: number };
  $response?: { statusCode?: number };
  cause?: unknown;
}

/** What region names look like; anything else a store sends in their place is not echoed. */
const REGION_NAME = /^[a-z0-9][a-z0-9-]{1,40}$/;

/**
 * The bucket's region, where a refusal names it: AWS S3 answers a request signed for another region 301
 * PermanentRedirect with an `x-amz-bucket-region` header, or 400 AuthorizationHeaderMalformed with `<Region>` in the
 * body (as MinIO does when its configured region differs).
 */
export function bucketRegion(err: unknown): string | undefined {
  const e = err as { Region?: unknown; $response?: { headers?: Record<string, unknown> } } | undefined;
  const r = e?.Region ?? e?.$response?.headers?.['x-amz-bucket-region'];
  return typeof r === 'string' && REGION_NAME.test(r) ? r : undefined;
}

export function errorStatus(err: unknown): number | undefined {
  const e = err as SdkLikeError | undefined;
  return e?.$metadata?.httpStatusCode ?? e?.$response?.statusCode;
}

/** Sorts an error into what the reader does next. Callers branch on the kind, never on message text. */
export function classify(err: unknown): ErrorKind {
  if (err instanceof RuntimeError) {
    if (err.code === 'STORAGE_DENIED') return 'denied';
    if (err.code === 'STORAGE_MISSING') return 'missing';
    if (err.code === 'STORAGE_TRANSIENT' || err.code === 'STORAGE_STALL' || err.code === 'STORAGE_SHORT_READ') return 'transient';
    if (err.code === 'CANCELLED') return 'aborted';
    return 'fatal';
  }
  const e = (err ?? {}) as SdkLikeError;
  const name = e.name ?? '';
  const code = e.code ?? e.Code ?? '';
  const status = errorStatus(err);
  if (name === 'AbortError' || code === 'ABORT_ERR') return 'aborted';
  if (name === NOT_A_LISTING) return 'fatal';
  if (tlsProblem(err) !== undefined) return 'tls';
  // A redirect (a bucket in another region or behind another endpoint) and a refusal that names the bucket's region
  // answer every retry alike.
  if ((status !== undefined && status >= 300 && status < 400) || (bucketRegion(err) !== undefined && (status === 400 || name === 'AuthorizationHeaderMalformed'))) return 'fatal';
  // A 403 for the request time: the clients correct their clock offset from S3's Date (s3-lite.ts, the SDK's signer),
  // so the next attempt is signed with S3's time.
  if (RETRY.skew.includes(name) || RETRY.skew.includes(code)) return 'transient';
  // An SSE-KMS object's key, as S3 passes KMS's answer on: throttled or unavailable for a while (or a 5xx), else
  // refusing for good.
  const kms = kmsCode(err);
  if (kms !== undefined) return RETRY.kmsTransient.includes(kms) || (status !== undefined && status >= 500) ? 'transient' : 'denied';
  // The store asks for fewer requests (throttled() below), whatever the status it sends that with (AWS's JSON services
  // send ThrottlingException with a 400): waited out, never a refusal.
  if (THROTTLE.codes.includes(name) || THROTTLE.codes.includes(code)) return 'transient';
  // 416: a range past the end of the object, which only an object that shrank since it was listed gives (stores that
  // ignore If-Match answer it where S3 would answer 412).
  if (status === 412 || status === 416 || name === 'PreconditionFailed' || name === 'InvalidRange' || code === 'ETAG_CHANGED') return 'changed';
  if (status === 403 || RETRY.denied.includes(name) || RETRY.denied.includes(code)) return 'denied';
  if ((status === 404 && name !== 'RequestTimeout') || RETRY.missing.includes(name) || RETRY.missing.includes(code)) return 'missing';
  if ((status !== undefined && RETRY.statuses.includes(status)) || RETRY.codes.includes(name) || RETRY.codes.includes(code)) return 'transient';
  if (status !== undefined && status >= 400 && status < 500) return 'fatal';
  // No HTTP status: a socket-level failure (reset, refused, TLS hiccup) that a new connection may fix.
  return 'transient';
}

/** Whether S3 answered that it is throttling this client (503 SlowDown, 429, …: THROTTLE.codes), a transient error apart. */
export function throttled(err: unknown): boolean {
  if (err instanceof RuntimeError) return false;
  const e = (err ?? {}) as SdkLikeError;
  return errorStatus(err) === 429 || [e.name, e.code, e.Code].some((c) => typeof c === 'string' && THROTTLE.codes.includes(c));
}

/**
 * The wait a Retry-After header of the answer asks for, in ms: delay-seconds or an HTTP date (the SDK's error keeps its
 * response; the SDK-free reader's keeps this one header). Undefined without one, or where it does not parse.
 */
export function retryAfterMs(err: unknown, now = Date.now()): number | undefined {
  const v = (err as { $response?: { headers?: Record<string, unknown> } } | undefined)?.$response?.headers?.['retry-after'];
  if (typeof v !== 'string') return undefined;
  const t = v.trim();
  if (/^\d+(\.\d+)?$/.test(t)) return Number(t) * 1000;
  const at = Date.parse(t);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/**
 * `fn` again after an error classify() calls transient (a 5xx, SlowDown, a reset), or that `retried` accepts instead,
 * up to `attempts` tries in all, with the fill's full-jitter backoff between them. A `signal` that aborts ends the
 * wait, and the last error is thrown: a bound on the retries holds, not one backoff more.
 */
export async function retryTransient<T>(fn: (attempt: number) => Promise<T>, attempts: number, signal?: AbortSignal,
  retried: (e: unknown) => boolean = (e) => classify(e) === 'transient', onThrottled?: (e: unknown) => number | undefined): Promise<T> {
  // Throttled answers, where `onThrottled` takes them, count no attempt: it says how long to wait, or (undefined) to give
  // up. `fn` is told the attempt's number among those counted (from 0), so below `attempts` however many were throttled.
  for (let counted = 0; ;) {
    try {
      return await fn(counted);
    } catch (e) {
      if (signal?.aborted || !retried(e)) throw e;
      const slowed = onThrottled !== undefined && throttled(e);
      const wait = slowed ? onThrottled(e) : undefined;
      if (slowed ? wait === undefined : ++counted >= attempts) throw e;
      await sleep(wait ?? backoffMs(counted - 1), undefined, signal ? { signal } : {}).catch(() => undefined);
      if (signal?.aborted) throw e;
    }
  }
}

/** The code of an error S3 passes on from KMS for an SSE-KMS object (`KMS.DisabledException`, …), if it is one. */
export function kmsCode(err: unknown): string | undefined {
  const e = (err ?? {}) as SdkLikeError;
  // Not every `code` is a string: a DOMException's is a number.
  return [e.name, e.code, e.Code].find((c): c is string => typeof c === 'string' && c.startsWith('KMS.'));
}

/**
 * What S3 (and MinIO) say, in the message of a 400 InvalidRequest, to a GET of an object stored with a customer-provided
 * key (SSE-C) that gave none: "The object was stored using a form of Server Side Encryption. The correct parameters must
 * be provided to retrieve the object." Ceph answers 400 InvalidArgument, "Requests specifying Server Side Encryption with
 * Customer provided keys must provide an appropriate secret key." Only the message tells them from other 400s of those
 * codes; a read sends no encryption header of its own that they could be about.
 */
export const CUSTOMER_KEY_MESSAGE = /server[- ]side encryption/i;

/**
 * Whether S3 refused a read because the object is encrypted with a customer-provided key (SSE-C), which this runtime
 * never holds. The SDK-free reader says so itself (`customerKey`: it keeps no message). A HEAD's refusal has no body, a
 * bare 400: not told apart, but a GET of the object comes first.
 */
export function customerKeyRequired(err: unknown): boolean {
  const e = (err ?? {}) as SdkLikeError & { message?: unknown; customerKey?: unknown };
  if (e.customerKey === true) return true;
  const code = e.name === 'InvalidRequest' || e.name === 'InvalidArgument' ? e.name : e.Code;
  return errorStatus(err) === 400 && (code === 'InvalidRequest' || code === 'InvalidArgument') && typeof e.message === 'string' && CUSTOMER_KEY_MESSAGE.test(e.message);
}

/** What to do about an SSE-C object at `uri` (`s3://bucket/key`): the end of the message of every STORAGE_SSE_C. */
export const customerKeyAdvice = (uri: string): string => 'this runtime does not read SSE-C objects (it is given no customer key); store it with SSE-S3 or '
  + `SSE-KMS instead, e.g. aws s3 cp ${uri} ${uri} --sse-c-copy-source AES256 --sse-c-copy-source-key fileb://<key file> --sse aws:kms`;

/** The S3 error's code (NoSuchKey, AccessDenied, …), else the HTTP status: what error messages name, never credentials. */
export function s3Code(err: unknown): string {
  const e = (err ?? {}) as { name?: string; code?: string };
  return e.name && e.name !== 'Error' ? e.name : (e.code ?? `HTTP ${errorStatus(err) ?? '?'}`);
}

/**
 * The S3 endpoint requests for `bucket` go to, as errors name it: the scheme, host and port of AWS_ENDPOINT_URL (or
 * S3_ENDPOINT, AWS_S3_ENDPOINT; never its user info, path or query), else AWS's own for the region, saying none is set.
 */
export function endpointName(s: Pick<S3Settings, 'endpoint' | 'region' | 'forcePathStyle'>, bucket: string): string {
  if (s.endpoint !== undefined) return new URL(s.endpoint).origin;
  // The SDK addresses a bucket whose name is one DNS label virtual-hosted on AWS, unless path-style is asked for.
  const host = !s.forcePathStyle && /^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/.test(bucket) ? `${bucket}.s3.${s.region}.amazonaws.com` : `s3.${s.region}.amazonaws.com`;
  return `https://${host}${AWS_OWN}${s.region}: none of AWS_ENDPOINT_URL, S3_ENDPOINT, AWS_S3_ENDPOINT is set)`;
}

/** What endpointName adds to AWS's own endpoint, whose host the region makes. */
const AWS_OWN = ' (AWS S3 in region ';

/** The variables the S3 endpoint is read from, first set first (config.ts). */
const ENDPOINT_VARIABLES = ['AWS_ENDPOINT_URL', 'S3_ENDPOINT', 'AWS_S3_ENDPOINT'] as const;

/**
 * The variable an operator set the S3 endpoint with, as advice names it; all three where none is (AWS's endpoint, or
 * the settings came from elsewhere than this process's environment).
 */
export function endpointVariable(env: NodeJS.ProcessEnv = process.env): string {
  return ENDPOINT_VARIABLES.find((k) => env[k]?.trim()) ?? 'AWS_ENDPOINT_URL (or S3_ENDPOINT, AWS_S3_ENDPOINT)';
}

/** What DNS names look like; anything else an error carries in their place is not echoed. */
const HOST_NAME = /^[A-Za-z0-9._-]{1,253}$/;

/**
 * What to check where the connection found no S3 endpoint, for the two a first deploy meets: a host with no DNS record
 * (a misspelled name, or a Service not made yet: retried, as it may be soon) and a port nothing listens on. Undefined
 * for any other failure, and where S3 answered. `endpoint`: endpointName's.
 */
function unreached(err: unknown, endpoint: string | undefined): string | undefined {
  if (atEndpoint(err, endpoint) === '') return undefined;
  for (let e = err as (SdkLikeError & { hostname?: unknown }) | undefined, depth = 0; e && depth < 3; e = e.cause as typeof e, depth++) {
    if (e.code === 'ENOTFOUND') {
      // The name looked up: the endpoint's host, or the bucket's name under it where buckets are addressed virtual-hosted.
      const host = typeof e.hostname === 'string' && HOST_NAME.test(e.hostname) ? e.hostname : new URL(endpoint!.split(' ')[0]!).hostname;
      // No endpoint variable set: the host is AWS's for the region, which is what to check (a misspelled AWS_REGION).
      if (endpoint!.includes(AWS_OWN)) {
        return `the S3 endpoint's host ${host} has no DNS record (ENOTFOUND at ${endpoint}): check AWS_REGION (else AWS_DEFAULT_REGION), which names the `
          + "AWS region whose S3 host is used, and this pod's DNS; for a store other than AWS S3 set AWS_ENDPOINT_URL";
      }
      return `the S3 endpoint's host ${host} has no DNS record (ENOTFOUND at ${endpoint}): check the host in ${endpointVariable()}, and that the Service it `
        + 'names exists';
    }
    if (e.code === 'ECONNREFUSED') {
      return `nothing listens at the S3 endpoint ${endpoint} (ECONNREFUSED): check the port in ${endpointVariable()}, and that the store is up`;
    }
  }
  return undefined;
}

/**
 * ` at the S3 endpoint …` for a failure of the connection itself (refused, reset, a name not resolved, a timeout, TLS),
 * where which endpoint was tried is the first thing to check; '' for anything S3 answered, or without `endpoint`.
 */
export function atEndpoint(err: unknown, endpoint: string | undefined): string {
  if (endpoint === undefined || err instanceof RuntimeError || errorStatus(err) !== undefined) return '';
  const kind = classify(err);
  return kind === 'transient' || kind === 'tls' ? ` at the S3 endpoint ${endpoint}` : '';
}

/**
 * A RuntimeError naming bucket and key (never credentials) for an error that retrying cannot fix; `endpoint`
 * (endpointName) is named where the connection itself failed.
 */
export function permanentError(err: unknown, bucket: string, key: string | undefined, action: string, endpoint?: string): RuntimeError {
  const e = (err ?? {}) as SdkLikeError;
  const kind = classify(err);
  const where = key === undefined ? `bucket "${bucket}"` : `s3://${bucket}/${key}`;
  // Already says what is wrong and what to do (s3-compat.ts): kept as it is.
  if (err instanceof RuntimeError && kind === 'fatal') return err;
  // A 400 for a key the request lacks, not a missing object: it was read as STORAGE_MISSING "… InvalidRequest".
  if (key !== undefined && customerKeyRequired(err)) {
    return new RuntimeError('STORAGE_SSE_C', `cannot ${action} s3://${bucket}/${key}: the object is encrypted with a customer-provided key (SSE-C; S3 answered `
      + `${s3Code(err)}); ${customerKeyAdvice(`s3://${bucket}/${key}`)}`, { cause: err });
  }
  const s3code = err instanceof RuntimeError ? err.code : s3Code(err);
  const region = bucketRegion(err);
  if (region !== undefined && kind === 'fatal') {
    return new RuntimeError('CONFIG', `cannot ${action} ${where}: the bucket is in region ${region}, and requests were signed for another (${s3code}); `
      + `set AWS_REGION=${region} (AWS_REGION, else AWS_DEFAULT_REGION as the OpenShift AI data connection sets it, else us-east-1 is used)`, { cause: err });
  }
  const status = errorStatus(err);
  if (kind === 'fatal' && status !== undefined && status >= 300 && status < 400) {
    return new RuntimeError('CONFIG', `cannot ${action} ${where}: S3 redirected the request (${s3code}, HTTP ${status}): the bucket is served by another endpoint or region; `
      + 'check AWS_REGION and AWS_ENDPOINT_URL', { cause: err });
  }
  const foreign = action.startsWith('list') ? notS3(err) : undefined;
  if (foreign !== undefined) {
    // The first request of a fill: a wrong endpoint is met here, and its answer says nothing of the bucket or keys.
    return new RuntimeError(kind === 'transient' ? 'STORAGE_TRANSIENT' : 'CONFIG', `cannot ${action} ${where}: the S3 endpoint${endpoint === undefined ? '' : ` ${endpoint}`} `
      + `answered ${foreign}, so something other than an S3 API answered (a web console, a router's page, a proxy); ${endpointVariable()} `
      + `must be the store's S3 API endpoint (MinIO: its API port, 9000 by default, not the console's 9001)${kind === 'transient' ? ', with the store behind it up' : ''}`, { cause: err });
  }
  const unset = unsetKeys(err);
  if (unset.length > 0) {
    // Nothing reached S3: "access denied" and the bucket policy would send the operator the wrong way.
    const which = unset.length === 2 ? `${unset.join(' and ')} are not set` : `${unset[0]} is not set (${unset[0] === 'AWS_ACCESS_KEY_ID' ? 'AWS_SECRET_ACCESS_KEY' : 'AWS_ACCESS_KEY_ID'} is)`;
    return new RuntimeError('STORAGE_DENIED', `cannot ${action} ${where}: no S3 credentials: ${which}, and the AWS SDK found no other source `
      + "(web identity, a profile, an instance role); give the pod the data connection Secret's keys with envFrom (templates/s3-secret.yaml)", { cause: err });
  }
  const kms = kmsCode(err);
  if (kind === 'denied' && kms !== undefined) {
    return new RuntimeError('STORAGE_DENIED', `access denied to ${action} ${where} (${kms}): the object is encrypted with SSE-KMS and its KMS key refused `
      + 'to decrypt it; the key must exist, be enabled, and allow kms:Decrypt to these credentials (key policy or IAM)', { cause: err });
  }
  if (kind === 'denied') {
    const hint = s3code === 'InvalidAccessKeyId' || s3code === 'SignatureDoesNotMatch'
      ? 'check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the data connection secret)'
      // AWS answers a GET of an SSE-KMS object that these credentials may not decrypt as a plain AccessDenied.
      : action.startsWith('read') ? 'check the credentials and the bucket policy, and for an object encrypted with SSE-KMS kms:Decrypt on its key'
        : 'check the credentials and the bucket policy';
    return new RuntimeError('STORAGE_DENIED', `access denied to ${action} ${where} (${s3code}); ${hint}`, { cause: err });
  }
  if (kind === 'missing') {
    const what = s3code === 'NoSuchBucket' ? `bucket "${bucket}" does not exist` : `${where} does not exist`;
    return new RuntimeError('STORAGE_MISSING', `cannot ${action}: ${what} (${s3code})`, { cause: err });
  }
  if (RETRY.skew.includes(s3code)) {
    return new RuntimeError('STORAGE_CLOCK_SKEW', `S3 refused the request time to ${action} ${where} (${s3code}): this pod's clock differs from S3's by more than S3 allows `
      + "(15 minutes) and S3's Date header did not correct it; fix the node's time synchronisation (NTP)", { cause: err });
  }
  // No descriptor for a socket: the limit's to raise, or the ranges in flight to lower; never the store's fault.
  const short = shortage(err);
  if (short) return shortageError(`cannot ${action} ${where}`, short, S3_ADVICE, err);
  if (kind === 'tls') {
    return new RuntimeError('STORAGE_TLS', `cannot ${action} ${where}: TLS to the S3 endpoint${endpoint === undefined ? '' : ` ${endpoint}`} failed (${s3code}); ${TLS_HINTS[tlsProblem(err)!]}`, { cause: err });
  }
  if (kind === 'transient') {
    const why = unreached(err, endpoint) ?? `${s3code}${atEndpoint(err, endpoint)}`;
    return new RuntimeError('STORAGE_TRANSIENT', `cannot ${action} ${where}: ${why} (gave up after retries)`, { cause: err });
  }
  return new RuntimeError('STORAGE_MISSING', `cannot ${action} ${where}: ${s3code}`, { cause: err });
}

/**
 * How an answer shows it is not S3's: an error status without an S3 error code (S3 and the stores speaking its API send
 * one with every error to a GET), or a 200 that is no listing. Undefined for S3's own answers and socket failures.
 */
function notS3(err: unknown): string | undefined {
  if (err instanceof RuntimeError) return undefined;
  const e = (err ?? {}) as SdkLikeError;
  const status = errorStatus(err);
  if (e.name === NOT_A_LISTING) return `HTTP ${status ?? 200} with no S3 listing`;
  return status !== undefined && status >= 400 && e.Code === undefined ? `HTTP ${status} without an S3 error code` : undefined;
}

/**
 * The static keys not set, where the AWS SDK found no credentials at all (its CredentialsProviderError); [] otherwise.
 * With both set the SDK skipped them (AWS_PROFILE) or another source failed: the generic advice fits better then.
 */
function unsetKeys(err: unknown, env: NodeJS.ProcessEnv = process.env): string[] {
  if (s3Code(err) !== 'CredentialsProviderError') return [];
  return ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'].filter((k) => !env[k]?.trim());
}

/** `3 attempts`, `1 attempt`: how many tries a message counts (S3_MAX_ATTEMPTS may be 1). */
export const attempts = (n: number): string => (n === 1 ? '1 attempt' : `${n} attempts`);
