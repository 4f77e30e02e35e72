// accumulate_weighted_rows: the torch-free combine step of grouped_mlp_combine.
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "experts.h"

TEST_CASE("weighted expert rows are added to their tokens in float32", "[combine]") {
  // 3 tokens, top_k 2, hidden 2. Rows belong to pairs 5 (token 2, slot 1) and 0 (token 0, slot 0).
  const std::vector<float> rows{1.0f, 2.0f, 10.0f, 20.0f};
  const std::vector<int32_t> pair_ids{5, 0};
  const std::vector<float> topk_weights{0.5f, 0.0f, 0.0f, 0.0f, 0.0f, 0.25f};
  std::vector<float> accumulator(6, 1.0f);
  moe_infer::accumulate_weighted_rows(rows.data(), 2, 2, pair_ids.data(), topk_weights.data(), 2,
                                      accumulator.data());
  REQUIRE(accumulator == std::vector<float>{6.0f, 11.0f, 1.0f, 1.0f, 1.25f, 1.5f});
}
