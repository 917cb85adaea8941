// libFuzzer target: the profile.json reader (parse_profile_summary: depth guard, JSON parse,
// schema version, the validating summary reader). A summary that validates must also survive
// to_json + summary_from_json unchanged. Contract (docs/fuzzing.md): parse or throw ktune::Error.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz_common.h"
#include "ktune/engine/error.h"
#include "profiler/profile_summary.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const ktune::profile::ProfileSummary s = ktune::profile::parse_profile_summary(text, "f.json");
    nlohmann::json j;
    to_json(j, s);
    nlohmann::json again;
    to_json(again, ktune::profile::summary_from_json(j, "f.json"));
    if (again != j) {
      std::fprintf(stderr, "summary changed on write + read\n");
      __builtin_trap();
    }
    ktune::fuzz::consume(s.router.counts.size());
  } catch (const ktune::Error&) {
  }
  return 0;
}
