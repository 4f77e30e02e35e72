// CPU grouped expert MLP: the shared per-expert GEMM loop (ATen's BLAS, weights read through
// views) with a parallel fused activation; and grouped_mlp_combine, the same expert compute with
// the gather and the weighted combine fused in, block by block.
#include "experts.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/composite.h"
#include "cpu/parallel.h"
#include "cpu/small_gemm.h"
#include "dispatch.h"

namespace moe_infer {

namespace {

// An element function of the activation table (unary_of) with ATen's vectorized kernels; false
// for one without (activate_row computes it from common/activation.h).
bool unary_out(Activation unary, at::Tensor& out, const at::Tensor& x) {
  switch (unary) {
    case Activation::kRelu:
      at::clamp_min_out(out, x, 0);
      return true;
    case Activation::kGelu:
      at::gelu_out(out, x);
      return true;
    case Activation::kGeluTanh:
      at::gelu_out(out, x, "tanh");
      return true;
    case Activation::kSilu:
      at::silu_out(out, x);
      return true;
    default:
      return false;
  }
}

// GPT-OSS's clamped swiGLU on interleaved gate/up columns, op by op as transformers computes it
// (so 16-bit types round where its eager experts round): (clamp(up) + 1) * g * sigmoid(alpha * g)
// with g = min(gate, limit).
void gpt_oss_swiglu_out(const at::Tensor& fc1_out, int64_t ffn_size, const ActivationParams& params,
                        at::Tensor& out) {
  const at::Tensor gate = fc1_out.slice(1, 0, 2 * ffn_size, 2).clamp_max(params.swiglu_limit);
  at::Tensor up =
      fc1_out.slice(1, 1, 2 * ffn_size, 2).clamp(-params.swiglu_limit, params.swiglu_limit);
  at::sigmoid_out(out, gate * params.swiglu_alpha);
  out.mul_(gate);
  up.add_(1);
  out.mul_(up);
}

// ATen's vectorized kernels (several times faster than the scalar loop; in 16-bit types they round
// as transformers' eager experts do: act(gate) rounded, then the product); float64 through
// activate_row.
bool activate_rows_vectorized(const at::Tensor& fc1_out, int64_t ffn_size,
                              const ActivationParams& params, at::Tensor out) {
  if (fc1_out.scalar_type() == at::kDouble) return false;
  if (params.activation == Activation::kGptOssSwiglu) {
    gpt_oss_swiglu_out(fc1_out, ffn_size, params, out);
    return true;
  }
  if (!unary_out(unary_of(params.activation), out, fc1_out.narrow(1, 0, ffn_size))) return false;
  if (is_gated(params.activation)) out.mul_(fc1_out.narrow(1, ffn_size, ffn_size));
  return true;
}

void activate_rows(const at::Tensor& fc1_out, const ActivationParams& params,
                   const at::Tensor& out) {
  const int64_t ffn_size = out.size(1);
  if (activate_rows_vectorized(fc1_out, ffn_size, params, out)) return;
  const int64_t num_rows = fc1_out.size(0);
  const int64_t fc1_width = fc1_out.size(1);
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

ActivateFn cpu_activation(const ActivationParams& params) {
  return [params](const at::Tensor& fc1_out, const at::Tensor& act) {
    activate_rows(fc1_out, params, act);
  };
}

// out = x @ w (+ bias) with small_gemm for an expert with few rows (decode), whose GEMM is bound by
// the bytes of its weights; false (ATen's GEMM) for more rows, other dtypes or layouts.
bool small_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                  const std::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0);
  if (rows == 0 || rows > kSmallGemmMaxRows) return false;
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  if (w.scalar_type() != dtype || out.scalar_type() != dtype) return false;
  if (bias.has_value() && (bias->scalar_type() != dtype || bias->stride(0) != 1)) return false;
  if (x.stride(1) != 1 || out.stride(1) != 1) return false;
  const bool k_contiguous = w.stride(0) == 1;
  if (!k_contiguous && w.stride(1) != 1) return false;
  const SmallGemmType type = dtype == at::kFloat ? SmallGemmType::kFloat : SmallGemmType::kBFloat16;
  if (!small_gemm_supported(type, k_contiguous)) return false;
  const SmallGemm gemm{type,
                       x.const_data_ptr(),
                       x.stride(0),
                       w.const_data_ptr(),
                       k_contiguous ? w.stride(1) : w.stride(0),
                       k_contiguous,
                       bias.has_value() ? bias->const_data_ptr() : nullptr,
                       out.data_ptr(),
                       out.stride(0),
                       rows,
                       w.size(0),
                       w.size(1)};
  const int64_t columns = w.size(1);
  const int64_t block = k_contiguous ? kSmallGemmColumnBlock : kSmallGemmRowMajorColumnBlock;
  at::parallel_for(0, (columns + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    small_gemm(gemm, begin * block, std::min(columns, end * block));
  });
  return true;
}

// Rows per block of grouped_mlp_combine: large enough that the GEMMs run as fast as on a whole
// expert (measured: Mixtral-like, 4096 tokens, within 1% of the unfused ops; 256 rows cost 6%),
// and the scratch stays bounded however many tokens come.
constexpr int64_t kCombineBlockRows = 1024;

}  // namespace

