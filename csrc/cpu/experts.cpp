// CPU grouped expert MLP: the shared per-expert GEMM loop (ATen's BLAS, weights read through
// views) with a parallel fused activation; and grouped_mlp_combine, the same expert compute with
// the gather and the weighted combine fused in, block by block.
#include "experts.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/checks.h"
#include "common/composite.h"
#include "cpu/parallel.h"
#include "cpu/small_gemm.h"
#include "dispatch.h"

namespace moe_infer {

namespace {

// An element function of the activation table (unary_of) with ATen's vectorized kernels; false
// for one without (activate_row computes it from common/activation.h).
bool unary_out(Activation unary, at::Tensor& out, const at::Tensor& x) {
  switch (unary) {
    case Activation::kRelu:
      at::clamp_min_out(out, x, 0);
      return true;
    case Activation::kGelu:
      at::gelu_out(out, x);
      return true;
    case Activation::kGeluTanh:
      at::gelu_out(out, x, "tanh");
      return true;
    case Activation::kSilu:
      at::silu_out(out, x);
      return true;
    default:
      return false;
  }
}

// GPT-OSS's clamped swiGLU on interleaved gate/up columns, op by op as transformers computes it
// (so 16-bit types round where its eager experts round): (clamp(up) + 1) * g * sigmoid(alpha * g)
// with g = min(gate, limit).
void gpt_oss_swiglu_out(const at::Tensor& fc1_out, int64_t ffn_size, const ActivationParams& params,
                        at::Tensor& out) {
  const at::Tensor gate = fc1_out.slice(1, 0, 2 * ffn_size, 2).clamp_max(params.swiglu_limit);
  at::Tensor up =
      fc1_out.slice(1, 1, 2 * ffn_size, 2).clamp(-params.swiglu_limit, params.swiglu_limit);
  at::sigmoid_out(out, gate * params.swiglu_alpha);
  out.mul_(gate);
  up.add_(1);
  out.mul_(up);
}

// The type of moe_infer's own activation kernels (small_gemm.h: AVX-512, float32 and bfloat16) for
// fc1_out [n, F1] -> out [n, F], rows contiguous; nullopt where they do not apply (ATen's kernels).
std::optional<SmallGemmType> raw_activation_type(const at::Tensor& fc1_out, int64_t ffn_size,
                                                 const at::Tensor& out) {
  const at::ScalarType dtype = fc1_out.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || out.scalar_type() != dtype) {
    return std::nullopt;
  }
  if (!small_gemm_supported(SmallGemmType::kFloat, true)) return std::nullopt;  // AVX-512
  if (fc1_out.stride(1) != 1 || fc1_out.stride(0) != 2 * ffn_size || !out.is_contiguous()) {
    return std::nullopt;
  }
  return dtype == at::kFloat ? SmallGemmType::kFloat : SmallGemmType::kBFloat16;
}

// GPT-OSS's activation with gpt_oss_swiglu_rows: the bits of gpt_oss_swiglu_out in one pass,
// without its eight ATen calls and their temporaries. false where it does not apply.
bool gpt_oss_swiglu_raw(const at::Tensor& fc1_out, int64_t ffn_size, const ActivationParams& params,
                        const at::Tensor& out) {
  const std::optional<SmallGemmType> raw = raw_activation_type(fc1_out, ffn_size, out);
  if (!raw.has_value()) return false;
  const SmallGemmType type = *raw;
  const int64_t rows = out.size(0);
  const int64_t total = rows * ffn_size;
  const void* in = fc1_out.const_data_ptr();
  void* to = out.data_ptr();
  // Tasks of 16 elements at least 2048 vectors long (the same bits however the range is split).
  at::parallel_for(0, (total + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    gpt_oss_swiglu_rows(type, in, rows, ffn_size, static_cast<float>(params.swiglu_alpha),
                        static_cast<float>(params.swiglu_limit), to, begin * 16,
                        std::min(total, end * 16));
  });
  return true;
}

// ATen's vectorized kernels (several times faster than the scalar loop; in 16-bit types they round
// as transformers' eager experts do: act(gate) rounded, then the product); float64 through
// activate_row.
bool activate_rows_vectorized(const at::Tensor& fc1_out, int64_t ffn_size,
                              const ActivationParams& params, at::Tensor out) {
  if (fc1_out.scalar_type() == at::kDouble) return false;
  if (params.activation == Activation::kGptOssSwiglu) {
    if (!gpt_oss_swiglu_raw(fc1_out, ffn_size, params, out)) {
      gpt_oss_swiglu_out(fc1_out, ffn_size, params, out);
    }
    return true;
  }
  if (!unary_out(unary_of(params.activation), out, fc1_out.narrow(1, 0, ffn_size))) return false;
  if (is_gated(params.activation)) out.mul_(fc1_out.narrow(1, ffn_size, ffn_size));
  return true;
}

// The gated SiLU with silu_mul_rows: the bits of ATen's silu and mul, from raw memory (a decode
// step finds ATen's elementwise kernels cold in the caches: two of them cost about 50 us there),
// each row on its own. false where it does not apply.
bool silu_glu_rows(const at::Tensor& fc1_out, int64_t ffn_size, const ActivationParams& params,
                   const at::Tensor& out) {
  if (params.activation != Activation::kSiluGlu) return false;
  const std::optional<SmallGemmType> raw = raw_activation_type(fc1_out, ffn_size, out);
  if (!raw.has_value()) return false;
  const SmallGemmType type = *raw;
  const char* in = static_cast<const char*>(fc1_out.const_data_ptr());
  char* to = static_cast<char*>(out.data_ptr());
  const int64_t element_bytes = static_cast<int64_t>(out.element_size());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(ffn_size, 1));
  at::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) {
    silu_mul_rows(type, in + begin * 2 * ffn_size * element_bytes, end - begin, ffn_size,
                  to + begin * ffn_size * element_bytes);
  });
  return true;
}

