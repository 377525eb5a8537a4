/**
 * @module The reference docs against the code they describe: docs/OPERATIONS.md's metrics table lists every metric the
 * runtime registers (and no other), each with its type, its labels and the values the code gives those labels; its
 * error-code tables list every code src/errors.ts has (and no other), request codes with their HTTP status; the
 * variable tables of README.md, OPERATIONS.md, LORA.md and DESIGN.md give the defaults src/config.ts applies; README's
 * request fields, scheduler counts and scheduler names are the runtime's; every link between the docs reaches a file
 * and a heading that exist.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { type Metric, Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config.js';
import { HTTP_STATUS, OUTCOMES } from '../src/errors.js';
import { createMetrics } from '../src/metrics.js';
import { SCHEDULER_CLASS_NAMES, SCHEDULER_NAMES } from '../src/pipeline/schedulers/names.js';
import { INSTANCE_FIELDS } from '../src/runtime/request.js';
import { startGpuMetrics } from '../src/runtime/gpu.js';
import { referenceDir } from '../scripts/reference.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const read = (rel: string): string => readFileSync(path.join(ROOT, rel), 'utf8');

/** Every page of the documentation. */
const DOCS = ['README.md', 'docs/BENCHMARKS.md', 'docs/DESIGN.md', 'docs/EXPORT.md', 'docs/FAULTS.md', 'docs/IMG2IMG.md',
  'docs/LORA.md', 'docs/MODELS.md', 'docs/OPERATIONS.md', 'docs/PARITY.md'];

interface Row { name: string; type: string; labels: string; meaning: string }

