// small_gemm: the few-row expert GEMM kernels, against a float64 loop, in both weight layouts and
// both types, with every tile shape, tails along k and n, strides, bias and split column ranges.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/small_gemm.h"

namespace {

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

struct Case {
  int64_t rows, k, n, x_stride, w_stride, y_stride;
  bool k_contiguous, bf16, bias;
  bool whole;  // one call over every column (one thread), else two column ranges (two threads)
};

// Runs one case; returns the worst error relative to (1 + |expected|).
double run_case(const Case& c, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  const int64_t w_rows = c.k_contiguous ? c.n : c.k;
  std::vector<float> x(c.rows * c.x_stride), w(w_rows * c.w_stride), bias(c.n);
  for (auto* v : {&x, &w, &bias})
    for (float& e : *v) e = normal(gen);
  std::vector<uint16_t> x16(x.size()), w16(w.size()), bias16(bias.size());
  if (c.bf16) {  // the float copies hold the bfloat16 values, so the reference sees the same inputs
    for (auto [f, b] : {std::pair{&x, &x16}, std::pair{&w, &w16}, std::pair{&bias, &bias16}}) {
      for (size_t i = 0; i < f->size(); ++i) {
        (*b)[i] = to_bf16((*f)[i]);
        (*f)[i] = from_bf16((*b)[i]);
      }
    }
  }
  std::vector<float> y(c.rows * c.y_stride, -1.0f);
  std::vector<uint16_t> y16(y.size(), 0);
  const moe_infer::SmallGemm gemm{
      c.bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat,
      c.bf16 ? static_cast<const void*>(x16.data()) : x.data(),
      c.x_stride,
      c.bf16 ? static_cast<const void*>(w16.data()) : w.data(),
      c.w_stride,
      c.k_contiguous,
      !c.bias  ? nullptr
      : c.bf16 ? static_cast<const void*>(bias16.data())
               : bias.data(),
      c.bf16 ? static_cast<void*>(y16.data()) : y.data(),
      c.y_stride,
      c.rows,
      c.k,
      c.n};
  // Two column ranges, as two threads would take them, or one.
  const int64_t split = c.whole ? c.n : std::min<int64_t>(c.n, moe_infer::kSmallGemmColumnBlock);
  moe_infer::small_gemm(gemm, 0, split);
  moe_infer::small_gemm(gemm, split, c.n);
  double worst = 0.0;
  for (int64_t r = 0; r < c.rows; ++r) {
    for (int64_t j = 0; j < c.n; ++j) {
      double expected = c.bias ? bias[j] : 0.0;
      for (int64_t i = 0; i < c.k; ++i) {
        const float wv = c.k_contiguous ? w[j * c.w_stride + i] : w[i * c.w_stride + j];
        expected += static_cast<double>(x[r * c.x_stride + i]) * wv;
      }
      const double got = c.bf16 ? from_bf16(y16[r * c.y_stride + j]) : y[r * c.y_stride + j];
      worst = std::max(worst, std::abs(got - expected) / (1.0 + std::abs(expected)));
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("small_gemm matches a float64 loop in both layouts and types", "[small_gemm]") {
  std::mt19937 gen(7);
  int ran = 0;
  for (const bool bf16 : {false, true}) {
    for (const bool k_contiguous : {true, false}) {
      if (!moe_infer::small_gemm_supported(
              bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat,
              k_contiguous)) {
        continue;  // callers fall back to ATen's GEMM on such CPUs
      }
      // Every row count (all row tiles), k and n around the vector widths, strided operands.
      for (int64_t rows = 1; rows <= moe_infer::kSmallGemmMaxRows; ++rows) {
        for (const int64_t k : {1, 15, 16, 33, 64, 200, 290}) {
          for (const int64_t n : {1, 5, 16, 63, 64, 65, 130, 1100}) {
            for (const bool whole : {false, true}) {
              const Case c{rows,
                           k,
                           n,
                           k + rows % 3,
                           (k_contiguous ? k : n) + 2,
                           n + 1,
                           k_contiguous,
                           bf16,
                           (rows + k + n) % 2 == 0,
                           whole};
              const double worst = run_case(c, gen);
              // float32: summation order only; bfloat16: one rounding of the output.
              INFO("rows " << rows << " k " << k << " n " << n << " bf16 " << bf16
                           << " k_contiguous " << k_contiguous << " whole " << whole);
              REQUIRE(worst < (bf16 ? 8e-3 : 2e-5));
              ++ran;
            }
          }
        }
      }
    }
  }
  // This test is meant for the AVX-512 machines CI runs on; report when it checked nothing.
  if (ran == 0) WARN("small_gemm is not supported on this CPU: nothing was checked");
}

TEST_CASE("add_weighted_row gives the plain loop's bits", "[small_gemm]") {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (const bool bf16 : {false, true}) {
    for (const int64_t n : {1, 15, 16, 17, 33, 1024, 1031}) {
      std::vector<float> row(n), acc(n);
      std::vector<uint16_t> row16(n);
      for (int64_t h = 0; h < n; ++h) {
        row16[h] = to_bf16(normal(gen));
        row[h] = bf16 ? from_bf16(row16[h]) : normal(gen);
        acc[h] = normal(gen);
      }
      const float weight = normal(gen);
      std::vector<float> expected(n);  // the product rounded, then the sum (volatile: never fused)
      for (int64_t h = 0; h < n; ++h) {
        volatile float product = weight * row[h];
        expected[h] = acc[h] + product;
      }
      const bool ran = moe_infer::add_weighted_row(
          bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat,
          bf16 ? static_cast<const void*>(row16.data()) : row.data(), weight, n, acc.data());
      if (!ran) continue;  // no AVX-512 on this CPU: callers take the loop itself
      INFO("bf16 " << bf16 << ", n " << n);
      REQUIRE(acc == expected);
    }
  }
}
