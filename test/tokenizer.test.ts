import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { ClipTokenizer } from '../src/pipeline/tokenizer.js';

const casesFile = process.env.CLIP_CASES ?? path.resolve(process.cwd(), '../shared/reference/clip-tokenizer/cases.json');
// vocab.json and merges.txt sit beside the cases unless CLIP_TOKENIZER_DIR says otherwise.
const tokDir = process.env.CLIP_TOKENIZER_DIR ?? path.dirname(casesFile);
const ref = JSON.parse(readFileSync(casesFile, 'utf8')) as { bos: number; eos: number; cases: { text: string; ids: number[] }[] };

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
