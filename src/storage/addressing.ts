/**
 * @module How the AWS SDK addresses a bucket on a custom endpoint when virtual-hosted addressing is asked for
 * (S3_USER_VIRTUAL_BUCKET=1, or S3_FORCE_PATH_STYLE=0): its endpoint rules go path-style without a word for some
 * buckets, which a store that serves virtual-hosted requests only (Alibaba OSS) refuses as if the credentials were
 * wrong, and for one kind build no valid URL at all. The model fetch, `warmup push`, output_uri and s3:// inputs say
 * so. test/s3-vhost.test.ts checks these rules against the SDK's own resolution.
 */
import { isIP } from 'node:net';
import { domainToASCII } from 'node:url';
import type { S3Settings } from '../config.js';
import { RuntimeError } from '../errors.js';
import { parseStorageUri, type StorageSource } from './uri.js';

/**
 * A bucket name (or one dot-separated part of one) that can be a host-name label: 3-63 lower-case letters, digits and
 * hyphens, a letter or digit at each end (the AWS SDK's isVirtualHostableS3Bucket).
 */
export const DNS_LABEL_BUCKET = /^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/;

export interface AddressingFallback {
  /** Why the bucket is not addressed virtual-hosted. */
  reason: string;
  /** What to do. */
  advice: string;
  /** The SDK cannot address it at all (it would build an invalid URL): refuse it before any request. */
  unaddressable?: true;
}

const ASKED = 'virtual-hosted addressing (S3_USER_VIRTUAL_BUCKET=1 or S3_FORCE_PATH_STYLE=0)';
const PATH_STYLE = 'read it path-style (unset S3_USER_VIRTUAL_BUCKET, or S3_FORCE_PATH_STYLE=1)';

/**
 * Why `bucket` is not addressed virtual-hosted although that is asked for, as the SDK's endpoint rules decide: a bucket
 * of one label on a named host is; over http so is a dotted name whose every part is such a label (over https such a
 * name could not match a wildcard certificate); every other bucket goes path-style, except a dotted one over http on
 * an IP address, which the SDK puts in front of the address (an invalid URL). Undefined when it is virtual-hosted, or
 * when path-style was asked for.
 */
export function virtualHostedFallback(s: Pick<S3Settings, 'endpoint' | 'forcePathStyle'>, bucket: string): AddressingFallback | undefined {
  if (s.endpoint === undefined || s.forcePathStyle) return undefined;
  const url = new URL(s.endpoint);
  const ip = isIP(url.hostname.replace(/^\[(.*)\]$/, '$1')) !== 0;
  const http = url.protocol === 'http:';
  const oneLabel = DNS_LABEL_BUCKET.test(bucket);
  // A dotted name that starts like an IPv4 address is never put in a host name (S3 forbids such bucket names).
  const labels = bucket.includes('.') && bucket.split('.').every((l) => DNS_LABEL_BUCKET.test(l)) && !/^\d+\.\d+\.\d+\.\d+(\.|$)/.test(bucket);
  const name = JSON.stringify(bucket);
  const intoHost = ip ? http && labels : oneLabel || (http && labels);
  // An `xn--` label that is no valid punycode: the URL the SDK builds with it in the host does not parse.
  if (intoHost && bucket.split('.').some((l) => domainToASCII(l) === '')) {
    return {
      reason: `bucket ${name} has a label that is not valid punycode ("xn--…"): the AWS SDK would put it in a host name, which is no valid URL`,
      advice: `${PATH_STYLE}, or copy the model to a bucket with a plain name`,
      unaddressable: true,
    };
  }
  if (!ip && intoHost) return undefined;
  if (ip && http && labels) {
    return {
      reason: `bucket ${name} has dots and the endpoint's host is an IP address: the AWS SDK would put the bucket in front of the address, which is no valid URL`,
      advice: `give AWS_ENDPOINT_URL as a DNS name, or ${PATH_STYLE}`,
      unaddressable: true,
    };
  }
  if (ip) return { reason: "the endpoint's host is an IP address", advice: `give AWS_ENDPOINT_URL as a DNS name under which every bucket is a subdomain, or ${PATH_STYLE}` };
  if (labels) {
    return { reason: `bucket ${name} has dots, which over https cannot match the store's wildcard certificate`, advice: `${PATH_STYLE}, or copy the model to a bucket without dots` };
  }
  return {
    reason: `bucket ${name} is not a host name (3-63 lower-case letters, digits and hyphens${http ? ', or such parts joined by dots' : ''})`,
    advice: `${PATH_STYLE}, or copy the model to a bucket whose name is one`,
  };
}

