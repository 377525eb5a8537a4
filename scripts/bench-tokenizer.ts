/**
 * @module CLIP BPE of long words, before and after it merged by symbol ids (`npm run bench:tokenizer`, i.e. `node
 * dist/scripts/bench-tokenizer.js`): the tokenizer as it is against the string-keyed heap it replaced (kept here
 * alone, as the baseline), in one process on the demo's real CLIP vocabulary, for one word of 100, 1,000 and 10,000
 * characters (lower-case ASCII, CJK, emoji) and a 75-token prompt. Medians and 90th percentiles of BENCH_N (default
 * 200) distinct words each, the two interleaved, after 20 unmeasured; every pair of answers is checked equal.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { BYTE_ENCODER, ClipTokenizer, MERGE_LINES_END } from '../src/pipeline/tokenizer.js';

const n = Number(process.env.BENCH_N ?? 200);
const assets = path.resolve(import.meta.dirname, '..', '..', 'src', 'demo', 'assets');
const vocab = JSON.parse(readFileSync(path.join(assets, 'vocab.json'), 'utf8')) as Record<string, number>;
const mergesText = readFileSync(path.join(assets, 'merges.txt'), 'utf8');

/** The long-word path before: pair keys as strings (`${a} ${b}`), symbols merged as strings, a heap of arrays. */
function oldWord(word: string, ranks: Map<string, number>, unk: number): number[] {
  let encoded = '';
  for (const b of Buffer.from(word, 'utf8')) encoded += BYTE_ENCODER[b];
  const chars = Array.from(encoded);
  const parts = chars.slice(0, -1);
  parts.push(`${chars[chars.length - 1]!}</w>`);
  const toks = parts.length === 1 ? parts : oldBpeHeap(parts, ranks);
  return toks.map((t) => (Object.hasOwn(vocab, t) ? vocab[t]! : unk));
}

function oldBpeHeap(parts: string[], ranks: Map<string, number>): string[] {
  const n = parts.length;
  const sym = parts.slice();
  const next = new Int32Array(n);
  const prev = new Int32Array(n);
  const ver = new Int32Array(n);
  const alive = new Uint8Array(n).fill(1);
  for (let i = 0; i < n; i++) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
  }
  type Entry = [number, number, number, number, number];
  const heap: Entry[] = [];
  const less = (a: Entry, b: Entry) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
  const push = (e: Entry) => {
    heap.push(e);
    for (let i = heap.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (!less(heap[i]!, heap[p]!)) break;
      [heap[i], heap[p]] = [heap[p]!, heap[i]!];
      i = p;
    }
  };
  const pop = (): Entry => {
    const top = heap[0]!;
    const last = heap.pop()!;
    if (heap.length > 0) {
      heap[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < heap.length && less(heap[l]!, heap[m]!)) m = l;
        if (r < heap.length && less(heap[r]!, heap[m]!)) m = r;
        if (m === i) break;
        [heap[i], heap[m]] = [heap[m]!, heap[i]!];
        i = m;
      }
    }
    return top;
  };
  const pairAt = (a: number) => {
    const b = a < 0 ? -1 : next[a]!;
    if (b < 0) return;
    const r = ranks.get(`${sym[a]!} ${sym[b]!}`);
    if (r !== undefined) push([r, a, b, ver[a]!, ver[b]!]);
  };
  const current = (e: Entry) => alive[e[1]] === 1 && alive[e[2]] === 1 && next[e[1]] === e[2] && ver[e[1]] === e[3] && ver[e[2]] === e[4];
  for (let i = 0; i < n - 1; i++) pairAt(i);
  let count = n;
  while (heap.length > 0 && count > 1) {
    const rank = heap[0]![0];
    const step: Entry[] = [];
    while (heap.length > 0 && heap[0]![0] === rank) step.push(pop());
    const merged: number[] = [];
    for (const e of step) {
      if (!current(e)) continue;
      const a = e[1];
      const b = e[2];
      sym[a] = sym[a]! + sym[b]!;
      ver[a]!++;
      alive[b] = 0;
      next[a] = next[b]!;
      if (next[b]! >= 0) prev[next[b]!] = a;
      count--;
      merged.push(a);
    }
    for (const a of merged) {
      if (alive[a] !== 1) continue;
      pairAt(prev[a]!);
      pairAt(a);
    }
  }
  const out: string[] = [];
  for (let i = 0; i >= 0; i = next[i]!) out.push(sym[i]!);
  return out;
}

let seed = 7;
const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
const pick = (chars: string[], k: number) => Array.from({ length: k }, () => chars[Math.floor(rnd() * chars.length)]!).join('');
const ASCII = Array.from('abcdefghijklmnopqrstuvwxyz');
const CJK = Array.from({ length: 2000 }, (_, i) => String.fromCodePoint(0x4e00 + i * 7));
const EMOJI = Array.from({ length: 200 }, (_, i) => String.fromCodePoint(0x1f300 + i));

