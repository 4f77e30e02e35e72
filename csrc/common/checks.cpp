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
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all arguments must be on one device");
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
              t.sizes());
}

}  // namespace

Scoring parse_scoring(const std::string& name) {
  if (name == "softmax") return Scoring::kSoftmax;
  if (name == "softmax_topk") return Scoring::kSoftmaxTopk;
  if (name == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK(false,
              "topk_gating: scoring must be one of 'softmax', 'softmax_topk', 'sigmoid', got '",
              name, "'");
}

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "silu_glu") return Activation::kSiluGlu;
  if (name == "gpt_oss_swiglu") return Activation::kGptOssSwiglu;
  TORCH_CHECK(false,
              "grouped_mlp: activation must be one of 'relu', 'gelu', 'gelu_tanh', 'silu', "
              "'silu_glu', 'gpt_oss_swiglu', got '",
              name, "'");
}

GatingSizes check_topk_gating(const at::Tensor& router_logits, int64_t top_k,
                              const std::string& scoring,
                              const std::optional<at::Tensor>& selection_bias,
                              double scaling_factor, int64_t n_group, int64_t topk_group) {
  constexpr const char* op = "topk_gating";
  check_dim(op, "router_logits", router_logits, 2, "[num_tokens, num_experts]");
  check_float(op, "router_logits", router_logits);
  GatingSizes sizes{router_logits.size(0),
                    router_logits.size(1),
                    top_k,
                    parse_scoring(scoring),
                    n_group,
                    topk_group};
  TORCH_CHECK(sizes.num_experts >= 1, op, ": router_logits must have at least one expert column");
  TORCH_CHECK(top_k >= 1, op, ": k (", top_k, ") must be >= 1");
  TORCH_CHECK(top_k <= sizes.num_experts, op, ": k (", top_k, ") must be <= num_experts (",
              sizes.num_experts, ")");
  TORCH_CHECK(sizes.num_tokens * top_k <= kMaxPairs, op, ": num_tokens * k (",
              sizes.num_tokens * top_k, ") exceeds ", kMaxPairs);
  TORCH_CHECK(std::isfinite(scaling_factor), op, ": scaling_factor must be finite, got ",
              scaling_factor);
  if (selection_bias.has_value()) {
    const at::Tensor& bias = *selection_bias;
    check_dim(op, "selection_bias", bias, 1, "[num_experts]");
    check_float(op, "selection_bias", bias);
    TORCH_CHECK(bias.size(0) == sizes.num_experts, op, ": selection_bias has ", bias.size(0),
                " entries but router_logits has ", sizes.num_experts, " experts");
    check_same_device(op, "selection_bias", bias, router_logits, "router_logits");
  }
  TORCH_CHECK(n_group >= 1, op, ": n_group (", n_group, ") must be >= 1");
  TORCH_CHECK(sizes.num_experts % n_group == 0, op, ": num_experts (", sizes.num_experts,
              ") must be divisible by n_group (", n_group, ")");
  if (n_group > 1) {
    const int64_t group_size = sizes.num_experts / n_group;
    TORCH_CHECK(group_size >= 2, op,
                ": group-limited routing needs at least 2 experts per group, got ", group_size,
                " (num_experts ", sizes.num_experts, ", n_group ", n_group, ")");
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group (", topk_group,
                ") must be in [1, n_group (", n_group, ")]");
    TORCH_CHECK(top_k <= topk_group * group_size, op, ": k (", top_k,
                ") must be <= topk_group * experts per group (", topk_group * group_size, ")");
    TORCH_CHECK(sizes.scoring != Scoring::kSoftmaxTopk, op,
                ": group-limited routing is not defined for scoring 'softmax_topk'");
  }
  return sizes;
}

