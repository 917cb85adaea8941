// Byte-level BPE tokenizer (see tokenizer.h). The pre-tokenizers are hand-written matchers, one
// function per regular expression of the Hugging Face tokenizer.json they stand for (the
// expressions are quoted above each); a Split with behaviour "isolated" keeps both the matches
// and the text between them as pieces, and a sequence of splits applies each to every piece the
// previous one produced, so no match crosses a piece boundary (a lookahead at a piece's end sees
// the end of the text).
#include "ktune/engine/tokenizer.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <limits>
#include <map>
#include <queue>
#include <unordered_set>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"

namespace ktune {
namespace {

// ---------------------------------------------------------------------------------- unicode --

struct CpRange {
  uint32_t first, last;
  uint8_t cls;
};
constexpr CpRange kClassRanges[] = {
#include "unicode_ranges.inc"
};
enum Class : uint8_t {
  kOther = 0,
  kCased = 1,
  kLetterOther = 2,
  kMark = 3,
  kNumber = 4,
  kPunct = 5,
  kSymbol = 6
};

uint8_t cp_class(uint32_t cp) {
  if (cp < 0x80) {
    // Fast path for ASCII (the table's answer, precomputed).
    static const std::array<uint8_t, 128> ascii = [] {
      std::array<uint8_t, 128> a{};
      for (const CpRange& r : kClassRanges) {
        for (uint32_t c = r.first; c <= r.last && c < 128; ++c) a[c] = r.cls;
      }
      return a;
    }();
    return ascii[cp];
  }
  size_t lo = 0, hi = sizeof(kClassRanges) / sizeof(kClassRanges[0]);
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kClassRanges[mid].last < cp) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo < sizeof(kClassRanges) / sizeof(kClassRanges[0]) && kClassRanges[lo].first <= cp) {
    return kClassRanges[lo].cls;
  }
  return kOther;
}

bool is_letter(uint32_t cp) {
  const uint8_t c = cp_class(cp);
  return c == kCased || c == kLetterOther;
}
bool is_number(uint32_t cp) { return cp_class(cp) == kNumber; }
bool is_mark(uint32_t cp) { return cp_class(cp) == kMark; }
bool is_punct_or_symbol(uint32_t cp) {
  const uint8_t c = cp_class(cp);
  return c == kPunct || c == kSymbol;
}
// \s: the Unicode White_Space property (what the regex engines of Hugging Face tokenizers use).
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}
bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }
bool in_ranges(uint32_t cp, const std::pair<uint32_t, uint32_t>* r, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (cp >= r[i].first && cp <= r[i].second) return true;
  }
  return false;
}
uint32_t ascii_lower(uint32_t cp) { return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp; }
bool is_ascii_letter(uint32_t cp) { return ascii_lower(cp) >= 'a' && ascii_lower(cp) <= 'z'; }

// Text as code points, each with the byte offset where it starts (invalid bytes are one "code
// point" each, U+FFFD, so pieces always cut the original bytes).
struct CodePoints {
  std::vector<uint32_t> cp;
  std::vector<size_t> at;  // at[i]: byte offset of cp[i]; at[size] = total bytes
};

