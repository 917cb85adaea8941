#include "ktune/engine/error.h"

namespace ktune {

Error::Error(std::string where, std::string problem, std::string fix, ErrorKind kind)
    : std::runtime_error(where + ": " + problem + "; " + fix),
      where_(std::move(where)),
      problem_(std::move(problem)),
      fix_(std::move(fix)),
      kind_(kind) {}

void throw_usage(const std::string& where, const std::string& problem, const std::string& fix) {
  throw Error(where, problem, fix, ErrorKind::Usage);
}

}  // namespace ktune
