// Placeholder registration; replaced by the real subcommand.
#include "cli.h"
#include "ktune/engine/error.h"

namespace ktune::cli {
void add_run_command(CLI::App& app) {
  auto* sub = app.add_subcommand("run", "(not built yet)");
  sub->callback([] { throw ktune::Error("run", "not implemented yet", "wait for it"); });
}
}  // namespace ktune::cli
