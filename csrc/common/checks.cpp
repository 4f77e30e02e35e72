#include "common/checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace moe_infer {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

bool is_index_type(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all arguments must be on one device");
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
                    t.sizes());
}

// The dtypes an argument may have, and their names in the error.
struct DtypeRule {
  bool (*accepts)(at::ScalarType);
  const char* names;
};
constexpr DtypeRule kFloating{is_float_type, "float32, bfloat16 or float16"};
constexpr DtypeRule kIndex{is_index_type, "int32 or int64"};
constexpr DtypeRule kInt32{[](at::ScalarType t) { return t == at::kInt; }, "int32"};
constexpr DtypeRule kInt64{[](at::ScalarType t) { return t == at::kLong; }, "int64"};
constexpr DtypeRule kBool{[](at::ScalarType t) { return t == at::kBool; }, "bool"};
constexpr DtypeRule kFloat32Or64{
    [](at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }, "float32 or float64"};

void check_dtype(const char* op, const char* name, const at::Tensor& t, const DtypeRule& dtype) {
  TORCH_CHECK_TYPE(dtype.accepts(t.scalar_type()), op, ": ", name, " must be ", dtype.names,
                   ", got ", t.scalar_type());
}

// `name` must be a `dim`-D tensor (`layout` names its dimensions) of a dtype `dtype` accepts.
void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                  const char* layout, const DtypeRule& dtype) {
  check_dim(op, name, t, dim, layout);
  check_dtype(op, name, t, dtype);
}

}  // namespace

Scoring parse_scoring(const std::string& name) {
  if (name == "softmax") return Scoring::kSoftmax;
  if (name == "softmax_topk") return Scoring::kSoftmaxTopk;
  if (name == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK_VALUE(
      false, "topk_gating: scoring must be one of 'softmax', 'softmax_topk', 'sigmoid', got '",
      name, "'");
}

SecondExpertPolicy parse_second_expert_policy(const std::string& name) {
  if (name == "all") return SecondExpertPolicy::kAll;
  if (name == "sampling") return SecondExpertPolicy::kSampling;
  if (name == "random") return SecondExpertPolicy::kRandom;
  TORCH_CHECK_VALUE(
      false,
      "static_gating: second_expert_policy must be one of 'all', 'sampling', 'random', "
      "got '",
      name, "'");
}

Activation parse_activation(const std::string& name) {
  std::string choices;
  for (const Activation activation : kAllActivations) {
    if (name == activation_name(activation)) return activation;
    choices += std::string(choices.empty() ? "'" : ", '") + activation_name(activation) + "'";
  }
  TORCH_CHECK_VALUE(false, "grouped_mlp: activation must be one of ", choices, ", got '", name,
                    "'");
}

EvictionPolicy parse_eviction_policy(const std::string& name) {
  if (name == "paper") return EvictionPolicy::kPaper;
  if (name == "fifo") return EvictionPolicy::kFifo;
  if (name == "lru") return EvictionPolicy::kLru;
  if (name == "lfu") return EvictionPolicy::kLfu;
  if (name == "belady") return EvictionPolicy::kBelady;
  TORCH_CHECK_VALUE(
      false, "expert buffer: policy must be one of 'paper', 'fifo', 'lru', 'lfu', 'belady', got '",
      name, "'");
}

GatingSizes check_topk_gating(MOE_INFER_PARAMS(topk_gating)) {
  constexpr const char* op = "topk_gating";
  check_tensor(op, "router_logits", router_logits, 2, "[num_tokens, num_experts]", kFloating);
  GatingSizes sizes{
      router_logits.size(0), router_logits.size(1), k, parse_scoring(scoring), n_group, topk_group};
  TORCH_CHECK_VALUE(sizes.num_experts >= 1, op,
                    ": router_logits must have at least one expert column");
  TORCH_CHECK_VALUE(k >= 1, op, ": k (", k, ") must be >= 1");
  TORCH_CHECK_VALUE(k <= sizes.num_experts, op, ": k (", k, ") must be <= num_experts (",
                    sizes.num_experts, ")");
  TORCH_CHECK_VALUE(sizes.num_tokens * k <= kMaxPairs, op, ": num_tokens * k (",
                    sizes.num_tokens * k, ") exceeds ", kMaxPairs);
  TORCH_CHECK_VALUE(std::isfinite(scaling_factor), op, ": scaling_factor must be finite, got ",
                    scaling_factor);
  if (selection_bias.has_value()) {
    const at::Tensor& bias = *selection_bias;
    check_tensor(op, "selection_bias", bias, 1, "[num_experts]", kFloating);
    TORCH_CHECK_VALUE(bias.size(0) == sizes.num_experts, op, ": selection_bias has ", bias.size(0),
                      " entries but router_logits has ", sizes.num_experts, " experts");
    check_same_device(op, "selection_bias", bias, router_logits, "router_logits");
  }
  TORCH_CHECK_VALUE(n_group >= 1, op, ": n_group (", n_group, ") must be >= 1");
  TORCH_CHECK_VALUE(sizes.num_experts % n_group == 0, op, ": num_experts (", sizes.num_experts,
                    ") must be divisible by n_group (", n_group, ")");
  if (n_group > 1) {
    const int64_t group_size = sizes.num_experts / n_group;
    TORCH_CHECK_VALUE(group_size >= 2, op,
                      ": group-limited routing needs at least 2 experts per group, got ",
                      group_size, " (num_experts ", sizes.num_experts, ", n_group ", n_group, ")");
    TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, op, ": topk_group (", topk_group,
                      ") must be in [1, n_group (", n_group, ")]");
    TORCH_CHECK_VALUE(k <= topk_group * group_size, op, ": k (", k,
                      ") must be <= topk_group * experts per group (", topk_group * group_size,
                      ")");
    TORCH_CHECK_VALUE(sizes.scoring != Scoring::kSoftmaxTopk, op,
                      ": group-limited routing is not defined for scoring 'softmax_topk'");
  }
  return sizes;
}