const stats = (us: number[]) => {
  us.sort((x, y) => x - y);
  return { median: us[us.length >> 1]!, p90: us[Math.floor(us.length * 0.9)]! };
};
const fmt = (v: number) => (v >= 1000 ? `${(v / 1000).toFixed(2)} ms` : `${v.toFixed(1)} µs`).padStart(10);

function main(): void {
  const tok = ClipTokenizer.fromData(vocab, mergesText);
  const ranks = new Map<string, number>();
  const pairs = mergesText.trim().split('\n').slice(1, MERGE_LINES_END);
  for (let i = 0; i < pairs.length; i++) ranks.set(pairs[i]!, i);
  const unk = vocab['<|endoftext|>']!;

  // Cold: a fresh tokenizer's first long word (the new path sets up its pair cache then).
  const fresh = ClipTokenizer.fromData(vocab, mergesText);
  const first = pick(ASCII, 1000);
  const t0 = performance.now();
  fresh.tokenize(first);
  process.stdout.write(`fresh tokenizer, first 1,000-character word: ${(performance.now() - t0).toFixed(2)} ms\n\n`);

  process.stdout.write(`${'input'.padEnd(40)} ${'before median'.padStart(14)} ${'p90'.padStart(10)}  ${'after median'.padStart(13)} ${'p90'.padStart(10)}  ${'before/after'.padStart(12)}\n`);
  const line = (label: string, inputs: string[], before: (s: string) => number[], after: (s: string) => number[]) => {
    for (let i = 0; i < 20; i++) {
      const s = inputs[i % inputs.length]!;
      if (JSON.stringify(before(s)) !== JSON.stringify(after(s))) throw new Error(`${label}: the two paths disagree`);
    }
    const ub: number[] = [];
    const ua: number[] = [];
    for (let i = 0; i < inputs.length; i++) {
      const s = inputs[i]!;
      // Interleaved, alternating which goes first, so load from other jobs falls on both.
      for (const which of i % 2 ? [0, 1] : [1, 0]) {
        const a = process.hrtime.bigint();
        const out = which === 0 ? before(s) : after(s);
        (which === 0 ? ub : ua).push(Number(process.hrtime.bigint() - a) / 1000);
        if (out.length === 0) throw new Error('no tokens');
      }
    }
    const b = stats(ub);
    const a = stats(ua);
    process.stdout.write(`${label.padEnd(40)} ${fmt(b.median).padStart(14)} ${fmt(b.p90)}  ${fmt(a.median).padStart(13)} ${fmt(a.p90)}  ${`${(b.median / a.median).toFixed(1)}×`.padStart(12)}\n`);
  };
  const oldOne = (w: string) => oldWord(w, ranks, unk);
  const newOne = (w: string) => tok.tokenize(w);
  for (const [name, chars] of [['ASCII', ASCII], ['CJK', CJK], ['emoji', EMOJI]] as const) {
    for (const len of [100, 1000, 10_000]) {
      if (name !== 'ASCII' && len === 100) continue;
      const count = len === 10_000 ? Math.max(20, n >> 2) : n;
      line(`one ${len.toLocaleString('en')}-character word, ${name}`, Array.from({ length: count }, () => pick(chars, len)), oldOne, newOne);
    }
  }
  // A normal prompt: short words, the same path before and after (the word cache, then #bpe), as a check that it is
  // unchanged. "Before" tokenizes it with a tokenizer that never takes the new path.
  const words = 'a photograph of an astronaut riding a horse on mars highly detailed volumetric lighting cinematic 8k trending on artstation by greg rutkowski and alphonse mucha sharp focus golden hour dramatic sky intricate armor'.split(' ');
  let p75 = '';
  for (let i = 0; tok.tokenize(p75).length < 75; i++) p75 += `${p75 ? ' ' : ''}${words[i % words.length]!}`;
  const noIds = ClipTokenizer.fromData(vocab, mergesText, { heapBpeFrom: Infinity });
  line(`75-token prompt (${p75.length} chars), cached words`, Array.from({ length: n }, () => p75), (s) => noIds.tokenize(s), (s) => tok.tokenize(s));
  const unseen = Array.from({ length: n }, () => {
    let s = '';
    while (s.length < p75.length) s += `${s ? ' ' : ''}${pick(ASCII, 3 + Math.floor(rnd() * 6))}`;
    return s;
  });
  line('75-token-length prompt, unseen words', unseen, (s) => noIds.tokenize(s), (s) => tok.tokenize(s));
}

main();
