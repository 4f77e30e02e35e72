// AVX-512 kernels of small_gemm (see small_gemm.h). Compiled for the baseline target; each kernel
// carries its own target attribute and runs only where small_gemm_supported says the CPU has it.
#include "cpu/small_gemm.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

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

// Register tiles of the nn.Linear layout: kRows rows of x against kBlock weight rows, float32
// accumulators. Two to four short rows of x (kStreamRowBytes) take the stream tile: one weight row
// at a time, in memory order, so the weights are one sequential stream that the hardware
// prefetcher follows (on 2 MiB pages it reads about twice the bytes per second of weight rows read
// side by side); one row takes two such streams (dot_pair, run_dot_pairs). More rows, or longer,
// take the square tile, which reads four weight rows side by side, each vector of them used for
// four rows of x (bfloat16: up to six), with its own prefetch (prefetch_weights): measured on 2 MiB
// pages, Mixtral-sized experts, from five to eight rows it reads 1.3-1.6x the bytes per second of
// the stream tile, which makes a second pass over each weight row, from L1, and spends more load
// slots on x.
// pass(left): the rows of x of the next pass over a tile's weight rows, `left` rows to go.
template <int Rows, int Block>
struct TileShape {
  static constexpr int kRows = Rows;
  static constexpr int kBlock = Block;
  static int pass(int64_t left) { return static_cast<int>(std::min<int64_t>(kRows, left)); }
};
using StreamTile = TileShape<4, 1>;
using SquareTile = TileShape<4, 4>;
// bfloat16 takes six rows of x a pass (24 accumulators, 4 weight vectors and one of x: 29 of the
// 32 registers): kernel alone, Mixtral-sized experts from memory, one thread, 6 rows 20 -> 24
// GB/s, 8 rows 17 -> 19, 10-12 rows 1.08-1.12x; float32's loads make six rows slower (5-7 rows
// 0.82-0.92x), and five rows in one pass read slower than four and one (0.88x).
struct SquareTileBf16 {
  static constexpr int kRows = 6;
  static constexpr int kBlock = 4;
  static int pass(int64_t left) {
    return left >= kRows ? kRows : left == 5 ? 4 : static_cast<int>(left);
  }
};
// Rows of x up to which the stream tile runs, where a row of x is shorter than kStreamRowBytes.
// The stream tile reads every row of x once per weight row; from 8 KiB a row, the rows of x and
// the weight stream no longer share L1, and the square tile, which reads x once per four weight
// rows, is faster from two rows (kernel alone, one thread, 2 MiB pages, 8 experts from memory:
// float32 k = 3584: 2-4 rows 13-15 -> 19-25 GB/s, k = 2048: 1.12-1.41x; bfloat16 k = 4096:
// 1.09-1.55x, k = 7168: 1.66-1.70x; two threads 1.17-1.31x or even. Below it, float32 k <= 1792
// and bfloat16 k <= 3584, the stream tile is as fast or faster: 0.64-1.08x for the square).
constexpr int64_t kStreamRows = StreamTile::kRows;
constexpr int64_t kStreamRowBytes = 8192;
// Scratch layout of one tile's results: out[j * kMaxRows + r].
constexpr int kMaxRows = SquareTileBf16::kRows;
static_assert(SquareTile::kRows <= kMaxRows && StreamTile::kRows <= kMaxRows, "tile scratch");
static_assert(kSmallGemmColumnBlock % SquareTile::kBlock == 0 &&
                  kSmallGemmColumnBlock % SquareTileBf16::kBlock == 0,
              "column block of the kernels");
