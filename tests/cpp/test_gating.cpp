// route_token and select_topk_like_torch (the torch-free per-token router) and the activation core.
#include <ATen/ATen.h>
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
};

// Scores as transformers computes them from the logits (softmax / sigmoid / the logits).
std::vector<float> scores_of(const std::vector<float>& logits, Scoring scoring) {
  std::vector<float> scores(logits);
  if (scoring == Scoring::kSoftmax) {
    float sum = 0.0f;
    for (float& s : scores) sum += (s = std::exp(s));
    for (float& s : scores) s /= sum;
  } else if (scoring == Scoring::kSigmoid) {
    for (float& s : scores) s = 1.0f / (1.0f + std::exp(-s));
  }
  return scores;
}

Routed route(const std::vector<float>& logits, GatingConfig config,
             const std::vector<float>* bias = nullptr) {
  config.num_experts = static_cast<int64_t>(logits.size());
  moe_infer::GatingScratch scratch(config);
  Routed r{std::vector<float>(config.top_k), std::vector<int32_t>(config.top_k)};
  const std::vector<float> scores = scores_of(logits, config.scoring);
  moe_infer::route_token(scores.data(), bias ? bias->data() : nullptr, config, scratch,
                         r.weights.data(), r.ids.data());
  return r;
}

// DeepSeek-V3's routing: top-2 of sigmoid scores, renormalized, from the best of 2 expert groups.
GatingConfig grouped_sigmoid_config() {
  GatingConfig config;
  config.top_k = 2;
  config.scoring = Scoring::kSigmoid;
  config.renormalize = true;
  config.n_group = 2;
  config.topk_group = 1;
  return config;
}

}  // namespace

TEST_CASE("softmax top-k picks the largest logits, best first", "[gating]") {
  GatingConfig config;
  config.top_k = 2;
  const std::vector<float> logits{0.0f, 2.0f, -1.0f, 1.0f};
  Routed r = route(logits, config);
  REQUIRE(r.ids == std::vector<int32_t>{1, 3});
  const float sum = 1.0f + std::exp(2.0f) + std::exp(-1.0f) + std::exp(1.0f);
  REQUIRE(r.weights[0] == Approx(std::exp(2.0f) / sum));
  REQUIRE(r.weights[1] == Approx(std::exp(1.0f) / sum));

  config.renormalize = true;
  r = route(logits, config);
  REQUIRE(r.weights[0] + r.weights[1] == Approx(1.0f));
  REQUIRE(r.weights[0] / r.weights[1] == Approx(std::exp(1.0f)));
}

TEST_CASE("the selection orders ties as torch.topk does on the CPU", "[gating]") {
  // Rows with few distinct values (many ties), in both of torch's regimes (k * 64 <= n or not).
  at::manual_seed(0);
  for (const int64_t n : {2, 3, 8, 17, 64, 128, 256, 300}) {
    for (const int64_t k : {1, 2, 3, 8}) {
      if (k > n) continue;
      const at::Tensor values = at::randint(0, 3, {40, n}).to(at::kFloat);
      const at::Tensor expected = std::get<1>(at::topk(values, k, -1)).contiguous();
      std::vector<moe_infer::ScoredExpert> queue(n);
      for (int64_t row = 0; row < values.size(0); ++row) {
        moe_infer::select_topk_like_torch(values[row].const_data_ptr<float>(), n, k, queue.data());
        const int64_t* ids = expected[row].const_data_ptr<int64_t>();
        for (int64_t j = 0; j < k; ++j) REQUIRE(queue[j].second == ids[j]);
      }
    }
  }
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
  GatingConfig config = grouped_sigmoid_config();
  config.scaling_factor = 2.0f;
  // Group 0 = experts 0..2, group 1 = experts 3..5. Group 1 wins on its top-2 sum thanks to the
  // bias, although expert 0 has the largest logit.
  const std::vector<float> logits{3.0f, -3.0f, -3.0f, 1.0f, 1.0f, 0.0f};
  const std::vector<float> bias{0.0f, 0.0f, 0.0f, 0.5f, 0.5f, 0.0f};
  Routed r = route(logits, config, &bias);
  REQUIRE((r.ids == std::vector<int32_t>{3, 4} || r.ids == std::vector<int32_t>{4, 3}));
  REQUIRE(r.weights[0] == Approx(1.0f));  // equal sigmoid scores, renormalized, times 2
  REQUIRE(r.weights[1] == Approx(1.0f));
}

TEST_CASE("experts of unchosen groups are masked with -inf, not 0 (DeepSeek-V3)", "[gating]") {
  const GatingConfig config = grouped_sigmoid_config();
  // Every choice score is negative (sigmoid 0.5 plus a bias <= -1): group 0 wins, and its experts
  // must beat the masked experts of group 1, which a mask of 0 would prefer.
  const std::vector<float> logits{0.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<float> bias{-1.0f, -1.0f, -2.0f, -2.0f};
  Routed r = route(logits, config, &bias);
  REQUIRE((r.ids == std::vector<int32_t>{0, 1} || r.ids == std::vector<int32_t>{1, 0}));
  REQUIRE(r.weights[0] == Approx(0.5f));
  REQUIRE(r.weights[1] == Approx(0.5f));
}

TEST_CASE("NaN and +inf logits are refused", "[gating]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  REQUIRE_FALSE(
      moe_infer::routable_logits(std::vector<float>{0.0f, nan}.data(), 2, Scoring::kSoftmax));
  REQUIRE_FALSE(
      moe_infer::routable_logits(std::vector<float>{0.0f, inf}.data(), 2, Scoring::kSigmoid));
  REQUIRE_FALSE(
      moe_infer::routable_logits(std::vector<float>{-inf, -inf}.data(), 2, Scoring::kSoftmax));
  // The softmax over the k best of only -inf is NaN too; sigmoid scores of -inf are zeros.
  REQUIRE_FALSE(
      moe_infer::routable_logits(std::vector<float>{-inf, -inf}.data(), 2, Scoring::kSoftmaxTopk));
  REQUIRE(moe_infer::routable_logits(std::vector<float>{-inf, -inf}.data(), 2, Scoring::kSigmoid));
  GatingConfig config;
  config.top_k = 1;
  Routed r = route({-inf, 0.5f}, config);
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
