// Expert placement: contiguous, greedy and anti-correlation packing, replication of hot experts,
// hierarchical (nodes, then GPUs). Planned on the host, so only a CPU implementation.
#include "placement.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <queue>
#include <tuple>

#include "common/checks.h"

namespace moe_infer {

void place_contiguous(int64_t num_experts, int64_t num_ranks, int64_t slots_per_rank,
                      int32_t* slot_expert) {
  std::fill(slot_expert, slot_expert + num_ranks * slots_per_rank, -1);
  for (int64_t r = 0; r < num_ranks; ++r) {
    const int64_t begin = r * num_experts / num_ranks;
    const int64_t end = (r + 1) * num_experts / num_ranks;
    for (int64_t e = begin; e < end; ++e) {
      slot_expert[r * slots_per_rank + (e - begin)] = static_cast<int32_t>(e);
    }
  }
}

std::vector<int32_t> replicate_experts(const double* expert_load,
                                       const std::vector<int32_t>& experts, int64_t num_slots,
                                       int64_t max_replicas) {
  const int64_t n = static_cast<int64_t>(experts.size());
  std::vector<int32_t> replicas(n, 1);
  // Max-heap on (load per replica, -replicas, -expert id): the next slot's owner is on top.
  using Entry = std::tuple<double, int32_t, int32_t, int64_t>;
  std::priority_queue<Entry> heap;
  for (int64_t i = 0; i < n; ++i) {
    if (max_replicas > 1) heap.emplace(expert_load[experts[i]], -1, -experts[i], i);
  }
  for (int64_t spare = num_slots - n; spare > 0 && !heap.empty(); --spare) {
    const int64_t i = std::get<3>(heap.top());
    heap.pop();
    const int32_t count = ++replicas[i];
    if (count < max_replicas) {
      heap.emplace(expert_load[experts[i]] / count, -count, -experts[i], i);
    }
  }
  return replicas;
}

std::vector<std::vector<int32_t>> pack_items(std::vector<PlacementItem> items, int64_t num_bins,
                                             int64_t capacity, const double* correlation,
                                             int64_t num_experts, double correlation_weight) {
  std::stable_sort(items.begin(), items.end(), [](const PlacementItem& a, const PlacementItem& b) {
    return a.load > b.load || (a.load == b.load && a.expert < b.expert);
  });
  double total = 0.0;
  for (const PlacementItem& item : items) total += item.load;
  // Anti-correlation compares loads in units of the mean bin load, so 0.5 x a correlation of 1
  // weighs as much as half an average rank's load.
  const double load_unit = total > 0.0 ? total / static_cast<double>(num_bins) : 1.0;
  std::vector<std::vector<int32_t>> bins(num_bins);
  std::vector<double> bin_load(num_bins, 0.0);
  for (const PlacementItem& item : items) {
    int64_t best = -1;
    bool best_holds = true;
    double best_cost = std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < num_bins; ++b) {
      const std::vector<int32_t>& bin = bins[b];
      if (static_cast<int64_t>(bin.size()) >= capacity) continue;
      const bool holds = std::find(bin.begin(), bin.end(), item.expert) != bin.end();
      double cost = bin_load[b];
      if (correlation != nullptr) {
        cost /= load_unit;
        for (const int32_t other : bin) {
          cost += correlation_weight * correlation[item.expert * num_experts + other];
        }
      }
      const bool better =
          best < 0 || (!holds && best_holds) ||
          (holds == best_holds &&
           (cost < best_cost || (cost == best_cost && bin.size() < bins[best].size())));
      if (better) {
        best = b;
        best_holds = holds;
        best_cost = cost;
      }
    }
    bins[best].push_back(item.expert);
    bin_load[best] += item.load;
  }
  return bins;
}