/** The cells of each row of the table whose header line is `header` in `file` (docs/OPERATIONS.md unless said). */
function table(header: string, file = 'docs/OPERATIONS.md'): string[][] {
  const lines = read(file).split('\n');
  const start = lines.findIndex((l) => l.trim() === header);
  expect(start, `${file}: the table headed ${header}`).toBeGreaterThan(0);
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
    const operations = literals(/export type S3Operation = ([^;]+);/.exec(read('src/metrics.ts'))![1]!, /'([a-z_]+)'/g);
    expect(operations.length).toBe(6);
    for (const o of operations) expect(row('s3_throttled_responses_total').labels, `operation ${o}:`).toContain(`${o}:`);
    const outcomes = literals(/export type S3Outcome = ([^;]+);/.exec(read('src/metrics.ts'))![1]!, /'([a-z_]+)'/g);
    expect(outcomes.length).toBe(7);
    for (const o of outcomes) expect(row('s3_requests_total').labels, `outcome ${o}:`).toContain(`${o}:`);
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

describe('the defaults the docs give', () => {
  const cfg = loadConfig({});
  /** Each variable with a fixed default, and that default as config.ts applies it. */
  const DEFAULTS: Record<string, string | number | boolean> = {
    MODEL_NAME: cfg.modelName, PORT: cfg.port, HOST: cfg.host, CACHE_EVICT: cfg.cacheEvict,
    S3_USE_HTTPS: cfg.s3.useHttps, S3_VERIFY_SSL: cfg.s3.verifySsl, S3_MAX_CONCURRENCY: cfg.s3.maxConcurrency,
    S3_PART_SIZE: cfg.s3.partSize, S3_TRANSPORT: cfg.s3.transport, S3_STALL_TIMEOUT_S: cfg.s3.stallTimeoutS,
    S3_MAX_ATTEMPTS: cfg.s3.maxAttempts, S3_THROTTLE_TIMEOUT_S: cfg.s3.throttleTimeoutS, S3_VERIFY_CONTENT: cfg.s3.verifyContent,
    EXECUTION_PROVIDER: cfg.executionProvider, ORT_INTRA_OP_THREADS: cfg.intraOpThreads, AUX_THREADS: cfg.auxThreads,
    ORT_OPTIMIZED_CACHE: cfg.optimizedModelCache, ORT_OPTIMIZED_CACHE_MAX_MB: cfg.optimizedCacheMaxMb,
    ORT_GRAPH_OPTIMIZATION: cfg.graphOptimization, CUDA_TF32: cfg.cudaTf32,
    MAX_BATCH_SIZE: cfg.maxBatchSize, BATCH_WINDOW_MS: cfg.batchWindowMs, MAX_QUEUE: cfg.maxQueue,
    INPUT_IMAGES_MB: cfg.inputImagesMb, RESULT_CACHE_MB: cfg.resultCacheMb, MAX_BODY_BYTES: cfg.maxBodyBytes,
    MAX_IMAGE_SIZE: cfg.maxImageSize, MAX_STEPS: cfg.maxSteps, MAX_IMAGES_PER_REQUEST: cfg.maxImagesPerRequest,
    OUTPUT_FORMAT: cfg.defaultOutputFormat, MAX_LORAS: cfg.maxLoras, LORA_MAX_SETS: cfg.loraMaxSets,
    LORA_CACHE_MB: cfg.loraCacheMb, WARMUP_STEPS: cfg.warmupSteps, WARMUP_VAE_ENCODER: cfg.warmupVaeEncoder,
    REQUEST_TIMEOUT_S: cfg.requestTimeoutS, SHUTDOWN_GRACE_S: cfg.shutdownGraceS,
    EXIT_ON_BOOT_FAILURE: cfg.exitOnBootFailure, LOG_LEVEL: cfg.logLevel, CE_MERGE: cfg.ceMerge,
  };
  /** How a doc may write a default: a boolean as 1/0 or true/false. */
  const spellings = (v: string | number | boolean): string[] => (v === true ? ['1', 'true'] : v === false ? ['0', 'false'] : [String(v)]);
  const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

  /**
   * For each row of a `| variable | default | meaning |` table, the defaults of the variables it names appear in its
   * default cell in the same order (`8080` / `0.0.0.0` for PORT / HOST), so a changed default or two swapped ones fail.
   */
  function check(file: string): number {
    let rows = 0;
    for (const [names, dflt] of table('| variable | default | meaning |', file)) {
      let at = 0;
      for (const name of [...names!.matchAll(/\b[A-Z][A-Z0-9_]+\b/g)].map((m) => m[0]).filter((n) => Object.hasOwn(DEFAULTS, n))) {
        const found = spellings(DEFAULTS[name]!).map((s) => new RegExp(`(?<![\\w.])${escape(s)}(?![\\w.])`).exec(dflt!.slice(at)))
          .filter((m) => m !== null).sort((a, b) => a.index - b.index)[0];
        expect(found, `${file}: ${name}'s default is ${String(DEFAULTS[name])} in src/config.ts; the row says ${JSON.stringify(dflt)}`).toBeDefined();
        at += found!.index + found![0].length;
        rows++;
      }
    }
    return rows;
  }

  it("README's configuration table: every variable's default", () => {
    expect(check('README.md')).toBe(Object.keys(DEFAULTS).length);
  });

  it('a default given in prose (`MAX_LORAS` (default 4), `REQUEST_TIMEOUT_S` (600 s by default)) is the code\'s, or templates/params.env\'s', () => {
    const params = Object.fromEntries([...read('templates/params.env').matchAll(/^([A-Z][A-Z0-9_]*)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
    const seen: string[] = [];
    for (const file of DOCS) {
      const text = read(file);
      for (const m of text.matchAll(/`([A-Z][A-Z0-9_]+)` \((?:default `?([\w.-]+)`?|([\d.]+) (s|MiB) by default)/g)) {
        const [, name, plain, amount, unit] = m;
        const said = plain ?? String(Number(amount) * (unit === 'MiB' ? 1024 * 1024 : 1));
        const want = Object.hasOwn(DEFAULTS, name!) ? spellings(DEFAULTS[name!]!) : Object.hasOwn(params, name!) ? [params[name!]!] : undefined;
        if (want === undefined) continue;
        expect(want, `${file}: ${m[0]}`).toContain(said);
        seen.push(name!);
      }
    }
    expect(seen.length).toBeGreaterThanOrEqual(8);
  });

  it('docs/OPERATIONS.md (batching and the queue), docs/LORA.md and docs/DESIGN.md (S3 settings) repeat the same defaults', () => {
    expect(check('docs/OPERATIONS.md')).toBeGreaterThanOrEqual(4);
    expect(check('docs/LORA.md')).toBe(3);
    expect(check('docs/DESIGN.md')).toBe(9);
  });
});

describe("README's request fields and schedulers", () => {
  const readme = read('README.md');

  it('the V1 table lists every field an instance takes, and no other', () => {
    const fields = table('| field | type | default | meaning |', 'README.md').flatMap(([cell]) => [...cell!.matchAll(/`([a-z_]+)`/g)].map((x) => x[1]!));
    expect(fields.sort()).toEqual([...INSTANCE_FIELDS].sort());
  });

  it('counts the classes and request names the runtime has (Parity)', () => {
    const m = /the (\d+)\s+schedulers \((\d+) request names/.exec(readme);
    expect(m, 'README.md: "the N schedulers (M request names"').not.toBeNull();
    // SCHEDULER_NAMES also takes each class's own name (`EulerDiscreteScheduler`); the README counts the short names.
    const short = Object.keys(SCHEDULER_NAMES).filter((n) => !(SCHEDULER_CLASS_NAMES as readonly string[]).includes(n));
    expect([Number(m![1]), Number(m![2])]).toEqual([SCHEDULER_CLASS_NAMES.length, short.length]);
  });

  it("counts the prompts tokenizer.test checks against OpenAI CLIP's ids (Parity)", () => {
    const m = /CLIP's own ids on (\d+) prompts/.exec(readme);
    expect(m, 'README.md: "CLIP\'s own ids on N prompts"').not.toBeNull();
    const files = [path.join(referenceDir(), 'clip-tokenizer', 'cases.json'), ...['clip-cases-unicode.json', 'clip-fuzz.json', 'clip-mojibake.json'].map((f) => path.join(ROOT, 'test/fixtures/parity', f))];
    const cases = files.map((f) => (JSON.parse(readFileSync(f, 'utf8')) as { cases: unknown[] }).cases.length);
    expect(Number(m![1])).toBe(cases.reduce((a, b) => a + b, 0));
  });

  it("the V1 table's scheduler row names only request names the runtime takes", () => {
    const row = readme.split('\n').find((l) => l.startsWith('| `scheduler` |'))!;
    const names = [...row.split('|')[4]!.matchAll(/`([a-z0-9_]+)`/g)].map((x) => x[1]!);
    expect(names.length).toBeGreaterThan(10);
    expect(names.filter((n) => !Object.hasOwn(SCHEDULER_NAMES, n))).toEqual([]);
  });
});

describe('links between the docs', () => {
  /** A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as '-', repeats numbered -1, -2… */
  function anchors(file: string): Set<string> {
    const out = new Set<string>();
    const seen = new Map<string, number>();
    for (const m of read(file).replace(/^```[\s\S]*?^```/gm, '').matchAll(/^#{1,6} (.+)$/gm)) {
      const slug = m[1]!.trim().toLowerCase().replace(/[^\p{L}\p{N}\s_-]/gu, '').replace(/\s/g, '-');
      const n = seen.get(slug) ?? 0;
      seen.set(slug, n + 1);
      out.add(n === 0 ? slug : `${slug}-${n}`);
    }
    return out;
  }

  it('every relative link names a file that exists, and a heading of it that exists', () => {
    const broken: string[] = [];
    let links = 0;
    for (const file of DOCS) {
      for (const m of read(file).replace(/^```[\s\S]*?^```/gm, '').matchAll(/\]\(([^)\s]+)\)/g)) {
        if (/^[a-z]+:/.test(m[1]!)) continue;
        links++;
        const [rel, anchor] = m[1]!.split('#');
        const target = rel === '' ? file : path.normalize(path.join(path.dirname(file), rel!));
        if (!existsSync(path.join(ROOT, target))) broken.push(`${file}: ${m[1]} (no such file)`);
        else if (anchor !== undefined && target.endsWith('.md') && !anchors(target).has(anchor)) broken.push(`${file}: ${m[1]} (no such heading)`);
      }
    }
    expect(links).toBeGreaterThan(50);
    expect(broken).toEqual([]);
  });
});
