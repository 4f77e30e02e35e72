// The row step shared by the combines (grouped_mlp_combine's accumulation, unpermute_combine),
// torch-free. The CPU passes its AVX-512 version (cpu/parallel.h) where the combines take an
// `AddRow`; both compute the same bits.
#pragma once

#include <cstdint>

namespace moe_infer {

// acc[h] += weight * row[h] for h < n: the product rounded to float32, then the sum.
struct AddWeightedRow {
  template <typename T>
  void operator()(const T* row, float weight, int64_t n, float* acc) const {
    for (int64_t h = 0; h < n; ++h) acc[h] += weight * static_cast<float>(row[h]);
  }
};

}  // namespace moe_infer
