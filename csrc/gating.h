// Top-k gating: router logits -> (weights, expert ids) per token.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/options.h"

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

// Scratch floats route_token needs for one token.
inline int64_t gating_scratch_size(const GatingConfig& config) {
  return 2 * config.num_experts + config.n_group;
}

// Routes one token. `logits` and `selection_bias` (nullable) hold num_experts floats; `scratch`
// holds gating_scratch_size floats. Writes top_k weights and ids, best first; ties go to the lower
// expert id. Returns false (and writes nothing) if a logit is NaN. Torch-free.
bool route_token(const float* logits, const float* selection_bias, const GatingConfig& config,
                 float* scratch, float* topk_weights, int32_t* expert_ids);

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t k,
                                                   const std::string& scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& selection_bias,
                                                   double scaling_factor, int64_t n_group,
                                                   int64_t topk_group, bool validate);

}  // namespace moe_infer
