// Argument checks shared by the CPU and CUDA implementations of every op.
// Each check names the op, the argument and the expectation, and returns the sizes it validated.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "common/options.h"

namespace moe_infer {

struct GatingSizes {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  Scoring scoring;
  int64_t n_group;
  int64_t topk_group;
};

GatingSizes check_topk_gating(const at::Tensor& router_logits, int64_t top_k,
                              const std::string& scoring,
                              const std::optional<at::Tensor>& selection_bias,
                              double scaling_factor, int64_t n_group, int64_t topk_group);

struct PlanSizes {
  int64_t num_tokens;
  int64_t top_k;
  int64_t num_pairs;
  int64_t num_experts;
};

PlanSizes check_dispatch_plan(const at::Tensor& expert_ids, int64_t num_experts);

struct RowSizes {
  int64_t num_tokens;
  int64_t top_k;
  int64_t hidden_size;
};

RowSizes check_permute(const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t top_k);

RowSizes check_unpermute_combine(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                                 const at::Tensor& row_of_pair);

struct MlpSizes {
  int64_t num_rows;
  int64_t hidden_size;
  int64_t ffn_size;     // width of the activation's output (I)
  int64_t fc1_outputs;  // I, or 2 * I for gated activations
  int64_t num_experts;
  Activation activation;
};

// `op` names the caller in the messages (grouped_mlp_combine checks its weights with this too).
MlpSizes check_grouped_mlp(const at::Tensor& hidden, const at::Tensor& expert_offsets,
                           const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                           const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                           const std::string& activation, bool weights_transposed,
                           const char* op = "grouped_mlp");

// grouped_mlp_combine: hidden [S, H] in token order, topk_weights [S, k], sorted_pair_ids [S * k]
// and expert_offsets [E + 1] from dispatch_plan, and grouped_mlp's weights.
struct MlpCombineSizes {
  MlpSizes mlp;  // mlp.num_rows is S
  int64_t top_k;
};

MlpCombineSizes check_grouped_mlp_combine(const at::Tensor& hidden, const at::Tensor& topk_weights,
                                          const at::Tensor& sorted_pair_ids,
                                          const at::Tensor& expert_offsets,
                                          const at::Tensor& fc1_weight,
                                          const std::optional<at::Tensor>& fc1_bias,
                                          const at::Tensor& fc2_weight,
                                          const std::optional<at::Tensor>& fc2_bias,
                                          const std::string& activation, bool weights_transposed);

// Largest number of (token, slot) pairs the int32 index tensors can address.
constexpr int64_t kMaxPairs = (int64_t{1} << 31) - 1;

}  // namespace moe_infer