void fail_nonfinite_logits(int64_t row, const char* op) {
  TORCH_CHECK_VALUE(
      false, op, ": router_logits row ", row,
      " contains NaN or +inf (or only -inf, which has no softmax); check the hidden states "
      "and router weights");
}

void fail_nonfinite_bias(int64_t entry) {
  TORCH_CHECK_VALUE(false, "topk_gating: selection_bias must be finite, but entry ", entry,
                    " is not");
}

void fail_expert_id(int64_t pair, int64_t value, const PlanSizes& sizes) {
  TORCH_CHECK_VALUE(false, "dispatch_plan: expert_ids[", pair / sizes.top_k, ", ",
                    pair % sizes.top_k, "] = ", value,
                    " is out of range: expected 0 <= id < num_experts (", sizes.num_experts,
                    "), or -1 for an unrouted pair");
}

PlanSizes check_dispatch_plan(MOE_INFER_PARAMS(dispatch_plan)) {
  constexpr const char* op = "dispatch_plan";
  check_tensor(op, "expert_ids", expert_ids, 2, "[num_tokens, top_k]", kIndex);
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts (", num_experts, ") must be >= 1");
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts, op, ": num_experts (", num_experts, ") exceeds ",
                    kMaxExperts, " (the op allocates O(num_experts) per call)");
  PlanSizes sizes{expert_ids.size(0), expert_ids.size(1), expert_ids.numel(), num_experts};
  TORCH_CHECK_VALUE(sizes.top_k >= 1, op,
                    ": expert_ids must have at least one column (top_k >= 1)");
  TORCH_CHECK_VALUE(sizes.num_pairs <= kMaxPairs, op, ": num_tokens * top_k (", sizes.num_pairs,
                    ") exceeds ", kMaxPairs);
  return sizes;
}

RowSizes check_permute(MOE_INFER_PARAMS(permute)) {
  constexpr const char* op = "permute";
  check_tensor(op, "hidden", hidden, 2, "[num_tokens, hidden_size]", kFloating);
  check_tensor(op, "sorted_pair_ids", sorted_pair_ids, 1, "[num_tokens * top_k]", kInt32);
  check_same_device(op, "sorted_pair_ids", sorted_pair_ids, hidden, "hidden");
  TORCH_CHECK_VALUE(top_k >= 1, op, ": top_k (", top_k, ") must be >= 1");
  RowSizes sizes{hidden.size(0), top_k, hidden.size(1)};
  // Compared without forming the product, which could overflow.
  TORCH_CHECK_VALUE(top_k <= kMaxPairs && sizes.num_tokens <= kMaxPairs / top_k, op,
                    ": num_tokens * top_k (", sizes.num_tokens, " * ", top_k, ") exceeds ",
                    kMaxPairs);
  TORCH_CHECK_VALUE(sorted_pair_ids.size(0) == sizes.num_tokens * top_k, op,
                    ": sorted_pair_ids has ", sorted_pair_ids.size(0),
                    " entries, expected num_tokens * top_k = ", sizes.num_tokens, " * ", top_k);
  return sizes;
}

