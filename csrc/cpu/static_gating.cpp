// CPU static (capacity-based) gating: fairseq's gates, its [S, E, C] routing tensors, and the
// einsum dispatch and combine, done sparsely (each visits only the occupied slots' rows).
#include "static_gating.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "common/checks.h"
#include "common/composite.h"
#include "cpu/parallel.h"

namespace moe_infer {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> static_gating_cpu(
    MOE_INFER_PARAMS(static_gating)) {
  const StaticGatingSizes sizes = check_static_gating(MOE_INFER_ARGS(static_gating));
  const StaticGatingConfig config{sizes.num_experts, top_k, capacity, sizes.policy,
                                  normalize_before_dropping};
  const int64_t num_tokens = sizes.num_tokens;
  const int64_t num_experts = sizes.num_experts;
  const at::Tensor logits = float_contiguous(router_logits);
  at::Tensor noise;
  if (second_expert_noise.has_value()) noise = float_contiguous(*second_expert_noise);
  at::Tensor padding;
  if (padding_mask.has_value()) padding = padding_mask->contiguous();

  const auto options = router_logits.options();
  auto expert_ids = at::empty({num_tokens, top_k}, options.dtype(at::kInt));
  auto locations = at::empty({num_tokens, top_k}, options.dtype(at::kInt));
  auto topk_weights = at::empty({num_tokens, top_k}, options.dtype(at::kFloat));
  auto l_aux = at::empty({}, options.dtype(at::kFloat));

  const float* logits_ptr = logits.const_data_ptr<float>();
  const bool sampling = sizes.policy == SecondExpertPolicy::kSampling && top_k == 2;
  const float* noise_ptr = noise.defined() ? noise.const_data_ptr<float>() : nullptr;
  const bool* padding_ptr = padding.defined() ? padding.const_data_ptr<bool>() : nullptr;
  int32_t* ids_ptr = expert_ids.data_ptr<int32_t>();
  int32_t* locations_ptr = locations.data_ptr<int32_t>();
  float* weights_ptr = topk_weights.data_ptr<float>();
  std::vector<float> best_gate(num_tokens);

  // 1. Each token's choices, and per-chunk sums of the gates (for l_aux).
  const int64_t num_chunks = num_chunks_for(num_tokens, 256);
  std::vector<double> chunk_gate_sums(num_chunks * num_experts, 0.0);
  std::atomic<int64_t> bad_token{num_tokens};
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> gates(num_experts);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* gate_sums = chunk_gate_sums.data() + chunk * num_experts;
      const auto [begin, end] = chunk_range(chunk, num_chunks, num_tokens);
      for (int64_t s = begin; s < end; ++s) {
        bool routed[2];
        const float* token_noise = sampling ? noise_ptr + s * num_experts : nullptr;
        const float uniform = noise_ptr != nullptr && !sampling ? noise_ptr[s] : 0.0f;
        const bool is_padding = padding_ptr != nullptr && padding_ptr[s];
        if (!choose_static_experts(logits_ptr + s * num_experts, token_noise, uniform, is_padding,
                                   config, gates.data(), ids_ptr + s * top_k,
                                   weights_ptr + s * top_k, routed, &best_gate[s])) {
          keep_smallest(bad_token, s);
          return;
        }
        for (int64_t j = 0; j < top_k; ++j) locations_ptr[s * top_k + j] = routed[j] ? 0 : -1;
        for (int64_t e = 0; e < num_experts; ++e) gate_sums[e] += gates[e];
      }
    }
  });
  if (bad_token.load() != num_tokens) fail_nonfinite_logits(bad_token.load(), "static_gating");

  // 2. Positions in the expert buffers: a sequential scan, O(num_tokens * top_k).
  std::vector<int32_t> order(num_tokens);
  std::vector<int32_t> first_counts(num_experts);
  std::vector<int32_t> counts(num_experts);
  assign_static_locations(ids_ptr, num_tokens, config,
                          batch_prioritized_routing ? best_gate.data() : nullptr, locations_ptr,
                          order.data(), first_counts.data(), counts.data());

  // 3. Drops and normalisation.
  at::parallel_for(0, num_tokens, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      finalize_static_weights(locations_ptr + s * top_k, config, weights_ptr + s * top_k);
    }
  });

  std::vector<double> gate_sums(num_experts, 0.0);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int64_t e = 0; e < num_experts; ++e) {
      gate_sums[e] += chunk_gate_sums[chunk * num_experts + e];
    }
  }
  l_aux.fill_(
      static_load_balancing_loss(gate_sums.data(), first_counts.data(), num_tokens, num_experts));
  return {topk_weights, expert_ids, locations, l_aux};
}