/** The warning logged once per bucket a process reads or writes path-style though virtual-hosted was asked for. */
export const VIRTUAL_HOSTED_FALLBACK = `${ASKED} cannot apply to this bucket; the AWS SDK addresses it path-style`;

/** The end of an error message about a bucket that went path-style (virtualHostedFallback): what happened and what to do. */
export function fallbackNote(f: AddressingFallback): string {
  return `; requests for it went path-style although ${ASKED} is on: ${f.reason}; ${f.advice}`;
}

/**
 * A denial or a missing bucket of a bucket that went path-style though virtual-hosted addressing was asked for, with
 * that said: that is how a store serving virtual-hosted requests only answers, which alone would send the operator to
 * the credentials. Other failures (the network, a stall, TLS) are not about addressing and stay as they are.
 */
export function explainFallback(e: unknown, fallback: AddressingFallback | undefined): unknown {
  if (fallback === undefined || !(e instanceof RuntimeError) || (e.code !== 'STORAGE_DENIED' && e.code !== 'STORAGE_MISSING')) return e;
  return new RuntimeError(e.code, `${e.message}${fallbackNote(fallback)}`, {
    cause: e, ...(e.retryAfter !== undefined ? { retryAfter: e.retryAfter } : {}), ...(e.fields !== undefined ? { fields: e.fields } : {}),
  });
}

/** `what` (a variable, a request field, a URI) with why its bucket is not addressed virtual-hosted and what to do. */
export const fallbackProblem = (what: string, f: AddressingFallback): string => `${what}: ${f.reason}; ${f.advice}`;

/** The error for a bucket the SDK cannot address at all, before any request. */
export function unaddressable(what: string, f: AddressingFallback): RuntimeError {
  return new RuntimeError('CONFIG', fallbackProblem(what, f));
}

const warned = new Set<string>();

/**
 * The addressing of `bucket` for a fetch or an upload: logs the fallback once per endpoint and bucket in this process
 * (adapters from LORA_URI share a bucket), and throws when the SDK cannot address it at all.
 */
export function checkAddressing(s: Pick<S3Settings, 'endpoint' | 'forcePathStyle'>, bucket: string, what: string,
  warn: (fields: AddressingFallback & { bucket: string }, msg: string) => void): AddressingFallback | undefined {
  const f = virtualHostedFallback(s, bucket);
  if (f === undefined) return undefined;
  if (f.unaddressable) throw unaddressable(what, f);
  const key = `${s.endpoint}|${bucket}`;
  if (!warned.has(key)) {
    warned.add(key);
    warn({ ...f, bucket }, VIRTUAL_HOSTED_FALLBACK);
  }
  return f;
}

/**
 * STORAGE_URI's and LORA_URI's buckets that the SDK could not address at all under these S3 settings, as problems of
 * the configuration: said at start, not as a boot failure or an adapter's 502 after every request.
 */
export function unaddressableUris(cfg: { s3: Pick<S3Settings, 'endpoint' | 'forcePathStyle'>; storageUri?: string | undefined; loraUri?: string | undefined }): string[] {
  const problems: string[] = [];
  for (const [name, uri] of [['STORAGE_URI', cfg.storageUri], ['LORA_URI', cfg.loraUri]] as const) {
    let src: StorageSource | undefined;
    try {
      src = uri === undefined ? undefined : parseStorageUri(uri);
    } catch {
      // A URI of the wrong form is the boot's (or the adapter lookup's) to report, with its own message.
    }
    const f = src?.kind === 's3' ? virtualHostedFallback(cfg.s3, src.bucket) : undefined;
    if (f?.unaddressable) problems.push(fallbackProblem(name, f));
  }
  return problems;
}
