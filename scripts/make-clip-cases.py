"""Writes test/fixtures/parity/clip-fuzz.json: token ids from OpenAI CLIP's own simple_tokenizer for prompts beyond
the handed reference set (long multi-byte words, HTML references of every kind, whitespace and case-folding edges,
and prompts as users paste them: line breaks, Unicode spaces, zero-width and control characters, full-width and
curly punctuation, ligatures, terminal escapes, lone surrogates, weighting syntax).

    PYTHONPATH=<python-ftfy> python3 scripts/make-clip-cases.py /path/to/openai-CLIP/clip > test/fixtures/parity/clip-fuzz.json

With `mojibake` after the folder it writes test/fixtures/parity/clip-mojibake.json instead: text as pasted from pages
decoded with the wrong code (mojibake_texts), each case with what ftfy.fix_text made of it (`fixed`) beside its ids.

The folder is the `clip/` package of github.com/openai/CLIP (simple_tokenizer.py, bpe_simple_vocab_16e6.txt.gz);
needs the `regex` package and ftfy (a checkout of github.com/rspeer/python-ftfy on PYTHONPATH will do; its wcwidth
import serves only display functions and may be a stub module).
"""
import importlib.util
import json
import os
import random
import sys

import ftfy
import ftfy.bad_codecs  # noqa: F401 - registers the sloppy codecs

clip_dir = sys.argv[1]
spec = importlib.util.spec_from_file_location("simple_tokenizer", os.path.join(clip_dir, "simple_tokenizer.py"))
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)
tok = st.SimpleTokenizer(os.path.join(clip_dir, "bpe_simple_vocab_16e6.txt.gz"))

rnd = random.Random(18)
alphabets = {
    "cjk": "北京的长城日落时分超高清富士山桜水彩画飲猫龍鳳山水墨画",
    "kana": "カフェでコーヒーを飲むねこひらがなカタカナー",
    "hangul": "서울의밤거리네온사인한국어",
    "cyrillic": "приветмиркрасивыйпейзажЁЖЩ",
    "greek": "αβγδεζηθικλμνξοπρσςτυφχψωΣ",
    "arabic": "مدينةعربيةقديمةعندالغروب",
    "devanagari": "हिमालयपर्वतकादृश्य",
    "latin1": "éàüøßñçÅÆœ",
    "emoji": "🐱🐶🎉🚀✨👍🏽❤️🇯🇵",
    "mixed": "aé北🙂\u200d\ufe0f1३",
}
texts = []
# Long words of one script: many merges, the order of which decides the ids.
for name, chars in alphabets.items():
    chars = list(chars)
    for _ in range(12):
        texts.append("".join(rnd.choice(chars) for _ in range(rnd.randint(2, 90))))
# Sentences mixing scripts, numbers and punctuation.
words = ["a", "photo", "of", "cat", "北京", "桜", "서울", "мир", "σοφία", "مدينة", "हिमालय", "façade", "🙂", "🎉🎉", "3", "३", "٣", "!!", "...", "—", "“quoted”"]
for _ in range(40):
    texts.append(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))))