// The [K, N] layout's columns per pass over its float32 accumulators (rows x kAxpyColumns).
constexpr int64_t kAxpyColumns = kSmallGemmRowMajorColumnBlock;
// One row of x in the [K, N] layout reads each weight row whole, one after another, where one pass
// over all N columns fits the accumulator scratch: one sequential stream (on 2 MiB pages, GPT-OSS-
// sized experts: 15 -> 24 GB/s in float32, 10 -> 21 GB/s in bfloat16; about even on longer rows).
// Else (more rows, whose accumulators then cost more than the stream gains; a column range of one
// thread; longer rows) kAxpyColumns at a time, four weight rows per pass over the accumulators,
// which are then loaded and stored a quarter as often.
constexpr int64_t kAxpyStreamRows = 1;
constexpr int64_t kAxpyScratch = kSmallGemmMaxRows * kAxpyColumns;

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

// Bytes ahead of a stream tile's reads that it prefetches into L2 (see prefetch_weights).
constexpr int kStreamPrefetchBytes = 8192;

// The prefetch a tile issues at offset i of its weight row j. Several rows side by side (NB > 1):
// the next tile's rows at the same k, rows too short for the hardware prefetcher to lock on (a
// prefetch past the end is harmless), into L2: into L1 they would evict the rows in use (bfloat16,
// Mixtral-sized experts on 2 MiB pages, 8 rows: 12 -> 17 GB/s; 16 rows: 8 -> 10 GB/s; float32
// alike). The stream tile (one row) against three or more rows of x: the stream
// kStreamPrefetchBytes ahead, into L2; with that much arithmetic per byte the hardware prefetcher
// alone falls behind (about 18 -> 25 GB/s at four rows, 2 MiB pages). Against one or two rows:
// nothing, the hardware prefetcher alone is faster.
// (The addresses are computed as integers: they may lie past the weights, which a prefetch may
// name but a pointer may not.)
// kFar: the tile's weight rows lie far apart (two streams, run_dot_pairs), each a stream of its
// own.
template <int R, int NB, bool kFar, typename T>
inline void prefetch_weights(const T* w, int64_t w_stride, int j, int64_t i) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(w);
  if constexpr (NB > 1 && !kFar) {
    const uintptr_t at = base + static_cast<uintptr_t>(((j + NB) * w_stride + i) * sizeof(T));
    _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T1);
  } else if constexpr (R >= 3) {
    const uintptr_t at =
        base + static_cast<uintptr_t>((j * w_stride + i) * sizeof(T) + kStreamPrefetchBytes);
    _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T1);
  }
}

// Bytes ahead of a stream tile's reads of each row of x that it prefetches into L1, against three
// or four rows of x: those rows are read again for every weight row, beside the weight stream, and
// the hardware prefetcher does not keep them all in L1 (kernel alone, one thread, Mixtral-like
// experts, hidden 1024 and ffn 3584, on 2 MiB pages: three rows 1.03-1.15x, four 0.99-1.08x; two
// rows lose, 0.73-0.97x).
constexpr int kStreamPrefetchXBytes = 256;

template <int R, int NB, typename T>
inline void prefetch_x(const T* x_at) {
  if constexpr (NB == 1 && R >= 3) {
    const uintptr_t at =
        reinterpret_cast<uintptr_t>(x_at) + kStreamPrefetchXBytes;  // may lie past x
    _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
  }
}

// ---- nn.Linear layout: dot products along k ----------------------------------------------------

// out[j * kMaxRows + r] = dot(w row j, x row r) for j < NB, r < R.
template <int R, int NB, bool kFar = false>
MOE_INFER_TARGET_AVX512 void dot_tile_f32(const float* x, int64_t x_stride, const float* w,
                                          int64_t w_stride, int64_t k, float* out) {
  __m512 acc[NB][R];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_loadu_ps(w + j * w_stride + i);
      prefetch_weights<R, NB, kFar>(w, w_stride, j, i);
    }
    for (int r = 0; r < R; ++r) {
      prefetch_x<R, NB>(x + r * x_stride + i);
      const __m512 xv = _mm512_loadu_ps(x + r * x_stride + i);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
    }
  }
  if (i < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1u);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * w_stride + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * x_stride + i);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) out[j * kMaxRows + r] = _mm512_reduce_add_ps(acc[j][r]);
}

