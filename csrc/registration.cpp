// The one schema block of the moe_infer library: every op is declared here, and only here, grouped
// by op family. Backends implement them: csrc/cpu/<family>.cpp (CPU), csrc/cuda/<family>.cu
// (CUDA), and every op's composite in csrc/common/composite.cpp (CompositeExplicitAutograd: any
// device without a kernel), all with the C++ signature written in csrc/common/signatures.h.
// csrc/README.md maps each op to its kernels, fake, autograd formula, reference, tests and
// benchmark.
#include <torch/custom_class.h>
#include <torch/library.h>

#include "buffer.h"

TORCH_LIBRARY(moe_infer, m) {
  // ---- gating (csrc/gating.h) ---------------------------------------------------------------

  // Router logits [S, E] -> (topk_weights [S, k] float32, expert_ids [S, k] int32), best first.
  m.def(
      "topk_gating(Tensor router_logits, int k, str scoring=\"softmax\", bool renormalize=False, "
      "Tensor? selection_bias=None, float scaling_factor=1.0, int n_group=1, int topk_group=1, "
      "bool validate=True) -> (Tensor topk_weights, Tensor expert_ids)");

  // ---- dispatch (csrc/dispatch.h) -----------------------------------------------------------

  // Counting sort of the S*k (token, slot) pairs by expert, stable within an expert.
  // Ids of -1 mark unrouted pairs; they are sorted after every expert (rows >= expert_offsets[E]).
  m.def(
      "dispatch_plan(Tensor expert_ids, int num_experts, bool validate=True) -> (Tensor "
      "sorted_pair_ids, Tensor row_of_pair, Tensor tokens_per_expert, Tensor expert_offsets)");

  // Gathers token rows into expert order: out[r] = hidden[sorted_pair_ids[r] // top_k].
  m.def("permute(Tensor hidden, Tensor sorted_pair_ids, int top_k) -> Tensor");

  // out[s] = sum_j topk_weights[s, j] * expert_out[row_of_pair[s * k + j]], accumulated in float32.
  m.def("unpermute_combine(Tensor expert_out, Tensor topk_weights, Tensor row_of_pair) -> Tensor");

  // ---- experts (csrc/experts.h) -------------------------------------------------------------

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

  // grouped_mlp with its input gathered and its output combined on the fly, expert by expert:
  // out[s] = sum_j topk_weights[s, j] * FFN_{expert(s, j)}(hidden[s]), without the [S*k, H] buffers
  // of permute -> grouped_mlp -> unpermute_combine. sorted_pair_ids, expert_offsets: dispatch_plan.
  m.def(
      "grouped_mlp_combine(Tensor hidden, Tensor topk_weights, Tensor sorted_pair_ids, Tensor "
      "expert_offsets, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "str activation, bool weights_transposed=False, float swiglu_alpha=1.702, float "
      "swiglu_limit=7.0) -> Tensor");

  // ---- static gating (csrc/static_gating.h) -------------------------------------------------

  // GShard / fairseq top-1 or top-2 gating with `capacity` slots per expert. Router logits [S, E]
  // -> topk_weights [S, k] float32 (0 unless kept), expert_ids [S, k] int32 (the raw choices),
  // locations [S, k] int32 (each pair's position in its expert's buffer: -1 if not routed
  // (padding, or a second expert the 'random' policy rejects), >= capacity if dropped), l_aux [].
  // Policies 'sampling' and 'random' take their noise as an input (see ops.second_expert_noise).
  m.def(
      "static_gating(Tensor router_logits, int top_k, int capacity, Tensor? padding_mask=None, "
      "str second_expert_policy=\"all\", Tensor? second_expert_noise=None, bool "
      "normalize_before_dropping=False, bool batch_prioritized_routing=False) -> (Tensor "
      "topk_weights, Tensor expert_ids, Tensor locations, Tensor l_aux)");

  // fairseq's dense routing tensors from the per-pair form: combine_weights [S, E, C] float32 and
  // dispatch_mask [S, E, C] bool (= combine_weights != 0). Pairs with location outside [0, C) or
  // weight 0 contribute nothing.
  m.def(
      "static_routing_tensors(Tensor expert_ids, Tensor locations, Tensor topk_weights, int "
      "num_experts, int capacity) -> (Tensor combine_weights, Tensor dispatch_mask)");

  // einsum("sec,sm->ecm"): hidden [S, M] into the capacity buffer [E, C, M]; empty slots
  // (placeholders) are zeros; a slot may hold at most one token.
  m.def("static_dispatch(Tensor hidden, Tensor dispatch_mask) -> Tensor");

  // einsum("sec,ecm->sm"): expert_out [E, C, M] back to tokens [S, M], accumulated in float32.
  m.def("static_combine(Tensor expert_out, Tensor combine_weights) -> Tensor");

  // ---- placement (csrc/placement.h) ---------------------------------------------------------

  // Expert load [E] -> slot_expert [num_ranks, slots_per_rank] int32: the logical expert in each
  // physical slot (-1 = empty; an expert in several slots is replicated). Algorithms: "contiguous",
  // "greedy", "anti_correlation" (needs correlation [E, E]); replicate fills spare slots with
  // replicas of hot experts; num_nodes > 1 places expert groups on nodes first, then on GPUs.
  m.def(
      "expert_placement(Tensor expert_load, int num_ranks, int slots_per_rank, str "
      "algorithm=\"greedy\", bool replicate=False, Tensor? correlation=None, float "
      "correlation_weight=0.5, int num_nodes=1, Tensor? expert_group=None) -> Tensor");

  // ---- expert buffering (csrc/buffer.h) -----------------------------------------------------

  // Replays a flattened routing trace (each batch's active experts, increasing, in `accesses`;
  // batch b is accesses[batch_offsets[b]:batch_offsets[b+1]]) against every policy and cache
  // size: int64 [num_policies, num_cache_sizes, 3] = (hits, misses, evictions). CPU only.
  m.def(
      "simulate_expert_cache(Tensor accesses, Tensor batch_offsets, int num_experts, int[] "
      "cache_sizes, str[] policies) -> Tensor");

  // One MoE layer's expert slot pool and cache (see csrc/buffer.h); owned by
  // moe_infer.buffer.ExpertBuffer.
  using moe_infer::ExpertBuffer;
  m.class_<ExpertBuffer>("ExpertBuffer")
      .def(torch::init<int64_t, int64_t, std::string, std::vector<at::Tensor>, int64_t>())
      .def("add_segment", &ExpertBuffer::add_segment)
      .def("finalize", &ExpertBuffer::finalize)
      .def("begin_batch", &ExpertBuffer::begin_batch)
      .def("next_round", &ExpertBuffer::next_round)
      .def("wait_round", &ExpertBuffer::wait_round)
      .def("end_round", &ExpertBuffer::end_round)
      .def("cancel_batch", &ExpertBuffer::cancel_batch)
      .def("round_experts", &ExpertBuffer::round_experts)
      .def("copies_done", &ExpertBuffer::copies_done)
      .def("prefetch", &ExpertBuffer::prefetch)
      .def("warm_start", &ExpertBuffer::warm_start)
      .def("clear", &ExpertBuffer::clear)
      .def("synchronize", &ExpertBuffer::synchronize)
      .def("stats", &ExpertBuffer::stats)
      .def("reset_stats", &ExpertBuffer::reset_stats)
      .def("slot_table", &ExpertBuffer::slot_table)
      .def("activation_counts", &ExpertBuffer::activation_counts)
      .def("expert_bytes", &ExpertBuffer::expert_bytes)
      .def("num_slots", &ExpertBuffer::num_slots)
      .def("num_experts", &ExpertBuffer::num_experts);
}
