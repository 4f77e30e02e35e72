// Expert buffering: the torch-free cache core (victims of each policy), the ExpertBuffer class with
// its copy threads (run under ASan/UBSan in CI), and the simulator op through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "buffer.h"

namespace {

using moe_infer::EvictionPolicy;
using moe_infer::ExpertCache;

// Runs one batch through the cache; returns the expert evicted by each miss (-1: free slot).
std::vector<int64_t> run_batch(ExpertCache& cache, const std::vector<int64_t>& active) {
  std::vector<int64_t> evicted;
  cache.begin_batch(active.data(), static_cast<int64_t>(active.size()));
  while (!cache.batch_done()) {
    const ExpertCache::Step step = cache.peek();
    if (!step.hit) evicted.push_back(step.evicted);
    cache.commit(step);
  }
  return evicted;
}

at::Tensor simulate(const at::Tensor& accesses, const at::Tensor& offsets, int64_t num_experts,
                    std::vector<int64_t> sizes, std::vector<std::string> policies) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moe_infer::simulate_expert_cache", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::ArrayRef<int64_t>,
                            const std::vector<std::string>&)>();
  return op.call(accesses, offsets, num_experts, sizes, policies);
}

}  // namespace

TEST_CASE("the paper's LIFO evicts expert 2 when a cache of 2 needs {1, 2, 3}", "[buffer]") {
  ExpertCache cache(4, 2, EvictionPolicy::kPaper);
  REQUIRE(run_batch(cache, {1, 2, 3}) == std::vector<int64_t>{-1, -1, 2});
  REQUIRE(cache.slot_of(1) == 0);
  REQUIRE(cache.slot_of(3) == 1);
  // Inactive experts go first: next batch {0, 3} evicts 1 (inactive), not 3.
  REQUIRE(run_batch(cache, {0, 3}) == std::vector<int64_t>{1});
}

TEST_CASE("FIFO, LRU and LFU pick their victims", "[buffer]") {
  ExpertCache fifo(5, 2, EvictionPolicy::kFifo);
  run_batch(fifo, {0, 1});
  run_batch(fifo, {0});                                      // a hit does not refresh FIFO
  REQUIRE(run_batch(fifo, {2}) == std::vector<int64_t>{0});  // first loaded

  ExpertCache lru(5, 2, EvictionPolicy::kLru);
  run_batch(lru, {0, 1});
  run_batch(lru, {0});
  REQUIRE(run_batch(lru, {2}) == std::vector<int64_t>{1});  // least recently used

  ExpertCache lfu(5, 2, EvictionPolicy::kLfu);
  run_batch(lfu, {0, 1});
  run_batch(lfu, {1});
  run_batch(lfu, {0});                                      // counts 0:2, 1:2; 1 used earlier
  REQUIRE(run_batch(lfu, {2}) == std::vector<int64_t>{1});  // tie -> least recently used
  REQUIRE(run_batch(lfu, {3}) == std::vector<int64_t>{2});  // 2 was used once
  REQUIRE(lfu.counters().misses == 4);
  REQUIRE(lfu.counters().evictions == 2);
}

TEST_CASE("prefetch never evicts an expert of its own request", "[buffer]") {
  ExpertCache cache(6, 2, EvictionPolicy::kLru);
  run_batch(cache, {0, 1});
  std::vector<char> wanted(6, 0);
  wanted[1] = wanted[4] = 1;
  const ExpertCache::Step step = cache.plan_prefetch(4, wanted);
  REQUIRE(step.evicted == 0);
  cache.commit_prefetch(step);
  wanted[5] = 1;
  REQUIRE(cache.plan_prefetch(5, wanted).slot == -1);  // both residents are wanted
  run_batch(cache, {4});
  REQUIRE(cache.counters().prefetch_hits == 1);
}

TEST_CASE("ExpertBuffer copies each expert's bytes into its slot, through many swaps", "[buffer]") {
  const int64_t num_experts = 6, num_slots = 2;
  const at::Tensor store = at::arange(num_experts * 12, at::kFloat).reshape({num_experts, 3, 4});
  std::vector<at::Tensor> pools{at::zeros({num_slots, 3, 4})};
  moe_infer::ExpertBuffer buffer(num_experts, num_slots, "paper", pools, 3);
  for (int64_t e = 0; e < num_experts; ++e) {
    // Two pieces per expert, given in reverse order: finalize() sorts and checks them.
    buffer.add_segment(e, 0, store, e * 48 + 24, 24, 24, "", 0);
    buffer.add_segment(e, 0, store, e * 48, 0, 24, "", 0);
  }
  buffer.finalize();
  int64_t swaps = 0;
  for (int64_t b = 0; b < 300; ++b) {
    at::Tensor counts = at::zeros({num_experts}, at::kLong);
    counts[b % num_experts] = 1;
    counts[(b * 7 + 1) % num_experts] = 2;
    counts[(b * 5 + 3) % num_experts] = 1;
    buffer.begin_batch(counts);
    bool last = false;
    while (!last) {
      auto [ready, loading, num_ready, num_loading, is_last] = buffer.next_round();
      last = is_last;
      buffer.wait_round();
      const at::Tensor table = at::maximum(ready, loading);
      for (int64_t e = 0; e < num_experts; ++e) {
        const int64_t slot = table[e].item<int64_t>();
        if (slot >= 0) REQUIRE(at::equal(pools[0][slot], store[e]));
      }
      buffer.end_round();
    }
    swaps = buffer.stats().at("evictions");
  }
  REQUIRE(swaps > 300);
  // Copies still in flight when the buffer goes away are drained first (ASan checks this).
  buffer.clear();
  REQUIRE(buffer.prefetch({0, 1, 2, 3, 4, 5}, false) == 2);
}

