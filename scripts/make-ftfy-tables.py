"""Writes src/pipeline/ftfy-tables.ts: the tables of the ftfy.fix_text steps the tokenizer applies (OpenAI CLIP's
basic_clean starts with ftfy.fix_text). Run with ftfy's source on the path (a checkout of github.com/rspeer/python-ftfy;
its wcwidth import serves only display functions and may be a stub):

    PYTHONPATH=<python-ftfy> python3 scripts/make-ftfy-tables.py > src/pipeline/ftfy-tables.ts

Its HTML entities are html.entities.html5's names with ';' (src/pipeline/html-entities.ts holds them) plus the
upper-case forms written here; the script checks that the rest is derivable. The regular expressions of the mojibake
repair (fix_encoding) are written from Python's own parse of ftfy's patterns, so none is copied by hand.
"""
import html.entities
import json
import re
import re._parser as sre_parse
import sys
import unicodedata
from re._constants import (
    ANY, ASSERT_NOT, AT, AT_BEGINNING, BRANCH, CATEGORY, CATEGORY_SPACE, CATEGORY_WORD, IN, LITERAL, MAX_REPEAT,
    MAXREPEAT, NEGATE, RANGE, SUBPATTERN,
)

import ftfy
import ftfy.bad_codecs  # noqa: F401 - registers the sloppy codecs
from ftfy import badness, chardata, fixes
from ftfy.bad_codecs import utf8_variants

q = lambda s: json.dumps(s, ensure_ascii=True)  # noqa: E731

upper = {}
for entity, char in chardata.HTML_ENTITIES.items():
    name = entity[1:]
    if html.entities.html5.get(name) == char:
        continue
    assert name.endswith(";") and name not in html.entities.html5, entity
    upper[name] = char
for name, char in html.entities.html5.items():
    if name.endswith(";"):
        assert chardata.HTML_ENTITIES["&" + name] == char, name
assert chardata.HTML_ENTITY_RE.pattern == r"&#?[0-9A-Za-z]{1,24};", chardata.HTML_ENTITY_RE.pattern
assert chardata.SINGLE_QUOTE_RE.pattern == "[\u02bc\u2018-\u201b]" and chardata.DOUBLE_QUOTE_RE.pattern == "[\u201c-\u201f]"
assert chardata.C1_CONTROL_RE.pattern == r"[\x80-\x9f]"
# fix_c1_controls reads U+0080..U+009F as sloppy-windows-1252, which is HTML5's table of those numeric references
# (html-entities.ts' INVALID_CHARREFS): text-fix.ts takes them from there.
for b in range(0x80, 0xA0):
    assert bytes([b]).decode("sloppy-windows-1252") == html._invalid_charrefs[b], hex(b)

# The decoders text-fix.ts writes by hand: Java's NUL (C0 80) and CESU-8 surrogate pairs beside strict UTF-8.
assert utf8_variants.NULL_EXPR == b"(\xc0(\x80|$))"
assert utf8_variants.CESU8_EXPR == b"(\xed([\xa0-\xaf]|$)([\x80-\xbf]|$)(\xed|$)([\xb0-\xbf]|$)([\x80-\xbf]|$))"
assert utf8_variants.SURROGATE_EXPR == b"(\xed([\xa0-\xbf]|$)([\x80-\xbf]|$))"
# Each code fix_encoding tries: the characters of bytes 0x80..0xFF and 0x1A, each encoding back to its byte, and ASCII
# but 0x1A as itself (possible_encoding's pattern is built from the same characters).
charmaps = []
for enc in chardata.CHARMAP_ENCODINGS:
    chars = bytes([*range(0x80, 0x100), 0x1A]).decode(enc)
    assert len(set(chars)) == len(chars) and all(0x80 <= ord(c) < 0x10000 or c == "\x1a" for c in chars), enc
    for i, c in enumerate(chars):
        assert c.encode(enc) == bytes([0x80 + i if i < 128 else 0x1A]), (enc, i)
    for b in [*range(0x1A), *range(0x1B, 0x80)]:
        assert chr(b).encode(enc) == bytes([b]), (enc, b)
    assert chardata.ENCODING_REGEXES[enc].pattern == f"^[\x00-\x19\x1b-\x7f{chars}]*$", enc
    charmaps.append((enc, chars))
