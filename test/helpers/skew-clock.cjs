// Preloaded (node --require) into a child process to give it a clock TEST_CLOCK_SKEW_MS off, as a pod on a node
// without time synchronisation has: Date.now() and new Date() move; timers and performance.now() do not.
'use strict';
const skew = Number(process.env.TEST_CLOCK_SKEW_MS || 0);
const RealDate = Date;
class SkewedDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(RealDate.now() + skew);
    else super(...args);
  }
  static now() {
    return RealDate.now() + skew;
  }
}
globalThis.Date = SkewedDate;
