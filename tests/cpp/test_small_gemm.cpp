// small_gemm: the few-row expert GEMM kernels, against a float64 loop, in both weight layouts and
// both types, with every tile shape, tails along k and n, strides, bias and split column ranges;
// and the activation and rounding kernels, against float64 and against ATen.
#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// x [rows, k] and w [n, k] (the nn.Linear layout) of normal values, each representable in bfloat16
// (the float32 copies hold the bfloat16 values, so a float64 reference serves both types).
// `cancelling`: every dot product gets a large first and last product that cancel, which keep the
// float32 rounding of the sums visible in a bfloat16 result.
struct DotOperands {
  int64_t rows, k, n;
  bool bf16;
  std::vector<float> x, w;
  std::vector<uint16_t> x16, w16;

  DotOperands(int64_t rows_, int64_t k_, int64_t n_, bool bf16_, bool cancelling, std::mt19937& gen)
      : rows(rows_), k(k_), n(n_), bf16(bf16_), x(rows_ * k_), w(n_ * k_) {
    std::normal_distribution<float> normal;
    for (auto* v : {&x, &w})
      for (float& e : *v) e = normal(gen);
    if (cancelling) {
      for (int64_t r = 0; r < rows; ++r) x[r * k] = x[r * k + k - 1] = 1.0f;
      for (int64_t j = 0; j < n; ++j) {
        w[j * k] = 1048576.0f;
        w[j * k + k - 1] = -1048576.0f;
      }
    }
    for (auto [f, b] : {std::pair{&x, &x16}, std::pair{&w, &w16}}) {
      b->resize(f->size());
      for (size_t i = 0; i < f->size(); ++i) {
        (*b)[i] = to_bf16((*f)[i]);
        (*f)[i] = from_bf16((*b)[i]);
      }
    }
  }

  // small_gemm of the first `use_rows` rows of x over columns [begin, end): use_rows x (end -
  // begin) values, row after row.
  std::vector<float> run(int64_t use_rows, int64_t begin, int64_t end) const {
    std::vector<float> y(use_rows * n, 0.0f);
    std::vector<uint16_t> y16(use_rows * n, 0);
    const moe_infer::SmallGemm gemm{
        bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat,
        bf16 ? static_cast<const void*>(x16.data()) : x.data(),
        k,
        bf16 ? static_cast<const void*>(w16.data()) : w.data(),
        k,
        true,
        nullptr,
        bf16 ? static_cast<void*>(y16.data()) : y.data(),
        n,
        use_rows,
        k,
        n};
    moe_infer::small_gemm(gemm, begin, end);
    std::vector<float> got;
    for (int64_t r = 0; r < use_rows; ++r)
      for (int64_t j = begin; j < end; ++j)
        got.push_back(bf16 ? from_bf16(y16[r * n + j]) : y[r * n + j]);
    return got;
  }
};

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

TEST_CASE("small_gemm gives a column the same bits whatever columns share its call",
          "[small_gemm]") {
  // One row of x reads two columns' weights side by side (two streams), and the last pass of the
  // square tile over 5, 9 or 13 rows has one row against several columns: each column must still
  // come out as when computed alone, and so as whatever range a thread takes. A large first and
  // last product that cancel keep the float32 rounding of the sums visible in a bfloat16 result.
  std::mt19937 gen(11);
  for (const bool bf16 : {false, true}) {
    const auto type = bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat;
    if (!moe_infer::small_gemm_supported(type, true)) continue;
    for (const int64_t rows : {1, 5, 9}) {
      for (const int64_t k : {7, 64, 100, 1024}) {
        const int64_t n = 37;
        const DotOperands operands(rows, k, n, bf16, true, gen);
        std::vector<std::vector<float>> alone(n);
        for (int64_t j = 0; j < n; ++j) alone[j] = operands.run(rows, j, j + 1);
        for (const auto [begin, end] :
             {std::pair<int64_t, int64_t>{0, n}, {0, 36}, {5, 30}, {1, 4}}) {
          const std::vector<float> together = operands.run(rows, begin, end);
          std::vector<float> expected;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = begin; j < end; ++j) expected.push_back(alone[j][r]);
          INFO("bf16 " << bf16 << " rows " << rows << " k " << k << " columns [" << begin << ", "
                       << end << ")");
          REQUIRE(together == expected);
        }
      }
    }
  }
}

