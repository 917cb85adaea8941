// libFuzzer target: the placement YAML parser (parse_placement), on its own and resolved against
// the `tiny` preset; a resolved placement must also survive write_placement and parse back equal
// (placement.h: parse(write(p)) == p). Contract (docs/fuzzing.md): parse or throw ktune::Error.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "fuzz_common.h"
#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"

namespace {

void round_trip(const ktune::Placement& p, const ktune::ModelConfig* cfg) {
  std::string text;
  ktune::Placement back;
  try {
    text = ktune::write_placement(p);  // p is resolved: writing must not fail
    back = ktune::parse_placement(text, "fuzz-written.yaml", cfg);
  } catch (const ktune::Error& e) {
    std::fprintf(stderr, "write + parse of a valid placement threw: %s\n%s\n", e.what(),
                 text.c_str());
    __builtin_trap();
  }
  if (back != p || ktune::write_placement(back) != text) {
    std::fprintf(stderr, "placement changed on write + parse:\n%s\n", text.c_str());
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  static const ktune::ModelConfig* tiny = ktune::find_preset("tiny");
  try {
    const ktune::Placement p = ktune::parse_placement(text, "fuzz.yaml");
    ktune::fuzz::consume(p.entries.size());
    if (p.resolved()) round_trip(p, nullptr);
  } catch (const ktune::Error&) {
  }
  try {
    const ktune::Placement p = ktune::parse_placement(text, "fuzz.yaml", tiny);
    ktune::fuzz::consume(ktune::expert_counts(p).size() + p.devices().size());
    round_trip(p, tiny);
  } catch (const ktune::Error&) {
  }
  return 0;
}
