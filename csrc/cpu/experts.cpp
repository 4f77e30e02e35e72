// CPU grouped expert MLP: the shared per-expert GEMM loop (ATen's BLAS, weights read through
// views) with a parallel fused activation.
#include "experts.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/composite.h"

namespace moe_infer {

namespace {

void activate_rows(const at::Tensor& fc1_out, const ActivationParams& params,
                   const at::Tensor& out) {
  const int64_t num_rows = fc1_out.size(0);
  const int64_t fc1_width = fc1_out.size(1);
  const int64_t ffn_size = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, fc1_out.scalar_type(), "grouped_mlp_activation", [&] {
        const scalar_t* in_ptr = fc1_out.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fc1_width, 1));
        at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            activate_row(in_ptr + r * fc1_width, ffn_size, params, out_ptr + r * ffn_size);
          }
        });
      });
}

}  // namespace

at::Tensor grouped_mlp_cpu(const at::Tensor& hidden, const at::Tensor& expert_offsets,
                           const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                           const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                           const std::string& activation, bool weights_transposed,
                           double swiglu_alpha, double swiglu_limit) {
  const MlpSizes sizes = check_grouped_mlp(hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight,
                                           fc2_bias, activation, weights_transposed);
  const std::vector<int32_t> offsets = host_expert_offsets(expert_offsets, sizes.num_rows);
  const ActivationParams params{sizes.activation, static_cast<float>(swiglu_alpha),
                                static_cast<float>(swiglu_limit)};
  const bool use_kernels = kernels_enabled();
  return grouped_mlp_per_expert(hidden, offsets, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                weights_transposed, sizes,
                                [&](const at::Tensor& fc1_out, const at::Tensor& act) {
                                  if (use_kernels) {
                                    activate_rows(fc1_out, params, act);
                                  } else {
                                    composite::activate(fc1_out, params, act);
                                  }
                                });
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) { m.impl("grouped_mlp", &grouped_mlp_cpu); }

}  // namespace moe_infer
