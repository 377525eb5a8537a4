/**
 * The offline merge tool (`npm run lora:merge`, dist/scripts/lora-merge.js) run as users run it, in a process of its own:
 * it reads adapters by ranges as a request's adapter set does, so an adapter over 2 GiB merges and a large one is
 * never held whole.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readLoraMap } from '../src/pipeline/lora-map.js';
import { fixtureModel } from './fixtures/index.js';
import { writeKohyaAdapter, writeSparseCopy } from './helpers/big-adapter.js';

const CLI = path.join(import.meta.dirname, '..', 'dist', 'scripts', 'lora-merge.js');

let tmp: string;
let model: string;
beforeAll(async () => {
  model = await fixtureModel({ externalData: true });
  tmp = mkdtempSync(path.join(os.tmpdir(), 'lora-merge-cli-'));
  // Writes the process's peak RSS where PEAK_OUT says, as it exits (however it exits).
  writeFileSync(path.join(tmp, 'peak.mjs'),
    "import { writeFileSync } from 'node:fs';\nprocess.on('exit', () => writeFileSync(process.env.PEAK_OUT, String(process.resourceUsage().maxRSS * 1024)));\n");
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** The tool on `adapters` into a new folder: its exit status, stderr, report and peak RSS. */
function merge(out: string, ...adapters: string[]) {
  const peakFile = path.join(tmp, `${path.basename(out)}.peak`);
  const r = spawnSync(process.execPath, ['--import', path.join(tmp, 'peak.mjs'), CLI, model, out, ...adapters],
    { encoding: 'utf8', timeout: 240_000, env: { ...process.env, PEAK_OUT: peakFile } });
  const report = r.status === 0 ? JSON.parse(readFileSync(path.join(out, 'lora-merge.json'), 'utf8')) as Record<string, { ms?: number }> : undefined;
  for (const v of Object.values(report ?? {})) delete v.ms;
  return { status: r.status, stderr: r.stderr, report, peak: Number(readFileSync(peakFile, 'utf8')) };
}

/** Every file under `dir`, by relative path. */
const files = (dir: string) => Object.fromEntries(readdirSync(dir, { recursive: true }).map(String).sort()
  .filter((f) => statSync(path.join(dir, f)).isFile()).map((f) => [f, readFileSync(path.join(dir, f))]));

