// CPU dispatch plan (parallel stable counting sort), permute and unpermute_combine.
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/composite.h"
#include "cpu/parallel.h"

namespace moe_infer {

namespace {

// Runs fn(i) for i in [0, n) on ATen's intra-op thread pool.
struct AtenParallelFor {
  template <typename Fn>
  void operator()(int64_t n, Fn&& fn) const {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cpu(
    MOE_INFER_PARAMS(dispatch_plan)) {
  const PlanSizes sizes = check_dispatch_plan(MOE_INFER_ARGS(dispatch_plan));
  // The counting sort must see valid ids, and checking them is one cheap pass: always done.
  const at::Tensor ids = expert_ids.contiguous();
  const auto int_options = expert_ids.options().dtype(at::kInt);
  auto sorted_pair_ids = at::empty({sizes.num_pairs}, int_options);
  auto row_of_pair = at::empty({sizes.num_pairs}, int_options);
  auto tokens_per_expert = at::empty({num_experts}, int_options);
  auto expert_offsets = at::empty({num_experts + 1}, int_options);

  // One chunk per thread once there is enough work for it; the scan is O(chunks * E).
  const int64_t num_chunks = num_chunks_for(sizes.num_pairs, 16384);
  std::vector<int32_t> chunk_counts(num_chunks * (num_experts + 1));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "dispatch_plan", [&] {
    const index_t* ids_ptr = ids.data_ptr<index_t>();
    const int64_t bad = find_invalid_expert_id(ids_ptr, sizes.num_pairs, num_experts);
    if (bad >= 0) fail_expert_id(bad, static_cast<int64_t>(ids_ptr[bad]), sizes);
    counting_sort_pairs(ids_ptr, sizes.num_pairs, num_experts, num_chunks, chunk_counts.data(),
                        sorted_pair_ids.data_ptr<int32_t>(), row_of_pair.data_ptr<int32_t>(),
                        tokens_per_expert.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                        AtenParallelFor{});
  });
  return {sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets};
}

at::Tensor permute_cpu(MOE_INFER_PARAMS(permute)) {
  const RowSizes sizes = check_permute(MOE_INFER_ARGS(permute));
  const int64_t num_rows = sizes.num_tokens * top_k;
  check_index_range("permute", "sorted_pair_ids", sorted_pair_ids, num_rows);
  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const at::Tensor pair_ids = sorted_pair_ids.contiguous();
  auto out = at::empty({num_rows, sizes.hidden_size}, hidden.options());
  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const int64_t row_bytes = sizes.hidden_size * element_bytes;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int32_t* pair_ptr = pair_ids.const_data_ptr<int32_t>();
  const int64_t src_stride_bytes = rows.stride(0) * element_bytes;
  at::parallel_for(0, num_rows, row_grain(row_bytes), [&](int64_t begin, int64_t end) {
    permute_rows(src, src_stride_bytes, row_bytes, pair_ptr, top_k, begin, end, dst);
  });
  return out;
}

at::Tensor unpermute_combine_cpu(MOE_INFER_PARAMS(unpermute_combine)) {
  const RowSizes sizes = check_unpermute_combine(MOE_INFER_ARGS(unpermute_combine));
  check_index_range("unpermute_combine", "row_of_pair", row_of_pair, expert_out.size(0));
  const at::Tensor rows = expert_out.contiguous();
  const at::Tensor weights = float_contiguous(topk_weights);
  const at::Tensor pair_rows = row_of_pair.contiguous();
  const float* weights_ptr = weights.const_data_ptr<float>();
  const int32_t* pair_rows_ptr = pair_rows.const_data_ptr<int32_t>();
  const int64_t hidden_size = sizes.hidden_size;
  const int64_t grain = row_grain(hidden_size * sizes.top_k * rows.element_size());
  return combine_tokens_parallel(
      rows, sizes.num_tokens, hidden_size, grain,
      [&](const auto* rows_ptr, int64_t begin, int64_t end, float* accumulator, auto* out_ptr) {
        combine_tokens(rows_ptr, hidden_size, weights_ptr, pair_rows_ptr, sizes.top_k, begin, end,
                       accumulator, out_ptr, CpuAddWeightedRow{});
      });
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) {
  m.impl("dispatch_plan", &dispatch_plan_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute_combine", &unpermute_combine_cpu);
}

}  // namespace moe_infer
