// Top-k gating on the GPU: one warp per token, scores in shared memory, softmax in float32 and
// top-k by k warp-wide arg-max passes. Same contract as the CPU route_token: best first, ties to
// the lower expert id, and the same scoring variants.
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace moe_infer::kernels {

struct GatingKernelParams {
  int num_experts;
  int top_k;    // <= 32
  int scoring;  // Scoring as int: 0 softmax, 1 softmax_topk, 2 sigmoid
  bool renormalize;
  float scaling_factor;
  int n_group;
  int topk_group;
};

constexpr int kGatingWarpsPerBlock = 4;

__host__ __device__ inline int64_t gating_shared_floats_per_warp(int num_experts, int n_group) {
  return 2 * static_cast<int64_t>(num_experts) + n_group;
}

// Warp-wide arg-max of `values` over [0, n), skipping NaN ("taken"); ties to the lower index.
// Returns -1 when every value is NaN.
__device__ __forceinline__ int warp_argmax_skip_nan(const float* values, int n, int lane) {
  float best_value = 0.0f;
  int best = -1;
  for (int i = lane; i < n; i += kWarpSize) {
    const float v = values[i];
    if (!isnan(v) && (best < 0 || v > best_value)) {
      best = i;
      best_value = v;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_value = __shfl_xor_sync(kFullMask, best_value, offset);
    const int other = __shfl_xor_sync(kFullMask, best, offset);
    const bool take = other >= 0 && (best < 0 || other_value > best_value ||
                                     (other_value == best_value && other < best));
    if (take) {
      best = other;
      best_value = other_value;
    }
  }
  return best;
}

template <typename T>
__global__ void topk_gating_kernel(const T* __restrict__ logits, int64_t num_tokens,
                                   const float* __restrict__ selection_bias, GatingKernelParams p,
                                   float* __restrict__ topk_weights,
                                   int32_t* __restrict__ expert_ids, DeviceError* error) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kGatingWarpsPerBlock + warp;
  if (token >= num_tokens) return;  // the whole warp leaves together
  const int num_experts = p.num_experts;
  float* scores = shared + warp * gating_shared_floats_per_warp(num_experts, p.n_group);
  float* choice = scores + num_experts;
  float* group_scores = choice + num_experts;
  const T* row = logits + token * num_experts;

  bool bad = false;
  float local_max = -INFINITY;
  for (int e = lane; e < num_experts; e += kWarpSize) {
    const float l = to_float(row[e]);
    bad |= isnan(l) || l == INFINITY;
    scores[e] = l;
    local_max = fmaxf(local_max, l);
  }
  const float max_logit = warp_max(local_max);
  bad = __any_sync(kFullMask, bad) || (p.scoring == 0 && max_logit == -INFINITY);
  if (bad) {
    // Memory-safe output (valid ids, NaN weights); the host reports the row when validating.
    if (lane < p.top_k) {
      expert_ids[token * p.top_k + lane] = lane;
      topk_weights[token * p.top_k + lane] = NAN;
    }
    if (lane == 0) report_device_error(error, kNonfiniteLogits, token, 0, num_experts);
    return;
  }
  __syncwarp();
  if (p.scoring == 0) {
    float local_sum = 0.0f;
    for (int e = lane; e < num_experts; e += kWarpSize) {
      const float x = expf(scores[e] - max_logit);
      scores[e] = x;
      local_sum += x;
    }
    const float inv_sum = 1.0f / warp_sum(local_sum);
    for (int e = lane; e < num_experts; e += kWarpSize) scores[e] *= inv_sum;
  } else if (p.scoring == 2) {
    for (int e = lane; e < num_experts; e += kWarpSize)
      scores[e] = 1.0f / (1.0f + expf(-scores[e]));
  }
  for (int e = lane; e < num_experts; e += kWarpSize) {
    // NaN marks "taken" below, so a NaN choice (an unvalidated NaN bias) counts as -inf.
    const float v = scores[e] + (selection_bias != nullptr ? selection_bias[e] : 0.0f);
    choice[e] = isnan(v) ? -INFINITY : v;
  }
  __syncwarp();

  if (p.n_group > 1) {
    // A group scores the sum of its two best choices; experts outside the best topk_group groups
    // get a choice of -inf, as transformers v5 does.
    const int group_size = num_experts / p.n_group;
    for (int g = lane; g < p.n_group; g += kWarpSize) {
      float first = -INFINITY, second = -INFINITY;
      for (int i = 0; i < group_size; ++i) {
        const float v = choice[g * group_size + i];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      const float sum = first + second;
      group_scores[g] = isnan(sum) ? -INFINITY : sum;
    }
    __syncwarp();
    for (int j = 0; j < p.topk_group; ++j) {
      const int best = warp_argmax_skip_nan(group_scores, p.n_group, lane);
      __syncwarp();  // every lane has read group_scores before lane 0 marks the winner
      if (lane == 0 && best >= 0) group_scores[best] = NAN;  // chosen
      __syncwarp();
    }
    for (int e = lane; e < num_experts; e += kWarpSize) {
      if (!isnan(group_scores[e / group_size])) choice[e] = -INFINITY;
    }
    __syncwarp();
  }

  int my_id = 0;
  float my_weight = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    const int best = warp_argmax_skip_nan(choice, num_experts, lane);  // >= 0: k <= E
    if (lane == j) {
      my_id = best;
      my_weight = scores[best];
    }
    __syncwarp();
    if (lane == 0) choice[best] = NAN;  // taken
    __syncwarp();
  }
  const bool active = lane < p.top_k;
  if (p.scoring == 1) {
    const float top = __shfl_sync(kFullMask, my_weight, 0);
    const float x = active ? expf(my_weight - top) : 0.0f;
    my_weight = x / warp_sum(x);
  } else if (p.renormalize) {
    const float sum = warp_sum(active ? my_weight : 0.0f);
    if (sum > 0.0f) my_weight /= sum;
  }
  if (active) {
    topk_weights[token * p.top_k + lane] = my_weight * p.scaling_factor;
    expert_ids[token * p.top_k + lane] = my_id;
  }
}

}  // namespace moe_infer::kernels