describe('lora:merge', () => {
  it('merges an adapter whose tensors lie past 4 GiB of its file (sparse) as it merges the same tensors at the start', () => {
    const small = path.join(model, 'loras', 'demo-kohya.safetensors');
    const dir = path.join(tmp, 'sparse');
    mkdirSync(dir);
    const big = path.join(dir, 'demo-kohya.safetensors');
    // The tensors' bytes straddle 2^32: offsets past both 2^31 and 2^32 are read.
    const at = writeSparseCopy(small, big, 2 ** 32 - 4096);
    expect(at.start).toBeLessThan(2 ** 32);
    expect(at.end).toBeGreaterThan(2 ** 32);
    const a = merge(path.join(tmp, 'out-small'), `${small}:0.8`);
    expect([a.status, a.stderr]).toEqual([0, '']);
    // Read whole, this failed: "File size (4294…) is greater than 2 GiB".
    const b = merge(path.join(tmp, 'out-sparse'), `${big}:0.8`);
    expect([b.status, b.stderr]).toEqual([0, '']);
    expect(b.report).toEqual(a.report);
    expect(Object.keys(a.report!)).toEqual(expect.arrayContaining(['unet', 'text_encoder']));
    const [fa, fb] = [files(path.join(tmp, 'out-small')), files(path.join(tmp, 'out-sparse'))];
    expect(Object.keys(fb)).toEqual(Object.keys(fa));
    for (const [f, bytes] of Object.entries(fa)) if (f !== 'lora-merge.json') expect(Buffer.compare(fb[f]!, bytes), f).toBe(0);
  }, 300_000);

  it('holds no adapter whole: eight 24 MB float16 adapters (192 MB) grow its peak by much less than their size', () => {
    const map = readLoraMap(path.join(model, 'unet'))!;
    // Each on every weight of the demo UNet, ~2.4 MB of float16 per weight: merged a weight's layers at a time, one
    // adapter after another (mergeDelta), what is held at once is a few of those as float64, not the files.
    const adapters = Array.from({ length: 8 }, (_, i) => path.join(tmp, `big-${i}.safetensors`));
    const bytes = adapters.reduce((n, f) => n + writeKohyaAdapter(f, map, 24e6 / Object.keys(map.weights).length), 0);
    expect(bytes).toBeGreaterThan(180e6);
    const base = merge(path.join(tmp, 'out-base'), path.join(model, 'loras', 'demo-kohya.safetensors'));
    const got = merge(path.join(tmp, 'out-big'), ...adapters.map((f) => `${f}:0.1`));
    expect([base.status, base.stderr, got.status, got.stderr]).toEqual([0, '', 0, '']);
    expect((got.report!.formats as unknown as Record<string, string>)).toEqual(Object.fromEntries(adapters.map((f) => [path.basename(f, '.safetensors'), 'kohya'])));
    expect((got.report!.unet as unknown as { weights: string[] }).weights).toHaveLength(Object.keys(map.weights).length);
    const mb = (n: number) => n / 2 ** 20;
    // The lower of two runs: one run in a loaded full suite once peaked 100 MB higher (+176 MB, never seen alone or
    // beside busy loops: +75 to +81). Reading whole would put both runs at +190 MB or more.
    const again = merge(path.join(tmp, 'out-big-2'), ...adapters.map((f) => `${f}:0.1`));
    expect([again.status, again.stderr]).toEqual([0, '']);
    const grew = mb(Math.min(got.peak, again.peak) - base.peak);
    console.log(`lora:merge peak RSS: ${mb(base.peak).toFixed(0)} MB with the demo adapter, ${mb(got.peak).toFixed(0)} and ${mb(again.peak).toFixed(0)} MB with ${mb(bytes).toFixed(0)} MB of adapters (+${grew.toFixed(0)} MB)`);
    // Read whole, the files alone are held at once: the peak grew by their size and more (+251 MB; by ranges +75 MB).
    expect(grew).toBeLessThan(mb(bytes) * 0.6);
  }, 300_000);

  it('names the file it cannot read, and writes nothing', () => {
    const bad = path.join(tmp, 'bad.safetensors');
    writeFileSync(bad, 'not safetensors');
    const out = path.join(tmp, 'out-bad');
    for (const [file, why] of [[path.join(tmp, 'absent.safetensors'), 'adapter "absent" could not be read (ENOENT)'], [bad, 'adapter "bad" is not a valid safetensors file: ']]) {
      const r = merge(out, path.join(model, 'loras', 'demo-kohya.safetensors'), file!);
      expect([r.status, r.stderr]).toEqual([1, expect.stringContaining(`${file}: ${why}`)]);
      expect(existsSync(out)).toBe(false);
    }
  });
});

describe('lora:merge command line', () => {
  const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 60_000 });
  const usage = /^usage: lora-merge \[--linked\] MODEL_DIR OUT_DIR ADAPTER\.safetensors\[:SCALE\] \[\.\.\.\]\n/;

  it('--help prints the usage on stdout and exits 0', () => {
    const r = cli('--help');
    expect([r.status, r.stderr]).toEqual([0, '']);
    expect(r.stdout).toMatch(usage);
  });

  it('refuses a scale that is no number, exit 2 and nothing written (1.2.3 merged NaN into every patched weight, exit 0)', () => {
    const adapter = path.join(model, 'loras', 'demo-kohya.safetensors');
    for (const scale of ['1.2.3', '.', 'abc', '1e400']) {
      const out = path.join(tmp, `out-scale-${scale}`);
      const r = cli(model, out, `${adapter}:${scale}`);
      expect([r.status, r.stdout], scale).toEqual([2, '']);
      expect(r.stderr.split('\n')[0]).toBe(`lora-merge: ${JSON.stringify(`${adapter}:${scale}`)}: the scale after ':' must be a number such as 0.8, got ${JSON.stringify(scale)}`);
      expect(existsSync(out)).toBe(false);
    }
  });

  it('names an unknown option and a missing argument instead of reading them as paths', () => {
    const adapter = path.join(model, 'loras', 'demo-kohya.safetensors');
    const opt = cli('--scale', '0.5', model, path.join(tmp, 'out-opt'), adapter);
    expect([opt.status, opt.stderr.split('\n')[0]]).toEqual([2, 'lora-merge: unknown option "--scale"']);
    expect(opt.stderr.split('\n').slice(1).join('\n')).toMatch(usage);
    const few = cli(model, path.join(tmp, 'out-few'));
    expect([few.status, few.stderr.split('\n')[0]]).toEqual([2, 'lora-merge: needs MODEL_DIR, OUT_DIR and at least one adapter']);
    // A model folder that is not there is named as such, not as components lacking a lora_map.json.
    const absent = path.join(tmp, 'no-model');
    const none = cli(absent, path.join(tmp, 'out-none'), adapter);
    expect([none.status, none.stderr]).toEqual([1, `lora-merge: MODEL_DIR ${absent} is not a directory\n`]);
  });
});