std::tuple<at::Tensor, at::Tensor> static_routing_tensors_cpu(
    MOE_INFER_PARAMS(static_routing_tensors)) {
  const StaticSlotSizes sizes =
      check_static_routing_tensors(MOE_INFER_ARGS(static_routing_tensors));
  const int64_t num_tokens = sizes.num_tokens;
  const int64_t top_k = sizes.top_k;
  const int64_t num_slots = num_experts * capacity;
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const at::Tensor pair_locations = locations.contiguous();
  const at::Tensor weights = float_contiguous(topk_weights);
  const auto options = topk_weights.options();
  auto combine_weights = at::empty({num_tokens, num_experts, capacity}, options.dtype(at::kFloat));
  auto dispatch_mask = at::empty({num_tokens, num_experts, capacity}, options.dtype(at::kBool));

  const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
  const int32_t* locations_ptr = pair_locations.const_data_ptr<int32_t>();
  const float* weights_ptr = weights.const_data_ptr<float>();
  float* combine_ptr = combine_weights.data_ptr<float>();
  bool* mask_ptr = dispatch_mask.data_ptr<bool>();
  std::atomic<int64_t> bad_pair{num_tokens * top_k};
  // Each token writes (and first touches) its own [E * C] rows: zeros plus at most top_k entries.
  at::parallel_for(0, num_tokens, row_grain(num_slots), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      float* combine_row = combine_ptr + s * num_slots;
      bool* mask_row = mask_ptr + s * num_slots;
      std::fill(combine_row, combine_row + num_slots, 0.0f);
      std::fill(mask_row, mask_row + num_slots, false);
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t pair = s * top_k + j;
        const int64_t location = locations_ptr[pair];
        if (location < 0 || location >= capacity || weights_ptr[pair] == 0.0f) continue;
        const int64_t expert = ids_ptr[pair];
        if (expert < 0 || expert >= num_experts) {
          keep_smallest(bad_pair, pair);
          return;
        }
        const int64_t slot = expert * capacity + location;
        combine_row[slot] += weights_ptr[pair];
        mask_row[slot] = combine_row[slot] != 0.0f;
      }
    }
  });
  const int64_t bad = bad_pair.load();
  if (bad != num_tokens * top_k) fail_static_expert_id(bad, top_k, ids_ptr[bad], num_experts);
  return {combine_weights, dispatch_mask};
}

at::Tensor static_dispatch_cpu(MOE_INFER_PARAMS(static_dispatch)) {
  const StaticSlotSizes sizes = check_static_dispatch(MOE_INFER_ARGS(static_dispatch));
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  const at::Tensor mask = dispatch_mask.contiguous();
  const at::Tensor rows = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  auto out = at::empty({sizes.num_experts, sizes.capacity, sizes.hidden_size}, hidden.options());
  const int64_t element_bytes = static_cast<int64_t>(hidden.element_size());
  const int64_t row_bytes = sizes.hidden_size * element_bytes;
  const int64_t src_stride_bytes = rows.stride(0) * element_bytes;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const bool* mask_ptr = mask.const_data_ptr<bool>();

  // Blocks of slots: each scans every token's mask row over its block, then fills its rows.
  constexpr int64_t kBlock = kStaticSlotBlock;
  const int64_t num_blocks = (num_slots + kBlock - 1) / kBlock;
  std::vector<SlotConflict> conflicts(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<int32_t> owner(kBlock);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t begin = block * kBlock;
      const int64_t end = std::min(num_slots, begin + kBlock);
      conflicts[block] =
          find_slot_owners(mask_ptr, sizes.num_tokens, num_slots, begin, end, owner.data());
      if (conflicts[block].slot >= 0) continue;
      for (int64_t slot = begin; slot < end; ++slot) {
        const int32_t token = owner[slot - begin];
        if (token >= 0) {
          std::memcpy(dst + slot * row_bytes, src + token * src_stride_bytes, row_bytes);
        } else {
          std::memset(dst + slot * row_bytes, 0, row_bytes);
        }
      }
    }
  });
  for (const SlotConflict& conflict : conflicts) {
    if (conflict.slot >= 0) {
      fail_slot_conflict(conflict.slot, conflict.first_token, conflict.second_token,
                         sizes.capacity);
    }
  }
  return out;
}

at::Tensor static_combine_cpu(MOE_INFER_PARAMS(static_combine)) {
  const StaticSlotSizes sizes = check_static_combine(MOE_INFER_ARGS(static_combine));
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  const at::Tensor rows = expert_out.contiguous();
  const at::Tensor weights = float_contiguous(combine_weights);
  const float* weights_ptr = weights.const_data_ptr<float>();
  const int64_t hidden_size = sizes.hidden_size;
  // A token scans its E * C weights.
  return combine_tokens_parallel(
      rows, sizes.num_tokens, hidden_size, row_grain(num_slots),
      [&](const auto* rows_ptr, int64_t begin, int64_t end, float* accumulator, auto* out_ptr) {
        combine_static_tokens(rows_ptr, hidden_size, weights_ptr, num_slots, begin, end,
                              accumulator, out_ptr);
      });
}

TORCH_LIBRARY_IMPL(moe_infer, CPU, m) {
  m.impl("static_gating", &static_gating_cpu);
  m.impl("static_routing_tensors", &static_routing_tensors_cpu);
  m.impl("static_dispatch", &static_dispatch_cpu);
  m.impl("static_combine", &static_combine_cpu);
}

}  // namespace moe_infer
