// The Python extension module moe_infer._C. Importing it runs the static op registrations of
// every backend compiled into it; it also reports how it was built.
#include <torch/extension.h>

#include "common/activation.h"
#include "common/checks.h"
#include "common/composite.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_infer C++/CUDA ops; use them through torch.ops.moe_infer or moe_infer.ops";
#ifdef MOE_INFER_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  // Each op's composite implementation (what the dispatcher runs on a device without a kernel),
  // callable directly so the tests can compare every kernel with it.
  auto composite = m.def_submodule("composite", "the ops' composite ATen implementations");
  namespace c = moe_infer::composite;
  composite.def("topk_gating", &c::topk_gating_op);
  composite.def("dispatch_plan", &c::dispatch_plan_op);
  composite.def("permute", &c::permute_op);
  composite.def("unpermute_combine", &c::unpermute_combine_op);
  composite.def("grouped_mlp", &c::grouped_mlp_op);
  composite.def("grouped_mlp_combine", &c::grouped_mlp_combine_op);
  composite.def("static_gating", &c::static_gating_op);
  composite.def("static_routing_tensors", &c::static_routing_tensors_op);
  composite.def("static_dispatch", &c::static_dispatch_op);
  composite.def("static_combine", &c::static_combine_op);

  // Each op's argument checks alone (csrc/common/checks.cpp: shapes, dtypes, devices, option
  // values; nothing that reads data), so the fake implementations raise the very same errors.
  auto checks = m.def_submodule("checks", "the ops' argument checks, without the computation");
  namespace mi = moe_infer;
  using Tensor = at::Tensor;
  using OptionalTensor = std::optional<at::Tensor>;
  checks.def("topk_gating", [](const Tensor& router_logits, int64_t k, const std::string& scoring,
                               bool, const OptionalTensor& selection_bias, double scaling_factor,
                               int64_t n_group, int64_t topk_group, bool) {
    mi::check_topk_gating(router_logits, k, scoring, selection_bias, scaling_factor, n_group,
                          topk_group);
  });
  checks.def("dispatch_plan", [](const Tensor& expert_ids, int64_t num_experts, bool) {
    mi::check_dispatch_plan(expert_ids, num_experts);
  });
  checks.def("permute", [](const Tensor& hidden, const Tensor& sorted_pair_ids, int64_t top_k) {
    mi::check_permute(hidden, sorted_pair_ids, top_k);
  });
  checks.def("unpermute_combine",
             [](const Tensor& expert_out, const Tensor& topk_weights, const Tensor& row_of_pair) {
               mi::check_unpermute_combine(expert_out, topk_weights, row_of_pair);
             });
  checks.def(
      "grouped_mlp",
      [](const Tensor& hidden, const Tensor& expert_offsets, const Tensor& fc1_weight,
         const OptionalTensor& fc1_bias, const Tensor& fc2_weight, const OptionalTensor& fc2_bias,
         const std::string& activation, bool weights_transposed, double, double) {
        mi::check_grouped_mlp(hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              activation, weights_transposed);
      });
  checks.def("grouped_mlp_combine", [](const Tensor& hidden, const Tensor& topk_weights,
                                       const Tensor& sorted_pair_ids, const Tensor& expert_offsets,
                                       const Tensor& fc1_weight, const OptionalTensor& fc1_bias,
                                       const Tensor& fc2_weight, const OptionalTensor& fc2_bias,
                                       const std::string& activation, bool weights_transposed,
                                       double, double) {
    mi::check_grouped_mlp_combine(hidden, topk_weights, sorted_pair_ids, expert_offsets, fc1_weight,
                                  fc1_bias, fc2_weight, fc2_bias, activation, weights_transposed);
  });
  checks.def("static_gating",
             [](const Tensor& router_logits, int64_t top_k, int64_t capacity,
                const OptionalTensor& padding_mask, const std::string& second_expert_policy,
                const OptionalTensor& second_expert_noise, bool, bool) {
               mi::check_static_gating(router_logits, top_k, capacity, padding_mask,
                                       second_expert_policy, second_expert_noise);
             });
  checks.def("static_routing_tensors", [](const Tensor& expert_ids, const Tensor& locations,
                                          const Tensor& topk_weights, int64_t num_experts,
                                          int64_t capacity) {
    mi::check_static_routing_tensors(expert_ids, locations, topk_weights, num_experts, capacity);
  });
  checks.def("static_dispatch", [](const Tensor& hidden, const Tensor& dispatch_mask) {
    mi::check_static_dispatch(hidden, dispatch_mask);
  });
  checks.def("static_combine", [](const Tensor& expert_out, const Tensor& combine_weights) {
    mi::check_static_combine(expert_out, combine_weights);
  });
  checks.def("expert_placement",
             [](const Tensor& expert_load, int64_t num_ranks, int64_t slots_per_rank,
                const std::string& algorithm, bool replicate, const OptionalTensor& correlation,
                double correlation_weight, int64_t num_nodes, const OptionalTensor& expert_group) {
               mi::check_expert_placement(expert_load, num_ranks, slots_per_rank, algorithm,
                                          replicate, correlation, correlation_weight, num_nodes,
                                          expert_group);
             });
  checks.def("simulate_expert_cache", [](const Tensor& accesses, const Tensor& batch_offsets,
                                         int64_t num_experts, std::vector<int64_t> cache_sizes,
                                         const std::vector<std::string>& policies) {
    mi::check_simulate_expert_cache(accesses, batch_offsets, num_experts, cache_sizes, policies);
  });
  m.def(
      "activations",
      [] {
        std::vector<std::tuple<std::string, bool, std::string, bool>> table;
        for (const moe_infer::Activation activation : moe_infer::kAllActivations) {
          table.emplace_back(moe_infer::activation_name(activation),
                             moe_infer::is_gated(activation),
                             moe_infer::activation_name(moe_infer::unary_of(activation)),
                             moe_infer::uses_swiglu_params(activation));
        }
        return table;
      },
      "The expert activation table (csrc/common/activation.h): (name, gated, unary, "
      "swiglu_params) per activation");
}
