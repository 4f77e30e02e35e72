"""Typed wrappers over ``torch.ops.moe_infer.*``.

The pipeline of one dynamic-gating MoE layer (S tokens, hidden size H, E experts, top-k):

    weights, ids = topk_gating(router_logits, k)                   # [S, k] f32, [S, k] i32
    plan = dispatch_plan(ids, E)                                    # counting sort by expert
    rows = permute(hidden, plan.sorted_pair_ids, k)                 # [S*k, H] in expert order
    out_rows = grouped_mlp(rows, plan.expert_offsets, w1, b1, w2, b2, "silu_glu")
    out = unpermute_combine(out_rows, weights, plan.row_of_pair)   # [S, H]

No capacity, no dropped tokens, no placeholder rows: every buffer has exactly S*k rows.
"""

from typing import NamedTuple, Optional

import torch

_ops = torch.ops.moe_infer

SCORINGS = ("softmax", "softmax_topk", "sigmoid")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "silu_glu", "gpt_oss_swiglu")


class DispatchPlan(NamedTuple):
    """The output of :func:`dispatch_plan` (all int32, on the ids' device).

    sorted_pair_ids:   [S*k] flat pair index ``token * k + slot`` at each expert-ordered row
    row_of_pair:       [S*k] the inverse: row of each pair in expert order
    tokens_per_expert: [E]
    expert_offsets:    [E+1] expert e owns rows [offsets[e], offsets[e+1]); rows from offsets[E]
                       on hold unrouted pairs (id -1)
    """

    sorted_pair_ids: torch.Tensor
    row_of_pair: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor


def topk_gating(
    router_logits: torch.Tensor,
    k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    selection_bias: Optional[torch.Tensor] = None,
    scaling_factor: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of each token.

    Args:
        router_logits: [S, E] float32/bfloat16/float16.
        k: experts per token, 1 <= k <= E.
        scoring: "softmax" (softmax over E, then top-k: Mixtral, Qwen, OLMoE, NLLB, Switch),
            "softmax_topk" (top-k over logits, softmax over the k: GPT-OSS) or "sigmoid"
            (DeepSeek-V3).
        renormalize: divide the k weights by their sum (Mixtral; Qwen's ``norm_topk_prob``).
        selection_bias: [E] added to the scores for choosing experts only (DeepSeek-V3's
            ``e_score_correction_bias``); weights use the unbiased scores.
        scaling_factor: multiplies the final weights (DeepSeek's ``routed_scaling_factor``).
        n_group, topk_group: group-limited routing (DeepSeek-V3): experts are split into n_group
            groups, a group scores the sum of its two best choices, and only the best topk_group
            groups are eligible.
        validate: on CUDA, check the logits for NaN/inf on the host (one device sync; skipped
            during CUDA-graph capture). On the CPU the check always runs.

    Returns:
        (topk_weights [S, k] float32, expert_ids [S, k] int32), best first; ties go to the lower id.
    """
    return _ops.topk_gating(
        router_logits, k, scoring, renormalize, selection_bias, scaling_factor, n_group, topk_group, validate
    )


def dispatch_plan(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> DispatchPlan:
    """Stable counting sort of the S*k (token, slot) pairs by expert, O(S*k + E).

    Args:
        expert_ids: [S, k] int32/int64, each in [0, E) or -1 for "not routed" (the pair gets no
            expert and contributes zero).
        num_experts: E.
        validate: on CUDA, check the id range on the host (one device sync; skipped during
            CUDA-graph capture, where invalid ids are treated as unrouted). Always on for the CPU.
    """
    return DispatchPlan(*_ops.dispatch_plan(expert_ids, num_experts, validate))


def permute(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gathers token rows into expert order: ``out[r] = hidden[sorted_pair_ids[r] // top_k]``.

    hidden [S, H] (any float dtype, rows may be strided) -> [S*top_k, H] in hidden's dtype.
    """
    return _ops.permute(hidden, sorted_pair_ids, top_k)


def unpermute_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, row_of_pair: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, back in token order.

    ``out[s] = sum_j topk_weights[s, j] * expert_out[row_of_pair[s*k + j]]``, accumulated in float32.
    expert_out [S*k, H], topk_weights [S, k] (float32 or the activations' dtype) -> [S, H] in
    expert_out's dtype.
    """
    return _ops.unpermute_combine(expert_out, topk_weights, row_of_pair)


def grouped_mlp(
    hidden: torch.Tensor,
    expert_offsets: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    activation: str,
    weights_transposed: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """The expert FFN over expert-ordered rows: one GEMM chain per non-empty expert.

    Args:
        hidden: [N, H] rows grouped by expert (the output of :func:`permute`).
        expert_offsets: [E+1] int32; expert e owns rows [offsets[e], offsets[e+1]).
        fc1_weight: [E, F1, H] (transformers' ``gate_up_proj``), or [E, H, F1] when
            ``weights_transposed``; F1 = 2*I for gated activations, else I.
        fc1_bias: [E, F1] or None.
        fc2_weight: [E, H, I] (``down_proj``), or [E, I, H] when ``weights_transposed``.
        fc2_bias: [E, H] or None.
        activation: one of ACTIVATIONS. "silu_glu" splits fc1's output into gate (first half) and
            up (second half); "gpt_oss_swiglu" takes interleaved gate/up columns, clamps them at
            ``swiglu_limit`` and computes (up + 1) * gate * sigmoid(swiglu_alpha * gate).
    Returns:
        [N, H] in hidden's dtype; rows outside every expert (unrouted pairs) are zeros.
    """
    return _ops.grouped_mlp(
        hidden,
        expert_offsets,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        activation,
        weights_transposed,
        swiglu_alpha,
        swiglu_limit,
    )


def grouped_mlp_combine(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    plan: DispatchPlan,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    activation: str,
    weights_transposed: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """:func:`grouped_mlp` with its input gathered and its output combined on the fly.

    ``out[s] = sum_j topk_weights[s, j] * FFN_{expert(s, j)}(hidden[s])``: the same result as
    ``unpermute_combine(grouped_mlp(permute(hidden, plan.sorted_pair_ids, k), plan.expert_offsets,
    ...), topk_weights, plan.row_of_pair)``, computed expert by expert in blocks of rows, without
    the two [S*k, H] buffers (peak memory: the [S, H] output plus a few MiB of scratch).

    Args:
        hidden: [S, H] in token order.
        topk_weights: [S, k] float32 or hidden's dtype; accumulated in float32.
        plan: the :func:`dispatch_plan` of the [S, k] expert ids (unrouted pairs contribute nothing).
        fc1_weight ... swiglu_limit: as :func:`grouped_mlp`.
    Returns:
        [S, H] in hidden's dtype.
    """
    return _ops.grouped_mlp_combine(
        hidden,
        topk_weights,
        plan.sorted_pair_ids,
        plan.expert_offsets,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        activation,
        weights_transposed,
        swiglu_alpha,
        swiglu_limit,
    )
