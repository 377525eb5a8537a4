/**
 * Long words merge by symbol ids through a heap (ClipTokenizer's #bpeIds), short ones by OpenAI's plain loop over
 * strings (#bpe). Differential: thousands of random words, 1 to 3,000 characters, ASCII, mixed scripts, emoji and
 * every byte value, through both on the real CLIP vocabulary, token for token.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import { referenceDir } from '../scripts/reference.js';

const tokDir = process.env.CLIP_TOKENIZER_DIR ?? path.join(referenceDir(), 'clip-tokenizer');
const vocab = JSON.parse(readFileSync(path.join(tokDir, 'vocab.json'), 'utf8')) as Record<string, number>;
const merges = readFileSync(path.join(tokDir, 'merges.txt'), 'utf8');
const cases = JSON.parse(readFileSync(path.join(tokDir, 'cases.json'), 'utf8')) as { cases: { text: string }[] };

let seed = 20261207;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
const int = (n: number) => Math.floor(rnd() * n);
/** Random code points of [lo, hi] that `keep` accepts. */
const drawn = (lo: number, hi: number, keep: RegExp, k: number): string[] => {
  const out: string[] = [];
  while (out.length < k) {
    const cp = lo + int(hi - lo + 1);
    if (cp >= 0xd800 && cp <= 0xdfff) continue;
    const c = String.fromCodePoint(cp);
    if (keep.test(c)) out.push(c);
  }
  return out;
};
const LETTER = /^\p{L}$/u;
// What CLIP's split keeps together as one word when it is not letters: neither letter, number nor whitespace.
const OTHER = /^[^\s\p{L}\p{N}\p{Cc}\u0085\u00a0\u0345]$/u;
const dictionary = [...new Set(cases.cases.flatMap((c) => c.text.toLowerCase().match(/\p{L}+/gu) ?? []))];
const alphabets: Record<string, () => string[]> = {
  'ASCII letters': () => Array.from('abcdefghijklmnopqrstuvwxyz'),
  'two letters': () => Array.from('ab'),
  'few letters': () => Array.from('aeiounst'),
  // Words of the reference prompts run together: merges deep into the table, and whole-word tokens.
  'dictionary words': () => dictionary,
  'Latin-1 and Latin Extended letters': () => drawn(0xc0, 0x24f, LETTER, 40),
  'Greek, Cyrillic, Arabic, Devanagari, Thai letters': () => drawn(0x370, 0xe7f, LETTER, 60),
  'CJK and Hangul': () => [...drawn(0x4e00, 0x9fff, LETTER, 30), ...drawn(0xac00, 0xd7a3, LETTER, 30), ...Array.from('的一是不了人我在')],
  'mixed scripts': () => [...Array.from('abcxyzéßøжщλω日本語한국'), ...drawn(0x100, 0x2ffff, LETTER, 40)],
  'astral letters (4 bytes)': () => drawn(0x10000, 0x2ffff, LETTER, 40),
  emoji: () => [...Array.from('🙂🚀✨🔥🎉👍❤️🤖🌈🐱'), '👩‍💻', '👍🏽', '🇯🇵', ...drawn(0x1f300, 0x1faff, OTHER, 40)],
  'punctuation and symbols': () => [...Array.from('!"#$%()*+,-./:;<=>?@[\\]^_`{|}~'), ...drawn(0x2000, 0x2bff, OTHER, 40)],
  'any byte (symbols across the code space)': () => drawn(0xa1, 0x10ffff, OTHER, 200),
};

/** Lengths 1–3,000 (UTF-16 units, the last character may go past), log-uniform: the pair rescan is quadratic. */
const length = () => Math.min(3000, Math.floor(Math.exp(rnd() * Math.log(3001))));

