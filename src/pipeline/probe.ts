/**
 * @module A one-MatMul ONNX model (y = x·I, x float32 [1,4]) that the session factory creates and runs first on CUDA,
 * so the provider library, the CUDA context and what a first run loads come up while the weights still download. Built by
 * src/demo/graph.ts; test/probe.test.ts rebuilds it and checks these bytes. Embedded so the worker needs no
 * protobuf library for it.
 */
const PROBE_BASE64 =
  'CAgSFmRpZmZ1c2Vycy1ydW50aW1lLWRlbW8aATE6ygEKJAoBeAoBdxIJL01hdE11bF8wGgkvTWF0TXVsXzAiBk1hdE11bAobCgkvTWF0TXVsXzAS' +
  'AXkaAXkiCElkZW50aXR5Eg5wcm92aWRlcl9wcm9iZSpLCgIEBBABQgF3SkAAAIA/AAAAAAAAAAAAAAAAAAAAAAAAgD8AAAAAAAAAAAAAAAAAAAAA' +
  'AACAPwAAAAAAAAAAAAAAAAAAAAAAAIA/WhMKAXgSDgoMCAESCAoCCAEKAggEYhMKAXkSDgoMCAESCAoCCAEKAggEQgQKABAR';

export const probeModel = (): Uint8Array => new Uint8Array(Buffer.from(PROBE_BASE64, 'base64'));
