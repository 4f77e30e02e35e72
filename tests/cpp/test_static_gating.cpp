// The torch-free static gating core: expert choice, slot assignment, weights, the dispatch scan
// and the sparse combine, against naive versions and hand-computed cases.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "static_gating.h"

namespace {

using moe_infer::SecondExpertPolicy;
using moe_infer::StaticGatingConfig;

struct Choice {
  int32_t ids[2] = {-1, -1};
  float gates[2] = {0, 0};
  bool routed[2] = {false, false};
  float best = 0;
};

Choice choose(const std::vector<float>& logits, const StaticGatingConfig& config,
              const float* noise = nullptr, float uniform = 0.0f, bool padding = false) {
  Choice c;
  std::vector<float> gates(logits.size());
  REQUIRE(moe_infer::choose_static_experts(logits.data(), noise, uniform, padding, config,
                                           gates.data(), c.ids, c.gates, c.routed, &c.best));
  return c;
}

}  // namespace

TEST_CASE("choose_static_experts: argmax, second expert, policies, padding", "[static]") {
  StaticGatingConfig config{4, 2, 8, SecondExpertPolicy::kAll, false};
  const std::vector<float> logits = {std::log(0.1f), std::log(0.5f), std::log(0.3f),
                                     std::log(0.1f)};
  Choice c = choose(logits, config);
  CHECK(c.ids[0] == 1);
  CHECK(c.ids[1] == 2);
  CHECK(c.gates[0] == Approx(0.5f));
  CHECK(c.gates[1] == Approx(0.3f));
  CHECK(c.best == Approx(0.5f));
  CHECK((c.routed[0] && c.routed[1]));

  config.normalize_before_dropping = true;
  c = choose(logits, config);
  CHECK(c.gates[0] == Approx(0.625f));
  CHECK(c.gates[1] == Approx(0.375f));

  // Gumbel noise moves the second expert, never onto the first.
  config.normalize_before_dropping = false;
  config.policy = SecondExpertPolicy::kSampling;
  const std::vector<float> noise = {0.0f, 50.0f, 0.0f, 3.0f};
  c = choose(logits, config, noise.data());
  CHECK(c.ids[1] == 3);
  CHECK(c.gates[1] == Approx(0.1f));  // the weight is the clean gate

  // Random policy: kept iff 2 * gate > uniform.
  config.policy = SecondExpertPolicy::kRandom;
  CHECK(choose(logits, config, nullptr, 0.59f).routed[1]);
  CHECK_FALSE(choose(logits, config, nullptr, 0.61f).routed[1]);

  c = choose(logits, config, nullptr, 0.0f, /*padding=*/true);
  CHECK_FALSE(c.routed[0]);
  CHECK_FALSE(c.routed[1]);

  // Top-1, and ties to the lower id.
  config = StaticGatingConfig{3, 1, 8, SecondExpertPolicy::kAll, false};
  c = choose({1.0f, 1.0f, 0.0f}, config);
  CHECK(c.ids[0] == 0);

  std::vector<float> gates(3);
  for (const std::vector<float>& bad :
       {std::vector<float>{0.0f, NAN, 1.0f}, std::vector<float>{INFINITY, 0.0f, 0.0f},
        std::vector<float>(3, -INFINITY)}) {
    Choice d;
    CHECK_FALSE(moe_infer::choose_static_experts(bad.data(), nullptr, 0.0f, false, config,
                                                 gates.data(), d.ids, d.gates, d.routed, &d.best));
  }
}

