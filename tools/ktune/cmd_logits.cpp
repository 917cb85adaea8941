// Placeholder registration; replaced by the real subcommand.
#include "cli.h"
#include "ktune/engine/error.h"

namespace ktune::cli {
void add_logits_command(CLI::App& app) {
  auto* sub = app.add_subcommand("logits", "(not built yet)");
  sub->callback([] { throw ktune::Error("logits", "not implemented yet", "wait for it"); });
}
}  // namespace ktune::cli
