#!/usr/bin/env python3
"""Builds the tokenizer reference nobody here wrote: token ids from Hugging Face `tokenizers`
for ~30 hard strings, under the pre-tokenizers ktune implements (qwen2, deepseek-v3,
deepseek-llm), with one byte-level BPE vocabulary that this script trains itself (no download:
the GPU machine has no internet).

Run on a machine with the `tokenizers` package (transformers installs it):
    python3 tests/reference/make_tokenizer_fixture.py tests/data/tokenizer/hf_bpe_fixture.json

The vocabulary: a ByteLevel BPE model trained by tokenizers' BpeTrainer on the embedded corpus
(all 256 byte symbols in the alphabet), then the added tokens <|endoftext|>, <|im_start|>,
<|im_end|> (special: GGUF type CONTROL) and <think>, </think> (not special: USER_DEFINED),
as Qwen's files have them. For each pre-tokenizer a tokenizers.Tokenizer is assembled in code
exactly as the models' tokenizer.json files do it: pre_tokenizer = Sequence of Split(Regex,
"isolated") followed by ByteLevel(add_prefix_space=False, use_regex=False), decoder ByteLevel,
no normalizer (llama.cpp's GGUF metadata carries none).

Writes OUT (JSON): "gguf_metadata" (tokens, token_type, merges, eos_token_id: what the GGUF
keys tokenizer.ggml.* hold for this vocabulary) and "cases": {pre name: [{text, ids,
decoded}]}. tests/unit/test_tokenizer.cpp builds the GGUF metadata from it, tokenizes every
text with ktune and compares; it skips while OUT is absent.
"""
import json
import os
import sys

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# The regular expressions of the models' tokenizer.json files (Qwen2/Qwen3; DeepSeek-V3/R1;
# DeepSeek-LLM/V2), as llama.cpp's tokenizer.ggml.pre names them.
QWEN2 = [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]
DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
DEEPSEEK_LLM = [
    r"[\r\n]",
    # The letter list of DeepSeek's file, as escapes (an editor's NFC would change some).
    "\\s?[\u0041-\u005a\u0061-\u007a\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376-\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183-\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2-\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]
PRE = {"qwen2": QWEN2, "deepseek-v3": DEEPSEEK_V3, "deepseek-llm": DEEPSEEK_LLM}

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NOT_SPECIAL = ["<think>", "</think>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they've said, and we'll see.",
    "Mixture-of-experts models route every token to a few experts; the router picks the top 8.",
    "Numbers: 0 1 12 123 1234 12345 3.14159 2026-11-27 $1,000,000 and 42% of 7 days.",
    "你好，世界！这是一个测试。我们正在测试分词器。中文文本需要被正确地切分。",
    "日本語のテキストです。カタカナとひらがなを含みます。東京は大きな都市です。",
    "한국어 문장입니다. 토크나이저를 시험합니다.",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир! Français: café, naïve, résumé.",
    "Emoji: 😀 😃 😄 👍 👍🏽 🎉 ❤️ 👨‍👩‍👧 🚀 and symbols © ® ™ € £ ¥ → ← ∑ √ ∞.",
    "def tokenize(text):\n    return [t for t in text.split()]\n\n\tindented\twith\ttabs\r\n",
    "    four spaces,  two spaces, and a trailing space \n\n\n newline runs.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n4",
] * 20

HARD = [
    "Hello, world!",
    "Hello world",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\tand\ttabs\t\t",
    "new\nlines\n\n\nand\r\nCRLF\r\n",
    " \n \n  \n",
    "it's, we're, THEY'LL, I'd, you've, she'S",
    "1234567890",
    "3.14159 -42 +7 1,000,000",
    "2026-11-27T06:04:27Z",
    "你好，世界！",
    "这是一个测试。我们正在测试分词器。",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "Ελληνικά και русский",
    "café naïve résumé",
    "e\u0301 combining accent",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family",
    "🚀🚀🚀",
    "symbols © ® ™ € £ ¥ → ∑ √ ∞",
    "(parentheses) [brackets] {braces} <angles>",
    "email@example.com https://example.com/path?q=1&r=2",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><|endoftext|>",
    "<think>reasoning</think>answer",
    "a\u00a0b\u2003c\u3000d",
    "     ",
    "x",
    "def f(x):\n    return x**2\n",
    "mixed中文and English混合123abc",
]


def train_model():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2[0]), "isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return vocab, merges


def build(vocab, merges, regexes):
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes] +
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(NOT_SPECIAL)
    return tok


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tokenizer_fixture.py OUT.json")
    out = sys.argv[1]
    vocab, merges = train_model()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens), "vocabulary ids are not dense"
    types = [1] * len(tokens)
    cases = {}
    for name, regexes in PRE.items():
        tok = build(vocab, merges, regexes)
        cases[name] = []
        for text in HARD:
            ids = tok.encode(text).ids
            cases[name].append({"text": text, "ids": ids,
                                "decoded": tok.decode(ids, skip_special_tokens=False)})
    # The added tokens follow the trained vocabulary (same ids in every tokenizer built above).
    tok = build(vocab, merges, QWEN2)
    for t in SPECIAL + NOT_SPECIAL:
        i = tok.token_to_id(t)
        assert i == len(tokens), (t, i, len(tokens))
        tokens.append(t)
        types.append(3 if t in SPECIAL else 4)
    meta = {"tokens": tokens, "token_type": types, "merges": merges,
            "eos_token_id": tok.token_to_id("<|endoftext|>")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"generator": "tests/reference/make_tokenizer_fixture.py",
                   "tokenizers_version": tokenizers.__version__,
                   "gguf_metadata": meta, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {out}: {len(tokens)} tokens, {len(merges)} merges, "
          f"{sum(len(c) for c in cases.values())} cases (tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
