// Every op's C++ signature, written once: by op family, in the order of the schemas in
// csrc/registration.cpp. An op's CPU and CUDA entry points (<op>_cpu, <op>_cuda), its composite
// (composite::<op>_op) and its argument checks (check_<op>) are all declared and defined with
// these parameters, and pass them on by these names:
//   at::Tensor grouped_mlp_cpu(MOE_INFER_PARAMS(grouped_mlp)) {
//     const MlpSizes sizes = check_grouped_mlp(MOE_INFER_ARGS(grouped_mlp));
// so one more argument is one more entry here (and in the schema), not one per backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// The return type of `op`, its parameter list (types and names), and the names alone.
#define MOE_INFER_RETURNS(op) MOE_INFER_RETURNS_##op
#define MOE_INFER_PARAMS(op) MOE_INFER_PARAMS_##op
#define MOE_INFER_ARGS(op) MOE_INFER_ARGS_##op

// Declares `op` + `suffix`: the op's entry point on a backend (_cpu, _cuda) or its composite (_op).
#define MOE_INFER_DECLARE_OP(op, suffix) MOE_INFER_RETURNS(op) op##suffix(MOE_INFER_PARAMS(op));
#define MOE_INFER_DECLARE_CPU(op) MOE_INFER_DECLARE_OP(op, _cpu)

// The tables read best one entry per line, aligned by hand.
// clang-format off

// X(op) for each op of a family.
#define MOE_INFER_GATING_OPS(X) X(topk_gating)
#define MOE_INFER_DISPATCH_OPS(X) X(dispatch_plan) X(permute) X(unpermute_combine)
#define MOE_INFER_EXPERTS_OPS(X) X(grouped_mlp) X(grouped_mlp_combine)
#define MOE_INFER_STATIC_GATING_OPS(X) \
  X(static_gating) X(static_routing_tensors) X(static_dispatch) X(static_combine)

// X(op): the ops with a composite implementation (csrc/common/composite.cpp).
#define MOE_INFER_COMPOSITE_OPS(X) \
  MOE_INFER_GATING_OPS(X)          \
  MOE_INFER_DISPATCH_OPS(X)        \
  MOE_INFER_EXPERTS_OPS(X)         \
  MOE_INFER_STATIC_GATING_OPS(X)

// X(op): every op that has argument checks (bound as moe_infer._C.checks.<op> for the fakes).
#define MOE_INFER_CHECKED_OPS(X) \
  MOE_INFER_COMPOSITE_OPS(X)     \
  X(expert_placement)            \
  X(simulate_expert_cache)

// ---- gating (csrc/gating.h) -----------------------------------------------------------------

#define MOE_INFER_RETURNS_topk_gating std::tuple<at::Tensor, at::Tensor>
#define MOE_INFER_PARAMS_topk_gating                                                         \
  const at::Tensor& router_logits, int64_t k, const std::string& scoring, bool renormalize, \
  const std::optional<at::Tensor>& selection_bias, double scaling_factor, int64_t n_group,  \
  int64_t topk_group, bool validate
#define MOE_INFER_ARGS_topk_gating                                                               \
  router_logits, k, scoring, renormalize, selection_bias, scaling_factor, n_group, topk_group, \
  validate

// ---- dispatch (csrc/dispatch.h) -------------------------------------------------------------

#define MOE_INFER_RETURNS_dispatch_plan std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
#define MOE_INFER_PARAMS_dispatch_plan \
  const at::Tensor& expert_ids, int64_t num_experts, bool validate
#define MOE_INFER_ARGS_dispatch_plan expert_ids, num_experts, validate

#define MOE_INFER_RETURNS_permute at::Tensor
#define MOE_INFER_PARAMS_permute \
  const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t top_k
#define MOE_INFER_ARGS_permute hidden, sorted_pair_ids, top_k

#define MOE_INFER_RETURNS_unpermute_combine at::Tensor
#define MOE_INFER_PARAMS_unpermute_combine \
  const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& row_of_pair
#define MOE_INFER_ARGS_unpermute_combine expert_out, topk_weights, row_of_pair

// ---- experts (csrc/experts.h) ---------------------------------------------------------------

