/**
 * @module JSON as Python's `json` reads and writes it. `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for
 * non-finite floats (diffusers' DPMSolverMultistepScheduler saves `"lambda_min_clipped": -Infinity`), and
 * `json.loads` reads them back; `JSON.parse` rejects them. Every JSON file of a model is read through here.
 */

/** Python's json.loads grammar: JSON plus the literals NaN, Infinity and -Infinity (nothing else, e.g. no +Infinity). */
export function parsePyJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown; // the fast path: almost every file is plain JSON
  } catch (err) {
    // Only text that names a non-finite literal can parse below; anything else keeps JSON.parse's own error.
    if (!/NaN|Infinity/.test(text)) throw err;
  }
  return new Parser(text).document();
}

/** `JSON.stringify`, except that non-finite numbers are written as Python writes them (for messages and logs). */
export function pyRepr(v: unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return Number.isNaN(v) ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity';
  return JSON.stringify(v) ?? String(v);
}

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?/y;
const ESCAPES: Readonly<Record<string, string>> = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };

class Parser {
  #i = 0;
  constructor(private readonly s: string) {}

  document(): unknown {
    const v = this.#value();
    this.#ws();
    if (this.#i < this.s.length) this.#fail('unexpected data after the value');
    return v;
  }

  #fail(what: string): never {
    const before = this.s.slice(0, this.#i);
    const line = before.split('\n').length;
    const col = this.#i - before.lastIndexOf('\n');
    throw new SyntaxError(`${what} at line ${line} column ${col} (char ${this.#i})`);
  }

  #ws(): void {
    while (this.#i < this.s.length && WS.has(this.s.charCodeAt(this.#i))) this.#i++;
  }

  #literal(word: string): boolean {
    if (!this.s.startsWith(word, this.#i)) return false;
    this.#i += word.length;
    return true;
  }

  #value(): unknown {
    this.#ws();
    const c = this.s[this.#i];
    if (c === '{') return this.#object();
    if (c === '[') return this.#array();
    if (c === '"') return this.#string();
    if (this.#literal('true')) return true;
    if (this.#literal('false')) return false;
    if (this.#literal('null')) return null;
    if (this.#literal('NaN')) return NaN;
    if (this.#literal('Infinity')) return Infinity;
    if (this.#literal('-Infinity')) return -Infinity;
    NUMBER.lastIndex = this.#i;
    const m = NUMBER.exec(this.s);
    if (m) {
      this.#i += m[0].length;
      return Number(m[0]);
    }
    return this.#fail(c === undefined ? 'expecting a value, found the end' : 'expecting a value');
  }

  #object(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    this.#i++;
    this.#ws();
    if (this.s[this.#i] === '}') {
      this.#i++;
      return out;
    }
    for (;;) {
      this.#ws();
      if (this.s[this.#i] !== '"') this.#fail('expecting a property name in double quotes');
      const key = this.#string();
      this.#ws();
      if (this.s[this.#i] !== ':') this.#fail("expecting ':' delimiter");
      this.#i++;
      // As JSON.parse: "__proto__" is an ordinary own key, never the prototype; a repeated key keeps its last value.
      Object.defineProperty(out, key, { value: this.#value(), enumerable: true, writable: true, configurable: true });
      this.#ws();
      const d = this.s[this.#i++];
      if (d === '}') return out;
      if (d !== ',') {
        this.#i--;
        this.#fail("expecting ',' delimiter");
      }
    }
  }

  #array(): unknown[] {
    const out: unknown[] = [];
    this.#i++;
    this.#ws();
    if (this.s[this.#i] === ']') {
      this.#i++;
      return out;
    }
    for (;;) {
      out.push(this.#value());
      this.#ws();
      const d = this.s[this.#i++];
      if (d === ']') return out;
      if (d !== ',') {
        this.#i--;
        this.#fail("expecting ',' delimiter");
      }
    }
  }

  #string(): string {
    let out = '';
    let start = ++this.#i;
    for (;;) {
      if (this.#i >= this.s.length) this.#fail('unterminated string');
      const code = this.s.charCodeAt(this.#i);
      if (code === 0x22) {
        out += this.s.slice(start, this.#i++);
        return out;
      }
      if (code < 0x20) this.#fail('invalid control character in a string');
      if (code !== 0x5c) {
        this.#i++;
        continue;
      }
      out += this.s.slice(start, this.#i);
      const e = this.s[this.#i + 1];
      if (e === 'u') {
        const hex = this.s.slice(this.#i + 2, this.#i + 6);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) this.#fail('invalid \\uXXXX escape');
        out += String.fromCharCode(parseInt(hex, 16)); // surrogate pairs join as UTF-16 units, as in JSON.parse
        this.#i += 6;
      } else if (e !== undefined && Object.hasOwn(ESCAPES, e)) {
        out += ESCAPES[e]!;
        this.#i += 2;
      } else this.#fail('invalid escape');
      start = this.#i;
    }
  }
}
