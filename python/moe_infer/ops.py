"""Typed wrappers over ``torch.ops.moe_infer.*``.

The pipeline of one dynamic-gating MoE layer (S tokens, hidden size H, E experts, top-k):

    weights, ids = topk_gating(router_logits, k)                   # [S, k] f32, [S, k] i32
    plan = dispatch_plan(ids, E)                                    # counting sort by expert
    rows = permute(hidden, plan.sorted_pair_ids, k)                 # [S*k, H] in expert order
    out_rows = grouped_mlp(rows, plan.expert_offsets, w1, b1, w2, b2, "silu_glu")
    out = unpermute_combine(out_rows, weights, plan.row_of_pair)   # [S, H]

No capacity, no dropped tokens, no placeholder rows: every buffer has exactly S*k rows.
"""

import math
from typing import NamedTuple, Optional

import torch

from . import _C

_ops = torch.ops.moe_infer


def _run(op, *args):
    """``op.default(*args)`` (``op``: a ``torch.ops.moe_infer`` packet); with gradients off, below
    the Autograd dispatch key. On a decode step, whose code starts cold in the caches, each layer
    of Python around a call costs tens of microseconds (measured from cold caches):

    - the packet's overload resolution: about 30 us a call, so its one overload is called directly;
    - the ops' autograd formulas are Python (torch.library.register_autograd, _autograd.py), and
      their pass-through with gradients off still runs Python: about 50 us a call (topk_gating:
      188 -> 140 us). Below Autograd is where that pass-through goes, so the result is the same;
    - inference mode already excludes the Autograd keys: there the guard (about 20 us) is skipped.
    """
    overload = op.default
    # Compiling first: torch.compile cannot trace is_inference_mode_enabled.
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or torch.is_grad_enabled():
        return overload(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return overload(*args)


SCORINGS = ("softmax", "softmax_topk", "sigmoid")


class Activation(NamedTuple):
    """One row of the expert activation table (csrc/common/activation.h, read from the extension).

    name:          grouped_mlp's ``activation`` argument
    gated:         fc1 has 2 * ffn_size outputs, gate and up; the output is ``unary(gate) * up``
    unary:         the element function (on the gate when gated): "relu", "gelu", "gelu_tanh", "silu"
    swiglu_params: reads ``swiglu_alpha`` / ``swiglu_limit`` (GPT-OSS's clamped swiGLU)
    """

    name: str
    gated: bool
    unary: str
    swiglu_params: bool


ACTIVATION_TABLE = {row[0]: Activation(*row) for row in _C.activations()}
ACTIVATIONS = tuple(ACTIVATION_TABLE)


def gated_activation(unary: str) -> Optional[str]:
    """The gated activation whose gate goes through ``unary`` ("silu" -> "silu_glu"), or None."""
    return next(
        (a.name for a in ACTIVATION_TABLE.values() if a.gated and a.unary == unary and not a.swiglu_params), None
    )


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
        validate: check the logits for NaN/inf. On CUDA without a host sync: the kernel records a
            bad row and a later validating call on that device raises it (or
            :func:`check_device_errors`, which waits for the device). On the CPU the check
            always runs, and raises at once.

    Returns:
        (topk_weights [S, k] float32, expert_ids [S, k] int32), best first. The experts are exactly
        those transformers' routers pick: the scores are computed by the same ATen ops (softmax of
        the logits in float32, sigmoid, the raw logits for ``softmax_topk``) and the selection is
        torch.topk's on that device, ties included (on the CPU torch's own algorithm; on CUDA
        torch.topk itself), so bfloat16 logits, which tie often, route as in transformers.
    """
    return _run(
        _ops.topk_gating,
        router_logits,
        k,
        scoring,
        renormalize,
        selection_bias,
        scaling_factor,
        n_group,
        topk_group,
        validate,
    )


def dispatch_plan(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> DispatchPlan:
    """Stable counting sort of the S*k (token, slot) pairs by expert, O(S*k + E).

    Args:
        expert_ids: [S, k] int32/int64, each in [0, E) or -1 for "not routed" (the pair gets no
            expert and contributes zero).
        num_experts: E.
        validate: check the id range. On CUDA without a host sync: invalid ids are treated as
            unrouted, and a later validating call on that device raises the error (or
            :func:`check_device_errors`). Always on for the CPU, raising at once.
    """
    return DispatchPlan(*_run(_ops.dispatch_plan, expert_ids, num_experts, validate))


def check_device_errors(device: Optional[torch.device] = None) -> None:
    """Waits for a CUDA device and raises the first error its kernels recorded since the last check.

    The CUDA ops validate their inputs on the device (NaN/inf router logits, out-of-range expert ids,
    expert_offsets that break their contract) and never sync for it: a recorded error is raised by
    the next validating moe_infer call on that device, or by this function. No-op on the CPU.
    """
    if not hasattr(_C, "raise_device_error") or not torch.cuda.is_available():
        return
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type == "cuda":
        _C.raise_device_error(torch.cuda.current_device() if device.index is None else device.index, True)


def permute(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gathers token rows into expert order: ``out[r] = hidden[sorted_pair_ids[r] // top_k]``.

    hidden [S, H] (any float dtype, rows may be strided) -> [S*top_k, H] in hidden's dtype.
    """
    return _run(_ops.permute, hidden, sorted_pair_ids, top_k)


