// Static (capacity-based) gating, GShard / fairseq style: the baseline that dynamic gating beats.
//
// Every expert gets a buffer of `capacity` slots. Tokens take slots in order (or in order of
// their best gate with batch-prioritised routing); a (token, expert) pair past the capacity is
// dropped, and slots nobody takes are placeholders that are dispatched and computed anyway.
// fairseq materialises this as combine weights and a dispatch mask of shape [S, E, C], dispatches
// with einsum("sec,sm->ecm") and combines with einsum("sec,ecm->sm"); so do these ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>

#include "common/options.h"
#include "common/signatures.h"

namespace moe_infer {

// ---- torch-free core ------------------------------------------------------------------------

struct StaticGatingConfig {
  int64_t num_experts = 0;
  int64_t top_k = 1;     // 1 (Top1Gate) or 2 (Top2Gate)
  int64_t capacity = 0;  // slots per expert
  SecondExpertPolicy policy = SecondExpertPolicy::kAll;
  bool normalize_before_dropping = false;
};

// One token's expert choices before any capacity is applied.
//   logits:   num_experts router logits
//   noise:    num_experts Gumbel samples added to the logits to pick the second expert (policy
//             kSampling), else null
//   uniform:  the U(0, 1) sample of policy kRandom (ignored otherwise)
//   gates:    receives the softmax of the logits (num_experts floats)
// Writes, per pair j < top_k: expert_ids[j] (the raw choice: the first is the argmax of the gates,
// the second the argmax of logits + noise over the other experts; ties go to the lower id),
// pair_gates[j] (its gate, divided by the pair's sum when normalize_before_dropping) and routed[j]
// (false for a padding token and for a second expert the kRandom policy rejects). `best_gate` gets
// the largest gate (the priority of batch-prioritised routing). Returns false, writing nothing
// else, if a logit is NaN or +inf or every logit is -inf.
inline bool choose_static_experts(const float* logits, const float* noise, float uniform,
                                  bool is_padding, const StaticGatingConfig& config, float* gates,
                                  int32_t* expert_ids, float* pair_gates, bool* routed,
                                  float* best_gate) {
  const int64_t num_experts = config.num_experts;
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < num_experts; ++e) {
    const float l = logits[e];
    if (std::isnan(l) || l == std::numeric_limits<float>::infinity()) return false;
    max_logit = std::max(max_logit, l);
  }
  if (std::isinf(max_logit)) return false;
  float sum = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    gates[e] = std::exp(logits[e] - max_logit);
    sum += gates[e];
  }
  const float inv_sum = 1.0f / sum;
  int64_t first = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    gates[e] *= inv_sum;
    if (gates[e] > gates[first]) first = e;
  }
  expert_ids[0] = static_cast<int32_t>(first);
  pair_gates[0] = gates[first];
  routed[0] = !is_padding;
  *best_gate = gates[first];
  if (config.top_k == 1) return true;

  int64_t second = -1;
  float second_choice = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (e == first) continue;
    const float choice = noise != nullptr ? logits[e] + noise[e] : logits[e];
    if (second < 0 || choice > second_choice) {
      second = e;
      second_choice = choice;
    }
  }
  expert_ids[1] = static_cast<int32_t>(second);
  pair_gates[1] = gates[second];
  if (config.normalize_before_dropping) {
    const float denom = std::max(pair_gates[0] + pair_gates[1], FLT_EPSILON);
    pair_gates[0] /= denom;
    pair_gates[1] /= denom;
  }
  const bool sampled =
      config.policy != SecondExpertPolicy::kRandom || 2.0f * pair_gates[1] > uniform;
  routed[1] = !is_padding && sampled;
  return true;
}

// Gives every routed pair its position in its expert's buffer, as fairseq's cumsum does: first
// choices in token order (or, with `best_gate`, in descending order of each token's best gate,
// ties by token), then second choices after all first choices of that expert.
//   locations:    [num_tokens, top_k]; on entry 0 for a routed pair and -1 otherwise; on exit the
//                 position (which may be >= capacity: dropped) of each routed pair
//   best_gate:    null, or num_tokens priorities (batch-prioritised routing)
//   order:        scratch, num_tokens
//   first_counts: receives the number of routed first choices per expert (num_experts)
//   counts:       scratch, num_experts
inline void assign_static_locations(const int32_t* expert_ids, int64_t num_tokens,
                                    const StaticGatingConfig& config, const float* best_gate,
                                    int32_t* locations, int32_t* order, int32_t* first_counts,
                                    int32_t* counts) {
  const int64_t k = config.top_k;
  std::iota(order, order + num_tokens, 0);
  if (best_gate != nullptr) {
    std::stable_sort(order, order + num_tokens,
                     [&](int32_t a, int32_t b) { return best_gate[a] > best_gate[b]; });
  }
  std::fill(first_counts, first_counts + config.num_experts, 0);
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t pair = static_cast<int64_t>(order[i]) * k;
    if (locations[pair] >= 0) locations[pair] = first_counts[expert_ids[pair]]++;
  }
  if (k == 1) return;
  std::copy(first_counts, first_counts + config.num_experts, counts);
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t pair = static_cast<int64_t>(order[i]) * k + 1;
    if (locations[pair] >= 0) locations[pair] = counts[expert_ids[pair]]++;
  }
}

