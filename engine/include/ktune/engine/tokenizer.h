// Byte-level BPE tokenizer (GPT-2 style, as Qwen2/Qwen3 and DeepSeek-V2/V3 use) built from a
// GGUF file's tokenizer metadata, plus a small synthetic vocabulary for models without one.
//
// Encoding, as Hugging Face tokenizers does it for these models:
//   1. added tokens (GGUF token types CONTROL and USER_DEFINED) are matched in the text first,
//      longest match at the leftmost position, and become their own ids;
//   2. the rest is split into pieces by the pre-tokenizer that tokenizer.ggml.pre names
//      ("qwen2", "deepseek-v3", "deepseek-llm", "gpt-2"; docs/models.md, "Tokenizer");
//   3. each piece's UTF-8 bytes map to GPT-2's printable byte alphabet and are merged pair by
//      pair, lowest merge rank first (leftmost on ties), until no listed merge applies.
// Decoding maps token text back to bytes; StreamDecoder holds back an incomplete UTF-8 sequence
// until the token that completes it arrives. No Unicode normalization is applied (llama.cpp
// applies none either; Qwen's Hugging Face tokenizer applies NFC).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ktune {

namespace gguf {
class File;
class Writer;
struct Value;
}  // namespace gguf

// GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  Undefined = 0,
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

enum class PreTokenizer { Gpt2, Qwen2, DeepseekV3, DeepseekLlm };
const char* pre_tokenizer_name(PreTokenizer p);  // the tokenizer.ggml.pre spelling

// Everything a byte-level BPE vocabulary consists of, as GGUF stores it.
struct VocabData {
  std::vector<std::string> tokens;  // tokenizer.ggml.tokens (byte-level text, added tokens raw)
  std::vector<TokenType> types;     // tokenizer.ggml.token_type (empty: all Normal)
  std::vector<std::string> merges;  // tokenizer.ggml.merges, "left right", rank = index
  PreTokenizer pre = PreTokenizer::Qwen2;
  int32_t bos = -1;  // -1: none
  int32_t eos = -1;
  int32_t eot = -1;
  bool add_bos = false;  // tokenizer.ggml.add_bos_token
};

class Tokenizer {
 public:
  // Validates and indexes `data`; `where` names the source in errors. Throws ktune::Error
  // naming the GGUF key at fault (a merge whose parts or result are not tokens, duplicate
  // tokens, ids out of range, lengths that differ).
  Tokenizer(VocabData data, const std::string& where);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // From tokenizer.ggml.* metadata. Throws ktune::Error naming the file and key when the
  // tokenizer is missing, of an unsupported kind (only "gpt2" byte-level BPE), or malformed.
  static Tokenizer from_gguf(const gguf::File& f);
  // True when the file carries a vocabulary ktune can read (tokenizer.ggml.model present and not
  // "no_vocab"); files written by ktune gen-model carry none.
  static bool gguf_has_vocab(const gguf::File& f);
  // ktune's synthetic vocabulary of exactly `vocab` ids for models without one (synth:,
  // gen-model files): the 256 byte tokens, BPE merges learned from a short embedded English
  // text (as many as fit), unused filler ids, and <|endoftext|> (eos), <|im_start|>,
  // <|im_end|> as the last ids when vocab >= 259. Deterministic. Throws for vocab < 256.
  static Tokenizer synthetic(int64_t vocab);

  // Writes this vocabulary as tokenizer.ggml.* metadata (model "gpt2").
  void write_gguf_metadata(gguf::Writer& w) const;

  // Text -> ids. add_bos prepends bos when the vocabulary asks for it (add_bos_token) and has
  // one; parse_special matches added tokens in the text (Hugging Face's behaviour; off: their
  // text is tokenized as ordinary text).
  std::vector<int32_t> encode(std::string_view text, bool add_bos = true,
                              bool parse_special = true) const;
  // The pre-tokenizer's pieces of `text` (no added-token matching), for tests and tools.
  std::vector<std::string> pre_tokenize(std::string_view text) const;
  // The bytes token `id` stands for (control tokens: their text). Throws for an id out of range.
  std::string token_bytes(int32_t id) const;
  // Ids -> text (bytes joined; an invalid UTF-8 sequence is passed through as is).
  std::string decode(const std::vector<int32_t>& ids) const;

  int64_t size() const;
  const std::string& token_text(int32_t id) const;
  TokenType token_type(int32_t id) const;
  int32_t bos() const;
  int32_t eos() const;
  PreTokenizer pre() const;
  // End of generation: eos, eot, and control tokens named <|endoftext|>, <|im_end|>,
  // <|end▁of▁sentence|> or <|eot_id|>.
  bool is_end_of_generation(int32_t id) const;
  const VocabData& data() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token byte strings into complete UTF-8 text: push() returns what can be
// printed now and keeps up to 3 bytes of a sequence that is not complete yet; finish() returns
// the rest (an incomplete tail becomes U+FFFD). Bytes that can never be valid UTF-8 become
// U+FFFD, so what is printed is always valid UTF-8.
class StreamDecoder {
 public:
  std::string push(std::string_view bytes);
  std::string finish();

 private:
  std::string pending_;
};

// UTF-8 helpers (exposed for tests). decode_utf8 maps each invalid byte to U+FFFD.
std::vector<uint32_t> decode_utf8(std::string_view s);
void append_utf8(std::string& out, uint32_t cp);

}  // namespace ktune
