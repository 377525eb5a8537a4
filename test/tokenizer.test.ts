import { readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { beforeAll, describe, expect, it } from 'vitest';
import { readLayout } from '../src/pipeline/model.js';
import { fixText } from '../src/pipeline/text-fix.js';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';
import { referenceDir } from '../scripts/reference.js';

const casesFile = process.env.CLIP_CASES ?? path.join(referenceDir(), 'clip-tokenizer', 'cases.json');
// vocab.json and merges.txt sit beside the cases unless CLIP_TOKENIZER_DIR says otherwise.
const tokDir = process.env.CLIP_TOKENIZER_DIR ?? path.dirname(casesFile);
/** `fixed`: what ftfy.fix_text made of the text (clip-mojibake.json). */
type Case = { text: string; ids: number[]; fixed?: string };
type Cases = { bos: number; eos: number; cases: Case[] };
const ref = JSON.parse(readFileSync(casesFile, 'utf8')) as Cases;
// Ids from OpenAI CLIP's own tokenizer beyond cases.json: Unicode, emoji, HTML references, whitespace and case edges,
// prompts as users paste them, mojibake (test/fixtures/parity/README.md says where each file came from).
const parity = ['clip-cases-unicode.json', 'clip-fuzz.json', 'clip-mojibake.json'].map((f) => {
  const file = path.resolve(import.meta.dirname, 'fixtures/parity', f);
  return { file: f, ref: JSON.parse(readFileSync(file, 'utf8')) as Cases };
});

let tok: ClipTokenizer;
beforeAll(async () => {
  tok = await ClipTokenizer.load(tokDir);
});

describe(`CLIP tokenizer parity (${ref.cases.length} cases)`, () => {
  it('has cases and the reference bos/eos', () => {
    expect(ref.cases.length).toBeGreaterThan(0);
    expect([tok.bosId, tok.eosId]).toEqual([ref.bos, ref.eos]);
  });

  for (const c of ref.cases) {
    it(JSON.stringify(c.text.length > 60 ? `${c.text.slice(0, 57)}...` : c.text), () => {
      expect(tok.tokenize(c.text)).toEqual(c.ids);
      expect(tok.tokenize(c.text)).toEqual(c.ids); // cached words give the same answer
    });
  }
});

for (const p of parity) {
  describe(`CLIP tokenizer parity, ${p.file} (${p.ref.cases.length} cases)`, () => {
    it('uses the same bos/eos', () => expect([tok.bosId, tok.eosId]).toEqual([p.ref.bos, p.ref.eos]));
    for (const c of p.ref.cases) {
      it(JSON.stringify(c.text.length > 60 ? `${c.text.slice(0, 57)}...` : c.text), () => {
        expect(tok.tokenize(c.text)).toEqual(c.ids);
      });
    }
  });
}

const mojibake = parity.find((p) => p.file === 'clip-mojibake.json')!.ref.cases;
describe(`ftfy.fix_text parity, mojibake repaired as ftfy repairs it (${mojibake.length} cases)`, () => {
  for (const c of mojibake) {
    it(JSON.stringify(c.text.length > 60 ? `${c.text.slice(0, 57)}...` : c.text), () => {
      expect(fixText(c.text)).toBe(c.fixed);
    });
  }
});

describe('ClipTokenizer.encode', () => {
  it('wraps in bos/eos and pads with the pad token to 77', () => {
    const ids = tok.encode('a photo of a dog');
    expect(ids.length).toBe(77);
    expect(ids.slice(0, 7)).toEqual([49406, 320, 1125, 539, 320, 1929, 49407]);
    expect(ids.slice(7).every((x) => x === 49407)).toBe(true); // SD 1.x pads with <|endoftext|>
    expect(tok.maxLength).toBe(77);
    expect(tok.padId).toBe(49407);
  });

  it('encodes the empty prompt as bos, eos, padding', () => {
    expect(tok.encode('')).toEqual([49406, ...new Array<number>(76).fill(49407)]);
    expect(tok.tokenize('   \t\n ')).toEqual([]);
  });

  it('truncates content to 75 tokens and keeps eos last', () => {
    const long = ref.cases.reduce((a, c) => (c.ids.length > a.ids.length ? c : a));
    const text = Array.from({ length: 5 }, () => long.text).join(' ');
    const content = tok.tokenize(text);
    expect(content.length).toBeGreaterThan(75);
    const ids = tok.encode(text);
    expect(ids.length).toBe(77);
    expect(ids[0]).toBe(49406);
    expect(ids.slice(1, 76)).toEqual(content.slice(0, 75));
    expect(ids[76]).toBe(49407);
  });

  it('reads the pad token from the tokenizer files (SD 2.x pads with "!", id 0)', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'clip-sd2-'));
    try {
      await copyFile(path.join(tokDir, 'vocab.json'), path.join(dir, 'vocab.json'));
      await copyFile(path.join(tokDir, 'merges.txt'), path.join(dir, 'merges.txt'));
      await writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ model_max_length: 77, pad_token: '<|endoftext|>' }));
      await writeFile(path.join(dir, 'special_tokens_map.json'), JSON.stringify({ pad_token: { content: '!', lstrip: false } }));
      const sd2 = await ClipTokenizer.load(dir);
      expect(sd2.padId).toBe(0);
      expect(sd2.encode('a dog').slice(0, 5)).toEqual([49406, 320, 1929, 49407, 0]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('fromData with a toy vocabulary merges by rank and honours maxLength', () => {
    const chars = ['a', 'b', 'c', 'a</w>', 'b</w>', 'c</w>'];
    const vocab: Record<string, number> = {};
    [...chars, 'ab', 'abc</w>', '<|startoftext|>', '<|endoftext|>'].forEach((t, i) => (vocab[t] = i));
    const toy = ClipTokenizer.fromData(vocab, '#version: 0.2\na b\nab c</w>\n', { maxLength: 6 });
    expect(toy.tokenize('ABC cab')).toEqual([vocab['abc</w>'], vocab.c, vocab.a, vocab['b</w>']]); // 'a b</w>' is not a merge
    expect(toy.encode('abc abc abc abc abc')).toEqual([8, 7, 7, 7, 7, 9]);
  });

  it('merges.txt with odd whitespace (tabs, double or trailing spaces, CRLF) ranks as the clean file does', () => {
    const chars = ['a', 'b', 'c', 'a</w>', 'b</w>', 'c</w>'];
    const vocab: Record<string, number> = {};
    [...chars, 'ab', 'abc</w>', 'bc</w>', '<|startoftext|>', '<|endoftext|>'].forEach((t, i) => (vocab[t] = i));
    const clean = ClipTokenizer.fromData(vocab, '#version: 0.2\na b\nab c</w>\nb c</w>\n');
    for (const merges of ['#version: 0.2\na\tb\nab  c</w>\nb c</w> \n', '#version: 0.2\r\na b\r\nab c</w>\r\n b c</w>\r\n']) {
      const odd = ClipTokenizer.fromData(vocab, merges);
      for (const text of ['abc', 'bc', 'cab abc', 'ab']) expect(odd.tokenize(text), JSON.stringify(merges)).toEqual(clean.tokenize(text));
    }
  });

  it('long words merge through the heap exactly as the pair rescan does (reference cases, random and pathological words)', () => {
    const vocab = JSON.parse(readFileSync(path.join(tokDir, 'vocab.json'), 'utf8')) as Record<string, number>;
    const merges = readFileSync(path.join(tokDir, 'merges.txt'), 'utf8');
    const heap = ClipTokenizer.fromData(vocab, merges, { heapBpeFrom: 2 });
    const scan = ClipTokenizer.fromData(vocab, merges, { heapBpeFrom: Infinity });
    for (const c of [...ref.cases, ...parity.flatMap((p) => p.ref.cases)]) expect(heap.tokenize(c.text), c.text).toEqual(c.ids);
    let seed = 7;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const pick = (chars: string[], n: number) => Array.from({ length: n }, () => chars[Math.floor(rnd() * chars.length)]!).join('');
    const alphabets = ['ab', 'abc', 'aeiounst', 'abcdefghijklmnopqrstuvwxyz', 'éàüøß', '一二三四五', '🙂🚀✨'].map((a) => Array.from(a));
    const words: string[] = [];
    for (const chars of alphabets) for (let i = 0; i < 40; i++) words.push(pick(chars, 1 + Math.floor(rnd() * 120)));
    for (let n = 1; n <= 70; n++) words.push('a'.repeat(n));
    words.push('ab'.repeat(40), 'ing'.repeat(30), 'supercalifragilisticexpialidocious'.repeat(3));
    for (const w of words) expect(heap.tokenize(w), w).toEqual(scan.tokenize(w));
  });

  it("the heap follows the pair rescan even where a merged token's pair ranks before the merge that made it", () => {
    // "xy x" ranks before "x y": the loop merges every "x y" of the word first, then looks again.
    const tiny: Record<string, number> = {};
    for (const t of ['x', 'y', 'q</w>', 'xy', 'xyx', '<|startoftext|>', '<|endoftext|>']) tiny[t] = Object.keys(tiny).length;
    const tinyMerges = '#version: 0.2\nxy x\nx y\n';
    for (const from of [2, Infinity]) {
      expect(ClipTokenizer.fromData(tiny, tinyMerges, { heapBpeFrom: from }).tokenize('xyxyq'), String(from)).toEqual([tiny.xy, tiny.xy, tiny['q</w>']]);
    }
    // A hand-made merges file in random order: BPE training never writes one, but the loop's order must still win.
    let seed = 11;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const tokens = ['a', 'b', 'c'];
    const merges: string[] = [];
    while (merges.length < 60) {
      const l = tokens[Math.floor(rnd() * tokens.length)]!;
      const r = tokens[Math.floor(rnd() * tokens.length)]!;
      const pair = `${l} ${r}`;
      if (merges.includes(pair)) continue;
      merges.push(pair);
      if (!tokens.includes(l + r)) tokens.push(l + r);
    }
    for (let i = merges.length - 1; i > 0; i--) {
      const j = Math.floor(rnd() * (i + 1));
      [merges[i], merges[j]] = [merges[j]!, merges[i]!];
    }
    // Word ends come from the same merges with </w> on the right.
    const ends = merges.filter(() => rnd() < 0.5).map((m) => `${m}</w>`);
    const text = `#version: 0.2\n${[...merges, ...ends].join('\n')}\n`;
    const vocab: Record<string, number> = {};
    for (const t of [...tokens, ...tokens.map((t) => `${t}</w>`), '<|startoftext|>', '<|endoftext|>']) vocab[t] ??= Object.keys(vocab).length;
    const heap = ClipTokenizer.fromData(vocab, text, { heapBpeFrom: 2 });
    const scan = ClipTokenizer.fromData(vocab, text, { heapBpeFrom: Infinity });
    for (let i = 0; i < 300; i++) {
      const w = Array.from({ length: 1 + Math.floor(rnd() * 60) }, () => 'abc'[Math.floor(rnd() * 3)]!).join('');
      expect(heap.tokenize(w), w).toEqual(scan.tokenize(w));
    }
  });

  it('a 10,000-character word tokenizes without rescanning every pair per merge (printed, not asserted)', () => {
    const word = Array.from({ length: 10_000 }, (_, i) => 'abcdefghijklmnopqrstuvwxyz'[(i * 7919) % 26]).join('');
    const t0 = performance.now();
    const ids = tok.encode(word);
    console.log(`tokenizer: a 10,000-character word in ${(performance.now() - t0).toFixed(1)} ms`);
    expect(ids.length).toBe(77);
  });

  it('keeps no long word: 300 distinct 10,000-character words leave the heap as it was', () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const heap = () => (gc(), process.memoryUsage().heapUsed);
    const t = ClipTokenizer.fromData(JSON.parse(readFileSync(path.join(tokDir, 'vocab.json'), 'utf8')) as Record<string, number>, readFileSync(path.join(tokDir, 'merges.txt'), 'utf8'));
    // Letters from a linear congruential generator seeded with n: one word, distinct for each n.
    const word = (n: number) => {
      let x = n;
      return Array.from({ length: 10_000 }, () => 'abcdefghijklmnopqrstuvwxyz'[(x = (Math.imul(x, 1103515245) + 12345) >>> 0) % 26]).join('');
    };
    const first = t.encode(word(0));
    const before = heap();
    for (let n = 1; n <= 300; n++) t.encode(word(n));
    const grown = heap() - before;
    // Kept, they held 51 KB each: 15 MB here.
    expect(grown, `${(grown / 1048576).toFixed(1)} MB kept`).toBeLessThan(2 * 1048576);
    expect(t.encode(word(0))).toEqual(first);
    expect(t.encode('a photo of a cat')).toEqual(tok.encode('a photo of a cat'));
  });

  it('long texts of nested HTML escapes unescape to the end (one ftfy pass per level); pieces cleaned once for the tokenizers of one text', () => {
    // '&amp;amp;…amp;x7': each pass of ftfy's loop unescapes one level, so the text ends as '&x7'.
    const nested = (i: number) => `&${'amp;'.repeat(600)}x${i}`;
    for (let i = 0; i < 4; i++) expect(tok.tokenize(nested(i))).toEqual(tok.tokenize(`&x${i}`));
    // The pieces between added tokens, as cleaned by the first tokenizer of a text, are what the next one reads.
    const cleaned = new Map<string, string>();
    const ids = tok.encode(`${nested(7)}<|endoftext|>${nested(8)}`, cleaned);
    expect([...cleaned]).toEqual([[nested(7), '&x7'], [nested(8), '&x8']]);
    expect(tok.encode(`${nested(7)}<|endoftext|>${nested(8)}`)).toEqual(ids);
    cleaned.set(nested(7), 'a dog');
    expect(tok.tokenize(nested(7), cleaned)).toEqual(tok.tokenize('a dog'));
  });

  it('special tokens in text map to their ids', () => {
    expect(tok.tokenize('a<|endoftext|>dog')).toEqual([320, 49407, 1929]);
  });

  it('tokenizes a 77-token prompt fast once warm (printed, not asserted)', () => {
    // Whole reference prompts until there are at least 75 content tokens: a full-length prompt.
    let text = '';
    for (const c of ref.cases) {
      if (tok.tokenize(text).length >= 75) break;
      text = `${text} ${c.text}`.trim();
    }
    tok.encode(text);
    const n = 2000;
    const t0 = performance.now();
    for (let i = 0; i < n; i++) tok.encode(text);
    console.log(`tokenizer: encode (${tok.tokenize(text).length} content tokens before truncation to 77) ${(((performance.now() - t0) / n) * 1000).toFixed(1)} µs warm`);
  });
});

