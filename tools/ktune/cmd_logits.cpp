// `ktune logits`: prefill tokens, then decode more tokens one at a time (teacher-forced), and
// print the logits of every prefill position and of each decode step. Used to compare engines
// (and by the tests against Hugging Face transformers).
#include <fmt/format.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "model_arg.h"

namespace ktune::cli {
namespace {

struct LogitsOptions {
  std::string model;
  std::vector<int64_t> tokens;
  std::vector<int64_t> then;
  int threads = 0;
  bool json = false;
};

std::vector<int32_t> checked_tokens(const std::vector<int64_t>& in, int64_t vocab,
                                    const char* flag) {
  std::vector<int32_t> out;
  for (int64_t t : in) {
    if (t < 0 || t >= vocab) {
      throw_usage(flag, fmt::format("token {} is outside the vocabulary [0, {})", t, vocab),
                  "pass token ids the model has");
    }
    out.push_back(static_cast<int32_t>(t));
  }
  return out;
}

void print_row(std::ostream& out, const char* label, size_t index, const float* v, int64_t n) {
  out << label << ' ' << index << ':';
  for (int64_t i = 0; i < n; ++i) out << ' ' << fmt::format("{:.7g}", v[i]);
  out << '\n';
}

void run_logits(const LogitsOptions& opt) {
  if (opt.tokens.empty()) throw_usage("--tokens", "no tokens given", "e.g. --tokens 5,77,300");
  ModelWeights model = load_model_for_cli(opt.model, true);
  const int64_t vocab = model.cfg.vocab;
  const auto prompt = checked_tokens(opt.tokens, vocab, "--tokens");
  const auto then = checked_tokens(opt.then, vocab, "--then");

  CpuEngineOptions eo;
  eo.threads = opt.threads;
  eo.max_context = static_cast<int64_t>(prompt.size() + then.size()) + 1;
  eo.max_batch = static_cast<int64_t>(prompt.size());
  CpuEngine engine(model, eo);

  std::vector<float> pre;
  engine.prefill(prompt.data(), static_cast<int64_t>(prompt.size()), &pre, true);
  std::vector<std::vector<float>> dec;
  std::vector<float> step;
  for (int32_t t : then) {
    engine.decode(t, &step);
    dec.push_back(step);
  }

  if (opt.json) {
    // Writes numbers with full float precision; one document on stdout.
    nlohmann::json doc;
    doc["prefill"] = nlohmann::json::array();
    for (size_t p = 0; p < prompt.size(); ++p) {
      doc["prefill"].push_back(std::vector<float>(pre.begin() + p * vocab,
                                                  pre.begin() + (p + 1) * vocab));
    }
    doc["decode"] = dec;
    std::cout << doc.dump() << "\n";
    return;
  }
  for (size_t p = 0; p < prompt.size(); ++p) print_row(std::cout, "prefill", p, &pre[p * vocab], vocab);
  for (size_t d = 0; d < dec.size(); ++d) print_row(std::cout, "decode", d, dec[d].data(), vocab);
}

}  // namespace

void add_logits_command(CLI::App& app) {
  auto opt = std::make_shared<LogitsOptions>();
  auto* sub = app.add_subcommand(
      "logits",
      "Print the logits of every prefill position and of each teacher-forced decode step.\n"
      "Example: ktune logits --model synth:tiny --tokens 5,77,300 --then 17,230 --json");
  sub->add_option("-m,--model", opt->model, kModelHelp)->required();
  sub->add_option("--tokens", opt->tokens, "Prompt token ids, comma-separated (prefilled)")
      ->required()
      ->delimiter(',');
  sub->add_option("--then", opt->then,
                  "Token ids decoded one at a time after the prompt (teacher-forced)")
      ->delimiter(',');
  sub->add_option("-t,--threads", opt->threads, "CPU threads (default: physical cores)")
      ->check(CLI::Range(1, 4096));
  sub->add_flag("--json", opt->json,
                "One JSON document: {\"prefill\": [[...], ...], \"decode\": [[...], ...]}");
  sub->callback([opt] { run_logits(*opt); });
}

}  // namespace ktune::cli
