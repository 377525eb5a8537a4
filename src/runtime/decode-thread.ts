/**
 * @module The thread an input image's JavaScript decoding runs on (decode-client.ts starts one per picture): the file
 * arrives as workerData, the answer (or the decoder's complaint) goes back, and the thread ends. A BMP is decoded whole
 * (bmp.ts); a GIF's first frame is found and cut out for libvips (gif.ts), which walks every sub-block before the end
 * of the first image's data and copies that data.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { readBmp } from './bmp.js';
import { gifFirstFrame } from './gif.js';
import type { ThreadJob } from './decode-client.js';

const { job, bytes } = workerData as { job: ThreadJob; bytes: Uint8Array<ArrayBuffer> };
try {
  const answer = job === 'bmp' ? readBmp(bytes).decode() : gifFirstFrame(bytes);
  const out = answer instanceof Uint8Array ? answer : answer.frame;
  // The file goes back too: its copy leaves with the thread rather than wait for a collection here.
  parentPort!.postMessage({ answer, bytes }, [out.buffer as ArrayBuffer, bytes.buffer]);
} catch (err) {
  parentPort!.postMessage({ error: String((err as Error)?.message ?? err) });
}
