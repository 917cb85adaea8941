// Placeholder registration; replaced by the real subcommand.
#include "cli.h"
#include "ktune/engine/error.h"

namespace ktune::cli {
void add_convert_command(CLI::App& app) {
  auto* sub = app.add_subcommand("convert", "(not built yet)");
  sub->callback([] { throw ktune::Error("convert", "not implemented yet", "wait for it"); });
}
}  // namespace ktune::cli
