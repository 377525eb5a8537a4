/**
 * @module GPU metrics from nvidia-smi. They are registered only once the CUDA execution provider is in use
 * AND nvidia-smi answered with a parseable sample, so a CPU deployment never shows a made-up GPU value.
 */
import { execFile } from 'node:child_process';
import { Gauge, type Registry } from 'prom-client';

export interface GpuSample {
  index: number;
  memoryUsedBytes: number | undefined;
  utilizationPercent: number | undefined;
}

export const NVIDIA_SMI_ARGS = ['--query-gpu=index,memory.used,utilization.gpu', '--format=csv,noheader,nounits'] as const;

const num = (s: string | undefined): number | undefined => {
  const t = s?.trim();
  // nvidia-smi writes "[N/A]" or "[Not Supported]" for a value it cannot read (MIG slices, some vGPUs).
  if (t === undefined || t === '' || t.startsWith('[')) return undefined;
  const v = Number(t);
  return Number.isFinite(v) ? v : undefined;
};

/**
 * Parses `nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader,nounits`
 * ("0, 1234, 56" per line; memory in MiB). Also accepts the two-column form without the index
 * (`memory.used,utilization.gpu`), numbering lines from 0. Unparseable lines are skipped.
 */
export function parseNvidiaSmi(text: string): GpuSample[] {
  const out: GpuSample[] = [];
  for (const line of text.split(/\r?\n/)) {
    if (line.trim() === '') continue;
    const cols = line.split(',');
    let idx: number | undefined;
    let mem: string | undefined;
    let util: string | undefined;
    if (cols.length >= 3) [idx, mem, util] = [num(cols[0]), cols[1], cols[2]];
    else if (cols.length === 2) [idx, mem, util] = [out.length, cols[0], cols[1]];
    else continue;
    if (idx === undefined || !Number.isInteger(idx)) continue;
    const mib = num(mem);
    const sample = { index: idx, memoryUsedBytes: mib === undefined ? undefined : mib * 1024 * 1024, utilizationPercent: num(util) };
    if (sample.memoryUsedBytes === undefined && sample.utilizationPercent === undefined) continue;
    out.push(sample);
  }
  return out;
}

export type SmiRunner = () => Promise<string>;

export const runNvidiaSmi: SmiRunner = () =>
  new Promise((resolve, reject) => {
    execFile('nvidia-smi', [...NVIDIA_SMI_ARGS], { timeout: 5_000, maxBuffer: 1 << 20 }, (err, stdout) => (err ? reject(err) : resolve(stdout)));
  });

export interface GpuMetrics {
  /** Whether the gauges are registered (a first sample succeeded). */
  readonly active: boolean;
}

/**
 * Samples once; on success registers `gpu_memory_usage_bytes` and `gpu_utilization_percent` (label `gpu`,
 * the nvidia-smi index) and refreshes them at each scrape, at most once per `minIntervalMs`. On failure
 * (no nvidia-smi, no driver) nothing is registered and it is not retried.
 */
export async function startGpuMetrics(
  registry: Registry,
  opts: { run?: SmiRunner; minIntervalMs?: number; onError?: (err: unknown) => void } = {},
): Promise<GpuMetrics> {
  const run = opts.run ?? runNvidiaSmi;
  const minInterval = opts.minIntervalMs ?? 2_000;
  let last: GpuSample[];
  try {
    last = parseNvidiaSmi(await run());
  } catch (err) {
    opts.onError?.(err);
    return { active: false };
  }
  if (last.length === 0) {
    opts.onError?.(new Error('nvidia-smi returned no GPU'));
    return { active: false };
  }
  let at = performance.now();
  let pending: Promise<void> | undefined;
  // Scrapes refresh the sample; a failing refresh keeps serving nothing rather than a stale value.
  const refresh = async () => {
    if (performance.now() - at < minInterval) return;
    pending ??= run()
      .then((t) => {
        last = parseNvidiaSmi(t);
      })
      .catch(() => {
        last = [];
      })
      .finally(() => {
        at = performance.now();
        pending = undefined;
      });
    await pending;
  };
  // Registered now, refreshed at each scrape: a GPU whose sample lacks the value (a MIG slice) shows no series.
  const perGpu = (name: string, help: string, value: (s: GpuSample) => number | undefined) => new Gauge({
    name,
    help,
    labelNames: ['gpu'] as const,
    registers: [registry],
    async collect() {
      await refresh();
      this.reset();
      for (const s of last) {
        const v = value(s);
        if (v !== undefined) this.set({ gpu: String(s.index) }, v);
      }
    },
  });
  perGpu('gpu_memory_usage_bytes', 'GPU memory in use (nvidia-smi memory.used), per GPU index; present only when the CUDA execution provider is in use', (s) => s.memoryUsedBytes);
  perGpu('gpu_utilization_percent', 'GPU utilization in percent (nvidia-smi utilization.gpu), per GPU index; present only when the CUDA execution provider is in use', (s) => s.utilizationPercent);
  return { active: true };
}