void activate_rows(const at::Tensor& fc1_out, const ActivationParams& params,
                   const at::Tensor& out) {
  const int64_t ffn_size = out.size(1);
  if (silu_glu_rows(fc1_out, ffn_size, params, out)) return;
  if (activate_rows_vectorized(fc1_out, ffn_size, params, out)) return;
  const int64_t num_rows = fc1_out.size(0);
  const int64_t fc1_width = fc1_out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, fc1_out.scalar_type(), "grouped_mlp_activation", [&] {
        const scalar_t* in_ptr = fc1_out.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(fc1_width, 1));
        at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            activate_row(in_ptr + r * fc1_width, ffn_size, params, out_ptr + r * ffn_size);
          }
        });
      });
}

ActivateFn cpu_activation(const ActivationParams& params) {
  return [params](const at::Tensor& fc1_out, const at::Tensor& act) {
    activate_rows(fc1_out, params, act);
  };
}

// Whether cpu_activation computes each row of fc1_out on its own, to the same bits whatever other
// rows share the call: the gated SiLU in moe_infer's kernel (silu_glu_rows). ATen's kernels split a
// call, or each thread's part of it, into a vectorized body and a scalar tail that round
// differently, so their bits depend on the call's extent and on where the threads split it.
bool row_local(const ActivationParams& params, const at::Tensor& fc1_out, const at::Tensor& act) {
  return params.activation == Activation::kSiluGlu &&
         raw_activation_type(fc1_out, act.size(1), act).has_value();
}

// Rows [row, row + count) of one expert in a run of rows grouped by expert.
struct ExpertRows {
  int64_t expert;
  int64_t row;
  int64_t count;
};

// The activation of the rows of `pieces` (fc1_out -> act, row for row): one call where it is row
// local, else one per expert, as the per-expert path calls it, so that an expert's output never
// depends on the other experts' rows.
void activate_experts(const ActivateFn& activate, const ActivationParams& params,
                      const at::Tensor& fc1_out, const at::Tensor& act,
                      const std::vector<ExpertRows>& pieces) {
  if (pieces.empty()) return;
  if (row_local(params, fc1_out, act)) {
    const int64_t end = pieces.back().row + pieces.back().count;
    activate(fc1_out.narrow(0, 0, end), act.narrow(0, 0, end));
    return;
  }
  for (const ExpertRows& piece : pieces) {
    activate(fc1_out.narrow(0, piece.row, piece.count), act.narrow(0, piece.row, piece.count));
  }
}

