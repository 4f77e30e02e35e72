// Argument checks shared by the CPU and CUDA implementations of every op, and its composite.
// check_<op> takes the op's own parameters (common/signatures.h), names the op, the argument and
// the expectation in its errors, and returns the sizes it validated.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "common/options.h"
#include "common/signatures.h"

namespace moe_infer {

struct GatingSizes {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  Scoring scoring;
  int64_t n_group;
  int64_t topk_group;
};

GatingSizes check_topk_gating(MOE_INFER_PARAMS(topk_gating));

struct PlanSizes {
  int64_t num_tokens;
  int64_t top_k;
  int64_t num_pairs;
  int64_t num_experts;
};

PlanSizes check_dispatch_plan(MOE_INFER_PARAMS(dispatch_plan));

struct RowSizes {
  int64_t num_tokens;
  int64_t top_k;
  int64_t hidden_size;
};

RowSizes check_permute(MOE_INFER_PARAMS(permute));

RowSizes check_unpermute_combine(MOE_INFER_PARAMS(unpermute_combine));

struct MlpSizes {
  int64_t num_rows;
  int64_t hidden_size;
  int64_t ffn_size;     // width of the activation's output (I)
  int64_t fc1_outputs;  // I, or 2 * I for gated activations
  int64_t num_experts;
  ActivationParams activation;  // the parsed activation with swiglu_alpha and swiglu_limit
};

MlpSizes check_grouped_mlp(MOE_INFER_PARAMS(grouped_mlp));

// grouped_mlp_combine: hidden [S, H] in token order, topk_weights [S, k], sorted_pair_ids [S * k]
// and expert_offsets [E + 1] from dispatch_plan, and grouped_mlp's weights.
struct MlpCombineSizes {
  MlpSizes mlp;  // mlp.num_rows is S
  int64_t top_k;
};

MlpCombineSizes check_grouped_mlp_combine(MOE_INFER_PARAMS(grouped_mlp_combine));

// Errors of the data-dependent checks, in the same words on every backend.
[[noreturn]] void fail_nonfinite_logits(int64_t row, const char* op = "topk_gating");
[[noreturn]] void fail_nonfinite_bias(int64_t entry);
[[noreturn]] void fail_expert_id(int64_t pair, int64_t value, const PlanSizes& sizes);
// ---- expert buffering ----

// simulate_expert_cache: the accesses and batch offsets of a flattened routing trace.
struct SimulationSizes {
  int64_t num_accesses;
  int64_t num_batches;
  std::vector<EvictionPolicy> policies;
};

SimulationSizes check_simulate_expert_cache(MOE_INFER_PARAMS(simulate_expert_cache));

// ExpertBuffer's constructor: sizes, a live policy (not Belady), pools [num_slots, ...] on one
// device, contiguous. Returns the parsed policy.
EvictionPolicy check_expert_buffer(int64_t num_experts, int64_t num_slots,
                                   const std::string& policy, const std::vector<at::Tensor>& pools,
                                   int64_t copy_threads);

// ExpertBuffer::add_segment: a host source range that lands inside one slot row of one pool.
void check_buffer_segment(int64_t num_experts, const std::vector<at::Tensor>& pools, int64_t expert,
                          int64_t pool, const at::Tensor& source, int64_t source_offset,
                          int64_t dest_offset, int64_t num_bytes);

// Largest number of (token, slot) pairs the int32 index tensors can address.
constexpr int64_t kMaxPairs = (int64_t{1} << 31) - 1;

// Largest expert count (and placement slot count) an op accepts: the ops allocate O(num_experts)
// per call, so an absurd count is an error, not an allocation that the OOM killer ends.
constexpr int64_t kMaxExperts = int64_t{1} << 24;
// static_routing_tensors' [S, E, C] outputs (5 bytes an entry) stay under 20 GiB.
constexpr int64_t kMaxDenseRoutingEntries = int64_t{1} << 32;

// ---- placement ----

struct PlacementSizes {
  int64_t num_experts;
  int64_t num_ranks;
  int64_t slots_per_rank;
  int64_t num_nodes;
  PlacementAlgorithm algorithm;
};

// Shapes, dtypes and sizes of expert_placement's arguments (values are checked by the kernel).
PlacementSizes check_expert_placement(MOE_INFER_PARAMS(expert_placement));
// ---- static gating ----

struct StaticGatingSizes {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t top_k;
  SecondExpertPolicy policy;
};

StaticGatingSizes check_static_gating(MOE_INFER_PARAMS(static_gating));

struct StaticSlotSizes {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t capacity;
  int64_t hidden_size;  // 0 where the op has no hidden states
  int64_t top_k;        // 0 where the op has no per-pair inputs
};

StaticSlotSizes check_static_routing_tensors(MOE_INFER_PARAMS(static_routing_tensors));

StaticSlotSizes check_static_dispatch(MOE_INFER_PARAMS(static_dispatch));

StaticSlotSizes check_static_combine(MOE_INFER_PARAMS(static_combine));

// Errors of the static ops' data-dependent checks, in the same words on every backend.
[[noreturn]] void fail_static_expert_id(int64_t pair, int64_t top_k, int64_t value,
                                        int64_t num_experts);
[[noreturn]] void fail_slot_conflict(int64_t slot, int64_t first_token, int64_t second_token,
                                     int64_t capacity);

}  // namespace moe_infer
