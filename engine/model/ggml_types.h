// Block geometry of every tensor type ggml defines, including the many ktune does not compute
// with. The GGUF reader needs it to size tensors it will never touch (a Q4_K_M file still has to
// be validated and its unsupported tensors named), so this table is independent of quant.h,
// which only knows the formats ktune implements.
#pragma once

#include <cstdint>

namespace ktune::ggml {

struct TypeTraits {
  const char* name;     // ggml's spelling, e.g. "Q4_K"
  int64_t block_elems;  // weights per block
  int64_t block_bytes;  // bytes per block
};

// Traits of ggml type `id`; nullptr when ggml does not define it (never did, or removed).
const TypeTraits* type_traits(uint32_t id);

// Name of a type id that ggml used to define and has since removed (e.g. 31 "Q4_0_4_4"), or
// nullptr. Lets errors say "removed from ggml" instead of "unknown".
const char* removed_type_name(uint32_t id);

// One past the largest id in the table (for messages such as "ktune knows ids 0..39").
uint32_t type_id_limit();

}  // namespace ktune::ggml