// small_gemm's view of the weights w (+ bias) of one GEMM: w(k, n) = w[..., k, n] (k_dim 0, n_dim
// 1: an [K, N] view of the nn.Linear layout [N, K] or of a stored [K, N]) or, stacked by expert,
// w[e, ..., ...] at k_dim / n_dim 1 and 2 (expert 0's GEMM); bias: N values or [E, N]. Read from
// the strides, no view made. x, y and rows are left for the caller. nullopt where small_gemm does
// not apply (dtype, layout, CPU): callers use ATen's GEMM.
std::optional<SmallGemm> small_gemm_of(const at::Tensor& w, int64_t k_dim, int64_t n_dim,
                                       const std::optional<at::Tensor>& bias,
                                       at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return std::nullopt;
  if (w.scalar_type() != dtype) return std::nullopt;
  if (bias.has_value() && (bias->scalar_type() != dtype || bias->stride(-1) != 1)) {
    return std::nullopt;
  }
  const bool k_contiguous = w.stride(k_dim) == 1;
  if (!k_contiguous && w.stride(n_dim) != 1) return std::nullopt;
  const SmallGemmType type = dtype == at::kFloat ? SmallGemmType::kFloat : SmallGemmType::kBFloat16;
  if (!small_gemm_supported(type, k_contiguous)) return std::nullopt;
  return SmallGemm{type,
                   nullptr,
                   0,
                   w.const_data_ptr(),
                   k_contiguous ? w.stride(n_dim) : w.stride(k_dim),
                   k_contiguous,
                   bias.has_value() ? bias->const_data_ptr() : nullptr,
                   nullptr,
                   0,
                   0,
                   w.size(k_dim),
                   w.size(n_dim)};
}

// Columns per task of a small_gemm split across threads.
int64_t small_gemm_block(const SmallGemm& gemm) {
  return gemm.w_k_contiguous ? kSmallGemmColumnBlock : kSmallGemmRowMajorColumnBlock;
}

// out = x @ w (+ bias) with small_gemm for an expert with few rows (decode), whose GEMM is bound by
// the bytes of its weights; false (ATen's GEMM) for more rows, other dtypes or layouts.
bool small_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                  const std::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0);
  if (rows == 0 || rows > kSmallGemmMaxRows) return false;
  if (out.scalar_type() != x.scalar_type() || x.stride(1) != 1 || out.stride(1) != 1) return false;
  std::optional<SmallGemm> gemm = small_gemm_of(w, 0, 1, bias, x.scalar_type());
  if (!gemm.has_value()) return false;
  gemm->x = x.const_data_ptr();
  gemm->x_stride = x.stride(0);
  gemm->y = out.data_ptr();
  gemm->y_stride = out.stride(0);
  gemm->rows = rows;
  const int64_t columns = gemm->n;
  const int64_t block = small_gemm_block(*gemm);
  at::parallel_for(0, (columns + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    small_gemm(*gemm, begin * block, std::min(columns, end * block));
  });
  return true;
}

// One GEMM (fc1 or fc2) of every expert as small_gemm sees it: expert 0's, and the bytes from one
// expert's weights (and bias) to the next's.
struct SmallGemmLayer {
  SmallGemm gemm;
  int64_t weight_step;
  int64_t bias_step;
};

// weight: stacked [E, N, K] (nn.Linear), or [E, K, N] when transposed; bias [E, N].
std::optional<SmallGemmLayer> small_gemm_layer(const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               bool transposed, at::ScalarType dtype) {
  const std::optional<SmallGemm> gemm =
      small_gemm_of(weight, transposed ? 1 : 2, transposed ? 2 : 1, bias, dtype);
  if (!gemm.has_value()) return std::nullopt;
  const int64_t element_bytes = static_cast<int64_t>(c10::elementSize(dtype));
  return SmallGemmLayer{*gemm, weight.stride(0) * element_bytes,
                        bias.has_value() ? bias->stride(0) * element_bytes : 0};
}

// Rows of one dtype: row r at data + r * stride elements, unit stride along the row.
struct RowsView {
  const void* data;
  int64_t stride;
};

