// AVX-512 kernels of small_gemm (see small_gemm.h). Compiled for the baseline target; each kernel
// carries its own target attribute and runs only where small_gemm_supported says the CPU has it.
#include "cpu/small_gemm.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics start from _mm*_undefined_*() values: false (maybe-)uninitialized
// warnings.
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define MOE_INFER_SMALL_GEMM_X86 1
#define MOE_INFER_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define MOE_INFER_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define MOE_INFER_SMALL_GEMM_X86 0
#endif

namespace moe_infer {

namespace {

// The nn.Linear layout streams one weight row at a time, front to back (a single sequential
// stream, which this hardware reads faster than a few short rows interleaved), against up to
// kRowTile rows of x; further rows of x re-read that weight row from L1. Bytes of weights
// prefetched ahead of the loads: the hardware prefetcher alone stalls at each row's end.
constexpr int kRowTile = 4;
constexpr int64_t kPrefetchBytes = 4096;
// The [K, N] layout's float32 accumulators: rows x (columns of one pass) at most, so they stay in
// L1 whatever the rows (a whole weight row per pass for a few rows: again one sequential stream).
constexpr int64_t kAxpyAccumulators = 8192;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }

#if MOE_INFER_SMALL_GEMM_X86

// ---- nn.Linear layout: dot products along k ----------------------------------------------------

// Accumulators per row of x in flight along k: enough independent sums to hide the latency of the
// fused products at one or two rows.
template <int R>
constexpr int kUnroll = R == 1 ? 4 : (R == 2 ? 2 : 1);

inline void prefetch_weights(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// out[r] = dot(w, x row r) for r < R: float32, 16 products a vector.
template <int R>
MOE_INFER_TARGET_AVX512 void row_dots_f32(const float* x, int64_t x_stride, const float* w,
                                          int64_t k, float* out) {
  constexpr int U = kUnroll<R>;
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= k; i += 16 * U) {
    for (int u = 0; u < U; ++u) {
      prefetch_weights(w + i + 16 * u);
      const __m512 wv = _mm512_loadu_ps(w + i + 16 * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * x_stride + i + 16 * u), acc[r][u]);
    }
  }
  for (; i < k; i += 16) {
    const __mmask16 mask = k - i >= 16 ? static_cast<__mmask16>(0xffffu)
                                       : static_cast<__mmask16>((1u << (k - i)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + i);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + r * x_stride + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][u]);
    out[r] = _mm512_reduce_add_ps(acc[r][0]);
  }
}

// The same for bfloat16: AVX512-BF16 dot products of pairs, 32 values a vector, summed in float32.
template <int R>
MOE_INFER_TARGET_AVX512_BF16 void row_dots_bf16(const uint16_t* x, int64_t x_stride,
                                                const uint16_t* w, int64_t k, float* out) {
  constexpr int U = kUnroll<R>;
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 * U <= k; i += 32 * U) {
    for (int u = 0; u < U; ++u) {
      prefetch_weights(w + i + 32 * u);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i + 32 * u);
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * x_stride + i + 32 * u);
        acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv, xv);
      }
    }
  }
  for (; i < k; i += 32) {
    const __mmask32 mask =
        k - i >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (k - i)) - 1u);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + i);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * x_stride + i);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, xv);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][u]);
    out[r] = _mm512_reduce_add_ps(acc[r][0]);
  }
}

// ---- [K, N] layout: rows of w scaled by x and summed, 16 columns a vector ----------------------

MOE_INFER_TARGET_AVX512 inline __m512 load_columns(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

MOE_INFER_TARGET_AVX512 inline __m512 load_columns(const uint16_t* p, __mmask16 mask) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}

// acc[r * columns + c] += sum_k x[r, k] * w[k, c] for r < rows, c < columns: each weight row
// is read once, front to back, four rows of w per pass over the accumulators (which stay in L1);
// each vector of weights is loaded and widened once for every row of x.
template <typename T>
MOE_INFER_TARGET_AVX512 void axpy_rows(const T* x, int64_t x_stride, int64_t rows, const T* w,
                                       int64_t w_stride, int64_t k, int64_t columns, float* acc) {
  constexpr int kDepth = 4;
  const int64_t vectors = (columns + 15) / 16;
  const int64_t left = columns - 16 * (vectors - 1);
  const __mmask16 last = static_cast<__mmask16>(left >= 16 ? 0xffffu : (1u << left) - 1u);
  float xs[kSmallGemmMaxRows][kDepth];
  for (int64_t i = 0; i < k; i += kDepth) {
    const int depth = static_cast<int>(std::min<int64_t>(kDepth, k - i));
    for (int64_t r = 0; r < rows; ++r) {
      for (int d = 0; d < kDepth; ++d)
        xs[r][d] = d < depth ? to_float(x[r * x_stride + i + d]) : 0.0f;
    }
    const T* w0 = w + i * w_stride;
    for (int64_t v = 0; v < vectors; ++v) {
      const __mmask16 mask = v + 1 < vectors ? static_cast<__mmask16>(0xffffu) : last;
      __m512 wv[kDepth];
      for (int d = 0; d < kDepth; ++d) {
        wv[d] = d < depth ? load_columns(w0 + d * w_stride + 16 * v, mask) : _mm512_setzero_ps();
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* a = acc + r * columns + 16 * v;
        __m512 sum = _mm512_maskz_loadu_ps(mask, a);
        for (int d = 0; d < kDepth; ++d)
          sum = _mm512_fmadd_ps(wv[d], _mm512_set1_ps(xs[r][d]), sum);
        _mm512_mask_storeu_ps(a, mask, sum);
      }
    }
  }
}

