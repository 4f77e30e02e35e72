// CPU top-k gating: ATen scores as transformers computes them, then one token per iteration of
// at::parallel_for, selecting in torch.topk's order.
#include "gating.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/composite.h"
#include "cpu/parallel.h"

namespace moe_infer {

namespace {

// torch.topk's "largest" comparator: NaN above everything, then by value.
bool ranks_above(const ScoredExpert& x, const ScoredExpert& y) {
  return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
}

}  // namespace

void select_topk_like_torch(const float* values, int64_t n, int64_t k, ScoredExpert* queue) {
  for (int64_t i = 0; i < n; ++i) queue[i] = {values[i], i};
  if (k * 64 <= n) {
    std::partial_sort(queue, queue + k, queue + n, ranks_above);
  } else {
    std::nth_element(queue, queue + k - 1, queue + n, ranks_above);
    std::sort(queue, queue + k - 1, ranks_above);
  }
}

bool routable_logits(const float* logits, int64_t num_experts, Scoring scoring) {
  bool all_neg_inf = true;
  for (int64_t e = 0; e < num_experts; ++e) {
    const float l = logits[e];
    if (std::isnan(l) || l == std::numeric_limits<float>::infinity()) return false;
    all_neg_inf = all_neg_inf && l == -std::numeric_limits<float>::infinity();
  }
  // A softmax over E, or over the k best (all -inf too where every logit is), of only -inf is NaN.
  return !(scoring != Scoring::kSigmoid && all_neg_inf);
}

void route_token(const float* scores, const float* selection_bias, const GatingConfig& config,
                 GatingScratch& scratch, float* topk_weights, int32_t* expert_ids) {
  const int64_t num_experts = config.num_experts;
  float* choice = scratch.choice.data();
  ScoredExpert* queue = scratch.queue.data();
  for (int64_t e = 0; e < num_experts; ++e) {
    // float32 + float32, as transformers adds the bias to the float32 scores.
    choice[e] = selection_bias != nullptr ? scores[e] + selection_bias[e] : scores[e];
  }

  if (config.n_group > 1) {
    // DeepSeek-V3: a group scores the sum of its two best choices; experts outside the best
    // topk_group groups get a choice of -inf (as transformers v5 does), so a chosen group's expert
    // wins even when the selection bias makes its choice score negative.
    float* group_scores = scratch.group_scores.data();
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
      group_scores[g] = first + second;
    }
    select_topk_like_torch(group_scores, config.n_group, config.topk_group, queue);
    // Keep the chosen groups' choices, mask the others (a chosen group's score becomes NaN).
    for (int64_t j = 0; j < config.topk_group; ++j) {
      group_scores[queue[j].second] = std::numeric_limits<float>::quiet_NaN();
    }
    for (int64_t g = 0; g < config.n_group; ++g) {
      if (std::isnan(group_scores[g])) continue;
      std::fill(choice + g * group_size, choice + (g + 1) * group_size,
                -std::numeric_limits<float>::infinity());
    }
  }

  select_topk_like_torch(choice, num_experts, config.top_k, queue);
  for (int64_t j = 0; j < config.top_k; ++j) {
    expert_ids[j] = static_cast<int32_t>(queue[j].second);
    topk_weights[j] = scores[queue[j].second];
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
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(MOE_INFER_PARAMS(topk_gating)) {
  const GatingSizes sizes = check_topk_gating(MOE_INFER_ARGS(topk_gating));
  // The kernel finds NaN logits as it goes, so on the CPU the checks always run.
  if (selection_bias.has_value()) check_finite_bias(*selection_bias);
  const GatingConfig config{sizes.num_experts,
                            sizes.top_k,
                            sizes.scoring,
                            renormalize,
                            static_cast<float>(scaling_factor),
                            sizes.n_group,
                            sizes.topk_group};
  const at::Tensor logits = float_contiguous(router_logits);
  const float* logits_ptr = logits.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / sizes.num_experts);
  std::atomic<int64_t> bad_token{sizes.num_tokens};
  at::parallel_for(0, sizes.num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (!routable_logits(logits_ptr + s * sizes.num_experts, sizes.num_experts, sizes.scoring)) {
        keep_smallest(bad_token, s);
        return;
      }
    }
  });
  if (bad_token.load() != sizes.num_tokens) fail_nonfinite_logits(bad_token.load());

  // The scores by the ATen ops transformers calls (softmax(logits.float()), sigmoid), so they are
  // bit for bit transformers' and the selection below ties exactly where torch.topk's does.
  at::Tensor scores = logits;
  // (at::softmax without a dtype is this call)
  if (sizes.scoring == Scoring::kSoftmax) scores = at::_softmax(logits, -1, false);
  if (sizes.scoring == Scoring::kSigmoid) scores = at::sigmoid(logits);
  at::Tensor bias;
  if (selection_bias.has_value()) bias = float_contiguous(*selection_bias);

  auto topk_weights = at::empty({sizes.num_tokens, k}, router_logits.options().dtype(at::kFloat));
  auto expert_ids = at::empty({sizes.num_tokens, k}, router_logits.options().dtype(at::kInt));
  const float* scores_ptr = scores.const_data_ptr<float>();
  const float* bias_ptr = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* weights_ptr = topk_weights.data_ptr<float>();
  int32_t* ids_ptr = expert_ids.data_ptr<int32_t>();
  at::parallel_for(0, sizes.num_tokens, grain, [&](int64_t begin, int64_t end) {
    GatingScratch scratch(config);
    for (int64_t s = begin; s < end; ++s) {
      route_token(scores_ptr + s * sizes.num_experts, bias_ptr, config, scratch,
                  weights_ptr + s * k, ids_ptr + s * k);
    }
  });
  return {topk_weights, expert_ids};
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) { m.impl("topk_gating", &topk_gating_cpu); }

}  // namespace moe_infer