// The same for bfloat16: AVX512-BF16 dot products of pairs, summed in float32.
template <int R, int NB, bool kFar = false>
MOE_INFER_TARGET_AVX512_BF16 void dot_tile_bf16(const uint16_t* x, int64_t x_stride,
                                                const uint16_t* w, int64_t w_stride, int64_t k,
                                                float* out) {
  __m512 acc[NB][R];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  if constexpr (R == 1) {
    // One row of x: two accumulators a weight row (even and odd vectors), so that the dot products'
    // latency does not pace the stream (on 2 MiB pages, Mixtral-sized experts: about 27 -> 31 GB/s,
    // the rate of a plain sum over the same bytes); every NB, so that a column has the same bits
    // in whichever tile it falls.
    __m512 odd[NB];
    for (int j = 0; j < NB; ++j) odd[j] = _mm512_setzero_ps();
    for (; i + 64 <= k; i += 64) {
      const __m512bh even_x = (__m512bh)_mm512_loadu_si512(x + i);
      const __m512bh odd_x = (__m512bh)_mm512_loadu_si512(x + i + 32);
      for (int j = 0; j < NB; ++j) {
        prefetch_weights<R, NB, kFar>(w, w_stride, j, i);
        prefetch_weights<R, NB, kFar>(w, w_stride, j, i + 32);
        acc[j][0] =
            _mm512_dpbf16_ps(acc[j][0], (__m512bh)_mm512_loadu_si512(w + j * w_stride + i), even_x);
        odd[j] = _mm512_dpbf16_ps(odd[j], (__m512bh)_mm512_loadu_si512(w + j * w_stride + i + 32),
                                  odd_x);
      }
    }
    for (int j = 0; j < NB; ++j) acc[j][0] = _mm512_add_ps(acc[j][0], odd[j]);
  }
  for (; i + 32 <= k; i += 32) {
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_loadu_si512(w + j * w_stride + i);
      prefetch_weights<R, NB, kFar>(w, w_stride, j, i);
    }
    for (int r = 0; r < R; ++r) {
      prefetch_x<R, NB>(x + r * x_stride + i);
      const __m512i xv = _mm512_loadu_si512(x + r * x_stride + i);
      for (int j = 0; j < NB; ++j) {
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)wv[j], (__m512bh)xv);
      }
    }
  }
  if (i < k) {
    const __mmask32 mask = static_cast<__mmask32>((1u << (k - i)) - 1u);
    __m512i wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * w_stride + i);
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + r * x_stride + i);
      for (int j = 0; j < NB; ++j) {
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)wv[j], (__m512bh)xv);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) out[j * kMaxRows + r] = _mm512_reduce_add_ps(acc[j][r]);
}

// ---- [K, N] layout: rows of w scaled by x and summed, 16 columns a vector ----------------------

MOE_INFER_TARGET_AVX512 inline __m512 load_columns(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

MOE_INFER_TARGET_AVX512 inline __m512 load_columns(const uint16_t* p, __mmask16 mask) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}

// acc[r * acc_stride + c] += sum_k x[r, k] * w[k, c] for r < rows, c < columns: each weight row
// is read once, front to back, kDepth rows of w per pass over the accumulators (which stay in
// L1/L2); each vector of weights is loaded and widened once for every row of x.
template <int kDepth, typename T>
MOE_INFER_TARGET_AVX512 void axpy_rows(const T* x, int64_t x_stride, int64_t rows, const T* w,
                                       int64_t w_stride, int64_t k, int64_t columns, float* acc,
                                       int64_t acc_stride) {
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
        float* a = acc + r * acc_stride + 16 * v;
        __m512 sum = _mm512_maskz_loadu_ps(mask, a);
        for (int d = 0; d < kDepth; ++d)
          sum = _mm512_fmadd_ps(wv[d], _mm512_set1_ps(xs[r][d]), sum);
        _mm512_mask_storeu_ps(a, mask, sum);
      }
    }
  }
}

