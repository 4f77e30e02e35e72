// Top-k gating: router logits -> (weights, expert ids) per token.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/options.h"
#include "common/signatures.h"

namespace moe_infer {

struct GatingConfig {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  Scoring scoring = Scoring::kSoftmax;
  bool renormalize = false;
  float scaling_factor = 1.0f;
  int64_t n_group = 1;
  int64_t topk_group = 1;
};

// One (score, expert id) entry of the selection queue; the same element torch.topk's CPU kernel
// sorts (aten/src/ATen/native/TopKImpl.h), so the same std algorithms reorder it the same way.
using ScoredExpert = std::pair<float, int64_t>;

// Per-thread scratch of route_token.
struct GatingScratch {
  std::vector<float> choice;        // num_experts: the score that decides the selection
  std::vector<float> group_scores;  // n_group
  std::vector<ScoredExpert> queue;  // max(num_experts, n_group)
  explicit GatingScratch(const GatingConfig& config)
      : choice(config.num_experts),
        group_scores(config.n_group),
        queue(std::max(config.num_experts, config.n_group)) {}
};

// The k largest of values[0, n) in the order torch.topk(values, k) returns them on the CPU, ties
// included: torch's own algorithm (TopKImpl.h: std::partial_sort when k * 64 <= n, else
// std::nth_element and a sort of the first k - 1, NaN counted largest). Leaves them in queue[0, k).
void select_topk_like_torch(const float* values, int64_t n, int64_t k, ScoredExpert* queue);

// Whether a token's logits can be routed: no NaN or +inf, and (softmax) not all -inf.
bool routable_logits(const float* logits, int64_t num_experts, Scoring scoring);

// Routes one token from its `scores` (num_experts floats computed as transformers does: softmax
// probabilities in float32, sigmoid scores, or the raw logits for kSoftmaxTopk) and an optional
// selection-only `selection_bias`. Writes top_k weights and ids in torch.topk's order (best first;
// tied experts where torch.topk puts them). Torch-free.
void route_token(const float* scores, const float* selection_bias, const GatingConfig& config,
                 GatingScratch& scratch, float* topk_weights, int32_t* expert_ids);

// ---- ATen ops (CPU; parameters: common/signatures.h) ----------------------------------------

// topk_gating_cpu
MOE_INFER_GATING_OPS(MOE_INFER_DECLARE_CPU)

}  // namespace moe_infer
