// The torch-free placement core (contiguous, replication, greedy / anti-correlation packing,
// hierarchical) against brute force and hand-worked cases, and the op through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "placement.h"

namespace {

using moe_infer::PlacementAlgorithm;
using moe_infer::PlacementItem;
using moe_infer::PlacementProblem;

// Largest rank load of a slot table, a replicated expert's load split evenly.
double max_rank_load(const std::vector<int32_t>& slot_expert, const std::vector<double>& load,
                     int64_t num_ranks, int64_t slots) {
  std::vector<int> replicas(load.size(), 0);
  for (const int32_t e : slot_expert) {
    if (e >= 0) ++replicas[e];
  }
  double worst = 0.0;
  for (int64_t r = 0; r < num_ranks; ++r) {
    double total = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      const int32_t e = slot_expert[r * slots + s];
      if (e >= 0) total += load[e] / replicas[e];
    }
    worst = std::max(worst, total);
  }
  return worst;
}

// Smallest max rank load over every expert -> rank map with at most `slots` experts per rank.
double brute_force(const std::vector<double>& load, int64_t num_ranks, int64_t slots) {
  const int64_t n = static_cast<int64_t>(load.size());
  std::vector<int64_t> rank_of(n, 0);
  double best = std::numeric_limits<double>::infinity();
  while (true) {
    std::vector<double> rank_load(num_ranks, 0.0);
    std::vector<int64_t> used(num_ranks, 0);
    for (int64_t e = 0; e < n; ++e) {
      rank_load[rank_of[e]] += load[e];
      ++used[rank_of[e]];
    }
    if (*std::max_element(used.begin(), used.end()) <= slots) {
      best = std::min(best, *std::max_element(rank_load.begin(), rank_load.end()));
    }
    int64_t i = 0;
    while (i < n && ++rank_of[i] == num_ranks) rank_of[i++] = 0;
    if (i == n) break;
  }
  return best;
}

std::vector<int32_t> solve(PlacementProblem problem) {
  std::vector<int32_t> slot_expert(problem.num_ranks * problem.slots_per_rank);
  moe_infer::place_experts(problem, slot_expert.data());
  return slot_expert;
}

PlacementProblem greedy_problem(const std::vector<double>& load, int64_t ranks, int64_t slots) {
  PlacementProblem problem;
  problem.num_experts = static_cast<int64_t>(load.size());
  problem.num_ranks = ranks;
  problem.slots_per_rank = slots;
  problem.expert_load = load.data();
  return problem;
}

}  // namespace

TEST_CASE("contiguous placement spreads experts evenly in id order", "[placement]") {
  std::vector<int32_t> table(4 * 3);
  moe_infer::place_contiguous(10, 4, 3, table.data());
  CHECK(table == std::vector<int32_t>{0, 1, -1, 2, 3, 4, 5, 6, -1, 7, 8, 9});
}

TEST_CASE("replication gives spare slots to the largest load per replica", "[placement]") {
  const std::vector<double> load{10.0, 1.0, 4.0, 3.0};
  const std::vector<int32_t> experts{0, 1, 2, 3};
  // 3 spare slots: 10 -> 2 replicas (5 each), 5 -> 3 replicas (3.33), then 4 -> 2 replicas.
  CHECK(moe_infer::replicate_experts(load.data(), experts, 7, 4) ==
        std::vector<int32_t>{3, 1, 2, 1});
  // At most 2 replicas each: the third spare goes to expert 2 (4), then to expert 3 (3).
  CHECK(moe_infer::replicate_experts(load.data(), experts, 7, 2) ==
        std::vector<int32_t>{2, 1, 2, 2});
  // No expert may take more: the spare slots stay empty.
  CHECK(moe_infer::replicate_experts(load.data(), experts, 9, 1) ==
        std::vector<int32_t>{1, 1, 1, 1});
}

TEST_CASE("greedy packing puts the next heaviest item on the least-loaded bin with room",
          "[placement]") {
  const std::vector<PlacementItem> items{{0, 7.0}, {1, 5.0}, {2, 4.0},
                                         {3, 3.0}, {4, 2.0}, {5, 1.0}};
  const auto bins = moe_infer::pack_items(items, 2, 3, nullptr, 6, 0.0);
  // 7 -> A; 5 -> B; 4 -> B (5 < 7); 3 -> A (7 < 9); 2 -> B (9 < 10), now full; 1 -> A.
  CHECK(bins[0] == std::vector<int32_t>{0, 3, 5});
  CHECK(bins[1] == std::vector<int32_t>{1, 2, 4});
}

