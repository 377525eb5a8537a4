// A model fetch (dist/src/storage/fetch.js, configured by the environment) in a process that takes every descriptor
// it has left once S3 first answers, and every one freed after, until the download says it goes on with fewer ranges
// (test/open-files.test.ts). Prints one JSON line: how the fetch ended, and the log lines it wrote.
import { closeSync, openSync } from 'node:fs';
import { Writable } from 'node:stream';
import { loadConfig } from '../../dist/src/config.js';
import { createLogger } from '../../dist/src/log.js';
import { resolveModel } from '../../dist/src/storage/fetch.js';

const hog = [];
let hogging = false;
const giveBack = () => {
  hogging = false;
  for (const fd of hog.splice(0)) closeSync(fd);
};
const lines = [];
const log = createLogger('info', 'hog-fetch', new Writable({
  write(chunk, _enc, done) {
    const line = JSON.parse(String(chunk));
    lines.push(line);
    if (String(line.msg).startsWith('out of file descriptors')) giveBack();
    done();
  },
}));
let held = 0;
// Every loop turn: what the download frees (a file finished, a socket closed) is taken again before it can reuse it.
const takeAll = () => {
  hogging = true;
  const grab = () => {
    if (!hogging) return;
    try {
      for (;;) hog.push(openSync('/dev/null', 'r'));
    } catch {
      held = Math.max(held, hog.length);
    }
    setImmediate(grab);
  };
  grab();
};
let result;
try {
  const r = await resolveModel(process.env.STORAGE_URI, { cfg: loadConfig(process.env), log, onFirstResponse: takeAll });
  result = { ok: true, dir: r.dir, files: r.files };
} catch (e) {
  result = { ok: false, code: e.code, message: e.message };
}
giveBack();
process.stdout.write(`${JSON.stringify({ ...result, held, lines })}\n`);
