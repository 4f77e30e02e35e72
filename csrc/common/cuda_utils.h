// Helpers for the CUDA glue: launch checks, capture detection, dtype mapping to CUDA types.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <type_traits>

// Dispatch over the three floating dtypes the ops accept (float32, bfloat16, float16).
#define MOE_INFER_DISPATCH_FLOATS(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace moe_infer {

// True while the current stream is being captured into a CUDA graph: host syncs are illegal then,
// so data-dependent validation is skipped (the kernels stay memory-safe).
inline bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The CUDA type of an ATen floating dtype, for the torch-free kernels.
template <typename AtenT>
struct CudaType {
  using type = AtenT;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};

template <typename AtenT>
auto* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<AtenT>::type*>(t.data_ptr<AtenT>());
}

template <typename AtenT>
const auto* cuda_const_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<AtenT>::type*>(t.const_data_ptr<AtenT>());
}

// What the launchers ask of a device, read from the driver once per device.
struct DeviceInfo {
  int major = 0;
  int minor = 0;
  int multiprocessors = 1;
};

inline const DeviceInfo& device_info(int device) {
  static std::array<DeviceInfo, 64> infos{};
  static std::array<std::once_flag, 64> once{};
  TORCH_CHECK(device >= 0 && device < 64, "moe_infer: CUDA device index ", device, " out of range");
  std::call_once(once[device], [device] {
    DeviceInfo& info = infos[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  });
  return infos[device];
}

// Whether a pointer (a tensor's data) allows 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool aligned16(const at::Tensor& t) { return aligned16(t.const_data_ptr()); }

// The vectorized launch of a kernel templated on N values per access: launch(N) with
// N = 16 / sizeof(T) (16-byte accesses) when `vectorize`, else N = 1; `launch` takes an
// std::integral_constant<int, N>.
template <typename T, typename Launch>
void launch_vectorized(bool vectorize, Launch&& launch) {
  if (vectorize) {
    launch(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Blocks for a grid-stride kernel: enough to fill the device, never more than the work.
inline int grid_size(int64_t work_items, int64_t per_block = 1) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535)));
}

}  // namespace moe_infer
