// CUDA glue for static (capacity-based) gating. static_gating and static_routing_tensors have no
// CUDA kernel: the dispatcher runs their composite (the dense [S, E] / [S, E, C] work fairseq does
// on GPUs); static_dispatch and static_combine have sparse kernels.
// The data-dependent checks (NaN logits, out-of-range ids of kept pairs, a slot claimed twice)
// cost one host sync each; they run unless the stream is being captured into a CUDA graph, where
// the ops stay memory-safe unchecked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/composite.h"
#include "common/cuda_utils.h"
#include "dispatch.h"
#include "kernels/static_gating.cuh"

namespace moe_infer {

namespace {

constexpr int kThreads = 256;

}  // namespace

// The query composites ask before a host sync (common/composite.h).
const bool kCaptureQueryInstalled = [] {
  set_graph_capture_query([](const at::Tensor& t) { return t.is_cuda() && stream_is_capturing(); });
  return true;
}();

at::Tensor static_dispatch_cuda(MOE_INFER_PARAMS(static_dispatch)) {
  const StaticSlotSizes sizes = check_static_dispatch(MOE_INFER_ARGS(static_dispatch));
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool check = !stream_is_capturing();
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  auto out = at::empty({sizes.num_experts, sizes.capacity, sizes.hidden_size}, hidden.options());
  if (num_slots == 0) return out;
  const at::Tensor mask = dispatch_mask.contiguous();
  const auto int_options = hidden.options().dtype(at::kInt);
  auto owner = at::empty({num_slots}, int_options);
  auto conflict = at::zeros({1}, int_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::static_slot_owner_kernel<<<grid_size(num_slots, kThreads), kThreads, 0, stream>>>(
      mask.const_data_ptr<bool>(), sizes.num_tokens, num_slots, owner.data_ptr<int32_t>(),
      conflict.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check && conflict.item<int32_t>() != 0) fail_static_slot_conflict(mask, sizes);
  // Each slot's row is its owner's (top_k 1: pair = token); placeholders (-1) come out as zeros.
  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  launch_permute_rows(rows, owner, 1, out.view({num_slots, sizes.hidden_size}));
  return out;
}

at::Tensor static_combine_cuda(MOE_INFER_PARAMS(static_combine)) {
  const StaticSlotSizes sizes = check_static_combine(MOE_INFER_ARGS(static_combine));
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  const at::Tensor rows = expert_out.contiguous();
  const at::Tensor weights = combine_weights.to(at::kFloat).contiguous();
  auto out = at::empty({sizes.num_tokens, sizes.hidden_size}, expert_out.options());
  if (sizes.num_tokens == 0 || sizes.hidden_size == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MOE_INFER_DISPATCH_FLOATS(rows.scalar_type(), "static_combine", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr int kVector = 16 / sizeof(T);
    const bool vectorize = sizes.hidden_size % kVector == 0 && aligned16(rows) && aligned16(out);
    const int64_t per_thread = vectorize ? kVector : 1;
    // Whole warps (the kernel's ballot needs every lane), at most 256 threads.
    const int64_t wanted = kernels::ceil_div(sizes.hidden_size, per_thread);
    const int threads = static_cast<int>(std::min<int64_t>(
        kThreads, kernels::ceil_div(wanted, kernels::kWarpSize) * kernels::kWarpSize));
    launch_vectorized<T>(vectorize, [&](auto vector) {
      constexpr int N = decltype(vector)::value;
      kernels::static_combine_kernel<T, N><<<grid_size(sizes.num_tokens), threads, 0, stream>>>(
          cuda_const_ptr<scalar_t>(rows), sizes.hidden_size, weights.const_data_ptr<float>(),
          num_slots, sizes.num_tokens, cuda_ptr<scalar_t>(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(moe_infer, CUDA, m) {
  m.impl("static_dispatch", &static_dispatch_cuda);
  m.impl("static_combine", &static_combine_cuda);
}

}  // namespace moe_infer
