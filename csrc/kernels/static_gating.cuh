// Static dispatch and combine on the GPU, done sparsely like the CPU kernels: dispatch finds each
// slot's token and copies rows (kernels/dispatch.cuh's permute_kernel), combine visits only the
// nonzero weights. Memory-safe for any mask or weights; the host decides what to check.
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace moe_infer::kernels {

// owner[slot] = the first token whose row of the [num_tokens, num_slots] mask has `slot` set, or
// -1 (a placeholder). Sets *conflict to 1 if a slot is set in two rows. One thread per slot:
// neighbouring threads read neighbouring bytes of each row.
__global__ void static_slot_owner_kernel(const bool* __restrict__ mask, int64_t num_tokens,
                                         int64_t num_slots, int32_t* __restrict__ owner,
                                         int32_t* conflict) {
  for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < num_slots;
       slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t first = -1;
    bool twice = false;
    for (int64_t s = 0; s < num_tokens; ++s) {
      if (!mask[s * num_slots + slot]) continue;
      if (first >= 0) {
        twice = true;
        break;
      }
      first = s;
    }
    owner[slot] = static_cast<int32_t>(first);
    if (twice) *conflict = 1;
  }
}

// out[s] = sum_slot combine_weights[s, slot] * expert_out[slot] over the nonzero weights, in slot
// order, accumulated in float32; one block per token (blockDim a multiple of 32), N elements per
// thread. Every warp scans the token's weights 32 at a time and visits only the nonzero ones (a
// ballot), so a scan costs one coalesced load per 32 slots; hidden sizes beyond the block's reach
// take several scans.
template <typename T, int N>
__global__ void static_combine_kernel(const T* __restrict__ expert_out, int64_t hidden_size,
                                      const float* __restrict__ combine_weights, int64_t num_slots,
                                      int64_t num_tokens, T* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t block_elements = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t s = blockIdx.x; s < num_tokens; s += gridDim.x) {
    const float* weights = combine_weights + s * num_slots;
    // The loops down to the ballot are uniform across the block: every lane takes part in it.
    for (int64_t tile = 0; tile < hidden_size; tile += block_elements) {
      const int64_t h = tile + static_cast<int64_t>(threadIdx.x) * N;
      const bool active = h < hidden_size;
      float accumulator[N];
#pragma unroll
      for (int i = 0; i < N; ++i) accumulator[i] = 0.0f;
      for (int64_t base = 0; base < num_slots; base += kWarpSize) {
        const float w = base + lane < num_slots ? weights[base + lane] : 0.0f;
        unsigned nonzero = __ballot_sync(kFullMask, w != 0.0f);
        while (nonzero != 0) {
          const int bit = __ffs(nonzero) - 1;
          nonzero &= nonzero - 1;
          const float slot_weight = __shfl_sync(kFullMask, w, bit);
          if (active) {
            const Pack<T, N> values =
                *reinterpret_cast<const Pack<T, N>*>(expert_out + (base + bit) * hidden_size + h);
#pragma unroll
            for (int i = 0; i < N; ++i) accumulator[i] += slot_weight * to_float(values.values[i]);
          }
        }
      }
      if (active) {
        Pack<T, N> result;
#pragma unroll
        for (int i = 0; i < N; ++i) result.values[i] = from_float<T>(accumulator[i]);
        *reinterpret_cast<Pack<T, N>*>(out + s * hidden_size + h) = result;
      }
    }
  }
}

}  // namespace moe_infer::kernels
