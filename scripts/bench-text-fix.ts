/**
 * @module CLIP's text clean-up (ftfy.fix_text, text-fix.ts) per prompt (`npm run bench:text-fix`, i.e. `node
 * dist/scripts/bench-text-fix.js [BASELINE_CHECKOUT]`): a mix of prompts as users send them (plain ASCII, curly
 * quotes and dashes, accented words, CJK / Cyrillic / emoji, mojibake pasted from pages), each kind alone, and
 * 10,000-character texts at the request limit (nested HTML escapes, dense mojibake, Latin-1 and Cyrillic prose). With a
 * checkout whose build holds another text-fix.js (`<checkout>/dist/src/pipeline/text-fix.js`, e.g. the parent commit's),
 * runs both in one process, interleaved: medians and 90th percentiles of BENCH_N (default 2,000) calls, after 200
 * unmeasured, and before/after.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { fixText } from '../src/pipeline/text-fix.js';

type Fix = (text: string) => string;
const n = Number(process.env.BENCH_N ?? 2000);

let seed = 11;
const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
const mojibake = (s: string) => Buffer.from(s, 'utf8').toString('latin1');
const w1252 = new TextDecoder('windows-1252');
const as1252 = (s: string) => w1252.decode(Buffer.from(s, 'utf8'));

const subjects = ['a photograph of an astronaut riding a horse', 'portrait of a woman in a red coat', 'a cozy cabin in the snowy mountains', 'a bowl of ramen on a wooden table', 'cyberpunk city street at night, neon lights'];
const styles = ['highly detailed, 8k, trending on artstation', 'oil painting by john singer sargent', 'cinematic lighting, volumetric fog', 'studio ghibli style, soft colors', 'sharp focus, golden hour, 35mm'];
const ascii = () => `${pick(subjects)}, ${pick(styles)}, (masterpiece:1.2), seed ${Math.floor(rnd() * 1000)}`;
const KINDS: Record<string, () => string> = {
  'plain ASCII': ascii,
  'curly quotes, dashes': () => `${pick(subjects)} — “${pick(styles)}”, it’s ${Math.floor(rnd() * 100)}% done…`,
  'accented words': () => `${pick(['café in Zürich', 'crème brûlée, à la française', 'São Paulo skyline', 'smörgåsbord in Ærøskøbing', 'Dvořák in Kraków'])}, ${pick(styles)}`,
  'CJK, Cyrillic, emoji': () => `${pick(['東京タワーの夜景', '서울의 밤거리', 'Москва ночью, снег', '🐱 cat with ✨ sparkles 👍🏽', 'Αθήνα στο φως'])} ${pick(styles)}`,
  'mojibake pasted': () => pick([mojibake, as1252])(`${pick(["don’t stop", 'café au lait', 'it’s a “great” day', 'naïve façade'])}, ${pick(styles)}`),
};
/** The mix: mostly plain prompts. */
const MIX: [string, number][] = [['plain ASCII', 0.7], ['curly quotes, dashes', 0.1], ['accented words', 0.07], ['CJK, Cyrillic, emoji', 0.08], ['mojibake pasted', 0.05]];
const mixed = () => {
  let r = rnd();
  for (const [kind, share] of MIX) if ((r -= share) < 0) return KINDS[kind]!();
  return ascii();
};

const long = (unit: string) => unit.repeat(Math.ceil(10_000 / unit.length)).slice(0, 10_000);
const alphabet = Array.from(new Set(w1252.decode(Uint8Array.from({ length: 128 }, (_, i) => 128 + i)) + 'aeiost ?'));
const LONG: Record<string, string> = {
  'nested &amp;amp;… after "é "': `é &${'amp;'.repeat(2499)}`,
  'nested &amp;amp;… before a C1 control': `&${'amp;'.repeat(2497)}lt;\x81`,
  'mojibake "cafÃ© " repeated': long('cafÃ© '),
  'mojibake with emoji ("donâ€™t 🐱 ")': long('donâ€™t 🐱 '),
  'random Windows-1252 characters': Array.from({ length: 10_000 }, () => pick(alphabet)).join(''),
  'Latin-1 prose': long('crème brûlée à la française, '),
  'Cyrillic prose': long('привет мир, красивый пейзаж '),
};

const stats = (us: number[]) => {
  us.sort((x, y) => x - y);
  return { median: us[us.length >> 1]!, p90: us[Math.floor(us.length * 0.9)]! };
};
const fmt = (v: number) => (v >= 1000 ? `${(v / 1000).toFixed(2)} ms` : `${v.toFixed(2)} µs`).padStart(10);

function line(label: string, inputs: string[], fixes: Fix[]): void {
  for (let i = 0; i < Math.min(200, inputs.length); i++) for (const f of fixes) f(inputs[i % inputs.length]!);
  const us = fixes.map(() => [] as number[]);
  for (let i = 0; i < inputs.length; i++) {
    // Interleaved, alternating which goes first, so load from other jobs falls on both.
    for (const k of i % 2 ? fixes.keys() : [...fixes.keys()].reverse()) {
      const a = process.hrtime.bigint();
      fixes[k]!(inputs[i]!);
      us[k]!.push(Number(process.hrtime.bigint() - a) / 1000);
    }
  }
  const s = us.map(stats);
  const cells = s.map((x) => `${fmt(x.median)} ${fmt(x.p90)}`).join('  ');
  const ratio = s.length === 2 ? `${(s[1]!.median / s[0]!.median).toFixed(2)}×`.padStart(14) : '';
  process.stdout.write(`${label.padEnd(42)} ${cells}${ratio}\n`);
}

async function main(): Promise<void> {
  const baseline = process.argv[2];
  const fixes: Fix[] = [fixText];
  if (baseline) {
    const mod = (await import(pathToFileURL(path.resolve(baseline, 'dist/src/pipeline/text-fix.js')).href)) as { fixText: Fix };
    fixes.unshift(mod.fixText);
  }
  const head = fixes.length === 2 ? `${'before median'.padStart(13)} ${'p90'.padStart(10)}  ${'after median'.padStart(12)} ${'p90'.padStart(10)}  ${'after/before'.padStart(12)}` : `${'median'.padStart(10)} ${'p90'.padStart(10)}`;
  process.stdout.write(`${'input'.padEnd(42)} ${head}\n`);
  line('prompt mix (70% plain ASCII)', Array.from({ length: n }, mixed), fixes);
  for (const [kind, make] of Object.entries(KINDS)) line(kind, Array.from({ length: n }, make), fixes);
  for (const [name, text] of Object.entries(LONG)) line(`10,000 characters: ${name}`, Array.from({ length: Math.max(10, n >> 6) }, () => text), fixes);
}

await main().catch((e: unknown) => {
  process.stderr.write(`bench-text-fix: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
