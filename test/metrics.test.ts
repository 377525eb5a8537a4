/** /metrics over the real server: parseable exposition, every documented name with HELP; GPU metrics never invented. */
import { Gauge, Histogram, Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseNvidiaSmi, startGpuMetrics } from '../src/runtime/gpu.js';
import { createResultCache, ENTRY_BYTES, IMAGE_BYTES } from '../src/runtime/result-cache.js';
import type { GenerationRequest } from '../src/runtime/request.js';
import { ensureDemoModel } from '../src/demo/index.js';
import { exposition, leLabel } from '../src/metrics.js';
import { metric, startFailedRuntime, startRuntime, type RuntimeHandle } from './helpers/runtime.js';
import { postJson, sharedCacheDir } from './helpers/server.js';

interface Family {
  help?: string;
  type?: string;
  samples: Array<{ name: string; labels: Record<string, string>; value: number }>;
}

/**
 * A strict little parser of the Prometheus text format (0.0.4): throws on any line it does not understand, and on what
 * the format forbids that a lenient reader lets through: a second HELP or TYPE of a family, a TYPE after its samples,
 * a family's lines not in one group, a label value escape other than \\, \" and \n, the same series twice, a text not
 * ending in a newline; a histogram's buckets must be cumulative, end in +Inf and match its _count, with a _sum.
 */
