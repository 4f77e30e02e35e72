// Expert placement (load balancing): which logical expert sits in each physical expert slot of
// each rank. A placement is `slot_expert` [num_ranks * slots_per_rank] int32, rank-major; -1 marks
// an empty slot; an expert in several slots is replicated (its tokens are split across replicas).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/options.h"
#include "common/signatures.h"

namespace moe_infer {

// ---- torch-free core ------------------------------------------------------------------------

struct PlacementProblem {
  int64_t num_experts = 0;
  int64_t num_ranks = 0;
  int64_t slots_per_rank = 0;
  int64_t num_nodes = 1;  // ranks r*R/N .. (r+1)*R/N-1 form node r; > 1: nodes first, then GPUs
  PlacementAlgorithm algorithm = PlacementAlgorithm::kGreedy;
  bool replicate = false;                 // fill spare slots with replicas of hot experts (EPLB)
  const double* expert_load = nullptr;    // [E], finite, >= 0
  const double* correlation = nullptr;    // [E * E], for kAntiCorrelation
  double correlation_weight = 0.5;        // the paper's 0.5
  const int64_t* expert_group = nullptr;  // [E] group of each expert, or nullptr: one per expert
  int64_t num_groups = 0;                 // groups have equal sizes and num_groups % num_nodes == 0
};

// Contiguous placement: rank r holds experts [r*E/R, (r+1)*E/R) (integer division) in its first
// slots, the rest are empty. Needs E <= R * S.
void place_contiguous(int64_t num_experts, int64_t num_ranks, int64_t slots_per_rank,
                      int32_t* slot_expert);

// Replica counts of `experts` when they share `num_slots` slots (num_slots >= experts.size()):
// each gets one, then each spare slot goes to the expert with the largest load per replica (ties:
// fewer replicas, then the lower id), as DeepSeek's EPLB; no expert gets more than max_replicas,
// and slots no expert may take are left empty. Returns one count per entry of `experts`.
std::vector<int32_t> replicate_experts(const double* expert_load,
                                       const std::vector<int32_t>& experts, int64_t num_slots,
                                       int64_t max_replicas);

// One physical expert to pack: a replica of `expert` carrying `load`.
struct PlacementItem {
  int32_t expert;
  double load;
};

// Packs items into `num_bins` bins of `capacity` items: items by load, descending (ties: lower
// expert first); each goes to the bin of least cost that has room, preferring bins that do not
// hold the same expert yet (ties: fewer items, then the lower bin). Cost = the bin's load, or with
// `correlation` (anti-correlation) bin load / mean bin load + weight x the sum of the item's
// correlation with the experts already in the bin. Returns the experts of each bin. Needs
// items.size() <= num_bins * capacity.
std::vector<std::vector<int32_t>> pack_items(std::vector<PlacementItem> items, int64_t num_bins,
                                             int64_t capacity, const double* correlation,
                                             int64_t num_experts, double correlation_weight);

// Solves a whole problem (argument checks already done: see check_expert_placement). Hierarchical
// when num_nodes > 1: groups go to nodes (greedy on group load, num_groups / num_nodes per node),
// then each node replicates and packs its experts into its own GPUs. Writes R * S slot entries,
// each rank's experts in increasing id order, then its empty slots.
void place_experts(const PlacementProblem& problem, int32_t* slot_expert);

// ---- ATen op (CPU; parameters: common/signatures.h) -----------------------------------------

at::Tensor expert_placement_cpu(MOE_INFER_PARAMS(expert_placement));

}  // namespace moe_infer