PlanSizes check_dispatch_plan(const at::Tensor& expert_ids, int64_t num_experts) {
  constexpr const char* op = "dispatch_plan";
  check_dim(op, "expert_ids", expert_ids, 2, "[num_tokens, top_k]");
  TORCH_CHECK(is_index_type(expert_ids.scalar_type()), op,
              ": expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, op, ": num_experts (", num_experts, ") must be >= 1");
  TORCH_CHECK(num_experts <= kMaxPairs, op, ": num_experts (", num_experts, ") is too large");
  PlanSizes sizes{expert_ids.size(0), expert_ids.size(1), expert_ids.numel(), num_experts};
  TORCH_CHECK(sizes.top_k >= 1, op, ": expert_ids must have at least one column (top_k >= 1)");
  TORCH_CHECK(sizes.num_pairs <= kMaxPairs, op, ": num_tokens * top_k (", sizes.num_pairs,
              ") exceeds ", kMaxPairs);
  return sizes;
}

RowSizes check_permute(const at::Tensor& hidden, const at::Tensor& sorted_pair_ids, int64_t top_k) {
  constexpr const char* op = "permute";
  check_dim(op, "hidden", hidden, 2, "[num_tokens, hidden_size]");
  check_float(op, "hidden", hidden);
  check_dim(op, "sorted_pair_ids", sorted_pair_ids, 1, "[num_tokens * top_k]");
  TORCH_CHECK(sorted_pair_ids.scalar_type() == at::kInt, op,
              ": sorted_pair_ids must be int32, got ", sorted_pair_ids.scalar_type());
  check_same_device(op, "sorted_pair_ids", sorted_pair_ids, hidden, "hidden");
  TORCH_CHECK(top_k >= 1, op, ": top_k (", top_k, ") must be >= 1");
  RowSizes sizes{hidden.size(0), top_k, hidden.size(1)};
  TORCH_CHECK(sorted_pair_ids.size(0) == sizes.num_tokens * top_k, op, ": sorted_pair_ids has ",
              sorted_pair_ids.size(0), " entries, expected num_tokens * top_k = ", sizes.num_tokens,
              " * ", top_k);
  return sizes;
}

RowSizes check_unpermute_combine(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                                 const at::Tensor& row_of_pair) {
  constexpr const char* op = "unpermute_combine";
  check_dim(op, "expert_out", expert_out, 2, "[num_tokens * top_k, hidden_size]");
  check_float(op, "expert_out", expert_out);
  check_dim(op, "topk_weights", topk_weights, 2, "[num_tokens, top_k]");
  check_float(op, "topk_weights", topk_weights);
  check_dim(op, "row_of_pair", row_of_pair, 1, "[num_tokens * top_k]");
  TORCH_CHECK(row_of_pair.scalar_type() == at::kInt, op, ": row_of_pair must be int32, got ",
              row_of_pair.scalar_type());
  check_same_device(op, "topk_weights", topk_weights, expert_out, "expert_out");
  check_same_device(op, "row_of_pair", row_of_pair, expert_out, "expert_out");
  RowSizes sizes{topk_weights.size(0), topk_weights.size(1), expert_out.size(1)};
  TORCH_CHECK(sizes.top_k >= 1, op, ": topk_weights must have at least one column (top_k >= 1)");
  const int64_t num_pairs = sizes.num_tokens * sizes.top_k;
  TORCH_CHECK(expert_out.size(0) == num_pairs, op, ": expert_out has ", expert_out.size(0),
              " rows, expected num_tokens * top_k = ", num_pairs);
  TORCH_CHECK(row_of_pair.size(0) == num_pairs, op, ": row_of_pair has ", row_of_pair.size(0),
              " entries, expected num_tokens * top_k = ", num_pairs);
  return sizes;
}

MlpSizes check_grouped_mlp(const at::Tensor& hidden, const at::Tensor& expert_offsets,
                           const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                           const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                           const std::string& activation, bool weights_transposed, const char* op) {
  check_dim(op, "hidden", hidden, 2, "[num_rows, hidden_size]");
  check_float(op, "hidden", hidden);
  check_dim(op, "expert_offsets", expert_offsets, 1, "[num_experts + 1]");
  TORCH_CHECK(expert_offsets.scalar_type() == at::kInt, op, ": expert_offsets must be int32, got ",
              expert_offsets.scalar_type());
  TORCH_CHECK(expert_offsets.size(0) >= 2, op,
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
  sizes.activation = parse_activation(activation);
  sizes.fc1_outputs = fc1_weight.size(weights_transposed ? 2 : 1);
  sizes.ffn_size = fc2_weight.size(weights_transposed ? 1 : 2);
  const int64_t fc1_inputs = fc1_weight.size(weights_transposed ? 1 : 2);
  const int64_t fc2_outputs = fc2_weight.size(weights_transposed ? 2 : 1);

  TORCH_CHECK(fc1_weight.size(0) == sizes.num_experts, op, ": fc1_weight has ", fc1_weight.size(0),
              " experts but expert_offsets describes ", sizes.num_experts);
  TORCH_CHECK(fc2_weight.size(0) == sizes.num_experts, op, ": fc2_weight has ", fc2_weight.size(0),
              " experts but expert_offsets describes ", sizes.num_experts);
  TORCH_CHECK(fc1_inputs == sizes.hidden_size, op, ": fc1_weight ", fc1_weight.sizes(),
              " does not match hidden_size ", sizes.hidden_size, " (expected layout ", fc1_layout,
              ")");
  TORCH_CHECK(fc2_outputs == sizes.hidden_size, op, ": fc2_weight ", fc2_weight.sizes(),
              " does not match hidden_size ", sizes.hidden_size, " (expected layout ", fc2_layout,
              ")");
  const int64_t expected_fc1 = is_gated(sizes.activation) ? 2 * sizes.ffn_size : sizes.ffn_size;
  TORCH_CHECK(sizes.fc1_outputs == expected_fc1, op, ": fc1_weight has ", sizes.fc1_outputs,
              " outputs but activation '", activation, "' with ffn_size ", sizes.ffn_size,
              " (from fc2_weight) needs ", expected_fc1);
  TORCH_CHECK(sizes.ffn_size >= 1, op, ": ffn_size must be >= 1");
  for (const auto& [name, w] :
       {std::pair<const char*, const at::Tensor*>{"fc1_weight", &fc1_weight},
        {"fc2_weight", &fc2_weight}}) {
    TORCH_CHECK(w->scalar_type() == hidden.scalar_type(), op, ": ", name, " is ", w->scalar_type(),
                " but hidden is ", hidden.scalar_type(), "; they must match");
    check_same_device(op, name, *w, hidden, "hidden");
  }
  check_same_device(op, "expert_offsets", expert_offsets, hidden, "hidden");
  auto check_bias = [&](const char* name, const std::optional<at::Tensor>& bias, int64_t width) {
    if (!bias.has_value()) return;
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == sizes.num_experts && bias->size(1) == width,
                op, ": ", name, " must have shape [", sizes.num_experts, ", ", width, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), op, ": ", name, " is ",
                bias->scalar_type(), " but hidden is ", hidden.scalar_type(), "; they must match");
    check_same_device(op, name, *bias, hidden, "hidden");
  };
  check_bias("fc1_bias", fc1_bias, sizes.fc1_outputs);
  check_bias("fc2_bias", fc2_bias, sizes.hidden_size);
  return sizes;
}