RowSizes check_unpermute_combine(MOE_INFER_PARAMS(unpermute_combine)) {
  constexpr const char* op = "unpermute_combine";
  check_tensor(op, "expert_out", expert_out, 2, "[num_tokens * top_k, hidden_size]", kFloating);
  check_tensor(op, "topk_weights", topk_weights, 2, "[num_tokens, top_k]", kFloating);
  check_tensor(op, "row_of_pair", row_of_pair, 1, "[num_tokens * top_k]", kInt32);
  check_same_device(op, "topk_weights", topk_weights, expert_out, "expert_out");
  check_same_device(op, "row_of_pair", row_of_pair, expert_out, "expert_out");
  RowSizes sizes{topk_weights.size(0), topk_weights.size(1), expert_out.size(1)};
  TORCH_CHECK_VALUE(sizes.top_k >= 1, op,
                    ": topk_weights must have at least one column (top_k >= 1)");
  const int64_t num_pairs = sizes.num_tokens * sizes.top_k;
  TORCH_CHECK_VALUE(expert_out.size(0) == num_pairs, op, ": expert_out has ", expert_out.size(0),
                    " rows, expected num_tokens * top_k = ", num_pairs);
  TORCH_CHECK_VALUE(row_of_pair.size(0) == num_pairs, op, ": row_of_pair has ", row_of_pair.size(0),
                    " entries, expected num_tokens * top_k = ", num_pairs);
  return sizes;
}

namespace {

// grouped_mlp's checks, worded for `op` (grouped_mlp_combine checks its expert compute with them).
MlpSizes check_expert_mlp(const char* op, MOE_INFER_PARAMS(grouped_mlp)) {
  check_tensor(op, "hidden", hidden, 2, "[num_rows, hidden_size]", kFloating);
  check_tensor(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]", kInt32);
  TORCH_CHECK_VALUE(expert_offsets.size(0) >= 2, op,
                    ": expert_offsets must have num_experts + 1 >= 2 entries, got ",
                    expert_offsets.size(0));
  const char* fc1_layout = weights_transposed ? "[num_experts, hidden_size, fc1_outputs]"
                                              : "[num_experts, fc1_outputs, hidden_size]";
  const char* fc2_layout = weights_transposed ? "[num_experts, ffn_size, hidden_size]"
                                              : "[num_experts, hidden_size, ffn_size]";
  check_dim(op, "fc1_weight", fc1_weight, 3, fc1_layout);
  check_dim(op, "fc2_weight", fc2_weight, 3, fc2_layout);
  MlpSizes sizes{};
  sizes.num_rows = hidden.size(0);
  sizes.hidden_size = hidden.size(1);
  sizes.num_experts = expert_offsets.size(0) - 1;
  TORCH_CHECK_VALUE(std::isfinite(swiglu_alpha) && std::isfinite(swiglu_limit), op,
                    ": swiglu_alpha and swiglu_limit must be finite, got ", swiglu_alpha, " and ",
                    swiglu_limit);
  sizes.activation = {parse_activation(activation), static_cast<float>(swiglu_alpha),
                      static_cast<float>(swiglu_limit)};
  sizes.fc1_outputs = fc1_weight.size(weights_transposed ? 2 : 1);
  sizes.ffn_size = fc2_weight.size(weights_transposed ? 1 : 2);
  const int64_t fc1_inputs = fc1_weight.size(weights_transposed ? 1 : 2);
  const int64_t fc2_outputs = fc2_weight.size(weights_transposed ? 2 : 1);

  TORCH_CHECK_VALUE(fc1_weight.size(0) == sizes.num_experts, op, ": fc1_weight has ",
                    fc1_weight.size(0), " experts but expert_offsets describes ",
                    sizes.num_experts);
  TORCH_CHECK_VALUE(fc2_weight.size(0) == sizes.num_experts, op, ": fc2_weight has ",
                    fc2_weight.size(0), " experts but expert_offsets describes ",
                    sizes.num_experts);
  TORCH_CHECK_VALUE(fc1_inputs == sizes.hidden_size, op, ": fc1_weight ", fc1_weight.sizes(),
                    " does not match hidden_size ", sizes.hidden_size, " (expected layout ",
                    fc1_layout, ")");
  TORCH_CHECK_VALUE(fc2_outputs == sizes.hidden_size, op, ": fc2_weight ", fc2_weight.sizes(),
                    " does not match hidden_size ", sizes.hidden_size, " (expected layout ",
                    fc2_layout, ")");
  const int64_t expected_fc1 =
      is_gated(sizes.activation.activation) ? 2 * sizes.ffn_size : sizes.ffn_size;
  TORCH_CHECK_VALUE(sizes.fc1_outputs == expected_fc1, op, ": fc1_weight has ", sizes.fc1_outputs,
                    " outputs but activation '", activation, "' with ffn_size ", sizes.ffn_size,
                    " (from fc2_weight) needs ", expected_fc1);
  TORCH_CHECK_VALUE(sizes.ffn_size >= 1, op, ": ffn_size must be >= 1");
  for (const auto& [name, w] :
       {std::pair<const char*, const at::Tensor*>{"fc1_weight", &fc1_weight},
        {"fc2_weight", &fc2_weight}}) {
    TORCH_CHECK_TYPE(w->scalar_type() == hidden.scalar_type(), op, ": ", name, " is ",
                     w->scalar_type(), " but hidden is ", hidden.scalar_type(),
                     "; they must match");
    check_same_device(op, name, *w, hidden, "hidden");
  }
  check_same_device(op, "expert_offsets", expert_offsets, hidden, "hidden");
  auto check_bias = [&](const char* name, const std::optional<at::Tensor>& bias, int64_t width) {
    if (!bias.has_value()) return;
    TORCH_CHECK_VALUE(
        bias->dim() == 2 && bias->size(0) == sizes.num_experts && bias->size(1) == width, op, ": ",
        name, " must have shape [", sizes.num_experts, ", ", width, "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), op, ": ", name, " is ",
                     bias->scalar_type(), " but hidden is ", hidden.scalar_type(),
                     "; they must match");
    check_same_device(op, name, *bias, hidden, "hidden");
  };
  check_bias("fc1_bias", fc1_bias, sizes.fc1_outputs);
  check_bias("fc2_bias", fc2_bias, sizes.hidden_size);
  return sizes;
}

}  // namespace

