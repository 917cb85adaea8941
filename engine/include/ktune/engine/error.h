// ktune's one error type. Every failure a user can cause (a bad file, a bad flag, a plan that
// does not fit) becomes an Error whose message has the fixed shape
//   <file or field>: <problem>; <what to do>
// and the CLI prints it as `ktune: error: <message>` and exits with exit_code().
#pragma once

#include <stdexcept>
#include <string>

namespace ktune {

enum class ErrorKind {
  Runtime = 1,  // bad input file, missing GPU, plan that does not fit: exit code 1
  Usage = 2,    // bad command line: exit code 2
};

class Error : public std::runtime_error {
 public:
  Error(std::string where, std::string problem, std::string fix,
        ErrorKind kind = ErrorKind::Runtime);

  const std::string& where() const { return where_; }
  const std::string& problem() const { return problem_; }
  const std::string& fix() const { return fix_; }
  ErrorKind kind() const { return kind_; }
  int exit_code() const { return static_cast<int>(kind_); }

 private:
  std::string where_;
  std::string problem_;
  std::string fix_;
  ErrorKind kind_;
};

// Throws a usage error (exit code 2).
[[noreturn]] void throw_usage(const std::string& where, const std::string& problem,
                              const std::string& fix);

}  // namespace ktune
