#include "model/ggml_types.h"

#include <iterator>

namespace ktune::ggml {
namespace {

// Sizes derived from the block layouts in ggml's format description: each row of a table entry
// is {name, weights per block, bytes per block}; a null name marks an id that is not (or no
// longer) a valid tensor type.
constexpr TypeTraits kTypes[] = {
    {"F32", 1, 4},         // 0
    {"F16", 1, 2},         // 1
    {"Q4_0", 32, 18},      // 2: fp16 scale + 16 bytes of nibbles
    {"Q4_1", 32, 20},      // 3: fp16 scale and min + 16 bytes
    {nullptr, 0, 0},       // 4: Q4_2, removed
    {nullptr, 0, 0},       // 5: Q4_3, removed
    {"Q5_0", 32, 22},      // 6: fp16 scale + 4 bytes of high bits + 16 bytes
    {"Q5_1", 32, 24},      // 7
    {"Q8_0", 32, 34},      // 8: fp16 scale + 32 bytes
    {"Q8_1", 32, 36},      // 9: fp16 scale and sum + 32 bytes
    {"Q2_K", 256, 84},     // 10
    {"Q3_K", 256, 110},    // 11
    {"Q4_K", 256, 144},    // 12
    {"Q5_K", 256, 176},    // 13
    {"Q6_K", 256, 210},    // 14
    {"Q8_K", 256, 292},    // 15: f32 scale + 256 bytes + 16 int16 sums
    {"IQ2_XXS", 256, 66},  // 16
    {"IQ2_XS", 256, 74},   // 17
    {"IQ3_XXS", 256, 98},  // 18
    {"IQ1_S", 256, 50},    // 19
    {"IQ4_NL", 32, 18},    // 20
    {"IQ3_S", 256, 110},   // 21
    {"IQ2_S", 256, 82},    // 22
    {"IQ4_XS", 256, 136},  // 23
    {"I8", 1, 1},          // 24
    {"I16", 1, 2},         // 25
    {"I32", 1, 4},         // 26
    {"I64", 1, 8},         // 27
    {"F64", 1, 8},         // 28
    {"IQ1_M", 256, 56},    // 29
    {"BF16", 1, 2},        // 30
    {nullptr, 0, 0},       // 31: Q4_0_4_4, removed (repacking now happens at load time)
    {nullptr, 0, 0},       // 32: Q4_0_4_8, removed
    {nullptr, 0, 0},       // 33: Q4_0_8_8, removed
    {"TQ1_0", 256, 54},    // 34
    {"TQ2_0", 256, 66},    // 35
    {nullptr, 0, 0},       // 36: IQ4_NL_4_4, removed
    {nullptr, 0, 0},       // 37: IQ4_NL_4_8, removed
    {nullptr, 0, 0},       // 38: IQ4_NL_8_8, removed
    {"MXFP4", 32, 17},     // 39: e8m0 shared exponent + 16 bytes
};

struct Removed {
  uint32_t id;
  const char* name;
};
constexpr Removed kRemoved[] = {
    {4, "Q4_2"},      {5, "Q4_3"},        {31, "Q4_0_4_4"},   {32, "Q4_0_4_8"},
    {33, "Q4_0_8_8"}, {36, "IQ4_NL_4_4"}, {37, "IQ4_NL_4_8"}, {38, "IQ4_NL_8_8"},
};

}  // namespace

const TypeTraits* type_traits(uint32_t id) {
  if (id >= std::size(kTypes) || kTypes[id].name == nullptr) return nullptr;
  return &kTypes[id];
}

const char* removed_type_name(uint32_t id) {
  for (const Removed& r : kRemoved) {
    if (r.id == id) return r.name;
  }
  return nullptr;
}

uint32_t type_id_limit() { return static_cast<uint32_t>(std::size(kTypes)); }

}  // namespace ktune::ggml
