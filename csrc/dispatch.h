// Dynamic (capacity-free) dispatch: the plan that groups (token, slot) pairs by expert, and the
// row movement around the expert compute (permute before, unpermute + weighted combine after).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "common/rows.h"
#include "common/signatures.h"

namespace moe_infer {

// ---- torch-free core ------------------------------------------------------------------------

// Bucket of an expert id: 0..E-1 for experts, E for the "unrouted" id -1.
template <typename IdT>
inline int64_t plan_bucket(IdT id, int64_t num_experts) {
  return id < 0 ? num_experts : static_cast<int64_t>(id);
}

// Index of the first id outside [-1, num_experts), or -1 if all are valid.
template <typename IdT>
int64_t find_invalid_expert_id(const IdT* expert_ids, int64_t num_pairs, int64_t num_experts) {
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (expert_ids[p] < -1 || expert_ids[p] >= num_experts) return p;
  }
  return -1;
}

// Stable counting sort of pairs by expert, split into `num_chunks` contiguous chunks that
// `parallel_for(num_chunks, fn)` may run concurrently (fn(chunk) for each chunk).
//   chunk_counts:      scratch, num_chunks * (num_experts + 1) int32
//   sorted_pair_ids:   [num_pairs] pair index (token * k + slot) at each expert-ordered row
//   row_of_pair:       [num_pairs] inverse permutation
//   tokens_per_expert: [num_experts]
//   expert_offsets:    [num_experts + 1]; rows >= expert_offsets[E] hold the unrouted pairs
// Ids must already be valid (find_invalid_expert_id). O(num_pairs + num_chunks * num_experts).
template <typename IdT, typename ParallelFor>
void counting_sort_pairs(const IdT* expert_ids, int64_t num_pairs, int64_t num_experts,
                         int64_t num_chunks, int32_t* chunk_counts, int32_t* sorted_pair_ids,
                         int32_t* row_of_pair, int32_t* tokens_per_expert, int32_t* expert_offsets,
                         ParallelFor&& parallel_for) {
  const int64_t num_buckets = num_experts + 1;
  const int64_t chunk_size = (num_pairs + num_chunks - 1) / std::max<int64_t>(num_chunks, 1);
  auto chunk_range = [&](int64_t chunk) {
    const int64_t begin = std::min(num_pairs, chunk * chunk_size);
    return std::make_pair(begin, std::min(num_pairs, begin + chunk_size));
  };
  parallel_for(num_chunks, [&](int64_t chunk) {
    int32_t* counts = chunk_counts + chunk * num_buckets;
    std::fill(counts, counts + num_buckets, 0);
    const auto [begin, end] = chunk_range(chunk);
    for (int64_t p = begin; p < end; ++p) ++counts[plan_bucket(expert_ids[p], num_experts)];
  });
  // Exclusive scan in (bucket, chunk) order turns counts into each chunk's first row per bucket.
  int32_t row = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    expert_offsets[b] = row;  // b == num_experts: first unrouted row
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      int32_t& slot = chunk_counts[chunk * num_buckets + b];
      const int32_t count = slot;
      slot = row;
      row += count;
    }
    if (b < num_experts) tokens_per_expert[b] = row - expert_offsets[b];
  }
  parallel_for(num_chunks, [&](int64_t chunk) {
    int32_t* next_row = chunk_counts + chunk * num_buckets;
    const auto [begin, end] = chunk_range(chunk);
    for (int64_t p = begin; p < end; ++p) {
      const int32_t r = next_row[plan_bucket(expert_ids[p], num_experts)]++;
      sorted_pair_ids[r] = static_cast<int32_t>(p);
      row_of_pair[p] = r;
    }
  });
}

// Copies rows [begin, end) of the expert-ordered buffer: out[r] = hidden[sorted_pair_ids[r] / k].
inline void permute_rows(const char* hidden, int64_t hidden_row_stride_bytes, int64_t row_bytes,
                         const int32_t* sorted_pair_ids, int64_t top_k, int64_t begin, int64_t end,
                         char* out) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t token = sorted_pair_ids[r] / top_k;
    std::memcpy(out + r * row_bytes, hidden + token * hidden_row_stride_bytes, row_bytes);
  }
}

// Combines tokens [begin, end): out[s] = sum_j w[s, j] * expert_out[row_of_pair[s * k + j]].
// Accumulates in float32 in `accumulator` (hidden_size floats). T and W convert to float.
template <typename T, typename W, typename AddRow = AddWeightedRow>
void combine_tokens(const T* expert_out, int64_t hidden_size, const W* topk_weights,
                    const int32_t* row_of_pair, int64_t top_k, int64_t begin, int64_t end,
                    float* accumulator, T* out, const AddRow& add_row = {}) {
  for (int64_t s = begin; s < end; ++s) {
    std::fill(accumulator, accumulator + hidden_size, 0.0f);
    for (int64_t j = 0; j < top_k; ++j) {
      const float w = static_cast<float>(topk_weights[s * top_k + j]);
      add_row(expert_out + static_cast<int64_t>(row_of_pair[s * top_k + j]) * hidden_size, w,
              hidden_size, accumulator);
    }
    T* out_row = out + s * hidden_size;
    for (int64_t h = 0; h < hidden_size; ++h) out_row[h] = static_cast<T>(accumulator[h]);
  }
}

// ---- ATen ops (CPU; parameters: common/signatures.h) ----------------------------------------

// dispatch_plan_cpu, permute_cpu, unpermute_combine_cpu
MOE_INFER_DISPATCH_OPS(MOE_INFER_DECLARE_CPU)

#ifdef MOE_INFER_WITH_CUDA
// out[r] = hidden[pair_ids[r] / top_k] for the rows r of out [num_rows, hidden_size] (zeros for
// an out-of-range id), on the current stream: permute's launch, shared with static_dispatch and
// grouped_mlp_combine. hidden's rows must be dense (stride(1) == 1); pair_ids int32 [num_rows],
// contiguous. With `row_of_pair` ([num_rows] int32), also writes the inverse permutation.
void launch_permute_rows(const at::Tensor& hidden, const at::Tensor& pair_ids, int64_t top_k,
                         const at::Tensor& out, int32_t* row_of_pair = nullptr);

// out [S, H] = sum_j topk_weights[s, j] * rows[row_of_pair[s * k + j]] on the current stream
// (rows and row_of_pair contiguous): unpermute_combine's launch, shared with grouped_mlp_combine,
// which passes its device `expert_offsets` [E + 1] (rows >= offsets[E] are skipped) and fc2_bias
// (added to each row, by its expert).
void launch_unpermute_combine(const at::Tensor& rows, const at::Tensor& topk_weights,
                              const at::Tensor& row_of_pair, const int32_t* expert_offsets,
                              int num_experts, const std::optional<at::Tensor>& fc2_bias,
                              const at::Tensor& out);
#endif

}  // namespace moe_infer