TEST_CASE("small_gemm gives a row the same bits whatever rows share its call, short or long rows",
          "[small_gemm]") {
  // From two rows of x each tile sums a column of a row in the same order, so a row's bits do not
  // depend on how many rows share the call, nor on which tile ran it: two to four rows shorter than
  // 8 KiB take the stream tile, longer ones the square tile (float32 from k = 2048, bfloat16 from
  // k = 4096). The exception: in bfloat16 a pass of one row keeps two accumulators, and such a pass
  // computes a call of one row and the last row of 5, 7, 11, 13, ... rows (passes of six rows, five
  // as four and one); so five-row calls are compared on their first four rows, and the seventh of
  // `all`'s rows is not compared. A large first and
  // last product that cancel keep the float32 rounding of the sums visible in a bfloat16 result;
  // plain values check each result against a float64 loop.
  std::mt19937 gen(13);
  for (const bool bf16 : {false, true}) {
    const auto type = bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat;
    if (!moe_infer::small_gemm_supported(type, true)) continue;
    for (const int64_t k : {1000, 2047, 2048, 4095, 4096, 4100}) {
      for (const bool cancelling : {false, true}) {
        const int64_t n = 21;
        const int64_t max_rows = 7;
        const DotOperands operands(max_rows, k, n, bf16, cancelling, gen);
        const std::vector<float> all = operands.run(max_rows, 0, n);
        if (!cancelling) {
          for (int64_t r = 0; r < max_rows; ++r) {
            for (int64_t j = 0; j < n; ++j) {
              double expected = 0.0;
              double magnitude = 0.0;  // the sum of |products|, which bounds float32's error
              for (int64_t i = 0; i < k; ++i) {
                const double product =
                    static_cast<double>(operands.x[r * k + i]) * operands.w[j * k + i];
                expected += product;
                magnitude += std::abs(product);
              }
              INFO("bf16 " << bf16 << " k " << k << " row " << r << " column " << j);
              // bfloat16: one rounding of the output; float32: summation order only.
              const double bound =
                  bf16 ? 8e-3 * (1.0 + std::abs(expected)) : 1e-5 * (1.0 + magnitude);
              REQUIRE(std::abs(all[r * n + j] - expected) <= bound);
            }
          }
        }
        for (int64_t rows = 2; rows < max_rows; ++rows) {
          const int64_t compared = bf16 && rows == 5 ? 4 : rows;
          const std::vector<float> some = operands.run(rows, 0, n);
          INFO("bf16 " << bf16 << " k " << k << " rows " << rows << " cancelling " << cancelling);
          REQUIRE(std::vector<float>(some.begin(), some.begin() + compared * n) ==
                  std::vector<float>(all.begin(), all.begin() + compared * n));
        }
      }
    }
  }
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

TEST_CASE("silu_mul_rows is x / (1 + exp(-x)) times up, rounded as ATen rounds", "[small_gemm]") {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Specials first (exp's range ends, zeros, tiny values), then random gates.
  const std::vector<float> specials{0.0f,   -0.0f,   1e-30f, -1e-30f, 20.0f,  -20.0f, 80.0f,
                                    -80.0f, 88.5f,   -88.5f, 89.5f,   -89.5f, 103.0f, -103.0f,
                                    110.0f, -110.0f, inf,    -inf,    nan};
  const int64_t rows = 3, ffn = 37;  // 37: a tail after two vectors
  for (const bool bf16 : {false, true}) {
    std::vector<float> x(rows * 2 * ffn);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < ffn; ++i) {
        const size_t s = static_cast<size_t>(r * ffn + i);
        x[r * 2 * ffn + i] = s < specials.size() ? specials[s] : 4.0f * normal(gen);
        x[r * 2 * ffn + ffn + i] = normal(gen) + 0.5f;  // up, never 0
      }
    }
    std::vector<uint16_t> x16(x.size()), out16(rows * ffn);
    if (bf16) {
      for (size_t i = 0; i < x.size(); ++i) {
        x16[i] = std::isnan(x[i]) ? uint16_t{0x7fc0} : to_bf16(x[i]);
        x[i] = from_bf16(x16[i]);
      }
    }
    std::vector<float> out(rows * ffn);
    const bool ran = moe_infer::silu_mul_rows(
        bf16 ? moe_infer::SmallGemmType::kBFloat16 : moe_infer::SmallGemmType::kFloat,
        bf16 ? static_cast<const void*>(x16.data()) : x.data(), rows, ffn,
        bf16 ? static_cast<void*>(out16.data()) : out.data());
    if (!ran) continue;  // no AVX-512 on this CPU: callers take ATen's kernels
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < ffn; ++i) {
        const double gate = x[r * 2 * ffn + i];
        const double up = x[r * 2 * ffn + ffn + i];
        const float got = bf16 ? from_bf16(out16[r * ffn + i]) : out[r * ffn + i];
        INFO("bf16 " << bf16 << ", gate " << gate << ", up " << up << ", got " << got);
        if (std::isnan(gate) || gate == -std::numeric_limits<double>::infinity()) {
          REQUIRE(std::isnan(got));  // -inf / (1 + inf), as ATen's silu gives
          continue;
        }
        const double silu = std::isinf(gate) ? gate : gate / (1.0 + std::exp(-gate));
        if (bf16) {
          // The SiLU rounded to bfloat16 (within one step of its rounding), then the product.
          const double step = std::ldexp(1.0, std::ilogb(std::max(std::abs(silu), 1e-38)) - 7);
          const double rounded = from_bf16(to_bf16(static_cast<float>(silu)));
          const double expected = from_bf16(to_bf16(static_cast<float>(rounded * up)));
          if (std::isinf(expected)) {
            REQUIRE(got == expected);
            continue;
          }
          REQUIRE(std::abs(got - expected) <=
                  2.0 * std::abs(up) * step + std::abs(expected) / 64 + 1e-35);
        } else {
          const double expected = silu * up;
          if (std::isinf(expected)) {
            REQUIRE(got == expected);
            continue;
          }
          // exp within about an ulp, then three roundings; past exp's float range (gates
          // below -88.7) float gives -0 where float64 still has a value of about 1e-37.
          REQUIRE(std::abs(got - expected) <= 1e-6 * std::abs(expected) + 1e-35);
        }
      }
    }
  }
}

