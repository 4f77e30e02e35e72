// Element-wise stages around the grouped GEMMs: fc1 bias + activation (gated or not) in one pass,
// and fc2 bias + zeroing of unrouted rows in one pass. Offsets are read on the device.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "kernels/common.cuh"

namespace moe_infer::kernels {

// clean[0] = 0, clean[e] = clamp(offsets[e], clean[e - 1], num_rows): offsets the grouped GEMMs
// and the kernels below can trust whatever the caller passed (no host sync to check them).
__global__ void sanitize_offsets_kernel(const int32_t* __restrict__ offsets, int num_experts,
                                        int64_t num_rows, int32_t* __restrict__ clean) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t previous = 0;
  clean[0] = 0;
  for (int e = 1; e <= num_experts; ++e) {
    int64_t value = offsets[e];
    value = value < previous ? previous : (value > num_rows ? num_rows : value);
    clean[e] = static_cast<int32_t>(value);
    previous = value;
  }
}

// act[r, i] = activation(fc1_out[r, :] + fc1_bias[e(r), :])[i] for the rows of every expert
// (r < offsets[E]; all num_rows rows when there are no offsets, which needs no bias either);
// fc1_out rows have `fc1_row_stride` elements. One block per row.
template <typename T>
__global__ void bias_activation_kernel(const T* __restrict__ fc1_out, int64_t fc1_row_stride,
                                       int64_t num_rows, int64_t ffn_size, ActivationParams params,
                                       const T* __restrict__ fc1_bias, int64_t fc1_outputs,
                                       const int32_t* __restrict__ expert_offsets, int num_experts,
                                       T* __restrict__ act) {
  const int64_t routed_rows = expert_offsets != nullptr
                                  ? min(static_cast<int64_t>(expert_offsets[num_experts]), num_rows)
                                  : num_rows;
  const bool gated = is_gated(params.activation);
  for (int64_t r = blockIdx.x; r < routed_rows; r += gridDim.x) {
    const T* in = fc1_out + r * fc1_row_stride;
    const T* bias = fc1_bias != nullptr
                        ? fc1_bias + expert_of_row(expert_offsets, num_experts, r) * fc1_outputs
                        : nullptr;
    for (int64_t i = threadIdx.x; i < ffn_size; i += blockDim.x) {
      const int64_t gate_at = gate_column(params.activation, i);
      float gate = to_float(in[gate_at]);
      float up = 0.0f;
      if (gated) {
        const int64_t up_at = up_column(params.activation, i, ffn_size);
        up = to_float(in[up_at]);
        if (bias != nullptr) up += to_float(bias[up_at]);
      }
      if (bias != nullptr) gate += to_float(bias[gate_at]);
      act[r * ffn_size + i] = from_float<T>(activate_value(params, gate, up));
    }
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