TEST_CASE("assign_static_locations matches a naive per-expert count", "[static]") {
  std::mt19937 rng(7);
  for (int64_t top_k : {1, 2}) {
    for (bool prioritized : {false, true}) {
      const int64_t num_tokens = 500, num_experts = 7;
      StaticGatingConfig config{num_experts, top_k, 30, SecondExpertPolicy::kAll, false};
      std::vector<int32_t> ids(num_tokens * top_k), locations(num_tokens * top_k);
      std::vector<float> best(num_tokens);
      std::uniform_int_distribution<int32_t> expert(0, num_experts - 1);
      std::uniform_int_distribution<int32_t> coarse(0, 9);  // coarse priorities: many ties
      for (int64_t s = 0; s < num_tokens; ++s) {
        ids[s * top_k] = expert(rng);
        if (top_k == 2) ids[s * top_k + 1] = (ids[s * top_k] + 1 + expert(rng) % 6) % 7;
        for (int64_t j = 0; j < top_k; ++j) locations[s * top_k + j] = coarse(rng) == 0 ? -1 : 0;
        best[s] = static_cast<float>(coarse(rng));
      }
      const std::vector<int32_t> routed = locations;
      std::vector<int32_t> order(num_tokens), first_counts(num_experts), counts(num_experts);
      moe_infer::assign_static_locations(ids.data(), num_tokens, config,
                                         prioritized ? best.data() : nullptr, locations.data(),
                                         order.data(), first_counts.data(), counts.data());
      // Naive: visit tokens by (priority desc, index); count per expert, choices in rounds.
      std::vector<int64_t> visit(num_tokens);
      for (int64_t s = 0; s < num_tokens; ++s) visit[s] = s;
      if (prioritized) {
        std::stable_sort(visit.begin(), visit.end(),
                         [&](int64_t a, int64_t b) { return best[a] > best[b]; });
      }
      std::vector<int32_t> seen(num_experts, 0);
      for (int64_t j = 0; j < top_k; ++j) {
        for (int64_t s : visit) {
          const int64_t pair = s * top_k + j;
          if (routed[pair] < 0) {
            REQUIRE(locations[pair] == -1);
            continue;
          }
          REQUIRE(locations[pair] == seen[ids[pair]]++);
        }
        if (j == 0) {
          for (int64_t e = 0; e < num_experts; ++e) REQUIRE(first_counts[e] == seen[e]);
        }
      }
    }
  }
}

TEST_CASE("finalize_static_weights drops and normalises", "[static]") {
  StaticGatingConfig config{4, 2, 3, SecondExpertPolicy::kAll, false};
  float gates[2] = {0.6f, 0.2f};
  int32_t locations[2] = {1, 3};  // second over capacity
  moe_infer::finalize_static_weights(locations, config, gates);
  CHECK(gates[0] == Approx(1.0f));
  CHECK(gates[1] == 0.0f);
  config.normalize_before_dropping = true;
  float normalized[2] = {0.75f, 0.25f};
  moe_infer::finalize_static_weights(locations, config, normalized);
  CHECK(normalized[0] == 0.75f);
  CHECK(normalized[1] == 0.0f);
  int32_t none[2] = {-1, 5};
  float lost[2] = {0.6f, 0.2f};
  config.normalize_before_dropping = false;
  moe_infer::finalize_static_weights(none, config, lost);
  CHECK((lost[0] == 0.0f && lost[1] == 0.0f));
  // Top-1 keeps the raw gate.
  config.top_k = 1;
  float top1[1] = {0.4f};
  int32_t slot[1] = {2};
  moe_infer::finalize_static_weights(slot, config, top1);
  CHECK(top1[0] == 0.4f);
}

TEST_CASE("static_load_balancing_loss", "[static]") {
  // gates sums over 5 tokens (3.2, 1.8), first choices (4, 1): 2 * (0.64 * 0.8 + 0.36 * 0.2)
  const double sums[2] = {3.2, 1.8};
  const int32_t counts[2] = {4, 1};
  CHECK(moe_infer::static_load_balancing_loss(sums, counts, 5, 2) == Approx(1.168));
  CHECK(moe_infer::static_load_balancing_loss(sums, counts, 0, 2) == 0.0);
}

TEST_CASE("find_slot_owners scans blocks and reports two tokens in one slot", "[static]") {
  const int64_t num_tokens = 40, num_slots = 101;
  std::vector<char> mask_bytes(num_tokens * num_slots, 0);
  std::vector<int32_t> want(num_slots, -1);
  std::mt19937 rng(3);
  for (int64_t slot = 0; slot < num_slots; slot += 1 + static_cast<int64_t>(rng() % 3)) {
    const int64_t token = rng() % num_tokens;
    mask_bytes[token * num_slots + slot] = 1;
    want[slot] = static_cast<int32_t>(token);
  }
  const bool* mask = reinterpret_cast<const bool*>(mask_bytes.data());
  for (int64_t begin : {0, 5, 64}) {
    const int64_t end = std::min<int64_t>(num_slots, begin + 37);
    std::vector<int32_t> owner(end - begin);
    const auto conflict =
        moe_infer::find_slot_owners(mask, num_tokens, num_slots, begin, end, owner.data());
    REQUIRE(conflict.slot == -1);
    for (int64_t slot = begin; slot < end; ++slot) REQUIRE(owner[slot - begin] == want[slot]);
  }
  int64_t taken = 9;
  while (want[taken] < 0) ++taken;
  const int64_t other = (want[taken] + 1) % num_tokens;
  mask_bytes[other * num_slots + taken] = 1;
  std::vector<int32_t> owner(num_slots);
  const auto conflict =
      moe_infer::find_slot_owners(mask, num_tokens, num_slots, 0, num_slots, owner.data());
  CHECK(conflict.slot == taken);
  CHECK(conflict.first_token == std::min<int64_t>(other, want[taken]));
  CHECK(conflict.second_token == std::max<int64_t>(other, want[taken]));
}