// Turns one token's pre-drop gates (pair_gates, from choose_static_experts) into its combine
// weights, in place: 0 for a pair that is not routed or is past the capacity; top-2 weights are
// divided by their sum after dropping (so a token whose second expert was dropped keeps weight 1 on
// its first) unless they were normalised before; the top-1 weight is the raw gate.
inline void finalize_static_weights(const int32_t* locations, const StaticGatingConfig& config,
                                    float* pair_gates) {
  const int64_t k = config.top_k;
  for (int64_t j = 0; j < k; ++j) {
    const bool kept = locations[j] >= 0 && locations[j] < config.capacity;
    if (!kept) pair_gates[j] = 0.0f;
  }
  if (k == 2 && !config.normalize_before_dropping) {
    const float denom = std::max(pair_gates[0] + pair_gates[1], FLT_EPSILON);
    pair_gates[0] /= denom;
    pair_gates[1] /= denom;
  }
}

// fairseq's load-balancing loss: E^2 * mean_e(mean_s gates[s, e] * routed first choices of e / S),
// from the per-expert sums of the gates over the tokens. 0 for an empty batch.
inline double static_load_balancing_loss(const double* gate_sums, const int32_t* first_counts,
                                         int64_t num_tokens, int64_t num_experts) {
  if (num_tokens == 0) return 0.0;
  double total = 0.0;
  for (int64_t e = 0; e < num_experts; ++e) total += gate_sums[e] * first_counts[e];
  const double n = static_cast<double>(num_tokens);
  return total / (n * n) * static_cast<double>(num_experts);
}

// A slot that two tokens claim in a dispatch mask.
struct SlotConflict {
  int64_t slot = -1;
  int64_t first_token = -1;
  int64_t second_token = -1;
};

// Whether the 8 bytes at `p` are all zero: one load skips 8 empty mask entries or 2 zero weights.
inline bool zero_word(const void* p) {
  uint64_t word;
  std::memcpy(&word, p, sizeof(word));
  return word == 0;
}

// For slots [slot_begin, slot_end) of a [num_tokens, num_slots] mask, writes the token that
// occupies each slot into owner[slot - slot_begin] (-1: a placeholder). Returns the first slot two
// tokens claim (slot -1 if none). Skips 8 empty slots at a time: the mask is nearly all zeros.
inline SlotConflict find_slot_owners(const bool* mask, int64_t num_tokens, int64_t num_slots,
                                     int64_t slot_begin, int64_t slot_end, int32_t* owner) {
  std::fill(owner, owner + (slot_end - slot_begin), -1);
  for (int64_t s = 0; s < num_tokens; ++s) {
    const bool* row = mask + s * num_slots;
    int64_t slot = slot_begin;
    while (slot < slot_end) {
      if (slot + 8 <= slot_end && zero_word(row + slot)) {
        slot += 8;
        continue;
      }
      if (row[slot]) {
        int32_t& occupant = owner[slot - slot_begin];
        if (occupant >= 0) return SlotConflict{slot, occupant, s};
        occupant = static_cast<int32_t>(s);
      }
      ++slot;
    }
  }
  return SlotConflict{};
}

// static_dispatch scans the mask in blocks of this many slots.
constexpr int64_t kStaticSlotBlock = 4096;

// The conflict static_dispatch reports: the first block of kStaticSlotBlock slots that has one,
// and in it the first slot claimed twice in token order (slot -1 if none). `owner`: scratch,
// kStaticSlotBlock entries.
inline SlotConflict first_slot_conflict(const bool* mask, int64_t num_tokens, int64_t num_slots,
                                        int32_t* owner) {
  for (int64_t begin = 0; begin < num_slots; begin += kStaticSlotBlock) {
    const int64_t end = std::min(num_slots, begin + kStaticSlotBlock);
    const SlotConflict conflict = find_slot_owners(mask, num_tokens, num_slots, begin, end, owner);
    if (conflict.slot >= 0) return conflict;
  }
  return SlotConflict{};
}

// out[s] = sum_slot combine_weights[s, slot] * expert_out[slot] for tokens [begin, end), over the
// nonzero weights only, accumulated in float32 in `accumulator` (hidden_size floats).
template <typename T>
void combine_static_tokens(const T* expert_out, int64_t hidden_size, const float* combine_weights,
                           int64_t num_slots, int64_t begin, int64_t end, float* accumulator,
                           T* out) {
  for (int64_t s = begin; s < end; ++s) {
    std::fill(accumulator, accumulator + hidden_size, 0.0f);
    const float* weights = combine_weights + s * num_slots;
    int64_t slot = 0;
    while (slot < num_slots) {
      if (slot + 2 <= num_slots && zero_word(weights + slot)) {
        slot += 2;
        continue;
      }
      const float w = weights[slot];
      if (w != 0.0f) {
        const T* row = expert_out + slot * hidden_size;
        for (int64_t h = 0; h < hidden_size; ++h) accumulator[h] += w * static_cast<float>(row[h]);
      }
      ++slot;
    }
    T* out_row = out + s * hidden_size;
    for (int64_t h = 0; h < hidden_size; ++h) out_row[h] = static_cast<T>(accumulator[h]);
  }
}

// ---- ATen ops (CPU; parameters: common/signatures.h) ----------------------------------------

// static_gating_cpu, static_routing_tensors_cpu, static_dispatch_cpu, static_combine_cpu
MOE_INFER_STATIC_GATING_OPS(MOE_INFER_DECLARE_CPU)

}  // namespace moe_infer