TEST_CASE("round_to_bfloat16 gives c10::BFloat16's bits", "[small_gemm]") {
  std::mt19937 gen(5);
  std::normal_distribution<float> normal;
  std::vector<float> values{0.0f,
                            -0.0f,
                            1.0f,
                            from_bf16(0x3f80) + std::ldexp(1.0f, -8),  // a tie: stays even
                            from_bf16(0x3f81) + std::ldexp(1.0f, -8),  // a tie: up to even
                            std::numeric_limits<float>::max(),         // rounds to inf
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min()};
  for (int i = 0; i < 1000; ++i) values.push_back(normal(gen) * std::ldexp(1.0f, i % 60 - 30));
  values.push_back(std::numeric_limits<float>::quiet_NaN());
  std::vector<uint16_t> out(values.size());
  if (!moe_infer::round_to_bfloat16(values.data(), static_cast<int64_t>(values.size()),
                                    out.data())) {
    return;  // no AVX-512 on this CPU: callers round with c10::BFloat16
  }
  for (size_t i = 0; i + 1 < values.size(); ++i) {
    INFO("value " << values[i]);
    REQUIRE(out[i] == to_bf16(values[i]));
  }
  REQUIRE(std::isnan(from_bf16(out.back())));
}

TEST_CASE("silu_mul_rows gives the bits of ATen's silu then mul", "[small_gemm]") {
  // Rows whose width ATen's vectorized loop covers whole (64, 768) and rows it ends with its scalar
  // loop (16, 37, 100); gates over exp's whole range, specials included.
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (const int64_t ffn : {16, 37, 64, 100, 768}) {
      const int64_t rows = 64;
      at::Tensor fc1 = at::randn({rows, 2 * ffn}) * 30;
      fc1.index_put_({0, 0}, std::numeric_limits<float>::infinity());
      fc1.index_put_({0, 1}, -std::numeric_limits<float>::infinity());
      fc1.index_put_({0, 2}, std::numeric_limits<float>::quiet_NaN());
      fc1.index_put_({0, 3}, -103.9f);
      fc1.index_put_({0, 4}, -104.1f);
      fc1.index_put_({0, 5}, 88.8f);
      for (int64_t i = 0; i < 8; ++i) {  // exp's results below the normal floats (gate > 87.3)
        fc1.index_put_({1, i}, 87.5f + 2.0f * static_cast<float>(i));
      }
      fc1 = fc1.to(dtype);
      at::Tensor expected = at::silu(fc1.narrow(1, 0, ffn)).mul_(fc1.narrow(1, ffn, ffn));
      at::Tensor got = at::empty({rows, ffn}, fc1.options());
      const bool ran =
          moe_infer::silu_mul_rows(dtype == at::kFloat ? moe_infer::SmallGemmType::kFloat
                                                       : moe_infer::SmallGemmType::kBFloat16,
                                   fc1.const_data_ptr(), rows, ffn, got.data_ptr());
      if (!ran) continue;  // no AVX-512 on this CPU: callers take ATen's kernels
      INFO("dtype " << dtype << ", ffn " << ffn);
      const at::Tensor same = (got == expected) | (got.isnan() & expected.isnan());
      REQUIRE(same.all().item<bool>());
    }
  }
}

