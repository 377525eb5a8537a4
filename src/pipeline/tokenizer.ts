/**
 * @module CLIP byte-level BPE as OpenAI CLIP's `simple_tokenizer` runs it (and HF's slow `CLIPTokenizer` with ftfy):
 * ftfy's fix_text, its mojibake fix included (text-fix.ts), HTML unescaped twice, whitespace collapsed, lower case,
 * the CLIP split regex, GPT-2's byte→unicode map, `</w>` word ends, and merges applied by rank. docs/PARITY.md says
 * where other tokenizers differ.
 */

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { RuntimeError } from '../errors.js';
import { exists } from '../files.js';
import { readError } from './failures.js';
import { TOKENIZER_JSON } from './model.js';
import { parsePyJson } from './pyjson.js';
import { fixText, htmlUnescape } from './text-fix.js';

const BOS = '<|startoftext|>';
const EOS = '<|endoftext|>';
const DEFAULT_MAX_LENGTH = 77;
/** Words up to this many UTF-16 units are cached (#word): dictionary words are far shorter. */
const MAX_CACHED_WORD = 64;
/** HF and OpenAI read merges.txt lines [1, 49152 - 256 - 2 + 1): the rest of the file is never used. */
export const MERGE_LINES_END = 49152 - 256 - 2 + 1;

/** GPT-2's reversible byte → printable character table. */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const table: string[] = new Array<string>(256);
  for (const b of bs) table[b] = String.fromCodePoint(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (table[b] === undefined) table[b] = String.fromCodePoint(256 + n++);
  }
  return table;
}
export const BYTE_ENCODER = bytesToUnicode();

/**
 * The whitespace of the reference's `regex` module (`\s` in whitespace_clean and in SPLIT's last class). JS's `\s`
 * differs: it has U+FEFF and lacks U+0085.
 */
const WS = '\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const WS_RUN = new RegExp(`[${WS}]+`, 'gu');
/** Python's `str.strip()` also strips U+001C..U+001F (`str.isspace`), which `\s` does not match. */
const STRIP_CHAR = new RegExp(`^[${WS}\\x1c-\\x1f]$`, 'u');

/**
 * Python's `str.strip()`, by a scan from each end. As a regex (`[…]+$`) it is quadratic: every position of a long
 * whitespace run not at the end starts a match that fails at the run's end (a 10,000-character prompt held the main
 * thread for ~0.3 s per tokenizer).
 */
function pyStrip(s: string): string {
  let a = 0;
  let b = s.length;
  // Every character of the class is in the BMP: one UTF-16 unit each.
  while (a < b && STRIP_CHAR.test(s[a]!)) a++;
  while (b > a && STRIP_CHAR.test(s[b - 1]!)) b--;
  return a === 0 && b === s.length ? s : s.slice(a, b);
}
const PRINTABLE_ASCII = /^[\x20-\x7e]*$/;
/**
 * CLIP's split pattern. The reference compiles it with IGNORECASE, which on lower-cased text changes one thing: U+0345
 * (a combining mark that case-folds to a letter) matches neither the letter class nor the "other" class, so it is
 * dropped. JS's `i` flag would count it a letter instead; without `i` it is left out by hand.
 */
const SPLIT = new RegExp(`<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^${WS}\\p{L}\\p{N}\\u0345]+`, 'gu');
/**
 * CLIP's `whitespace_clean(basic_clean(text)).lower()`: ftfy's fix_text (docs/PARITY.md), HTML unescaped twice,
 * whitespace runs to one space, stripped, lower case.
 */
export function basicClean(text: string): string {
  // Printable ASCII without '&' (most prompts) has nothing to repair, normalise or unescape (nor mojibake: ftfy's is
  // never ASCII).
  if (PRINTABLE_ASCII.test(text) && !text.includes('&')) return text.trim().split(/ +/).filter((w) => w.length > 0).join(' ').toLowerCase();
  const fixed = pyStrip(htmlUnescape(htmlUnescape(fixText(text))));
  return pyStrip(fixed.replace(WS_RUN, ' ')).toLowerCase();
}

/**
 * Pieces of text and what basicClean made of them, for the tokenizers that encode one text (Engine.encodeText): ftfy's
 * repair runs until a pass changes nothing, one pass per level of a nested `&amp;amp;…` (~20 ms for 10,000
 * characters), and SDXL's two tokenizers clean the same pieces.
 */
export type Cleaned = Map<string, string>;

