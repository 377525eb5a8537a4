/**
 * @module The text repairs of CLIP's basic_clean before BPE: ftfy.fix_text with its default settings, as OpenAI CLIP
 * (and transformers' slow CLIPTokenizer where ftfy is installed) call it, its mojibake repair (fix_encoding) included;
 * and Python's html.unescape. Tables and patterns from ftfy 6.3.1 (ftfy-tables.ts) and Python's html module
 * (html-entities.ts).
 */

import { isUtf8 } from 'node:buffer';
import {
  A_GRAVE_WORD,
  ALTERED_UTF8,
  BADNESS,
  CHARMAPS,
  CONTROL_CHARS,
  LIGATURES,
  LOSSY_UTF8,
  MOJIBAKE_CHAR,
  PATTERN_REACH,
  UPPER_ENTITIES,
  UTF8_DETECTOR,
  WIDTH_MAP,
} from './ftfy-tables.js';
import { HTML5_NAMED, INVALID_CHARREFS, INVALID_CODEPOINTS } from './html-entities.js';

/**
 * fix_c1_controls: U+0080..U+009F read as sloppy-windows-1252 (undefined bytes stay latin-1), which is HTML5's table of
 * those numeric references (make-ftfy-tables.py checks it).
 */
const C1_MAP: ReadonlyMap<number, string> = new Map([...INVALID_CHARREFS].filter(([b]) => b >= 0x80 && b <= 0x9f));

const CHARREF = /&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)/gu;

/** Python's `html.unescape`: HTML5 named references (longest prefix without ';'), numeric ones with HTML5's fix-ups. */
export function htmlUnescape(s: string): string {
  if (!s.includes('&')) return s;
  return s.replace(CHARREF, (whole, ref: string) => {
    if (ref[0] === '#') {
      const hex = ref[1] === 'x' || ref[1] === 'X';
      const digits = ref.slice(hex ? 2 : 1).replace(/;$/, '');
      const n = hex ? parseInt(digits, 16) : parseInt(digits, 10);
      const fixed = INVALID_CHARREFS.get(n);
      if (fixed !== undefined) return fixed;
      if ((n >= 0xd800 && n <= 0xdfff) || n > 0x10ffff) return '\ufffd';
      if (INVALID_CODEPOINTS.has(n)) return '';
      return String.fromCodePoint(n);
    }
    if (Object.hasOwn(HTML5_NAMED, ref)) return HTML5_NAMED[ref]!;
    // A name without its ';' (`&ampx`): the longest known prefix of at least two characters, rest kept.
    const cps = Array.from(ref);
    for (let x = cps.length - 1; x > 1; x--) {
      const name = cps.slice(0, x).join('');
      if (Object.hasOwn(HTML5_NAMED, name)) return HTML5_NAMED[name]! + cps.slice(x).join('');
    }
    return whole;
  });
}

