// `ktune tokenize`: text -> token ids with the model's tokenizer (GGUF metadata, or ktune's
// synthetic vocabulary for models without one). For checking the tokenizer against others.
#include <fmt/format.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "ktune/engine/error.h"
#include "model_arg.h"
#include "model_tokenizer.h"

namespace ktune::cli {
namespace {

struct TokenizeOptions {
  std::string model = "synth:tiny";
  std::string text;
  bool json = false;
  bool no_special = false;
  bool no_bos = false;
  bool pieces = false;
};

// A token's bytes, printable: control characters and invalid UTF-8 as escapes.
std::string printable(const std::string& bytes) {
  std::string out;
  for (uint32_t cp : decode_utf8(bytes)) {
    if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp < 0x20 || cp == 0x7F) {
      out += fmt::format("\\x{:02x}", cp);
    } else {
      append_utf8(out, cp);
    }
  }
  return out;
}

void run_tokenize(const TokenizeOptions& opt) {
  const ModelTokenizer mt = load_model_tokenizer(opt.model);
  const Tokenizer& tok = mt.tokenizer;
  const std::vector<int32_t> ids = tok.encode(opt.text, !opt.no_bos, !opt.no_special);
  if (opt.json) {
    nlohmann::json doc;
    doc["model"] = opt.model;
    doc["tokenizer"] = {{"source", mt.source},
                        {"synthetic", mt.synthetic},
                        {"pre", pre_tokenizer_name(tok.pre())},
                        {"vocab_size", tok.size()}};
    doc["ids"] = ids;
    nlohmann::json pieces = nlohmann::json::array();
    for (int32_t id : ids) pieces.push_back(tok.token_text(id));
    doc["tokens"] = pieces;
    std::cout << doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return;
  }
  if (mt.synthetic) std::cerr << "ktune: tokenizer: " << mt.source << "\n";
  if (opt.pieces) {
    for (int32_t id : ids) {
      std::cout << fmt::format("{:>8}  {}\n", id, printable(tok.token_bytes(id)));
    }
    return;
  }
  std::string line;
  for (int32_t id : ids) line += (line.empty() ? "" : " ") + std::to_string(id);
  std::cout << line << "\n";
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto opt = std::make_shared<TokenizeOptions>();
  auto* sub = app.add_subcommand(
      "tokenize",
      "Print the token ids of a text under the model's tokenizer (its GGUF vocabulary, or\n"
      "ktune's synthetic one for models without a vocabulary).\n"
      "Example: ktune tokenize --model Qwen3-30B-A3B-Q4_K_M.gguf \"Hello, world!\" --json");
  sub->add_option("-m,--model", opt->model, kModelHelp)->capture_default_str();
  sub->add_option("text", opt->text, "The text to tokenize")->required();
  sub->add_flag("--json", opt->json,
                "One JSON document: model, tokenizer {source, synthetic, pre, vocab_size}, ids, "
                "tokens (the vocabulary's text of each id)");
  sub->add_flag("--pieces", opt->pieces, "One line per token: id and the bytes it stands for");
  sub->add_flag("--no-special", opt->no_special,
                "Tokenize added/special tokens' text (<|im_start|>, ...) as plain text");
  sub->add_flag("--no-bos", opt->no_bos, "Do not prepend BOS even when the vocabulary asks for it");
  sub->callback([opt] { run_tokenize(*opt); });
}

}  // namespace ktune::cli