MlpSizes check_grouped_mlp(MOE_INFER_PARAMS(grouped_mlp)) {
  return check_expert_mlp("grouped_mlp", MOE_INFER_ARGS(grouped_mlp));
}

MlpCombineSizes check_grouped_mlp_combine(MOE_INFER_PARAMS(grouped_mlp_combine)) {
  constexpr const char* op = "grouped_mlp_combine";
  check_dim(op, "hidden", hidden, 2, "[num_tokens, hidden_size]");
  check_tensor(op, "topk_weights", topk_weights, 2, "[num_tokens, top_k]", kFloating);
  check_tensor(op, "sorted_pair_ids", sorted_pair_ids, 1, "[num_tokens * top_k]", kInt32);
  const MlpSizes mlp = check_expert_mlp(op, hidden, expert_offsets, MOE_INFER_EXPERT_ARGS);
  const int64_t top_k = topk_weights.size(1);
  TORCH_CHECK_VALUE(topk_weights.size(0) == mlp.num_rows, op, ": topk_weights has ",
                    topk_weights.size(0), " rows but hidden has ", mlp.num_rows, " tokens");
  TORCH_CHECK_VALUE(top_k >= 1, op, ": topk_weights must have at least one column (top_k >= 1)");
  TORCH_CHECK_VALUE(mlp.num_rows * top_k <= kMaxPairs, op, ": num_tokens * top_k (",
                    mlp.num_rows * top_k, ") exceeds ", kMaxPairs);
  TORCH_CHECK_VALUE(sorted_pair_ids.size(0) == mlp.num_rows * top_k, op, ": sorted_pair_ids has ",
                    sorted_pair_ids.size(0),
                    " entries, expected num_tokens * top_k = ", mlp.num_rows, " * ", top_k);
  check_same_device(op, "topk_weights", topk_weights, hidden, "hidden");
  check_same_device(op, "sorted_pair_ids", sorted_pair_ids, hidden, "hidden");
  return {mlp, top_k};
}

// ---- placement ----

PlacementAlgorithm parse_placement_algorithm(const std::string& name) {
  if (name == "contiguous") return PlacementAlgorithm::kContiguous;
  if (name == "greedy") return PlacementAlgorithm::kGreedy;
  if (name == "anti_correlation") return PlacementAlgorithm::kAntiCorrelation;
  TORCH_CHECK_VALUE(false,
                    "expert_placement: algorithm must be one of 'contiguous', 'greedy', "
                    "'anti_correlation', got '",
                    name, "'");
}

