// Preloaded (node --require) into a child process to give it what a wildcard DNS record gives a cluster: TEST_DNS_ZONE
// (e.g. `s3.test`) and every name under it (`models.s3.test`) resolve to 127.0.0.1, so a store can be addressed
// virtual-hosted on loopback. Only resolution is replaced: net reads dns.lookup at connect time, so the real client
// and real sockets are used; every other name goes to the original resolver.
'use strict';
const dns = require('node:dns');
const zone = (process.env.TEST_DNS_ZONE || '').toLowerCase().replace(/\.$/, '');
if (zone !== '') {
  const inZone = (name) => {
    const n = String(name).toLowerCase().replace(/\.$/, '');
    return n === zone || n.endsWith(`.${zone}`);
  };
  const answer = (options) => {
    const all = typeof options === 'object' && options !== null && options.all === true;
    return all ? [{ address: '127.0.0.1', family: 4 }] : { address: '127.0.0.1', family: 4 };
  };
  const original = dns.lookup;
  dns.lookup = function lookup(hostname, options, callback) {
    if (!inZone(hostname)) return original.apply(this, arguments);
    const cb = typeof options === 'function' ? options : callback;
    const a = answer(options);
    process.nextTick(() => (Array.isArray(a) ? cb(null, a) : cb(null, a.address, a.family)));
    return {};
  };
  const originalPromise = dns.promises.lookup;
  dns.promises.lookup = function lookup(hostname, options) {
    if (!inZone(hostname)) return originalPromise.apply(this, arguments);
    return Promise.resolve(answer(options));
  };
}