TEST_CASE("combine_static_tokens sums the nonzero slots", "[static]") {
  const int64_t num_tokens = 6, num_slots = 13, hidden = 5;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<float> rows(num_slots * hidden), weights(num_tokens * num_slots, 0.0f);
  for (float& v : rows) v = normal(rng);
  for (int64_t s = 0; s < num_tokens; ++s) {
    weights[s * num_slots + (s * 5) % num_slots] = normal(rng);
    weights[s * num_slots + (s * 5 + 7) % num_slots] = normal(rng);
  }
  std::vector<float> out(num_tokens * hidden), accumulator(hidden);
  moe_infer::combine_static_tokens(rows.data(), hidden, weights.data(), num_slots, 0, num_tokens,
                                   accumulator.data(), out.data());
  for (int64_t s = 0; s < num_tokens; ++s) {
    for (int64_t h = 0; h < hidden; ++h) {
      double want = 0;
      for (int64_t slot = 0; slot < num_slots; ++slot) {
        want += static_cast<double>(weights[s * num_slots + slot]) * rows[slot * hidden + h];
      }
      REQUIRE(out[s * hidden + h] == Approx(want).margin(1e-6));
    }
  }
}

TEST_CASE("static_gating through the dispatcher: capacity 0 is a clear error", "[static][ops]") {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_infer::static_gating", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&,
                           const std::string&, const std::optional<at::Tensor>&, bool, bool)>();
  const at::Tensor logits = at::randn({6, 4});
  std::string message;
  try {
    op.call(logits, 2, 0, std::nullopt, "all", std::nullopt, false, false);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  CHECK(message.find("static_gating: capacity (0) must be >= 1") != std::string::npos);
  auto [weights, ids, locations, l_aux] =
      op.call(logits, 2, 6, std::nullopt, "all", std::nullopt, false, false);
  CHECK(weights.sum().item<float>() == Approx(6.0f));  // nothing dropped: each token sums to 1
  CHECK(locations.min().item<int32_t>() >= 0);
}

TEST_CASE("the static pipeline through the dispatcher equals fairseq's einsums", "[static][ops]") {
  using Routing = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto& dispatcher = c10::Dispatcher::singleton();
  static auto gating =
      dispatcher.findSchemaOrThrow("moe_infer::static_gating", "")
          .typed<Routing(const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&,
                         const std::string&, const std::optional<at::Tensor>&, bool, bool)>();
  static auto routing_tensors =
      dispatcher.findSchemaOrThrow("moe_infer::static_routing_tensors", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t)>();
  static auto dispatch = dispatcher.findSchemaOrThrow("moe_infer::static_dispatch", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static auto combine = dispatcher.findSchemaOrThrow("moe_infer::static_combine", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::manual_seed(5);
  const int64_t num_tokens = 300, num_experts = 6, capacity = 70, hidden = 9;
  const at::Tensor logits = at::randn({num_tokens, num_experts});
  const at::Tensor padding = at::rand({num_tokens}) < 0.1;
  const at::Tensor uniform = at::rand({num_tokens});
  for (bool prioritized : {false, true}) {
    auto [weights, ids, locations, l_aux] =
        gating.call(logits, 2, capacity, padding, "random", uniform, false, prioritized);
    auto [combine_weights, mask] =
        routing_tensors.call(ids, locations, weights, num_experts, capacity);
    REQUIRE(mask.sum().item<int64_t>() == weights.ne(0).sum().item<int64_t>());
    REQUIRE(mask.sum(0).le(1).all().item<bool>());  // a slot holds at most one token
    const at::Tensor x = at::randn({num_tokens, hidden});
    const at::Tensor rows = dispatch.call(x, mask);
    REQUIRE(at::equal(rows, at::einsum("sec,sm->ecm", {mask.to(at::kFloat), x})));
    const at::Tensor expert_out = at::randn({num_experts, capacity, hidden});
    const at::Tensor out = combine.call(expert_out, combine_weights);
    REQUIRE(
        at::allclose(out, at::einsum("sec,ecm->sm", {combine_weights, expert_out}), 1e-5, 1e-5));
    REQUIRE((out.index({padding}).eq(0)).all().item<bool>());  // padding: no expert output
  }
}