PlacementSizes check_expert_placement(MOE_INFER_PARAMS(expert_placement)) {
  constexpr const char* op = "expert_placement";
  check_tensor(op, "expert_load", expert_load, 1, "[num_experts]", kFloat32Or64);
  TORCH_CHECK_VALUE(expert_load.device().is_cpu(), op, ": expert_load must be on the CPU, got ",
                    expert_load.device(), " (placement is planned on the host)");
  PlacementSizes sizes{expert_load.size(0), num_ranks, slots_per_rank, num_nodes,
                       parse_placement_algorithm(algorithm)};
  TORCH_CHECK_VALUE(sizes.num_experts >= 1, op, ": expert_load must have at least one expert");
  TORCH_CHECK_VALUE(num_ranks >= 1, op, ": num_ranks (", num_ranks, ") must be >= 1");
  TORCH_CHECK_VALUE(slots_per_rank >= 1, op, ": slots_per_rank (", slots_per_rank,
                    ") must be >= 1");
  TORCH_CHECK_VALUE(num_ranks <= kMaxExperts / slots_per_rank, op, ": num_ranks * slots_per_rank (",
                    num_ranks, " * ", slots_per_rank, ") exceeds ", kMaxExperts);
  TORCH_CHECK_VALUE(sizes.num_experts <= num_ranks * slots_per_rank, op, ": ", sizes.num_experts,
                    " experts do not fit on ", num_ranks, " ranks x ", slots_per_rank,
                    " slots per rank (", num_ranks * slots_per_rank, " slots)");
  TORCH_CHECK_VALUE(num_nodes >= 1 && num_ranks % num_nodes == 0, op, ": num_nodes (", num_nodes,
                    ") must be >= 1 and divide num_ranks (", num_ranks, ")");
  TORCH_CHECK_VALUE(
      !(replicate && sizes.algorithm == PlacementAlgorithm::kContiguous), op,
      ": replicate needs a load-aware algorithm ('greedy' or 'anti_correlation'), not "
      "'contiguous'");
  TORCH_CHECK_VALUE(std::isfinite(correlation_weight), op,
                    ": correlation_weight must be finite, got ", correlation_weight);
  if (sizes.algorithm == PlacementAlgorithm::kAntiCorrelation) {
    TORCH_CHECK_VALUE(correlation.has_value(), op,
                      ": algorithm 'anti_correlation' needs a correlation matrix [num_experts, "
                      "num_experts]");
  }
  if (correlation.has_value()) {
    const at::Tensor& corr = *correlation;
    TORCH_CHECK_VALUE(
        corr.dim() == 2 && corr.size(0) == sizes.num_experts && corr.size(1) == sizes.num_experts,
        op, ": correlation must have shape [", sizes.num_experts, ", ", sizes.num_experts,
        "], got ", corr.sizes());
    TORCH_CHECK_TYPE(corr.scalar_type() == at::kFloat || corr.scalar_type() == at::kDouble, op,
                     ": correlation must be float32 or float64, got ", corr.scalar_type());
    check_same_device(op, "correlation", corr, expert_load, "expert_load");
  }
  if (expert_group.has_value()) {
    const at::Tensor& group = *expert_group;
    check_tensor(op, "expert_group", group, 1, "[num_experts]", kIndex);
    TORCH_CHECK_VALUE(group.size(0) == sizes.num_experts, op, ": expert_group has ", group.size(0),
                      " entries but expert_load has ", sizes.num_experts, " experts");
    check_same_device(op, "expert_group", group, expert_load, "expert_load");
  }
  return sizes;
}

// ---- expert buffering ----

SimulationSizes check_simulate_expert_cache(MOE_INFER_PARAMS(simulate_expert_cache)) {
  constexpr const char* op = "simulate_expert_cache";
  check_tensor(op, "accesses", accesses, 1, "[num_accesses]", kIndex);
  check_tensor(op, "batch_offsets", batch_offsets, 1, "[num_batches + 1]", kInt64);
  TORCH_CHECK_VALUE(batch_offsets.size(0) >= 1, op,
                    ": batch_offsets must have num_batches + 1 >= 1 ", "entries");
  TORCH_CHECK_VALUE(
      accesses.device().is_cpu() && batch_offsets.device().is_cpu(), op,
      ": accesses and batch_offsets must be CPU tensors (the simulator runs on the host)");
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts (", num_experts, ") must be >= 1");
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts, op, ": num_experts (", num_experts, ") exceeds ",
                    kMaxExperts);
  TORCH_CHECK_VALUE(!cache_sizes.empty(), op, ": cache_sizes must not be empty");
  for (const int64_t size : cache_sizes) {
    TORCH_CHECK_VALUE(size >= 1, op, ": every cache size must be >= 1, got ", size);
  }
  TORCH_CHECK_VALUE(!policies.empty(), op, ": policies must not be empty");
  SimulationSizes sizes{accesses.size(0), batch_offsets.size(0) - 1, {}};
  for (const std::string& name : policies) sizes.policies.push_back(parse_eviction_policy(name));
  return sizes;
}

