// CUDA glue for grouped_mlp and grouped_mlp_combine. bfloat16 with 16-byte-aligned sizes on
// sm90/sm100: two torch._grouped_mm calls (CUTLASS grouped GEMMs reading the offsets on the
// device: no host sync, CUDA-graph capturable) around one fused bias + activation kernel; the
// offsets are checked on the device (common/device_errors.h) and clamped so the GEMMs can trust
// them. Otherwise: the shared per-expert cuBLAS loop (one host sync for the offsets).
// grouped_mlp_combine gathers the rows (writing the inverse permutation as it goes), runs the
// same expert compute, and adds fc2's bias inside the weighted combine: 7 launches in all.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "common/device_errors.h"
#include "dispatch.h"
#include "experts.h"
#include "kernels/experts.cuh"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MOE_INFER_HAS_GROUPED_MM 1
#include <ATen/ops/_grouped_mm.h>
#endif

namespace moe_infer {

namespace {

constexpr int kThreads = 256;

// Whether torch._grouped_mm takes this operand (the [rows, K] activations or an [E, K, N] weight
// view) as it is, mirroring its stride check (ATen/native/GroupedMMUtils.h) instead of letting it
// raise: a 16-byte-aligned start; for a 3-D operand a 16-byte-multiple stride between experts;
// one of the last two dims contiguous (tested in torch's order) and the other's stride covering
// it and a multiple of 16 bytes.
bool grouped_mm_operand_ok(const at::Tensor& mat) {
  const int64_t alignment = 16 / mat.element_size();
  const int64_t last = mat.dim() - 1;
  if (!aligned16(mat)) return false;
  if (mat.dim() == 3 && mat.stride(0) % alignment != 0) return false;
  if (mat.stride(last - 1) == 1 && mat.stride(last) >= std::max<int64_t>(1, mat.size(last - 1))) {
    return mat.stride(last) % alignment == 0;
  }
  if (mat.stride(last) == 1 && mat.stride(last - 1) >= std::max<int64_t>(1, mat.size(last))) {
    return mat.stride(last - 1) % alignment == 0;
  }
  return false;
}

// The rows as a grouped-GEMM operand: .contiguous() keeps a 1-row tensor's odd stride(0), which
// torch refuses, so such rows are copied into a fresh dense tensor.
at::Tensor grouped_mm_rows(const at::Tensor& rows) {
  const at::Tensor x = rows.contiguous();
  if (grouped_mm_operand_ok(x)) return x;
  return at::empty(x.sizes(), x.options()).copy_(x);
}

// Where torch._grouped_mm has its CUTLASS fast path (sm90, sm100); elsewhere it syncs.
bool device_has_grouped_gemm(c10::DeviceIndex device) {
  const DeviceInfo& info = device_info(device);
  return (info.major == 9 || info.major == 10) && info.minor == 0;
}

// Blocks for a grid-stride kernel of `items` threads' work: a few waves of the device at most.
int wave_grid(int64_t items, c10::DeviceIndex device) {
  const int64_t sms = device_info(device).multiprocessors;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(kernels::ceil_div(items, kThreads), sms * 2048 / kThreads * 4)));
}

kernels::GateLayout gate_layout(Activation activation, int64_t ffn_size) {
  if (!is_gated(activation)) return kernels::GateLayout::kUngated;
  if (up_column(activation, 0, ffn_size) == ffn_size) return kernels::GateLayout::kHalves;
  TORCH_INTERNAL_ASSERT(up_column(activation, 0, ffn_size) == 1 && gate_column(activation, 1) == 2,
                        "grouped_mlp: no CUDA kernel for this activation's column layout");
  return kernels::GateLayout::kInterleaved;
}