TEST_CASE("ExpertBuffer marks the ready experts whose slots the batch never refills", "[buffer]") {
  const int64_t num_experts = 6, num_slots = 3;
  const at::Tensor store = at::arange(num_experts * 4, at::kFloat).reshape({num_experts, 4});
  std::vector<at::Tensor> pools{at::zeros({num_slots, 4})};
  moe_infer::ExpertBuffer buffer(num_experts, num_slots, "paper", pools, 1);
  for (int64_t e = 0; e < num_experts; ++e) buffer.add_segment(e, 0, store, e * 16, 0, 16, "", 0);
  buffer.finalize();
  auto run = [&](std::vector<int64_t> active) {
    at::Tensor counts = at::zeros({num_experts}, at::kLong);
    for (const int64_t e : active) counts[e] = 1;
    buffer.begin_batch(counts);
    std::vector<std::vector<int64_t>> deferrable;
    bool last = false;
    while (!last) {
      last = std::get<4>(buffer.next_round());
      deferrable.push_back(std::get<2>(buffer.round_experts()).vec());
      buffer.wait_round();
      REQUIRE(buffer.copies_done());
      buffer.end_round();
    }
    return deferrable;
  };
  run({0, 1, 2});  // 0, 1, 2 in slots 0, 1, 2
  // 3, 4 and 5 take turns in slot 2 (LIFO): round one is {0, 1, 2}, and only 0 and 1 keep
  // their slots to the end of the batch; each later round is one loaded expert. 3 and 4 lose
  // slot 2 within the batch; 5 keeps it, so it is deferrable if its copy is already done.
  const auto deferrable = run({0, 1, 2, 3, 4, 5});
  REQUIRE(deferrable.size() == 4);
  REQUIRE(deferrable[0] == std::vector<int64_t>{0, 1});
  REQUIRE(deferrable[1].empty());
  REQUIRE(deferrable[2].empty());
  REQUIRE((deferrable[3].empty() || deferrable[3] == std::vector<int64_t>{5}));
  REQUIRE(at::equal(pools[0][2], store[5]));
  REQUIRE_THROWS_WITH(buffer.copies_done(), Catch::Contains("no round is open"));
}

TEST_CASE("ExpertBuffer rejects incomplete segments and misuse", "[buffer]") {
  std::vector<at::Tensor> pools{at::zeros({2, 8})};
  moe_infer::ExpertBuffer buffer(2, 2, "lru", pools, 1);
  buffer.add_segment(0, 0, at::zeros({8}), 0, 0, 32, "", 0);
  buffer.add_segment(1, 0, at::zeros({8}), 0, 0, 16, "", 0);
  REQUIRE_THROWS_WITH(buffer.finalize(), Catch::Contains("expert 1 pool 0 has 16 of 32 bytes"));
  REQUIRE_THROWS_WITH(buffer.add_segment(0, 0, at::zeros({2}), 0, 0, 16, "", 0),
                      Catch::Contains("fall outside the source's 8 bytes"));
  REQUIRE_THROWS_WITH(moe_infer::ExpertBuffer(2, 2, "belady", pools, 1),
                      Catch::Contains("'belady' needs the future"));
}

TEST_CASE("simulate_expert_cache through the dispatcher", "[buffer]") {
  // Cyclic {1, 2, 3} three times with 2 slots: LIFO keeps 1 and hits it; FIFO/LRU never hit.
  const at::Tensor accesses = at::tensor({1, 2, 3, 1, 2, 3, 1, 2, 3}, at::kLong);
  const at::Tensor offsets = at::tensor({0, 3, 6, 9}, at::kLong);
  const at::Tensor counts =
      simulate(accesses, offsets, 4, {2, 3}, {"paper", "fifo", "lru", "belady"});
  REQUIRE(counts.sizes() == at::IntArrayRef({4, 2, 3}));
  REQUIRE(counts[0][0][0].item<int64_t>() == 2);  // paper: 1 hits in batches 2 and 3
  REQUIRE(counts[1][0][0].item<int64_t>() == 0);
  REQUIRE(counts[2][0][0].item<int64_t>() == 0);
  REQUIRE(counts[3][0][1].item<int64_t>() == 6);  // Belady: 3 compulsory + 3
  for (int64_t p = 0; p < 4; ++p) REQUIRE(counts[p][1][1].item<int64_t>() == 3);  // all fit
}