EvictionPolicy check_expert_buffer(int64_t num_experts, int64_t num_slots,
                                   const std::string& policy, const std::vector<at::Tensor>& pools,
                                   int64_t copy_threads) {
  constexpr const char* op = "ExpertBuffer";
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts (", num_experts, ") must be >= 1");
  TORCH_CHECK_VALUE(num_slots >= 1, op, ": num_slots (", num_slots, ") must be >= 1");
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts && num_slots <= kMaxExperts, op, ": num_experts (",
                    num_experts, ") and num_slots (", num_slots, ") must be <= ", kMaxExperts);
  TORCH_CHECK_VALUE(copy_threads >= 1 && copy_threads <= 64, op, ": copy_threads (", copy_threads,
                    ") must be in [1, 64]");
  const EvictionPolicy parsed = parse_eviction_policy(policy);
  TORCH_CHECK_VALUE(parsed != EvictionPolicy::kBelady, op,
                    ": policy 'belady' needs the future routing and exists only in the simulator "
                    "(moe_infer.buffer.simulate); use 'paper', 'fifo', 'lru' or 'lfu'");
  TORCH_CHECK_VALUE(!pools.empty(), op, ": pools must hold at least one tensor");
  for (size_t p = 0; p < pools.size(); ++p) {
    const at::Tensor& pool = pools[p];
    TORCH_CHECK_VALUE(pool.dim() >= 1 && pool.size(0) == num_slots, op, ": pools[", p,
                      "] must have shape [num_slots (", num_slots, "), ...], got ", pool.sizes());
    TORCH_CHECK_VALUE(pool.is_contiguous(), op, ": pools[", p, "] must be contiguous");
    TORCH_CHECK_VALUE(pool.device() == pools[0].device(), op, ": pools[", p, "] is on ",
                      pool.device(), " but pools[0] is on ", pools[0].device(),
                      "; all pools must be on one device");
    TORCH_CHECK_VALUE(pool.device().is_cpu() || pool.device().is_cuda(), op, ": pools[", p,
                      "] is on ", pool.device(), "; the buffer supports cpu and cuda");
    TORCH_CHECK_VALUE(pool.numel() > 0, op, ": pools[", p, "] is empty");
  }
  return parsed;
}

void check_buffer_segment(int64_t num_experts, const std::vector<at::Tensor>& pools, int64_t expert,
                          int64_t pool, const at::Tensor& source, int64_t source_offset,
                          int64_t dest_offset, int64_t num_bytes) {
  constexpr const char* op = "ExpertBuffer.add_segment";
  TORCH_CHECK_VALUE(expert >= 0 && expert < num_experts, op, ": expert (", expert,
                    ") must be in [0, num_experts (", num_experts, "))");
  TORCH_CHECK_VALUE(pool >= 0 && pool < static_cast<int64_t>(pools.size()), op, ": pool (", pool,
                    ") must be in [0, ", pools.size(), ")");
  TORCH_CHECK_VALUE(source.device().is_cpu(), op, ": source must be a host (CPU) tensor, got ",
                    source.device());
  TORCH_CHECK_VALUE(source.is_contiguous(), op, ": source must be contiguous");
  const int64_t source_bytes = static_cast<int64_t>(source.nbytes());
  TORCH_CHECK_VALUE(num_bytes >= 1, op, ": num_bytes (", num_bytes, ") must be >= 1");
  TORCH_CHECK_VALUE(source_offset >= 0 && source_offset + num_bytes <= source_bytes, op,
                    ": source bytes [", source_offset, ", ", source_offset + num_bytes,
                    ") fall outside the source's ", source_bytes, " bytes");
  const at::Tensor& target = pools[pool];
  const int64_t row_bytes = static_cast<int64_t>(target.nbytes()) / target.size(0);
  TORCH_CHECK_VALUE(dest_offset >= 0 && dest_offset + num_bytes <= row_bytes, op, ": slot bytes [",
                    dest_offset, ", ", dest_offset + num_bytes, ") fall outside pools[", pool,
                    "]'s slot of ", row_bytes, " bytes");
}

