// A pipeline worker that loads nothing and holds every generation it is given, in JS (test/worker-restart.test.ts).
// A real worker cannot stand in here: ending a thread while onnxruntime runs a session aborts the whole process
// (a thrown Napi::Error), so a worker that dies holding a generation is one whose thread is in JavaScript.
import path from 'node:path';
import { parentPort } from 'node:worker_threads';

parentPort.on('message', (m) => {
  if (m.t === 'load') {
    parentPort.postMessage({
      t: 'loaded', defaults: {
        steps: 50, guidance: 7.5, modes: { img2img: { guidance: 7.5, strength: 0.8 }, inpaint: { guidance: 7.5, strength: 1 } }, height: 64, width: 64, scheduler: 'PNDMScheduler',
      },
      tokenizerDirs: [path.resolve(m.dir, 'tokenizer')], providers: { unet: 'cpu' }, optimize: [],
    });
  } else if (m.t === 'close') process.exit(0);
  // 'generate': never answered.
});
