// The one schema block of the moe_infer library: every op is declared here, and only here.
// Backends (csrc/cpu, csrc/cuda) register implementations with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(moe_infer, m) {
  // Router logits [S, E] -> (topk_weights [S, k] float32, expert_ids [S, k] int32), best first.
  m.def(
      "topk_gating(Tensor router_logits, int k, str scoring=\"softmax\", bool renormalize=False, "
      "Tensor? selection_bias=None, float scaling_factor=1.0, int n_group=1, int topk_group=1, "
      "bool validate=True) -> (Tensor topk_weights, Tensor expert_ids)");

  // Counting sort of the S*k (token, slot) pairs by expert, stable within an expert.
  // Ids of -1 mark unrouted pairs; they are sorted after every expert (rows >= expert_offsets[E]).
  m.def(
      "dispatch_plan(Tensor expert_ids, int num_experts, bool validate=True) -> (Tensor "
      "sorted_pair_ids, Tensor row_of_pair, Tensor tokens_per_expert, Tensor expert_offsets)");

  // Gathers token rows into expert order: out[r] = hidden[sorted_pair_ids[r] // top_k].
  m.def("permute(Tensor hidden, Tensor sorted_pair_ids, int top_k) -> Tensor");

  // out[s] = sum_j topk_weights[s, j] * expert_out[row_of_pair[s * k + j]], accumulated in float32.
  m.def("unpermute_combine(Tensor expert_out, Tensor topk_weights, Tensor row_of_pair) -> Tensor");

  // The expert FFN over expert-ordered rows; rows >= expert_offsets[E] come out as zeros.
  m.def(
      "grouped_mlp(Tensor hidden, Tensor expert_offsets, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, str activation, bool weights_transposed=False, "
      "float swiglu_alpha=1.702, float swiglu_limit=7.0) -> Tensor");

  // Gradients of grouped_mlp (used by its autograd formula). Bias gradients are empty [0] tensors
  // when the layer has no bias. Implemented for every device in python/moe_infer/_autograd.py.
  m.def(
      "grouped_mlp_backward(Tensor grad_out, Tensor hidden, Tensor expert_offsets, Tensor "
      "fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str activation, bool "
      "weights_transposed, float swiglu_alpha, float swiglu_limit) -> (Tensor grad_hidden, Tensor "
      "grad_fc1_weight, Tensor grad_fc1_bias, Tensor grad_fc2_weight, Tensor grad_fc2_bias)");

  // ---- issue 4 (transformers integration) ---------------------------------------------------
  // grouped_mlp with its input gathered and its output combined on the fly, expert by expert:
  // out[s] = sum_j topk_weights[s, j] * FFN_{expert(s, j)}(hidden[s]), without the [S*k, H] buffers
  // of permute -> grouped_mlp -> unpermute_combine. sorted_pair_ids, expert_offsets: dispatch_plan.
  m.def(
      "grouped_mlp_combine(Tensor hidden, Tensor topk_weights, Tensor sorted_pair_ids, Tensor "
      "expert_offsets, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "str activation, bool weights_transposed=False, float swiglu_alpha=1.702, float "
      "swiglu_limit=7.0) -> Tensor");
}
