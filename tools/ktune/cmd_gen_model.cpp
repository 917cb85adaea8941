// Placeholder registration; replaced by the real subcommand.
#include "cli.h"
#include "ktune/engine/error.h"

namespace ktune::cli {
void add_gen_model_command(CLI::App& app) {
  auto* sub = app.add_subcommand("gen-model", "(not built yet)");
  sub->callback([] { throw ktune::Error("gen_model", "not implemented yet", "wait for it"); });
}
}  // namespace ktune::cli