// act = activation(fc1_out + fc1_bias[expert]) over the routed rows; 16-byte accesses when every
// row start allows them. With no offsets every row is activated and there is no bias (the
// per-expert path's addmm already added it).
void launch_bias_activation(const at::Tensor& fc1_out, const std::optional<at::Tensor>& fc1_bias,
                            const int32_t* expert_offsets, int num_experts,
                            const ActivationParams& params, const at::Tensor& act) {
  const int64_t rows = act.size(0);
  const int64_t ffn_size = act.size(1);
  if (rows == 0 || ffn_size == 0) return;
  const kernels::GateLayout layout = gate_layout(params.activation, ffn_size);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = act.device().index();
  MOE_INFER_DISPATCH_FLOATS(act.scalar_type(), "grouped_mlp_activation", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVector = 16 / sizeof(T);
    const T* bias = fc1_bias.has_value() ? cuda_const_ptr<scalar_t>(*fc1_bias) : nullptr;
    const bool vectorize = ffn_size % kVector == 0 && fc1_out.stride(0) % kVector == 0 &&
                           aligned16(fc1_out) && aligned16(act) &&
                           (bias == nullptr || aligned16(bias));
    launch_vectorized<T>(vectorize, [&](auto vector) {
      constexpr int N = decltype(vector)::value;
      kernels::bias_activation_kernel<T, N>
          <<<wave_grid(rows * (ffn_size / N), device), kThreads, 0, stream>>>(
              cuda_const_ptr<scalar_t>(fc1_out), fc1_out.stride(0), rows, ffn_size, params, layout,
              bias, fc1_out.size(1), expert_offsets, num_experts, cuda_ptr<scalar_t>(act));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

#ifdef MOE_INFER_HAS_GROUPED_MM
// Whether x [rows, H] and the [E, H, F1] / [E, I, H] weight views take the grouped-GEMM path.
bool grouped_path(const at::Tensor& x, const MlpSizes& sizes, const at::Tensor& fc1,
                  const at::Tensor& fc2) {
  return x.scalar_type() == at::kBFloat16 && device_has_grouped_gemm(x.device().index()) &&
         sizes.num_experts < 1024 && sizes.hidden_size > 0 && sizes.hidden_size % 8 == 0 &&
         sizes.ffn_size % 8 == 0 && grouped_mm_operand_ok(x) && grouped_mm_operand_ok(fc1) &&
         grouped_mm_operand_ok(fc2);
}

// The offsets checked on the device (violations raised later, as the per-expert path raises
// them now) and clamped so the GEMMs and kernels can trust them: one warp, one launch.
at::Tensor sanitized_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
  const at::Tensor offsets = expert_offsets.contiguous();
  const c10::DeviceIndex device = offsets.device().index();
  if (!stream_is_capturing()) raise_device_error(device, false);
  auto clean = at::empty_like(offsets);
  kernels::sanitize_offsets_kernel<<<1, kernels::kWarpSize, 0, c10::cuda::getCurrentCUDAStream()>>>(
      offsets.const_data_ptr<int32_t>(), static_cast<int>(offsets.size(0) - 1), num_rows,
      clean.data_ptr<int32_t>(), device_error_record(device));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return clean;
}

// fc2(activation(fc1(x) + fc1_bias)) for the routed rows of x (rows >= clean[E] are left as
// they come out of the GEMM: callers zero or skip them); no fc2 bias.
at::Tensor grouped_ffn(const at::Tensor& x, const at::Tensor& clean, const at::Tensor& fc1,
                       const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2,
                       const MlpSizes& sizes) {
  const at::Tensor group_ends = clean.narrow(0, 1, sizes.num_experts);
  std::optional<at::Tensor> fc1_b;  // the kernel indexes biases densely
  if (fc1_bias.has_value()) fc1_b = fc1_bias->contiguous();
  auto act = at::empty({x.size(0), sizes.ffn_size}, x.options());
  const at::Tensor fc1_out = at::_grouped_mm(x, fc1, group_ends);
  launch_bias_activation(fc1_out, fc1_b, clean.const_data_ptr<int32_t>(),
                         static_cast<int>(sizes.num_experts), sizes.activation, act);
  return at::_grouped_mm(act, fc2, group_ends);
}
#endif

// The per-expert cuBLAS loop, for what the grouped GEMMs do not take (reads the offsets on the
// host, which a captured stream cannot).
at::Tensor per_expert_mlp(const at::Tensor& x, const at::Tensor& expert_offsets,
                          const ExpertWeights& weights, const MlpSizes& sizes, const char* op) {
  TORCH_CHECK(!stream_is_capturing(), op, ": CUDA-graph capture needs the grouped-GEMM path ",
              "(bfloat16, hidden and ffn sizes multiples of 8, an sm90/sm100 GPU); this call would "
              "read the expert offsets on the host");
  const std::vector<int32_t> host_offsets =
      host_expert_offsets(expert_offsets.contiguous(), x.size(0));
  return grouped_mlp_per_expert(
      x, host_offsets, weights, sizes, [&](const at::Tensor& fc1_out, const at::Tensor& act) {
        launch_bias_activation(fc1_out, std::nullopt, nullptr, 0, sizes.activation, act);
      });
}

}  // namespace

at::Tensor grouped_mlp_cuda(MOE_INFER_PARAMS(grouped_mlp)) {
  const MlpSizes sizes = check_grouped_mlp(MOE_INFER_ARGS(grouped_mlp));
  const c10::cuda::CUDAGuard guard(hidden.device());
  const ExpertWeights weights = expert_weights(MOE_INFER_EXPERT_ARGS);
#ifdef MOE_INFER_HAS_GROUPED_MM
  const at::Tensor fc1 = weights.fc1_in_out();
  const at::Tensor fc2 = weights.fc2_in_out();
  const at::Tensor x = grouped_mm_rows(hidden);
  if (grouped_path(x, sizes, fc1, fc2)) {
    if (sizes.num_rows == 0) return at::empty({0, sizes.hidden_size}, hidden.options());
    const at::Tensor clean = sanitized_offsets(expert_offsets, sizes.num_rows);
    at::Tensor out = grouped_ffn(x, clean, fc1, fc1_bias, fc2, sizes);
    std::optional<at::Tensor> fc2_b;
    if (fc2_bias.has_value()) fc2_b = fc2_bias->contiguous();
    MOE_INFER_DISPATCH_FLOATS(out.scalar_type(), "grouped_mlp_finalize", [&] {
      kernels::finalize_rows_kernel<<<grid_size(sizes.num_rows), kThreads, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(
          cuda_ptr<scalar_t>(out), sizes.num_rows, sizes.hidden_size,
          fc2_b.has_value() ? cuda_const_ptr<scalar_t>(*fc2_b) : nullptr,
          clean.const_data_ptr<int32_t>(), static_cast<int>(sizes.num_experts));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
#endif
  return per_expert_mlp(hidden, expert_offsets, weights, sizes, "grouped_mlp");
}

at::Tensor grouped_mlp_combine_cuda(MOE_INFER_PARAMS(grouped_mlp_combine)) {
  const MlpCombineSizes sizes = check_grouped_mlp_combine(MOE_INFER_ARGS(grouped_mlp_combine));
  const c10::cuda::CUDAGuard guard(hidden.device());
  const ExpertWeights weights = expert_weights(MOE_INFER_EXPERT_ARGS);
  const int64_t num_tokens = sizes.mlp.num_rows;
  const int64_t num_pairs = num_tokens * sizes.top_k;
  MlpSizes row_sizes = sizes.mlp;
  row_sizes.num_rows = num_pairs;
  auto out = at::empty({num_tokens, sizes.mlp.hidden_size}, hidden.options());
  if (num_tokens == 0) return out;
  // Gather into expert order; the inverse permutation comes out of the same pass.
  auto rows = at::empty({num_pairs, sizes.mlp.hidden_size}, hidden.options());
  auto row_of_pair = at::empty({num_pairs}, sorted_pair_ids.options());
  launch_permute_rows(hidden.stride(1) == 1 ? hidden : hidden.contiguous(),
                      sorted_pair_ids.contiguous(), sizes.top_k, rows,
                      row_of_pair.data_ptr<int32_t>());
#ifdef MOE_INFER_HAS_GROUPED_MM
  const at::Tensor fc1 = weights.fc1_in_out();
  const at::Tensor fc2 = weights.fc2_in_out();
  if (grouped_path(rows, row_sizes, fc1, fc2)) {
    const at::Tensor clean = sanitized_offsets(expert_offsets, num_pairs);
    const at::Tensor expert_rows = grouped_ffn(rows, clean, fc1, fc1_bias, fc2, row_sizes);
    std::optional<at::Tensor> fc2_b;
    if (fc2_bias.has_value()) fc2_b = fc2_bias->contiguous();
    launch_unpermute_combine(expert_rows, topk_weights, row_of_pair,
                             clean.const_data_ptr<int32_t>(),
                             static_cast<int>(sizes.mlp.num_experts), fc2_b, out);
    return out;
  }
#endif
  const at::Tensor expert_rows =
      per_expert_mlp(rows, expert_offsets, weights, row_sizes, "grouped_mlp_combine");
  launch_unpermute_combine(expert_rows, topk_weights, row_of_pair, nullptr, 0, std::nullopt, out);
  return out;
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) {
  m.impl("grouped_mlp", &grouped_mlp_cuda);
  m.impl("grouped_mlp_combine", &grouped_mlp_combine_cuda);
}

}  // namespace moe_infer
