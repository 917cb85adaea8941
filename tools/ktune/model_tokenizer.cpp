#include "model_tokenizer.h"

#include <filesystem>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"
#include "ktune/engine/synthetic.h"

namespace ktune::cli {
namespace {

ModelTokenizer synthetic_for(int64_t vocab, const std::string& why) {
  ModelTokenizer m{Tokenizer::synthetic(vocab), true,
                   "ktune's synthetic vocabulary (" + why +
                       "; byte tokens + merges learned from a short English text)"};
  return m;
}

// The model's vocabulary size from its GGUF metadata (<arch>.vocab_size, else the embedding's
// rows), -1 when neither is there.
int64_t gguf_model_vocab(const gguf::File& f) {
  if (const gguf::Value* arch = f.find("general.architecture")) {
    if (arch->type == gguf::ValueType::STRING) {
      const int64_t v = static_cast<int64_t>(f.get_uint_or(arch->s + ".vocab_size", 0));
      if (v > 0) return v;
    }
  }
  if (const gguf::TensorInfo* t = f.find_tensor("token_embd.weight")) {
    if (t->ne.size() >= 2) return t->ne[1];
  }
  return -1;
}

}  // namespace

ModelTokenizer load_model_tokenizer(const std::string& spec) {
  if (spec.rfind("synth:", 0) == 0) {
    const SynthOptions so = parse_synth_spec(spec);
    const ModelConfig* c = find_preset(so.preset);
    if (c == nullptr) {
      throw Error(spec, "no preset named " + so.preset, "see `ktune gen-model --help`");
    }
    return synthetic_for(c->vocab, spec + " has random weights and no vocabulary");
  }
  if (std::filesystem::is_directory(spec)) {
    throw Error(spec,
                "ktune reads tokenizers from GGUF metadata only (not from a Hugging Face "
                "folder's tokenizer.json yet)",
                "run the model's GGUF (llama.cpp's converter writes its tokenizer), or give "
                "token ids (ktune logits --tokens)");
  }
  const gguf::File f = gguf::File::open_split(spec);
  const int64_t vocab = gguf_model_vocab(f);
  if (!Tokenizer::gguf_has_vocab(f)) {
    if (vocab < 0) Tokenizer::from_gguf(f);  // throws, naming tokenizer.ggml.model
    return synthetic_for(vocab, spec +
                                    " carries no vocabulary (tokenizer.ggml.model = "
                                    "\"no_vocab\", as ktune gen-model writes)");
  }
  ModelTokenizer m{Tokenizer::from_gguf(f), false, ""};
  if (vocab > 0 && m.tokenizer.size() > vocab) {
    throw Error(spec,
                "metadata key tokenizer.ggml.tokens: " + std::to_string(m.tokenizer.size()) +
                    " tokens, but the model's vocabulary has " + std::to_string(vocab),
                "use a GGUF whose tokenizer matches its embedding table");
  }
  m.source = std::string("GGUF metadata (byte-level BPE, pre-tokenizer ") +
             pre_tokenizer_name(m.tokenizer.pre()) + ")";
  return m;
}

}  // namespace ktune::cli
