/**
 * @module Which transport serves a fetch, decided once per fetch: the AWS SDK, unless the operator opts in with
 * S3_TRANSPORT=lite, and even then the SDK wherever the SDK-free reader might sign or route differently (credentials
 * other than static keys, AWS config files, FIPS, …: s3-lite.ts `liteDeclines`). Light on purpose: the boot asks it
 * before the runtime's code has loaded, to start the chosen transport's import early.
 */
import type { S3Settings } from '../config.js';
import { firstUse } from '../descriptors.js';
import { createLiteTransport, liteDeclines, liteTarget, loadSigner, type LiteTarget } from './s3-lite.js';
import type { S3Transport } from './transport.js';

export type TransportChoice =
  | { readonly name: 'sdk'; /** Why S3_TRANSPORT=lite could not be honoured, for the log. */ readonly declined?: string }
  | { readonly name: 'lite'; readonly target: LiteTarget };

/** Pure: the boot and the fetch engine ask it alike and get the same answer. */
export function chooseTransport(s: Readonly<S3Settings>, bucket: string, env: NodeJS.ProcessEnv = process.env): TransportChoice {
  if (s.transport !== 'lite') return { name: 'sdk' };
  const why = liteDeclines(s, bucket, env);
  if (why !== undefined) return { name: 'sdk', declined: why };
  try {
    return { name: 'lite', target: liteTarget(s, bucket, env)! };
  } catch {
    // An unreadable CA bundle: the SDK reports it in its own words.
    return { name: 'sdk', declined: 'AWS_CA_BUNDLE could not be read' };
  }
}

/** The AWS SDK's client and transport (s3-sdk.ts), imported once for fetches, input images and uploads alike. */
export const loadSdk = firstUse('the S3 client (AWS SDK)', () => import('./s3-sdk.js'));

/**
 * Starts loading the chosen transport's code (the AWS SDK takes ~250 ms of CPU to import, the SDK-free reader's
 * signer ~100 ms): the boot calls this as soon as STORAGE_URI is known to be s3://.
 */
export function loadTransport(choice: TransportChoice): void {
  const p = choice.name === 'sdk' ? loadSdk() : loadSigner();
  p.catch(() => undefined); // reported by openTransport
}

/** The transport of one fetch of `bucket`. */
export async function openTransport(choice: TransportChoice, s: Readonly<S3Settings>, bucket: string): Promise<S3Transport> {
  if (choice.name === 'lite') return createLiteTransport(choice.target, s);
  const { createSdkTransport } = await loadSdk();
  return createSdkTransport(s, bucket);
}
