// libFuzzer target: a Hugging Face config.json (parse_hf_config, the text half of
// read_hf_config). Contract (docs/fuzzing.md): parse or throw ktune::Error.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "ktune/engine/error.h"
#include "ktune/engine/hf_checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const ktune::ModelConfig c = ktune::parse_hf_config(text, "fuzz/config.json");
    c.validate("fuzz/config.json");  // what every loader does next
    ktune::fuzz::consume(c.params_total() + c.params_active_per_token());
  } catch (const ktune::Error&) {
  }
  return 0;
}
