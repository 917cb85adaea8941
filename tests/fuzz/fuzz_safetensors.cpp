// libFuzzer target: the safetensors reader (safetensors::File::from_memory), then every tensor's
// data bounds and read_f32. Contract (docs/fuzzing.md): parse or throw ktune::Error.
#include <cstddef>
#include <cstdint>

#include "fuzz_common.h"
#include "ktune/engine/error.h"
#include "ktune/engine/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const ktune::safetensors::File f =
        ktune::safetensors::File::from_memory(data, size, "fuzz.safetensors");
    for (const ktune::safetensors::Tensor& t : f.tensors()) {
      ktune::fuzz::consume(t.n_elements());
      if (f.find(t.name) == nullptr) __builtin_trap();
      if (t.nbytes > 0) ktune::fuzz::touch(t.data, t.nbytes);
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.read_f32(t.name)); });
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.read_f32(t.name, {2, 2})); });
    }
  } catch (const ktune::Error&) {
  }
  return 0;
}