// ---- weighted row sum ------------------------------------------------------------------------

// Multiply, then add: AddWeightedRow's two roundings, so the combines' sums keep their bits (two
// rows add up the same in either order). The empty asm keeps the compiler from fusing them.
template <typename T>
MOE_INFER_TARGET_AVX512 void add_weighted_row_avx512(const T* row, float weight, int64_t n,
                                                     float* acc) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t h = 0; h < n; h += 16) {
    const __mmask16 mask = n - h >= 16 ? static_cast<__mmask16>(0xffffu)
                                       : static_cast<__mmask16>((1u << (n - h)) - 1u);
    __m512 product = _mm512_mul_ps(w, load_columns(row + h, mask));
    asm("" : "+v"(product));
    _mm512_mask_storeu_ps(acc + h, mask,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask, acc + h), product));
  }
}

// ---- activation and rounding -----------------------------------------------------------------

// exp(x) with the bits of SLEEF's Sleef_expf16_u10, which ATen's vectorized float kernels call
// (Vectorized<float>::exp): n = rint(x / ln 2), the rest in two parts of ln 2, its polynomial,
// times 2^n; 0 below -104 and +inf above 100; NaN stays NaN.
MOE_INFER_TARGET_AVX512 inline __m512 exp_ps(__m512 x) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(
      x, _mm512_set1_ps(1.442695040888963407359924681001892137426645954152985934135f)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), x);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  // SLEEF multiplies by 2^(q >> 1), exactly, then by 2^(q - (q >> 1)), rounding once: scalef's
  // one rounding of u * 2^q.
  u = _mm512_scalef_ps(u, qf);
  u = _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u);
  return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), x, _CMP_LT_OQ),
                            _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// float_to_bf16 on 16 values (a NaN stays a NaN, its payload kept).
MOE_INFER_TARGET_AVX512 inline __m256i round_bf16_ps(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

MOE_INFER_TARGET_AVX512 inline __m512 widen_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// ATen's vectorized SiLU, x / (1 + exp(-x)) with SLEEF's exp; silu_scalar is its scalar loop's,
// with the C library's expf.
MOE_INFER_TARGET_AVX512 inline __m512 silu_ps(__m512 g) {
  const __m512 negated = _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(negated)));
}

inline float silu_scalar(float g) { return g / (1.0f + std::exp(-g)); }

// Per row: the elements ATen's vectorized loop covers (two vectors a step; AVX-512 vectors hold
// 16 float32 or 32 bfloat16 values), then the rest as its scalar loop computes them.
MOE_INFER_TARGET_AVX512 void silu_mul(const float* x, int64_t rows, int64_t ffn, float* out) {
  const int64_t vectorized = ffn - ffn % 32;
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = x + r * 2 * ffn;
    const float* up = gate + ffn;
    float* o = out + r * ffn;
    for (int64_t i = 0; i < vectorized; i += 16) {
      _mm512_storeu_ps(o + i,
                       _mm512_mul_ps(silu_ps(_mm512_loadu_ps(gate + i)), _mm512_loadu_ps(up + i)));
    }
    for (int64_t i = vectorized; i < ffn; ++i) o[i] = silu_scalar(gate[i]) * up[i];
  }
}

MOE_INFER_TARGET_AVX512 void silu_mul(const uint16_t* x, int64_t rows, int64_t ffn, uint16_t* out) {
  const int64_t vectorized = ffn - ffn % 64;
  const __mmask16 all = static_cast<__mmask16>(0xffffu);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* gate = x + r * 2 * ffn;
    const uint16_t* up = gate + ffn;
    uint16_t* o = out + r * ffn;
    for (int64_t i = 0; i < vectorized; i += 16) {
      const __m512 s = load_columns(gate + i, all);  // widened exactly
      const __m512 rounded = widen_bf16(round_bf16_ps(silu_ps(s)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          round_bf16_ps(_mm512_mul_ps(rounded, load_columns(up + i, all))));
    }
    for (int64_t i = vectorized; i < ffn; ++i) {
      const float s = to_float(float_to_bf16(silu_scalar(to_float(gate[i]))));
      o[i] = float_to_bf16(s * to_float(up[i]));
    }
  }
}

