#include "common/composite.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cfloat>
#include <limits>

#include "static_gating.h"

namespace moe_infer {

namespace {
std::atomic<bool (*)(const at::Tensor&)> g_capture_query{nullptr};
}  // namespace

bool graph_capture_in_progress(const at::Tensor& t) {
  const auto query = g_capture_query.load(std::memory_order_relaxed);
  return query != nullptr && query(t);
}

void set_graph_capture_query(bool (*query)(const at::Tensor&)) { g_capture_query.store(query); }

void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t limit) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const int64_t lo_value = lo.item<int64_t>();
  const int64_t hi_value = hi.item<int64_t>();
  TORCH_CHECK_VALUE(lo_value >= 0 && hi_value < limit, op, ": ", name, " has values in [", lo_value,
                    ", ", hi_value, "], expected [0, ", limit,
                    "); pass the output of dispatch_plan");
}

void check_finite_logits(const at::Tensor& router_logits, Scoring scoring, const char* op) {
  if (router_logits.numel() == 0) return;
  const at::Tensor logits = router_logits.to(at::kFloat);
  at::Tensor bad = at::isnan(logits) | at::isposinf(logits);
  bad = bad.any(1);
  if (scoring == Scoring::kSoftmax) bad = bad | at::isneginf(logits).all(1);
  const at::Tensor rows = at::nonzero(bad);
  if (rows.size(0) > 0) fail_nonfinite_logits(rows[0][0].item<int64_t>(), op);
}

void check_finite_bias(const at::Tensor& selection_bias) {
  const at::Tensor bad = at::nonzero(~at::isfinite(selection_bias));
  if (bad.size(0) > 0) fail_nonfinite_bias(bad[0][0].item<int64_t>());
}

void check_expert_id_range(const at::Tensor& expert_ids, const PlanSizes& sizes) {
  if (expert_ids.numel() == 0) return;
  const at::Tensor flat = expert_ids.reshape(-1);
  const at::Tensor bad = at::nonzero((flat < -1) | (flat >= sizes.num_experts));
  if (bad.size(0) == 0) return;
  const int64_t pair = bad[0][0].item<int64_t>();
  fail_expert_id(pair, flat[pair].item<int64_t>(), sizes);
}

std::vector<int32_t> host_expert_offsets(const at::Tensor& expert_offsets, int64_t num_rows,
                                         const char* op, const char* rows_name) {
  const at::Tensor offsets = expert_offsets.to(at::kCPU).contiguous();
  const int32_t* ptr = offsets.const_data_ptr<int32_t>();
  std::vector<int32_t> host(ptr, ptr + offsets.numel());
  TORCH_CHECK_VALUE(host.front() == 0, op, ": expert_offsets[0] (", host.front(), ") must be 0");
  for (size_t e = 1; e < host.size(); ++e) {
    TORCH_CHECK_VALUE(host[e] >= host[e - 1], op, ": expert_offsets must be non-decreasing, but ",
                      "expert_offsets[", e, "] (", host[e], ") < expert_offsets[", e - 1, "] (",
                      host[e - 1], ")");
  }
  TORCH_CHECK_VALUE(host.back() <= num_rows, op, ": expert_offsets[-1] (", host.back(),
                    ") exceeds the number of ", rows_name, " (", num_rows, ")");
  return host;
}

at::Tensor float_contiguous(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  if (t.scalar_type() != at::kBFloat16 || !t.is_contiguous() || !t.is_cpu()) {
    return t.to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  std::copy_n(t.const_data_ptr<c10::BFloat16>(), t.numel(), out.data_ptr<float>());
  return out;
}

void expert_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& w,
                   const std::optional<at::Tensor>& bias, LinearFn linear) {
  if (linear != nullptr && linear(out, x, w, bias)) return;
  if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w);
  } else {
    at::mm_out(out, x, w);
  }
}

