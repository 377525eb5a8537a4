/** The one error class and the one error boundary: HTTP statuses from request codes, boot and storage outcomes apart. */
import { describe, expect, it } from 'vitest';
import { httpStatus, RuntimeError } from '../src/errors.js';
import { silentLogger } from '../src/log.js';
import { errorReply } from '../src/server/http.js';

const body = (err: unknown) => {
  const r = errorReply(err, silentLogger());
  return [r.status, JSON.parse(String(r.body)), r.headers] as const;
};

describe('errors', () => {
  it('a request error has its own status; a boot or storage outcome that reaches a request is a 500; so is a code this build does not know', () => {
    expect(['INVALID_INPUT', 'MODEL_NOT_FOUND', 'HEADERS_TOO_LARGE', 'CANCELLED', 'UNSUPPORTED', 'BUSY', 'TIMEOUT'].map(httpStatus)).toEqual([400, 404, 431, 499, 501, 503, 504]);
    expect(['STORAGE_TRANSIENT', 'STORAGE_STALL', 'NO_SPACE', 'MODEL_FORMAT'].map(httpStatus)).toEqual([500, 500, 500, 500]);
    expect(httpStatus('SOMETHING_NEW')).toBe(500);
    expect(httpStatus('toString')).toBe(500);
  });

  it('the boundary answers every error with KServe\'s body plus its code (and its fields, Retry-After), and nothing of an unknown error', () => {
    expect(body(new RuntimeError('BUSY', 'full', { retryAfter: 2 }))).toEqual([503, { error: 'full', code: 'BUSY' }, { 'retry-after': '2' }]);
    expect(body(new RuntimeError('MODEL_NOT_READY', 'not yet', { fields: { ready: false, state: 'fetching' } }))).toEqual([503, { error: 'not yet', code: 'MODEL_NOT_READY', ready: false, state: 'fetching' }, {}]);
    expect(body(new RuntimeError('STORAGE_TRANSIENT', 'upload failed'))).toEqual([500, { error: 'upload failed', code: 'STORAGE_TRANSIENT' }, {}]);
    expect(body(new TypeError('x is undefined at /src/secret.ts:1'))).toEqual([500, { error: 'internal error', code: 'INTERNAL' }, undefined]);
  });
});
