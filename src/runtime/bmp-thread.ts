/**
 * @module The thread a BMP is decoded on (bmp-client.ts starts one per picture): the file arrives as workerData, its
 * RGB pixels (or the decoder's complaint) go back, and the thread ends.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { readBmp } from './bmp.js';

const bytes = workerData as Uint8Array<ArrayBuffer>;
try {
  const data = readBmp(bytes).decode();
  // The file goes back too: its copy leaves with the thread rather than wait for a collection here.
  parentPort!.postMessage({ data, bytes }, [data.buffer as ArrayBuffer, bytes.buffer]);
} catch (err) {
  parentPort!.postMessage({ error: String((err as Error)?.message ?? err) });
}