// ---- static gating ----

StaticGatingSizes check_static_gating(MOE_INFER_PARAMS(static_gating)) {
  constexpr const char* op = "static_gating";
  check_tensor(op, "router_logits", router_logits, 2, "[num_tokens, num_experts]", kFloating);
  StaticGatingSizes sizes{router_logits.size(0), router_logits.size(1), top_k,
                          parse_second_expert_policy(second_expert_policy)};
  TORCH_CHECK_VALUE(top_k == 1 || top_k == 2, op, ": top_k (", top_k,
                    ") must be 1 or 2 (fairseq's Top1Gate or Top2Gate)");
  TORCH_CHECK_VALUE(sizes.num_experts >= top_k, op, ": top-", top_k,
                    " gating needs num_experts >= ", top_k, ", got ", sizes.num_experts);
  TORCH_CHECK_VALUE(sizes.num_experts <= kMaxExperts, op, ": num_experts (", sizes.num_experts,
                    ") exceeds ", kMaxExperts, " (the op allocates O(num_experts) per call)");
  TORCH_CHECK_VALUE(capacity >= 1, op, ": capacity (", capacity,
                    ") must be >= 1; a capacity of 0 drops every token (raise capacity_factor or "
                    "eval_capacity_token_fraction)");
  TORCH_CHECK_VALUE(capacity <= kMaxPairs, op, ": capacity (", capacity, ") exceeds ", kMaxPairs);
  // Locations reach 2 * num_tokens (second choices follow all first choices) and are int32.
  TORCH_CHECK_VALUE(sizes.num_tokens <= kMaxPairs / 2, op, ": num_tokens (", sizes.num_tokens,
                    ") exceeds ", kMaxPairs / 2);
  if (padding_mask.has_value()) {
    check_tensor(op, "padding_mask", *padding_mask, 1, "[num_tokens]", kBool);
    TORCH_CHECK_VALUE(padding_mask->size(0) == sizes.num_tokens, op, ": padding_mask has ",
                      padding_mask->size(0), " entries but router_logits has ", sizes.num_tokens,
                      " tokens");
    check_same_device(op, "padding_mask", *padding_mask, router_logits, "router_logits");
  }
  const bool needs_noise = top_k == 2 && sizes.policy != SecondExpertPolicy::kAll;
  if (top_k == 1) {
    TORCH_CHECK_VALUE(sizes.policy == SecondExpertPolicy::kAll, op, ": second_expert_policy '",
                      second_expert_policy,
                      "' applies to top-2 gating only; use 'all' with top_k 1");
  }
  if (!needs_noise) {
    TORCH_CHECK_VALUE(
        !second_expert_noise.has_value(), op,
        ": second_expert_noise must be None unless top_k is 2 and second_expert_policy is "
        "'sampling' or 'random'");
    return sizes;
  }
  const bool sampling = sizes.policy == SecondExpertPolicy::kSampling;
  TORCH_CHECK_VALUE(
      second_expert_noise.has_value(), op, ": second_expert_policy '", second_expert_policy,
      "' needs second_expert_noise (",
      sampling ? "[num_tokens, num_experts] Gumbel samples" : "[num_tokens] U(0, 1) samples",
      "); moe_infer.ops.second_expert_noise draws it");
  const at::Tensor& noise = *second_expert_noise;
  check_dtype(op, "second_expert_noise", noise, kFloating);
  check_same_device(op, "second_expert_noise", noise, router_logits, "router_logits");
  if (sampling) {
    TORCH_CHECK_VALUE(noise.sizes() == router_logits.sizes(), op,
                      ": second_expert_noise for policy 'sampling' must have router_logits' shape ",
                      router_logits.sizes(), ", got ", noise.sizes());
  } else {
    TORCH_CHECK_VALUE(noise.dim() == 1 && noise.size(0) == sizes.num_tokens, op,
                      ": second_expert_noise for policy 'random' must have shape [",
                      sizes.num_tokens, "], got ", noise.sizes());
  }
  return sizes;
}

