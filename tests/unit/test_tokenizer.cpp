// Byte-level BPE tokenizer: pre-tokenizer splits worked out by hand from the Hugging Face
// regular expressions, BPE merge order, added tokens, byte-level decoding and streaming UTF-8,
// GGUF metadata both ways and its errors, the synthetic vocabulary, and (when generated) the
// Hugging Face tokenizers fixture (tests/reference/make_tokenizer_fixture.py).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/tokenizer.h"

using ktune::PreTokenizer;
using ktune::StreamDecoder;
using ktune::Tokenizer;
using ktune::TokenType;
using ktune::VocabData;

namespace {

// The 256 byte tokens (GPT-2 order is irrelevant here: id = byte value).
VocabData byte_vocab(PreTokenizer pre) {
  VocabData d;
  d.pre = pre;
  const Tokenizer t = Tokenizer::synthetic(256);
  d.tokens = t.data().tokens;
  return d;
}

std::vector<std::string> pieces(PreTokenizer pre, const std::string& text) {
  return Tokenizer(byte_vocab(pre), "test").pre_tokenize(text);
}

using Pieces = std::vector<std::string>;

TEST(Tokenizer, Qwen2PreTokenizerSplits) {
  const auto q = PreTokenizer::Qwen2;
  EXPECT_EQ(pieces(q, "Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(pieces(q, "it's I'M we'll"), (Pieces{"it", "'s", " I", "'M", " we", "'ll"}));
  EXPECT_EQ(pieces(q, "12345"), (Pieces{"1", "2", "3", "4", "5"}));
  EXPECT_EQ(pieces(q, "a  b"), (Pieces{"a", " ", " b"}));
  EXPECT_EQ(pieces(q, "a\n\nb"), (Pieces{"a", "\n\n", "b"}));
  EXPECT_EQ(pieces(q, "a \n \nb"), (Pieces{"a", " \n \n", "b"}));
  EXPECT_EQ(pieces(q, "hi!!!\n\nx"), (Pieces{"hi", "!!!\n\n", "x"}));
  EXPECT_EQ(pieces(q, "x   "), (Pieces{"x", "   "}));
  EXPECT_EQ(pieces(q, "$100"), (Pieces{"$", "1", "0", "0"}));
  EXPECT_EQ(pieces(q, "(hello)"), (Pieces{"(hello", ")"}));
  EXPECT_EQ(pieces(q, "你好，世界"), (Pieces{"你好", "，世界"}));
  EXPECT_EQ(pieces(q, "ok 😀😀!"), (Pieces{"ok", " 😀😀!"}));
  EXPECT_EQ(pieces(q, "café"), (Pieces{"café"}));
}

TEST(Tokenizer, DeepseekV3PreTokenizerSplits) {
  const auto d = PreTokenizer::DeepseekV3;
  EXPECT_EQ(pieces(d, "12345"), (Pieces{"123", "45"}));
  EXPECT_EQ(pieces(d, "x1234567y"), (Pieces{"x", "123", "456", "7", "y"}));
  EXPECT_EQ(pieces(d, "Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(pieces(d, "你好abc"), (Pieces{"你好", "abc"}));
  EXPECT_EQ(pieces(d, "(hello"), (Pieces{"(hello"}));
  EXPECT_EQ(pieces(d, "a  b"), (Pieces{"a", " ", " b"}));
  EXPECT_EQ(pieces(d, "it's"), (Pieces{"it", "'s"}));
  EXPECT_EQ(pieces(d, "hi!!\n"), (Pieces{"hi", "!!\n"}));
  // Digits end a piece, so the spaces before them are at a piece's end: one piece.
  EXPECT_EQ(pieces(d, "a  1"), (Pieces{"a", "  ", "1"}));
}

TEST(Tokenizer, DeepseekLlmPreTokenizerSplits) {
  const auto d = PreTokenizer::DeepseekLlm;
  EXPECT_EQ(pieces(d, "Hello world\n"), (Pieces{"Hello", " world", "\n"}));
  EXPECT_EQ(pieces(d, "12345"), (Pieces{"12345"}));
  EXPECT_EQ(pieces(d, "a, b"), (Pieces{"a", ",", " b"}));
  EXPECT_EQ(pieces(d, "x  "), (Pieces{"x", "  "}));
  EXPECT_EQ(pieces(d, "中文abc"), (Pieces{"中文", "abc"}));
}

TEST(Tokenizer, Gpt2PreTokenizerSplits) {
  const auto g = PreTokenizer::Gpt2;
  EXPECT_EQ(pieces(g, "Hello world 123 !!"), (Pieces{"Hello", " world", " 123", " !!"}));
  EXPECT_EQ(pieces(g, "it's IT'S"), (Pieces{"it", "'s", " IT", "'", "S"}));
}

// Byte-level text of an ASCII string ("Ġ" for the space).
std::string bl(const std::string& s) {
  std::string out;
  for (char c : s) out += c == ' ' ? std::string("\xC4\xA0") : std::string(1, c);
  return out;
}

Tokenizer small_bpe(std::vector<std::string> merges) {
  VocabData d = byte_vocab(PreTokenizer::Qwen2);
  for (const std::string& m : merges) {
    const size_t sp = m.find(' ');
    const std::string merged = m.substr(0, sp) + m.substr(sp + 1);
    if (std::find(d.tokens.begin(), d.tokens.end(), merged) == d.tokens.end()) {
      d.tokens.push_back(merged);
    }
  }
  d.merges = std::move(merges);
  return Tokenizer(std::move(d), "test");
}

int32_t id_of(const Tokenizer& t, const std::string& text) {
  const auto& v = t.data().tokens;
  return static_cast<int32_t>(std::find(v.begin(), v.end(), text) - v.begin());
}

TEST(Tokenizer, BpeMergesLowestRankFirst) {
  // Left to right would give "hel" + "o"; rank order merges "l o" first.
  const Tokenizer t = small_bpe({"l o", "h e", "he l"});
  EXPECT_EQ(t.encode("helo"), (std::vector<int32_t>{id_of(t, "he"), id_of(t, "lo")}));
  const Tokenizer u = small_bpe({"h e", "l l", "he ll", "hell o", bl(" ") + " w"});
  EXPECT_EQ(u.encode("hello"), std::vector<int32_t>{id_of(u, "hello")});
  EXPECT_EQ(u.encode("hell wo"), (std::vector<int32_t>{id_of(u, "hell"), id_of(u, bl(" w")), 'o'}));
  // Equal pairs: the leftmost merges first ("aaa" -> "aa" + "a").
  const Tokenizer a = small_bpe({"a a"});
  EXPECT_EQ(a.encode("aaa"), (std::vector<int32_t>{id_of(a, "aa"), 'a'}));
}

// BPE the slow, obvious way: merge the lowest-rank adjacent pair (leftmost on ties), repeat.
std::vector<int32_t> naive_bpe(const Tokenizer& t, const std::string& piece) {
  const VocabData& d = t.data();
  std::map<std::pair<std::string, std::string>, size_t> rank;
  for (size_t r = 0; r < d.merges.size(); ++r) {
    const size_t sp = d.merges[r].find(' ', 1);
    rank.emplace(std::make_pair(d.merges[r].substr(0, sp), d.merges[r].substr(sp + 1)), r);
  }
  std::vector<std::string> sym;
  for (unsigned char b : piece) sym.push_back(d.tokens[b]);  // synthetic: id = byte
  for (;;) {
    size_t best = SIZE_MAX, at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      const auto it = rank.find({sym[i], sym[i + 1]});
      if (it != rank.end() && it->second < best) {
        best = it->second;
        at = i;
      }
    }
    if (best == SIZE_MAX) break;
    sym[at] += sym[at + 1];
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  std::vector<int32_t> ids;
  for (const std::string& s : sym) ids.push_back(id_of(t, s));
  return ids;
}

TEST(Tokenizer, BpeEqualsTheNaiveAlgorithmAndScalesToLongPieces) {
  const Tokenizer t = Tokenizer::synthetic(1024);
  std::mt19937 rng(5);
  const std::string alphabet = "the expert model tokens read and prompt aaaa eeee";
  for (int k = 0; k < 300; ++k) {
    std::string text;
    const int n = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) text += alphabet[rng() % alphabet.size()];
    std::vector<int32_t> want;
    for (const std::string& p : t.pre_tokenize(text)) {
      const auto ids = naive_bpe(t, p);
      want.insert(want.end(), ids.begin(), ids.end());
    }
    EXPECT_EQ(t.encode(text), want) << text;
  }
  // One piece of 300 000 bytes (a whitespace run, a blob): n log n, and still exact.
  const std::string spaces(300000, ' '), blob(300000, 'e');
  EXPECT_EQ(t.decode(t.encode(spaces)), spaces);
  EXPECT_EQ(t.decode(t.encode(blob)), blob);
}

const std::vector<std::string> kHardStrings = {
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "it's, we're, THEY'LL, I'd",
    "1234567890 3.14159 -42",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family",
    "café naïve résumé",
    "Ελληνικά και русский",
    "مرحبا بالعالم",
    "<|im_start|>user\nhi<|im_end|>",
    "     ",
    "",
    "a\u00A0b\u2003c",
    "x\xF0\x9F",  // a truncated emoji: invalid UTF-8 passes through as bytes
};

TEST(Tokenizer, DecodeInvertsEncodeForEveryPreTokenizer) {
  for (PreTokenizer pre : {PreTokenizer::Qwen2, PreTokenizer::DeepseekV3, PreTokenizer::DeepseekLlm,
                           PreTokenizer::Gpt2}) {
    VocabData d = Tokenizer::synthetic(1024).data();
    d.pre = pre;
    const Tokenizer t(std::move(d), "test");
    for (const std::string& s : kHardStrings) {
      EXPECT_EQ(t.decode(t.encode(s)), s) << ktune::pre_tokenizer_name(pre) << ": " << s;
    }
  }
}

TEST(Tokenizer, SyntheticVocabularyHasMergesAndSpecialTokens) {
  const Tokenizer t = Tokenizer::synthetic(1024);
  EXPECT_EQ(t.size(), 1024);
  EXPECT_GT(t.data().merges.size(), 200u);
  EXPECT_EQ(t.token_text(1023), "<|im_end|>");
  EXPECT_EQ(t.token_text(t.eos()), "<|endoftext|>");
  EXPECT_TRUE(t.is_end_of_generation(t.eos()));
  EXPECT_TRUE(t.is_end_of_generation(1023));
  EXPECT_FALSE(t.is_end_of_generation('a'));
  // Merges learned from English make common words single tokens.
  EXPECT_EQ(t.encode(" the").size(), 1u);
  EXPECT_LT(t.encode("The model reads the prompt").size(), 10u);
  // Added tokens are matched before BPE, unless parse_special is off.
  const auto ids = t.encode("<|im_start|>hi<|im_end|>");
  EXPECT_EQ(ids.front(), 1022);
  EXPECT_EQ(ids.back(), 1023);
  for (int32_t id : t.encode("<|im_start|>", true, false)) EXPECT_LT(id, 1021);
  // Deterministic; tiny vocabularies hold only the bytes.
  EXPECT_EQ(Tokenizer::synthetic(1024).data().merges, t.data().merges);
  EXPECT_EQ(Tokenizer::synthetic(256).data().merges.size(), 0u);
  EXPECT_EQ(Tokenizer::synthetic(256).eos(), -1);
  EXPECT_EQ(Tokenizer::synthetic(151936).size(), 151936);
  EXPECT_THROW(Tokenizer::synthetic(100), ktune::Error);
}

TEST(Tokenizer, StreamDecoderHoldsIncompleteUtf8) {
  StreamDecoder s;
  EXPECT_EQ(s.push("a\xC3"), "a");
  EXPECT_EQ(s.push("\xA9"), "\xC3\xA9");
  EXPECT_EQ(s.push("\xF0\x9F"), "");
  EXPECT_EQ(s.push("\x98"), "");
  EXPECT_EQ(s.push("\x80!"), "\xF0\x9F\x98\x80!");
  EXPECT_EQ(s.push("\xFF"), "\xEF\xBF\xBD");  // never valid
  EXPECT_EQ(s.push("\xE4\xBD"), "");
  EXPECT_EQ(s.finish(), "\xEF\xBF\xBD\xEF\xBF\xBD");  // cut short: one U+FFFD per byte
  // Token by token through a real vocabulary: the concatenation is the text.
  const Tokenizer t = Tokenizer::synthetic(1024);
  const std::string text = "naïve 😀 你好";
  std::string out;
  StreamDecoder d;
  for (int32_t id : t.encode(text)) out += d.push(t.token_bytes(id));
  out += d.finish();
  EXPECT_EQ(out, text);
}

// GGUF metadata through a real header: write, parse, read back.
struct Gguf {
  std::vector<uint8_t> keep;
  ktune::gguf::File file;
};
Gguf to_gguf(const ktune::gguf::Writer& w) {
  Gguf g{{}, {}};
  const std::string bytes = w.header_bytes();
  g.keep.assign(bytes.begin(), bytes.end());
  g.file = ktune::gguf::File::from_memory(g.keep.data(), g.keep.size(), "tok.gguf");
  return g;
}

TEST(Tokenizer, GgufMetadataRoundTrip) {
  const Tokenizer t = Tokenizer::synthetic(600);
  ktune::gguf::Writer w;
  t.write_gguf_metadata(w);
  const Gguf g = to_gguf(w);
  ASSERT_TRUE(Tokenizer::gguf_has_vocab(g.file));
  const Tokenizer r = Tokenizer::from_gguf(g.file);
  EXPECT_EQ(r.data().tokens, t.data().tokens);
  EXPECT_EQ(r.data().merges, t.data().merges);
  EXPECT_EQ(r.eos(), t.eos());
  EXPECT_EQ(r.pre(), PreTokenizer::Qwen2);
  for (const std::string& s : kHardStrings) EXPECT_EQ(r.encode(s), t.encode(s)) << s;
}

std::string error_of(const ktune::gguf::Writer& w) {
  const Gguf g = to_gguf(w);
  try {
    Tokenizer::from_gguf(g.file);
  } catch (const ktune::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Tokenizer, MalformedMetadataNamesTheKey) {
  using ktune::gguf::Value;
  using ktune::gguf::ValueType;
  const Tokenizer t = Tokenizer::synthetic(300);
  auto base = [&] {
    ktune::gguf::Writer w;
    t.write_gguf_metadata(w);
    return w;
  };
  auto expect_error = [&](ktune::gguf::Writer w, const std::string& key, const std::string& what) {
    const std::string msg = error_of(w);
    EXPECT_NE(msg.find(key), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_NE(msg.find("tok.gguf"), std::string::npos) << msg;
  };
  {
    ktune::gguf::Writer w;
    expect_error(w, "tokenizer.ggml.model", "missing");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.model", Value::string("llama"));
    expect_error(w, "tokenizer.ggml.model", "not supported");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.pre", Value::string("klingon"));
    expect_error(w, "tokenizer.ggml.pre", "klingon");
  }
  {
    ktune::gguf::Writer w;
    w.set("tokenizer.ggml.model", Value::string("gpt2"));
    expect_error(w, "tokenizer.ggml.pre", "missing");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.merges",
          Value::make_array(ValueType::STRING, {Value::string("a"), Value::string("b c")}));
    expect_error(w, "tokenizer.ggml.merges", "entry 0");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.merges", Value::make_array(ValueType::STRING, {Value::string("q zz")}));
    expect_error(w, "tokenizer.ggml.merges", "`zz` is not a token");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.token_type", Value::make_array(ValueType::INT32, {Value::i32(1)}));
    expect_error(w, "tokenizer.ggml.token_type", "has 1 entries");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.eos_token_id", Value::u32(5000));
    expect_error(w, "tokenizer.ggml.eos_token_id", "outside the vocabulary");
  }
  {
    ktune::gguf::Writer w;
    w.set("tokenizer.ggml.model", Value::string("gpt2"));
    w.set("tokenizer.ggml.pre", Value::string("qwen2"));
    w.set("tokenizer.ggml.tokens", Value::make_array(ValueType::STRING, {Value::string("a")}));
    w.set("tokenizer.ggml.merges", Value::make_array(ValueType::STRING, {}));
    expect_error(w, "tokenizer.ggml.tokens", "no token for byte");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.tokens", Value::u32(3));
    expect_error(w, "tokenizer.ggml.tokens", "not an array of strings");
  }
  {
    auto w = base();
    w.set("tokenizer.ggml.model", Value::string("no_vocab"));
    expect_error(w, "tokenizer.ggml.model", "no_vocab");
  }
}

// ---- Hugging Face tokenizers fixture (tests/reference/make_tokenizer_fixture.py) ----

const std::string kFixture = std::string(KTUNE_TEST_DATA) + "/tokenizer/hf_bpe_fixture.json";

TEST(TokenizerHfReference, IdsMatchHuggingFaceTokenizers) {
  if (!std::filesystem::exists(kFixture)) {
    GTEST_SKIP() << "no " << kFixture
                 << ": generate it with `python3 tests/reference/make_tokenizer_fixture.py "
                    "tests/data/tokenizer/hf_bpe_fixture.json` on a machine with Hugging Face "
                    "tokenizers";
  }
  std::ifstream in(kFixture);
  const nlohmann::json j = nlohmann::json::parse(in);
  const auto& meta = j.at("gguf_metadata");
  int checked = 0;
  for (const auto& [pre_name, cases] : j.at("cases").items()) {
    ktune::gguf::Writer w;
    using ktune::gguf::Value;
    using ktune::gguf::ValueType;
    w.set("tokenizer.ggml.model", Value::string("gpt2"));
    w.set("tokenizer.ggml.pre", Value::string(pre_name));
    std::vector<Value> tokens, types, merges;
    for (const auto& s : meta.at("tokens")) tokens.push_back(Value::string(s.get<std::string>()));
    for (const auto& s : meta.at("token_type")) types.push_back(Value::i32(s.get<int32_t>()));
    for (const auto& s : meta.at("merges")) merges.push_back(Value::string(s.get<std::string>()));
    w.set("tokenizer.ggml.tokens", Value::make_array(ValueType::STRING, std::move(tokens)));
    w.set("tokenizer.ggml.token_type", Value::make_array(ValueType::INT32, std::move(types)));
    w.set("tokenizer.ggml.merges", Value::make_array(ValueType::STRING, std::move(merges)));
    w.set("tokenizer.ggml.eos_token_id", Value::u32(meta.at("eos_token_id").get<uint32_t>()));
    const Gguf g = to_gguf(w);
    const Tokenizer t = Tokenizer::from_gguf(g.file);
    for (const auto& c : cases) {
      const std::string text = c.at("text").get<std::string>();
      const auto want = c.at("ids").get<std::vector<int32_t>>();
      EXPECT_EQ(t.encode(text), want) << pre_name << ": `" << text << "`";
      EXPECT_EQ(t.decode(want), c.at("decoded").get<std::string>()) << pre_name << ": " << text;
      ++checked;
    }
  }
  EXPECT_GE(checked, 60);
}

}  // namespace
