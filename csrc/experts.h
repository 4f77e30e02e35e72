// Grouped expert compute: one FFN per expert over its contiguous rows of the expert-ordered buffer.
// This is the only expert compute in the library; static and dynamic gating both call it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common/activation.h"
#include "common/options.h"

namespace moe_infer {

// ---- torch-free core ------------------------------------------------------------------------

// Applies the activation to one row: `fc1_row` has 2 * ffn_size (gated) or ffn_size values,
// `out_row` gets ffn_size values. Math in float32 (common/activation.h, shared with CUDA).
template <typename T>
void activate_row(const T* fc1_row, int64_t ffn_size, const ActivationParams& params, T* out_row) {
  const bool gated = is_gated(params.activation);
  for (int64_t i = 0; i < ffn_size; ++i) {
    const float gate = static_cast<float>(fc1_row[gate_column(params.activation, i)]);
    const float up =
        gated ? static_cast<float>(fc1_row[up_column(params.activation, i, ffn_size)]) : 0.0f;
    out_row[i] = static_cast<T>(activate_value(params, gate, up));
  }
}

// ---- ATen op (CPU) --------------------------------------------------------------------------

at::Tensor grouped_mlp_cpu(const at::Tensor& hidden, const at::Tensor& expert_offsets,
                           const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                           const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                           const std::string& activation, bool weights_transposed,
                           double swiglu_alpha, double swiglu_limit);

}  // namespace moe_infer