export function parseExposition(text: string): Map<string, Family> {
  const fams = new Map<string, Family>();
  const fam = (n: string) => fams.get(n) ?? (fams.set(n, { samples: [] }), fams.get(n)!);
  const base = (n: string) => n.replace(/_(bucket|sum|count|total|created)$/, '');
  if (text !== '' && !text.endsWith('\n')) throw new Error('the text does not end with a newline');
  const seen = new Set<string>();
  const done = new Set<string>();
  let current: string | undefined;
  const enter = (name: string, line: string) => {
    if (name === current) return;
    if (done.has(name)) throw new Error(`family ${name} is not one group: ${line}`);
    if (current !== undefined) done.add(current);
    current = name;
  };
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let m = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (m) {
      const f = fam(m[2]!);
      enter(m[2]!, line);
      if (m[1] === 'HELP') {
        if (f.help !== undefined) throw new Error(`second HELP: ${line}`);
        f.help = m[3];
      } else {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3]!)) throw new Error(`bad TYPE: ${line}`);
        if (f.type !== undefined) throw new Error(`second TYPE: ${line}`);
        if (f.samples.length > 0) throw new Error(`TYPE after its samples: ${line}`);
        f.type = m[3];
      }
      continue;
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/.exec(line);
    if (!m) throw new Error(`unparseable line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    if (m[2]) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)",?/g;
      let consumed = 0;
      for (let l; (l = re.exec(m[2])); ) {
        if (Object.hasOwn(labels, l[1]!)) throw new Error(`label ${l[1]} twice: ${line}`);
        labels[l[1]!] = l[2]!;
        consumed += l[0].length;
      }
      if (consumed !== m[2].length) throw new Error(`bad labels: ${line}`);
    }
    const value = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : Number(m[3]);
    if (Number.isNaN(value) && m[3] !== 'NaN') throw new Error(`bad value: ${line}`);
    const owner = fams.has(m[1]!) ? m[1]! : base(m[1]!);
    if (!fams.has(owner)) throw new Error(`sample before its HELP/TYPE: ${line}`);
    enter(owner, line);
    const key = `${m[1]}{${Object.entries(labels).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => `${k}="${v}"`).join(',')}}`;
    if (seen.has(key)) throw new Error(`series twice: ${line}`);
    seen.add(key);
    fam(owner).samples.push({ name: m[1]!, labels, value });
  }
  for (const [name, f] of fams) {
    if (f.type === 'counter' && f.samples.some((x) => !(x.value >= 0))) throw new Error(`counter ${name} below 0`);
    if (f.type !== 'histogram') continue;
    const series = new Map<string, { buckets: Array<[number, number]>; count?: number; sum?: number }>();
    for (const x of f.samples) {
      const { le, ...rest } = x.labels;
      const k = JSON.stringify(Object.entries(rest).sort());
      const h = series.get(k) ?? (series.set(k, { buckets: [] }), series.get(k)!);
      if (x.name === `${name}_bucket`) h.buckets.push([le === '+Inf' ? Infinity : Number(le), x.value]);
      else if (x.name === `${name}_count`) h.count = x.value;
      else if (x.name === `${name}_sum`) h.sum = x.value;
      else throw new Error(`histogram ${name} has a sample ${x.name}`);
    }
    for (const [k, h] of series) {
      const b = [...h.buckets].sort((x, y) => x[0] - y[0]);
      if (b.at(-1)?.[0] !== Infinity || h.count === undefined || h.sum === undefined) throw new Error(`histogram ${name}${k}: no +Inf bucket, _count or _sum`);
      if (b.some(([, v], i) => i > 0 && v < b[i - 1]![1])) throw new Error(`histogram ${name}${k}: buckets not cumulative`);
      if (b.at(-1)![1] !== h.count) throw new Error(`histogram ${name}${k}: +Inf bucket ${b.at(-1)![1]} is not _count ${h.count}`);
    }
  }
  return fams;
}

/** Every name in the README's metrics table (type, labels beyond model_name). */
export const DOCUMENTED: Record<string, { type: string; labels: string[] }> = {
  inference_request_count: { type: 'counter', labels: ['model_name', 'protocol', 'status'] },
  inference_request_duration_seconds: { type: 'histogram', labels: ['model_name', 'protocol'] },
  model_load_time_seconds: { type: 'gauge', labels: ['model_name'] },
  boot_phase_duration_seconds: { type: 'gauge', labels: ['model_name', 'phase'] },
  boot_phase_seconds: { type: 'histogram', labels: ['model_name', 'phase'] },
  boot_state: { type: 'gauge', labels: ['model_name', 'state'] },
  boot_retries_total: { type: 'counter', labels: ['model_name', 'code'] },
  onnx_session_create_seconds: { type: 'gauge', labels: ['model_name', 'component', 'provider'] },
  model_download_bytes_total: { type: 'counter', labels: ['model_name'] },
  model_download_damaged_files_total: { type: 'counter', labels: ['model_name'] },
  model_cache_hits_total: { type: 'counter', labels: ['model_name'] },
  inference_stage_seconds: { type: 'histogram', labels: ['model_name', 'stage'] },
  denoising_steps_total: { type: 'counter', labels: ['model_name'] },
  denoising_steps_per_second: { type: 'gauge', labels: ['model_name'] },
  images_generated_total: { type: 'counter', labels: ['model_name'] },
  inference_queue_depth: { type: 'gauge', labels: ['model_name'] },
  inference_requests_in_flight: { type: 'gauge', labels: ['model_name'] },
  inference_batch_size: { type: 'histogram', labels: ['model_name'] },
  inference_rejected_total: { type: 'counter', labels: ['model_name', 'reason'] },
  inference_cancelled_total: { type: 'counter', labels: ['model_name', 'reason'] },
  result_cache_hits_total: { type: 'counter', labels: ['model_name'] },
  result_cache_bytes: { type: 'gauge', labels: ['model_name'] },
  websocket_messages_dropped_total: { type: 'counter', labels: ['model_name'] },
  request_preprocess_seconds: { type: 'histogram', labels: ['model_name'] },
  request_predict_seconds: { type: 'histogram', labels: ['model_name'] },
  request_postprocess_seconds: { type: 'histogram', labels: ['model_name'] },
  request_explain_seconds: { type: 'histogram', labels: ['model_name'] },
};

describe('/metrics over a real socket', () => {
  let srv: RuntimeHandle;
  beforeAll(async () => {
    srv = await startRuntime({ STORAGE_URI: undefined }, { ready: true });
  });
  afterAll(async () => void (await srv?.stop()));

  it('before any request, every series whose labels are known is there at 0 (one first seen at 1 is missed by rate() and increase())', async () => {
    const fams = parseExposition(await (await fetch(`${srv.url}/metrics`)).text());
    const at = (name: string, labels: Record<string, string> = {}) => {
      const s = [...fams.values()].flatMap((f) => f.samples).filter((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
      return s.length === 0 ? 'absent' : s.reduce((n, x) => n + x.value, 0);
    };
    const zero: Array<[string, Record<string, string>]> = [
      ...['v1', 'v2', 'ws', 'openai'].flatMap((protocol): Array<[string, Record<string, string>]> => [
        ['inference_request_count', { protocol, status: '200' }],
        ['inference_request_duration_seconds_count', { protocol }],
        ['inference_request_duration_seconds_bucket', { protocol, le: '+Inf' }],
      ]),
      ...['queue_full', 'input_budget', 'not_ready', 'shutting_down'].map((reason): [string, Record<string, string>] => ['inference_rejected_total', { reason }]),
      ...['client_left', 'timeout', 'request_failed'].map((reason): [string, Record<string, string>] => ['inference_cancelled_total', { reason }]),
      ...['split', 'failed'].map((outcome): [string, Record<string, string>] => ['inference_out_of_memory_total', { outcome }]),
      ['inference_requests_in_flight', {}], ['inference_queue_depth', {}], ['result_cache_hits_total', {}], ['websocket_messages_dropped_total', {}],
      ['worker_deaths_total', { worker: '0', device: 'cpu' }], ['lora_adapter_set_load_seconds_count', {}],
      ['model_download_bytes_total', {}], ['model_download_damaged_files_total', {}], ['model_cache_hits_total', {}],
      ['model_cache_evictions_total', {}], ['model_cache_evicted_bytes_total', {}],
      ...['preprocess', 'predict', 'postprocess', 'explain'].map((s): [string, Record<string, string>] => [`request_${s}_seconds_count`, {}]),
    ];
    expect(zero.map(([name, labels]) => [name, labels, at(name, labels)])).toEqual(zero.map(([name, labels]) => [name, labels, 0]));
  });

  it("the warm-up generation is the boot's: not an image, batch, stage time or step of the serving metrics", async () => {
    expect(srv.all('warmup-done')).toHaveLength(1);
    const served = ['images_generated_total', 'worker_images_total', 'inference_batch_size_count', 'inference_stage_seconds_count', 'denoising_steps_total'];
    expect(await Promise.all(served.map((n) => metric(srv, n)))).toEqual(served.map(() => 0));
    const text = await (await fetch(`${srv.url}/metrics`)).text();
    expect(text).not.toMatch(/^denoising_steps_per_second\{/m);
    expect(text).toMatch(/^boot_phase_seconds_count\{model_name="model",phase="warming"\} 1$/m);
  });

  it('parses, and lists every documented name with HELP text and its type', async () => {
    const inst = { prompt: 'm', num_inference_steps: 2, height: 64, width: 64, seed: 1 };
    await postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst] });
    await postJson(`${srv.url}/v1/models/model:predict`, { instances: [inst] }); // a result-cache hit
    await postJson(`${srv.url}/v2/models/model/infer`, { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['m'] }], parameters: { num_inference_steps: 2, height: 64, width: 64 } });
    await postJson(`${srv.url}/v1/models/model:predict`, { instances: [{}] });
    const res = await fetch(`${srv.url}/metrics`);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const fams = parseExposition(await res.text());
    for (const [name, doc] of Object.entries(DOCUMENTED)) {
      const f = fams.get(name);
      expect(f, name).toBeDefined();
      expect(f!.help?.length ?? 0, `${name} HELP`).toBeGreaterThan(10);
      expect(f!.type, name).toBe(doc.type);
      for (const s of f!.samples) {
        const own = Object.keys(s.labels).filter((l) => l !== 'le');
        expect(own.sort(), `${name} labels`).toEqual([...doc.labels].sort());
      }
    }
    const val = (name: string, labels: Record<string, string> = {}) =>
      fams.get(name)!.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((n, s) => n + s.value, 0);
    expect(val('inference_request_count', { protocol: 'v1', status: '200' })).toBe(2);
    expect(val('inference_request_count', { protocol: 'v2', status: '200' })).toBe(1);
    expect(val('inference_request_count', { protocol: 'v1', status: '400' })).toBe(1);
    expect(val('result_cache_hits_total')).toBe(1);
    // The V1 and V2 generations (the cache hit made none).
    const made = ['images_generated_total', 'inference_batch_size_count', 'inference_stage_seconds_count'];
    expect(await Promise.all(made.map((n) => metric(srv, n, n.startsWith('inference_stage') ? { stage: 'denoise' } : {})))).toEqual([2, 2, 2]);
    expect(val('result_cache_bytes')).toBeGreaterThan(0);
    // KServe's stages, for V1 and V2 predict requests: the 400 ended in preprocess; the others went through all three
    // (the result-cache hit too). Its buckets are KServe's (prometheus_client's defaults), each bound spelled as
    // KServe's Python server spells it: the exact label values its dashboards and recording rules name.
    const stages = await Promise.all(['preprocess', 'predict', 'postprocess', 'explain'].map((s) => metric(srv, `request_${s}_seconds_count`, { model_name: 'model' })));
    expect(stages).toEqual([4, 3, 3, 0]);
    const le = (name: string) => fams.get(name)!.samples.filter((s) => s.name === `${name}_bucket`).map((s) => s.labels.le);
    for (const s of ['preprocess', 'predict', 'postprocess', 'explain']) {
      expect(le(`request_${s}_seconds`), s).toEqual(['0.005', '0.01', '0.025', '0.05', '0.075', '0.1', '0.25', '0.5', '0.75', '1.0', '2.5', '5.0', '7.5', '10.0', '+Inf']);
    }
    // The runtime's own histograms too: one spelling on the page, the one Prometheus 3 stores.
    expect(le('inference_batch_size')).toEqual(['1.0', '2.0', '3.0', '4.0', '6.0', '8.0', '12.0', '16.0', '32.0', '64.0', '+Inf']);
    expect(new Set(le('inference_request_duration_seconds'))).toEqual(new Set(['0.05', '0.1', '0.25', '0.5', '1.0', '2.0', '4.0', '8.0', '15.0', '30.0', '60.0', '120.0', '300.0', '+Inf']));
    expect(val('boot_state', { state: 'ready' })).toBe(1);
    expect(val('model_load_time_seconds')).toBeGreaterThan(0);
    expect(val('inference_queue_depth')).toBe(0);
    expect(fams.get('inference_batch_size')!.samples.some((s) => s.name === 'inference_batch_size_count')).toBe(true);
    // This machine has no CUDA in use: the GPU gauges are absent, not zero.
    expect(fams.has('gpu_memory_usage_bytes')).toBe(false);
    expect(fams.has('gpu_utilization_percent')).toBe(false);
  });

  it('writes a NaN value as NaN, the spelling of the text format (prom-client writes Nan)', async () => {
    // The event-loop lag gauges are NaN until their first sample; any gauge can be.
    srv.rt.metrics.stepsPerSecond.set({ model_name: 'other' }, NaN);
    try {
      const text = await (await fetch(`${srv.url}/metrics`)).text();
      expect(text).toMatch(/^denoising_steps_per_second\{model_name="other"\} NaN$/m);
      expect(text).not.toMatch(/ Nan$/m);
      parseExposition(text);
    } finally {
      srv.rt.metrics.stepsPerSecond.remove({ model_name: 'other' });
    }
  });
});

describe('bucket bounds as prometheus_client writes them', () => {
  it('spells each as its floatToGoString does: Python repr, Go exponents from 1e+06', () => {
    // Each pair printed by prometheus_client 0.16.0's utils.floatToGoString (Debian's python3-prometheus-client),
    // which KServe's server exposes its histograms with. `1e+010`, not Go's `1e+10`, is its own spelling.
    const py: Array<[number, string]> = [
      [0.005, '0.005'], [0.075, '0.075'], [1, '1.0'], [2.5, '2.5'], [10, '10.0'], [1800, '1800.0'], [0.1 + 0.2, '0.30000000000000004'],
      [1e-5, '1e-05'], [1.5e-5, '1.5e-05'], [0.0001, '0.0001'], [123456, '123456.0'], [999999, '999999.0'],
      [1e6, '1e+06'], [1.5e6, '1.5e+06'], [1234567, '1.234567e+06'], [1e7, '1e+07'], [1e9, '1e+09'], [1e10, '1e+010'],
      [1.25e12, '1.25e+012'], [1e15, '1e+015'], [9999999999999998, '9.999999999999998e+015'], [1e16, '1e+16'], [1.5e17, '1.5e+17'],
      [1e21, '1e+21'], [Infinity, '+Inf'],
    ];
    expect(py.map(([x]) => [x, leLabel(x)])).toEqual(py);
  });

  it("rewrites the le of histogram buckets only, wherever the label is, and leaves +Inf and other labels alone", async () => {
    const registry = new Registry();
    const h = new Histogram({ name: 'x_seconds', help: 'h', labelNames: ['a'], buckets: [1e-5, 0.5, 1], registers: [registry] });
    new Gauge({ name: 'g_bucket', help: 'h', labelNames: ['le'], registers: [registry] }).set({ le: '1' }, 1);
    h.observe({ a: 'le="2"' }, 0.7);
    const text = await exposition(registry);
    expect(text.split('\n').filter((l) => /^(x_seconds|g)_bucket/.test(l))).toEqual([
      'x_seconds_bucket{le="1e-05",a="le=\\"2\\""} 0',
      'x_seconds_bucket{le="0.5",a="le=\\"2\\""} 0',
      'x_seconds_bucket{le="1.0",a="le=\\"2\\""} 1',
      'x_seconds_bucket{le="+Inf",a="le=\\"2\\""} 1',
      'g_bucket{le="1"} 1',
    ]);
  });
});

describe('the test parser of the text format', () => {
  const h = '# HELP x_seconds h\n# TYPE x_seconds histogram\n';
  const ok = `${h}x_seconds_bucket{le="1"} 1\nx_seconds_bucket{le="+Inf"} 2\nx_seconds_sum 3\nx_seconds_count 2\n`;
  it('takes a valid text and refuses each thing the format forbids', () => {
    expect(parseExposition(ok).get('x_seconds')!.samples).toHaveLength(4);
    const bad: Record<string, string> = {
      'second TYPE': ok.replace('# HELP', '# TYPE x_seconds histogram\n# HELP'),
      'second HELP': ok.replace('# TYPE', '# HELP x_seconds again\n# TYPE'),
      'TYPE after its samples': '# HELP c_total h\nc_total 1\n# TYPE c_total counter\n',
      'not one group': `${ok}# HELP g h\n# TYPE g gauge\ng 1\nx_seconds_sum 4\n`,
      'series twice': '# HELP g h\n# TYPE g gauge\ng{a="1"} 1\ng{a="1"} 2\n',
      'bad labels': '# HELP g h\n# TYPE g gauge\ng{a="\\x"} 1\n',
      'newline': ok.slice(0, -1),
      'not cumulative': ok.replace('x_seconds_bucket{le="+Inf"} 2', 'x_seconds_bucket{le="2"} 0\nx_seconds_bucket{le="+Inf"} 2'),
      'is not _count': ok.replace('x_seconds_count 2', 'x_seconds_count 3'),
      'no +Inf bucket': ok.replace('x_seconds_bucket{le="+Inf"} 2\n', ''),
      'below 0': '# HELP c_total h\n# TYPE c_total counter\nc_total -1\n',
    };
    for (const [why, text] of Object.entries(bad)) expect(() => parseExposition(text), why).toThrow(why);
  });
});