# HTML references: named with and without ';', longest-prefix names, numeric (decimal, hex, windows-1252, invalid,
# surrogates, out of range, huge), double escapes, and '&' that is not a reference.
texts += [
    "Tom &amp; Jerry", "&amp;amp; &amp;lt;b&amp;gt;", "fish &amp;amp;amp; chips", "&lt;b&gt;bold&lt;/b&gt;",
    "&#39;n&#39;", "&#x27;hex&#X27;", "&#128; &#150; &#x9f;", "&#0; &#13; &#x0d;", "&#xD800; &#57343;", "&#1114112; &#x110000;",
    "&#99999999999999999999999;", "&#1;&#11;&#127;&#xFFFE;&#x10FFFF;", "&#65 &#x41 &#9731", "&notit; &notin; &not",
    "&ampx &amp &AMP &copy2024 &Eacute;cole", "&nbsp;space&NonBreakingSpace;", "&NewLine;line&Tab;tab", "& alone, a&b, &;, &#;, &#x;",
    "&" + "a" * 40 + ";", "&frac12;&frac34;&half;", "&lt;|endoftext|&gt; after", "&#8203;zero&#x200B;width", "&#x1F600;&#128512;",
    "AT&amp;T &quot;Q&quot; &apos;a&apos;", "&&amp;&&", "&lt;lora:style:0.8&gt; &lt;lyco:x&gt;",
]
# Whitespace and case edges: Python's \s and str.strip() differ from JS's; final sigma, dotted I, sharp s, ligatures.
texts += [
    "  leading and trailing  ", "tabs\tand\nnewlines\r\nand\u000bvt\u000cff", "nbsp\u00a0here\u2003em\u3000ideo\u202fnarrow",
    "nel\u0085here", "\u001cfile sep\u001d\u001e\u001f", "mid\u001cdle", "bom\ufeffinside", "\ufeffbom first",
    "zero\u200bwidth\u200cnon\u200djoiner", "ΟΔΟΣ ΣΟΦΟΣ Σ", "İstanbul IĞDIR", "STRASSE Straße ẞ", "ﬁne ﬂour ﬀ", "ǅ ǈ ǋ",
    "Ａｂｃ　ＦＵＬＬ，ｗｉｄｔｈ！", "ｶﾀｶﾅ", "e\u0301 vs é, A\u030a vs Å", "\u0345 ypogegrammeni α\u0345", "Å Ω K (compat)",
    "don't we'll I'M YOU'RE it's", "’curly’ “double”", "x²³ ½ ⅓ ① Ⅻ", "𝐛𝐨𝐥𝐝 𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝟙𝟚", "",
    "\u00ad soft\u00adhyphen", "a\u0000b", "control\u0007bell", "\u2028line sep\u2029para",
]
# Prompts as users paste them from UIs, chat tools and scripts (ftfy's repairs decide most of these).
texts += [
    "a cat\r\non a mat", "a cat\ron a mat", "a\tcat\t\ton a mat", "a\u00a0cat\u2009on\u202fa\u3000mat", "a\u2028cat\u2029mat\u0085x",
    "\ufeffa photo of a cat", "a photo\ufeff of a cat", "a\u200bphoto\u200cof\u200da\u2060cat", "👨\u200d👩\u200d👧 family",
    "👍🏽 👍🏿 🇯🇵🇫🇷 🏳️\u200d🌈", "cafe\u0301 vs café", "A\u030a Å \u212b", "ｆｕｌｌ　ｗｉｄｔｈ，ｔｅｘｔ！", "（masterpiece），［best］",
    "ｶﾀｶﾅ ﾊﾝｶｸ", "“curly” ‘single’ ‹a› «b» „c“", "don’t it’s we’ll", "Tom &amp;amp;amp; Jerry", "&nbsp;&nbsp;cat",
    "<b>bold</b> &amp; &lt;", "a < b &amp; c", "&lt;3 &amp; x", "line &amp;one\n<two> &amp;two\nthree &amp;three", "&EACUTE;COLE &NTILDE; &AMP;",
    "&#x2019;s &#8220;q&#8221;", "עברית שלום", "مرحبا بالعالم", "mixed English עברית عربى", "\u202eright to left override\u202c",
    "\u200fRLM\u200e LRM", "nul\x00\x00end", "bell\x07 backspace\x08 esc\x1b[31mred\x1b[0m", "del\x7f", "c1\x80\x85\x8d\x9f",
    "\x0bvt\x0cff", "(masterpiece:1.3), ((best quality)), [blurry], (cat:0.8) BREAK dog", "a {red|blue} car",
    "<easynegative>, <bad-hands-5>", "embedding:EasyNegative, (worst quality:1.4)", "ﬁne ﬂour ﬀ ﬃ ﬅ", "Ǆ ǅ ǆ Ĳ ŉ",
    "\ufff9annot\ufffa\ufffb \ufffc obj", "\u206adeprecated\u206f", "\U000e0041tag\U000e007f", "a\ufffdb",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scotland", " ", "\t\n", "\u3000", "\u200b", "\ufeff",
    "\x00", "a\ud800b", "\udfff end", "pair \ud83d\ude00 joined", "1girl, solo, long hair, looking at viewer",
]