// The experts' weights and their options: the trailing parameters of both expert ops.
#define MOE_INFER_EXPERT_PARAMS                                                    \
  const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,         \
  const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,         \
  const std::string& activation, bool weights_transposed, double swiglu_alpha,     \
  double swiglu_limit
#define MOE_INFER_EXPERT_ARGS                                                                 \
  fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, weights_transposed, swiglu_alpha, \
  swiglu_limit

#define MOE_INFER_RETURNS_grouped_mlp at::Tensor
#define MOE_INFER_PARAMS_grouped_mlp \
  const at::Tensor& hidden, const at::Tensor& expert_offsets, MOE_INFER_EXPERT_PARAMS
#define MOE_INFER_ARGS_grouped_mlp hidden, expert_offsets, MOE_INFER_EXPERT_ARGS

#define MOE_INFER_RETURNS_grouped_mlp_combine at::Tensor
#define MOE_INFER_PARAMS_grouped_mlp_combine                                              \
  const at::Tensor& hidden, const at::Tensor& topk_weights,                               \
  const at::Tensor& sorted_pair_ids, const at::Tensor& expert_offsets, MOE_INFER_EXPERT_PARAMS
#define MOE_INFER_ARGS_grouped_mlp_combine \
  hidden, topk_weights, sorted_pair_ids, expert_offsets, MOE_INFER_EXPERT_ARGS

// ---- static gating (csrc/static_gating.h) ---------------------------------------------------

#define MOE_INFER_RETURNS_static_gating std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
#define MOE_INFER_PARAMS_static_gating                                                        \
  const at::Tensor& router_logits, int64_t top_k, int64_t capacity,                           \
  const std::optional<at::Tensor>& padding_mask, const std::string& second_expert_policy,    \
  const std::optional<at::Tensor>& second_expert_noise, bool normalize_before_dropping,      \
  bool batch_prioritized_routing
#define MOE_INFER_ARGS_static_gating                                                      \
  router_logits, top_k, capacity, padding_mask, second_expert_policy, second_expert_noise, \
  normalize_before_dropping, batch_prioritized_routing

#define MOE_INFER_RETURNS_static_routing_tensors std::tuple<at::Tensor, at::Tensor>
#define MOE_INFER_PARAMS_static_routing_tensors                                              \
  const at::Tensor& expert_ids, const at::Tensor& locations, const at::Tensor& topk_weights, \
  int64_t num_experts, int64_t capacity
#define MOE_INFER_ARGS_static_routing_tensors \
  expert_ids, locations, topk_weights, num_experts, capacity

#define MOE_INFER_RETURNS_static_dispatch at::Tensor
#define MOE_INFER_PARAMS_static_dispatch const at::Tensor& hidden, const at::Tensor& dispatch_mask
#define MOE_INFER_ARGS_static_dispatch hidden, dispatch_mask

#define MOE_INFER_RETURNS_static_combine at::Tensor
#define MOE_INFER_PARAMS_static_combine \
  const at::Tensor& expert_out, const at::Tensor& combine_weights
#define MOE_INFER_ARGS_static_combine expert_out, combine_weights

// ---- placement (csrc/placement.h) -----------------------------------------------------------

#define MOE_INFER_RETURNS_expert_placement at::Tensor
#define MOE_INFER_PARAMS_expert_placement                                                     \
  const at::Tensor& expert_load, int64_t num_ranks, int64_t slots_per_rank,                  \
  const std::string& algorithm, bool replicate, const std::optional<at::Tensor>& correlation, \
  double correlation_weight, int64_t num_nodes, const std::optional<at::Tensor>& expert_group
#define MOE_INFER_ARGS_expert_placement                                                          \
  expert_load, num_ranks, slots_per_rank, algorithm, replicate, correlation, correlation_weight, \
  num_nodes, expert_group

// ---- expert buffering (csrc/buffer.h) -------------------------------------------------------

#define MOE_INFER_RETURNS_simulate_expert_cache at::Tensor
#define MOE_INFER_PARAMS_simulate_expert_cache                                      \
  const at::Tensor& accesses, const at::Tensor& batch_offsets, int64_t num_experts, \
  at::IntArrayRef cache_sizes, const std::vector<std::string>& policies
#define MOE_INFER_ARGS_simulate_expert_cache \
  accesses, batch_offsets, num_experts, cache_sizes, policies

// clang-format on