// ---- weighted row sum ------------------------------------------------------------------------

// A fused multiply-add: one rounding where AddWeightedRow's loop rounds twice.
template <typename T>
MOE_INFER_TARGET_AVX512 void add_weighted_row_avx512(const T* row, float weight, int64_t n,
                                                     float* acc) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t h = 0; h < n; h += 16) {
    const __mmask16 mask = n - h >= 16 ? static_cast<__mmask16>(0xffffu)
                                       : static_cast<__mmask16>((1u << (n - h)) - 1u);
    const __m512 sum =
        _mm512_fmadd_ps(w, load_columns(row + h, mask), _mm512_maskz_loadu_ps(mask, acc + h));
    _mm512_mask_storeu_ps(acc + h, mask, sum);
  }
}

// ---- drivers
// -------------------------------------------------------------------------------------

template <int R>
struct RowDots {
  static void run(const float* x, int64_t xs, const float* w, int64_t k, float* out) {
    row_dots_f32<R>(x, xs, w, k, out);
  }
  static void run(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t k, float* out) {
    row_dots_bf16<R>(x, xs, w, k, out);
  }
};

template <typename T>
void row_dots(int rows, const T* x, int64_t xs, const T* w, int64_t k, float* out) {
  static_assert(kRowTile == 4, "one case per row count of a tile");
  switch (rows) {
    case 1:
      return RowDots<1>::run(x, xs, w, k, out);
    case 2:
      return RowDots<2>::run(x, xs, w, k, out);
    case 3:
      return RowDots<3>::run(x, xs, w, k, out);
    default:
      return RowDots<4>::run(x, xs, w, k, out);
  }
}

template <typename T>
void run_dot(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  const T* x = static_cast<const T*>(g.x);
  const T* w = static_cast<const T*>(g.w);
  const T* bias = static_cast<const T*>(g.bias);
  T* y = static_cast<T*>(g.y);
  float out[kRowTile];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
    for (int64_t r0 = 0; r0 < g.rows; r0 += kRowTile) {
      const int rt = static_cast<int>(std::min<int64_t>(kRowTile, g.rows - r0));
      row_dots(rt, x + r0 * g.x_stride, g.x_stride, w + n * g.w_stride, g.k, out);
      for (int r = 0; r < rt; ++r) store(y + (r0 + r) * g.y_stride + n, out[r] + b);
    }
  }
}

template <typename T>
void run_axpy(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  const T* x = static_cast<const T*>(g.x);
  const T* w = static_cast<const T*>(g.w);
  const T* bias = static_cast<const T*>(g.bias);
  T* y = static_cast<T*>(g.y);
  float acc[kAxpyAccumulators];
  const int64_t pass = std::max<int64_t>(16, kAxpyAccumulators / g.rows / 16 * 16);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += pass) {
    const int64_t columns = std::min<int64_t>(pass, n_end - n0);
    std::fill_n(acc, g.rows * columns, 0.0f);
    axpy_rows(x, g.x_stride, g.rows, w + n0, g.w_stride, g.k, columns, acc);
    for (int64_t r = 0; r < g.rows; ++r) {
      T* y_row = y + r * g.y_stride + n0;
      for (int64_t c = 0; c < columns; ++c) {
        const float b = bias != nullptr ? to_float(bias[n0 + c]) : 0.0f;
        store(y_row + c, acc[r * columns + c] + b);
      }
    }
  }
}

template <typename T>
void run(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  if (g.w_k_contiguous) {
    run_dot<T>(g, n_begin, n_end);
  } else {
    run_axpy<T>(g, n_begin, n_end);
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

#endif  // MOE_INFER_SMALL_GEMM_X86

}  // namespace

bool small_gemm_supported(SmallGemmType type, bool w_k_contiguous) {
#if MOE_INFER_SMALL_GEMM_X86
  if (type == SmallGemmType::kBFloat16 && w_k_contiguous) return cpu_has_avx512_bf16();
  return cpu_has_avx512();
#else
  return false;
#endif
}

bool add_weighted_row(SmallGemmType type, const void* row, float weight, int64_t n, float* acc) {
#if MOE_INFER_SMALL_GEMM_X86
  if (!cpu_has_avx512()) return false;
  if (type == SmallGemmType::kFloat) {
    add_weighted_row_avx512(static_cast<const float*>(row), weight, n, acc);
  } else {
    add_weighted_row_avx512(static_cast<const uint16_t*>(row), weight, n, acc);
  }
  return true;
#else
  (void)type;
  (void)row;
  (void)weight;
  (void)n;
  (void)acc;
  return false;
#endif
}

void small_gemm(const SmallGemm& gemm, int64_t n_begin, int64_t n_end) {
#if MOE_INFER_SMALL_GEMM_X86
  if (gemm.type == SmallGemmType::kFloat) {
    run<float>(gemm, n_begin, n_end);
  } else {
    run<uint16_t>(gemm, n_begin, n_end);
  }
#else
  (void)gemm;
  (void)n_begin;
  (void)n_end;
#endif
}

}  // namespace moe_infer
