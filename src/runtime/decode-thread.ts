/**
 * @module A decoding thread (decode-client.ts starts it and keeps it between pictures): each file arrives as a message,
 * its answer (or the decoder's complaint) goes back with the file. A BMP is decoded whole (bmp.ts); a GIF's first frame
 * is found and cut out for libvips (gif.ts), which walks every sub-block before the end of the first image's data and
 * copies that data.
 */
import { parentPort } from 'node:worker_threads';
import { readBmp } from './bmp.js';
import { gifFirstFrame } from './gif.js';
import type { ThreadJob, ThreadReply } from './decode-client.js';

parentPort!.on('message', ({ job, bytes }: { job: ThreadJob; bytes: Uint8Array<ArrayBuffer> }) => {
  // The file goes back too, to be collected there: here it would stay until this thread's next collection (~8 s
  // later when idle).
  let reply: ThreadReply;
  let moved: ArrayBuffer[] = [bytes.buffer];
  try {
    const answer = job === 'bmp' ? readBmp(bytes).decode() : gifFirstFrame(bytes);
    reply = { answer, bytes };
    moved = [(answer instanceof Uint8Array ? answer : answer.frame).buffer as ArrayBuffer, bytes.buffer];
  } catch (err) {
    reply = { error: String((err as Error)?.message ?? err), bytes };
  }
  parentPort!.postMessage(reply, moved);
});
