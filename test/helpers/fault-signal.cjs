// Preloaded (node --require) into a server process: on SIGUSR2 its main thread meets what a defect would make, a Node
// warning, then a promise rejected with a multi-line error that nothing handles.
'use strict';
const { isMainThread } = require('node:worker_threads');
if (isMainThread) {
  process.on('SIGUSR2', () => {
    process.emitWarning('a warning of the test', 'TestWarning');
    setTimeout(() => void Promise.reject(new Error('a fault of the test\nits second line')), 100);
  });
}
