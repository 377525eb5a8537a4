/**
 * The layout's arrows, read from the source: main → server → runtime → pipeline | storage | demo, with config, errors,
 * log, metrics, files, slots and termination as leaves any layer may use (and s3-url, below config, which uses it). No import runs back up, none
 * crosses between the sibling layers, and no module imports itself through others (static, dynamic and type-only
 * imports all count). There are no exceptions: the checks are also run on a small made-up graph with one of each
 * fault, so a broken checker cannot pass silently.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const SRC = path.resolve('src');
const RANK: Record<string, number> = { main: 0, server: 1, runtime: 2, pipeline: 3, storage: 3, demo: 3, descriptors: 8, config: 9, errors: 9, log: 9, metrics: 9, 's3-url': 10, deadline: 10, files: 10, slots: 10, termination: 10 };
function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

/** Every relative import of every module under src/, as paths relative to src/. */
function graph(): Map<string, string[]> {
  const g = new Map<string, string[]>();
  const spec = /(?:\bfrom\s*|\bimport\s*\(\s*|^\s*import\s+)['"](\.{1,2}\/[^'"]+)['"]/gm;
  for (const file of sources(SRC)) {
    const deps = [...readFileSync(file, 'utf8').matchAll(spec)].map((m) => path.relative(SRC, path.resolve(path.dirname(file), m[1]!)).replace(/\.js$/, '.ts'));
    g.set(path.relative(SRC, file), [...new Set(deps)]);
  }
  return g;
}

const layer = (rel: string) => (rel.includes('/') ? rel.split('/')[0]! : rel.replace(/\.ts$/, ''));

/** Strongly connected groups of more than one module (Tarjan), each as its sorted members. */
function cycles(g: Map<string, string[]>): string[] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const on = new Set<string>();
  const out: string[] = [];
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    on.add(v);
    for (const w of g.get(v) ?? []) {
      if (!g.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const group: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        on.delete(w);
        group.push(w);
      } while (w !== v);
      if (group.length > 1) out.push(group.sort().join(' > '));
    }
  };
  for (const v of g.keys()) if (!index.has(v)) visit(v);
  return out.sort();
}

/** Imports that run back up, or across between sibling layers. */
function upward(g: Map<string, string[]>): string[] {
  const bad: string[] = [];
  for (const [from, deps] of g) {
    for (const to of deps) {
      const [a, b] = [layer(from), layer(to)];
      if (a === b || RANK[b] === undefined || RANK[a] === undefined) continue;
      if (RANK[b]! <= RANK[a]!) bad.push(`${from} -> ${to}`);
    }
  }
  return bad.sort();
}

describe('module layout', () => {
  const g = graph();

  it('the checks find an arrow up, an arrow across and a cycle when there is one', () => {
    const fake = new Map<string, string[]>([
      ['main.ts', ['server/app.ts']],
      ['server/app.ts', ['runtime/engine.ts']],
      ['runtime/engine.ts', ['pipeline/job.ts', 'server/app.ts']],
      ['pipeline/job.ts', ['storage/cache.ts', 'pipeline/onnx.ts']],
      ['pipeline/onnx.ts', ['pipeline/job.ts', 'errors.ts']],
      ['storage/cache.ts', []],
      ['errors.ts', []],
    ]);
    expect(upward(fake)).toEqual(['pipeline/job.ts -> storage/cache.ts', 'runtime/engine.ts -> server/app.ts']);
    expect(cycles(fake)).toEqual(['pipeline/job.ts > pipeline/onnx.ts', 'runtime/engine.ts > server/app.ts']);
  });

  it('reads the imports it checks (every module resolves inside src/)', () => {
    expect(g.size).toBeGreaterThan(40);
    for (const [from, deps] of g) for (const d of deps) expect(g.has(d), `${from} imports ${d}`).toBe(true);
    expect(g.get('main.ts')).toEqual(expect.arrayContaining(['runtime/runtime.ts', 'server/app.ts']));
  });

  it('every layer has a rank (an unranked module would escape the check below)', () => {
    expect([...new Set([...g.keys()].map(layer))].filter((l) => RANK[l] === undefined)).toEqual([]);
  });

  it('no import runs back up or across between sibling layers', () => {
    expect(upward(g)).toEqual([]);
  });

  it('no import cycle', () => {
    expect(cycles(g)).toEqual([]);
  });
});