void place_experts(const PlacementProblem& problem, int32_t* slot_expert) {
  const int64_t num_experts = problem.num_experts;
  const int64_t num_ranks = problem.num_ranks;
  const int64_t slots_per_rank = problem.slots_per_rank;
  if (problem.algorithm == PlacementAlgorithm::kContiguous) {
    place_contiguous(num_experts, num_ranks, slots_per_rank, slot_expert);
    return;
  }
  const int64_t num_nodes = problem.num_nodes;
  const int64_t ranks_per_node = num_ranks / num_nodes;
  const double* load = problem.expert_load;

  // Stage 1: groups (by default one per expert) to nodes, num_groups / num_nodes (rounded up) each.
  const int64_t num_groups = problem.expert_group != nullptr ? problem.num_groups : num_experts;
  std::vector<std::vector<int32_t>> group_experts(num_groups);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t g = problem.expert_group != nullptr ? problem.expert_group[e] : e;
    group_experts[g].push_back(static_cast<int32_t>(e));
  }
  std::vector<std::vector<int32_t>> node_experts(num_nodes);
  if (num_nodes == 1) {
    node_experts[0].resize(num_experts);
    std::iota(node_experts[0].begin(), node_experts[0].end(), 0);
  } else {
    std::vector<PlacementItem> groups(num_groups);
    for (int64_t g = 0; g < num_groups; ++g) {
      double group_load = 0.0;
      for (const int32_t e : group_experts[g]) group_load += load[e];
      groups[g] = {static_cast<int32_t>(g), group_load};
    }
    const int64_t groups_per_node = (num_groups + num_nodes - 1) / num_nodes;
    const auto node_groups = pack_items(groups, num_nodes, groups_per_node, nullptr, 0, 0.0);
    for (int64_t n = 0; n < num_nodes; ++n) {
      for (const int32_t g : node_groups[n]) {
        node_experts[n].insert(node_experts[n].end(), group_experts[g].begin(),
                               group_experts[g].end());
      }
      std::sort(node_experts[n].begin(), node_experts[n].end());
    }
  }

  // Stage 2: each node replicates its experts into its slots, then packs them into its GPUs.
  const double* correlation =
      problem.algorithm == PlacementAlgorithm::kAntiCorrelation ? problem.correlation : nullptr;
  std::fill(slot_expert, slot_expert + num_ranks * slots_per_rank, -1);
  for (int64_t n = 0; n < num_nodes; ++n) {
    const std::vector<int32_t>& experts = node_experts[n];
    const int64_t node_slots = ranks_per_node * slots_per_rank;
    const std::vector<int32_t> replicas =
        problem.replicate ? replicate_experts(load, experts, node_slots, ranks_per_node)
                          : std::vector<int32_t>(experts.size(), 1);
    std::vector<PlacementItem> items;
    for (size_t i = 0; i < experts.size(); ++i) {
      for (int32_t j = 0; j < replicas[i]; ++j) {
        items.push_back({experts[i], load[experts[i]] / replicas[i]});
      }
    }
    auto bins = pack_items(std::move(items), ranks_per_node, slots_per_rank, correlation,
                           num_experts, problem.correlation_weight);
    for (int64_t b = 0; b < ranks_per_node; ++b) {
      std::sort(bins[b].begin(), bins[b].end());
      std::copy(bins[b].begin(), bins[b].end(),
                slot_expert + (n * ranks_per_node + b) * slots_per_rank);
    }
  }
}

at::Tensor expert_placement_cpu(MOE_INFER_PARAMS(expert_placement)) {
  constexpr const char* op = "expert_placement";
  const PlacementSizes sizes = check_expert_placement(MOE_INFER_ARGS(expert_placement));
  const int64_t num_experts = sizes.num_experts;
  const at::Tensor load = expert_load.to(at::kDouble).contiguous();
  const double* load_ptr = load.const_data_ptr<double>();
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCH_CHECK_VALUE(std::isfinite(load_ptr[e]) && load_ptr[e] >= 0.0, op, ": expert_load[", e,
                      "] = ", load_ptr[e], " must be finite and >= 0");
  }
  PlacementProblem problem;
  problem.num_experts = num_experts;
  problem.num_ranks = num_ranks;
  problem.slots_per_rank = slots_per_rank;
  problem.num_nodes = num_nodes;
  problem.algorithm = sizes.algorithm;
  problem.replicate = replicate;
  problem.expert_load = load_ptr;
  problem.correlation_weight = correlation_weight;

  at::Tensor corr;
  if (correlation.has_value() && sizes.algorithm == PlacementAlgorithm::kAntiCorrelation) {
    corr = correlation->to(at::kDouble).contiguous();
    const double* corr_ptr = corr.const_data_ptr<double>();
    for (int64_t i = 0; i < num_experts * num_experts; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(corr_ptr[i]), op, ": correlation[", i / num_experts, ", ",
                        i % num_experts, "] is not finite");
    }
    problem.correlation = corr_ptr;
  }

  at::Tensor groups;
  if (expert_group.has_value() && num_nodes > 1) {
    groups = expert_group->to(at::kLong).contiguous();
    const int64_t* group_ptr = groups.const_data_ptr<int64_t>();
    int64_t num_groups = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      TORCH_CHECK_VALUE(group_ptr[e] >= 0 && group_ptr[e] < num_experts, op, ": expert_group[", e,
                        "] = ", group_ptr[e], " must be in [0, num_experts (", num_experts, "))");
      num_groups = std::max(num_groups, group_ptr[e] + 1);
    }
    std::vector<int64_t> group_size(num_groups, 0);
    for (int64_t e = 0; e < num_experts; ++e) ++group_size[group_ptr[e]];
    for (int64_t g = 0; g < num_groups; ++g) {
      TORCH_CHECK_VALUE(group_size[g] * num_groups == num_experts, op,
                        ": expert_group must split the ", num_experts,
                        " experts into equal groups; group ", g, " has ", group_size[g], " of ",
                        num_groups, " groups");
    }
    TORCH_CHECK_VALUE(num_groups % num_nodes == 0, op, ": the number of expert groups (",
                      num_groups, ") must be a multiple of num_nodes (", num_nodes, ")");
    problem.expert_group = group_ptr;
    problem.num_groups = num_groups;
  }

  auto slot_expert = at::empty({num_ranks, slots_per_rank}, expert_load.options().dtype(at::kInt));
  place_experts(problem, slot_expert.data_ptr<int32_t>());
  return slot_expert;
}

// Planned on the host whatever the device: one implementation for every device.
TORCH_LIBRARY_IMPL(moe_infer, CompositeExplicitAutograd, m) {
  m.impl("expert_placement", &expert_placement_cpu);
}

}  // namespace moe_infer
