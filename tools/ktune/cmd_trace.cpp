// `ktune trace profile.json -o trace.json`: the Chrome trace of a recorded profile.
#include <iostream>

#include "cli.h"
#include "profiler/chrome_trace.h"
#include "profiler/profile_doc.h"

namespace ktune::cli {

void add_trace_command(CLI::App& app) {
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>("trace.json");
  auto* sub = app.add_subcommand(
      "trace",
      "Write the Chrome trace (Perfetto, chrome://tracing, Holistic Trace Analysis, speedscope)\n"
      "of a profile recorded with `ktune profile`. Uses the complete timeline file beside the\n"
      "profile when present, else the compact timeline inside it.\n"
      "Example: ktune trace profile.json -o trace.json");
  sub->add_option("profile", *in, "profile.json written by ktune profile")->required();
  sub->add_option("-o,--output", *out, "trace file to write")->capture_default_str();
  sub->callback([in, out] {
    std::string which;
    const profiler::Timeline t = profiler::read_profile_timeline(*in, &which);
    profiler::write_chrome_trace(*out, t, *in);
    std::cout << "wrote " << *out << " from " << which << " (" << t.ops.size() << " GPU ops, "
              << t.spans.size() << " host spans, " << t.api.size() << " API calls)\n";
  });
}

}  // namespace ktune::cli
