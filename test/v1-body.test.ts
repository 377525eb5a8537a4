/** The V1 prediction body built as bytes is exactly the JSON a client expects. */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import type { TaskResult } from '../src/runtime/engine.js';
import { predictionsBody } from '../src/server/v1.js';

const img = (n: number, seed: number) => {
  const b = randomBytes(n);
  return { data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer, seed, width: 64, height: 32, format: 'png' as const };
};
const result = (images: ReturnType<typeof img>[], uris?: string[]): TaskResult =>
  ({ images, times: { textEncoderMs: 0, denoiseMs: 0, vaeMs: 0, encodeMs: 0, steps: 0 }, batchSize: 1, queuedMs: 0, ...(uris ? { uris } : {}) }) as TaskResult;

describe('predictionsBody', () => {
  it('equals the JSON of the seed shape for images of every length mod 3, across results', () => {
    const a = [img(1000, 1), img(1001, 2)];
    const b = [img(1002, 9)];
    const body = predictionsBody([result(a), result(b)]);
    const expected = {
      predictions: [...a, ...b].map((i) => ({ image: { b64: Buffer.from(i.data).toString('base64') }, seed: i.seed, format: 'png', width: 64, height: 32 })),
    };
    expect(JSON.parse(body.toString('utf8'))).toEqual(expected);
    expect(body.toString('utf8')).toBe(JSON.stringify(expected));
  });

  it('returns the uri instead of base64 with output_uri', () => {
    const body = predictionsBody([result([img(10, 3), img(10, 4)], ['s3://b/k-0.png', 's3://b/k-1.png'])]);
    expect(JSON.parse(body.toString())).toEqual({
      predictions: [
        { image: { uri: 's3://b/k-0.png' }, seed: 3, format: 'png', width: 64, height: 32 },
        { image: { uri: 's3://b/k-1.png' }, seed: 4, format: 'png', width: 64, height: 32 },
      ],
    });
  });

  it('handles an empty result list', () => {
    expect(JSON.parse(predictionsBody([]).toString())).toEqual({ predictions: [] });
  });
});