describe('/metrics of a model served from a local folder', () => {
  it('counts no downloaded bytes: nothing came from object storage', async () => {
    const dir = await ensureDemoModel(sharedCacheDir());
    const local = await startRuntime({ STORAGE_URI: dir }, { ready: true });
    try {
      expect((await local.waitFor('files-ready')).fromCache).toBe(false);
      expect(await metric(local, 'model_download_bytes_total')).toBe(0);
      expect(await metric(local, 'model_cache_hits_total')).toBe(0);
    } finally {
      await local.stop();
    }
  });
});

describe('/metrics on a server that cannot serve', () => {
  it('counts each not-ready refusal in inference_rejected_total{reason="not_ready"}, and a wrong name not at all', async () => {
    const down = await startFailedRuntime();
    try {
      const v1 = await postJson(`${down.url}/v1/models/model:predict`, { instances: [{ prompt: 'x' }] });
      const v2 = await postJson(`${down.url}/v2/models/model/infer`, { inputs: [{ name: 'prompt', shape: [1], datatype: 'BYTES', data: ['x'] }] });
      const other = await postJson(`${down.url}/v1/models/other:predict`, { instances: [{ prompt: 'x' }] });
      expect([v1.status, v2.status, other.status]).toEqual([503, 503, 404]);
      const fams = parseExposition(await (await fetch(`${down.url}/metrics`)).text());
      const rejected = fams.get('inference_rejected_total')!.samples.map((s) => [s.labels.reason, s.value]);
      expect(Object.fromEntries(rejected)).toEqual({ queue_full: 0, input_budget: 0, not_ready: 2, shutting_down: 0 });
      const requests = fams.get('inference_request_count')!.samples.map((s) => [s.labels.protocol, s.labels.status, s.value]);
      expect(requests).toEqual(expect.arrayContaining([['v1', '503', 1], ['v2', '503', 1], ['v1', '404', 1]]));
    } finally {
      await down.stop();
    }
  });
});