// out rows [offsets[e], offsets[e + 1]) = in rows of expert e @ its weights, for every expert, in
// ONE parallel region over (expert, column block) tasks: each thread streams a contiguous run of
// the experts' weights, and one run of an expert's columns is one small_gemm call.
void small_gemm_experts(const SmallGemmLayer& layer, const std::vector<int32_t>& offsets,
                        RowsView in, void* out, int64_t out_stride) {
  std::vector<int64_t> active;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] > offsets[e]) active.push_back(static_cast<int64_t>(e));
  }
  const int64_t element_bytes = layer.gemm.type == SmallGemmType::kFloat ? 4 : 2;
  const int64_t columns = layer.gemm.n;
  const int64_t block = small_gemm_block(layer.gemm);
  const int64_t blocks = (columns + block - 1) / block;
  const int64_t tasks = static_cast<int64_t>(active.size()) * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end;) {
      const int64_t a = task / blocks;
      const int64_t run_end = std::min(end, (a + 1) * blocks);
      const int64_t e = active[a];
      SmallGemm gemm = layer.gemm;
      gemm.x = static_cast<const char*>(in.data) + offsets[e] * in.stride * element_bytes;
      gemm.x_stride = in.stride;
      gemm.y = static_cast<char*>(out) + offsets[e] * out_stride * element_bytes;
      gemm.y_stride = out_stride;
      gemm.rows = offsets[e + 1] - offsets[e];
      gemm.w = static_cast<const char*>(gemm.w) + e * layer.weight_step;
      if (gemm.bias != nullptr)
        gemm.bias = static_cast<const char*>(gemm.bias) + e * layer.bias_step;
      small_gemm(gemm, (task - a * blocks) * block,
                 std::min(columns, (run_end - a * blocks) * block));
      task = run_end;
    }
  });
}

// The expert FFN of rows grouped by expert when every expert has at most kSmallGemmMaxRows of them
// (decode): each GEMM of every expert in one parallel region, and the activation of all rows in
// one call, instead of a region and several ATen calls per expert (Qwen3-MoE-like at 16 tokens
// computes 59 experts). nullopt where small_gemm does not apply or an expert has more rows.
// Rows of all experts up to which they take the one pass: its scratch holds every row's fc1 and
// activation (Qwen3-MoE-like, 16 tokens: 128 rows; a DeepSeek-V3-sized layer at 256 rows: 10 MiB
// in bfloat16); more go expert by expert, still through small_gemm.
constexpr int64_t kFewRowsMaxRows = 256;

struct FewRowsMlp {
  SmallGemmLayer fc1;
  SmallGemmLayer fc2;
};

std::optional<FewRowsMlp> few_rows_mlp(const ExpertWeights& weights,
                                       const std::vector<int32_t>& offsets, at::ScalarType dtype) {
  if (offsets.back() > kFewRowsMaxRows) return std::nullopt;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] - offsets[e] > kSmallGemmMaxRows) return std::nullopt;
  }
  std::optional<SmallGemmLayer> fc1 =
      small_gemm_layer(weights.fc1_weight, weights.fc1_bias, weights.transposed, dtype);
  std::optional<SmallGemmLayer> fc2 =
      small_gemm_layer(weights.fc2_weight, weights.fc2_bias, weights.transposed, dtype);
  if (!fc1.has_value() || !fc2.has_value()) return std::nullopt;
  return FewRowsMlp{*fc1, *fc2};
}

// y rows [0, offsets.back()) = the FFN of the same rows of `rows` (grouped by expert), in the
// dtype the FFN was planned for. Each decode step runs this from cold caches, where every ATen call
// costs tens of microseconds (Mixtral-like, one token: about 0.2 ms of the step's 2): one
// allocation, and no view made.
void run_few_rows_mlp(const FewRowsMlp& mlp, RowsView rows, const std::vector<int32_t>& offsets,
                      const MlpSizes& sizes, const ActivateFn& activate, void* y,
                      int64_t y_stride) {
  const int64_t num_rows = offsets.back();
  const at::ScalarType dtype =
      mlp.fc1.gemm.type == SmallGemmType::kFloat ? at::kFloat : at::kBFloat16;
  const auto options = at::TensorOptions().dtype(dtype);
  const at::Tensor scratch = at::empty({num_rows * (sizes.fc1_outputs + sizes.ffn_size)}, options);
  void* fc1_out = scratch.data_ptr();
  void* act = static_cast<char*>(fc1_out) + num_rows * sizes.fc1_outputs * scratch.element_size();
  small_gemm_experts(mlp.fc1, offsets, rows, fc1_out, sizes.fc1_outputs);
  std::vector<ExpertRows> pieces;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (offsets[e + 1] > offsets[e]) {
      pieces.push_back({static_cast<int64_t>(e), offsets[e], offsets[e + 1] - offsets[e]});
    }
  }
  activate_experts(activate, sizes.activation,
                   at::from_blob(fc1_out, {num_rows, sizes.fc1_outputs}, options),
                   at::from_blob(act, {num_rows, sizes.ffn_size}, options), pieces);
  small_gemm_experts(mlp.fc2, offsets, RowsView{act, sizes.ffn_size}, y, y_stride);
}

