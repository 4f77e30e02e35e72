// CUDA glue for topk_gating: checks, device guard, then ATen ops on the current stream (so the
// experts chosen are torch.topk's on the device, ties included); the router logits are validated
// on the device and an error is raised later without a host sync (common/device_errors.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "common/device_errors.h"
#include "kernels/gating.cuh"

namespace moe_infer {

namespace {

void check_router_logits_on_device(const at::Tensor& logits, const GatingSizes& sizes) {
  if (sizes.num_tokens == 0) return;
  const c10::DeviceIndex device = logits.device().index();
  raise_device_error(device, false);  // an earlier kernel's report, without waiting
  kernels::DeviceError* error = device_error_record(device);
  const at::Tensor rows = logits.contiguous();
  const int64_t blocks = kernels::ceil_div(sizes.num_tokens, kernels::kGatingCheckWarpsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "topk_gating: too many tokens");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MOE_INFER_DISPATCH_FLOATS(rows.scalar_type(), "topk_gating", [&] {
    kernels::check_router_logits_kernel<<<static_cast<unsigned>(blocks),
                                          kernels::kGatingCheckWarpsPerBlock * kernels::kWarpSize,
                                          0, stream>>>(
        cuda_const_ptr<scalar_t>(rows), sizes.num_tokens, static_cast<int>(sizes.num_experts),
        sizes.scoring != Scoring::kSigmoid, error);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// DeepSeek-V3's e_score_correction_bias, checked the same way (no host sync).
void check_selection_bias_on_device(const at::Tensor& selection_bias) {
  const at::Tensor bias = selection_bias.contiguous();
  const int64_t num_experts = bias.numel();
  if (num_experts == 0) return;
  kernels::DeviceError* error = device_error_record(bias.device().index());
  constexpr int kThreads = 256;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>(kernels::ceil_div(num_experts, kThreads), 1024));
  MOE_INFER_DISPATCH_FLOATS(bias.scalar_type(), "topk_gating", [&] {
    kernels::
        check_selection_bias_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            cuda_const_ptr<scalar_t>(bias), num_experts, error);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(MOE_INFER_PARAMS(topk_gating)) {
  const GatingSizes sizes = check_topk_gating(MOE_INFER_ARGS(topk_gating));
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const bool check = validate && !stream_is_capturing();
  if (check) check_router_logits_on_device(router_logits, sizes);  // raises earlier reports first
  if (check && selection_bias.has_value()) check_selection_bias_on_device(*selection_bias);
  // The scores and the selection by the ATen ops transformers calls (softmax / sigmoid in float32,
  // torch.topk on the device); the logits' check above replaces the composite's host-side one.
  return composite::topk_gating(router_logits, sizes, renormalize, selection_bias, scaling_factor,
                                false);
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) { m.impl("topk_gating", &topk_gating_cuda); }

}  // namespace moe_infer