// Rounds to T's precision as ATen stores a float result in T: bfloat16 to nearest even; float32
// as it is.
template <typename T>
MOE_INFER_TARGET_AVX512 inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, uint16_t>) return widen_bf16(round_bf16_ps(v));
  return v;
}

template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, uint16_t>) return to_float(float_to_bf16(v));
  return v;
}

// Gate and up of 16 columns from GPT-OSS's interleaved fc1 row (gate at even, up at odd
// positions), widened to float32; `count` <= 16 columns.
MOE_INFER_TARGET_AVX512 inline void load_interleaved(const float* p, int64_t count, __m512& gate,
                                                     __m512& up) {
  const int64_t values = 2 * count;
  const __m512 lo = _mm512_maskz_loadu_ps(
      static_cast<__mmask16>(values >= 16 ? 0xffffu : (1u << values) - 1u), p);
  const __m512 hi =
      _mm512_maskz_loadu_ps(static_cast<__mmask16>(values >= 32   ? 0xffffu
                                                   : values <= 16 ? 0u
                                                                  : (1u << (values - 16)) - 1u),
                            p + 16);
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  gate = _mm512_permutex2var_ps(lo, evens, hi);
  up = _mm512_permutex2var_ps(lo, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), hi);
}

MOE_INFER_TARGET_AVX512 inline void load_interleaved(const uint16_t* p, int64_t count, __m512& gate,
                                                     __m512& up) {
  const __m512i pairs = _mm512_maskz_loadu_epi16(
      static_cast<__mmask32>(count >= 16 ? 0xffffffffu : (1u << (2 * count)) - 1u), p);
  gate = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  up = _mm512_castsi512_ps(
      _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

MOE_INFER_TARGET_AVX512 inline void store_columns(float* p, int64_t count, __m512 v) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>(count >= 16 ? 0xffffu : (1u << count) - 1u), v);
}

MOE_INFER_TARGET_AVX512 inline void store_columns(uint16_t* p, int64_t count, __m512 v) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(count >= 16 ? 0xffffu : (1u << count) - 1u),
                           round_bf16_ps(v));
}

