// The torch-free dispatch core: counting sort, permute and combine, against naive versions.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "dispatch.h"

namespace {

struct SerialFor {
  template <typename Fn>
  void operator()(int64_t n, Fn&& fn) const {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
};

// One std::thread per chunk: the chunks really run concurrently.
struct ThreadedFor {
  template <typename Fn>
  void operator()(int64_t n, Fn&& fn) const {
    std::vector<std::thread> threads;
    for (int64_t i = 0; i < n; ++i) threads.emplace_back([&fn, i] { fn(i); });
    for (auto& t : threads) t.join();
  }
};

struct Plan {
  std::vector<int32_t> sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets;
};

template <typename ParallelFor>
Plan run_sort(const std::vector<int32_t>& ids, int64_t num_experts, int64_t num_chunks,
              ParallelFor parallel_for) {
  const int64_t n = static_cast<int64_t>(ids.size());
  Plan plan{std::vector<int32_t>(n), std::vector<int32_t>(n), std::vector<int32_t>(num_experts),
            std::vector<int32_t>(num_experts + 1)};
  std::vector<int32_t> scratch(num_chunks * (num_experts + 1));
  moe_infer::counting_sort_pairs(ids.data(), n, num_experts, num_chunks, scratch.data(),
                                 plan.sorted_pair_ids.data(), plan.row_of_pair.data(),
                                 plan.tokens_per_expert.data(), plan.expert_offsets.data(),
                                 parallel_for);
  return plan;
}

// The obvious version: stable sort of pair indices by bucket (-1 last).
Plan naive_sort(const std::vector<int32_t>& ids, int64_t num_experts) {
  const int64_t n = static_cast<int64_t>(ids.size());
  Plan plan;
  plan.sorted_pair_ids.resize(n);
  std::iota(plan.sorted_pair_ids.begin(), plan.sorted_pair_ids.end(), 0);
  auto bucket = [&](int32_t p) { return ids[p] < 0 ? num_experts : ids[p]; };
  std::stable_sort(plan.sorted_pair_ids.begin(), plan.sorted_pair_ids.end(),
                   [&](int32_t a, int32_t b) { return bucket(a) < bucket(b); });
  plan.row_of_pair.resize(n);
  for (int64_t r = 0; r < n; ++r)
    plan.row_of_pair[plan.sorted_pair_ids[r]] = static_cast<int32_t>(r);
  plan.tokens_per_expert.assign(num_experts, 0);
  for (int32_t id : ids) {
    if (id >= 0) ++plan.tokens_per_expert[id];
  }
  plan.expert_offsets.assign(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    plan.expert_offsets[e + 1] = plan.expert_offsets[e] + plan.tokens_per_expert[e];
  }
  return plan;
}

void require_same(const Plan& a, const Plan& b) {
  REQUIRE(a.sorted_pair_ids == b.sorted_pair_ids);
  REQUIRE(a.row_of_pair == b.row_of_pair);
  REQUIRE(a.tokens_per_expert == b.tokens_per_expert);
  REQUIRE(a.expert_offsets == b.expert_offsets);
}

}  // namespace

TEST_CASE("counting sort matches a stable sort, serial and threaded", "[dispatch]") {
  std::mt19937 rng(1234);
  for (int64_t num_experts : {1, 3, 8, 64, 257}) {
    for (int64_t num_pairs : {0, 1, 5, 1000, 50000}) {
      std::uniform_int_distribution<int32_t> pick(-1, static_cast<int32_t>(num_experts) - 1);
      std::vector<int32_t> ids(num_pairs);
      for (auto& id : ids) id = pick(rng);
      const Plan expected = naive_sort(ids, num_experts);
      for (int64_t chunks : {1, 2, 3, 7}) {
        INFO("E=" << num_experts << " pairs=" << num_pairs << " chunks=" << chunks);
        require_same(run_sort(ids, num_experts, chunks, SerialFor{}), expected);
        require_same(run_sort(ids, num_experts, chunks, ThreadedFor{}), expected);
      }
    }
  }
}

TEST_CASE("counting sort: all pairs on one expert, and unrouted pairs last", "[dispatch]") {
  std::vector<int32_t> ids(10, 2);
  Plan plan = run_sort(ids, 4, 3, SerialFor{});
  REQUIRE(plan.tokens_per_expert == std::vector<int32_t>{0, 0, 10, 0});
  REQUIRE(plan.expert_offsets == std::vector<int32_t>{0, 0, 0, 10, 10});
  std::vector<int32_t> identity(10);
  std::iota(identity.begin(), identity.end(), 0);
  REQUIRE(plan.sorted_pair_ids == identity);

  ids = {-1, 1, -1, 0};
  plan = run_sort(ids, 2, 2, SerialFor{});
  REQUIRE(plan.sorted_pair_ids == std::vector<int32_t>{3, 1, 0, 2});
  REQUIRE(plan.expert_offsets == std::vector<int32_t>{0, 1, 2});  // rows 2..3 are unrouted
}

TEST_CASE("find_invalid_expert_id finds the first bad id", "[dispatch]") {
  const std::vector<int64_t> ids{0, 3, -1, 4, -2};
  REQUIRE(moe_infer::find_invalid_expert_id(ids.data(), 3, 4) == -1);
  REQUIRE(moe_infer::find_invalid_expert_id(ids.data(), 5, 4) == 3);
  REQUIRE(moe_infer::find_invalid_expert_id(ids.data(), 5, 5) == 4);
}

TEST_CASE("permute_rows gathers token rows into expert order", "[dispatch]") {
  const int64_t hidden = 3, top_k = 2;
  // Row stride 4 floats: the hidden rows are padded, as a column slice of a wider tensor is.
  const std::vector<float> tokens{1, 2, 3, -1, 4, 5, 6, -1};
  const std::vector<int32_t> sorted_pair_ids{3, 0, 2, 1};  // pairs -> tokens 1, 0, 1, 0
  std::vector<float> out(4 * hidden, 0.0f);
  moe_infer::permute_rows(reinterpret_cast<const char*>(tokens.data()), 4 * sizeof(float),
                          hidden * sizeof(float), sorted_pair_ids.data(), top_k, 0, 4,
                          reinterpret_cast<char*>(out.data()));
  REQUIRE(out == std::vector<float>{4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3});
}

TEST_CASE("combine_tokens sums weighted rows in float32", "[dispatch]") {
  const int64_t hidden = 2, top_k = 2;
  const std::vector<float> rows{1, 2, 10, 20, 100, 200, 1000, 2000};
  const std::vector<float> weights{0.5f, 0.25f, 1.0f, 2.0f};
  const std::vector<int32_t> row_of_pair{2, 0, 3, 1};
  std::vector<float> out(2 * hidden), accumulator(hidden);
  moe_infer::combine_tokens(rows.data(), hidden, weights.data(), row_of_pair.data(), top_k, 0, 2,
                            accumulator.data(), out.data());
  REQUIRE(out == std::vector<float>{50.25f, 100.5f, 1020.0f, 2040.0f});
}
