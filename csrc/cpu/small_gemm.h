// Expert GEMMs for a few rows (decode): y = x w (+ bias) with every weight read from memory once;
// the combine's weighted row sum; the gated SiLU and the rounding to bfloat16, with ATen's bits,
// on raw memory (a decode step finds ATen's elementwise kernels cold in the caches).
//
// At a handful of rows an expert's GEMM is bound by the bytes of its weights, and ATen's GEMMs
// (oneDNN / MKL) reach well under the memory bandwidth there: they pack or re-read the weight
// matrix per call. These kernels stream each weight once, keep up to four rows of x (bfloat16:
// six) of accumulators in registers, and re-read a block of weights from L1/L2 for further passes.
// float32 and bfloat16 (products summed in float32, rounded once to nearest even), AVX-512; the
// nn.Linear layout in bfloat16 uses AVX512-BF16 dot products. torch-free.
#pragma once

#include <cstdint>

namespace moe_infer {

// Rows (tokens of one expert) up to which the expert FFN takes these kernels; above it ATen's
// packed GEMMs win (measured on AVX-512 bfloat16 and float32, Mixtral- and Qwen3-MoE-sized
// experts).
constexpr int64_t kSmallGemmMaxRows = 16;

enum class SmallGemmType { kFloat, kBFloat16 };

// y[r, n] = sum_k x[r, k] * w(k, n) (+ bias[n]) for r < rows and n_begin <= n < n_end.
// x: rows x k with unit stride along k; y: rows x n with unit stride along n; bias: n values or
// null. The weight w(k, n) is at w[n * w_stride + k] when `w_k_contiguous` (the nn.Linear layout
// [N, K], read as its transpose) and at w[k * w_stride + n] otherwise ([K, N]). All of one type.
struct SmallGemm {
  SmallGemmType type;
  const void* x;
  int64_t x_stride;
  const void* w;
  int64_t w_stride;
  bool w_k_contiguous;
  const void* bias;
  void* y;
  int64_t y_stride;
  int64_t rows;
  int64_t k;
  int64_t n;
};

// Whether this CPU runs small_gemm for that type and layout (AVX-512F, plus AVX512-BF16 for
// bfloat16 in the nn.Linear layout); when false, callers use a general GEMM.
bool small_gemm_supported(SmallGemmType type, bool w_k_contiguous);

// Computes columns [n_begin, n_end) of y (disjoint column ranges may run concurrently).
// Requires small_gemm_supported and 1 <= rows <= kSmallGemmMaxRows.
void small_gemm(const SmallGemm& gemm, int64_t n_begin, int64_t n_end);

// acc[h] += weight * row[h] for h < n with the bits of AddWeightedRow (common/rows.h): one row of
// a combine, 16 values a vector. row: n values of `type`. False (nothing done) where the CPU lacks
// AVX-512; the caller then loops.
bool add_weighted_row(SmallGemmType type, const void* row, float weight, int64_t n, float* acc);

// out[r, i] = silu(x[r, i]) * x[r, ffn + i] for r < rows, i < ffn (x: rows x 2 * ffn, out: rows x
// ffn, both contiguous) with the bits of ATen's silu then mul as one thread computes each row (its
// AVX-512 kernels, its default on CPUs that have them): x / (1 + exp(-x)) in
// float32 with SLEEF's exp where ATen's vectorized loop reaches and the C library's expf on the
// elements it leaves to its scalar loop, rounded to the type, then the product rounded. False
// (nothing done) without AVX-512.
bool silu_mul_rows(SmallGemmType type, const void* x, int64_t rows, int64_t ffn, void* out);

// GPT-OSS's clamped swiGLU on x: rows x 2 * ffn, gate and up interleaved (gate at even columns),
// into out: rows x ffn, both contiguous, with the bits of transformers' op-by-op computation in
// ATen (its AVX-512 kernels, one thread over the rows: ATen's threads each end their part with a
// scalar tail of their own): out = sigmoid(g * alpha) * g * (u + 1), g = min(gate, limit), u =
// clamp(up, -limit, limit), limit in the type, each op rounded to the type. Writes the flat
// elements [begin, end) of out (disjoint ranges may run concurrently; the same bits however the
// range is split). False (nothing done) without AVX-512.
bool gpt_oss_swiglu_rows(SmallGemmType type, const void* x, int64_t rows, int64_t ffn, float alpha,
                         float limit, void* out, int64_t begin, int64_t end);

// out[i] = acc[i] rounded to bfloat16 (to nearest even, as c10::BFloat16; a NaN stays a NaN) for
// i < n. False
// (nothing done) without AVX-512.
bool round_to_bfloat16(const float* acc, int64_t n, void* out);

// Columns per task when small_gemm is split across threads: of the nn.Linear layout (weight rows),
// and of the [K, N] layout, whose weight rows are read in runs of this many columns (2 KiB of
// float32: long enough for the hardware prefetcher, short enough to keep 16 rows of float32
// accumulators in L2).
constexpr int64_t kSmallGemmColumnBlock = 128;
constexpr int64_t kSmallGemmRowMajorColumnBlock = 512;

}  // namespace moe_infer