// transformers' GPT-OSS activation op by op, as ATen computes and rounds each op in T: g =
// clamp_max(gate, limit), u = clamp(up, -limit, limit), out = sigmoid(g * alpha) * g * (u + 1).
// The sigmoid, 1 / (1 + exp(-x)), takes SLEEF's exp where `vectorized` (ATen's vectorized loop
// over the whole call) and the C library's expf past it. Columns [c0, c1) of row r; NaN propagates
// through the clamps, as ATen's.
template <typename T>
MOE_INFER_TARGET_AVX512 void gpt_oss_swiglu_columns(const T* x, int64_t c0, int64_t c1,
                                                    bool vectorized, float alpha, float limit,
                                                    T* out) {
  if (vectorized) {
    for (int64_t c = c0; c < c1; c += 16) {
      const int64_t count = std::min<int64_t>(16, c1 - c);
      __m512 gate, up;
      load_interleaved(x + 2 * c, count, gate, up);
      const __m512 g = _mm512_min_ps(_mm512_set1_ps(limit), gate);
      const __m512 u =
          _mm512_min_ps(_mm512_set1_ps(limit), _mm512_max_ps(_mm512_set1_ps(-limit), up));
      const __m512 t = round_to<T>(_mm512_mul_ps(g, _mm512_set1_ps(alpha)));
      const __m512 negated = _mm512_sub_ps(_mm512_setzero_ps(), t);
      const __m512 sig = round_to<T>(_mm512_div_ps(
          _mm512_set1_ps(1.0f), _mm512_add_ps(exp_ps(negated), _mm512_set1_ps(1.0f))));
      const __m512 gated = round_to<T>(_mm512_mul_ps(sig, g));
      const __m512 up1 = round_to<T>(_mm512_add_ps(u, _mm512_set1_ps(1.0f)));
      store_columns(out + c, count, _mm512_mul_ps(gated, up1));
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float gate = to_float(x[2 * c]);
    const float up = to_float(x[2 * c + 1]);
    const float g = std::isnan(gate) ? gate : std::min(gate, limit);
    const float u = std::isnan(up) ? up : std::min(std::max(up, -limit), limit);
    const float t = round_to<T>(g * alpha);
    const float sig = round_to<T>(1.0f / (1.0f + std::exp(-t)));
    const float gated = round_to<T>(sig * g);
    const float up1 = round_to<T>(u + 1.0f);
    store(out + c, gated * up1);
  }
}

template <typename T>
void gpt_oss_swiglu_range(const T* x, int64_t rows, int64_t ffn, float alpha, float limit, T* out,
                          int64_t begin, int64_t end) {
  // ATen's vectorized loop covers two vectors a step (16 float32 or 32 bfloat16 values a vector).
  const int64_t step = std::is_same_v<T, uint16_t> ? 64 : 32;
  const int64_t total = rows * ffn;
  const int64_t vectorized = total - total % step;
  // ATen's clamps convert their bounds to the tensor's type.
  const float bound = round_to<T>(limit);
  for (int64_t r = begin / ffn; r < rows && r * ffn < end; ++r) {
    const int64_t c0 = std::max<int64_t>(begin - r * ffn, 0);
    const int64_t c1 = std::min<int64_t>(end - r * ffn, ffn);
    const int64_t split = std::clamp<int64_t>(vectorized - r * ffn, c0, c1);
    gpt_oss_swiglu_columns(x + r * 2 * ffn, c0, split, true, alpha, bound, out + r * ffn);
    gpt_oss_swiglu_columns(x + r * 2 * ffn, split, c1, false, alpha, bound, out + r * ffn);
  }
}

MOE_INFER_TARGET_AVX512 void round_to_bf16_avx512(const float* acc, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? static_cast<__mmask16>(0xffffu)
                                       : static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(out + i, mask, round_bf16_ps(_mm512_maskz_loadu_ps(mask, acc + i)));
  }
}

// ---- drivers
// -------------------------------------------------------------------------------------

// table[(R - 1) * Shape::kBlock + (NB - 1)]: the tile of R rows and NB blocks.
template <typename Shape, template <int, int> class Tile, size_t... I>
constexpr auto make_tiles(std::index_sequence<I...>) {
  return std::array<decltype(&Tile<1, 1>::run), sizeof...(I)>{
      &Tile<static_cast<int>(I) / Shape::kBlock + 1,
            static_cast<int>(I) % Shape::kBlock + 1>::run...};
}

template <typename Shape, template <int, int> class Tile>
constexpr auto tiles_of() {
  return make_tiles<Shape, Tile>(std::make_index_sequence<Shape::kRows * Shape::kBlock>{});
}

template <int R, int NB>
struct DotF32 {
  static void run(const float* x, int64_t xs, const float* w, int64_t ws, int64_t k, float* out) {
    dot_tile_f32<R, NB>(x, xs, w, ws, k, out);
  }
};
template <int R, int NB>
struct DotBf16 {
  static void run(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t ws, int64_t k,
                  float* out) {
    dot_tile_bf16<R, NB>(x, xs, w, ws, k, out);
  }
};
template <typename T>
struct DotOf;
template <>
struct DotOf<float> {
  template <int R, int NB>
  using Tile = DotF32<R, NB>;
  using Square = SquareTile;
};
template <>
struct DotOf<uint16_t> {
  template <int R, int NB>
  using Tile = DotBf16<R, NB>;
  using Square = SquareTileBf16;
};

