/**
 * @module An independent reading of AWS Signature Version 4 for tests: the HMAC chain of AWS's "Signature Calculations
 * for the Authorization Header (AWS Signature Version 4)" written out with node:crypto, on the store's side. It
 * recomputes a request's signature from what arrived on the socket, so a path or query sent in another encoding than
 * the one signed fails. (src/storage/s3-lite.ts signed this way before it used the SDK's own signer.)
 */
import { createHash, createHmac } from 'node:crypto';
import type { IncomingMessage } from 'node:http';

const encode = (s: string) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
const hmac = (key: Buffer | string, s: string) => createHmac('sha256', key).update(s, 'utf8').digest();

/** The canonical query of a raw query string: each pair decoded, encoded as SigV4 wants, sorted by key then value. */
function canonicalQuery(raw: string): string {
  if (raw === '') return '';
  return raw.split('&').map((kv) => {
    const i = kv.indexOf('=');
    const [k, v] = i < 0 ? [kv, ''] : [kv.slice(0, i), kv.slice(i + 1)];
    return [encode(decodeURIComponent(k)), encode(decodeURIComponent(v))] as const;
  }).sort(([ak, av], [bk, bv]) => (ak < bk ? -1 : ak > bk ? 1 : av < bv ? -1 : av > bv ? 1 : 0)).map(([k, v]) => `${k}=${v}`).join('&');
}

/** The signed header names of a request and whether its signature is the one `secret` gives; `why` when it is not. */
export function verifySigV4(req: IncomingMessage, secret: string): { ok: boolean; signed: string[]; why?: string } {
  const auth = /^AWS4-HMAC-SHA256 Credential=([^/]+)\/(\d{8})\/([^/]+)\/([^/]+)\/aws4_request, SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$/.exec(String(req.headers.authorization));
  if (!auth) return { ok: false, signed: [], why: `malformed Authorization: ${String(req.headers.authorization)}` };
  const [, , day, region, service, signedList, signature] = auth as unknown as string[];
  const signed = signedList!.split(';');
  const amzDate = String(req.headers['x-amz-date']);
  const payload = String(req.headers['x-amz-content-sha256']);
  const url = req.url!;
  const q = url.indexOf('?');
  const canonical = [
    req.method,
    q < 0 ? url : url.slice(0, q),
    canonicalQuery(q < 0 ? '' : url.slice(q + 1)),
    ...signed.map((n) => `${n}:${String(req.headers[n]).trim().replace(/\s+/g, ' ')}`),
    '',
    signed.join(';'),
    payload,
  ].join('\n');
  const scope = `${day}/${region}/${service}/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, createHash('sha256').update(canonical, 'utf8').digest('hex')].join('\n');
  const key = hmac(hmac(hmac(hmac(`AWS4${secret}`, day!), region!), service!), 'aws4_request');
  const want = createHmac('sha256', key).update(toSign, 'utf8').digest('hex');
  return want === signature ? { ok: true, signed } : { ok: false, signed, why: `signature mismatch; canonical request:\n${canonical}` };
}