const ENTITY = /&#?[0-9A-Za-z]{1,24};/g;
const C1 = /[\x80-\x9f]/g;
/** fix_c1_controls: each C1 control read as windows-1252 (those it lacks stay). */
const fixC1Controls = (t: string): string => t.replace(C1, (c) => C1_MAP.get(c.charCodeAt(0))!);
const SINGLE_QUOTE = /[\u02bc\u2018-\u201b]/g;
const DOUBLE_QUOTE = /[\u201c-\u201f]/g;
const LINE_BREAK = /\r\n|[\r\u2028\u2029\x85]/g;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
// Python's `re` \d is any decimal digit (Nd), not just 0-9.
const TERMINAL_ESCAPE = /\x1b\[[\p{Nd};]*[a-zA-Z]/gu;
/** A class of the table's code points (all in the BMP). */
const anyOf = (cps: Iterable<number>) => `[${[...cps].map((cp) => `\\u${cp.toString(16).padStart(4, '0')}`).join('')}]`;
const LIGATURE = new RegExp(anyOf(LIGATURES.keys()), 'g');
const WIDE = new RegExp(anyOf(WIDTH_MAP.keys()), 'g');
const CONTROL = new RegExp(anyOf(CONTROL_CHARS), 'g');
const PLAIN = /^[\t\n\f\x20-\x7e]*$/;
/** Every character a step after the HTML one changes (C1 controls windows-1252 lacks stay as they are). */
const FIXABLE = new RegExp(`[\\r${anyOf([...C1_MAP].filter(([b, c]) => c.charCodeAt(0) !== b).map(([b]) => b)).slice(1, -1)}\\u02bc\\u2018-\\u201f\\u2028\\u2029\\ud800-\\udfff]|${LIGATURE.source}|${WIDE.source}|${CONTROL.source}`);

/** ftfy's unescape_html: a named entity with its ';' (or its upper-case form), or a numeric one html.unescape decodes. */
function unescapeHtml(text: string): string {
  if (!text.includes('&')) return text;
  return text.replace(ENTITY, (ref) => {
    const name = ref.slice(1);
    if (Object.hasOwn(HTML5_NAMED, name) && name.endsWith(';')) return HTML5_NAMED[name]!;
    if (Object.hasOwn(UPPER_ENTITIES, name)) return UPPER_ENTITIES[name]!;
    if (ref.startsWith('&#')) {
      const out = htmlUnescape(ref);
      return out.includes(';') ? ref : out;
    }
    return ref;
  });
}

/**
 * The codes fix_encoding reads text back into bytes with, in its order: character → byte, where ASCII but U+001A is
 * itself (the sloppy codes spend byte 0x1A on U+FFFD).
 */
const CODES = CHARMAPS.map(({ name, chars }) => {
  const bytes = new Map<number, number>();
  for (let i = 0; i < chars.length; i++) bytes.set(chars.charCodeAt(i), i < 128 ? 0x80 + i : 0x1a);
  return { bytes, sloppy: name.startsWith('sloppy-'), restoreA0: name !== 'macroman' };
});

/** UTF-16 units ftfy's patterns reach past a non-ASCII character (one character may take two). */
const MARGIN = 2 * PATTERN_REACH;
/** Non-ASCII characters, with the ASCII gaps between them that a pattern could reach across. */
const ISLAND = new RegExp(`[^\\x00-\\x7f](?:[\\x00-\\x7f]{0,${2 * MARGIN}}[^\\x00-\\x7f])*`, 'g');

/**
 * The stretches [from, to) of a text that fix_encoding looks at: its non-ASCII characters, MARGIN units of ASCII on
 * either side. Each of ftfy's patterns matches around a non-ASCII character (ftfy-tables.ts), ASCII is itself in
 * every code and in UTF-8, and none of these stretches touches another: so the step is worked out stretch by stretch,
 * at a cost of their length, not the text's. A nested `&amp;amp;…` with one accent or C1 control repeats it in each of
 * its ~2,500 passes over 10,000 characters.
 */
function stretches(text: string): [number, number][] {
  const out: [number, number][] = [];
  for (const m of text.matchAll(ISLAND)) out.push([Math.max(0, m.index - MARGIN), Math.min(text.length, m.index + m[0].length + MARGIN)]);
  return out;
}

/**
 * `fix` applied to each stretch of the text, the rest kept (the text itself where no stretch changed); undefined where
 * `fix` gives undefined for one.
 */
function eachStretch(text: string, parts: readonly [number, number][], fix: (piece: string, to: number) => string | undefined): string | undefined {
  let out = '';
  let at = 0;
  for (const [from, to] of parts) {
    const piece = text.slice(from, to);
    const fixed = fix(piece, to);
    if (fixed === undefined) return undefined;
    if (fixed === piece) continue;
    out += text.slice(at, from) + fixed;
    at = to;
  }
  return at === 0 ? text : out + text.slice(at);
}

/**
 * badness.is_bad. BADNESS looks at nothing beyond its match but `^`, so each stretch is searched alone, behind a NUL
 * (which no match starts with) where it does not start the text.
 */
function isBad(text: string, parts = stretches(text)): boolean {
  for (const [from, to] of parts) {
    const piece = text.slice(from, to);
    if (MOJIBAKE_CHAR.test(piece) && BADNESS.test(from === 0 ? piece : `\0${piece}`)) return true;
  }
  return false;
}

/** The text as bytes (one character each) of a single-byte code, or undefined where it has a character the code lacks. */
function encodeIn(text: string, bytes: ReadonlyMap<number, number>): string | undefined {
  const out = Buffer.allocUnsafe(text.length);
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const b = c < 0x80 && c !== 0x1a ? c : bytes.get(c);
    if (b === undefined) return undefined;
    out[i] = b;
  }
  return out.toString('latin1');
}