CodePoints to_code_points(std::string_view s) {
  CodePoints out;
  out.cp.reserve(s.size());
  out.at.reserve(s.size() + 1);
  size_t i = 0;
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  while (i < s.size()) {
    out.at.push_back(i);
    const unsigned char c = b[i];
    int len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    }
    bool ok = len > 0 && i + static_cast<size_t>(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      ok = (b[i + k] & 0xC0) == 0x80;
      cp = (cp << 6) | (b[i + k] & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are invalid too.
    if (ok) {
      static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
      ok = cp >= kMin[len] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    }
    if (!ok) {
      out.cp.push_back(0xFFFD);
      i += 1;
    } else {
      out.cp.push_back(cp);
      i += static_cast<size_t>(len);
    }
  }
  out.at.push_back(s.size());
  return out;
}

// ----------------------------------------------------------------------------- pre-tokenizers --
// A matcher returns the length (in code points) of the match starting at i within [i, e), or 0.
using Matcher = size_t (*)(const uint32_t* c, size_t i, size_t e);

size_t run(const uint32_t* c, size_t i, size_t e, bool (*pred)(uint32_t)) {
  size_t j = i;
  while (j < e && pred(c[j])) ++j;
  return j - i;
}

// The shared tail of the GPT-2 family: `\s*[\r\n]+|\s+(?!\S)|\s+` (with_newlines) or
// `\s+(?!\S)|\s+`.
size_t match_spaces(const uint32_t* c, size_t i, size_t e, bool with_newlines) {
  if (!is_space(c[i])) return 0;
  const size_t j = i + run(c, i, e, is_space);
  if (with_newlines) {
    // \s*[\r\n]+ backs off from the whole run to end just after its last newline.
    for (size_t k = j; k > i; --k) {
      if (is_newline(c[k - 1])) return k - i;
    }
  }
  if (j == e) return j - i;               // \s+(?!\S) at the end of the piece
  return std::max<size_t>(j - i - 1, 1);  // leave the last space to the next word; or \s+
}

// `'s|'t|'re|'ve|'m|'ll|'d` (case-insensitive when ci).
size_t match_contraction(const uint32_t* c, size_t i, size_t e, bool ci) {
  if (c[i] != '\'' || i + 1 >= e) return 0;
  auto low = [&](uint32_t x) { return ci ? ascii_lower(x) : x; };
  const uint32_t a = low(c[i + 1]);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 < e) {
    const uint32_t b = low(c[i + 2]);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

bool not_space_letter_number(uint32_t x) { return !is_space(x) && !is_letter(x) && !is_number(x); }

// Qwen2 / Qwen3:
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+
size_t match_qwen2(const uint32_t* c, size_t i, size_t e) {
  if (size_t n = match_contraction(c, i, e, true)) return n;
  if (is_letter(c[i])) return run(c, i, e, is_letter);
  if (!is_newline(c[i]) && !is_number(c[i]) && i + 1 < e && is_letter(c[i + 1])) {
    return 1 + run(c, i + 1, e, is_letter);
  }
  if (is_number(c[i])) return 1;
  size_t j = i;
  if (c[i] == ' ' && i + 1 < e && not_space_letter_number(c[i + 1])) j = i + 1;
  if (not_space_letter_number(c[j])) {
    j += run(c, j, e, not_space_letter_number);
    j += run(c, j, e, is_newline);
    return j - i;
  }
  return match_spaces(c, i, e, true);
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t match_gpt2(const uint32_t* c, size_t i, size_t e) {
  if (size_t n = match_contraction(c, i, e, false)) return n;
  const size_t j = c[i] == ' ' && i + 1 < e ? i + 1 : i;
  for (auto pred : {is_letter, is_number, not_space_letter_number}) {
    // " ?X+": the optional space only when X follows it.
    if (pred(c[j])) return j - i + run(c, j, e, pred);
    if (j != i && pred(c[i])) return run(c, i, e, pred);
  }
  return match_spaces(c, i, e, false);
}

// DeepSeek-V3 (three splits in sequence): \p{N}{1,3}
size_t match_ds3_digits(const uint32_t* c, size_t i, size_t e) {
  return std::min<size_t>(3, run(c, i, e, is_number));
}
// [一-龥぀-ゟ゠-ヿ]+  (CJK ideographs U+4E00..U+9FA5, hiragana, katakana)
bool is_ds3_cjk(uint32_t x) {
  return (x >= 0x4E00 && x <= 0x9FA5) || (x >= 0x3040 && x <= 0x309F) ||
         (x >= 0x30A0 && x <= 0x30FF);
}
size_t match_ds3_cjk(const uint32_t* c, size_t i, size_t e) { return run(c, i, e, is_ds3_cjk); }
// [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|
// ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
bool is_ascii_punct(uint32_t x) {
  return (x >= 0x21 && x <= 0x2F) || (x >= 0x3A && x <= 0x40) || (x >= 0x5B && x <= 0x60) ||
         (x >= 0x7B && x <= 0x7E);
}
bool is_letter_or_mark(uint32_t x) { return is_letter(x) || is_mark(x); }
size_t match_ds3_words(const uint32_t* c, size_t i, size_t e) {
  if (is_ascii_punct(c[i]) && i + 1 < e && is_ascii_letter(c[i + 1])) {
    return 1 + run(c, i + 1, e, is_ascii_letter);
  }
  if (is_letter_or_mark(c[i])) return run(c, i, e, is_letter_or_mark);
  if (!is_newline(c[i]) && !is_punct_or_symbol(c[i]) && i + 1 < e && is_letter_or_mark(c[i + 1])) {
    return 1 + run(c, i + 1, e, is_letter_or_mark);
  }
  size_t j = i;
  if (c[i] == ' ' && i + 1 < e && is_punct_or_symbol(c[i + 1])) j = i + 1;
  if (is_punct_or_symbol(c[j])) {
    j += run(c, j, e, is_punct_or_symbol);
    j += run(c, j, e, is_newline);
    return j - i;
  }
  return match_spaces(c, i, e, true);
}

// DeepSeek-LLM (DeepSeek-V2 and the first DeepSeek chat models), six splits in sequence:
// [\r\n] | \s?[LETTERS]+ | \s?[PUNCT]+ | \s+$ | [CJK]+ | \p{N}+, where LETTERS and PUNCT are the
// explicit code point lists of DeepSeek's tokenizer.json.
constexpr std::pair<uint32_t, uint32_t> kDsLlmLetters[] = {
    {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},
    {0xD8, 0xF6},       {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},
    {0x295, 0x2AF},     {0x370, 0x373},     {0x376, 0x377},     {0x37B, 0x37D},
    {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},     {0x38C, 0x38C},
    {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
    {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},
    {0x1C90, 0x1CBA},   {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},
    {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},   {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},   {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},
    {0x1FD6, 0x1FDB},   {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},
    {0x2102, 0x2102},   {0x2107, 0x2107},   {0x210A, 0x2113},   {0x2115, 0x2115},
    {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},   {0x2128, 0x2128},
    {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
    {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},
    {0x2C7E, 0x2CE4},   {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},
    {0xA680, 0xA69B},   {0xA722, 0xA76F},   {0xA771, 0xA787},   {0xA78B, 0xA78E},
    {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},   {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};
constexpr std::pair<uint32_t, uint32_t> kDsLlmPunct[] = {
    {0x21, 0x2F},     {0x3A, 0x7E},     {0xFF01, 0xFF0F},
    {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002},
};
constexpr std::pair<uint32_t, uint32_t> kDsLlmCjk[] = {
    {0x4E00, 0x9FA5}, {0x0800, 0x4E00}, {0xAC00, 0xD7FF}};

bool is_dsllm_letter(uint32_t x) {
  return in_ranges(x, kDsLlmLetters, sizeof(kDsLlmLetters) / sizeof(kDsLlmLetters[0]));
}
bool is_dsllm_punct(uint32_t x) {
  return in_ranges(x, kDsLlmPunct, sizeof(kDsLlmPunct) / sizeof(kDsLlmPunct[0]));
}
bool is_dsllm_cjk(uint32_t x) {
  return in_ranges(x, kDsLlmCjk, sizeof(kDsLlmCjk) / sizeof(kDsLlmCjk[0]));
}
size_t match_dsllm_newline(const uint32_t* c, size_t i, size_t) { return is_newline(c[i]); }
size_t space_then(const uint32_t* c, size_t i, size_t e, bool (*pred)(uint32_t)) {
  const size_t j = is_space(c[i]) && i + 1 < e && pred(c[i + 1]) ? i + 1 : i;
  return pred(c[j]) ? j - i + run(c, j, e, pred) : 0;
}
size_t match_dsllm_letters(const uint32_t* c, size_t i, size_t e) {
  return space_then(c, i, e, is_dsllm_letter);
}
size_t match_dsllm_punct(const uint32_t* c, size_t i, size_t e) {
  return space_then(c, i, e, is_dsllm_punct);
}
size_t match_dsllm_trailing_space(const uint32_t* c, size_t i, size_t e) {
  const size_t n = run(c, i, e, is_space);
  return n > 0 && i + n == e ? n : 0;
}
size_t match_dsllm_cjk(const uint32_t* c, size_t i, size_t e) { return run(c, i, e, is_dsllm_cjk); }
size_t match_numbers(const uint32_t* c, size_t i, size_t e) { return run(c, i, e, is_number); }

std::vector<Matcher> matchers_of(PreTokenizer p) {
  switch (p) {
    case PreTokenizer::Gpt2:
      return {match_gpt2};
    case PreTokenizer::Qwen2:
      return {match_qwen2};
    case PreTokenizer::DeepseekV3:
      return {match_ds3_digits, match_ds3_cjk, match_ds3_words};
    case PreTokenizer::DeepseekLlm:
      return {match_dsllm_newline,        match_dsllm_letters, match_dsllm_punct,
              match_dsllm_trailing_space, match_dsllm_cjk,     match_numbers};
  }
  return {match_gpt2};
}

// Pieces as code point ranges [first, second).
using Spans = std::vector<std::pair<size_t, size_t>>;

Spans split_isolated(const std::vector<uint32_t>& cp, const Spans& in, Matcher m) {
  Spans out;
  for (const auto& [b, e] : in) {
    size_t gap = b;
    size_t i = b;
    while (i < e) {
      const size_t n = m(cp.data(), i, e);
      if (n == 0) {
        ++i;
        continue;
      }
      if (gap < i) out.emplace_back(gap, i);
      out.emplace_back(i, i + n);
      i += n;
      gap = i;
    }
    if (gap < e) out.emplace_back(gap, e);
  }
  return out;
}

// -------------------------------------------------------------------------------- byte level --

// GPT-2's reversible byte -> printable code point map: printable Latin-1 bytes stand for
// themselves, the other 68 bytes take 256, 257, ... in byte order.
struct ByteAlphabet {
  std::array<uint32_t, 256> to_cp{};
  std::unordered_map<uint32_t, uint8_t> to_byte;
  std::array<std::string, 256> text;  // UTF-8 of to_cp
  ByteAlphabet() {
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_cp[b] = printable ? b : next++;
      to_byte[to_cp[b]] = static_cast<uint8_t>(b);
      append_utf8(text[b], to_cp[b]);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// A short English text the synthetic vocabulary learns its merges from.
constexpr const char* kSyntheticCorpus =
    "The model reads the prompt, and then it writes the answer one token at a time. "
    "Each token is a piece of a word: the tokenizer splits the text into words, numbers and "
    "spaces, and then it joins the bytes of every word in the order it learned. "
    "A mixture of experts has many experts in every layer, and the router sends each token to "
    "the best of them. The experts that are used often can live on the GPU, and the others stay "
    "on the CPU, where the memory is large but slower. This is what the placement search is "
    "for: it tries many placements and keeps the one that is fastest for the work you want to "
    "run. When the text that comes out looks like nonsense, remember that the weights of this "
    "model are random: it has never seen any text, so it cannot say anything that means "
    "something. The time it takes is still the time a real model of the same shape would take. "
    "There are 12 layers, 128 experts and 8 experts per token in this example; there were "
    "more in the other one. We measure the speed in tokens per second, and the memory in bytes. "
    "It's the same for you and for me: we'll see what they've done, and I'd say that's fine.";

}  // namespace

// ------------------------------------------------------------------------------- Tokenizer --

const char* pre_tokenizer_name(PreTokenizer p) {
  switch (p) {
    case PreTokenizer::Gpt2:
      return "gpt-2";
    case PreTokenizer::Qwen2:
      return "qwen2";
    case PreTokenizer::DeepseekV3:
      return "deepseek-v3";
    case PreTokenizer::DeepseekLlm:
      return "deepseek-llm";
  }
  return "gpt-2";
}

struct Tokenizer::Impl {
  VocabData d;
  std::vector<Matcher> matchers;
  std::unordered_map<std::string, int32_t> id_of;
  std::array<int32_t, 256> byte_id{};
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  std::unordered_map<uint64_t, Merge> merges;
  // Added tokens by first byte, longest first.
  std::array<std::vector<int32_t>, 256> added_by_byte;
  std::unordered_set<int32_t> eog;

  void bpe(const std::string& piece, std::vector<int32_t>& out) const {
    // Merge the adjacent pair with the lowest rank, leftmost on ties, until none applies. The
    // symbols form a linked list over their byte positions; candidate pairs wait in a heap keyed
    // (rank, position of the left symbol) and are checked when popped (a merge may have
    // consumed or changed either side), so a piece of n bytes costs O(n log n), not O(n^2) (a
    // long whitespace run or an unbroken blob is one piece).
    struct Sym {
      int32_t id;
      int32_t prev, next;  // -1: none
    };
    const int32_t n = static_cast<int32_t>(piece.size());
    std::vector<Sym> sym(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) {
      sym[size_t(i)] = {byte_id[static_cast<unsigned char>(piece[size_t(i)])], i - 1,
                        i + 1 < n ? i + 1 : -1};
    }
    struct Cand {
      int32_t rank, left, left_id, right_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int32_t left) {
      if (left < 0 || sym[size_t(left)].next < 0) return;
      const int32_t a = sym[size_t(left)].id, b = sym[size_t(sym[size_t(left)].next)].id;
      const auto it = merges.find(pair_key(a, b));
      if (it != merges.end()) heap.push({it->second.rank, left, a, b});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    std::vector<bool> dead(static_cast<size_t>(n), false);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      Sym& l = sym[size_t(c.left)];
      if (dead[size_t(c.left)] || l.next < 0 || l.id != c.left_id ||
          sym[size_t(l.next)].id != c.right_id) {
        continue;  // stale: one side was merged since
      }
      const int32_t r = l.next;
      l.id = merges.at(pair_key(c.left_id, c.right_id)).result;
      dead[size_t(r)] = true;
      l.next = sym[size_t(r)].next;
      if (l.next >= 0) sym[size_t(l.next)].prev = c.left;
      push(l.prev);
      push(c.left);
    }
    for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = sym[size_t(i)].next)
      out.push_back(sym[size_t(i)].id);
  }

  std::vector<std::string> pieces(std::string_view text) const {
    const CodePoints cps = to_code_points(text);
    Spans spans;
    if (!cps.cp.empty()) spans.emplace_back(0, cps.cp.size());
    for (Matcher m : matchers) spans = split_isolated(cps.cp, spans, m);
    std::vector<std::string> out;
    out.reserve(spans.size());
    for (const auto& [b, e] : spans) {
      out.emplace_back(text.substr(cps.at[b], cps.at[e] - cps.at[b]));
    }
    return out;
  }

  void encode_plain(std::string_view text, std::vector<int32_t>& out) const {
    for (const std::string& p : pieces(text)) bpe(p, out);
  }
};

namespace {

[[noreturn]] void bad_key(const std::string& where, const std::string& key,
                          const std::string& problem) {
  throw Error(where, "metadata key " + key + ": " + problem,
              "use a GGUF written by llama.cpp's converter (or ktune) with a complete "
              "byte-level BPE vocabulary");
}

}  // namespace

Tokenizer::Tokenizer(VocabData data, const std::string& where) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.d = std::move(data);
  VocabData& d = m.d;
  const int64_t n = static_cast<int64_t>(d.tokens.size());
  if (n == 0) bad_key(where, "tokenizer.ggml.tokens", "is empty");
  if (n > std::numeric_limits<int32_t>::max()) bad_key(where, "tokenizer.ggml.tokens", "too long");
  if (d.types.empty()) d.types.assign(d.tokens.size(), TokenType::Normal);
  if (d.types.size() != d.tokens.size()) {
    bad_key(where, "tokenizer.ggml.token_type",
            "has " + std::to_string(d.types.size()) + " entries but tokenizer.ggml.tokens has " +
                std::to_string(n));
  }
  m.id_of.reserve(d.tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    if (d.tokens[i].empty() && d.types[i] != TokenType::Unused) {
      bad_key(where, "tokenizer.ggml.tokens", "token " + std::to_string(i) + " is empty");
    }
    m.id_of.emplace(d.tokens[i], static_cast<int32_t>(i));  // a duplicate keeps the first id
  }
  const ByteAlphabet& ab = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    const auto it = m.id_of.find(ab.text[b]);
    if (it == m.id_of.end()) {
      char hex[8];
      std::snprintf(hex, sizeof(hex), "0x%02X", b);
      bad_key(where, "tokenizer.ggml.tokens",
              std::string("has no token for byte ") + hex + " (`" + ab.text[b] +
                  "`); a byte-level BPE vocabulary has all 256");
    }
    m.byte_id[b] = it->second;
  }
  m.merges.reserve(d.merges.size());
  for (size_t r = 0; r < d.merges.size(); ++r) {
    const std::string& s = d.merges[r];
    const size_t sp = s.find(' ', 1);
    const std::string at = "entry " + std::to_string(r) + " (`" + s + "`)";
    if (sp == std::string::npos || sp + 1 >= s.size() || s.find(' ', sp + 1) != std::string::npos) {
      bad_key(where, "tokenizer.ggml.merges", at + " is not two tokens separated by one space");
    }
    const std::string left = s.substr(0, sp), right = s.substr(sp + 1);
    const auto a = m.id_of.find(left), b = m.id_of.find(right), c = m.id_of.find(left + right);
    if (a == m.id_of.end() || b == m.id_of.end() || c == m.id_of.end()) {
      bad_key(where, "tokenizer.ggml.merges",
              at + ": `" +
                  (a == m.id_of.end()   ? left
                   : b == m.id_of.end() ? right
                                        : left + right) +
                  "` is not a token");
    }
    // A repeated pair keeps its first (lowest) rank, as Hugging Face does.
    m.merges.emplace(pair_key(a->second, b->second),
                     Impl::Merge{static_cast<int32_t>(r), c->second});
  }
  auto check_id = [&](int32_t id, const char* key) {
    if (id < -1 || id >= n) {
      bad_key(where, key,
              std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(n) + ")");
    }
  };
  check_id(d.bos, "tokenizer.ggml.bos_token_id");
  check_id(d.eos, "tokenizer.ggml.eos_token_id");
  check_id(d.eot, "tokenizer.ggml.eot_token_id");
  m.matchers = matchers_of(d.pre);
  for (int64_t i = 0; i < n; ++i) {
    const TokenType t = d.types[i];
    if ((t == TokenType::Control || t == TokenType::UserDefined) && !d.tokens[i].empty()) {
      m.added_by_byte[static_cast<unsigned char>(d.tokens[i][0])].push_back(
          static_cast<int32_t>(i));
    }
    if (t == TokenType::Control) {
      const std::string& s = d.tokens[i];
      if (s == "<|endoftext|>" || s == "<|im_end|>" || s == "<|eot_id|>" ||
          s == "<\xEF\xBD\x9C"
               "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>") {
        m.eog.insert(static_cast<int32_t>(i));
      }
    }
  }
  for (auto& v : m.added_by_byte) {
    std::stable_sort(v.begin(), v.end(),
                     [&](int32_t a, int32_t b) { return d.tokens[a].size() > d.tokens[b].size(); });
  }
  for (int32_t id : {d.eos, d.eot}) {
    if (id >= 0) m.eog.insert(id);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

bool Tokenizer::gguf_has_vocab(const gguf::File& f) {
  const gguf::Value* v = f.find("tokenizer.ggml.model");
  return v != nullptr && !(v->type == gguf::ValueType::STRING && v->s == "no_vocab");
}

Tokenizer Tokenizer::from_gguf(const gguf::File& f) {
  const std::string where = f.path();
  const gguf::Value* model = f.find("tokenizer.ggml.model");
  if (model == nullptr || (model->type == gguf::ValueType::STRING && model->s == "no_vocab")) {
    throw Error(
        where,
        "metadata key tokenizer.ggml.model: " + std::string(model ? "is \"no_vocab\"" : "missing") +
            " (the file carries no vocabulary)",
        "use a GGUF with its tokenizer (llama.cpp's converter writes it), or pass token "
        "ids");
  }
  if (model->type != gguf::ValueType::STRING) {
    bad_key(where, "tokenizer.ggml.model", "is not a string");
  }
  if (model->s != "gpt2") {
    throw Error(where,
                "metadata key tokenizer.ggml.model: \"" + model->s +
                    "\" tokenizers are not supported (ktune reads byte-level BPE, \"gpt2\", as "
                    "Qwen2/Qwen3 and DeepSeek use)",
                "use a model with a byte-level BPE vocabulary, or pass token ids");
  }
  VocabData d;
  if (const gguf::Value* pre = f.find("tokenizer.ggml.pre")) {
    if (pre->type != gguf::ValueType::STRING)
      bad_key(where, "tokenizer.ggml.pre", "is not a string");
    if (pre->s == "qwen2") {
      d.pre = PreTokenizer::Qwen2;
    } else if (pre->s == "deepseek-v3") {
      d.pre = PreTokenizer::DeepseekV3;
    } else if (pre->s == "deepseek-llm") {
      d.pre = PreTokenizer::DeepseekLlm;
    } else if (pre->s == "gpt2" || pre->s == "gpt-2") {
      d.pre = PreTokenizer::Gpt2;
    } else {
      throw Error(
          where,
          "metadata key tokenizer.ggml.pre: pre-tokenizer \"" + pre->s + "\" is not supported",
          "supported: qwen2, deepseek-v3, deepseek-llm, gpt-2");
    }
  } else {
    // llama.cpp falls back to a split of its own ("default"), which ktune does not implement.
    bad_key(where, "tokenizer.ggml.pre",
            "missing (supported: qwen2, deepseek-v3, deepseek-llm, gpt-2)");
  }
  auto strings = [&](const char* key, bool required) {
    std::vector<std::string> out;
    const gguf::Value* v = f.find(key);
    if (v == nullptr) {
      if (required) bad_key(where, key, "missing");
      return out;
    }
    if (v->type != gguf::ValueType::ARRAY || v->array_type != gguf::ValueType::STRING) {
      bad_key(where, key, "is not an array of strings");
    }
    out.reserve(v->array.size());
    for (const gguf::Value& e : v->array) out.push_back(e.s);
    return out;
  };
  d.tokens = strings("tokenizer.ggml.tokens", true);
  d.merges = strings("tokenizer.ggml.merges", true);
  if (const gguf::Value* v = f.find("tokenizer.ggml.token_type")) {
    if (v->type != gguf::ValueType::ARRAY) {
      bad_key(where, "tokenizer.ggml.token_type", "is not an array of integers");
    }
    d.types.reserve(v->array.size());
    for (size_t i = 0; i < v->array.size(); ++i) {
      const gguf::Value& e = v->array[i];
      const int64_t t = !e.is_integer() ? -1
                        : (e.type == gguf::ValueType::INT8 || e.type == gguf::ValueType::INT16 ||
                           e.type == gguf::ValueType::INT32 || e.type == gguf::ValueType::INT64)
                            ? e.i
                            : static_cast<int64_t>(e.u);
      if (t < 0 || t > 6) {
        bad_key(where, "tokenizer.ggml.token_type",
                "entry " + std::to_string(i) + " is not a token type (0..6)");
      }
      d.types.push_back(static_cast<TokenType>(t));
    }
  }
  auto id = [&](const char* key) -> int32_t {
    const gguf::Value* v = f.find(key);
    if (v == nullptr) return -1;
    if (!v->is_integer()) bad_key(where, key, "is not an integer");
    const bool is_signed = v->type == gguf::ValueType::INT8 || v->type == gguf::ValueType::INT16 ||
                           v->type == gguf::ValueType::INT32 || v->type == gguf::ValueType::INT64;
    const int64_t x = is_signed ? v->i : static_cast<int64_t>(std::min<uint64_t>(v->u, INT64_MAX));
    if (x < 0 || x >= static_cast<int64_t>(d.tokens.size())) {
      bad_key(where, key,
              std::to_string(x) + " is outside the vocabulary [0, " +
                  std::to_string(d.tokens.size()) + ")");
    }
    return static_cast<int32_t>(x);
  };
  d.bos = id("tokenizer.ggml.bos_token_id");
  d.eos = id("tokenizer.ggml.eos_token_id");
  d.eot = id("tokenizer.ggml.eot_token_id");
  if (const gguf::Value* v = f.find("tokenizer.ggml.add_bos_token")) {
    if (v->type != gguf::ValueType::BOOL) {
      bad_key(where, "tokenizer.ggml.add_bos_token", "is not a bool");
    }
    d.add_bos = v->b;
  }
  return Tokenizer(std::move(d), where);
}

Tokenizer Tokenizer::synthetic(int64_t vocab) {
  if (vocab < 256) {
    throw Error("synthetic vocabulary",
                "a model of " + std::to_string(vocab) + " tokens cannot hold the 256 byte tokens",
                "use a model with a vocabulary of at least 256");
  }
  VocabData d;
  d.pre = PreTokenizer::Qwen2;
  const ByteAlphabet& ab = byte_alphabet();
  for (int b = 0; b < 256; ++b) d.tokens.push_back(ab.text[b]);
  const std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  const int64_t n_special = vocab >= 256 + static_cast<int64_t>(specials.size())
                                ? static_cast<int64_t>(specials.size())
                                : 0;
  const int64_t merge_budget = vocab - 256 - n_special;

  // Learn merges: words of the corpus (pre-tokenized as Qwen2 does) with their counts; merge the
  // most frequent adjacent pair (ties: lowest ids), until the budget is spent or every word is
  // one token.
  std::map<std::string, int64_t> word_count;
  {
    VocabData probe;
    probe.tokens = d.tokens;
    const Tokenizer bytes_only(probe, "synthetic vocabulary");
    for (const std::string& p : bytes_only.pre_tokenize(kSyntheticCorpus)) ++word_count[p];
  }
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [w, c] : word_count) {
    std::vector<int32_t> syms;
    for (unsigned char b : w) syms.push_back(b);
    words.emplace_back(std::move(syms), c);
  }
  std::unordered_map<std::string, int32_t> id_of;
  for (int32_t i = 0; i < 256; ++i) id_of.emplace(d.tokens[i], i);
  while (static_cast<int64_t>(d.merges.size()) < merge_budget) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (const auto& [syms, c] : words) {
      for (size_t i = 0; i + 1 < syms.size(); ++i) pairs[{syms[i], syms[i + 1]}] += c;
    }
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_count = 0;
    for (const auto& [p, c] : pairs) {
      if (c > best_count) {
        best = p;
        best_count = c;
      }
    }
    if (best.first < 0) break;
    const std::string merged = d.tokens[best.first] + d.tokens[best.second];
    int32_t id;
    const auto it = id_of.find(merged);
    if (it != id_of.end()) {
      id = it->second;
    } else {
      id = static_cast<int32_t>(d.tokens.size());
      d.tokens.push_back(merged);
      id_of.emplace(merged, id);
    }
    d.merges.push_back(d.tokens[best.first] + " " + d.tokens[best.second]);
    for (auto& [syms, c] : words) {
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        if (syms[i] == best.first && syms[i + 1] == best.second) {
          syms[i] = id;
          syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(i) + 1);
        }
      }
    }
    if (static_cast<int64_t>(d.tokens.size()) >= vocab - n_special) break;
  }
  // The ids left over hold runs of learned tokens, chosen by a fixed pseudo-random sequence
  // (no merge produces them, so encoding never does; a random model that picks them prints
  // word-like fragments). Without learned tokens the pairs are of bytes.
  const int32_t learned_first = d.tokens.size() > 256 ? 256 : 0;
  const uint64_t pool = d.tokens.size() - static_cast<uint64_t>(learned_first);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next_index = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<size_t>(learned_first + static_cast<int64_t>((state >> 33) % pool));
  };
  int64_t tries = 0;
  while (static_cast<int64_t>(d.tokens.size()) < vocab - n_special) {
    // Two or three learned tokens (pairs alone run out: ~300 learned tokens give 90 000).
    std::string t = d.tokens[next_index()] + d.tokens[next_index()];
    if ((state >> 20) & 1) t += d.tokens[next_index()];
    if (++tries > 8 * vocab) t = "<|ktune_filler_" + std::to_string(d.tokens.size()) + "|>";
    if (id_of.emplace(t, static_cast<int32_t>(d.tokens.size())).second) {
      d.tokens.push_back(std::move(t));
    }
  }
  d.types.assign(d.tokens.size(), TokenType::Normal);
  for (int64_t i = 0; i < n_special; ++i) {
    d.tokens.push_back(specials[static_cast<size_t>(i)]);
    d.types.push_back(TokenType::Control);
  }
  if (n_special > 0) d.eos = static_cast<int32_t>(vocab - n_special);
  return Tokenizer(std::move(d), "synthetic vocabulary");
}

void Tokenizer::write_gguf_metadata(gguf::Writer& w) const {
  const VocabData& d = impl_->d;
  using gguf::Value;
  using gguf::ValueType;
  w.set("tokenizer.ggml.model", Value::string("gpt2"));
  w.set("tokenizer.ggml.pre", Value::string(pre_tokenizer_name(d.pre)));
  std::vector<Value> tokens, types, merges;
  tokens.reserve(d.tokens.size());
  for (const std::string& t : d.tokens) tokens.push_back(Value::string(t));
  for (TokenType t : d.types) types.push_back(Value::i32(static_cast<int32_t>(t)));
  for (const std::string& m : d.merges) merges.push_back(Value::string(m));
  w.set("tokenizer.ggml.tokens", Value::make_array(ValueType::STRING, std::move(tokens)));
  w.set("tokenizer.ggml.token_type", Value::make_array(ValueType::INT32, std::move(types)));
  w.set("tokenizer.ggml.merges", Value::make_array(ValueType::STRING, std::move(merges)));
  if (d.bos >= 0) w.set("tokenizer.ggml.bos_token_id", Value::u32(static_cast<uint32_t>(d.bos)));
  if (d.eos >= 0) w.set("tokenizer.ggml.eos_token_id", Value::u32(static_cast<uint32_t>(d.eos)));
  if (d.eot >= 0) w.set("tokenizer.ggml.eot_token_id", Value::u32(static_cast<uint32_t>(d.eot)));
  w.set("tokenizer.ggml.add_bos_token", Value::boolean(d.add_bos));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  if (add_bos && m.d.add_bos && m.d.bos >= 0) out.push_back(m.d.bos);
  size_t start = 0;  // start of the text not yet encoded
  size_t i = 0;
  while (parse_special && i < text.size()) {
    int32_t hit = -1;
    for (int32_t id : m.added_by_byte[static_cast<unsigned char>(text[i])]) {
      const std::string& t = m.d.tokens[id];
      if (text.compare(i, t.size(), t) == 0) {
        hit = id;  // longest first
        break;
      }
    }
    if (hit < 0) {
      ++i;
      continue;
    }
    m.encode_plain(text.substr(start, i - start), out);
    out.push_back(hit);
    i += m.d.tokens[hit].size();
    start = i;
  }
  m.encode_plain(text.substr(start), out);
  return out;
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  return impl_->pieces(text);
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const VocabData& d = impl_->d;
  if (id < 0 || id >= static_cast<int64_t>(d.tokens.size())) {
    throw Error("token " + std::to_string(id),
                "outside the vocabulary [0, " + std::to_string(d.tokens.size()) + ")",
                "pass token ids the model knows");
  }
  const std::string& t = d.tokens[id];
  switch (d.types[id]) {
    case TokenType::Control:
    case TokenType::UserDefined:
      return t;
    case TokenType::Byte:
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
          std::isxdigit(static_cast<unsigned char>(t[3])) &&
          std::isxdigit(static_cast<unsigned char>(t[4]))) {
        return std::string(1, static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
      }
      return t;
    default:
      break;
  }
  const ByteAlphabet& ab = byte_alphabet();
  std::string out;
  for (uint32_t cp : to_code_points(t).cp) {
    const auto it = ab.to_byte.find(cp);
    if (it != ab.to_byte.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      append_utf8(out, cp);  // not a byte-level symbol: keep the character
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes(id);
  return out;
}

int64_t Tokenizer::size() const { return static_cast<int64_t>(impl_->d.tokens.size()); }
const std::string& Tokenizer::token_text(int32_t id) const { return impl_->d.tokens.at(id); }
TokenType Tokenizer::token_type(int32_t id) const { return impl_->d.types.at(id); }
int32_t Tokenizer::bos() const { return impl_->d.bos; }
int32_t Tokenizer::eos() const { return impl_->d.eos; }
PreTokenizer Tokenizer::pre() const { return impl_->d.pre; }
bool Tokenizer::is_end_of_generation(int32_t id) const { return impl_->eog.count(id) > 0; }
const VocabData& Tokenizer::data() const { return impl_->d; }

// ---------------------------------------------------------------------------------- UTF-8 --

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::vector<uint32_t> decode_utf8(std::string_view s) { return to_code_points(s).cp; }

namespace {
// Length of the UTF-8 sequence a lead byte announces (0: not a lead byte).
int utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}
}  // namespace

std::string StreamDecoder::push(std::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  // Everything up to the start of a trailing sequence that may still be completed is final.
  size_t keep = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const auto c = static_cast<unsigned char>(pending_[pending_.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const int len = utf8_len(c);
    if (len > static_cast<int>(back)) keep = pending_.size() - back;
    break;
  }
  std::string out;
  for (uint32_t cp : decode_utf8(std::string_view(pending_).substr(0, keep))) {
    append_utf8(out, cp);
  }
  pending_.erase(0, keep);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out;
  for (uint32_t cp : decode_utf8(pending_)) append_utf8(out, cp);
  pending_.clear();
  return out;
}

}  // namespace ktune