describe('GPU metrics (nvidia-smi)', () => {
  it('parses nvidia-smi csv output, with and without the index column, skipping N/A values', () => {
    expect(parseNvidiaSmi('0, 1234, 56\n1, 80000, 100\n')).toEqual([
      { index: 0, memoryUsedBytes: 1234 * 1048576, utilizationPercent: 56 },
      { index: 1, memoryUsedBytes: 80000 * 1048576, utilizationPercent: 100 },
    ]);
    expect(parseNvidiaSmi('512, 3\r\n')).toEqual([{ index: 0, memoryUsedBytes: 512 * 1048576, utilizationPercent: 3 }]);
    expect(parseNvidiaSmi('0, 100, [N/A]\n1, [N/A], [N/A]\n')).toEqual([{ index: 0, memoryUsedBytes: 100 * 1048576, utilizationPercent: undefined }]);
    expect(parseNvidiaSmi('')).toEqual([]);
    expect(parseNvidiaSmi('NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.')).toEqual([]);
  });

  it('registers the gauges only after a successful sample, labelled by GPU index', async () => {
    const none = new Registry();
    const off = await startGpuMetrics(none, { run: () => Promise.reject(Object.assign(new Error('spawn nvidia-smi ENOENT'), { code: 'ENOENT' })) });
    expect(off.active).toBe(false);
    expect(await none.metrics()).not.toMatch(/gpu_/);

    const reg = new Registry();
    const on = await startGpuMetrics(reg, { run: async () => '0, 2048, 40\n1, 1024, 7\n', minIntervalMs: 0 });
    expect(on.active).toBe(true);
    const fams = parseExposition(await reg.metrics());
    expect(fams.get('gpu_memory_usage_bytes')!.samples).toEqual([
      { name: 'gpu_memory_usage_bytes', labels: { gpu: '0' }, value: 2048 * 1048576 },
      { name: 'gpu_memory_usage_bytes', labels: { gpu: '1' }, value: 1024 * 1048576 },
    ]);
    expect(fams.get('gpu_utilization_percent')!.samples.map((s) => s.value)).toEqual([40, 7]);
  });
});