/**
 * Strict UTF-8, as Python decodes it (a leading U+FEFF kept): undefined where the bytes are not UTF-8. Checked before
 * decoding: a fatal TextDecoder throws, ~10 µs a time, and a nested `&amp;amp;…` fails thousands of times.
 */
function utf8(bin: string): string | undefined {
  const bytes = Buffer.from(bin, 'latin1');
  return isUtf8(bytes) ? bytes.toString('utf8') : undefined;
}

/**
 * ftfy's utf-8-variants codec, which fix_encoding decodes with where the bytes hold 0xC0 or 0xED: strict UTF-8 but
 * for Java's NUL (C0 80) and CESU-8 surrogate pairs (ED A0-AF 80-BF ED B0-BF 80-BF). Its patterns end their optional
 * bytes with Python's `$`, which also matches before a final '\n': so at the end of the text (`last`), C0 takes a last
 * '\n' as its second byte, and so does a pair's sixth byte.
 */
function utf8Variants(bin: string, last: boolean): string | undefined {
  if (!bin.includes('\xc0') && !bin.includes('\xed')) return utf8(bin);
  const n = bin.length;
  const at = (i: number) => (i < n ? bin.charCodeAt(i) : -1);
  const end = (i: number) => last && (i === n || (i === n - 1 && at(i) === 0x0a));
  const within = (i: number, lo: number, hi: number) => at(i) >= lo && at(i) <= hi;
  let out = '';
  for (let i = 0; i < n; ) {
    let p = i;
    for (; p < n; p++) {
      const b = at(p);
      if (b === 0xc0 && (at(p + 1) === 0x80 || end(p + 1))) break;
      if (b === 0xed && (end(p + 1) || (within(p + 1, 0xa0, 0xbf) && (end(p + 2) || within(p + 2, 0x80, 0xbf))))) break;
    }
    if (p > i) {
      const plain = utf8(bin.slice(i, p));
      if (plain === undefined) return undefined;
      out += plain;
      i = p;
      continue;
    }
    if (at(i) === 0xc0) {
      if (n - i < 2) return undefined;
      out += '\0';
      i += 2;
    } else {
      const pair = n - i >= 6 && within(i + 1, 0xa0, 0xaf) && within(i + 2, 0x80, 0xbf) && at(i + 3) === 0xed && within(i + 4, 0xb0, 0xbf);
      if (!pair || !(within(i + 5, 0x80, 0xbf) || end(i + 5))) return undefined; // a lone surrogate: not UTF-8
      out += String.fromCodePoint(((at(i + 1) & 0x0f) << 16) + ((at(i + 2) & 0x3f) << 10) + ((at(i + 4) & 0x0f) << 6) + (at(i + 5) & 0x3f) + 0x10000);
      i += 6;
    }
  }
  return out;
}

/**
 * ftfy.fix_encoding: text that ftfy's heuristic (is_bad) takes for mojibake is read back into bytes with the first of
 * its codes that has every character and decoded as UTF-8 (after restore_byte_a0 and replace_lossy_sequences); where
 * none decodes, the pieces that look like UTF-8 read wrongly are fixed alone (decode_inconsistent_utf8), and at last
 * C1 controls are read as windows-1252. Step after step until one changes nothing.
 */
function fixEncoding(text: string): string {
  for (;;) {
    const fixed = fixEncodingStep(text);
    if (fixed === text) return text;
    text = fixed;
  }
}