void expert_ffn(int64_t expert, const at::Tensor& x, const ExpertWeights& weights,
                const at::Tensor& fc1_buffer, const at::Tensor& act_buffer,
                const ActivateFn& activate, const at::Tensor& y, LinearFn linear) {
  const int64_t rows = x.size(0);
  // [H, F1] and [I, H] views of the expert's weights.
  const at::Tensor fc1 = weights.fc1_in_out().select(0, expert);
  const at::Tensor fc2 = weights.fc2_in_out().select(0, expert);
  const at::Tensor fc1_out = fc1_buffer.narrow(0, 0, rows);
  expert_linear(fc1_out, x, fc1, expert_bias(weights.fc1_bias, expert), linear);
  const at::Tensor act = act_buffer.narrow(0, 0, rows);
  activate(fc1_out, act);
  expert_linear(y, act, fc2, expert_bias(weights.fc2_bias, expert), linear);
}

void fail_static_slot_conflict(const at::Tensor& dispatch_mask, const StaticSlotSizes& sizes) {
  const at::Tensor mask = dispatch_mask.to(at::kCPU).contiguous();
  std::vector<int32_t> owner(kStaticSlotBlock);
  const SlotConflict conflict =
      first_slot_conflict(mask.const_data_ptr<bool>(), sizes.num_tokens,
                          sizes.num_experts * sizes.capacity, owner.data());
  TORCH_INTERNAL_ASSERT(conflict.slot >= 0, "static_dispatch: no slot conflict to report");
  fail_slot_conflict(conflict.slot, conflict.first_token, conflict.second_token, sizes.capacity);
}

at::Tensor grouped_mlp_per_expert(const at::Tensor& hidden, const std::vector<int32_t>& offsets,
                                  const ExpertWeights& weights, const MlpSizes& sizes,
                                  const ActivateFn& activate, LinearFn linear) {
  auto out = at::empty({sizes.num_rows, sizes.hidden_size}, hidden.options());
  int64_t max_rows = 0;
  for (int64_t e = 0; e < sizes.num_experts; ++e) {
    max_rows = std::max<int64_t>(max_rows, offsets[e + 1] - offsets[e]);
  }
  // Scratch sized for the busiest expert, reused by every expert.
  auto fc1_buffer = at::empty({max_rows, sizes.fc1_outputs}, hidden.options());
  auto act_buffer = at::empty({max_rows, sizes.ffn_size}, hidden.options());
  for (int64_t e = 0; e < sizes.num_experts; ++e) {
    const int64_t begin = offsets[e];
    const int64_t rows = offsets[e + 1] - begin;
    if (rows == 0) continue;
    expert_ffn(e, hidden.narrow(0, begin, rows), weights, fc1_buffer, act_buffer, activate,
               out.narrow(0, begin, rows), linear);
  }
  // Rows after every expert (unrouted pairs) are defined as zeros.
  if (offsets.back() < sizes.num_rows) {
    out.narrow(0, offsets.back(), sizes.num_rows - offsets.back()).zero_();
  }
  return out;
}