export interface ClipTokenizerOptions {
  /** The padding token (text); defaults to the end-of-text token. SD 2.x ships "!" (id 0). */
  padToken?: string;
  /** Sequence length of `encode` (bos + content + eos + padding); 77 for every CLIP text encoder. */
  maxLength?: number;
  bosToken?: string;
  eosToken?: string;
  /**
   * Tokens split out of the raw text before cleaning and BPE, each with its id: the special tokens of the tokenizer's
   * config files and its added tokens, as transformers' tokenizer does (its trie, leftmost-longest). The bos and eos
   * tokens are always among them.
   */
  addedTokens?: ReadonlyMap<string, number>;
  /**
   * Words of at least this many bytes merge by symbol ids through a heap (O(n log n)) instead of rescanning every
   * pair of strings per merge (O(n²)); both give the same tokens. Only tests change it. Default 32.
   */
  heapBpeFrom?: number;
}

/** What the tokenizer needs of its vocabulary: a read-only lookup. */
interface Lookup {
  get(token: string): number | undefined;
}

const listed = (v: unknown, text: (x: unknown) => string | undefined): (string | undefined)[] => (Array.isArray(v) ? v.map(text) : []);

/**
 * The tokens transformers' tokenizer splits out of a prompt before BPE, with their ids: every special token of the
 * config files (transformers adds each to its added tokens; SD 2.x's and SDXL's second tokenizer pad with "!", so a
 * "!" in a prompt becomes id 0 there, not BPE's "!</w>"), the entries of tokenizer_config.json's
 * `added_tokens_decoder` and of added_tokens.json (ids as listed), and tokenizer.json's `added_tokens`.
 */
function addedTokens(
  vocab: unknown,
  src: { special: (string | undefined)[]; decoder: unknown; file: Record<string, unknown>; fast: unknown; shown: (name: string) => string },
): Map<string, number> {
  const out = new Map<string, number>();
  const bad = (file: string, what: string) => new RuntimeError('MODEL_FORMAT', `tokenizer: ${src.shown(file)} ${what}`);
  if (src.decoder !== undefined && src.decoder !== null) {
    if (typeof src.decoder !== 'object' || Array.isArray(src.decoder)) throw bad('tokenizer_config.json', 'added_tokens_decoder is not an object of id → token');
    for (const [id, t] of Object.entries(src.decoder as Record<string, unknown>)) {
      const content = typeof t === 'object' && t !== null ? (t as { content?: unknown }).content : undefined;
      if (!/^\d+$/.test(id) || typeof content !== 'string') throw bad('tokenizer_config.json', `added_tokens_decoder entry ${JSON.stringify(id)} is not an id with a "content" string`);
      out.set(content, Number(id));
    }
  }
  for (const [content, id] of Object.entries(src.file)) {
    if (!Number.isInteger(id)) throw bad('added_tokens.json', `gives ${JSON.stringify(content)} an id that is not an integer`);
    out.set(content, id as number);
  }
  if (Array.isArray(src.fast)) {
    for (const t of src.fast as { id?: unknown; content?: unknown }[]) {
      if (typeof t?.content === 'string' && Number.isInteger(t.id)) out.set(t.content, t.id as number);
    }
  }
  const table = typeof vocab === 'object' && vocab !== null ? (vocab as Record<string, unknown>) : {};
  for (const t of src.special) {
    // A special token the vocabulary lacks fails the load where it matters (bos, eos, pad); others are left out.
    if (t !== undefined && !out.has(t) && Object.hasOwn(table, t) && Number.isInteger(table[t])) out.set(t, table[t] as number);
  }
  return out;
}

export class ClipTokenizer {
  readonly bosId: number;
  readonly eosId: number;
  readonly padId: number;
  readonly maxLength: number;
  readonly #vocab: Lookup;
  readonly #ranks: Map<string, number>;
  readonly #cache = new Map<string, number[]>();
  readonly #heapFrom: number;
  #idMerges: IdMerges | undefined;
  readonly #unkId: number;
  /** Matches the added tokens, bos and eos among them (longest first, so the leftmost-longest one wins). */
  readonly #addedPattern: RegExp;
  readonly #addedIds: ReadonlyMap<string, number>;

