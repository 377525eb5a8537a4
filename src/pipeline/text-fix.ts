/**
 * @module The text repairs of CLIP's basic_clean before BPE: ftfy.fix_text with its default settings, as OpenAI CLIP
 * (and transformers' slow CLIPTokenizer where ftfy is installed) call it, but for its mojibake repair (fix_encoding),
 * which is not applied (docs/PARITY.md); and Python's html.unescape. Tables from ftfy 6.3.1 (ftfy-tables.ts) and
 * Python's html module (html-entities.ts).
 */

import { CONTROL_CHARS, LIGATURES, UPPER_ENTITIES, WIDTH_MAP } from './ftfy-tables.js';
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
 * One pass of fix_and_explain's loop, fix_encoding left out. Each step is a regex replace that leaves a text without
 * its characters as it is: a hostile `&amp;amp;amp;…` takes one pass per level (as in ftfy), ~2,500 for 10,000
 * characters, so a pass must cost little more than a scan.
 */
function fixOnce(text: string, unescape: boolean): string {
  let t = unescape ? unescapeHtml(text) : text;
  // Printable ASCII, tabs and line feeds: nothing below changes it (NFC alone costs a 10,000-character text ~45 µs).
  if (PLAIN.test(t)) return t;
  if (!FIXABLE.test(t)) return t.normalize('NFC');
  t = t.replace(C1, (c) => C1_MAP.get(c.charCodeAt(0))!);
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
  // Most prompts: nothing to unescape or repair.
  if (!text.includes('&') && !FIXABLE.test(text)) return PLAIN.test(text) ? text : text.normalize('NFC');
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
