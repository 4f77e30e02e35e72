// Dispatch on the GPU: the plan (keys for a stable radix sort by expert, then offsets and the
// inverse permutation from the sorted keys), permute and the fused unpermute + weighted combine.
// Every kernel is memory-safe for any index values; the host decides whether to check them.
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace moe_infer::kernels {

// keys[p] = expert of pair p (num_experts for -1 and, unchecked, for invalid ids); values[p] = p.
// An invalid id goes to `error` (nullptr: not validating); `top_k` only words that report.
template <typename IdT>
__global__ void plan_keys_kernel(const IdT* __restrict__ expert_ids, int64_t num_pairs,
                                 int num_experts, int top_k, int32_t* __restrict__ keys,
                                 int32_t* __restrict__ values, DeviceError* error) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const IdT id = expert_ids[p];
    const bool routed = id >= 0 && id < num_experts;
    if (!routed && id != -1) {
      report_device_error(error, kExpertIdOutOfRange, p, static_cast<int64_t>(id), num_experts,
                          top_k);
    }
    keys[p] = routed ? static_cast<int32_t>(id) : num_experts;
    values[p] = static_cast<int32_t>(p);
  }
}

// First index in sorted_keys[0, n) whose key is >= key.
__device__ __forceinline__ int64_t lower_bound(const int32_t* sorted_keys, int64_t n, int key) {
  int64_t lo = 0;
  int64_t hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// From the keys sorted by the (stable) radix sort: row_of_pair (inverse permutation),
// expert_offsets[e] = first row whose key >= e, for e in [0, num_experts], and
// tokens_per_expert[e] = offsets[e + 1] - offsets[e]. Thread r in [0, n] writes the offsets of
// the keys strictly between keys[r-1] and keys[r], and the counts of the experts they close.
__global__ void plan_offsets_kernel(const int32_t* __restrict__ sorted_keys,
                                    const int32_t* __restrict__ sorted_pair_ids, int64_t num_pairs,
                                    int num_experts, int32_t* __restrict__ row_of_pair,
                                    int32_t* __restrict__ expert_offsets,
                                    int32_t* __restrict__ tokens_per_expert) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r <= num_pairs;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (r < num_pairs) row_of_pair[sorted_pair_ids[r]] = static_cast<int32_t>(r);
    const int previous = r > 0 ? sorted_keys[r - 1] : -1;
    const int current = r < num_pairs ? sorted_keys[r] : num_experts + 1;
    const int last = current < num_experts ? current : num_experts;
    for (int e = previous + 1; e <= last; ++e) {
      expert_offsets[e] = static_cast<int32_t>(r);
      if (e == 0) continue;
      // Expert e - 1 ends here; it starts here too unless it is the expert of row r - 1.
      const int64_t start = e - 1 > previous ? r : lower_bound(sorted_keys, r, e - 1);
      tokens_per_expert[e - 1] = static_cast<int32_t>(r - start);
    }
  }
}

// out[r] = hidden[sorted_pair_ids[r] / top_k]; VecT is the widest access the row alignment
// allows (16 bytes when it can). Rows of out-of-range pairs come out as zeros. With
// `row_of_pair`, also its inverse: row_of_pair[sorted_pair_ids[r]] = r (pairs no row names keep
// what they held: the readers bounds-check rows).
template <typename VecT>
__global__ void permute_kernel(const char* __restrict__ hidden, int64_t hidden_row_stride_bytes,
                               int64_t row_vectors, const int32_t* __restrict__ sorted_pair_ids,
                               int top_k, int64_t num_tokens, int64_t num_rows,
                               char* __restrict__ out, int32_t* __restrict__ row_of_pair) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t pair = sorted_pair_ids[r];
    const int64_t token = pair / top_k;
    const bool valid = pair >= 0 && token < num_tokens;
    if (row_of_pair != nullptr && valid && threadIdx.x == 0) {
      row_of_pair[pair] = static_cast<int32_t>(r);
    }
    const VecT* src =
        reinterpret_cast<const VecT*>(hidden + (valid ? token : 0) * hidden_row_stride_bytes);
    VecT* dst = reinterpret_cast<VecT*>(out + r * row_vectors * static_cast<int64_t>(sizeof(VecT)));
    for (int64_t v = threadIdx.x; v < row_vectors; v += blockDim.x) {
      if (valid) {
        dst[v] = src[v];
      } else {
        dst[v] = VecT{};
      }
    }
  }
}

// out[s] = sum_j w[s, j] * expert_out[row_of_pair[s * k + j]], N elements per thread (one
// 16-byte load per row when aligned), float32 accumulation, one block per token. With
// `expert_offsets` (grouped_mlp_combine), rows >= offsets[E] (unrouted pairs, never computed)
// are skipped and each row gets its expert's fc2 bias (if any) added first.
template <typename T, int N>
__global__ void unpermute_combine_kernel(const T* __restrict__ expert_out, int64_t hidden_size,
                                         int64_t num_rows, const float* __restrict__ topk_weights,
                                         const int32_t* __restrict__ row_of_pair, int top_k,
                                         int64_t num_tokens, const int32_t* expert_offsets,
                                         int num_experts, const T* __restrict__ fc2_bias,
                                         T* __restrict__ out) {
  if (expert_offsets != nullptr) {
    num_rows = min(num_rows, static_cast<int64_t>(expert_offsets[num_experts]));
  }
  for (int64_t s = blockIdx.x; s < num_tokens; s += gridDim.x) {
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * N; h < hidden_size;
         h += static_cast<int64_t>(blockDim.x) * N) {
      float accumulator[N];
#pragma unroll
      for (int i = 0; i < N; ++i) accumulator[i] = 0.0f;
      for (int j = 0; j < top_k; ++j) {
        const int64_t row = row_of_pair[s * top_k + j];
        if (row < 0 || row >= num_rows) continue;
        const float w = topk_weights[s * top_k + j];
        const Pack<T, N> values =
            *reinterpret_cast<const Pack<T, N>*>(expert_out + row * hidden_size + h);
        Pack<T, N> bias{};
        if (fc2_bias != nullptr) {
          const int64_t e = expert_of_row(expert_offsets, num_experts, row);
          bias = *reinterpret_cast<const Pack<T, N>*>(fc2_bias + e * hidden_size + h);
        }
#pragma unroll
        for (int i = 0; i < N; ++i) {
          accumulator[i] += w * (to_float(values.values[i]) +
                                 (fc2_bias != nullptr ? to_float(bias.values[i]) : 0.0f));
        }
      }
      Pack<T, N> result;
#pragma unroll
      for (int i = 0; i < N; ++i) result.values[i] = from_float<T>(accumulator[i]);
      *reinterpret_cast<Pack<T, N>*>(out + s * hidden_size + h) = result;
    }
  }
}

}  // namespace moe_infer::kernels
