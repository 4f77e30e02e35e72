// CUDA glue for topk_gating: checks, device guard, current stream, launch, optional validation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "kernels/gating.cuh"

namespace moe_infer {

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& router_logits, int64_t k,
                                                    const std::string& scoring, bool renormalize,
                                                    const std::optional<at::Tensor>& selection_bias,
                                                    double scaling_factor, int64_t n_group,
                                                    int64_t topk_group, bool validate) {
  const GatingSizes sizes = check_topk_gating(router_logits, k, scoring, selection_bias,
                                              scaling_factor, n_group, topk_group);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const bool check = validate && !stream_is_capturing();
  const int64_t floats_per_warp =
      kernels::gating_shared_floats_per_warp(static_cast<int>(sizes.num_experts), n_group);
  const int64_t shared_bytes = floats_per_warp * kernels::kGatingWarpsPerBlock * sizeof(float);
  if (k > kernels::kWarpSize || shared_bytes > 48 * 1024) {
    // Beyond the warp kernel's reach (k > 32, or about 1500+ experts): the composite version.
    return composite::topk_gating(router_logits, sizes, renormalize, selection_bias, scaling_factor,
                                  check);
  }
  if (check && selection_bias.has_value()) check_finite_bias(*selection_bias);
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor bias;
  if (selection_bias.has_value()) bias = selection_bias->to(at::kFloat).contiguous();
  auto topk_weights = at::empty({sizes.num_tokens, k}, logits.options().dtype(at::kFloat));
  auto expert_ids = at::empty({sizes.num_tokens, k}, logits.options().dtype(at::kInt));
  if (sizes.num_tokens == 0) return {topk_weights, expert_ids};
  auto bad_row =
      at::full({1}, std::numeric_limits<int32_t>::max(), logits.options().dtype(at::kInt));

  const kernels::GatingKernelParams params{
      static_cast<int>(sizes.num_experts), static_cast<int>(k),
      static_cast<int>(sizes.scoring),     renormalize,
      static_cast<float>(scaling_factor),  static_cast<int>(n_group),
      static_cast<int>(topk_group)};
  const int64_t blocks = kernels::ceil_div(sizes.num_tokens, kernels::kGatingWarpsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "topk_gating: too many tokens");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MOE_INFER_DISPATCH_FLOATS(logits.scalar_type(), "topk_gating", [&] {
    kernels::topk_gating_kernel<<<static_cast<unsigned>(blocks),
                                  kernels::kGatingWarpsPerBlock * kernels::kWarpSize, shared_bytes,
                                  stream>>>(cuda_const_ptr<scalar_t>(logits), sizes.num_tokens,
                                            bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                                            params, topk_weights.data_ptr<float>(),
                                            expert_ids.data_ptr<int32_t>(),
                                            bad_row.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check) {
    const int32_t row = bad_row.item<int32_t>();
    if (row != std::numeric_limits<int32_t>::max()) fail_nonfinite_logits(row);
  }
  return {topk_weights, expert_ids};
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) { m.impl("topk_gating", &topk_gating_cuda); }

}  // namespace moe_infer