// A SmallGemm's operands in their element type T (float, or uint16_t for bfloat16).
template <typename T>
struct Operands {
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  explicit Operands(const SmallGemm& g)
      : x(static_cast<const T*>(g.x)),
        w(static_cast<const T*>(g.w)),
        bias(static_cast<const T*>(g.bias)),
        y(static_cast<T*>(g.y)) {}
  float bias_at(int64_t n) const { return bias != nullptr ? to_float(bias[n]) : 0.0f; }
};

template <typename T, typename Shape>
void run_dot(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  static constexpr auto tiles = tiles_of<Shape, DotOf<T>::template Tile>();
  const Operands<T> o(g);
  float out[Shape::kBlock * kMaxRows];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += Shape::kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(Shape::kBlock, n_end - n0));
    for (int64_t r0 = 0, rt = 0; r0 < g.rows; r0 += rt) {
      rt = Shape::pass(g.rows - r0);
      tiles[(rt - 1) * Shape::kBlock + (nb - 1)](o.x + r0 * g.x_stride, g.x_stride,
                                                 o.w + n0 * g.w_stride, g.w_stride, g.k, out);
      for (int j = 0; j < nb; ++j) {
        const float b = o.bias_at(n0 + j);
        for (int r = 0; r < rt; ++r) {
          store(o.y + (r0 + r) * g.y_stride + n0 + j, out[j * kMaxRows + r] + b);
        }
      }
    }
  }
}

// One row of x against weight rows w and w + far (out[0], out[kMaxRows]): the one-row tile of two
// weight rows, each column with the one-row arithmetic (its bits), each row a stream of its own,
// which one core reads faster than one stream (on 2 MiB pages, about 26 -> 34 GB/s for a plain
// sum; the hardware prefetcher follows each).
inline void dot_pair(const float* x, const float* w, int64_t far, int64_t k, float* out) {
  dot_tile_f32<1, 2, true>(x, 0, w, far, k, out);
}
inline void dot_pair(const uint16_t* x, const uint16_t* w, int64_t far, int64_t k, float* out) {
  dot_tile_bf16<1, 2, true>(x, 0, w, far, k, out);
}

// One row of x: the columns' first half and second half side by side (dot_pair), an odd last
// column alone; the same bits as run_dot.
template <typename T>
void run_dot_pairs(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  const Operands<T> o(g);
  const int64_t half = (n_end - n_begin) / 2;
  float out[2 * kMaxRows];
  const auto put = [&](int64_t n, float v) { store(o.y + n, v + o.bias_at(n)); };
  for (int64_t n = n_begin; n < n_begin + half; ++n) {
    dot_pair(o.x, o.w + n * g.w_stride, half * g.w_stride, g.k, out);
    put(n, out[0]);
    put(n + half, out[kMaxRows]);
  }
  if (n_begin + 2 * half < n_end) {
    const int64_t n = n_end - 1;
    DotOf<T>::template Tile<1, 1>::run(o.x, g.x_stride, o.w + n * g.w_stride, g.w_stride, g.k, out);
    put(n, out[0]);
  }
}

template <typename T>
void run_axpy(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  const Operands<T> o(g);
  float acc[kAxpyScratch];
  const bool stream =
      g.rows <= kAxpyStreamRows && n_begin == 0 && n_end == g.n && g.n * g.rows <= kAxpyScratch;
  const int64_t block = stream ? g.n : kAxpyColumns;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
    const int64_t columns = std::min<int64_t>(block, n_end - n0);
    for (int64_t r = 0; r < g.rows; ++r) std::fill_n(acc + r * block, columns, 0.0f);
    if (stream) {
      axpy_rows<1>(o.x, g.x_stride, g.rows, o.w + n0, g.w_stride, g.k, columns, acc, block);
    } else {
      axpy_rows<4>(o.x, g.x_stride, g.rows, o.w + n0, g.w_stride, g.k, columns, acc, block);
    }
    for (int64_t r = 0; r < g.rows; ++r) {
      T* y_row = o.y + r * g.y_stride + n0;
      for (int64_t c = 0; c < columns; ++c)
        store(y_row + c, acc[r * block + c] + o.bias_at(n0 + c));
    }
  }
}