// grouped_mlp_combine when few_rows_mlp applies: every routed pair's row gathered at once, and
// combined in the order of the blocked path (expert by expert), so the sums keep their bits.
// hidden: unit stride along H; its dtype is the plan's.
at::Tensor few_rows_combine(const FewRowsMlp& mlp, const at::Tensor& hidden,
                            const at::Tensor& topk_weights, const int32_t* pair_ids,
                            const std::vector<int32_t>& offsets, const MlpCombineSizes& sizes,
                            const ActivateFn& activate) {
  const int64_t num_tokens = sizes.mlp.num_rows;
  const int64_t hidden_size = sizes.mlp.hidden_size;
  const int64_t num_routed = offsets.back();
  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const bool is_float = hidden.scalar_type() == at::kFloat;
  auto out = at::empty({num_tokens, hidden_size}, hidden.options());
  // x and y rows in hidden's dtype, then (bfloat16) the float32 accumulator.
  const int64_t rows_bytes = 2 * num_routed * hidden_size * element_bytes;
  const int64_t accumulator_bytes = is_float ? 0 : num_tokens * hidden_size * 4;
  const at::Tensor scratch =
      at::empty({rows_bytes + accumulator_bytes + 64}, hidden.options().dtype(at::kByte));
  char* x = static_cast<char*>(scratch.data_ptr());
  char* y = x + num_routed * hidden_size * element_bytes;
  float* accumulator =
      is_float ? out.data_ptr<float>()
               : reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(x + rows_bytes) + 63) &
                                          ~uintptr_t{63});
  std::fill_n(accumulator, num_tokens * hidden_size, 0.0f);

  const at::Tensor weights_values = float_contiguous(topk_weights);
  const float* weights = weights_values.const_data_ptr<float>();

  permute_rows(static_cast<const char*>(hidden.const_data_ptr()), hidden.stride(0) * element_bytes,
               hidden_size * element_bytes, pair_ids, sizes.top_k, 0, num_routed, x);
  run_few_rows_mlp(mlp, RowsView{x, hidden_size}, offsets, sizes.mlp, activate, y, hidden_size);
  if (is_float) {
    accumulate_weighted_rows(reinterpret_cast<const float*>(y), num_routed, hidden_size, pair_ids,
                             weights, sizes.top_k, accumulator, CpuAddWeightedRow{});
    return out;
  }
  accumulate_weighted_rows(reinterpret_cast<const c10::BFloat16*>(y), num_routed, hidden_size,
                           pair_ids, weights, sizes.top_k, accumulator, CpuAddWeightedRow{});
  auto* out_ptr = out.data_ptr<c10::BFloat16>();
  if (!round_to_bfloat16(accumulator, num_tokens * hidden_size, out_ptr)) {
    std::copy_n(accumulator, num_tokens * hidden_size, out_ptr);
  }
  return out;
}

// Rows per block of grouped_mlp_combine: large enough that the GEMMs run as fast as on a whole
// expert (measured: Mixtral-like, 4096 tokens, within 1% of the unfused ops; 256 rows cost 6%),
// and the scratch stays bounded however many tokens come.
constexpr int64_t kCombineBlockRows = 1024;