/** One step of fix_encoding (ftfy's _fix_encoding_one_step_and_explain). */
function fixEncodingStep(text: string): string {
  if (!MOJIBAKE_CHAR.test(text)) return text;
  const parts = stretches(text);
  if (!isBad(text, parts)) return text;
  // A text is in a code where all its non-ASCII characters are, and U+001A is not where U+FFFD takes its byte.
  const sub = text.includes('\x1a');
  for (const code of CODES) {
    if (code.sloppy && sub) continue;
    const fixed = eachStretch(text, parts, (piece, to) => {
      let bin = encodeIn(piece, code.bytes);
      if (bin === undefined) return undefined;
      // restore_byte_a0: a space that stands for byte A0 inside a UTF-8 sequence ("voilÃ le", "à" with its A0 lost).
      // ftfy runs it only where ALTERED_UTF8 matches somewhere; where it matches nothing, neither pattern changes
      // anything (each A_GRAVE_WORD match is one of ALTERED_UTF8's).
      if (code.restoreA0) bin = bin.replace(A_GRAVE_WORD, '\xc3\xa0 ').replace(ALTERED_UTF8, (m) => m.replaceAll(' ', '\xa0'));
      // replace_lossy_sequences: a sequence that lost a byte to U+FFFD (byte 1A here) or '?' becomes U+FFFD.
      if (code.sloppy) bin = bin.replace(LOSSY_UTF8, '\xef\xbf\xbd');
      return utf8Variants(bin, to === text.length);
    });
    if (fixed !== undefined) return fixed;
  }
  // decode_inconsistent_utf8: where no code reads the whole text, the pieces that look like UTF-8 read wrongly.
  const fixed = eachStretch(text, parts, (piece) => piece.replace(UTF8_DETECTOR, (m) => (m.length < text.length && isBad(m) ? fixEncoding(m) : m)))!;
  if (fixed !== text) return fixed;
  // Latin-1 text with C1 controls is read as windows-1252, and other text's C1 controls alone (fix_c1_controls): the
  // same characters either way.
  return eachStretch(text, parts, fixC1Controls)!;
}

/**
 * One pass of fix_and_explain's loop. Each step is a regex replace (or a search, for fix_encoding) that leaves a text
 * without its characters as it is: a hostile `&amp;amp;amp;…` takes one pass per level (as in ftfy), ~2,500 for
 * 10,000 characters, so a pass must cost little more than a scan.
 */
function fixOnce(text: string, unescape: boolean): string {
  let t = unescape ? unescapeHtml(text) : text;
  // Printable ASCII, tabs and line feeds: nothing below changes it (NFC alone costs a 10,000-character text ~45 µs).
  if (PLAIN.test(t)) return t;
  t = fixEncoding(t);
  if (!FIXABLE.test(t)) return t.normalize('NFC');
  t = fixC1Controls(t);
  t = t.replace(LIGATURE, (c) => LIGATURES.get(c.charCodeAt(0))!);
  t = t.replace(WIDE, (c) => WIDTH_MAP.get(c.charCodeAt(0))!);
  t = t.replace(DOUBLE_QUOTE, '"').replace(SINGLE_QUOTE, "'");
  t = t.replace(LINE_BREAK, '\n');
  // fix_surrogates: a JS string holds a pair as its character already; lone halves become U+FFFD.
  t = t.replace(LONE_SURROGATE, '\ufffd');
  t = t.replace(TERMINAL_ESCAPE, '');
  t = t.replace(CONTROL, '');
  return t.normalize('NFC');
}

/**
 * ftfy.fix_text: line by line (each segment ends after its '\n'), each fixed until a pass changes nothing. HTML is
 * unescaped ("auto") until a segment holds '<', and from there on in no later segment either, as ftfy's loop does.
 */
export function fixText(text: string): string {
  // Most prompts: nothing to unescape or repair, and no character that mojibake needs, before or after NFC.
  if (!text.includes('&')) {
    if (PLAIN.test(text)) return text;
    if (!FIXABLE.test(text) && !MOJIBAKE_CHAR.test(text)) {
      const nfc = text.normalize('NFC');
      if (nfc === text || (!FIXABLE.test(nfc) && !MOJIBAKE_CHAR.test(nfc))) return nfc;
    }
  }
  let unescape = true;
  let out = '';
  for (let pos = 0; pos < text.length; ) {
    const nl = text.indexOf('\n', pos);
    const end = nl < 0 ? text.length : nl + 1;
    let seg = text.slice(pos, end);
    if (seg.includes('<')) unescape = false;
    for (;;) {
      const fixed = fixOnce(seg, unescape);
      if (fixed === seg) break;
      seg = fixed;
    }
    out += seg;
    pos = end;
  }
  return out;
}