describe('result cache (unit)', () => {
  const req = (seed: number | undefined, prompt = 'p', format: 'png' | 'webp' = 'png'): GenerationRequest => ({
    shape: { steps: 2, guidance: 7.5, height: 64, width: 64, scheduler: undefined, eta: 0, guidanceRescale: 0 },
    items: [{ prompt, negativePrompt: undefined, seed: seed ?? 0, numImages: 1 }],
    seedsGiven: seed !== undefined,
    output: { format, quality: undefined, uri: undefined },
    previewEvery: 0,
  });
  const img = (n: number) => [{ data: new Uint8Array(n).fill(7).buffer, seed: 1, width: 64, height: 64, format: 'png' as const }];

  it('keys on every generation field, skips unseeded requests, evicts least recently used by bytes', () => {
    let bytes = -1;
    // An entry of one 100-byte image, with its bookkeeping: room for two.
    const one = ENTRY_BYTES + IMAGE_BYTES + 100;
    const c = createResultCache('m', 2.5 * one, { onChange: (b) => (bytes = b) });
    expect(c.keyOf(req(undefined))).toBeUndefined();
    expect(c.keyOf(req(1))).not.toBe(c.keyOf(req(2)));
    expect(c.keyOf(req(1))).not.toBe(c.keyOf(req(1, 'p', 'webp')));
    expect(c.keyOf(req(1))).not.toBe(c.keyOf(req(1, 'q')));
    const [k1, k2, k3] = [c.keyOf(req(1))!, c.keyOf(req(2))!, c.keyOf(req(3))!];
    c.put(k1, img(100));
    c.put(k2, img(100));
    expect(bytes).toBe(2 * one);
    c.get(k1); // k1 is now the most recent: k2 goes first
    c.put(k3, img(100));
    expect([c.get(k1) !== undefined, c.get(k2) !== undefined, c.get(k3) !== undefined]).toEqual([true, false, true]);
    expect(c.bytes).toBe(2 * one);
    c.put(c.keyOf(req(4))!, img(3 * one)); // larger than the whole cache: not stored
    expect(c.entries).toBe(2);
    expect(createResultCache('m', 0).keyOf(req(1))).toBeUndefined();
  });

  it('leaves out what the images do not depend on: eta where the scheduler ignores it, guidance and the negative prompt without an unconditional pass', () => {
    const withShape = (shape: Partial<GenerationRequest['shape']>) => ({ ...req(1), shape: { ...req(1).shape, ...shape } });
    const pndm = createResultCache('m', 1000, { defaults: () => ({ scheduler: 'PNDMScheduler' }) });
    const lcm = createResultCache('m', 1000, { defaults: () => ({ scheduler: 'LCMScheduler', guidanceEmbedding: true }) });
    const same = (c: ReturnType<typeof createResultCache>, a: Partial<GenerationRequest['shape']>, b: Partial<GenerationRequest['shape']>) =>
      c.keyOf(withShape(a)) === c.keyOf(withShape(b));
    // eta: PNDM ignores it, DDIM reads it (ETA_CLASSES).
    expect(same(pndm, { eta: 0 }, { eta: 0.7 })).toBe(true);
    expect(same(pndm, { eta: 0, scheduler: 'ddim' }, { eta: 0.7, scheduler: 'ddim' })).toBe(false);
    // With an unconditional pass, the scale and guidance_rescale count; without one, neither does.
    expect(same(pndm, { guidance: 7.5 }, { guidance: 5 })).toBe(false);
    expect(same(pndm, { guidanceRescale: 0 }, { guidanceRescale: 0.7 })).toBe(false);
    expect(same(pndm, { guidance: 1, guidanceRescale: 0 }, { guidance: 0.5, guidanceRescale: 0.7 })).toBe(true);
    expect(same(pndm, { guidance: 1 }, { guidance: 1.5 })).toBe(false);
    // An LCM UNet embeds the scale: it counts, though no unconditional pass runs; guidance_rescale does not.
    expect(same(lcm, { guidance: 1 }, { guidance: 0.5 })).toBe(false);
    expect(same(lcm, { guidance: 8.5, guidanceRescale: 0 }, { guidance: 8.5, guidanceRescale: 0.7 })).toBe(true);
    // The negative prompt only with an unconditional pass (an LCM UNet never runs one).
    const neg = (c: ReturnType<typeof createResultCache>, guidance: number, a: string | undefined, b: string | undefined) => {
      const r = (n: string | undefined) => ({ ...withShape({ guidance }), items: [{ ...req(1).items[0]!, negativePrompt: n }] });
      return c.keyOf(r(a)) === c.keyOf(r(b));
    };
    expect(neg(pndm, 7.5, undefined, 'blurry')).toBe(false);
    expect(neg(pndm, 7.5, '', 'blurry')).toBe(false);
    expect(neg(pndm, 1, undefined, 'blurry')).toBe(true);
    expect(neg(lcm, 8.5, '', 'blurry')).toBe(true);
    // No model loaded: every field counts.
    expect(same(createResultCache('m', 1000), { eta: 0 }, { eta: 0.7 })).toBe(false);
  });
});
