// A pipeline worker that loads nothing and holds every generation it is given, in JS (test/worker-restart.test.ts);
// with workerData `fail`, it answers each one as the real worker answers a defect (INTERNAL, its stack as the detail).
// A real worker cannot stand in here: ending a thread while onnxruntime runs a session aborts the whole process
// (a thrown Napi::Error), so a worker that dies holding a generation is one whose thread is in JavaScript.
import path from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';

parentPort.on('message', (m) => {
  if (m.t === 'load') {
    parentPort.postMessage({
      t: 'loaded', defaults: {
        steps: 50, guidance: 7.5, modes: { img2img: { guidance: 7.5, strength: 0.8 }, inpaint: { guidance: 7.5, strength: 1 } }, height: 64, width: 64, scheduler: 'PNDMScheduler',
      },
      tokenizerDirs: [path.resolve(m.dir, 'tokenizer')], providers: { unet: 'cpu' }, optimize: [],
    });
  } else if (m.t === 'close') process.exit(0);
  else if (m.t === 'generate' && workerData?.fail) {
    parentPort.postMessage({ t: 'error', id: m.id, code: 'INTERNAL', message: 'generation failed', detail: new TypeError('a defect of the test').stack });
  }
  // 'generate': otherwise never answered.
});
