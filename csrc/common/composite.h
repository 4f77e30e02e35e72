// Composite implementations of every op, built from ATen ops only, so they run on any device.
// The *_op functions take the op's own arguments, check them (common/checks.h) and are registered
// under CompositeExplicitAutograd: the dispatcher runs them on any device without a kernel. They
// are also bound as moe_infer._C.composite.<op>, so the tests compare each kernel with them. The
// functions taking validated sizes are the building blocks (the kernels reuse some of them).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "experts.h"

namespace moe_infer {

// Whether `t`'s device stream is being captured into a graph (no host sync allowed). The CUDA
// backend installs its query; without it nothing is ever captured.
bool graph_capture_in_progress(const at::Tensor& t);
void set_graph_capture_query(bool (*query)(const at::Tensor&));

// Raises "<op>: <name> has values in [lo, hi], expected [0, limit)" unless every index is in range
// (one reduction and a host sync).
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t limit);

namespace composite {

// ---- the ops (schemas: csrc/registration.cpp; parameters: common/signatures.h) ----

// topk_gating_op, dispatch_plan_op, ..., static_combine_op: every op of MOE_INFER_COMPOSITE_OPS.
#define MOE_INFER_DECLARE_COMPOSITE(op) MOE_INFER_DECLARE_OP(op, _op)
MOE_INFER_COMPOSITE_OPS(MOE_INFER_DECLARE_COMPOSITE)
#undef MOE_INFER_DECLARE_COMPOSITE

// ---- building blocks on validated sizes ----

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& router_logits,
                                               const GatingSizes& sizes, bool renormalize,
                                               const std::optional<at::Tensor>& selection_bias,
                                               double scaling_factor, bool validate);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan(
    const at::Tensor& expert_ids, const PlanSizes& sizes, bool validate);

at::Tensor permute(const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t top_k);

at::Tensor unpermute_combine(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                             const at::Tensor& row_of_pair);

// fc1_out [n, F1] -> act [n, I] with ATen ops.
void activate(const at::Tensor& fc1_out, const ActivationParams& params, const at::Tensor& act);

// The CPU kernels' semantics (csrc/static_gating.h) with dense ATen ops, as fairseq computes them:
// one-hot masks and cumsums over [S, E] for the locations, a scatter into [S, E, C] for the routing
// tensors, a gather of each slot's owner for dispatch, and a float32 matrix product (fairseq's
// einsum) for combine. `validate` runs the data-dependent checks (a device sync on CUDA).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> static_gating(
    const at::Tensor& router_logits, const StaticGatingSizes& sizes, int64_t capacity,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& second_expert_noise, bool normalize_before_dropping,
    bool batch_prioritized_routing, bool validate);

std::tuple<at::Tensor, at::Tensor> static_routing_tensors(const at::Tensor& expert_ids,
                                                          const at::Tensor& locations,
                                                          const at::Tensor& topk_weights,
                                                          const StaticSlotSizes& sizes,
                                                          bool validate);

// Unchecked, a slot claimed twice holds its first token.
at::Tensor static_dispatch(const at::Tensor& hidden, const at::Tensor& dispatch_mask,
                           const StaticSlotSizes& sizes, bool validate);

// Unlike the kernels, which skip zero weights, the matrix product lets a non-finite value in an
// expert_out row poison every token (0 * inf = NaN), as fairseq's einsum does.
at::Tensor static_combine(const at::Tensor& expert_out, const at::Tensor& combine_weights,
                          const StaticSlotSizes& sizes);

}  // namespace composite

// Raises the CPU kernels' error for NaN/+inf/all -inf router logits if `router_logits` has any
// (one reduction; on CUDA a device sync).
void check_finite_logits(const at::Tensor& router_logits, Scoring scoring,
                         const char* op = "topk_gating");

// Raises topk_gating's error if selection_bias has a NaN or infinite entry (on CUDA a sync).
void check_finite_bias(const at::Tensor& selection_bias);

// Raises dispatch_plan's out-of-range error naming the first bad id, if there is one.
void check_expert_id_range(const at::Tensor& expert_ids, const PlanSizes& sizes);

// Raises static_dispatch's error for a slot that two tokens claim, naming the conflict the CPU
// kernel names (the mask is scanned on the host: call it only once a conflict is known).
[[noreturn]] void fail_static_slot_conflict(const at::Tensor& dispatch_mask,
                                            const StaticSlotSizes& sizes);

// The expert offsets on the host, checked: offsets[0] == 0, non-decreasing, offsets[E] <= rows.
// `op` and `rows_name` word the errors.
std::vector<int32_t> host_expert_offsets(const at::Tensor& expert_offsets, int64_t num_rows,
                                         const char* op = "grouped_mlp",
                                         const char* rows_name = "rows in hidden");

// A CPU tensor's values as float32, contiguous: `t` itself when it already is; bfloat16 widened
// with a plain copy (exact), without ATen's conversion kernel (a decode step finds it cold in the
// caches, where one ATen call costs tens of microseconds); other types through t.to(float).
at::Tensor float_contiguous(const at::Tensor& t);

using ActivateFn = std::function<void(const at::Tensor& fc1_out, const at::Tensor& act)>;

// A device's own GEMM for the shapes it handles better than ATen's: out = x @ w (+ bias), with w
// the [K, N] view of one expert's weight; returns false to leave the product to ATen.
using LinearFn = bool (*)(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                          const std::optional<at::Tensor>& bias);

// One expert's bias [N] of the stacked [E, N], or nullopt.
inline std::optional<at::Tensor> expert_bias(const std::optional<at::Tensor>& bias,
                                             int64_t expert) {
  return bias.has_value() ? std::optional<at::Tensor>(bias->select(0, expert)) : std::nullopt;
}

// out = x @ w (+ bias): `linear` where it takes the shape, else ATen's GEMM. w: the [K, N] view of
// one expert's weight, bias: its N values.
void expert_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                   const std::optional<at::Tensor>& bias, LinearFn linear = nullptr);

// One expert's FFN: rows x [n, H] -> y [n, H] (written in place): fc1 (+bias) -> activate ->
// fc2 (+bias), through scratch buffers of at least n rows. Weights are read in place through views
// (the GEMMs read the transposes as they are stored).
void expert_ffn(int64_t expert, const at::Tensor& x, const ExpertWeights& weights,
                const at::Tensor& fc1_buffer, const at::Tensor& act_buffer,
                const ActivateFn& activate, const at::Tensor& y, LinearFn linear = nullptr);

// The per-expert GEMM loop shared by every device and by the fallback: expert_ffn for each
// non-empty expert straight into its output rows; rows outside every expert are zeros.
at::Tensor grouped_mlp_per_expert(const at::Tensor& hidden, const std::vector<int32_t>& offsets,
                                  const ExpertWeights& weights, const MlpSizes& sizes,
                                  const ActivateFn& activate, LinearFn linear = nullptr);

}  // namespace moe_infer
