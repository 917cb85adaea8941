// libFuzzer target: the GGUF reader (gguf::File::from_memory), then, when the bytes parse, every
// metadata getter, every tensor's data bounds, and the qwen3moe model loader (load_gguf_model,
// through a memfd: the loader takes a path). Contract (docs/fuzzing.md): every input parses or
// throws ktune::Error; anything else is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"

namespace {

void walk_value(const ktune::gguf::Value& v) {
  ktune::fuzz::consume(ktune::gguf::value_type_name(v.type));
  ktune::fuzz::consume(v.is_integer() || v.is_float());
  for (const ktune::gguf::Value& e : v.array) walk_value(e);
  ktune::fuzz::consume(v == v);
}

void load_as_model(const uint8_t* data, size_t size) {
  const int fd = memfd_create("ktune-fuzz-gguf", 0);
  if (fd < 0) return;
  size_t done = 0;
  while (done < size) {
    const ssize_t n = write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  if (done == size) {
    try {
      const ktune::ModelWeights w = ktune::load_gguf_model("/proc/self/fd/" + std::to_string(fd));
      for (const ktune::TensorView* t : w.tensor_list()) {
        // Every view the loader hands out must lie inside the file.
        if (t->data && t->nbytes() > 0) ktune::fuzz::touch(t->data, t->nbytes());
      }
      ktune::fuzz::consume(w.weight_bytes() + w.bytes_per_token_decode());
    } catch (const ktune::Error&) {
    }
  }
  close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  bool model = false;
  try {
    const ktune::gguf::File f = ktune::gguf::File::from_memory(data, size, "fuzz.gguf");
    for (const auto& kv : f.metadata()) {
      const std::string& key = kv.first;
      walk_value(kv.second);
      if (f.find(key) == nullptr) __builtin_trap();
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.get_uint(key)); });
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.get_float(key)); });
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.get_string(key)); });
      ktune::fuzz::expect_error([&] { ktune::fuzz::consume(f.get_bool(key)); });
    }
    for (const ktune::gguf::TensorInfo& t : f.tensors()) {
      ktune::fuzz::consume(t.n_elements());
      if (f.find_tensor(t.name) == nullptr) __builtin_trap();
      if (t.nbytes > 0) ktune::fuzz::touch(t.data, t.nbytes);
    }
    const ktune::gguf::Value* arch = f.find("general.architecture");
    model = arch && arch->type == ktune::gguf::ValueType::STRING && arch->s == "qwen3moe";
  } catch (const ktune::Error&) {
  }
  if (model) load_as_model(data, size);
  return 0;
}
