// The tensor types the GPU engine computes with (engine/runtime/gpu_weight_types.cpp). Host code
// only, so the rules are unit-tested without a GPU; GpuEngine checks them before it copies
// anything to a device, so a model it cannot run fails with the tensor named, not mid-step.
#pragma once

#include <cstdint>

#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"

namespace ktune {

// Matrices (attention, router, experts, output head): Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16, F32,
// mixed per tensor as in llama.cpp's Q4_K_M files. Not F16 (no GPU matvec for it yet) nor Q8_K
// (an activation format).
bool gpu_matrix_type_supported(QuantType t);
// The token embedding table (a row lookup): the matrix types and F16.
bool gpu_embedding_type_supported(QuantType t);
// "Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 or F32", for messages.
const char* gpu_matrix_type_list();

// Throws ktune::Error naming the first tensor of layers [first_layer, end_layer) - and of the
// embedding (with `embedding`) and the output norm and head (with `head`; a tied head is the
// embedding table) - that the GPU engine cannot compute with: a matrix of another type, a norm
// that is not F32, or a layer whose ffn_gate_exps and ffn_up_exps types differ (the fused
// gate/up kernels read both with one decoder; llama.cpp's mixes never split them).
void check_gpu_tensor_types(const ModelWeights& w, int64_t first_layer, int64_t end_layer,
                            bool embedding, bool head);

}  // namespace ktune
