/**
 * @module The reference docs against the code they describe: docs/OPERATIONS.md's metrics table lists every metric the
 * runtime registers (and no other), each with its type, its labels and the values the code gives those labels; its
 * error-code tables list every code src/errors.ts has (and no other), request codes with their HTTP status.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { type Metric, Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { HTTP_STATUS, OUTCOMES } from '../src/errors.js';
import { createMetrics } from '../src/metrics.js';
import { startGpuMetrics } from '../src/runtime/gpu.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const read = (rel: string): string => readFileSync(path.join(ROOT, rel), 'utf8');

interface Row { name: string; type: string; labels: string; meaning: string }

/** The cells of each row of the docs/OPERATIONS.md table whose header line is `header`. */
function table(header: string): string[][] {
  const lines = read('docs/OPERATIONS.md').split('\n');
  const start = lines.findIndex((l) => l.trim() === header);
  expect(start, `docs/OPERATIONS.md: the table headed ${header}`).toBeGreaterThan(0);
  const rows: string[][] = [];
  for (const l of lines.slice(start + 2)) {
    if (!l.startsWith('|')) break;
    rows.push(l.split('|').slice(1, -1).map((c) => c.trim()));
  }
  return rows;
}

/** The rows of the table headed `| name | type | labels | meaning |` in docs/OPERATIONS.md. */
function metricsTable(): Row[] {
  return table('| name | type | labels | meaning |').map(([name, type, labels, meaning]) => ({ name: name!, type: type!, labels: labels!, meaning: meaning! }));
}

interface Registered { name: string; type: string; labelNames: readonly string[]; help: string }

/** Every metric a CUDA server registers (the GPU gauges too, which need a first nvidia-smi sample), without prom-client's process defaults. */
async function registered(): Promise<Registered[]> {
  const registry = new Registry();
  createMetrics(registry, { defaultMetrics: false });
  const gpu = await startGpuMetrics(registry, { run: async () => '0, 1024, 50\n' });
  expect(gpu.active).toBe(true);
  return Promise.all(registry.getMetricsAsArray().map(async (m) => {
    const { type } = await (m as unknown as Metric).get();
    return { name: m.name, type: String(type), labelNames: (m as unknown as { labelNames: readonly string[] }).labelNames, help: m.help };
  }));
}

/** The string literals of a TypeScript union or of `stage: '…'` fields in a source file. */
const literals = (src: string, re: RegExp): string[] => [...new Set([...src.matchAll(re)].map((m) => m[1]!))];

describe('docs/OPERATIONS.md metrics table', () => {
  it('lists every registered metric and nothing else, each with its type', async () => {
    const rows = metricsTable();
    const metrics = await registered();
    expect(rows.map((r) => r.name).sort()).toEqual(metrics.map((m) => m.name).sort());
    for (const m of metrics) expect(rows.find((r) => r.name === m.name)!.type, m.name).toBe(m.type);
  });

  it("names every label a metric has; model_name on every series except the GPU gauges, as the text says", async () => {
    const rows = metricsTable();
    for (const m of await registered()) {
      const row = rows.find((r) => r.name === m.name)!;
      for (const l of m.labelNames.filter((n) => n !== 'model_name')) expect(row.labels, `${m.name}: label ${l}`).toMatch(new RegExp(`\\b${l}\\b`));
      expect(m.labelNames.includes('model_name'), `${m.name}: model_name`).toBe(!m.name.startsWith('gpu_'));
    }
  });

  it('gives the values the code uses for stage and reason labels', () => {
    const rows = metricsTable();
    const row = (name: string) => rows.find((r) => r.name === name)!;
    const stages = literals(read('src/runtime/engine.ts'), /stageDuration\.observe\(\{ \.\.\.l, stage: '([a-z_]+)' \}/g);
    expect(stages.length).toBeGreaterThanOrEqual(4);
    for (const s of stages) expect(`${row('inference_stage_seconds').labels} ${row('inference_stage_seconds').meaning}`, `stage ${s}`).toContain(s);
    const rejects = literals(/export type RejectReason = ([^;]+);/.exec(read('src/metrics.ts'))![1]!, /'([a-z_]+)'/g);
    expect(rejects.length).toBe(4);
    for (const r of rejects) expect(row('inference_rejected_total').labels, `reason ${r}`).toContain(r);
    const cancels = literals(/export function cancelReason\(reason: unknown\): ([^{]+)\{/.exec(read('src/runtime/engine.ts'))![1]!, /'([a-z_]+)'/g);
    expect(cancels.length).toBe(3);
    for (const r of cancels) expect(row('inference_cancelled_total').labels, `reason ${r}`).toContain(r);
  });

  it("the stage histogram's HELP names every stage too (what a Prometheus user reads)", async () => {
    const help = (await registered()).find((m) => m.name === 'inference_stage_seconds')!.help;
    for (const s of literals(read('src/runtime/engine.ts'), /stageDuration\.observe\(\{ \.\.\.l, stage: '([a-z_]+)' \}/g)) expect(help, s).toContain(s);
  });
});

describe('docs/OPERATIONS.md error codes', () => {
  /** The `CODE`s a cell names (one, or several separated by commas). */
  const codes = (cell: string): string[] => [...cell.matchAll(/`([A-Z_]+)`/g)].map((m) => m[1]!);

  it('lists every code a request is answered with, each with its HTTP status, and no other', () => {
    const rows = table('| code | status | when | what a client does |');
    const documented = new Map(rows.flatMap(([code, status]) => codes(code!).map((c) => [c, Number(status)] as const)));
    expect([...documented.keys()].sort()).toEqual(Object.keys(HTTP_STATUS).sort());
    for (const [code, status] of Object.entries(HTTP_STATUS)) expect(documented.get(code), code).toBe(status);
  });

  it('lists every code a boot, a fetch or the cache ends with, and no other', () => {
    const rows = table('| code | when | what to do |');
    expect(rows.flatMap(([code]) => codes(code!)).sort()).toEqual([...OUTCOMES].sort());
  });
});
