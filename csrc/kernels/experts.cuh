// Element-wise stages around the grouped GEMMs: fc1 bias + activation (gated or not) in one pass,
// and fc2 bias + zeroing of unrouted rows in one pass. Offsets are read on the device.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "kernels/common.cuh"

namespace moe_infer::kernels {

// clean[0] = 0, clean[e] = min(max(0, offsets[1..e]), num_rows): offsets the grouped GEMMs and
// the kernels below can trust whatever the caller passed. The first violation of the offsets
// contract (offsets[0] == 0, non-decreasing, offsets[E] <= num_rows: the per-expert path's host
// checks, in the same order) goes to `error`. One warp: a max-scan over 32 experts per step.
__global__ void sanitize_offsets_kernel(const int32_t* __restrict__ offsets, int num_experts,
                                        int64_t num_rows, int32_t* __restrict__ clean,
                                        DeviceError* error) {
  const int lane = threadIdx.x;
  bool reported = false;
  if (lane == 0) {
    clean[0] = 0;
    if (offsets[0] != 0) report_device_error(error, kExpertOffsets, 0, offsets[0], num_rows);
  }
  reported = __shfl_sync(kFullMask, offsets[0] != 0, 0);
  int32_t running = 0;
  for (int base = 1; base <= num_experts; base += kWarpSize) {
    const int e = base + lane;
    const bool inside = e <= num_experts;
    const int32_t value = inside ? offsets[e] : INT32_MIN;
    const int32_t previous = inside ? offsets[e - 1] : INT32_MIN;
    int32_t scan = value;
    for (int d = 1; d < kWarpSize; d <<= 1) {
      const int32_t other = __shfl_up_sync(kFullMask, scan, d);
      if (lane >= d) scan = max(scan, other);
    }
    scan = max(scan, running);
    if (inside) clean[e] = static_cast<int32_t>(min(static_cast<int64_t>(scan), num_rows));
    running = __shfl_sync(kFullMask, scan, kWarpSize - 1);
    const unsigned decreasing = __ballot_sync(kFullMask, inside && value < previous);
    if (!reported && decreasing != 0) {
      if (lane == __ffs(decreasing) - 1) {
        report_device_error(error, kExpertOffsets, e, value, num_rows, previous);
      }
      reported = true;
    }
  }
  if (!reported && lane == 0 && offsets[num_experts] > num_rows) {
    report_device_error(error, kExpertOffsets, -1, offsets[num_experts], num_rows);
  }
}

// Where a gated activation's inputs sit in fc1's output row (common/activation.h: gate_column,
// up_column): kUngated reads column i; kHalves reads i and ffn_size + i; kInterleaved 2i, 2i + 1.
enum class GateLayout : int { kUngated, kHalves, kInterleaved };

// act[r, i] = activation(fc1_out[r, :] + fc1_bias[e(r), :])[i] for the rows of every expert
// (r < offsets[E]; all num_rows rows when there are no offsets, which needs no bias either);
// fc1_out rows have `fc1_row_stride` elements. Each thread makes N consecutive outputs of a row
// from whole N-element (16-byte when N * sizeof(T) == 16) loads; threads stride over all
// (row, N-column group) items, so short rows do not leave a block idle. N must divide ffn_size
// and fc1_row_stride, and the pointers must be aligned to N elements.
template <typename T, int N>
__global__ void bias_activation_kernel(const T* __restrict__ fc1_out, int64_t fc1_row_stride,
                                       int64_t num_rows, int64_t ffn_size, ActivationParams params,
                                       GateLayout layout, const T* __restrict__ fc1_bias,
                                       int64_t fc1_outputs,
                                       const int32_t* __restrict__ expert_offsets, int num_experts,
                                       T* __restrict__ act) {
  using Vec = Pack<T, N>;
  const int64_t routed_rows = expert_offsets != nullptr
                                  ? min(static_cast<int64_t>(expert_offsets[num_experts]), num_rows)
                                  : num_rows;
  const int64_t groups_per_row = ffn_size / N;
  const int64_t items = routed_rows * groups_per_row;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = item / groups_per_row;
    const int64_t i = (item - r * groups_per_row) * N;
    const T* in = fc1_out + r * fc1_row_stride;
    const T* bias = fc1_bias != nullptr
                        ? fc1_bias + expert_of_row(expert_offsets, num_experts, r) * fc1_outputs
                        : nullptr;
    float gate[N];
    float up[N];
    // Loads `count` packs from columns [column, column + count * N) of the row (+ bias).
    auto load = [&](int64_t column, int count, float* values) {
      for (int c = 0; c < count; ++c) {
        const Vec v = *reinterpret_cast<const Vec*>(in + column + c * N);
        Vec b{};
        if (bias != nullptr) b = *reinterpret_cast<const Vec*>(bias + column + c * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          values[c * N + j] =
              to_float(v.values[j]) + (bias != nullptr ? to_float(b.values[j]) : 0.0f);
        }
      }
    };
    if (layout == GateLayout::kInterleaved) {
      float pairs[2 * N];
      load(2 * i, 2, pairs);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        gate[j] = pairs[2 * j];
        up[j] = pairs[2 * j + 1];
      }
    } else {
      load(i, 1, gate);
      if (layout == GateLayout::kHalves) {
        load(ffn_size + i, 1, up);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) up[j] = 0.0f;
      }
    }
    Vec result;
#pragma unroll
    for (int j = 0; j < N; ++j)
      result.values[j] = from_float<T>(activate_value(params, gate[j], up[j]));
    *reinterpret_cast<Vec*>(act + r * ffn_size + i) = result;
  }
}

// out[r] += fc2_bias[e(r)] for routed rows; out[r] = 0 for rows >= offsets[E] (unrouted pairs).
template <typename T>
__global__ void finalize_rows_kernel(T* __restrict__ out, int64_t num_rows, int64_t hidden_size,
                                     const T* __restrict__ fc2_bias,
                                     const int32_t* __restrict__ expert_offsets, int num_experts) {
  const int64_t routed_rows = min(static_cast<int64_t>(expert_offsets[num_experts]), num_rows);
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    T* row = out + r * hidden_size;
    if (r >= routed_rows) {
      for (int64_t h = threadIdx.x; h < hidden_size; h += blockDim.x) row[h] = from_float<T>(0.0f);
    } else if (fc2_bias != nullptr) {
      const T* bias = fc2_bias + expert_of_row(expert_offsets, num_experts, r) * hidden_size;
      for (int64_t h = threadIdx.x; h < hidden_size; h += blockDim.x) {
        row[h] = from_float<T>(to_float(row[h]) + to_float(bias[h]));
      }
    }
  }
}

}  // namespace moe_infer::kernels
