// The registered ATen ops through the dispatcher: results and argument errors, from C++.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch.hpp>

#include <functional>
#include <string>
#include <tuple>

namespace {

using PlanResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

PlanResult dispatch_plan(const at::Tensor& ids, int64_t num_experts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_infer::dispatch_plan", "")
                       .typed<PlanResult(const at::Tensor&, int64_t, bool)>();
  return op.call(ids, num_experts, true);
}

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_infer::topk_gating", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, int64_t, const std::string&, bool,
                           const std::optional<at::Tensor>&, double, int64_t, int64_t, bool)>();
  return op.call(logits, k, std::string("softmax"), false, std::nullopt, 1.0, 1, 1, true);
}

at::Tensor permute(const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_infer::permute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(hidden, sorted_pair_ids, k);
}

at::Tensor unpermute_combine(const at::Tensor& rows, const at::Tensor& weights,
                             const at::Tensor& row_of_pair) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("moe_infer::unpermute_combine", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(rows, weights, row_of_pair);
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace

TEST_CASE("dispatch -> permute -> combine with unit weights returns k copies of each token",
          "[ops]") {
  const int64_t num_tokens = 33, num_experts = 5, k = 3, hidden = 7;
  at::manual_seed(0);
  const at::Tensor logits = at::randn({num_tokens, num_experts});
  auto [weights, ids] = topk_gating(logits, k);
  REQUIRE(ids.scalar_type() == at::kInt);
  auto [sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets] =
      dispatch_plan(ids, num_experts);
  REQUIRE(tokens_per_expert.sum().item<int64_t>() == num_tokens * k);
  REQUIRE(expert_offsets[num_experts].item<int64_t>() == num_tokens * k);
  // Rows are grouped by expert: the expert of each sorted row is non-decreasing.
  const at::Tensor row_expert = ids.reshape(-1).index_select(0, sorted_pair_ids.to(at::kLong));
  REQUIRE(at::all(row_expert.slice(0, 1) >= row_expert.slice(0, 0, -1)).item<bool>());

  const at::Tensor tokens = at::randn({num_tokens, hidden});
  const at::Tensor rows = permute(tokens, sorted_pair_ids, k);
  const at::Tensor out = unpermute_combine(rows, at::ones({num_tokens, k}), row_of_pair);
  REQUIRE(at::allclose(out, tokens * k));
}

TEST_CASE("argument errors name the argument", "[ops]") {
  const std::string k_error = error_of([] { topk_gating(at::randn({4, 3}), 4); });
  REQUIRE(k_error.find("topk_gating: k (4) must be <= num_experts (3)") != std::string::npos);

  const at::Tensor bad_ids = at::tensor({0, 7}, at::kInt).reshape({1, 2});
  const std::string id_error = error_of([&] { dispatch_plan(bad_ids, 4); });
  REQUIRE(id_error.find("expert_ids[0, 1] = 7 is out of range") != std::string::npos);

  const std::string shape_error = error_of([] {
    permute(at::randn({3, 2}), at::zeros({5}, at::kInt), 2);
  });
  REQUIRE(shape_error.find("sorted_pair_ids has 5 entries") != std::string::npos);
}
