// The prefill driver both CPU engines share (cpu_engine.cpp, cpu_engine_deepseek.cpp): checks
// that the prompt fits the KV cache and that every token id is valid before any work, sizes the
// logits, and runs the engine's batched forward over chunks of at most max_batch tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ktune/engine/error.h"

namespace ktune::rt {

// check_token(id) throws ktune::Error for an invalid id; forward(tokens, T, out, all) runs one
// chunk and writes the logits of all its positions (all) or of its last one to out (nullptr:
// none). logits: n_tok x vocab (all_positions) or the last position's vocab floats.
template <class CheckToken, class Forward>
void prefill_in_chunks(const int32_t* tokens, int64_t n_tok, int64_t pos, int64_t max_ctx,
                       int64_t vocab, int64_t max_batch, std::vector<float>* logits,
                       bool all_positions, CheckToken&& check_token, Forward&& forward) {
  if (n_tok <= 0) {
    if (logits) logits->clear();
    return;
  }
  if (pos + n_tok > max_ctx) {
    throw Error("prefill",
                std::to_string(n_tok) + " tokens at position " + std::to_string(pos) +
                    " overflow the KV cache (" + std::to_string(max_ctx) + " positions)",
                "raise max_context or call reset()");
  }
  for (int64_t t = 0; t < n_tok; ++t) check_token(tokens[t]);
  if (logits) logits->assign((all_positions ? n_tok : 1) * vocab, 0.0f);
  for (int64_t c0 = 0; c0 < n_tok; c0 += max_batch) {
    const int64_t T = std::min(max_batch, n_tok - c0);
    float* out = nullptr;
    bool all = all_positions;
    if (logits) {
      if (all_positions) {
        out = logits->data() + c0 * vocab;
      } else if (c0 + T == n_tok) {
        out = logits->data();
        all = false;
      }
    }
    forward(tokens + c0, T, out, all);
  }
}

}  // namespace ktune::rt
