// Option enums shared by every backend, parsed once from the op's string arguments.
#pragma once

#include <cstdint>
#include <string>

#include "common/activation.h"

namespace moe_infer {

// How router logits become routing scores (topk_gating's `scoring`).
enum class Scoring : int8_t {
  kSoftmax,      // softmax over all E experts, then top-k (Mixtral, Qwen, OLMoE, NLLB, Switch)
  kSoftmaxTopk,  // top-k over the raw logits, then softmax over the k chosen (GPT-OSS)
  kSigmoid,      // sigmoid scores; bias only steers selection (DeepSeek-V3)
};

// Which resident expert an expert cache evicts to make room (expert buffering).
enum class EvictionPolicy : int8_t {
  kPaper,   // the paper's: experts inactive in the current batch first, then LIFO (last loaded)
  kFifo,    // first loaded
  kLru,     // least recently used
  kLfu,     // least frequently used (batches active), ties to the least recently used
  kBelady,  // Belady's MIN: next use furthest in the future (needs the future: simulation only)
};

Scoring parse_scoring(const std::string& name);
Activation parse_activation(const std::string& name);
EvictionPolicy parse_eviction_policy(const std::string& name);

// How expert_placement assigns experts to ranks (its `algorithm`).
enum class PlacementAlgorithm : int8_t {
  kContiguous,       // rank r holds experts [r*E/R, (r+1)*E/R): the default everyone uses
  kGreedy,           // the paper's: experts by load, descending, each to the least-loaded rank
  kAntiCorrelation,  // greedy whose cost adds weight x Pearson correlation with the rank's experts
};

PlacementAlgorithm parse_placement_algorithm(const std::string& name);
// How static (fairseq Top2Gate) gating picks a token's second expert (static_gating's
// `second_expert_policy`).
enum class SecondExpertPolicy : int8_t {
  kAll,       // the second-best expert by router logit, always kept
  kSampling,  // argmax of router logits + Gumbel noise, excluding the first expert
  kRandom,    // the second-best expert, kept only if 2 * its gate > a U(0, 1) sample
};

SecondExpertPolicy parse_second_expert_policy(const std::string& name);

}  // namespace moe_infer
