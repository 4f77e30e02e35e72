// route_token (the torch-free per-token router) and the activation core.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "experts.h"
#include "gating.h"

using moe_infer::GatingConfig;
using moe_infer::Scoring;

namespace {

struct Routed {
  std::vector<float> weights;
  std::vector<int32_t> ids;
  bool ok;
};

Routed route(const std::vector<float>& logits, GatingConfig config,
             const std::vector<float>* bias = nullptr) {
  config.num_experts = static_cast<int64_t>(logits.size());
  std::vector<float> scratch(moe_infer::gating_scratch_size(config));
  Routed r{std::vector<float>(config.top_k), std::vector<int32_t>(config.top_k), false};
  r.ok = moe_infer::route_token(logits.data(), bias ? bias->data() : nullptr, config,
                                scratch.data(), r.weights.data(), r.ids.data());
  return r;
}

}  // namespace

TEST_CASE("softmax top-k picks the largest logits, best first", "[gating]") {
  GatingConfig config;
  config.top_k = 2;
  const std::vector<float> logits{0.0f, 2.0f, -1.0f, 1.0f};
  Routed r = route(logits, config);
  REQUIRE(r.ok);
  REQUIRE(r.ids == std::vector<int32_t>{1, 3});
  const float sum = 1.0f + std::exp(2.0f) + std::exp(-1.0f) + std::exp(1.0f);
  REQUIRE(r.weights[0] == Approx(std::exp(2.0f) / sum));
  REQUIRE(r.weights[1] == Approx(std::exp(1.0f) / sum));

  config.renormalize = true;
  r = route(logits, config);
  REQUIRE(r.weights[0] + r.weights[1] == Approx(1.0f));
  REQUIRE(r.weights[0] / r.weights[1] == Approx(std::exp(1.0f)));
}

TEST_CASE("ties go to the lower expert id", "[gating]") {
  GatingConfig config;
  config.top_k = 3;
  Routed r = route({1.0f, 1.0f, 1.0f, 1.0f, 1.0f}, config);
  REQUIRE(r.ids == std::vector<int32_t>{0, 1, 2});
}

TEST_CASE("softmax over the chosen logits (GPT-OSS)", "[gating]") {
  GatingConfig config;
  config.top_k = 2;
  config.scoring = Scoring::kSoftmaxTopk;
  Routed r = route({3.0f, 0.0f, 1.0f}, config);
  REQUIRE(r.ids == std::vector<int32_t>{0, 2});
  REQUIRE(r.weights[0] == Approx(1.0f / (1.0f + std::exp(-2.0f))));
}

TEST_CASE("sigmoid with a selection-only bias, groups and scaling (DeepSeek-V3)", "[gating]") {
  GatingConfig config;
  config.top_k = 2;
  config.scoring = Scoring::kSigmoid;
  config.renormalize = true;
  config.scaling_factor = 2.0f;
  config.n_group = 2;
  config.topk_group = 1;
  // Group 0 = experts 0..2, group 1 = experts 3..5. Group 1 wins on its top-2 sum thanks to the
  // bias, although expert 0 has the largest logit.
  const std::vector<float> logits{3.0f, -3.0f, -3.0f, 1.0f, 1.0f, 0.0f};
  const std::vector<float> bias{0.0f, 0.0f, 0.0f, 0.5f, 0.5f, 0.0f};
  Routed r = route(logits, config, &bias);
  REQUIRE(r.ok);
  REQUIRE(r.ids == std::vector<int32_t>{3, 4});
  REQUIRE(r.weights[0] == Approx(1.0f));  // equal sigmoid scores, renormalized, times 2
  REQUIRE(r.weights[1] == Approx(1.0f));
}

TEST_CASE("experts of unchosen groups are masked with -inf, not 0 (DeepSeek-V3)", "[gating]") {
  GatingConfig config;
  config.top_k = 2;
  config.scoring = Scoring::kSigmoid;
  config.renormalize = true;
  config.n_group = 2;
  config.topk_group = 1;
  // Every choice score is negative (sigmoid 0.5 plus a bias <= -1): group 0 wins, and its experts
  // must beat the masked experts of group 1, which a mask of 0 would prefer.
  const std::vector<float> logits{0.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<float> bias{-1.0f, -1.0f, -2.0f, -2.0f};
  Routed r = route(logits, config, &bias);
  REQUIRE(r.ok);
  REQUIRE(r.ids == std::vector<int32_t>{0, 1});
  REQUIRE(r.weights[0] == Approx(0.5f));
  REQUIRE(r.weights[1] == Approx(0.5f));
}

TEST_CASE("NaN and +inf logits are refused", "[gating]") {
  GatingConfig config;
  config.top_k = 1;
  REQUIRE_FALSE(route({0.0f, std::numeric_limits<float>::quiet_NaN()}, config).ok);
  REQUIRE_FALSE(route({0.0f, std::numeric_limits<float>::infinity()}, config).ok);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  REQUIRE_FALSE(route({neg_inf, neg_inf}, config).ok);
  Routed r = route({neg_inf, 0.5f}, config);
  REQUIRE(r.ok);
  REQUIRE(r.ids[0] == 1);
  REQUIRE(r.weights[0] == Approx(1.0f));
}

TEST_CASE("activations match their closed forms", "[experts]") {
  using moe_infer::Activation;
  moe_infer::ActivationParams params;
  const std::vector<float> gate_up{-1.0f, 0.5f, 2.0f, 3.0f};  // gate = {-1, .5}, up = {2, 3}
  std::vector<float> out(2);

  params.activation = Activation::kSiluGlu;
  moe_infer::activate_row(gate_up.data(), 2, params, out.data());
  REQUIRE(out[0] == Approx(-1.0f / (1.0f + std::exp(1.0f)) * 2.0f));
  REQUIRE(out[1] == Approx(0.5f / (1.0f + std::exp(-0.5f)) * 3.0f));

  params.activation = Activation::kGptOssSwiglu;  // interleaved: gate = {-1, 2}, up = {.5, 3}
  params.swiglu_limit = 1.5f;                     // clamps gate 2 -> 1.5 and up 3 -> 1.5
  moe_infer::activate_row(gate_up.data(), 2, params, out.data());
  REQUIRE(out[0] == Approx((0.5f + 1.0f) * -1.0f / (1.0f + std::exp(1.702f))));
  REQUIRE(out[1] == Approx((1.5f + 1.0f) * 1.5f / (1.0f + std::exp(-1.702f * 1.5f))));

  params.activation = Activation::kRelu;
  std::vector<float> relu_out(4);
  moe_infer::activate_row(gate_up.data(), 4, params, relu_out.data());
  REQUIRE(relu_out == std::vector<float>{0.0f, 0.5f, 2.0f, 3.0f});

  params.activation = Activation::kGelu;
  moe_infer::activate_row(gate_up.data(), 1, params, out.data());
  REQUIRE(out[0] == Approx(-0.158655f).epsilon(1e-4));
}