TEST_CASE("greedy placement against brute force on random small cases", "[placement]") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  int optimal = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t ranks = 2 + trial % 3;
    const int64_t slots = 2 + trial % 2;
    const int64_t experts = std::min<int64_t>(ranks * slots, 7);
    std::vector<double> load(experts);
    for (double& l : load) l = std::pow(uniform(rng), 3.0) * 100.0;
    const auto table = solve(greedy_problem(load, ranks, slots));
    const double greedy = max_rank_load(table, load, ranks, slots);
    const double best = brute_force(load, ranks, slots);
    CHECK(greedy >= best - 1e-9);
    CHECK(greedy <= best * 4.0 / 3.0 + 1e-9);  // Graham's bound for longest-processing-time first
    optimal += greedy <= best + 1e-9;
  }
  CHECK(optimal >= 25);  // optimal on most small cases
}

TEST_CASE("anti-correlation separates experts that fire together", "[placement]") {
  const std::vector<double> load{4.0, 4.0, 4.0, 4.0};
  std::vector<double> correlation(16, 0.0);
  for (int e = 0; e < 4; ++e) correlation[e * 4 + e] = 1.0;
  correlation[0 * 4 + 2] = correlation[2 * 4 + 0] = 0.9;
  correlation[1 * 4 + 3] = correlation[3 * 4 + 1] = 0.9;
  PlacementProblem problem = greedy_problem(load, 2, 2);
  CHECK(solve(problem) == std::vector<int32_t>{0, 2, 1, 3});
  problem.algorithm = PlacementAlgorithm::kAntiCorrelation;
  problem.correlation = correlation.data();
  CHECK(solve(problem) == std::vector<int32_t>{0, 3, 1, 2});
}

TEST_CASE("replicas of one expert go to different ranks", "[placement]") {
  const std::vector<double> load{90.0, 5.0, 3.0, 2.0};
  PlacementProblem problem = greedy_problem(load, 4, 2);
  problem.replicate = true;
  const auto table = solve(problem);
  for (int64_t r = 0; r < 4; ++r) CHECK(table[r * 2] == 0);  // expert 0 on every rank, once
  CHECK(max_rank_load(table, load, 4, 2) < 0.3 * 100.0);
}

TEST_CASE("hierarchical placement keeps each group on one node", "[placement]") {
  const std::vector<double> load{8, 1, 1, 1, 7, 1, 1, 1};
  const std::vector<int64_t> group{0, 0, 1, 1, 2, 2, 3, 3};
  PlacementProblem problem = greedy_problem(load, 4, 3);
  problem.num_nodes = 2;
  problem.expert_group = group.data();
  problem.num_groups = 4;
  problem.replicate = true;
  const auto table = solve(problem);
  auto node_of = [&](int32_t expert) {
    int node = -1;
    for (int64_t slot = 0; slot < 12; ++slot) {
      if (table[slot] != expert) continue;
      const int n = static_cast<int>(slot / 6);
      CHECK((node < 0 || node == n));
      node = n;
    }
    return node;
  };
  for (int g = 0; g < 4; ++g) CHECK(node_of(2 * g) == node_of(2 * g + 1));
  CHECK(node_of(0) != node_of(4));  // the two heavy groups on different nodes
}

TEST_CASE("expert_placement op through the dispatcher, and its argument errors", "[placement]") {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_infer::expert_placement", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, const std::string&,
                                         bool, const std::optional<at::Tensor>&, double, int64_t,
                                         const std::optional<at::Tensor>&)>();
  const at::Tensor load = at::tensor({5.0, 1.0, 4.0, 2.0}, at::kDouble);
  const at::Tensor table = op.call(load, 2, 2, "greedy", false, std::nullopt, 0.5, 1, std::nullopt);
  CHECK(table.scalar_type() == at::kInt);
  CHECK(table.sizes() == at::IntArrayRef{2, 2});
  CHECK(at::equal(table, at::tensor({0, 1, 2, 3}, at::kInt).view({2, 2})));  // 5+1 | 4+2
  CHECK_THROWS_WITH(op.call(load, 1, 2, "greedy", false, std::nullopt, 0.5, 1, std::nullopt),
                    Catch::Contains("4 experts do not fit on 1 ranks x 2 slots per rank"));
  CHECK_THROWS_WITH(
      op.call(load, 2, 2, "anti_correlation", false, std::nullopt, 0.5, 1, std::nullopt),
      Catch::Contains("needs a correlation matrix"));
  CHECK_THROWS_WITH(op.call(at::tensor({1.0, -1.0}, at::kDouble), 2, 1, "greedy", false,
                            std::nullopt, 0.5, 1, std::nullopt),
                    Catch::Contains("expert_load[1] = -1 must be finite and >= 0"));
}