def mojibake_texts():
    """Text as users paste it from pages decoded with the wrong code (UTF-8 read as a single-byte code: every code
    ftfy tries, some it does not, twice over, with lost bytes), mixed with good text, and text that only looks odd
    (Latin-1 words, Greek, Cyrillic, symbols, kaomoji) that ftfy should leave alone."""
    rnd = random.Random(6)
    good = [
        "don’t stop", "it’s a “great” day", "café au lait", "crème brûlée",
        "naïve façade", "jalapeño piñata", "Zürich Straße", "São Paulo at dusk",
        "Ærøskøbing harbour", "smörgåsbord", "Kraków Łódź", "Dvořák",
        "İstanbul çarşı", "résumé — 10 €", "© 2024 ™ ®",
        "½ cup, 2×3, 30°C, ±5", "wait… • bullet – dash", "à la mode",
        "voilà le travail", "À bientôt", "Tokyo 東京タワー", "맛있는 음식",
        "Москва ночью", "Αθήνα στο φως",
        "שלום", "مرحبا", "हिन्दी",
        "🐱 cat", "thumbs 👍🏽", "❤\ufe0f love", "✨ sparkles ✔",
        "¯\\_(ツ)_/¯", "“quoted”", "‘single’", "a\u00a0non-breaking space",
        "España ¡olé!", "¿qué?", "Über äußerst schön", "Árvíztűrő tükörfúrógép",
        "ščřžýáíé", "ęąśćżń", "Müller & Söhne", "20\u00a0°C",
    ]
    codes = ["latin-1", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250", "sloppy-windows-1253",
             "sloppy-windows-1254", "sloppy-windows-1257", "iso-8859-2", "macroman", "cp437", "cp850", "koi8_r",
             "cp866", "sloppy-windows-1256"]
    texts = list(good)
    # Each phrase as a page read as Windows-1252 or Latin-1 (the common cases), in sentences.
    for g in good:
        b = g.encode("utf-8")
        texts.append(b.decode("sloppy-windows-1252"))
        texts.append("a photo of " + b.decode("latin-1") + ", highly detailed")
    # Every code on some phrases: those ftfy tries (in its order), and some it does not.
    for code in codes:
        for g in rnd.sample(good, 6):
            texts.append(g.encode("utf-8").decode(code, errors="replace"))
    # Twice over, and three times.
    for g in rnd.sample(good, 12):
        once = g.encode("utf-8").decode("sloppy-windows-1252")
        texts.append(once.encode("utf-8").decode("sloppy-windows-1252"))
        texts.append(once.encode("utf-8").decode("latin-1"))
    for g in rnd.sample(good, 4):
        t = g
        for _ in range(3):
            t = t.encode("utf-8").decode("sloppy-windows-1252")
        texts.append(t)
    # Byte A0 turned into a space; lost bytes as U+FFFD (strict Windows-1252) or '?'.
    for g in good:
        m = g.encode("utf-8").decode("sloppy-windows-1252")
        if "\xa0" in m:
            texts.append(m.replace("\xa0", " "))
        lossy = g.encode("utf-8").decode("windows-1252", errors="replace")
        if "\ufffd" in lossy:
            texts += [lossy, lossy.replace("\ufffd", "?")]
    # Mojibake beside good text that the code cannot encode (emoji, CJK, curly quotes): fixed piece by piece.
    for _ in range(24):
        a, b = rnd.sample(good, 2)
        bad = a.encode("utf-8").decode(rnd.choice(["sloppy-windows-1252", "latin-1", "sloppy-windows-1251"]))
        texts.append(rnd.choice([f"{bad} {b}", f"{b} {bad}", f"{b}, {bad} 🐱", f"✔ {bad} — {b}"]))
    # Lines: mojibake in some, HTML and '<' in others.
    texts += [
        "cafÃ©\nnaÃ¯ve\r\ngood line",
        "line one â€”\n<b>cafÃ©</b> &amp;\nsecond &amp; cafÃ©",
        "caf&Atilde;&copy; &amp; cr&Atilde;&uml;me", "&Atilde;&copy;", "don&acirc;&euro;&trade;t", "&#195;&#169;t&#195;&#169;",
    ]
    # Odd-looking text that is not mojibake.
    texts += [
        "NÃO", "SÃO PAULO", "Ã Â Å", "Å is a word", "Ã©", "Ã la",
        "×²", "10°C ±5°", "£5.99 €10 ¥500", "¼ ½ ¾",
        "(╯°□°）╯︵ ┻━┻", "ಠ_ಠ", "(¬‿¬)",
        "« guillemets »", "· middle dot ·", "§ 12 ¶ 3", "Señor Ñoño",
        "ßa", "æøå ÆØÅ", "þð ÞÐ", "Œuvre œuf",
        "Σόλον", "ВГРС", "вЂ", "Â\u00a0", "a Â b",
        "\ufffd", "a\ufffdb", "\ufffd\ufffd", "??", "Ã?", "â€?", "\u0080", "\u0081\u008d\u008f\u0090\u009d",
        "price \u0080 5", "A\u0303 x", "A\u0303©", "Â\u0303",
    ]
    # Edges of the decoders: Java's two-byte NUL, CESU-8 surrogate pairs, a code that eats a line's last '\n'.
    texts += [
        "À\u0080", "cafÃ©À\u0080", "Ã©À\n", "Ã©À",
        "í\u00a0½í¸\u008d", "í\u00a0½í¸\u008d cafÃ©",
        "í\u00a0½í¸\u008dÃ©", "Ã©í\u00a0\u0080í°\n",
        "í\u00a0½", "í\u009f¿Ã©",
    ]
    # Long prompts with mojibake far apart in plain text (and gaps of 12 to 30 characters), some of it next to
    # lookaheads' words, line ends, and the text's start and end.
    pad = "a photo of a cat, highly detailed, 8k"
    texts += [
        f"{pad} cafÃ© au lait {pad} donâ€™t stop {pad} naÃ¯ve {pad}",
        f"a photo of PÃ£o de AÃ§Ãºcar at sunset, {pad}, trending on artstation, by greg rutkowski",
        f"{pad} fÃ quilo and fÃ quele and Ã s and Ã la, {pad}", f"Ã la mode, {pad}", f"{pad}, Ã ",
        f"{pad} donÃ?t {pad} â€\ufffd {pad}", f"{pad} Ã©í\u00a0\u0080í°\n", f"{pad} Ã©À\n",
        f"🐱 {pad} cafÃ© {pad} ✔", f"price \u0080 5 {pad} {pad} \u0085",
        f"{pad}\ncafÃ© {pad}\n{pad} naÃ¯ve\n",
    ]
    for gap in (12, 13, 14, 15, 27, 28, 29, 30):
        texts += [f"cafÃ©{'x' * gap}Ã©", f"Ã©{' ' * gap}Ã ", f"🐱{'.' * gap}â€™{'a' * gap}Ã"]
    # Random UTF-8 text read with a random code, some bytes then lost or spaced.
    pools = [range(0xa0, 0x250), range(0x370, 0x530), range(0x2010, 0x2030), range(0x4e00, 0x4e40), range(0x1f300, 0x1f340)]
    for _ in range(120):
        cps = [rnd.choice(pools[rnd.randrange(len(pools))]) if rnd.random() < 0.6 else rnd.randrange(0x61, 0x7b) for _ in range(rnd.randint(1, 12))]
        b = bytearray("".join(map(chr, cps)).encode("utf-8"))
        roll = rnd.random()
        if roll < 0.2:
            b = bytearray(x if x != 0xA0 else 0x20 for x in b)
        elif roll < 0.3 and b:
            del b[rnd.randrange(len(b))]
        t = bytes(b).decode(rnd.choice(codes[:10]), errors="replace")
        if rnd.random() < 0.2:
            t = t.replace("\ufffd", "?")
        texts.append(t)
    # Random strings of the characters the heuristics look at.
    alphabet = sorted(set("".join(bytes(range(0x80, 0x100)).decode(c, errors="replace") for c in codes[:10])))
    alphabet += list("aeiostn  ?\xa0\ufffd")
    for _ in range(80):
        texts.append("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 10))))
    seen = set()
    return [t for t in texts if not (t in seen or seen.add(t))]


fix_text = ftfy.fix_text
mojibake = len(sys.argv) > 2 and sys.argv[2] == "mojibake"
if mojibake:
    texts = mojibake_texts()


def case(t):
    c = {"text": t, "ids": tok.encode(t)}
    return {"text": t, "fixed": fix_text(t), "ids": c["ids"]} if mojibake else c


cases = [case(t) for t in texts]
head = {
    "bos": tok.encoder["<|startoftext|>"],
    "eos": tok.encoder["<|endoftext|>"],
    "note": "OpenAI CLIP simple_tokenizer.encode (ids without bos/eos, unpadded, untruncated) with ftfy %s%s; made by "
            "scripts/make-clip-cases.py" % (ftfy.__version__, "; fixed: ftfy.fix_text(text)" if mojibake else ""),
}


def line(c):
    # A lone surrogate cannot be written as UTF-8: such a case is written with escapes.
    text = json.dumps(c, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(c)
    return text


# One case per line keeps the file small and its diffs readable.
out = json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n'
out += ",\n".join(line(c) for c in cases)
sys.stdout.write(out + "\n]}\n")
