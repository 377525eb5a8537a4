/**
 * @module The multipart uploads an S3 client starts and has not finished, so that a push which stops part-way can
 * abort them: an upload neither completed nor aborted keeps its parts, billed, until a lifecycle rule removes them,
 * and no listing of the prefix shows it.
 */
import type { S3Client } from '@aws-sdk/client-s3';

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
    const ends = /^(Complete|Abort)MultipartUploadCommand$/.test(context.commandName ?? '');
    try {
      const out = await next(args);
      const id = create ? (out.output as { UploadId?: string }).UploadId : input.UploadId;
      if (create && id !== undefined) open.set(id, input.Key ?? '');
      else if (id !== undefined && ends) open.delete(id);
      return out;
    } catch (e) {
      // The store no longer knows the upload (a retried Complete whose first answer was lost, which upload-retry.ts
      // may take as done): there is nothing left to abort, nor to name as aborted.
      if (ends && input.UploadId !== undefined && (e as Error)?.name === 'NoSuchUpload') open.delete(input.UploadId);
      throw e;
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