def unpermute_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, row_of_pair: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, back in token order.

    ``out[s] = sum_j topk_weights[s, j] * expert_out[row_of_pair[s*k + j]]``, accumulated in float32.
    expert_out [S*k, H], topk_weights [S, k] (float32 or the activations' dtype) -> [S, H] in
    expert_out's dtype.
    """
    return _run(_ops.unpermute_combine, expert_out, topk_weights, row_of_pair)


def grouped_mlp(
    hidden: torch.Tensor,
    expert_offsets: torch.Tensor,
    fc1_weight,
    fc1_bias: Optional[torch.Tensor] = None,
    fc2_weight: Optional[torch.Tensor] = None,
    fc2_bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    weights_transposed: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """The expert FFN over expert-ordered rows: one GEMM chain per non-empty expert.

    Args:
        hidden: [N, H] rows grouped by expert (the output of :func:`permute`).
        expert_offsets: [E+1] int32; expert e owns rows [offsets[e], offsets[e+1]).
        fc1_weight: an :class:`moe_infer.experts.ExpertSpec` (then nothing follows: it holds the
            weights, biases, layout and activation), or [E, F1, H] (transformers' ``gate_up_proj``), or [E, H, F1] when
            ``weights_transposed``; F1 = 2*I for gated activations, else I.
        fc1_bias: [E, F1] or None.
        fc2_weight: [E, H, I] (``down_proj``), or [E, I, H] when ``weights_transposed``.
        fc2_bias: [E, H] or None.
        activation: one of ACTIVATIONS (see :class:`Activation`). The gated ones ("silu_glu",
            "gelu_glu", "gelu_tanh_glu", "relu_glu") split fc1's output into gate (first half) and
            up (second half) and compute unary(gate) * up; "gpt_oss_swiglu" takes interleaved gate/up columns, clamps them at
            ``swiglu_limit`` and computes (up + 1) * gate * sigmoid(swiglu_alpha * gate).
    Returns:
        [N, H] in hidden's dtype; rows outside every expert (unrouted pairs) are zeros.
    """
    return _run(
        _ops.grouped_mlp,
        hidden,
        expert_offsets,
        *_expert_args(
            fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, weights_transposed, swiglu_alpha, swiglu_limit
        ),
    )


def _expert_args(fc1_weight, *rest) -> tuple:
    """The ops' trailing expert arguments, from an ExpertSpec (a tuple of exactly those) or as given
    (fc1_bias, fc2_weight, fc2_bias, activation, ...: fc2_weight and activation are required)."""
    if not isinstance(fc1_weight, torch.Tensor):
        return tuple(fc1_weight)
    if rest[1] is None or rest[3] is None:
        raise TypeError(
            "moe_infer.ops: pass the experts as an ExpertSpec, or fc1_weight with fc2_weight and activation "
            f"(missing: {', '.join(n for n, v in (('fc2_weight', rest[1]), ('activation', rest[3])) if v is None)})"
        )
    return (fc1_weight, *rest)


# ---- static gating --------------------------------------------------------------------------
#
# The capacity-based baseline, GShard / fairseq style (S tokens, E experts, capacity C):
#
#     C = static_capacity(S, E, k, capacity_factor, eval_fraction, eval_mode)
#     noise = second_expert_noise(policy, router_logits)                   # None for 'all'
#     r = static_gating(router_logits, k, C, padding_mask, policy, noise)  # per-pair routing, l_aux
#     combine, mask = static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, E, C)
#     rows = static_dispatch(hidden, mask)                                  # [E, C, H], placeholders 0
#     rows = grouped_mlp(rows.view(E * C, H), arange(E + 1) * C, ...)      # the same expert compute
#     out = static_combine(rows.view(E, C, H), combine)                    # [S, H]

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


class StaticRouting(NamedTuple):
    """The output of :func:`static_gating` (on the logits' device).

    topk_weights: [S, k] float32 combine weights, 0 for pairs that are dropped or not routed
    expert_ids:   [S, k] int32, each token's raw choices (the first is the argmax of the gates)
    locations:    [S, k] int32, each pair's position in its expert's buffer: -1 if the pair is not
                  routed (a padding token, or a second expert the 'random' policy rejected),
                  >= capacity if it is dropped
    l_aux:        [] float32, fairseq's load-balancing loss
    """

    topk_weights: torch.Tensor
    expert_ids: torch.Tensor
    locations: torch.Tensor
    l_aux: torch.Tensor


def static_capacity(
    num_tokens,
    num_experts: int,
    top_k: int = 1,
    capacity_factor: Optional[float] = 1.0,
    eval_capacity_token_fraction: float = 0.0,
    eval_mode: bool = False,
    eval_capacity_length: Optional[int] = None,
):
    """fairseq's per-expert capacity C (slots per expert).

    In eval mode with ``eval_capacity_token_fraction`` > 0 it is ``ceil(fraction * S)`` (or
    ``ceil(fraction * eval_capacity_length)``, fairseq's ``moe_eval_capacity_max_seqlen``);
    otherwise the training formula ``int(capacity_factor * top_k * ceil(S / E))``, which is
    fairseq's ``int(capacity_factor * ceil(S / E))`` for Top1Gate and ``2 * ceil(S / E)`` for
    Top2Gate (whose capacity factor is 1). S counts padding tokens, as in fairseq.

    Raises ValueError when the result would be 0 (every token dropped), and when the training
    formula is needed but ``capacity_factor`` is None (nothing to fall back on).
    """
    if num_experts < 1:
        raise ValueError(f"static_capacity: num_experts ({num_experts}) must be >= 1")
    if not isinstance(num_tokens, torch.SymInt) and num_tokens < 0:
        raise ValueError(f"static_capacity: num_tokens ({num_tokens}) must be >= 0")
    if top_k < 1:
        raise ValueError(f"static_capacity: top_k ({top_k}) must be >= 1")
    if math.isnan(eval_capacity_token_fraction):
        raise ValueError("static_capacity: eval_capacity_token_fraction is NaN")
    if not math.isfinite(eval_capacity_token_fraction):
        raise ValueError(
            f"static_capacity: eval_capacity_token_fraction ({eval_capacity_token_fraction}) must be finite"
        )
    if capacity_factor is not None and not math.isfinite(capacity_factor):
        raise ValueError(
            f"static_capacity: capacity_factor ({capacity_factor}) must be finite "
            "(for no dropping, give a capacity of at least the number of tokens)"
        )
    if eval_capacity_length is not None and eval_capacity_length < 0:
        raise ValueError(f"static_capacity: eval_capacity_length ({eval_capacity_length}) must be >= 0")
    if eval_mode and eval_capacity_token_fraction > 0.0:
        length = num_tokens if eval_capacity_length is None else eval_capacity_length
        capacity = math.ceil(eval_capacity_token_fraction * length)
        formula = f"ceil(eval_capacity_token_fraction {eval_capacity_token_fraction} * {length} tokens)"
    else:
        if capacity_factor is None:
            why = (
                f"eval_capacity_token_fraction ({eval_capacity_token_fraction}) <= 0 selects the training formula"
                if eval_mode
                else "training mode uses the training formula"
            )
            raise ValueError(
                f"static_capacity: {why}, but capacity_factor is None: there is no capacity to fall back on; "
                "give a capacity_factor or an eval_capacity_token_fraction > 0"
            )
        if not capacity_factor > 0.0:
            raise ValueError(f"static_capacity: capacity_factor ({capacity_factor}) must be > 0")
        per_expert = -(-num_tokens // num_experts)
        capacity = int(capacity_factor * top_k * per_expert)
        formula = f"int(capacity_factor {capacity_factor} * top_k {top_k} * ceil({num_tokens} tokens / {num_experts} experts))"
    if capacity < 1:
        raise ValueError(
            f"static_capacity: capacity is 0 ({formula}), so every token would be dropped; "
            "raise capacity_factor or eval_capacity_token_fraction"
        )
    return capacity


def second_expert_noise(
    second_expert_policy: str, router_logits: torch.Tensor, generator: Optional[torch.Generator] = None
) -> Optional[torch.Tensor]:
    """The random input of a top-2 policy, drawn from ``generator`` (default: the global one).

    'sampling': Gumbel(0, 1) samples [S, E] float32, drawn exactly as fairseq draws them (so the
    same seed picks the same second experts); 'random': U(0, 1) samples [S] float32; 'all': None.
    fairseq samples in eval mode too, so top-2 'sampling' inference is stochastic unless seeded.
    """
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"second_expert_noise: policy must be one of {SECOND_EXPERT_POLICIES}, got '{second_expert_policy}'"
        )
    device = router_logits.device
    if second_expert_policy == "all":
        return None
    if second_expert_policy == "random":
        return torch.rand(router_logits.shape[0], generator=generator, dtype=torch.float32, device=device)
    # torch.distributions.Gumbel(0, 1).rsample: u ~ U(tiny, 1 - eps), then -log(-log(u)).
    finfo = torch.finfo(torch.float32)
    low = torch.tensor(finfo.tiny, device=device)
    high = torch.tensor(1.0 - finfo.eps, device=device)
    u = torch.rand(router_logits.shape, generator=generator, dtype=torch.float32, device=device)
    return -torch.log(-torch.log(low + u * (high - low)))


def static_gating(
    router_logits: torch.Tensor,
    top_k: int,
    capacity: int,
    padding_mask: Optional[torch.Tensor] = None,
    second_expert_policy: str = "all",
    second_expert_noise: Optional[torch.Tensor] = None,
    normalize_before_dropping: bool = False,
    batch_prioritized_routing: bool = False,
) -> StaticRouting:
    """fairseq's Top1Gate / Top2Gate routing with ``capacity`` slots per expert, per pair.

    Args:
        router_logits: [S, E] float32/bfloat16/float16; the math is float32 (fairseq's use_fp32).
        top_k: 1 (the raw softmax probability is the weight) or 2.
        capacity: slots per expert, >= 1 (see :func:`static_capacity`). A capacity >= S drops
            nothing: that is dynamic gating's routing.
        padding_mask: [S] bool, True for padding: such tokens take no slot and get weight 0 (they
            still count in S and in l_aux's averages, as in fairseq).
        second_expert_policy: "all", "sampling" (argmax of logits + Gumbel noise) or "random" (the
            second expert is kept if 2 * its gate > U(0, 1)); top-2 only.
        second_expert_noise: the policy's noise (:func:`second_expert_noise`), None for "all".
        normalize_before_dropping: divide the two gates by their sum before dropping (else after
            dropping, fairseq's default: a token whose second expert is dropped keeps weight 1).
        batch_prioritized_routing: tokens take slots in descending order of their best gate
            (ties by position) instead of in position order.
    """
    return StaticRouting(
        *_run(
            _ops.static_gating,
            router_logits,
            top_k,
            capacity,
            padding_mask,
            second_expert_policy,
            second_expert_noise,
            normalize_before_dropping,
            batch_prioritized_routing,
        )
    )


def static_routing_tensors(
    expert_ids: torch.Tensor, locations: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's dense routing tensors: (combine_weights [S, E, C] float32, dispatch_mask [S, E, C]
    bool), with ``combine_weights[s, e, c]`` the weight of token s in slot c of expert e and
    ``dispatch_mask = combine_weights != 0``. O(S * E * C) memory: this is static gating's cost."""
    return _run(_ops.static_routing_tensors, expert_ids, locations, topk_weights, num_experts, capacity)


def static_dispatch(hidden: torch.Tensor, dispatch_mask: torch.Tensor) -> torch.Tensor:
    """einsum("sec,sm->ecm"): hidden [S, M] -> the capacity buffer [E, C, M] in hidden's dtype;
    slots no token takes (placeholders) are zeros. A slot may hold at most one token."""
    return _run(_ops.static_dispatch, hidden, dispatch_mask)


def static_combine(expert_out: torch.Tensor, combine_weights: torch.Tensor) -> torch.Tensor:
    """einsum("sec,ecm->sm"): expert_out [E, C, M] -> [S, M] in expert_out's dtype, accumulated in
    float32 over the nonzero combine weights [S, E, C]."""
    return _run(_ops.static_combine, expert_out, combine_weights)


def grouped_mlp_combine(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    plan: DispatchPlan,
    fc1_weight,
    fc1_bias: Optional[torch.Tensor] = None,
    fc2_weight: Optional[torch.Tensor] = None,
    fc2_bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    weights_transposed: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """:func:`grouped_mlp` with its input gathered and its output combined on the fly.

    ``out[s] = sum_j topk_weights[s, j] * FFN_{expert(s, j)}(hidden[s])``: the same result as
    ``unpermute_combine(grouped_mlp(permute(hidden, plan.sorted_pair_ids, k), plan.expert_offsets,
    ...), topk_weights, plan.row_of_pair)``, computed expert by expert in blocks of rows, without
    the two [S*k, H] buffers (peak memory: the [S, H] output plus a few MiB of scratch). On the CPU,
    where every expert has at most 16 rows (decode), one pass computes every expert's fc1, then the
    activation, then every fc2, each GEMM of all experts in one parallel region of moe_infer's
    weight-streaming kernels; an expert's rows come out with the same bits either way.

    Args:
        hidden: [S, H] in token order.
        topk_weights: [S, k] float32 or hidden's dtype; accumulated in float32.
        plan: the :func:`dispatch_plan` of the [S, k] expert ids (unrouted pairs contribute nothing).
        fc1_weight ... swiglu_limit: as :func:`grouped_mlp` (an ExpertSpec, or the loose arguments).
    Returns:
        [S, H] in hidden's dtype.

    The fused kernel is the CPU's; on other devices the op runs the three ops (its composite form).
    """
    return _run(
        _ops.grouped_mlp_combine,
        hidden,
        topk_weights,
        plan.sorted_pair_ids,
        plan.expert_offsets,
        *_expert_args(
            fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, weights_transposed, swiglu_alpha, swiglu_limit
        ),
    )
