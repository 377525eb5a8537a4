/**
 * @module The result cache key's cost on the main thread (`npm run bench:cache-key`, i.e. `node
 * dist/scripts/bench-cache-key.js`): CLIP tokenization (the demo's real CLIP vocabulary) of a 75-token prompt and of a
 * 2,000-character one, with words the tokenizer has seen and with words it has not, and keyOf by the text against keyOf
 * by the ids of one tokenizer (SD 1.x/2.x) and of two (SDXL). Medians and 90th percentiles of BENCH_N (default 3000)
 * runs each, after 200 unmeasured; then the worst case the request limits allow, one 10,000-character word.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import type { GenerationRequest } from '../src/runtime/request.js';
import { createResultCache } from '../src/runtime/result-cache.js';

const n = Number(process.env.BENCH_N ?? 3000);
const assets = path.resolve(import.meta.dirname, '..', '..', 'src', 'demo', 'assets');
const vocab = JSON.parse(readFileSync(path.join(assets, 'vocab.json'), 'utf8')) as Record<string, number>;
const merges = readFileSync(path.join(assets, 'merges.txt'), 'utf8');
const tokenizer = (padToken?: string) => ClipTokenizer.fromData(vocab, merges, padToken ? { padToken } : {});

const WORDS = ('a photograph of an astronaut riding a horse on mars, highly detailed, volumetric lighting, cinematic, 8k, '
  + 'trending on artstation, by greg rutkowski and alphonse mucha, sharp focus, golden hour, dramatic sky, intricate armor').split(' ');
let seed = 7;
const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
const letters = (k: number) => Array.from({ length: k }, () => 'abcdefghijklmnopqrstuvwxyz'[Math.floor(rnd() * 26)]).join('');

function main(): void {
  const t = tokenizer();
  let p75 = '';
  for (let i = 0; ; i++) {
    const next = `${p75}${p75 ? ' ' : ''}${WORDS[i % WORDS.length]!}`;
    if (t.tokenize(next).length > 75) break;
    p75 = next;
  }
  while (t.tokenize(p75).length < 75) p75 += ' a';
  // Not ASCII alone, and with entities: the slow path of basicClean (NFC, HTML unescaped twice).
  let p2000 = '';
  for (let i = 0; p2000.length < 2000; i++) p2000 += `${p2000 ? ' ' : ''}${WORDS[i % WORDS.length]!}${i % 7 === 6 ? ' Überraschung &amp; café' : ''}`;
  p2000 = p2000.slice(0, 2000);

  const line = (label: string, f: (i: number) => void) => {
    for (let i = 0; i < 200; i++) f(i);
    const us: number[] = [];
    for (let i = 0; i < n; i++) {
      const a = process.hrtime.bigint();
      f(i);
      us.push(Number(process.hrtime.bigint() - a) / 1000);
    }
    us.sort((x, y) => x - y);
    process.stdout.write(`${label.padEnd(58)} median ${us[n >> 1]!.toFixed(1).padStart(7)} µs   p90 ${us[Math.floor(n * 0.9)]!.toFixed(1).padStart(7)} µs\n`);
  };
  const req = (prompt: string): GenerationRequest => ({
    shape: { steps: 25, guidance: 7.5, height: 512, width: 512, scheduler: undefined, eta: 0, guidanceRescale: 0 },
    items: [{ prompt, negativePrompt: 'blurry, low quality', seed: 1, numImages: 1 }],
    seedsGiven: true,
    output: { format: 'png', quality: undefined, uri: undefined },
    previewEvery: 0,
  });
  const sd = [tokenizer()];
  const xl = [tokenizer(), tokenizer('!')];
  const defaults = () => ({ scheduler: 'PNDMScheduler' });
  const byText = createResultCache('m', 1 << 20, { defaults });
  const bySd = createResultCache('m', 1 << 20, { defaults, encode: (s) => sd.map((k) => k.encode(s)) });
  const byXl = createResultCache('m', 1 << 20, { defaults, encode: (s) => xl.map((k) => k.encode(s)) });
  for (const [name, p] of [[`75 tokens (${p75.length} chars)`, p75], [`2000 chars (${t.tokenize(p2000).length} tokens)`, p2000]] as const) {
    const unseen = Array.from({ length: n + 200 }, () => {
      let s = '';
      while (s.length < p.length) s += `${s ? ' ' : ''}${letters(3 + Math.floor(rnd() * 6))}`;
      return s.slice(0, p.length);
    });
    line(`${name}: encode, words seen before`, () => t.encode(p));
    line(`${name}: encode, unseen words of that length`, (i) => t.encode(unseen[i]!));
    line(`${name}: keyOf by text (before)`, () => byText.keyOf(req(p)));
    line(`${name}: keyOf by ids, 1 tokenizer`, () => bySd.keyOf(req(p)));
    line(`${name}: keyOf by ids, 2 tokenizers (SDXL)`, () => byXl.keyOf(req(p)));
  }
  const word = letters(10_000);
  const ms: number[] = [];
  for (let i = 0; i < 20; i++) {
    const a = performance.now();
    t.encode(word);
    ms.push(performance.now() - a);
  }
  ms.sort((x, y) => x - y);
  process.stdout.write(`one 10,000-character word (never cached): encode median ${ms[10]!.toFixed(1)} ms, min ${ms[0]!.toFixed(1)} ms\n`);
}

main();
