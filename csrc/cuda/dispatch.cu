// CUDA glue for dispatch_plan (CUB stable radix sort by expert; ids validated on the device, the
// error raised later without a host sync: common/device_errors.h), permute and unpermute_combine.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <limits>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "common/device_errors.h"
#include "dispatch.h"
#include "kernels/dispatch.cuh"

namespace moe_infer {

namespace {

constexpr int kThreads = 256;

int bits_for(int64_t max_key) {
  int bits = 1;
  while ((int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cuda(
    MOE_INFER_PARAMS(dispatch_plan)) {
  const PlanSizes sizes = check_dispatch_plan(MOE_INFER_ARGS(dispatch_plan));
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  kernels::DeviceError* error = nullptr;
  if (validate) {
    if (!stream_is_capturing()) raise_device_error(expert_ids.device().index(), false);
    error = device_error_record(expert_ids.device().index());
  }

  const at::Tensor ids = expert_ids.contiguous();
  const auto int_options = ids.options().dtype(at::kInt);
  const int64_t n = sizes.num_pairs;
  auto keys = at::empty({n}, int_options);
  auto values = at::empty({n}, int_options);
  auto sorted_keys = at::empty({n}, int_options);
  auto sorted_pair_ids = at::empty({n}, int_options);
  auto row_of_pair = at::empty({n}, int_options);
  auto tokens_per_expert = at::empty({num_experts}, int_options);
  auto expert_offsets = at::empty({num_experts + 1}, int_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int E = static_cast<int>(num_experts);

  if (n > 0) {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "dispatch_plan", [&] {
      kernels::plan_keys_kernel<<<grid_size(n, kThreads), kThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), n, E, static_cast<int>(sizes.top_k),
          keys.data_ptr<int32_t>(), values.data_ptr<int32_t>(), error);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // LSD radix sort is stable: pairs of one expert keep their (token, slot) order. Keys are in
    // [0, E], sorted as unsigned over their low bits only.
    const int end_bit = bits_for(num_experts);
    const auto* keys_in = reinterpret_cast<const uint32_t*>(keys.const_data_ptr<int32_t>());
    auto* keys_out = reinterpret_cast<uint32_t*>(sorted_keys.data_ptr<int32_t>());
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys_in, keys_out, values.data_ptr<int32_t>(),
        sorted_pair_ids.data_ptr<int32_t>(), static_cast<int>(n), 0, end_bit, stream));
    auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, keys_in, keys_out, values.data_ptr<int32_t>(),
        sorted_pair_ids.data_ptr<int32_t>(), static_cast<int>(n), 0, end_bit, stream));
  }
  kernels::plan_offsets_kernel<<<grid_size(n + 1, kThreads), kThreads, 0, stream>>>(
      sorted_keys.const_data_ptr<int32_t>(), sorted_pair_ids.const_data_ptr<int32_t>(), n, E,
      row_of_pair.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
      tokens_per_expert.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets};
}

void launch_permute_rows(const at::Tensor& hidden, const at::Tensor& pair_ids, int64_t top_k,
                         const at::Tensor& out, int32_t* row_of_pair) {
  const int64_t num_rows = out.size(0);
  const int64_t hidden_size = out.size(1);
  if (num_rows == 0 || hidden_size == 0) return;
  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const int64_t row_bytes = hidden_size * element_bytes;
  const int64_t stride_bytes = hidden.stride(0) * element_bytes;
  const auto address = reinterpret_cast<uintptr_t>(hidden.const_data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto vector_tag) {
    using VecT = decltype(vector_tag);
    const int64_t vectors = row_bytes / static_cast<int64_t>(sizeof(VecT));
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, vectors)));
    kernels::permute_kernel<VecT><<<grid_size(num_rows), threads, 0, stream>>>(
        static_cast<const char*>(hidden.const_data_ptr()), stride_bytes, vectors,
        pair_ids.const_data_ptr<int32_t>(), static_cast<int>(top_k), hidden.size(0), num_rows,
        static_cast<char*>(out.data_ptr()), row_of_pair);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The widest access that every row start allows.
  auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && stride_bytes % bytes == 0 && address % bytes == 0;
  };
  if (aligned(16)) {
    launch(uint4{});
  } else if (aligned(8)) {
    launch(uint2{});
  } else if (aligned(4)) {
    launch(uint32_t{});
  } else if (aligned(2)) {
    launch(uint16_t{});
  } else {
    launch(uint8_t{});
  }
}

at::Tensor permute_cuda(MOE_INFER_PARAMS(permute)) {
  const RowSizes sizes = check_permute(MOE_INFER_ARGS(permute));
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  auto out = at::empty({sizes.num_tokens * top_k, sizes.hidden_size}, hidden.options());
  launch_permute_rows(rows, sorted_pair_ids.contiguous(), top_k, out);
  return out;
}

void launch_unpermute_combine(const at::Tensor& rows, const at::Tensor& topk_weights,
                              const at::Tensor& row_of_pair, const int32_t* expert_offsets,
                              int num_experts, const std::optional<at::Tensor>& fc2_bias,
                              const at::Tensor& out) {
  const int64_t num_tokens = out.size(0);
  const int64_t hidden_size = out.size(1);
  const int top_k = static_cast<int>(topk_weights.size(1));
  if (num_tokens == 0 || hidden_size == 0) return;
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MOE_INFER_DISPATCH_FLOATS(rows.scalar_type(), "unpermute_combine", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVector = 16 / sizeof(T);
    const bool vectorize = hidden_size % kVector == 0 && aligned16(rows) && aligned16(out) &&
                           (!fc2_bias.has_value() || aligned16(*fc2_bias));
    const int64_t per_thread = vectorize ? kVector : 1;
    const int threads =
        static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, hidden_size / per_thread)));
    launch_vectorized<T>(vectorize, [&](auto vector) {
      constexpr int N = decltype(vector)::value;
      kernels::unpermute_combine_kernel<T, N><<<grid_size(num_tokens), threads, 0, stream>>>(
          cuda_const_ptr<scalar_t>(rows), hidden_size, rows.size(0),
          weights.const_data_ptr<float>(), row_of_pair.const_data_ptr<int32_t>(), top_k, num_tokens,
          expert_offsets, num_experts,
          fc2_bias.has_value() ? cuda_const_ptr<scalar_t>(*fc2_bias) : nullptr,
          cuda_ptr<scalar_t>(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor unpermute_combine_cuda(MOE_INFER_PARAMS(unpermute_combine)) {
  const RowSizes sizes = check_unpermute_combine(MOE_INFER_ARGS(unpermute_combine));
  const c10::cuda::CUDAGuard guard(expert_out.device());
  auto out = at::empty({sizes.num_tokens, sizes.hidden_size}, expert_out.options());
  launch_unpermute_combine(expert_out.contiguous(), topk_weights, row_of_pair.contiguous(), nullptr,
                           0, std::nullopt, out);
  return out;
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) {
  m.impl("dispatch_plan", &dispatch_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute_combine", &unpermute_combine_cuda);
}

}  // namespace moe_infer