namespace composite {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& router_logits,
                                               const GatingSizes& sizes, bool renormalize,
                                               const std::optional<at::Tensor>& selection_bias,
                                               double scaling_factor, bool validate) {
  if (validate) {
    check_finite_logits(router_logits, sizes.scoring);
    if (selection_bias.has_value()) check_finite_bias(*selection_bias);
  }
  const at::Tensor logits = router_logits.to(at::kFloat);
  at::Tensor weights;
  at::Tensor ids;
  if (sizes.scoring == Scoring::kSoftmaxTopk) {
    auto [top_logits, top_ids] = at::topk(logits, sizes.top_k, -1);
    weights = at::softmax(top_logits, -1);
    ids = top_ids;
  } else {
    const at::Tensor scores =
        sizes.scoring == Scoring::kSoftmax ? at::softmax(logits, -1) : at::sigmoid(logits);
    at::Tensor choice =
        selection_bias.has_value() ? scores + selection_bias->to(at::kFloat) : scores;
    if (sizes.n_group > 1) {
      const at::Tensor grouped =
          choice.view({sizes.num_tokens, sizes.n_group, sizes.num_experts / sizes.n_group});
      const at::Tensor group_scores = std::get<0>(at::topk(grouped, 2, -1)).sum(-1);
      const at::Tensor best_groups = std::get<1>(at::topk(group_scores, sizes.topk_group, -1));
      const at::Tensor group_mask = at::zeros_like(group_scores).scatter_(1, best_groups, 1.0);
      const at::Tensor expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(
          {sizes.num_tokens, sizes.num_experts});
      // Experts of unchosen groups are out of the running, as in transformers v5.
      choice = choice.masked_fill(expert_mask == 0, -std::numeric_limits<float>::infinity());
    }
    ids = std::get<1>(at::topk(choice, sizes.top_k, -1));
    weights = scores.gather(1, ids);
    // A row whose k weights sum to 0 (sigmoid of -inf logits) keeps weights 0, as in the kernels.
    if (renormalize) {
      const at::Tensor sum = weights.sum(-1, true);
      weights = weights / at::where(sum > 0, sum, at::ones_like(sum));
    }
  }
  if (scaling_factor != 1.0) weights = weights * scaling_factor;
  return {weights.contiguous(), ids.to(at::kInt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan(
    const at::Tensor& expert_ids, const PlanSizes& sizes, bool validate) {
  if (validate) check_expert_id_range(expert_ids, sizes);
  const at::Tensor flat = expert_ids.reshape(-1).to(at::kLong);
  // Unrouted (-1) and, when not validated, invalid ids go to the trailing bucket E.
  const at::Tensor bucket = at::where((flat < 0) | (flat >= sizes.num_experts),
                                      at::full_like(flat, sizes.num_experts), flat);
  const at::Tensor order = std::get<1>(at::sort(bucket, /*stable=*/true, 0, false));
  const at::Tensor rows = at::arange(sizes.num_pairs, flat.options());
  const at::Tensor row_of_pair = at::empty_like(order).scatter_(0, order, rows);
  const at::Tensor counts = at::zeros({sizes.num_experts + 1}, flat.options())
                                .scatter_add_(0, bucket, at::ones_like(bucket));
  at::Tensor offsets = at::zeros({sizes.num_experts + 1}, flat.options());
  offsets.narrow(0, 1, sizes.num_experts)
      .copy_(at::cumsum(counts.narrow(0, 0, sizes.num_experts), 0));
  return {order.to(at::kInt), row_of_pair.to(at::kInt),
          counts.narrow(0, 0, sizes.num_experts).to(at::kInt), offsets.to(at::kInt)};
}

at::Tensor permute(const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t top_k) {
  return hidden.index_select(0, at::floor_divide(sorted_pair_ids.to(at::kLong), top_k));
}

at::Tensor unpermute_combine(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                             const at::Tensor& row_of_pair) {
  const int64_t num_tokens = topk_weights.size(0);
  const int64_t top_k = topk_weights.size(1);
  const at::Tensor rows = expert_out.index_select(0, row_of_pair.to(at::kLong))
                              .to(at::kFloat)
                              .view({num_tokens, top_k, expert_out.size(1)});
  return (rows * topk_weights.to(at::kFloat).unsqueeze(-1)).sum(1).to(expert_out.scalar_type());
}

void activate(const at::Tensor& fc1_out, const ActivationParams& params, const at::Tensor& act) {
  const int64_t ffn_size = act.size(1);
  const at::Tensor x = fc1_out.to(at::kFloat);
  at::Tensor result;
  if (params.activation == Activation::kGptOssSwiglu) {
    const at::Tensor gate = at::clamp_max(x.slice(1, 0, 2 * ffn_size, 2), params.swiglu_limit);
    const at::Tensor up =
        at::clamp(x.slice(1, 1, 2 * ffn_size, 2), -params.swiglu_limit, params.swiglu_limit);
    result = (up + 1) * gate * at::sigmoid(gate * params.swiglu_alpha);
  } else {
    const at::Tensor gate = x.narrow(1, 0, ffn_size);
    switch (unary_of(params.activation)) {
      case Activation::kRelu:
        result = at::relu(gate);
        break;
      case Activation::kGelu:
        result = at::gelu(gate);
        break;
      case Activation::kGeluTanh:
        result = at::gelu(gate, "tanh");
        break;
      case Activation::kSilu:
        result = at::silu(gate);
        break;
      default:
        TORCH_CHECK(false, "grouped_mlp: the composite has no ATen form of activation '",
                    activation_name(params.activation), "'");
    }
    if (is_gated(params.activation)) result = result * x.narrow(1, ffn_size, ffn_size);
  }
  act.copy_(result);
}

namespace {

// Each routed pair's position in its expert's queue: the number of routed pairs on the same expert
// before it in routing order (`order`, or token order if undefined). routed [S, E] bool (one hot),
// ids [S] int64 -> [S] int32 (meaningless where the token's pair is not routed).
at::Tensor queue_positions(const at::Tensor& routed, const at::Tensor& ids,
                           const at::Tensor& order) {
  if (!order.defined()) {
    return at::cumsum(routed, 0, at::kInt).gather(1, ids.unsqueeze(1)).squeeze(1) - 1;
  }
  const at::Tensor in_order = at::cumsum(routed.index_select(0, order), 0, at::kInt)
                                  .gather(1, ids.index_select(0, order).unsqueeze(1))
                                  .squeeze(1) -
                              1;
  return at::empty_like(in_order).index_copy_(0, order, in_order);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> static_gating(
    const at::Tensor& router_logits, const StaticGatingSizes& sizes, int64_t capacity,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& second_expert_noise, bool normalize_before_dropping,
    bool batch_prioritized_routing, bool validate) {
  if (validate) check_finite_logits(router_logits, Scoring::kSoftmax, "static_gating");
  const int64_t num_tokens = sizes.num_tokens;
  const int64_t num_experts = sizes.num_experts;
  const int64_t top_k = sizes.top_k;
  const auto options = router_logits.options();
  if (num_tokens == 0) {
    return {at::empty({0, top_k}, options.dtype(at::kFloat)),
            at::empty({0, top_k}, options.dtype(at::kInt)),
            at::empty({0, top_k}, options.dtype(at::kInt)),
            at::zeros({}, options.dtype(at::kFloat))};
  }
  const at::Tensor logits = router_logits.to(at::kFloat);
  const at::Tensor gates = at::softmax(logits, 1);
  const at::Tensor experts = at::arange(num_experts, options.dtype(at::kLong));
  const at::Tensor not_padding = padding_mask.has_value()
                                     ? padding_mask->logical_not()
                                     : at::ones({num_tokens}, options.dtype(at::kBool));

  // First choice: argmax of the gates (the first maximum: ties go to the lower id).
  const at::Tensor first = gates.argmax(1);
  const at::Tensor is_first = first.unsqueeze(1) == experts;
  at::Tensor gate1 = gates.gather(1, first.unsqueeze(1)).squeeze(1);
  const at::Tensor routed1 = is_first & not_padding.unsqueeze(1);
  at::Tensor order;  // batch-prioritised routing order: best gate descending, ties by token
  if (batch_prioritized_routing) order = std::get<1>(at::sort(gate1.neg(), true, 0, false));
  const at::Tensor first_counts = routed1.sum({0}, false, at::kInt);
  const at::Tensor location1 = at::where(not_padding, queue_positions(routed1, first, order), -1);

  at::Tensor weights = gate1.unsqueeze(1);
  at::Tensor ids = first.unsqueeze(1);
  at::Tensor locations = location1.unsqueeze(1);
  if (top_k == 2) {
    // Second choice: argmax of logits (+ Gumbel noise for 'sampling') over the other experts, as
    // the CPU's scan finds it: ties to the lower id, a NaN never wins unless it is the first
    // candidate (the lowest id other than the first choice), which then stays.
    const bool sampling = sizes.policy == SecondExpertPolicy::kSampling;
    const at::Tensor choice = sampling ? logits + second_expert_noise->to(at::kFloat) : logits;
    const at::Tensor candidates =
        choice.masked_fill(is_first | at::isnan(choice), -std::numeric_limits<float>::infinity());
    const at::Tensor lowest_candidate = (first == 0).to(at::kLong);
    const at::Tensor lowest_is_nan =
        at::isnan(choice.gather(1, lowest_candidate.unsqueeze(1)).squeeze(1));
    at::Tensor second = candidates.argmax(1);
    // argmax is `first` itself when every candidate is -inf: the scan keeps the first candidate.
    second = at::where((second == first) | lowest_is_nan, lowest_candidate, second);
    at::Tensor gate2 = gates.gather(1, second.unsqueeze(1)).squeeze(1);
    if (normalize_before_dropping) {
      const at::Tensor denom = at::clamp_min(gate1 + gate2, FLT_EPSILON);
      gate1 = gate1 / denom;
      gate2 = gate2 / denom;
    }
    at::Tensor keep2 = not_padding;
    if (sizes.policy == SecondExpertPolicy::kRandom) {
      keep2 = keep2 & (gate2 * 2.0f > second_expert_noise->to(at::kFloat));
    }
    const at::Tensor routed2 = (second.unsqueeze(1) == experts) & keep2.unsqueeze(1);
    // Second choices queue after all first choices of their expert.
    const at::Tensor location2 = at::where(
        keep2, queue_positions(routed2, second, order) + first_counts.index_select(0, second), -1);
    weights = at::stack({gate1, gate2}, 1);
    ids = at::stack({first, second}, 1);
    locations = at::stack({location1, location2}, 1);
  }
  // Pairs not routed or past the capacity weigh 0; top-2 weights are then divided by their sum,
  // unless they were before dropping.
  weights = weights.masked_fill((locations < 0) | (locations >= capacity), 0.0f);
  if (top_k == 2 && !normalize_before_dropping) {
    weights = weights / at::clamp_min(weights.sum({1}, true), FLT_EPSILON);
  }
  // fairseq's l_aux: E^2 * mean_e(mean_s gates[s, e] * first_counts[e] / S), in float64.
  const double n = static_cast<double>(num_tokens);
  const at::Tensor l_aux =
      (gates.sum({0}, false, at::kDouble) * first_counts.to(at::kDouble)).sum() / (n * n) *
      static_cast<double>(num_experts);
  return {weights.contiguous(), ids.to(at::kInt).contiguous(), locations.to(at::kInt).contiguous(),
          l_aux.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> static_routing_tensors(const at::Tensor& expert_ids,
                                                          const at::Tensor& locations,
                                                          const at::Tensor& topk_weights,
                                                          const StaticSlotSizes& sizes,
                                                          bool validate) {
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  const at::Tensor ids = expert_ids.to(at::kLong);
  const at::Tensor slot_in_expert = locations.to(at::kLong);
  const at::Tensor weights = topk_weights.to(at::kFloat);
  const at::Tensor kept =
      (slot_in_expert >= 0) & (slot_in_expert < sizes.capacity) & (weights != 0);
  const at::Tensor valid_id = (ids >= 0) & (ids < sizes.num_experts);
  if (validate && ids.numel() > 0) {
    const at::Tensor flat_ids = ids.reshape(-1);
    const at::Tensor bad = at::nonzero((kept & valid_id.logical_not()).reshape(-1));
    if (bad.size(0) > 0) {
      const int64_t pair = bad[0][0].item<int64_t>();
      fail_static_expert_id(pair, sizes.top_k, flat_ids[pair].item<int64_t>(), sizes.num_experts);
    }
  }
  // Pairs that contribute nothing add 0 to slot 0, which leaves it as it is.
  const at::Tensor used = kept & valid_id;
  const at::Tensor slots = at::where(used, ids * sizes.capacity + slot_in_expert, 0);
  const at::Tensor combine_weights =
      at::zeros({sizes.num_tokens, num_slots}, weights.options())
          .scatter_add_(1, slots, at::where(used, weights, 0.0f))
          .view({sizes.num_tokens, sizes.num_experts, sizes.capacity});
  return {combine_weights, combine_weights != 0};
}

at::Tensor static_dispatch(const at::Tensor& hidden, const at::Tensor& dispatch_mask,
                           const StaticSlotSizes& sizes, bool validate) {
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  if (sizes.num_tokens == 0 || num_slots == 0) {
    return at::zeros({sizes.num_experts, sizes.capacity, sizes.hidden_size}, hidden.options());
  }
  const at::Tensor mask = dispatch_mask.reshape({sizes.num_tokens, num_slots});
  const at::Tensor tokens_in_slot = mask.sum({0}, false, at::kInt);
  if (validate && (tokens_in_slot > 1).any().item<bool>()) {
    fail_static_slot_conflict(dispatch_mask, sizes);
  }
  // Each slot's first token (argmax finds the first maximum); empty slots are placeholders: zeros.
  const at::Tensor owner = mask.to(at::kByte).argmax(0);
  return hidden.index_select(0, owner)
      .masked_fill_((tokens_in_slot == 0).unsqueeze(1), 0)
      .reshape({sizes.num_experts, sizes.capacity, sizes.hidden_size});
}

at::Tensor static_combine(const at::Tensor& expert_out, const at::Tensor& combine_weights,
                          const StaticSlotSizes& sizes) {
  const int64_t num_slots = sizes.num_experts * sizes.capacity;
  // fairseq's einsum("sec,ecm->sm") as one float32 matrix product.
  const at::Tensor weights = combine_weights.reshape({sizes.num_tokens, num_slots}).to(at::kFloat);
  const at::Tensor rows = expert_out.reshape({num_slots, sizes.hidden_size}).to(at::kFloat);
  if (at::isfinite(rows).all().item<bool>())
    return at::mm(weights, rows).to(expert_out.scalar_type());
  // Slots of weight 0 contribute nothing, even where their rows hold inf or NaN (0 * inf would
  // be NaN in a matrix product): sum only the (token, slot) pairs of nonzero weight.
  const at::Tensor pairs = at::nonzero(weights);
  const at::Tensor tokens = pairs.select(1, 0);
  const at::Tensor slots = pairs.select(1, 1);
  const at::Tensor pair_weights = weights.reshape(-1).index_select(0, tokens * num_slots + slots);
  const at::Tensor terms = rows.index_select(0, slots) * pair_weights.unsqueeze(1);
  return at::zeros({sizes.num_tokens, sizes.hidden_size}, rows.options())
      .index_add_(0, tokens, terms)
      .to(expert_out.scalar_type());
}

}  // namespace composite

namespace composite {

namespace {

// The op `name` as the dispatcher runs it, called through a function of type Fn.
template <typename Fn>
c10::TypedOperatorHandle<Fn> dispatcher_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_op(MOE_INFER_PARAMS(topk_gating)) {
  const GatingSizes sizes = check_topk_gating(MOE_INFER_ARGS(topk_gating));
  return topk_gating(router_logits, sizes, renormalize, selection_bias, scaling_factor,
                     validate && !graph_capture_in_progress(router_logits));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_op(
    MOE_INFER_PARAMS(dispatch_plan)) {
  const PlanSizes sizes = check_dispatch_plan(MOE_INFER_ARGS(dispatch_plan));
  return dispatch_plan(expert_ids, sizes, validate && !graph_capture_in_progress(expert_ids));
}

at::Tensor permute_op(MOE_INFER_PARAMS(permute)) {
  const RowSizes sizes = check_permute(MOE_INFER_ARGS(permute));
  if (!graph_capture_in_progress(hidden)) {
    check_index_range("permute", "sorted_pair_ids", sorted_pair_ids, sizes.num_tokens * top_k);
  }
  return permute(hidden, sorted_pair_ids, top_k);
}

at::Tensor unpermute_combine_op(MOE_INFER_PARAMS(unpermute_combine)) {
  check_unpermute_combine(MOE_INFER_ARGS(unpermute_combine));
  if (!graph_capture_in_progress(expert_out)) {
    check_index_range("unpermute_combine", "row_of_pair", row_of_pair, expert_out.size(0));
  }
  return unpermute_combine(expert_out, topk_weights, row_of_pair);
}

at::Tensor grouped_mlp_op(MOE_INFER_PARAMS(grouped_mlp)) {
  const MlpSizes sizes = check_grouped_mlp(MOE_INFER_ARGS(grouped_mlp));
  TORCH_CHECK(!graph_capture_in_progress(hidden),
              "grouped_mlp: the composite implementation reads the expert offsets on the host, "
              "which a graph capture does not allow");
  const std::vector<int32_t> offsets = host_expert_offsets(expert_offsets, sizes.num_rows);
  const ActivationParams params = sizes.activation;
  const ExpertWeights weights = expert_weights(MOE_INFER_EXPERT_ARGS);
  return grouped_mlp_per_expert(hidden, offsets, weights, sizes,
                                [params](const at::Tensor& fc1_out, const at::Tensor& act) {
                                  activate(fc1_out, params, act);
                                });
}

// permute -> grouped_mlp -> unpermute_combine through the dispatcher (each op's kernel where the
// device has one).
at::Tensor grouped_mlp_combine_op(MOE_INFER_PARAMS(grouped_mlp_combine)) {
  const MlpCombineSizes sizes = check_grouped_mlp_combine(MOE_INFER_ARGS(grouped_mlp_combine));
  const int64_t num_pairs = sizes.mlp.num_rows * sizes.top_k;
  if (!graph_capture_in_progress(hidden)) {
    check_index_range("grouped_mlp_combine", "sorted_pair_ids", sorted_pair_ids, num_pairs);
  }
  // The three ops through the dispatcher (typed like their composites, which share their schemas).
  static const auto permute_fn = dispatcher_op<decltype(permute_op)>("moe_infer::permute");
  static const auto grouped_mlp_fn =
      dispatcher_op<decltype(grouped_mlp_op)>("moe_infer::grouped_mlp");
  static const auto unpermute_combine_fn =
      dispatcher_op<decltype(unpermute_combine_op)>("moe_infer::unpermute_combine");
  // -1 where sorted_pair_ids names no pair: it must name each once (the fused CPU kernel reads it
  // as a list and accepts repeats; unpermute_combine cannot).
  const at::Tensor row_of_pair = at::full_like(sorted_pair_ids, -1)
                                     .scatter_(0, sorted_pair_ids.to(at::kLong),
                                               at::arange(num_pairs, sorted_pair_ids.options()));
  if (num_pairs > 0 && !graph_capture_in_progress(hidden)) {
    TORCH_CHECK_VALUE(row_of_pair.min().item<int32_t>() >= 0,
                      "grouped_mlp_combine: sorted_pair_ids must name every pair exactly once (a "
                      "permutation of [0, num_tokens * top_k)); pass the output of dispatch_plan");
  }
  const at::Tensor rows = permute_fn.call(hidden, sorted_pair_ids, sizes.top_k);
  const at::Tensor expert_rows = grouped_mlp_fn.call(rows, expert_offsets, MOE_INFER_EXPERT_ARGS);
  return unpermute_combine_fn.call(expert_rows, topk_weights, row_of_pair);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> static_gating_op(
    MOE_INFER_PARAMS(static_gating)) {
  const StaticGatingSizes sizes = check_static_gating(MOE_INFER_ARGS(static_gating));
  return static_gating(router_logits, sizes, capacity, padding_mask, second_expert_noise,
                       normalize_before_dropping, batch_prioritized_routing,
                       !graph_capture_in_progress(router_logits));
}

std::tuple<at::Tensor, at::Tensor> static_routing_tensors_op(
    MOE_INFER_PARAMS(static_routing_tensors)) {
  const StaticSlotSizes sizes =
      check_static_routing_tensors(MOE_INFER_ARGS(static_routing_tensors));
  return static_routing_tensors(expert_ids, locations, topk_weights, sizes,
                                !graph_capture_in_progress(expert_ids));
}

at::Tensor static_dispatch_op(MOE_INFER_PARAMS(static_dispatch)) {
  const StaticSlotSizes sizes = check_static_dispatch(MOE_INFER_ARGS(static_dispatch));
  return static_dispatch(hidden, dispatch_mask, sizes, !graph_capture_in_progress(hidden));
}

at::Tensor static_combine_op(MOE_INFER_PARAMS(static_combine)) {
  return static_combine(expert_out, combine_weights,
                        check_static_combine(MOE_INFER_ARGS(static_combine)));
}

}  // namespace composite

TORCH_LIBRARY_IMPL(moe_infer, CompositeExplicitAutograd, m) {
#define MOE_INFER_REGISTER_COMPOSITE(op) m.impl(#op, &composite::op##_op);
  MOE_INFER_COMPOSITE_OPS(MOE_INFER_REGISTER_COMPOSITE)
#undef MOE_INFER_REGISTER_COMPOSITE
}

}  // namespace moe_infer
