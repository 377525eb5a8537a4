/**
 * @module The one AWS SDK client for the objects requests name (img2img input images, output_uri), made on first
 * use: most deployments never need it, so the SDK loads then, not at boot. Same endpoint, path-style and TLS settings
 * as the model download, and the same throttling rules (throttle.ts).
 */
import type { S3Settings } from '../config.js';
import { silentLogger, type Logger } from '../log.js';
import type { LostCreatesOutcome } from './multipart.js';
import type { S3Handle } from './s3-sdk.js';
import { RuntimeError } from '../errors.js';
import { loadSdk } from './choose-transport.js';
import { fallbackNote, fallbackProblem, virtualHostedFallback } from './addressing.js';
import { endpointName } from './s3-errors.js';
import { Throttle, ThrottleLog, type ThrottleOptions } from './throttle.js';

export interface RequestS3 {
  /** The client, created (and the SDK imported) on the first call. */
  client(): Promise<S3Handle['client']>;
  /** Closes its idle keep-alive sockets, and logs the throttling of reads and uploads not told yet; a later call makes a new client. */
  destroy(): void;
  /**
   * Checks that `bucket` can be addressed as the S3 settings ask (addressing.ts), before any request: a bucket the SDK
   * cannot address at all is the request's 400, naming `field`. Returns what to add to a denial or a missing bucket
   * when it goes path-style though virtual-hosted addressing is on (a store that serves only virtual-hosted requests
   * answers so), else ''.
   */
  addressing(bucket: string, field: string): string;
  /** The endpoint requests for `bucket` go to, as errors name it (s3-errors.ts endpointName). */
  endpoint(bucket: string): string;
  /** How one request's GET meets throttling (throttle.ts): S3_THROTTLE_TIMEOUT_S, the client's log. */
  throttle(what: 'read', o: Pick<ThrottleOptions, 'fields' | 'watch'>): Throttle;
}

/**
 * `log` hears of the multipart uploads that an output_uri upload's CreateMultipartUpload, carried out but left
 * unanswered, made: aborted, or left.
 */
export function createRequestS3(s3: Readonly<S3Settings>, concurrency = 8, log?: Logger): RequestS3 {
  let handle: S3Handle | undefined;
  // One line at a time for the reads S3 throttles, not one per request.
  const reads = new ThrottleLog(log ?? silentLogger(), 'read');
  const onLostCreates = (o: LostCreatesOutcome) => {
    const uri = `s3://${o.bucket}/${o.key}`;
    if (o.aborted.length > 0) log?.info({ uri, uploads: o.aborted.length }, 'output_uri: aborted the multipart upload that a CreateMultipartUpload left unanswered made');
    if (o.failed !== undefined) {
      log?.warn({ uri, reason: o.failed }, 'output_uri: a CreateMultipartUpload was left unanswered, and the multipart upload it may have made could not be looked for '
        + 'or aborted; it holds no part, but ListMultipartUploads shows it until aborted (aws s3api list-multipart-uploads, abort-multipart-upload) or a '
        + 'lifecycle rule (AbortIncompleteMultipartUpload) removes it');
    }
  };
  return {
    async client() {
      const storage = await loadSdk();
      handle ??= storage.createS3(s3, concurrency, onLostCreates, log);
      return handle.client;
    },
    destroy() {
      reads.flush();
      handle?.destroy();
      handle = undefined;
    },
    addressing(bucket, field) {
      const f = virtualHostedFallback(s3, bucket);
      if (f?.unaddressable) throw new RuntimeError('INVALID_INPUT', fallbackProblem(field, f));
      return f ? fallbackNote(f) : '';
    },
    endpoint: (bucket) => endpointName(s3, bucket),
    throttle: (what, o) => new Throttle({ concurrency: 1, timeoutMs: s3.throttleTimeoutS * 1000, log: log ?? silentLogger(), what, gate: reads, ...o }),
  };
}
