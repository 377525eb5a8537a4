/**
 * @module The multipart uploads an S3 client starts and has not finished, so that a push which stops part-way can
 * abort them: an upload neither completed nor aborted keeps its parts, billed, until a lifecycle rule removes them,
 * and no listing of the prefix shows it.
 */
import type { S3Client } from '@aws-sdk/client-s3';
import { deadline } from '../deadline.js';
import { retryTransient } from './s3-errors.js';
import { noteMultipart } from './upload-signal.js';

export interface UploadTracker {
  /** Uploads the store created and that were neither completed nor aborted through this client: key by UploadId. */
  readonly open: ReadonlyMap<string, string>;
  /**
   * From now on the client sends nothing (a request fails before it is sent, so no part follows); resolves once no
   * CreateMultipartUpload is in flight, whose UploadId would otherwise be unknown, or after `ms`.
   */
  stop(ms: number): Promise<void>;
}

export function trackUploads(client: S3Client): UploadTracker {
  const open = new Map<string, string>();
  let stopped = false;
  let creating = 0;
  let idle: (() => void) | undefined;
  client.middlewareStack.add((next, context) => async (args) => {
    if (stopped) throw Object.assign(new Error('the upload was stopped'), { name: 'AbortError' });
    const input = args.input as { Key?: string; UploadId?: string };
    const create = context.commandName === 'CreateMultipartUploadCommand';
    if (create) creating++;
    try {
      const out = await next(args);
      noteMultipart(open, context.commandName, input, { output: out.output });
      return out;
    } catch (error) {
      // NoSuchUpload (a retried Complete whose first answer was lost, which upload-retry.ts may take as done): nothing
      // left to abort, nor to name as aborted.
      noteMultipart(open, context.commandName, input, { error });
      throw error;
    } finally {
      if (create && --creating === 0) idle?.();
    }
  }, { step: 'initialize', name: 'trackMultipartUploads' });
  return {
    open,
    stop(ms) {
      stopped = true;
      if (creating === 0) return Promise.resolve();
      return new Promise<void>((resolve) => {
        const t = setTimeout(resolve, ms);
        idle = () => {
          clearTimeout(t);
          resolve();
        };
      });
    },
  };
}

/**
 * Aborts these multipart uploads (UploadId, key) of `bucket`: each attempt cut after `attemptMs` unanswered, a transient
 * refusal or a cut attempt tried again (8 tries), all within `totalMs`. One the store no longer knows (NoSuchUpload:
 * completed, or aborted already) counts as aborted. One result per upload, in order.
 */
export async function abortUploads(client: S3Client, bucket: string, uploads: readonly (readonly [string, string])[], totalMs: number,
  attemptMs = 5_000): Promise<PromiseSettledResult<void>[]> {
  // Loaded here: the warm-up CLI imports this module, and with S3_TRANSPORT=lite a fill never loads the AWS SDK.
  const { AbortMultipartUploadCommand } = await import('@aws-sdk/client-s3');
  const total = deadline(undefined, totalMs);
  try {
    return await Promise.allSettled(uploads.map(([UploadId, Key]) => retryTransient(async () => {
      const one = deadline(total.signal, attemptMs);
      try {
        await client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key, UploadId }), { abortSignal: one.signal });
      } catch (e) {
        // An attempt the store left unanswered: the SDK's AbortError would end the retries, so its TimeoutError is thrown.
        if (one.timedOut) throw one.signal.reason;
        if ((e as Error)?.name !== 'NoSuchUpload') throw e;
      } finally {
        one.clear();
      }
    }, 8, total.signal)));
  } finally {
    total.clear();
  }
}