MlpCombineSizes check_grouped_mlp_combine(const at::Tensor& hidden, const at::Tensor& topk_weights,
                                          const at::Tensor& sorted_pair_ids,
                                          const at::Tensor& expert_offsets,
                                          const at::Tensor& fc1_weight,
                                          const std::optional<at::Tensor>& fc1_bias,
                                          const at::Tensor& fc2_weight,
                                          const std::optional<at::Tensor>& fc2_bias,
                                          const std::string& activation, bool weights_transposed) {
  constexpr const char* op = "grouped_mlp_combine";
  check_dim(op, "hidden", hidden, 2, "[num_tokens, hidden_size]");
  check_dim(op, "topk_weights", topk_weights, 2, "[num_tokens, top_k]");
  check_float(op, "topk_weights", topk_weights);
  check_dim(op, "sorted_pair_ids", sorted_pair_ids, 1, "[num_tokens * top_k]");
  TORCH_CHECK(sorted_pair_ids.scalar_type() == at::kInt, op,
              ": sorted_pair_ids must be int32, got ", sorted_pair_ids.scalar_type());
  const MlpSizes mlp = check_grouped_mlp(hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight,
                                         fc2_bias, activation, weights_transposed, op);
  const int64_t top_k = topk_weights.size(1);
  TORCH_CHECK(topk_weights.size(0) == mlp.num_rows, op, ": topk_weights has ", topk_weights.size(0),
              " rows but hidden has ", mlp.num_rows, " tokens");
  TORCH_CHECK(top_k >= 1, op, ": topk_weights must have at least one column (top_k >= 1)");
  TORCH_CHECK(mlp.num_rows * top_k <= kMaxPairs, op, ": num_tokens * top_k (", mlp.num_rows * top_k,
              ") exceeds ", kMaxPairs);
  TORCH_CHECK(sorted_pair_ids.size(0) == mlp.num_rows * top_k, op, ": sorted_pair_ids has ",
              sorted_pair_ids.size(0), " entries, expected num_tokens * top_k = ", mlp.num_rows,
              " * ", top_k);
  check_same_device(op, "topk_weights", topk_weights, hidden, "hidden");
  check_same_device(op, "sorted_pair_ids", sorted_pair_ids, hidden, "hidden");
  return {mlp, top_k};
}

}  // namespace moe_infer