  private constructor(vocab: Lookup, ranks: Map<string, number>, opts: ClipTokenizerOptions) {
    this.#vocab = vocab;
    this.#ranks = ranks;
    const id = (tok: string, what: string) => {
      const v = vocab.get(tok);
      if (v === undefined) throw new RuntimeError('MODEL_FORMAT', `tokenizer: ${what} ${JSON.stringify(tok)} is not in vocab.json`);
      return v;
    };
    this.bosId = id(opts.bosToken ?? BOS, 'bos_token');
    this.eosId = id(opts.eosToken ?? EOS, 'eos_token');
    this.padId = id(opts.padToken ?? opts.eosToken ?? EOS, 'pad_token');
    this.#unkId = this.eosId;
    const max = opts.maxLength ?? DEFAULT_MAX_LENGTH;
    if (!Number.isInteger(max) || max < 2) throw new RuntimeError('MODEL_FORMAT', `tokenizer: model_max_length must be an integer >= 2, got ${max}`);
    this.maxLength = max;
    this.#heapFrom = opts.heapBpeFrom ?? 32;
    const added = new Map([...(opts.addedTokens ?? new Map<string, number>())].filter(([t]) => t.length > 0));
    // bos and eos are split out first too, as transformers does with every special token: left to the CLIP pattern,
    // punctuation before them takes their '<|' ("hi!<|endoftext|>" gave BPE pieces, not eos).
    for (const [t, i] of [[opts.bosToken ?? BOS, this.bosId], [opts.eosToken ?? EOS, this.eosId]] as const) if (!added.has(t)) added.set(t, i);
    this.#addedIds = added;
    this.#addedPattern = new RegExp([...added.keys()].sort((a, b) => b.length - a.length).map((t) => t.replace(/[\\^$.*+?()[\]{}|]/g, '\\$&')).join('|'), 'gu');
  }

