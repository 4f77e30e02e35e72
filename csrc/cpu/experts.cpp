// CPU grouped expert MLP: per non-empty expert, fc1 GEMM (+bias) -> activation -> fc2 GEMM
// (+bias) straight into the output rows, with ATen's BLAS; weights are read through views.
#include "experts.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"

namespace moe_infer {

namespace {

// Host copy of the offsets, checked: non-decreasing, inside [0, num_rows].
std::vector<int32_t> checked_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
  const at::Tensor offsets = expert_offsets.contiguous();
  const int32_t* ptr = offsets.const_data_ptr<int32_t>();
  std::vector<int32_t> host(ptr, ptr + offsets.numel());
  TORCH_CHECK(host.front() >= 0, "grouped_mlp: expert_offsets[0] (", host.front(),
              ") must be >= 0");
  for (size_t e = 1; e < host.size(); ++e) {
    TORCH_CHECK(host[e] >= host[e - 1], "grouped_mlp: expert_offsets must be non-decreasing, but ",
                "expert_offsets[", e, "] (", host[e], ") < expert_offsets[", e - 1, "] (",
                host[e - 1], ")");
  }
  TORCH_CHECK(host.back() <= num_rows, "grouped_mlp: expert_offsets[-1] (", host.back(),
              ") exceeds the number of rows in hidden (", num_rows, ")");
  return host;
}

void activate_rows(const at::Tensor& fc1_out, int64_t ffn_size, const ActivationParams& params,
                   const at::Tensor& out) {
  const int64_t num_rows = fc1_out.size(0);
  const int64_t fc1_width = fc1_out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, fc1_out.scalar_type(), "grouped_mlp_activation", [&] {
        const scalar_t* in_ptr = fc1_out.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fc1_width, 1));
        at::parallel_for(0, num_rows, grain, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
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
  const std::vector<int32_t> offsets = checked_offsets(expert_offsets, sizes.num_rows);
  const ActivationParams params{sizes.activation, static_cast<float>(swiglu_alpha),
                                static_cast<float>(swiglu_limit)};

  auto out = at::empty({sizes.num_rows, sizes.hidden_size}, hidden.options());
  int64_t max_rows = 0;
  for (int64_t e = 0; e < sizes.num_experts; ++e) {
    max_rows = std::max<int64_t>(max_rows, offsets[e + 1] - offsets[e]);
  }
  // Scratch sized for the busiest expert, reused by every expert.
  auto fc1_buffer = at::empty({max_rows, sizes.fc1_outputs}, hidden.options());
  auto act_buffer = at::empty({max_rows, sizes.ffn_size}, hidden.options());

  for (int64_t e = 0; e < sizes.num_experts; ++e) {
    const int64_t begin = offsets[e];
    const int64_t rows = offsets[e + 1] - begin;
    if (rows == 0) continue;
    const at::Tensor x = hidden.narrow(0, begin, rows);
    // [H, F1] and [I, H] views of the expert's weights; BLAS reads the transposes in place.
    const at::Tensor fc1 =
        weights_transposed ? fc1_weight.select(0, e) : fc1_weight.select(0, e).t();
    const at::Tensor fc2 =
        weights_transposed ? fc2_weight.select(0, e) : fc2_weight.select(0, e).t();
    at::Tensor fc1_out = fc1_buffer.narrow(0, 0, rows);
    if (fc1_bias.has_value()) {
      at::addmm_out(fc1_out, fc1_bias->select(0, e), x, fc1);
    } else {
      at::mm_out(fc1_out, x, fc1);
    }
    at::Tensor act = act_buffer.narrow(0, 0, rows);
    activate_rows(fc1_out, sizes.ffn_size, params, act);
    at::Tensor y = out.narrow(0, begin, rows);
    if (fc2_bias.has_value()) {
      at::addmm_out(y, fc2_bias->select(0, e), act, fc2);
    } else {
      at::mm_out(y, act, fc2);
    }
  }
  // Rows outside every expert (unrouted pairs) are defined as zeros.
  if (offsets.front() > 0) out.narrow(0, 0, offsets.front()).zero_();
  if (offsets.back() < sizes.num_rows) {
    out.narrow(0, offsets.back(), sizes.num_rows - offsets.back()).zero_();
  }
  return out;
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) { m.impl("grouped_mlp", &grouped_mlp_cpu); }

}  // namespace moe_infer
