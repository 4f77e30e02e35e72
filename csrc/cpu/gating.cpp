// CPU top-k gating: one token per iteration of at::parallel_for, float32 math.
#include "gating.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/composite.h"

namespace moe_infer {

namespace {

// Index of the largest value, skipping NaN (used as the "already taken" marker); ties go to the
// lower index. Returns -1 if every entry is NaN.
int64_t argmax_skip_nan(const float* values, int64_t begin, int64_t end) {
  int64_t best = -1;
  float best_value = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float v = values[i];
    if (std::isnan(v)) continue;
    if (best < 0 || v > best_value) {
      best = i;
      best_value = v;
    }
  }
  return best;
}

}  // namespace

bool route_token(const float* logits, const float* selection_bias, const GatingConfig& config,
                 float* scratch, float* topk_weights, int32_t* expert_ids) {
  const int64_t num_experts = config.num_experts;
  float* scores = scratch;                // score that becomes the weight
  float* choice = scratch + num_experts;  // score that decides the selection
  float* group_scores = choice + num_experts;

  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) {
    const float l = logits[e];
    if (std::isnan(l) || l == std::numeric_limits<float>::infinity()) return false;
    max_logit = std::max(max_logit, l);
  }

  switch (config.scoring) {
    case Scoring::kSoftmax: {
      if (std::isinf(max_logit)) return false;  // every logit is -inf: no distribution
      float sum = 0.0f;
      for (int64_t e = 0; e < num_experts; ++e) {
        scores[e] = std::exp(logits[e] - max_logit);
        sum += scores[e];
      }
      const float inv_sum = 1.0f / sum;
      for (int64_t e = 0; e < num_experts; ++e) scores[e] *= inv_sum;
      break;
    }
    case Scoring::kSoftmaxTopk:
      for (int64_t e = 0; e < num_experts; ++e) scores[e] = logits[e];
      break;
    case Scoring::kSigmoid:
      for (int64_t e = 0; e < num_experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
      break;
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    // NaN marks "taken" below, so a NaN choice (an unvalidated NaN bias) counts as -inf.
    const float v = scores[e] + (selection_bias != nullptr ? selection_bias[e] : 0.0f);
    choice[e] = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
  }

  if (config.n_group > 1) {
    // DeepSeek-V3: a group scores the sum of its two best choices; experts outside the best
    // topk_group groups get a choice of -inf (as transformers v5 does), so a chosen group's expert
    // wins even when the selection bias makes its choice score negative.
    const int64_t group_size = num_experts / config.n_group;
    for (int64_t g = 0; g < config.n_group; ++g) {
      const float* group = choice + g * group_size;
      float first = -std::numeric_limits<float>::infinity();
      float second = first;
      for (int64_t i = 0; i < group_size; ++i) {
        if (group[i] > first) {
          second = first;
          first = group[i];
        } else if (group[i] > second) {
          second = group[i];
        }
      }
      const float sum = first + second;
      group_scores[g] = std::isnan(sum) ? -std::numeric_limits<float>::infinity() : sum;
    }
    // Mark chosen groups by replacing their score with NaN; the rest are masked.
    for (int64_t j = 0; j < config.topk_group; ++j) {
      group_scores[argmax_skip_nan(group_scores, 0, config.n_group)] =
          std::numeric_limits<float>::quiet_NaN();
    }
    for (int64_t g = 0; g < config.n_group; ++g) {
      if (std::isnan(group_scores[g])) continue;
      for (int64_t i = 0; i < group_size; ++i) {
        choice[g * group_size + i] = -std::numeric_limits<float>::infinity();
      }
    }
  }

  for (int64_t j = 0; j < config.top_k; ++j) {
    const int64_t best = argmax_skip_nan(choice, 0, num_experts);
    expert_ids[j] = static_cast<int32_t>(best);
    topk_weights[j] = scores[best];
    choice[best] = std::numeric_limits<float>::quiet_NaN();
  }

  if (config.scoring == Scoring::kSoftmaxTopk) {
    // Softmax over the k chosen logits; the first is the largest.
    const float top = topk_weights[0];
    float sum = 0.0f;
    for (int64_t j = 0; j < config.top_k; ++j) {
      topk_weights[j] = std::exp(topk_weights[j] - top);
      sum += topk_weights[j];
    }
    for (int64_t j = 0; j < config.top_k; ++j) topk_weights[j] /= sum;
  } else if (config.renormalize) {
    float sum = 0.0f;
    for (int64_t j = 0; j < config.top_k; ++j) sum += topk_weights[j];
    if (sum > 0.0f) {
      for (int64_t j = 0; j < config.top_k; ++j) topk_weights[j] /= sum;
    }
  }
  if (config.scaling_factor != 1.0f) {
    for (int64_t j = 0; j < config.top_k; ++j) topk_weights[j] *= config.scaling_factor;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t k,
                                                   const std::string& scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& selection_bias,
                                                   double scaling_factor, int64_t n_group,
                                                   int64_t topk_group, bool validate) {
  const GatingSizes sizes = check_topk_gating(router_logits, k, scoring, selection_bias,
                                              scaling_factor, n_group, topk_group);
  // The kernel finds NaN logits as it goes, so on the CPU the checks always run.
  if (selection_bias.has_value()) check_finite_bias(*selection_bias);
  const GatingConfig config{sizes.num_experts,
                            sizes.top_k,
                            sizes.scoring,
                            renormalize,
                            static_cast<float>(scaling_factor),
                            sizes.n_group,
                            sizes.topk_group};
  const at::Tensor logits = router_logits.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (selection_bias.has_value()) bias = selection_bias->to(at::kFloat).contiguous();

  auto topk_weights = at::empty({sizes.num_tokens, k}, router_logits.options().dtype(at::kFloat));
  auto expert_ids = at::empty({sizes.num_tokens, k}, router_logits.options().dtype(at::kInt));
  const float* logits_ptr = logits.data_ptr<float>();
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* weights_ptr = topk_weights.data_ptr<float>();
  int32_t* ids_ptr = expert_ids.data_ptr<int32_t>();

  std::atomic<int64_t> bad_token{sizes.num_tokens};
  const int64_t grain = std::max<int64_t>(1, 16384 / sizes.num_experts);
  at::parallel_for(0, sizes.num_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(gating_scratch_size(config));
    for (int64_t s = begin; s < end; ++s) {
      if (!route_token(logits_ptr + s * sizes.num_experts, bias_ptr, config, scratch.data(),
                       weights_ptr + s * k, ids_ptr + s * k)) {
        int64_t seen = bad_token.load();
        while (s < seen && !bad_token.compare_exchange_weak(seen, s)) {
        }
        return;
      }
    }
  });
  if (bad_token.load() != sizes.num_tokens) fail_nonfinite_logits(bad_token.load());
  return {topk_weights, expert_ids};
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) { m.impl("topk_gating", &topk_gating_cpu); }

}  // namespace moe_infer
