// Placeholder registration; replaced by the real subcommand.
#include "cli.h"
#include "ktune/engine/error.h"

namespace ktune::cli {
void add_info_command(CLI::App& app) {
  auto* sub = app.add_subcommand("info", "(not built yet)");
  sub->callback([] { throw ktune::Error("info", "not implemented yet", "wait for it"); });
}
}  // namespace ktune::cli
