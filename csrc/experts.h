// Grouped expert compute: one FFN per expert over its contiguous rows of the expert-ordered buffer.
// This is the only expert compute in the library; static and dynamic gating both call it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common/activation.h"
#include "common/options.h"
#include "common/rows.h"
#include "common/signatures.h"

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

// Adds each weighted expert row to its token's float32 accumulator:
// accumulator[token(i)] += topk_weights[pair(i)] * rows[i] for the `num_rows` rows, where
// pair(i) = pair_ids[i] and token(i) = pair(i) / top_k. Rows of one expert belong to distinct
// tokens, so disjoint row ranges of one expert may run concurrently.
template <typename T, typename AddRow = AddWeightedRow>
void accumulate_weighted_rows(const T* rows, int64_t num_rows, int64_t hidden_size,
                              const int32_t* pair_ids, const float* topk_weights, int64_t top_k,
                              float* accumulator, const AddRow& add_row = {}) {
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t pair = pair_ids[i];
    add_row(rows + i * hidden_size, topk_weights[pair], hidden_size,
            accumulator + (pair / top_k) * hidden_size);
  }
}

// ---- ATen ops (CPU; parameters: common/signatures.h) ----------------------------------------

// The experts' stacked weights and biases as an expert op receives them (nothing is copied).
struct ExpertWeights {
  const at::Tensor& fc1_weight;               // [E, F1, H], or [E, H, F1] when transposed
  const std::optional<at::Tensor>& fc1_bias;  // [E, F1]
  const at::Tensor& fc2_weight;               // [E, H, I], or [E, I, H] when transposed
  const std::optional<at::Tensor>& fc2_bias;  // [E, H]
  bool transposed;

  // [E, H, F1] and [E, I, H] views (inputs by outputs): the GEMMs read the stored layout in place.
  at::Tensor fc1_in_out() const { return transposed ? fc1_weight : fc1_weight.transpose(1, 2); }
  at::Tensor fc2_in_out() const { return transposed ? fc2_weight : fc2_weight.transpose(1, 2); }
};

// The weights among an expert op's arguments (their other parameters are the activation's).
inline ExpertWeights expert_weights(MOE_INFER_EXPERT_PARAMS) {
  return {fc1_weight, fc1_bias, fc2_weight, fc2_bias, weights_transposed};
}

// grouped_mlp_cpu, and grouped_mlp_combine_cpu: grouped_mlp with its input gathered and its output
// combined on the fly, expert by expert, in blocks of rows: out[s] = sum_j topk_weights[s, j] *
// FFN_{expert(s, j)}(hidden[s]). Equal to unpermute_combine(grouped_mlp(permute(hidden, ...), ...),
// ...) without the two [S * k, H] buffers; pairs at rows >= expert_offsets[E] (unrouted)
// contribute nothing.
MOE_INFER_EXPERTS_OPS(MOE_INFER_DECLARE_CPU)

}  // namespace moe_infer