  /** From a folder with vocab.json, merges.txt and, when present, tokenizer_config.json / special_tokens_map.json. */
  static async load(dir: string): Promise<ClipTokenizer> {
    const read = (name: string) => readFile(path.join(dir, name), 'utf8');
    // Boot reasons reach clients: files are named inside the model folder, never by their absolute path.
    const shown = (name: string) => `${path.basename(dir)}/${name}`;
    const optional = async (name: string): Promise<Record<string, unknown>> => {
      try {
        return parsePyJson(await read(name)) as Record<string, unknown>;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
        throw readError(`tokenizer: ${shown(name)}`, err) ?? new RuntimeError('MODEL_FORMAT', `tokenizer: cannot parse ${shown(name)}`, { cause: err });
      }
    };
    const cannotRead = (name: string, err: unknown) =>
      readError(`tokenizer: ${shown(name)}`, err, { missingIsFormat: true }) ?? new RuntimeError('MODEL_FORMAT', `tokenizer: cannot read ${shown(name)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { cause: err });
    let vocab: unknown;
    let merges: string | string[];
    let fastAdded: unknown;
    // transformers 5 saves a CLIP tokenizer as tokenizer.json alone: its BPE model holds the vocabulary and the merges.
    // Asked without blocking: the boot parses tokenizers on the event loop, from a cache volume that may stop answering.
    const has = (name: string) => exists(path.join(dir, name));
    const fast = !((await has('vocab.json')) && (await has('merges.txt'))) && (await has(TOKENIZER_JSON));
    if (fast) {
      let model: { type?: unknown; vocab?: unknown; merges?: unknown } | undefined;
      let parsed: unknown;
      try {
        parsed = parsePyJson(await read(TOKENIZER_JSON));
        model = (parsed as { model?: typeof model }).model;
      } catch (err) {
        throw cannotRead(TOKENIZER_JSON, err);
      }
      const pairs = Array.isArray(model?.merges) ? model.merges.map((m: unknown) => (Array.isArray(m) ? m.join(' ') : m)) : undefined;
      if (model?.type !== 'BPE' || pairs === undefined || !pairs.every((m) => typeof m === 'string')) {
        throw new RuntimeError('MODEL_FORMAT', `tokenizer: ${shown(TOKENIZER_JSON)} holds no BPE model with merges (a CLIP tokenizer has one)`);
      }
      vocab = model.vocab;
      merges = pairs as string[];
      fastAdded = (parsed as { added_tokens?: unknown }).added_tokens;
    } else {
      // Both read at once (this is on the boot's path), each failure named by its file.
      [vocab, merges] = await Promise.all([
        read('vocab.json').then((s) => parsePyJson(s)).catch((err: unknown) => {
          throw cannotRead('vocab.json', err);
        }),
        read('merges.txt').catch((err: unknown) => {
          throw cannotRead('merges.txt', err);
        }),
      ]);
    }
    // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    const tokenizerConfig = await optional('tokenizer_config.json');
    const config = { ...tokenizerConfig, ...(await optional('special_tokens_map.json')) };
    // A token is written as its text, or as an AddedToken object ({"content": …, "lstrip": …}).
    const text = (v: unknown): string | undefined => {
      if (typeof v === 'string') return v;
      if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
      return undefined;
    };
    const token = (k: string): string | undefined => text(config[k]);
    const m = config.model_max_length;
    // transformers writes a huge sentinel (1e30) when no length is known.
    const maxLength = typeof m === 'number' && Number.isInteger(m) && m >= 2 && m <= 1_000_000 ? m : undefined;
    const opts: ClipTokenizerOptions = {};
    const pad = token('pad_token');
    const bos = token('bos_token');
    const eos = token('eos_token');
    if (pad !== undefined) opts.padToken = pad;
    if (bos !== undefined) opts.bosToken = bos;
    if (eos !== undefined) opts.eosToken = eos;
    if (maxLength !== undefined) opts.maxLength = maxLength;
    opts.addedTokens = addedTokens(vocab, {
      special: [...['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'].map(token), ...listed(config.additional_special_tokens, text)],
      decoder: tokenizerConfig.added_tokens_decoder,
      file: await optional('added_tokens.json'),
      fast: fastAdded,
      shown,
    });
    return typeof merges === 'string' ? ClipTokenizer.fromData(vocab as Record<string, number>, merges, opts) : ClipTokenizer.fromPairs(vocab as Record<string, number>, merges, opts);
  }

  static fromData(vocab: Record<string, number>, mergesText: string, opts: ClipTokenizerOptions = {}): ClipTokenizer {
    const lines = mergesText.trim().split('\n').slice(1, MERGE_LINES_END);
    // One scan of the whole file: without whitespace other than single spaces between tokens and newlines, every
    // line is its own normal form, and the per-line normalisation (a third of the parse) is skipped.
    const odd = /[^\S \n]| {2}|^ | $/m.test(mergesText);
    return ClipTokenizer.fromPairs(vocab, odd ? lines.map((line) => (/^\S+ \S+$/.test(line) ? line : line.trim().split(/\s+/).join(' '))) : lines, opts);
  }

  /** From the merges as "first second" pairs in rank order (merges.txt without its header, or tokenizer.json's). */
  static fromPairs(vocab: Record<string, number>, pairs: readonly string[], opts: ClipTokenizerOptions = {}): ClipTokenizer {
    if (typeof vocab !== 'object' || vocab === null || Array.isArray(vocab)) throw new RuntimeError('MODEL_FORMAT', 'tokenizer: the vocabulary is not an object');
    // The parsed object is the lookup table (copying 49k entries into a Map costs ~90 ms of cold start);
    // ids are checked when looked up.
    const v: Lookup = {
      get: (k) => {
        if (!Object.hasOwn(vocab, k)) return undefined;
        const id = vocab[k];
        if (!Number.isInteger(id)) throw new RuntimeError('MODEL_FORMAT', `tokenizer: vocab id of ${JSON.stringify(k)} is not an integer`);
        return id;
      },
    };
    const ranks = new Map<string, number>();
    // dict(zip(merges, range(n))) in Python: a repeated pair keeps its last rank.
    for (let i = 0; i < pairs.length; i++) if (pairs[i]!.length > 0) ranks.set(pairs[i]!, i);
    return new ClipTokenizer(v, ranks, opts);
  }

  /** Content token ids, without bos/eos, untruncated. `cleaned`: pieces cleaned already, read and added to. */
  tokenize(text: string, cleaned?: Cleaned): number[] {
    // transformers splits the added tokens out of the raw text first; each piece between them is cleaned on its own.
    const ids: number[] = [];
    let at = 0;
    for (const m of text.matchAll(this.#addedPattern)) {
      if (m.index > at) ids.push(...this.#tokenizeClean(text.slice(at, m.index), cleaned));
      ids.push(this.#addedIds.get(m[0])!);
      at = m.index + m[0].length;
    }
    if (at < text.length) ids.push(...this.#tokenizeClean(text.slice(at), cleaned));
    return ids;
  }

  #tokenizeClean(text: string, cleaned: Cleaned | undefined): number[] {
    let clean = cleaned?.get(text);
    if (clean === undefined) {
      clean = basicClean(text);
      cleaned?.set(text, clean);
    }
    const ids: number[] = [];
    for (const m of clean.matchAll(SPLIT)) {
      const word = m[0];
      if (word === BOS) ids.push(this.bosId);
      else if (word === EOS) ids.push(this.eosId);
      else for (const id of this.#word(word)) ids.push(id);
    }
    return ids;
  }

  /** What the text encoder takes: bos, content cut to maxLength − 2, eos, then padding to maxLength. */
  encode(text: string, cleaned?: Cleaned): number[] {
    const content = this.tokenize(text, cleaned).slice(0, this.maxLength - 2);
    const out = [this.bosId, ...content, this.eosId];
    while (out.length < this.maxLength) out.push(this.padId);
    return out;
  }

  #word(word: string): number[] {
    const hit = this.#cache.get(word);
    if (hit) return hit;
    const bytes = Buffer.from(word, 'utf8');
    let ids: number[];
    if (bytes.length >= this.#heapFrom && bytes.length > 1) {
      ids = this.#bpeIds(bytes);
    } else {
      let encoded = '';
      for (const b of bytes) encoded += BYTE_ENCODER[b];
      ids = this.#bpe(encoded).map((tok) => this.#vocab.get(tok) ?? this.#unkId);
    }
    // Prompts repeat words; the cache is bounded so hostile input cannot grow it without end. Long words are not kept:
    // a 10,000-character one held 51 KB, and 50,000 of them (3,000 requests of 8 prompts and negative prompts) 2.5 GB.
    if (word.length > MAX_CACHED_WORD) return ids;
    if (this.#cache.size >= 50_000) this.#cache.clear();
    this.#cache.set(word, ids);
    return ids;
  }

  /** Merge the lowest-ranked adjacent pair until none is in the merge table (OpenAI's `bpe`). */
  #bpe(token: string): string[] {
    const chars = Array.from(token);
    let parts = chars.slice(0, -1);
    parts.push(`${chars[chars.length - 1]!}</w>`);
    if (parts.length === 1) return parts;
    for (;;) {
      let best = Infinity;
      let first = '';
      let second = '';
      for (let i = 0; i < parts.length - 1; i++) {
        const r = this.#ranks.get(`${parts[i]!} ${parts[i + 1]!}`);
        if (r !== undefined && r < best) {
          best = r;
          first = parts[i]!;
          second = parts[i + 1]!;
        }
      }
      if (best === Infinity) return parts;
      const next: string[] = [];
      for (let i = 0; i < parts.length; ) {
        if (i < parts.length - 1 && parts[i] === first && parts[i + 1] === second) {
          next.push(first + second);
          i += 2;
        } else {
          next.push(parts[i]!);
          i += 1;
        }
      }
      parts = next;
      if (parts.length === 1) return parts;
    }
  }

  /**
   * The same merges as #bpe, for long words (a prompt may be one 10,000-character word: rescanning it per merge took
   * ~0.8 s), on symbol ids rather than strings (pair keys built as strings took 8–50 ms for such a word). The symbols
   * form a linked list and every adjacent pair sits in a heap ordered by (rank, position). As in OpenAI's loop, each
   * step takes the lowest-ranked pair and merges all of its current occurrences left to right (an occurrence
   * overlapping one just merged is skipped); the pairs those merges create join the heap after the step. An entry is
   * current while its position's pair still has its rank: a rank names one pair of symbols.
   */
  #bpeIds(bytes: Uint8Array): number[] {
    const m = (this.#idMerges ??= idMerges(this.#ranks, this.#vocab, this.#unkId));
    const n = bytes.length;
    const sym = new Int32Array(n);
    for (let i = 0; i < n - 1; i++) sym[i] = m.byteSym[bytes[i]!]!;
    sym[n - 1] = m.endSym[bytes[n - 1]!]!;
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    // The rank of the pair that starts at each symbol, -1 for none, a merged-away symbol or one merged this step.
    const pairRank = new Int32Array(n).fill(-1);
    // Keys rank * n + position: at most n - 1 at the start and two per merge.
    const heap = new Float64Array(3 * n);
    let size = 0;
    const push = (key: number) => {
      let i = size++;
      while (i > 0) {
        const p = (i - 1) >> 1;
        if (heap[p]! <= key) break;
        heap[i] = heap[p]!;
        i = p;
      }
      heap[i] = key;
    };
    const pop = (): number => {
      const top = heap[0]!;
      const last = heap[--size]!;
      let i = 0;
      for (;;) {
        let c = 2 * i + 1;
        if (c >= size) break;
        if (c + 1 < size && heap[c + 1]! < heap[c]!) c++;
        if (heap[c]! >= last) break;
        heap[i] = heap[c]!;
        i = c;
      }
      heap[i] = last;
      return top;
    };
    const pairAt = (a: number) => {
      if (a < 0) return;
      const b = next[a]!;
      const r = b < 0 ? -1 : m.rank(sym[a]!, sym[b]!);
      pairRank[a] = r;
      if (r >= 0) push(r * n + a);
    };
    for (let i = 0; i < n - 1; i++) pairAt(i);
    const merged = new Int32Array(n);
    let count = n;
    while (size > 0 && count > 1) {
      const rank = Math.floor(heap[0]! / n);
      const end = (rank + 1) * n;
      let k = 0;
      while (size > 0 && heap[0]! < end) {
        const a = pop() - rank * n;
        if (pairRank[a] !== rank) continue;
        const b = next[a]!;
        sym[a] = m.merged(rank, sym[a]!, sym[b]!);
        pairRank[a] = -1;
        pairRank[b] = -1;
        next[a] = next[b]!;
        if (next[b]! >= 0) prev[next[b]!] = a;
        count--;
        merged[k++] = a;
      }
      // A symbol merged this step stays: only one to its left could take it, and those came first.
      for (let j = 0; j < k; j++) {
        pairAt(prev[merged[j]!]!);
        pairAt(merged[j]!);
      }
    }
    const out: number[] = [];
    for (let i = 0; i >= 0; i = next[i]!) out.push(m.vocabId(sym[i]!));
    return out;
  }
}

/** The merges by symbol ids, for #bpeIds. */
interface IdMerges {
  /** Symbol ids of each byte's character, and of that character ending a word (`</w>`). */
  byteSym: Int32Array;
  endSym: Int32Array;
  /** The rank of the pair (left, right), -1 when it is not a merge. */
  rank(left: number, right: number): number;
  /** The symbol a merge of this rank makes of its pair (left, right). */
  merged(rank: number, left: number, right: number): number;
  /** The vocabulary id of a symbol, the unknown token's when it has none. */
  vocabId(sym: number): number;
}

/** Slots of the pair cache; it is emptied when half full (1.5 MB a tokenizer). */
const PAIR_BITS = 17;
const PAIR_SLOTS = 1 << PAIR_BITS;

/**
 * Symbols are numbered without a table: 0–255 a byte's character, 256–511 that character ending a word, 512 + r what
 * the merge of rank r makes (a rank names one pair of strings, so one result; two ranks that make the same string give
 * two ids, and pairs are ranked by their strings all the same). A pair's rank is read from the merges by its string
 * once, then from an open-addressing cache of (left, right) → rank or -1, bounded however many distinct pairs hostile
 * words bring. Nothing is built from all 49k merges, so neither boot nor the first long word pays for a table.
 */
function idMerges(ranks: ReadonlyMap<string, number>, vocab: Lookup, unk: number): IdMerges {
  const text: string[] = [];
  const byteSym = new Int32Array(256);
  const endSym = new Int32Array(256);
  for (let b = 0; b < 256; b++) {
    byteSym[b] = b;
    endSym[b] = 256 + b;
    text[b] = BYTE_ENCODER[b]!;
    text[256 + b] = `${BYTE_ENCODER[b]!}</w>`;
  }
  const mask = PAIR_SLOTS - 1;
  const keyL = new Int32Array(PAIR_SLOTS).fill(-1);
  const keyR = new Int32Array(PAIR_SLOTS);
  const val = new Int32Array(PAIR_SLOTS);
  let used = 0;
  const vocabIds: number[] = [];
  return {
    byteSym,
    endSym,
    rank(l, r) {
      let i = Math.imul(Math.imul(l, 0x85ebca6b) ^ r, 0x9e3779b1) >>> (32 - PAIR_BITS);
      for (; keyL[i] !== -1; i = (i + 1) & mask) if (keyL[i] === l && keyR[i] === r) return val[i]!;
      if (used >= PAIR_SLOTS >> 1) {
        keyL.fill(-1);
        used = 0;
        i = Math.imul(Math.imul(l, 0x85ebca6b) ^ r, 0x9e3779b1) >>> (32 - PAIR_BITS);
      }
      const v = ranks.get(`${text[l]!} ${text[r]!}`) ?? -1;
      keyL[i] = l;
      keyR[i] = r;
      val[i] = v;
      used++;
      return v;
    },
    merged(rank, l, r) {
      const s = 512 + rank;
      text[s] ??= text[l]! + text[r]!;
      return s;
    },
    vocabId(sym) {
      return (vocabIds[sym] ??= vocab.get(text[sym]!) ?? unk);
    },
  };
}