at::Tensor grouped_mlp_cpu(MOE_INFER_PARAMS(grouped_mlp)) {
  const MlpSizes sizes = check_grouped_mlp(MOE_INFER_ARGS(grouped_mlp));
  const std::vector<int32_t> offsets = host_expert_offsets(expert_offsets, sizes.num_rows);
  const ExpertWeights weights = expert_weights(MOE_INFER_EXPERT_ARGS);
  return grouped_mlp_per_expert(hidden, offsets, weights, sizes, cpu_activation(sizes.activation),
                                small_linear);
}

at::Tensor grouped_mlp_combine_cpu(MOE_INFER_PARAMS(grouped_mlp_combine)) {
  constexpr const char* op = "grouped_mlp_combine";
  const MlpCombineSizes sizes = check_grouped_mlp_combine(MOE_INFER_ARGS(grouped_mlp_combine));
  const int64_t num_tokens = sizes.mlp.num_rows;
  const int64_t hidden_size = sizes.mlp.hidden_size;
  const int64_t top_k = sizes.top_k;
  const int64_t num_pairs = num_tokens * top_k;
  const std::vector<int32_t> offsets =
      host_expert_offsets(expert_offsets, num_pairs, op, "pairs (num_tokens * top_k)");
  const at::Tensor pair_ids = sorted_pair_ids.contiguous();
  const int32_t* pair_ptr = pair_ids.const_data_ptr<int32_t>();
  for (int64_t r = offsets.front(); r < offsets.back(); ++r) {
    TORCH_CHECK_VALUE(pair_ptr[r] >= 0 && pair_ptr[r] < num_pairs, op, ": sorted_pair_ids[", r,
                      "] = ", pair_ptr[r], " is out of range [0, ", num_pairs,
                      "); pass the output of dispatch_plan");
  }
  const ActivateFn activate = cpu_activation(sizes.mlp.activation);
  const ExpertWeights ffn_weights = expert_weights(MOE_INFER_EXPERT_ARGS);

  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  // float32 accumulation; for a float32 hidden the accumulator is the output itself.
  auto accumulator = at::zeros({num_tokens, hidden_size}, hidden.options().dtype(at::kFloat));
  int64_t block_rows = 0;
  for (int64_t e = 0; e < sizes.mlp.num_experts; ++e) {
    block_rows = std::max<int64_t>(block_rows, offsets[e + 1] - offsets[e]);
  }
  block_rows = std::min(block_rows, kCombineBlockRows);
  auto x_block = at::empty({block_rows, hidden_size}, hidden.options());
  auto y_block = at::empty({block_rows, hidden_size}, hidden.options());
  auto fc1_buffer = at::empty({block_rows, sizes.mlp.fc1_outputs}, hidden.options());
  auto act_buffer = at::empty({block_rows, sizes.mlp.ffn_size}, hidden.options());

  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const int64_t row_bytes = hidden_size * element_bytes;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  const int64_t src_stride_bytes = rows.stride(0) * element_bytes;
  const int64_t grain = row_grain(row_bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "grouped_mlp_combine", [&] {
        const float* weights_ptr = weights.const_data_ptr<float>();
        float* acc_ptr = accumulator.data_ptr<float>();
        for (int64_t e = 0; e < sizes.mlp.num_experts; ++e) {
          for (int64_t begin = offsets[e]; begin < offsets[e + 1]; begin += block_rows) {
            const int64_t n = std::min<int64_t>(block_rows, offsets[e + 1] - begin);
            const int32_t* block_pairs = pair_ptr + begin;
            char* x_ptr = static_cast<char*>(x_block.data_ptr());
            at::parallel_for(0, n, grain, [&](int64_t b, int64_t end) {
              permute_rows(src, src_stride_bytes, row_bytes, block_pairs, top_k, b, end, x_ptr);
            });
            at::Tensor y = y_block.narrow(0, 0, n);
            expert_ffn(e, x_block.narrow(0, 0, n), ffn_weights, fc1_buffer, act_buffer, activate, y,
                       small_linear);
            const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
            at::parallel_for(0, n, grain, [&](int64_t b, int64_t end) {
              accumulate_weighted_rows(y_ptr + b * hidden_size, end - b, hidden_size,
                                       block_pairs + b, weights_ptr, top_k, acc_ptr,
                                       CpuAddWeightedRow{});
            });
          }
        }
      });
  return hidden.scalar_type() == at::kFloat ? accumulator : accumulator.to(hidden.scalar_type());
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) {
  m.impl("grouped_mlp", &grouped_mlp_cpu);
  m.impl("grouped_mlp_combine", &grouped_mlp_combine_cpu);
}

}  // namespace moe_infer
