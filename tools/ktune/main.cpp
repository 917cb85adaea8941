#include "cli.h"

int main(int argc, char** argv) { return ktune::cli::run_cli(argc, argv); }