// The end of the block of expert-ordered rows that starts at `begin`: whole experts, up to
// `block_rows` rows; or, where the expert at `begin` has more rows left, `block_rows` of them.
int64_t block_end(const std::vector<int32_t>& offsets, int64_t begin, int64_t block_rows) {
  const int64_t limit = std::min<int64_t>(offsets.back(), begin + block_rows);
  // The last expert boundary at or before the limit (offsets[0] == 0 is one).
  const int64_t boundary = *(std::upper_bound(offsets.begin(), offsets.end(), limit) - 1);
  return boundary > begin ? boundary : limit;
}

// Adds a block's expert output rows y [n, H] (sorted pair ids `pairs`) into the tokens' float32
// accumulators, token after token (a token's rows in a block of several experts then meet its
// accumulator row in L1), in expert order as they come, so the sums keep their bits; the threads
// split the columns, as rows of one token may sit in several experts of the block.
template <typename T>
void combine_block(const T* y, int64_t n, int64_t hidden_size, const int32_t* pairs,
                   const float* weights, int64_t top_k, float* acc, std::vector<int32_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return pairs[a] / top_k < pairs[b] / top_k; });
  const int64_t grain =
      (std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(n, 1)) + 15) / 16 * 16;
  at::parallel_for(0, hidden_size, grain, [&](int64_t begin, int64_t end) {
    for (const int32_t i : order) {
      const int64_t pair = pairs[i];
      CpuAddWeightedRow{}(y + i * hidden_size + begin, weights[pair], end - begin,
                          acc + (pair / top_k) * hidden_size + begin);
    }
  });
}

}  // namespace

at::Tensor grouped_mlp_cpu(MOE_INFER_PARAMS(grouped_mlp)) {
  const MlpSizes sizes = check_grouped_mlp(MOE_INFER_ARGS(grouped_mlp));
  const std::vector<int32_t> offsets = host_expert_offsets(expert_offsets, sizes.num_rows);
  const ExpertWeights weights = expert_weights(MOE_INFER_EXPERT_ARGS);
  const std::optional<FewRowsMlp> few_rows = few_rows_mlp(weights, offsets, hidden.scalar_type());
  if (few_rows.has_value() && hidden.stride(1) == 1) {
    auto out = at::empty({sizes.num_rows, sizes.hidden_size}, hidden.options());
    run_few_rows_mlp(*few_rows, RowsView{hidden.const_data_ptr(), hidden.stride(0)}, offsets, sizes,
                     cpu_activation(sizes.activation), out.data_ptr(), sizes.hidden_size);
    // Rows after every expert (unrouted pairs) are defined as zeros.
    if (offsets.back() < sizes.num_rows) {
      out.narrow(0, offsets.back(), sizes.num_rows - offsets.back()).zero_();
    }
    return out;
  }
  return grouped_mlp_per_expert(hidden, offsets, weights, sizes, cpu_activation(sizes.activation),
                                small_linear);
}