StaticSlotSizes check_static_routing_tensors(MOE_INFER_PARAMS(static_routing_tensors)) {
  constexpr const char* op = "static_routing_tensors";
  check_tensor(op, "expert_ids", expert_ids, 2, "[num_tokens, top_k]", kIndex);
  check_tensor(op, "locations", locations, 2, "[num_tokens, top_k]", kInt32);
  check_tensor(op, "topk_weights", topk_weights, 2, "[num_tokens, top_k]", kFloating);
  TORCH_CHECK_VALUE(
      locations.sizes() == expert_ids.sizes() && topk_weights.sizes() == expert_ids.sizes(), op,
      ": expert_ids ", expert_ids.sizes(), ", locations ", locations.sizes(), " and topk_weights ",
      topk_weights.sizes(), " must have the same shape");
  check_same_device(op, "locations", locations, expert_ids, "expert_ids");
  check_same_device(op, "topk_weights", topk_weights, expert_ids, "expert_ids");
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts (", num_experts, ") must be >= 1");
  TORCH_CHECK_VALUE(capacity >= 1, op, ": capacity (", capacity, ") must be >= 1");
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts && capacity <= kMaxPairs / num_experts, op,
                    ": num_experts * capacity (", num_experts, " * ", capacity, ") exceeds ",
                    kMaxPairs);
  TORCH_CHECK_VALUE(expert_ids.size(0) <= kMaxDenseRoutingEntries / (num_experts * capacity), op,
                    ": the dense routing tensors [num_tokens, num_experts, capacity] = [",
                    expert_ids.size(0), ", ", num_experts, ", ", capacity, "] would exceed ",
                    kMaxDenseRoutingEntries, " entries; lower the capacity");
  return StaticSlotSizes{expert_ids.size(0), num_experts, capacity, 0, expert_ids.size(1)};
}

StaticSlotSizes check_static_dispatch(MOE_INFER_PARAMS(static_dispatch)) {
  constexpr const char* op = "static_dispatch";
  check_tensor(op, "hidden", hidden, 2, "[num_tokens, hidden_size]", kFloating);
  check_tensor(op, "dispatch_mask", dispatch_mask, 3, "[num_tokens, num_experts, capacity]", kBool);
  check_same_device(op, "dispatch_mask", dispatch_mask, hidden, "hidden");
  TORCH_CHECK_VALUE(dispatch_mask.size(0) == hidden.size(0), op, ": dispatch_mask has ",
                    dispatch_mask.size(0), " tokens but hidden has ", hidden.size(0));
  // Compared without forming the product, which could overflow.
  TORCH_CHECK_VALUE(
      dispatch_mask.size(2) == 0 || dispatch_mask.size(1) <= kMaxPairs / dispatch_mask.size(2), op,
      ": num_experts * capacity (", dispatch_mask.size(1), " * ", dispatch_mask.size(2),
      ") exceeds ", kMaxPairs);
  return StaticSlotSizes{hidden.size(0), dispatch_mask.size(1), dispatch_mask.size(2),
                         hidden.size(1), 0};
}

StaticSlotSizes check_static_combine(MOE_INFER_PARAMS(static_combine)) {
  constexpr const char* op = "static_combine";
  check_tensor(op, "expert_out", expert_out, 3, "[num_experts, capacity, hidden_size]", kFloating);
  check_tensor(op, "combine_weights", combine_weights, 3, "[num_tokens, num_experts, capacity]",
               kFloating);
  check_same_device(op, "combine_weights", combine_weights, expert_out, "expert_out");
  TORCH_CHECK_VALUE(combine_weights.size(1) == expert_out.size(0) &&
                        combine_weights.size(2) == expert_out.size(1),
                    op, ": combine_weights ", combine_weights.sizes(), " and expert_out ",
                    expert_out.sizes(), " disagree on [num_experts, capacity]");
  return StaticSlotSizes{combine_weights.size(0), expert_out.size(0), expert_out.size(1),
                         expert_out.size(2), 0};
}

void fail_static_expert_id(int64_t pair, int64_t top_k, int64_t value, int64_t num_experts) {
  TORCH_CHECK_VALUE(
      false, "static_routing_tensors: expert_ids[", pair / top_k, ", ", pair % top_k, "] = ", value,
      " is out of range for a kept pair: expected 0 <= id < num_experts (", num_experts, ")");
}

void fail_slot_conflict(int64_t slot, int64_t first_token, int64_t second_token, int64_t capacity) {
  TORCH_CHECK_VALUE(false, "static_dispatch: dispatch_mask puts tokens ", first_token, " and ",
                    second_token, " in slot ", slot % capacity, " of expert ", slot / capacity,
                    "; a capacity slot holds at most one token");
}

}  // namespace moe_infer
