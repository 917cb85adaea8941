// Shared handling of the --model argument and the facts every report's header carries.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "ktune/engine/model.h"

namespace ktune::cli {

// The help text every subcommand that takes a model shows.
extern const char* const kModelHelp;

// Loads a model spec, with progress on stderr for synthetic models that take a while.
ModelWeights load_model_for_cli(const std::string& spec, bool quiet);

// Host + build + model facts for a report header (also the JSON header).
nlohmann::json report_header(const ModelWeights& model, int threads, const std::string& isa);
std::string format_bytes(double bytes);  // "16.2 GiB"
std::string format_count(double n);      // "7.73M", "30.53B"

}  // namespace ktune::cli