describe('long-word BPE by symbol ids', () => {
  // heapBpeFrom 2: every word of more than one byte merges by ids; Infinity: every word by the string loop.
  const ids = ClipTokenizer.fromData(vocab, merges, { heapBpeFrom: 2 });
  const scan = ClipTokenizer.fromData(vocab, merges, { heapBpeFrom: Infinity });

  for (const [name, chars] of Object.entries(alphabets)) {
    it(`gives the string loop's tokens for 200 random words: ${name}`, () => {
      const pool = chars();
      let longest = 0;
      for (let i = 0; i < 200; i++) {
        const k = length();
        let w = '';
        while (w.length < k) w += pool[int(pool.length)]!;
        longest = Math.max(longest, w.length);
        const got = ids.tokenize(w);
        const want = scan.tokenize(w);
        if (got.length !== want.length || got.some((x, j) => x !== want[j])) expect(got, `${name} #${i}: ${JSON.stringify(w.slice(0, 80))}…`).toEqual(want);
      }
      expect(longest).toBeGreaterThan(300);
    });
  }

  // Trained merges never rank a pair that holds a merge's result before that merge; shuffled ones do, and there
  // OpenAI's loop (every occurrence of the lowest-ranked pair, then look again) differs from merging one at a time.
  const lines = merges.trim().split('\n');
  const body = lines.slice(1);
  for (let i = body.length - 1; i > 0; i--) {
    const j = int(i + 1);
    [body[i], body[j]] = [body[j]!, body[i]!];
  }
  const shuffled = `${lines[0]!}\n${body.join('\n')}\n`;
  const idsShuffled = ClipTokenizer.fromData(vocab, shuffled, { heapBpeFrom: 2 });
  const scanShuffled = ClipTokenizer.fromData(vocab, shuffled, { heapBpeFrom: Infinity });
  for (const name of ['few letters', 'ASCII letters', 'dictionary words', 'mixed scripts', 'emoji']) {
    it(`gives the string loop's tokens with the merges shuffled, 100 random words: ${name}`, () => {
      const pool = alphabets[name]!();
      for (let i = 0; i < 100; i++) {
        const k = length();
        let w = '';
        while (w.length < k) w += pool[int(pool.length)]!;
        const got = idsShuffled.tokenize(w);
        const want = scanShuffled.tokenize(w);
        if (got.length !== want.length || got.some((x, j) => x !== want[j])) expect(got, `${name} #${i}: ${JSON.stringify(w.slice(0, 80))}…`).toEqual(want);
      }
    });
  }

  it('repeats and near-repeats, where one rank has many occurrences and merged pairs overlap', () => {
    const words: string[] = [];
    for (const unit of ['a', 'ab', 'aab', 'abc', 'ing', 'the', 'ss', 'é', '日', '🙂', '!?']) {
      for (const k of [1, 2, 3, 7, 31, 32, 33, 64, 65, 257, 1000]) {
        words.push(unit.repeat(k));
        words.push(`${unit.repeat(k)}x`, `x${unit.repeat(k)}`);
      }
    }
    for (const w of words) expect(ids.tokenize(w), w.slice(0, 40)).toEqual(scan.tokenize(w));
  });

  it('a tokenizer whose pair cache filled and was emptied, mid-word too, gives what a fresh one gives', () => {
    // Random vocabulary pieces run together merge to many distinct symbols: each 10,000-character word brings ~25,000
    // pairs, so these 24 words fill the cache's 65,536 entries more than once, in the middle of a word.
    const pool = Object.keys(vocab).map((t) => t.replace(/<\/w>$/, '')).filter((t) => /^[a-z]{2,}$/.test(t));
    const words = Array.from({ length: 24 }, () => {
      let w = '';
      while (w.length < 10_000) w += pool[int(pool.length)]!;
      return w.slice(0, 10_000);
    });
    const shared = ClipTokenizer.fromData(vocab, merges);
    for (const w of words) expect(shared.tokenize(w)).toEqual(ClipTokenizer.fromData(vocab, merges).tokenize(w));
  });
});