template <typename T>
void run(const SmallGemm& g, int64_t n_begin, int64_t n_end) {
  if (g.w_k_contiguous) {
    if (g.rows == 1) {
      run_dot_pairs<T>(g, n_begin, n_end);
    } else if (g.rows <= kStreamRows && g.k * static_cast<int64_t>(sizeof(T)) < kStreamRowBytes) {
      run_dot<T, StreamTile>(g, n_begin, n_end);
    } else {
      run_dot<T, typename DotOf<T>::Square>(g, n_begin, n_end);
    }
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

// f(T{}) with T the element type of `type` (float, or uint16_t for bfloat16) where the CPU has
// AVX-512; false, with nothing done, where it has not.
template <typename F>
bool on_avx512(SmallGemmType type, F&& f) {
  if (!cpu_has_avx512()) return false;
  if (type == SmallGemmType::kFloat) {
    f(float{});
  } else {
    f(uint16_t{});
  }
  return true;
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

// (The parameters go unused where the kernels are not compiled.)
bool add_weighted_row([[maybe_unused]] SmallGemmType type, [[maybe_unused]] const void* row,
                      [[maybe_unused]] float weight, [[maybe_unused]] int64_t n,
                      [[maybe_unused]] float* acc) {
#if MOE_INFER_SMALL_GEMM_X86
  return on_avx512(type, [&](auto element) {
    using T = decltype(element);
    add_weighted_row_avx512(static_cast<const T*>(row), weight, n, acc);
  });
#else
  return false;
#endif
}

bool silu_mul_rows([[maybe_unused]] SmallGemmType type, [[maybe_unused]] const void* x,
                   [[maybe_unused]] int64_t rows, [[maybe_unused]] int64_t ffn,
                   [[maybe_unused]] void* out) {
#if MOE_INFER_SMALL_GEMM_X86
  return on_avx512(type, [&](auto element) {
    using T = decltype(element);
    silu_mul(static_cast<const T*>(x), rows, ffn, static_cast<T*>(out));
  });
#else
  return false;
#endif
}

bool gpt_oss_swiglu_rows([[maybe_unused]] SmallGemmType type, [[maybe_unused]] const void* x,
                         [[maybe_unused]] int64_t rows, [[maybe_unused]] int64_t ffn,
                         [[maybe_unused]] float alpha, [[maybe_unused]] float limit,
                         [[maybe_unused]] void* out, [[maybe_unused]] int64_t begin,
                         [[maybe_unused]] int64_t end) {
#if MOE_INFER_SMALL_GEMM_X86
  return on_avx512(type, [&](auto element) {
    using T = decltype(element);
    gpt_oss_swiglu_range(static_cast<const T*>(x), rows, ffn, alpha, limit, static_cast<T*>(out),
                         begin, end);
  });
#else
  return false;
#endif
}

bool round_to_bfloat16([[maybe_unused]] const float* acc, [[maybe_unused]] int64_t n,
                       [[maybe_unused]] void* out) {
#if MOE_INFER_SMALL_GEMM_X86
  if (!cpu_has_avx512()) return false;
  round_to_bf16_avx512(acc, n, static_cast<uint16_t*>(out));
  return true;
#else
  return false;
#endif
}

void small_gemm([[maybe_unused]] const SmallGemm& gemm, [[maybe_unused]] int64_t n_begin,
                [[maybe_unused]] int64_t n_end) {
#if MOE_INFER_SMALL_GEMM_X86
  if (gemm.type == SmallGemmType::kFloat) {
    run<float>(gemm, n_begin, n_end);
  } else {
    run<uint16_t>(gemm, n_begin, n_end);
  }
#endif
}

}  // namespace moe_infer
