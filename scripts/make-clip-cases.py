"""Writes test/fixtures/parity/clip-fuzz.json: token ids from OpenAI CLIP's own simple_tokenizer for prompts beyond
the handed reference set (long multi-byte words, HTML references of every kind, whitespace and case-folding edges).

    python3 scripts/make-clip-cases.py /path/to/openai-CLIP/clip > test/fixtures/parity/clip-fuzz.json

The folder is the `clip/` package of github.com/openai/CLIP (simple_tokenizer.py, bpe_simple_vocab_16e6.txt.gz);
needs the `regex` package. As for ../shared/reference/clip-tokenizer/cases-unicode.json, ftfy.fix_text is NFC
normalisation (a stub module is put in front when ftfy is absent), so no case depends on ftfy's other repairs.
"""
import importlib.util
import json
import os
import random
import sys
import types
import unicodedata

clip_dir = sys.argv[1]
stub = types.ModuleType("ftfy")
stub.fix_text = lambda t: unicodedata.normalize("NFC", t)
sys.modules["ftfy"] = stub
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
cases = [{"text": t, "ids": tok.encode(t)} for t in texts]
head = {
    "bos": tok.encoder["<|startoftext|>"],
    "eos": tok.encoder["<|endoftext|>"],
    "note": "OpenAI CLIP simple_tokenizer.encode (ids without bos/eos, unpadded, untruncated); ftfy.fix_text replaced by "
            "NFC normalisation; made by scripts/make-clip-cases.py",
}
# One case per line keeps the file small and its diffs readable.
out = json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n'
out += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
sys.stdout.write(out + "\n]}\n")