TEST_CASE("gpt_oss_swiglu_rows gives the bits of transformers' GPT-OSS ops in ATen",
          "[small_gemm]") {
  const float alpha = 1.702f;
  for (const float limit : {7.0f, 2.9f}) {  // 2.9: not a bfloat16, which ATen's clamps round
    INFO("limit " << limit);
    // One call's extent decides where ATen's vectorized loop ends: widths and row counts around it.
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      for (const auto& [rows, ffn] : {std::pair<int64_t, int64_t>{5, 37}, {3, 100}, {64, 512}}) {
        at::Tensor fc1 = at::randn({rows, 2 * ffn}) * 6;
        fc1.index_put_({0, 0}, std::numeric_limits<float>::quiet_NaN());  // a gate
        fc1.index_put_({0, 3}, std::numeric_limits<float>::quiet_NaN());  // an up
        fc1.index_put_({0, 4}, std::numeric_limits<float>::infinity());
        fc1.index_put_({0, 5}, -std::numeric_limits<float>::infinity());
        fc1.index_put_({0, 6}, -60.0f);  // exp's large arguments
        fc1.index_put_({0, 8}, limit);
        fc1 = fc1.to(dtype);
        // moe_infer's ATen form, as transformers computes it (experts.cpp: gpt_oss_swiglu_out).
        const at::Tensor gate = fc1.slice(1, 0, 2 * ffn, 2).clamp_max(limit);
        at::Tensor up = fc1.slice(1, 1, 2 * ffn, 2).clamp(-limit, limit);
        at::Tensor expected = at::sigmoid(gate * alpha);
        expected.mul_(gate);
        up.add_(1);
        expected.mul_(up);
        at::Tensor got = at::empty({rows, ffn}, fc1.options());
        const int64_t total = rows * ffn;
        const auto type = dtype == at::kFloat ? moe_infer::SmallGemmType::kFloat
                                              : moe_infer::SmallGemmType::kBFloat16;
        // In two uneven pieces, as two threads may run it.
        const int64_t split = (total / 3) / 16 * 16;
        if (!moe_infer::gpt_oss_swiglu_rows(type, fc1.const_data_ptr(), rows, ffn, alpha, limit,
                                            got.data_ptr(), 0, split)) {
          continue;  // no AVX-512 on this CPU: callers take ATen's kernels
        }
        moe_infer::gpt_oss_swiglu_rows(type, fc1.const_data_ptr(), rows, ffn, alpha, limit,
                                       got.data_ptr(), split, total);
        INFO("dtype " << dtype << ", rows " << rows << ", ffn " << ffn);
        const at::Tensor same = (got == expected) | (got.isnan() & expected.isnan());
        REQUIRE(same.all().item<bool>());
      }
    }
  }
}
