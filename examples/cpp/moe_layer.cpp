// One Mixtral-style MoE layer forward through moe_infer's C++ API, checked against Python.
//
//   moe_layer CASE.pt
//
// CASE.pt is written by examples/cpp/make_case.py with torch.save: a dict of the input hidden
// [S, H], the layer's weights (router [E, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]), its
// top_k, and the output of moe_infer.MoELayer on that input in Python. Prints the largest
// difference; exits 1 when it is above 1e-5.
#include <ATen/ATen.h>
#include <moe_infer/dispatch.h>
#include <moe_infer/experts.h>
#include <moe_infer/gating.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

namespace {

// The layer: router -> top-k gating -> dispatch plan -> fused expert FFN and weighted combine.
at::Tensor moe_layer_forward(const at::Tensor& hidden, const at::Tensor& router_weight,
                             const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                             int64_t top_k) {
  const at::Tensor router_logits = at::linear(hidden, router_weight);
  const auto [topk_weights, expert_ids] =
      moe_infer::topk_gating_cpu(router_logits, top_k, "softmax", /*renormalize=*/true,
                                 /*selection_bias=*/std::nullopt, /*scaling_factor=*/1.0,
                                 /*n_group=*/1, /*topk_group=*/1, /*validate=*/true);
  const auto [sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets] =
      moe_infer::dispatch_plan_cpu(expert_ids, router_weight.size(0), /*validate=*/false);
  return moe_infer::grouped_mlp_combine_cpu(hidden, topk_weights, sorted_pair_ids, expert_offsets,
                                            gate_up_proj, std::nullopt, down_proj, std::nullopt,
                                            "silu_glu", /*weights_transposed=*/false,
                                            /*swiglu_alpha=*/1.702, /*swiglu_limit=*/7.0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " CASE.pt (written by examples/cpp/make_case.py)\n";
    return 2;
  }
  std::ifstream file(argv[1], std::ios::binary);
  if (!file) {
    std::cerr << "moe_layer: cannot open " << argv[1] << "\n";
    return 2;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  try {
    const c10::Dict<c10::IValue, c10::IValue> case_dict =
        torch::jit::pickle_load(bytes).toGenericDict();
    auto tensor = [&](const char* key) { return case_dict.at(key).toTensor(); };
    const at::Tensor hidden = tensor("hidden");
    const at::Tensor out =
        moe_layer_forward(hidden, tensor("router_weight"), tensor("gate_up_proj"),
                          tensor("down_proj"), case_dict.at("top_k").toInt());
    const double max_diff = (out - tensor("expected")).abs().max().item<double>();
    std::cout << "moe_layer: " << hidden.size(0) << " tokens x " << hidden.size(1) << " hidden, "
              << tensor("router_weight").size(0) << " experts, top-"
              << case_dict.at("top_k").toInt() << ": max |C++ - Python| = " << max_diff << "\n";
    return max_diff <= 1e-5 ? 0 : 1;
  } catch (const c10::Error& error) {
    std::cerr << "moe_layer: " << error.what_without_backtrace() << "\n";
    return 1;
  }
}