at::Tensor grouped_mlp_combine_cpu(MOE_INFER_PARAMS(grouped_mlp_combine)) {
  constexpr const char* op = "grouped_mlp_combine";
  const MlpCombineSizes sizes = check_grouped_mlp_combine(MOE_INFER_ARGS(grouped_mlp_combine));
  const int64_t num_tokens = sizes.mlp.num_rows;
  const int64_t hidden_size = sizes.mlp.hidden_size;
  const int64_t top_k = sizes.top_k;
  const int64_t num_pairs = num_tokens * top_k;
  const std::vector<int32_t> offsets =
      host_expert_offsets(expert_offsets, num_pairs, op, "pairs (num_tokens * top_k)");
  const at::Tensor pair_ids = sorted_pair_ids.contiguous();
  const int32_t* pair_ptr = pair_ids.const_data_ptr<int32_t>();
  for (int64_t r = offsets.front(); r < offsets.back(); ++r) {
    TORCH_CHECK_VALUE(pair_ptr[r] >= 0 && pair_ptr[r] < num_pairs, op, ": sorted_pair_ids[", r,
                      "] = ", pair_ptr[r], " is out of range [0, ", num_pairs,
                      "); pass the output of dispatch_plan");
  }
  const ActivateFn activate = cpu_activation(sizes.mlp.activation);
  const ExpertWeights ffn_weights = expert_weights(MOE_INFER_EXPERT_ARGS);

  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const std::optional<FewRowsMlp> few_rows =
      few_rows_mlp(ffn_weights, offsets, hidden.scalar_type());
  if (few_rows.has_value()) {
    return few_rows_combine(*few_rows, rows, topk_weights, pair_ptr, offsets, sizes, activate);
  }
  const at::Tensor weights = float_contiguous(topk_weights);
  // float32 accumulation; for a float32 hidden the accumulator is the output itself.
  auto accumulator = at::zeros({num_tokens, hidden_size}, hidden.options().dtype(at::kFloat));
  const int64_t num_routed = offsets.back();
  // Blocks as large as the busiest expert (up to kCombineBlockRows): the scratch of an
  // expert-by-expert loop, which peak memory keeps (several experts share a block where they fit).
  int64_t block_rows = 1;
  for (int64_t e = 0; e < sizes.mlp.num_experts; ++e) {
    block_rows = std::max<int64_t>(block_rows, offsets[e + 1] - offsets[e]);
  }
  block_rows = std::min(block_rows, kCombineBlockRows);
  auto x_block = at::empty({block_rows, hidden_size}, hidden.options());
  auto y_block = at::empty({block_rows, hidden_size}, hidden.options());
  auto fc1_buffer = at::empty({block_rows, sizes.mlp.fc1_outputs}, hidden.options());
  auto act_buffer = at::empty({block_rows, sizes.mlp.ffn_size}, hidden.options());
  const at::Tensor fc1_in_out = ffn_weights.fc1_in_out();
  const at::Tensor fc2_in_out = ffn_weights.fc2_in_out();

  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const int64_t row_bytes = hidden_size * element_bytes;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  const int64_t src_stride_bytes = rows.stride(0) * element_bytes;
  const int64_t grain = row_grain(row_bytes);
  std::vector<ExpertRows> pieces;
  std::vector<int32_t> order;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, hidden.scalar_type(), "grouped_mlp_combine", [&] {
        const float* weights_ptr = weights.const_data_ptr<float>();
        float* acc_ptr = accumulator.data_ptr<float>();
        int64_t expert = 0;
        for (int64_t begin = 0; begin < num_routed;) {
          const int64_t end = block_end(offsets, begin, block_rows);
          const int64_t n = end - begin;
          const int32_t* block_pairs = pair_ptr + begin;
          char* x_ptr = static_cast<char*>(x_block.data_ptr());
          at::parallel_for(0, n, grain, [&](int64_t b, int64_t stop) {
            permute_rows(src, src_stride_bytes, row_bytes, block_pairs, top_k, b, stop, x_ptr);
          });
          pieces.clear();
          while (offsets[expert + 1] <= begin) ++expert;
          for (int64_t e = expert; e < sizes.mlp.num_experts && offsets[e] < end; ++e) {
            const int64_t lo = std::max<int64_t>(offsets[e], begin);
            const int64_t hi = std::min<int64_t>(offsets[e + 1], end);
            if (hi > lo) pieces.push_back({e, lo - begin, hi - lo});
          }
          for (const ExpertRows& p : pieces) {
            expert_linear(fc1_buffer.narrow(0, p.row, p.count), x_block.narrow(0, p.row, p.count),
                          fc1_in_out.select(0, p.expert),
                          expert_bias(ffn_weights.fc1_bias, p.expert), small_linear);
          }
          activate_experts(activate, sizes.mlp.activation, fc1_buffer, act_buffer, pieces);
          for (const ExpertRows& p : pieces) {
            expert_linear(y_block.narrow(0, p.row, p.count), act_buffer.narrow(0, p.row, p.count),
                          fc2_in_out.select(0, p.expert),
                          expert_bias(ffn_weights.fc2_bias, p.expert), small_linear);
          }
          combine_block(y_block.const_data_ptr<scalar_t>(), n, hidden_size, block_pairs,
                        weights_ptr, top_k, acc_ptr, order);
          begin = end;
        }
      });
  return hidden.scalar_type() == at::kFloat ? accumulator : accumulator.to(hidden.scalar_type());
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) {
  m.impl("grouped_mlp", &grouped_mlp_cpu);
  m.impl("grouped_mlp_combine", &grouped_mlp_combine_cpu);
}

}  // namespace moe_infer
