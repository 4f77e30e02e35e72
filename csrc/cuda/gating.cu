// CUDA glue for topk_gating: checks, device guard, then ATen ops on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"

namespace moe_infer {

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& router_logits, int64_t k,
                                                    const std::string& scoring, bool renormalize,
                                                    const std::optional<at::Tensor>& selection_bias,
                                                    double scaling_factor, int64_t n_group,
                                                    int64_t topk_group, bool validate) {
  const GatingSizes sizes = check_topk_gating(router_logits, k, scoring, selection_bias,
                                              scaling_factor, n_group, topk_group);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  // The scores and the selection by the ATen ops transformers calls (softmax / sigmoid in float32,
  // torch.topk on the device): the experts chosen are torch.topk's on CUDA, ties included.
  return composite::topk_gating(router_logits, sizes, renormalize, selection_bias, scaling_factor,
                                validate && !stream_is_capturing());
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) { m.impl("topk_gating", &topk_gating_cuda); }

}  // namespace moe_infer
