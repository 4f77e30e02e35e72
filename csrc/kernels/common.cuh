// Torch-free device helpers shared by the moe_infer CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace moe_infer::kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// float32 <-> T for the three floating types of the ops, rounding to nearest (even).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// N values of T loaded or stored as one aligned vector (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

// Expert of a row: the e with offsets[e] <= row < offsets[e + 1] (offsets has num_experts + 1
// non-decreasing entries and row < offsets[num_experts]).
__device__ __forceinline__ int expert_of_row(const int32_t* offsets, int num_experts, int64_t row) {
  int lo = 0;
  int hi = num_experts;  // invariant: offsets[lo] <= row < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What a kernel found wrong in its input, reported to the host without a sync (see
// common/device_errors.h): `check` names the check (0 = none), the other fields say where.
enum DeviceCheck : int32_t {
  kNoDeviceError = 0,
  kNonfiniteLogits = 1,     // topk_gating: index = row
  kExpertIdOutOfRange = 2,  // dispatch_plan: index = pair, value = id, extra = top_k, limit = E
  kExpertOffsets = 3,       // grouped_mlp(_combine): index = e (-1: the last offset exceeds
                            // limit = rows), value = offsets[e], extra = offsets[e - 1]
  kNonfiniteBias = 4,       // topk_gating: index = entry of selection_bias
};

struct alignas(16) DeviceError {
  int64_t index;
  int64_t value;
  int64_t limit;
  int32_t extra;
  int32_t check;
};

// Records an error in host-mapped memory with plain stores (no atomics on host memory). Every
// reporter of one kernel writes the same check, limit and extra; (index, value) go out as one
// 16-byte store, so the surviving report names one real bad input.
__device__ __forceinline__ void report_device_error(DeviceError* error, int32_t check,
                                                    int64_t index, int64_t value, int64_t limit,
                                                    int32_t extra = 0) {
  if (error == nullptr) return;
  *reinterpret_cast<longlong2*>(error) = make_longlong2(index, value);
  volatile DeviceError* e = error;
  e->limit = limit;
  e->extra = extra;
  __threadfence_system();
  e->check = check;
}

}  // namespace moe_infer::kernels