assert chardata.ENCODING_REGEXES["ascii"].pattern == "^[\x00-\x7f]*$"

# Python's \w on str is a letter, a number or '_' (here, in Python's Unicode version: V8's \p{L}, \p{N} may be newer);
# its \s is str.isspace's set, which JS's \s is not.
WORD = re.compile(r"\w")
for cp in range(0x110000):
    assert bool(WORD.match(chr(cp))) == (unicodedata.category(chr(cp))[0] in "LN" or cp == 0x5F), hex(cp)
SPACE = [cp for cp in range(0x110000) if re.match(r"\s", chr(cp))]


def js_char(cp):
    return chr(cp) if chr(cp).isascii() and chr(cp).isalnum() else "\\u{%x}" % cp


def js_ranges(cps):
    cps, out, i = sorted(set(cps)), [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(js_char(cps[i]) if i == j else "%s-%s" % (js_char(cps[i]), js_char(cps[j])))
        i = j + 1
    return "".join(out)


def js_class(items):
    neg, cps, parts = False, set(), []
    for op, av in items:
        if op is NEGATE:
            neg = True
        elif op is LITERAL:
            cps.add(av)
        elif op is RANGE:
            cps.update(range(av[0], av[1] + 1))
        elif op is CATEGORY and av is CATEGORY_SPACE:
            cps.update(SPACE)
        elif op is CATEGORY and av is CATEGORY_WORD:
            parts.append("\\p{L}\\p{N}_")
        else:
            raise ValueError((op, av))
    return "[%s%s%s]" % ("^" if neg else "", js_ranges(cps), "".join(parts))


def js_regex(tree):
    """A Python regular expression's parse as JS source (flag u): groups become non-capturing, `.` is [^\\n]."""
    out = []
    for op, av in tree:
        if op is LITERAL:
            out.append(js_char(av))
        elif op is ANY:
            out.append("[^\\n]")
        elif op is IN:
            out.append(js_class(av))
        elif op is BRANCH:
            out.append("(?:%s)" % "|".join(js_regex(alt) for alt in av[1]))
        elif op is SUBPATTERN:
            assert av[1] == 0 and av[2] == 0, av
            out.append("(?:%s)" % js_regex(av[3]))
        elif op is MAX_REPEAT:
            lo, hi, sub = av
            quant = {(0, 1): "?", (0, MAXREPEAT): "*", (1, MAXREPEAT): "+"}.get((lo, hi))
            quant = quant or ("{%d}" % lo if lo == hi else "{%d,%s}" % (lo, "" if hi is MAXREPEAT else hi))
            out.append("(?:%s)%s" % (js_regex(sub), quant))
        elif op is ASSERT_NOT:
            out.append("(?%s!%s)" % ("<" if av[0] < 0 else "", js_regex(av[1])))
        elif op is AT and av is AT_BEGINNING:
            out.append("^")
        else:
            raise ValueError((op, av))
    return "".join(out)


def needs(tree):
    """Characters of which every match of the parse holds one (None where no such set was found)."""
    best = None
    for op, av in tree:
        got = None
        if op is LITERAL and av >= 0x80:
            got = {av}
        elif op is IN and all(o in (LITERAL, RANGE) for o, _ in av):
            got = set()
            for o, a in av:
                got |= {a} if o is LITERAL else set(range(a[0], a[1] + 1))
            got = got if min(got) >= 0x80 else None
        elif op is BRANCH:
            alts = [needs(alt) for alt in av[1]]
            got = None if None in alts else set().union(*alts)
        elif op is SUBPATTERN:
            got = needs(av[3])
        elif op is MAX_REPEAT and av[0] >= 1:
            got = needs(av[2])
        if got is not None and (best is None or len(got) < len(best)):
            best = got
    return best


def parse(pattern):
    assert pattern.flags & ~(re.VERBOSE | re.UNICODE) == 0, pattern
    return sre_parse.parse(pattern.pattern, pattern.flags & re.VERBOSE)


badness_tree = parse(badness.BADNESS_RE)
mojibake_chars = needs(badness_tree)
assert mojibake_chars is not None


def nul_starts(tree):
    """Whether a match of the parse may start with U+0000 (a repeat first is taken to)."""
    for op, av in tree:
        if op is AT:
            continue
        if op is LITERAL:
            return av == 0
        if op is IN:
            return any(o is NEGATE or (o is LITERAL and a == 0) or (o is RANGE and a[0] == 0) for o, a in av)
        if op is BRANCH:
            return any(nul_starts(alt) for alt in av[1])
        if op is SUBPATTERN:
            return nul_starts(av[3])
        return True
    return True


def context_free(tree, top=True):
    """No lookaround and no anchor but a leading `^`: a match is one whatever text lies around it."""
    for i, (op, av) in enumerate(tree):
        if op is AT:
            ok = top and i == 0 and av is AT_BEGINNING
        elif op is BRANCH:
            ok = all(context_free(alt, False) for alt in av[1])
        elif op is SUBPATTERN:
            ok = context_free(av[3], False)
        elif op is MAX_REPEAT:
            ok = context_free(av[2], False)
        else:
            ok = op in (LITERAL, IN, ANY)
        if not ok:
            return False
    return True


# text-fix.ts searches only the stretches around non-ASCII characters (as every one above is), each behind a NUL
# where it does not start the text: that needs alternatives that look at nothing beyond their match but `^`, none
# starting with NUL (their width is bounded below).
assert min(mojibake_chars) >= 0x80
(branch, (_, alternatives)), = badness_tree
assert branch is BRANCH
for alt in alternatives:
    assert context_free(alt) and not nul_starts(alt), alt


def span(tree):
    """The most characters a match of the parse looks at, lookarounds included (None: no bound)."""
    total = 0
    for op, av in tree:
        if op is ASSERT_NOT:
            w = span(av[1])
        elif op is BRANCH:
            ws = [span(alt) for alt in av[1]]
            w = None if None in ws else max(ws)
        elif op is SUBPATTERN:
            w = span(av[3])
        elif op is MAX_REPEAT:
            w = None if av[1] is MAXREPEAT or span(av[2]) is None else av[1] * span(av[2])
        elif op is AT:
            w = 0
        else:
            w = 1
        if w is None:
            return None
        total += w
    return total


def firsts(tree):
    """The characters a match of the parse may start with (for the byte patterns: alternatives of classes)."""
    (op, av), = tree[:1]
    if op is BRANCH:
        return set().union(*(firsts(alt) for alt in av[1]))
    if op is SUBPATTERN:
        return firsts(av[3])
    if op is LITERAL:
        return {av}
    assert op is IN and all(o in (LITERAL, RANGE) for o, _ in av), (op, av)
    return set().union(*({a} if o is LITERAL else set(range(a[0], a[1] + 1)) for o, a in av))


# text-fix.ts reads the text back into bytes, fixes and decodes it only in the stretches around its non-ASCII
# characters (ASCII is itself in every code and in UTF-8): that needs byte patterns whose matches start with a byte that
# a non-ASCII character became (0x80..0xFF, or 0x1A for U+FFFD in the sloppy codes, which cannot encode U+001A), and a
# bound on how far past it they look. UTF8_DETECTOR's matches are repeats of a unit that starts with a non-ASCII
# character, behind one character of lookbehind.
byte_trees = [parse(chardata.ALTERED_UTF8_RE), parse(fixes.A_GRAVE_WORD_RE), parse(chardata.LOSSY_UTF8_RE)]
for tree in byte_trees:
    assert all(b >= 0x80 or b == 0x1A for b in firsts(tree)), tree
detector_tree = parse(chardata.UTF8_DETECTOR_RE)
(behind, (direction, behind_tree)), (repeat, (_, _, unit)) = detector_tree
assert behind is ASSERT_NOT and direction < 0 and span(behind_tree) == 1 and repeat is MAX_REPEAT
assert min(firsts(unit)) >= 0x80
pattern_reach = max(span(badness_tree), *(span(tree) for tree in byte_trees), span(behind_tree) + span(unit))
assert pattern_reach < 100

out = sys.stdout
out.write("/**\n")
out.write(" * @module Generated by scripts/make-ftfy-tables.py from ftfy %s (Python %d.%d.%d): the tables of the\n" % ((ftfy.__version__,) + sys.version_info[:3]))
out.write(" * ftfy.fix_text steps src/pipeline/text-fix.ts applies. Do not edit by hand.\n")
out.write(" */\n\n")
out.write("/** Upper-cased HTML5 entities ftfy also decodes (`&EACUTE;`); the others are html.entities.html5's names with ';'. */\n")
out.write("export const UPPER_ENTITIES: Readonly<Record<string, string>> = {\n")
for k in sorted(upper):
    out.write("  %s: %s,\n" % (q(k), q(upper[k])))
out.write("};\n\n")
out.write("/** fix_latin_ligatures. */\n")
out.write("export const LIGATURES: ReadonlyMap<number, string> = new Map([\n")
for k in sorted(chardata.LIGATURES):
    out.write("  [0x%x, %s],\n" % (k, q(chardata.LIGATURES[k])))
out.write("]);\n\n")
out.write("/** fix_character_width: full- and half-width forms (and U+3000) to their standard-width forms. */\n")
out.write("export const WIDTH_MAP: ReadonlyMap<number, string> = new Map([\n")
for k in sorted(chardata.WIDTH_MAP):
    out.write("  [0x%x, %s],\n" % (k, q(chardata.WIDTH_MAP[k])))
out.write("]);\n\n")
out.write("/** remove_control_chars: the code points it drops. */\n")
out.write("export const CONTROL_CHARS: ReadonlySet<number> = new Set([\n")
cc = sorted(chardata.CONTROL_CHARS)
for i in range(0, len(cc), 12):
    out.write("  %s,\n" % ", ".join("0x%x" % c for c in cc[i:i + 12]))
out.write("]);\n")
out.write("\n/** chardata.CHARMAP_ENCODINGS, in the order fix_encoding tries them: the characters of bytes 0x80..0xFF, then 0x1A. */\n")
out.write("export const CHARMAPS: readonly { readonly name: string; readonly chars: string }[] = [\n")
for enc, chars in charmaps:
    out.write("  { name: %s, chars: %s },\n" % (q(enc), q(chars)))
out.write("];\n\n")
out.write("/** badness.BADNESS_RE, which is_bad searches for: its alternatives, one a line. */\n")
out.write("export const BADNESS = new RegExp(\n  [\n")
for alt in alternatives:
    out.write("    String.raw`%s`,\n" % js_regex(alt))
out.write("  ].join('|'),\n  'u',\n);\n\n")
out.write("/**\n * The most characters a match of the patterns below (one repeat of UTF8_DETECTOR's) looks at, lookarounds included.\n")
out.write(" * Each match starts with (BADNESS: holds) a character or byte that is not ASCII.\n */\n")
out.write("export const PATTERN_REACH = %d;\n\n" % pattern_reach)
out.write("/** Characters of which every BADNESS match holds one: text without them is not mojibake to ftfy. */\n")
out.write("export const MOJIBAKE_CHAR = /[%s]/u;\n\n" % js_ranges(mojibake_chars))
out.write("/** chardata.UTF8_DETECTOR_RE, the pieces decode_inconsistent_utf8 fixes alone. */\n")
out.write("export const UTF8_DETECTOR = /%s/gu;\n\n" % js_regex(detector_tree))
out.write("/** The byte patterns, for strings of bytes (one character 0..255 per byte). chardata.ALTERED_UTF8_RE: */\n")
out.write("export const ALTERED_UTF8 = /%s/gu;\n" % js_regex(parse(chardata.ALTERED_UTF8_RE)))
out.write("/** fixes.A_GRAVE_WORD_RE: */\n")
out.write("export const A_GRAVE_WORD = /%s/gu;\n" % js_regex(parse(fixes.A_GRAVE_WORD_RE)))
out.write("/** chardata.LOSSY_UTF8_RE: */\n")
out.write("export const LOSSY_UTF8 = /%s/gu;\n" % js_regex(parse(chardata.LOSSY_UTF8_RE)))
