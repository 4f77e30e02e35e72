// CUDA glue for grouped_mlp. bfloat16 with 16-byte-aligned sizes on sm90+: two torch._grouped_mm
// calls (CUTLASS grouped GEMMs reading the offsets on the device: no host sync, CUDA-graph
// capturable) around one fused bias + activation kernel, then one pass for fc2's bias and the
// unrouted rows. Otherwise: the shared per-expert cuBLAS loop (one host sync for the offsets).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "experts.h"
#include "kernels/experts.cuh"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MOE_INFER_HAS_GROUPED_MM 1
#include <ATen/ops/_grouped_mm.h>
#endif

namespace moe_infer {

namespace {

constexpr int kThreads = 256;

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The [E, K, N] operand view torch._grouped_mm takes, if this weight gives one it accepts as is:
// one of the last two dims contiguous, the other's stride a multiple of 16 bytes.
bool grouped_mm_operand_ok(const at::Tensor& b) {
  const int64_t elems16 = 16 / b.element_size();
  const bool k_major = b.stride(1) == 1 && b.stride(2) >= b.size(1) && b.stride(2) % elems16 == 0;
  const bool n_major = b.stride(2) == 1 && b.stride(1) >= b.size(2) && b.stride(1) % elems16 == 0;
  return aligned16(b) && (k_major || n_major);
}

// Where torch._grouped_mm has its CUTLASS fast path (sm90, sm100); elsewhere it syncs.
bool device_has_grouped_gemm(const at::Tensor& t) {
  int major = 0;
  int minor = 0;
  const int device = t.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return (major == 9 && minor == 0) || (major == 10 && minor == 0);
}

// With no offsets, every row is activated and there is no bias (the per-expert path's addmm
// already added it).
void launch_bias_activation(const at::Tensor& fc1_out, const std::optional<at::Tensor>& fc1_bias,
                            const at::Tensor* expert_offsets, const ActivationParams& params,
                            const at::Tensor& act) {
  const int64_t rows = act.size(0);
  if (rows == 0) return;
  const int num_experts = expert_offsets ? static_cast<int>(expert_offsets->size(0) - 1) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MOE_INFER_DISPATCH_FLOATS(act.scalar_type(), "grouped_mlp_activation", [&] {
    kernels::bias_activation_kernel<<<grid_size(rows), kThreads, 0, stream>>>(
        cuda_const_ptr<scalar_t>(fc1_out), fc1_out.stride(0), rows, act.size(1), params,
        fc1_bias.has_value() ? cuda_const_ptr<scalar_t>(*fc1_bias) : nullptr, fc1_out.size(1),
        expert_offsets ? expert_offsets->const_data_ptr<int32_t>() : nullptr, num_experts,
        cuda_ptr<scalar_t>(act));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor grouped_mlp_cuda(const at::Tensor& hidden, const at::Tensor& expert_offsets,
                            const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                            const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                            const std::string& activation, bool weights_transposed,
                            double swiglu_alpha, double swiglu_limit) {
  const MlpSizes sizes = check_grouped_mlp(hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight,
                                           fc2_bias, activation, weights_transposed);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const ActivationParams params{sizes.activation, static_cast<float>(swiglu_alpha),
                                static_cast<float>(swiglu_limit)};
  const at::Tensor offsets = expert_offsets.contiguous();
  // [E, H, F1] and [E, I, H] views: the GEMMs read the stored layout in place.
  const at::Tensor fc1 = weights_transposed ? fc1_weight : fc1_weight.transpose(1, 2);
  const at::Tensor fc2 = weights_transposed ? fc2_weight : fc2_weight.transpose(1, 2);

#ifdef MOE_INFER_HAS_GROUPED_MM
  // torch._grouped_mm's fast path: bf16, 16-byte aligned rows and operands, < 1024 groups.
  const at::Tensor x = hidden.contiguous();
  const bool grouped = hidden.scalar_type() == at::kBFloat16 && device_has_grouped_gemm(hidden) &&
                       sizes.num_experts < 1024 && sizes.hidden_size > 0 &&
                       sizes.hidden_size % 8 == 0 && sizes.ffn_size % 8 == 0 && aligned16(x) &&
                       grouped_mm_operand_ok(fc1) && grouped_mm_operand_ok(fc2);
  if (grouped) {
    if (sizes.num_rows == 0) return at::empty({0, sizes.hidden_size}, hidden.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // Offsets the GEMMs and kernels can trust without a host check (clamped, non-decreasing).
    auto clean = at::empty_like(offsets);
    kernels::sanitize_offsets_kernel<<<1, 1, 0, stream>>>(
        offsets.const_data_ptr<int32_t>(), static_cast<int>(sizes.num_experts), sizes.num_rows,
        clean.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor group_ends = clean.narrow(0, 1, sizes.num_experts);
    // The kernels index biases densely.
    std::optional<at::Tensor> fc1_b, fc2_b;
    if (fc1_bias.has_value()) fc1_b = fc1_bias->contiguous();
    if (fc2_bias.has_value()) fc2_b = fc2_bias->contiguous();
    auto act = at::empty({sizes.num_rows, sizes.ffn_size}, hidden.options());
    const at::Tensor fc1_out = at::_grouped_mm(x, fc1, group_ends);
    launch_bias_activation(fc1_out, fc1_b, &clean, params, act);
    at::Tensor out = at::_grouped_mm(act, fc2, group_ends);
    MOE_INFER_DISPATCH_FLOATS(out.scalar_type(), "grouped_mlp_finalize", [&] {
      kernels::finalize_rows_kernel<<<grid_size(sizes.num_rows), kThreads, 0, stream>>>(
          cuda_ptr<scalar_t>(out), sizes.num_rows, sizes.hidden_size,
          fc2_b.has_value() ? cuda_const_ptr<scalar_t>(*fc2_b) : nullptr,
          clean.const_data_ptr<int32_t>(), static_cast<int>(sizes.num_experts));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
#endif
  TORCH_CHECK(!stream_is_capturing(),
              "grouped_mlp: CUDA-graph capture needs the grouped-GEMM path ",
              "(bfloat16, hidden and ffn sizes multiples of 8, an sm90/sm100 GPU); this call would "
              "read the expert offsets on the host");
  const std::vector<int32_t> host_offsets = host_expert_offsets(offsets, sizes.num_rows);
  return grouped_mlp_per_expert(
      hidden, host_offsets, fc1_weight, fc1_bias, fc2_weight, fc2_bias, weights_transposed, sizes,
      [&](const at::Tensor& fc1_out, const at::Tensor& act) {
        launch_bias_activation(fc1_out, std::nullopt, nullptr, params, act);
      });
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) { m.impl("grouped_mlp", &grouped_mlp_cuda); }

}  // namespace moe_infer
