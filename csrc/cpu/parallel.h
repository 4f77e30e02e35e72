// Work splitting shared by the CPU kernels, on ATen's intra-op thread pool.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/rows.h"
#include "cpu/small_gemm.h"

namespace moe_infer {

// AddWeightedRow (common/rows.h) on AVX-512 for float32 and bfloat16 rows (the same bits), the
// plain loop otherwise.
struct CpuAddWeightedRow {
  template <typename T>
  void operator()(const T* row, float weight, int64_t n, float* acc) const {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      const SmallGemmType type =
          std::is_same_v<T, float> ? SmallGemmType::kFloat : SmallGemmType::kBFloat16;
      if (add_weighted_row(type, row, weight, n, acc)) return;
    }
    AddWeightedRow{}(row, weight, n, acc);
  }
};

// Rows per parallel task so that each task covers at least 64Ki units of work (bytes moved,
// weights scanned) when a row has `row_units` of them.
inline int64_t row_grain(int64_t row_units) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_units, 1));
}

// Chunks of [0, n) for work that keeps per-chunk partial results: one per thread once each
// gets at least `min_per_chunk` items.
inline int64_t num_chunks_for(int64_t n, int64_t min_per_chunk) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / min_per_chunk));
}

inline std::pair<int64_t, int64_t> chunk_range(int64_t chunk, int64_t num_chunks, int64_t n) {
  const int64_t size = (n + num_chunks - 1) / num_chunks;
  const int64_t begin = std::min(n, chunk * size);
  return {begin, std::min(n, begin + size)};
}

// Records `value` in `first` if it is smaller (the first bad index wins, whatever the threads do).
inline void keep_smallest(std::atomic<int64_t>& first, int64_t value) {
  int64_t seen = first.load();
  while (value < seen && !first.compare_exchange_weak(seen, value)) {
  }
}

// A new [num_tokens, hidden_size] tensor of rows' dtype, filled token by token: tasks of `grain`
// tokens each run combine(rows_ptr, begin, end, accumulator, out_ptr) with typed pointers and a
// float32 scratch `accumulator` of hidden_size values.
template <typename Combine>
at::Tensor combine_tokens_parallel(const at::Tensor& rows, int64_t num_tokens, int64_t hidden_size,
                                   int64_t grain, const Combine& combine) {
  auto out = at::empty({num_tokens, hidden_size}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "combine", [&] {
    const scalar_t* rows_ptr = rows.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> accumulator(hidden_size);
      combine(rows_ptr, begin, end, accumulator.data(), out_ptr);
    });
  });
  return out;
}

}  // namespace moe_infer
