// Torch-free device code of topk_gating on CUDA: the sync-free check of the router logits (the
// selection itself is ATen's, so that it is torch.topk's on the device, ties included).
#pragma once

#include "kernels/common.cuh"

namespace moe_infer::kernels {

constexpr int kGatingCheckWarpsPerBlock = 8;

// One warp per token: records the first row it sees with a NaN or +inf logit, or (softmax scoring)
// with every logit -inf, as kNonfiniteLogits in `error` (common/device_errors.h).
template <typename T>
__global__ void check_router_logits_kernel(const T* __restrict__ logits, int64_t num_tokens,
                                           int num_experts, bool softmax, DeviceError* error) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kGatingCheckWarpsPerBlock + warp;
  if (token >= num_tokens) return;  // the whole warp leaves together
  const T* row = logits + token * num_experts;
  bool bad = false;
  bool all_neg_inf = true;
  for (int e = lane; e < num_experts; e += kWarpSize) {
    const float l = to_float(row[e]);
    bad |= isnan(l) || l == INFINITY;
    all_neg_inf &= l == -INFINITY;
  }
  bad = __any_sync(kFullMask, bad) || (softmax && __all_sync(kFullMask, all_neg_inf));
  if (bad && lane == 0) report_device_error(error, kNonfiniteLogits, token, 0, num_experts);
}

// Reports a NaN or infinite entry of topk_gating's selection_bias as kNonfiniteBias.
template <typename T>
__global__ void check_selection_bias_kernel(const T* __restrict__ bias, int64_t num_experts,
                                            DeviceError* error) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < num_experts;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!isfinite(to_float(bias[e]))) report_device_error(error, kNonfiniteBias, e, 0, num_experts);
  }
}

}  // namespace moe_infer::kernels
