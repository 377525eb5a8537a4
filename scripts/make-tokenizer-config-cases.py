"""Writes test/fixtures/model-configs/tokenizer-cases.json: the ids transformers' CLIPTokenizer gives for prompts
when it loads the tokenizer folders of test/fixtures/model-configs (their config files as the repositories ship them,
with the CLIP vocabulary of test/fixtures/reference/clip-tokenizer), called as diffusers' pipelines call it:
`tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`.

    python scripts/make-tokenizer-config-cases.py

The prompts avoid what docs/PARITY.md lists as differing between tokenizer implementations (HTML references,
control characters, ftfy's repairs), so the cases show what the config files change: the pad token, and the special
and added tokens that the tokenizer splits out of the text before BPE.
"""
import gzip
import json
import os
import shutil
import tempfile

import transformers
from transformers import CLIPTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIX = os.path.join(ROOT, "test", "fixtures", "model-configs")
VOCAB = os.path.join(ROOT, "test", "fixtures", "reference", "clip-tokenizer")

# name -> config files (relative to FIX) copied into the folder beside vocab.json and merges.txt
FOLDERS = {
    "sd14-onnx/tokenizer": ["sd14-onnx/tokenizer/tokenizer_config.json"],
    "sdxl/tokenizer": ["sdxl/tokenizer/tokenizer_config.json", "sdxl/tokenizer/special_tokens_map.json", "sdxl/tokenizer/added_tokens.json"],
    "sdxl/tokenizer_2": ["sdxl/tokenizer_2/tokenizer_config.json", "sdxl/tokenizer_2/special_tokens_map.json", "sdxl/tokenizer_2/added_tokens.json"],
    "sd21-base/tokenizer+rege/tokenizer": ["sd21-base/tokenizer/tokenizer_config.json", "rege/tokenizer/special_tokens_map.json"],
}

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a cat!",
    "Wow!! amazing sunset!!!",
    "hello!? what is this?!",
    "!",
    "!!!",
    "cat ! dog",
    "don't stop!now",
    "ÉCOLE! café!",
    "a<|endoftext|>b! c",
    "hi!<|endoftext|>",
    "a !<|endoftext|>! b",
    "(cat:1.2)!<|startoftext|>dog",
    "",
    "a very long prompt! " * 30,
]


def main():
    out = {"transformers": transformers.__version__, "folders": {}}
    for name, files in FOLDERS.items():
        with tempfile.TemporaryDirectory() as d:
            for f in ("vocab.json", "merges.txt"):
                with gzip.open(os.path.join(VOCAB, f + ".gz"), "rb") as src, open(os.path.join(d, f), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            for f in files:
                shutil.copy(os.path.join(FIX, f), os.path.join(d, os.path.basename(f)))
            tok = CLIPTokenizer.from_pretrained(d)
            cases = []
            for p in PROMPTS:
                ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                cases.append({"text": p, "ids": ids})
            out["folders"][name] = {"files": files, "pad_token_id": tok.pad_token_id, "model_max_length": tok.model_max_length, "cases": cases}
    with open(os.path.join(FIX, "tokenizer-cases.json"), "w") as fh:
        json.dump(out, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")


main()
