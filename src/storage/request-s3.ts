/**
 * @module The one AWS SDK client for the objects requests name (img2img input images, output_uri), made on first
 * use: most deployments never need it, so the SDK loads then, not at boot. Same endpoint, path-style and TLS settings
 * as the model download.
 */
import type { S3Settings } from '../config.js';
import type { S3Handle } from './s3-sdk.js';
import { RuntimeError } from '../errors.js';
import { loadSdk } from './choose-transport.js';
import { fallbackNote, fallbackProblem, virtualHostedFallback } from './addressing.js';

export interface RequestS3 {
  /** The client, created (and the SDK imported) on the first call. */
  client(): Promise<S3Handle['client']>;
  /** Closes its idle keep-alive sockets; a later call makes a new client. */
  destroy(): void;
  /**
   * Checks that `bucket` can be addressed as the S3 settings ask (addressing.ts), before any request: a bucket the SDK
   * cannot address at all is the request's 400, naming `field`. Returns what to add to a denial or a missing bucket
   * when it goes path-style though virtual-hosted addressing is on (a store that serves only virtual-hosted requests
   * answers so), else ''.
   */
  addressing(bucket: string, field: string): string;
}

export function createRequestS3(s3: Readonly<S3Settings>, concurrency = 8): RequestS3 {
  let handle: S3Handle | undefined;
  return {
    async client() {
      const storage = await loadSdk();
      handle ??= storage.createS3(s3, concurrency);
      return handle.client;
    },
    destroy() {
      handle?.destroy();
      handle = undefined;
    },
    addressing(bucket, field) {
      const f = virtualHostedFallback(s3, bucket);
      if (f?.unaddressable) throw new RuntimeError('INVALID_INPUT', fallbackProblem(field, f));
      return f ? fallbackNote(f) : '';
    },
  };
}