describe('a tokenizer saved by transformers 5 (tokenizer.json, no vocab.json / merges.txt)', () => {
  // The layout transformers 5's CLIPTokenizer.save_pretrained writes (checked with transformers 5.18, tokenizers 0.23):
  // tokenizer.json with the BPE model (merges as pairs; tokenizers before 0.20 wrote "a b" strings) beside
  // tokenizer_config.json, and nothing else.
  const fastFiles = (pairs: boolean) => {
    const vocab = JSON.parse(readFileSync(path.join(tokDir, 'vocab.json'), 'utf8')) as Record<string, number>;
    const lines = readFileSync(path.join(tokDir, 'merges.txt'), 'utf8').trim().split('\n').slice(1);
    const special = (content: string, id: number) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: true, special: true });
    return {
      'tokenizer.json': JSON.stringify({
        version: '1.0',
        added_tokens: [special('<|startoftext|>', 49406), special('<|endoftext|>', 49407)],
        model: { type: 'BPE', dropout: null, unk_token: '<|endoftext|>', continuing_subword_prefix: '', end_of_word_suffix: '</w>', fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges: pairs ? lines.map((l) => l.split(' ')) : lines },
      }),
      'tokenizer_config.json': JSON.stringify({ backend: 'tokenizers', bos_token: '<|startoftext|>', eos_token: '<|endoftext|>', model_max_length: 77, pad_token: '<|endoftext|>', tokenizer_class: 'CLIPTokenizer', unk_token: '<|endoftext|>' }),
    };
  };

  it('loads from tokenizer.json and gives the reference ids, merges as pairs or as strings', async () => {
    for (const pairs of [true, false]) {
      const dir = await mkdtemp(path.join(tmpdir(), 'clip-fast-'));
      try {
        for (const [name, text] of Object.entries(fastFiles(pairs))) await writeFile(path.join(dir, name), text);
        const fast = await ClipTokenizer.load(dir);
        for (const c of [...ref.cases, ...parity[1]!.ref.cases]) expect(fast.tokenize(c.text), c.text).toEqual(c.ids);
        expect(fast.encode('a dog')).toEqual(tok.encode('a dog'));
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }
  });

  it('a model folder whose tokenizers are tokenizer.json alone is an export the layout reader accepts', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'clip-fast-model-'));
    try {
      for (const c of ['text_encoder', 'unet', 'vae_decoder', 'scheduler', 'tokenizer']) await mkdir(path.join(dir, c));
      for (const c of ['text_encoder', 'unet', 'vae_decoder']) await writeFile(path.join(dir, c, 'model.onnx'), '');
      await writeFile(path.join(dir, 'scheduler', 'scheduler_config.json'), JSON.stringify({ _class_name: 'PNDMScheduler' }));
      for (const [name, text] of Object.entries(fastFiles(true))) await writeFile(path.join(dir, 'tokenizer', name), text);
      expect(readLayout(dir).tokenizerDirs).toEqual([path.join(dir, 'tokenizer')]);
      await writeFile(path.join(dir, 'tokenizer', 'tokenizer.json'), JSON.stringify({ model: { type: 'Unigram', vocab: [] } }));
      await expect(ClipTokenizer.load(path.join(dir, 'tokenizer'))).rejects.toThrow('tokenizer: tokenizer/tokenizer.json holds no BPE model with merges');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
