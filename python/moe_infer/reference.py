"""Plain-PyTorch reference of the moe_infer ops and layer (a loop over experts).

It shares no code with the C++ ops. The tests use it as the independent reference and the
benchmarks as the baseline. Everything here is differentiable and runs on any device.
"""

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


def activation_fn(
    name: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """fc1 output [..., F1] -> activation output [..., I], in the input's dtype."""
    unary = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
    }
    if name in unary:
        return unary[name]
    if name.endswith("_glu") and name[: -len("_glu")] in unary:
        act = unary[name[: -len("_glu")]]

        def glu(x):
            gate, up = x.chunk(2, dim=-1)
            return act(gate) * up

        return glu
    if name == "gpt_oss_swiglu":

        def gpt_oss_swiglu(x):
            gate, up = x[..., ::2], x[..., 1::2]
            gate = gate.clamp(max=swiglu_limit)
            up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
            return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))

        return gpt_oss_swiglu
    raise ValueError(f"unknown activation '{name}'")


def topk_gating(
    router_logits: torch.Tensor,
    k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    selection_bias: Optional[torch.Tensor] = None,
    scaling_factor: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [S, k] float32, ids [S, k] int64), best first, as the HF routers compute them."""
    logits = router_logits.float()
    if scoring == "softmax_topk":
        top_logits, ids = torch.topk(logits, k, dim=-1)
        return torch.softmax(top_logits, dim=-1) * scaling_factor, ids
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if selection_bias is None else scores + selection_bias.float()
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        group_scores = choice.view(num_tokens, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_tokens, n_group, num_experts // n_group)
            .reshape(num_tokens, num_experts)
        )
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:  # a row whose k weights sum to 0 (sigmoid of -inf logits) keeps them 0
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return weights * scaling_factor, ids


def dispatch_plan(expert_ids: torch.Tensor, num_experts: int):
    """(sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets), int64, by a stable argsort."""
    flat = expert_ids.reshape(-1).long()
    bucket = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    sorted_pair_ids = torch.sort(bucket, stable=True).indices
    row_of_pair = torch.empty_like(sorted_pair_ids)
    row_of_pair[sorted_pair_ids] = torch.arange(flat.numel(), device=flat.device)
    tokens_per_expert = torch.bincount(bucket, minlength=num_experts + 1)[:num_experts]
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    expert_offsets[1:] = torch.cumsum(tokens_per_expert, 0)
    return sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets


def permute(hidden: torch.Tensor, sorted_pair_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    return hidden[sorted_pair_ids.long() // top_k]


def unpermute_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, row_of_pair: torch.Tensor) -> torch.Tensor:
    num_tokens, top_k = topk_weights.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    rows = expert_out.to(acc)[row_of_pair.long()].view(num_tokens, top_k, expert_out.shape[1])
    return (rows * topk_weights.to(acc).unsqueeze(-1)).sum(1).to(expert_out.dtype)


def expert_ffns(
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    activation,
    weights_transposed=False,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
) -> Callable[..., torch.Tensor]:
    """grouped_mlp's expert arguments -> ``ffn(x [n, H], e) -> [n, H]``, expert e's FFN on rows x.

    The weights are stacked ([E, ...], as grouped_mlp takes them) or one expert's 2-D weights,
    then with ``e=None``.
    """
    act = activation_fn(activation, swiglu_alpha, swiglu_limit)

    def ffn(x, e=None):
        w1, b1, w2, b2 = (t if e is None or t is None else t[e] for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
        h = x @ (w1 if weights_transposed else w1.t())
        if b1 is not None:
            h = h + b1
        y = act(h) @ (w2 if weights_transposed else w2.t())
        if b2 is not None:
            y = y + b2
        return y

    return ffn


def expert_ffn(x, *expert, **options):
    """One expert's FFN on rows x [n, H]; ``expert``: its (2-D) weights and options, as :func:`expert_ffns`."""
    return expert_ffns(*expert, **options)(x)


def grouped_mlp(hidden, expert_offsets, *experts, **options):
    """Rows grouped by expert -> each expert's FFN of its rows; ``experts``: as :func:`expert_ffns`."""
    ffn = expert_ffns(*experts, **options)
    out = torch.zeros_like(hidden)
    bounds = expert_offsets.tolist()
    for e in range(len(bounds) - 1):
        begin, end = bounds[e], bounds[e + 1]
        if end > begin:
            out[begin:end] = ffn(hidden[begin:end], e)
    return out


def grouped_mlp_combine(hidden, topk_weights, expert_ids, *experts, **options):
    """out[s] = sum_j topk_weights[s, j] * FFN_{expert_ids[s, j]}(hidden[s]) (id -1: nothing), in float32;
    ``experts``: as :func:`expert_ffns`."""
    ffn = expert_ffns(*experts, **options)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in expert_ids[expert_ids >= 0].unique().tolist():
        token_idx, slot_idx = torch.where(expert_ids == e)
        y = ffn(hidden[token_idx], e)
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot_idx].float().unsqueeze(-1))
    return out.to(hidden.dtype)


def moe_forward(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    experts: Sequence,
    top_k: int,
    router_bias: Optional[torch.Tensor] = None,
    router_logits: Optional[torch.Tensor] = None,
    **routing,
) -> torch.Tensor:
    """A whole MoE layer as transformers' eager experts compute it: route, then loop over experts.

    hidden [..., H] -> [..., H]; outputs are accumulated in float32 and cast to hidden's dtype.
    ``experts``: grouped_mlp's expert arguments (:func:`expert_ffns`); ``routing``: the options of
    :func:`topk_gating`. ``router_logits`` [S, E], if given, replaces the router (to route exactly
    as another run did).
    """
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    logits = F.linear(x, router_weight, router_bias) if router_logits is None else router_logits
    weights, ids = topk_gating(logits, top_k, **routing)
    return grouped_mlp_combine(x, weights, ids, *experts).reshape(shape)


def layer_forward(
    layer,
    hidden: torch.Tensor,
    compute_dtype: Optional[torch.dtype] = None,
    router_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Runs the reference on a :class:`moe_infer.MoELayer`'s own parameters and options.

    With ``compute_dtype``, the inputs and parameters are cast to it first (e.g. float64 for a
    high-precision reference of a bf16 layer); the result is in ``compute_dtype``.
    """

    def cast(t):
        return t if t is None or compute_dtype is None else t.to(compute_dtype)

    experts = layer.experts
    return moe_forward(
        cast(hidden),
        cast(layer.gate.weight),
        (
            cast(experts.gate_up_proj),
            cast(experts.gate_up_proj_bias),
            cast(experts.down_proj),
            cast(experts.down_proj_bias),
            layer.activation,
            experts.weights_transposed,
            layer.swiglu_alpha,
            layer.swiglu_limit,
        ),
        layer.top_k,
        router_bias=cast(layer.gate.bias),
        router_logits=cast(router_logits),
        scoring=layer.scoring,
        renormalize=layer.renormalize,
        selection_bias=layer.selection_bias,
        scaling_factor=layer.scaling_factor,
        n_group=layer.n_group,
        topk_group=layer.topk_group,
    )


# ---- fairseq static gating --------------------------------------------------------------------
# An independent re-implementation of fairseq's GShard gates (fairseq/modules/moe/top1gate.py,
# top2gate.py) and of MOELayer's einsum dispatch and combine, with plain PyTorch ops on dense
# [S, E, C] tensors: the reference the static ops are tested against, and the "fairseq" column of
# bench/static_vs_dynamic.py.


def fairseq_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float = 1.0,
    eval_mode: bool = False,
    eval_capacity_token_fraction: float = 0.25,
) -> int:
    """fairseq's capacity: ceil(fraction * S) in eval mode when fraction > 0, else the training
    formula, int(capacity_factor * ceil(S / E)) for top-1 and 2 * ceil(S / E) for top-2."""
    if eval_mode and eval_capacity_token_fraction > 0.0:
        return math.ceil(eval_capacity_token_fraction * num_tokens)
    if top_k == 1:
        return int(capacity_factor * math.ceil(num_tokens / num_experts))
    return 2 * math.ceil(num_tokens / num_experts)


def fairseq_gumbel_noise(shape) -> torch.Tensor:
    """Gumbel(0, 1) samples drawn from the global generator exactly as fairseq draws them."""
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def _fairseq_one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = torch.zeros(index.shape + (num_classes,), dtype=torch.long, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1).long(), 1)


def _fairseq_sec(gate_s, mask_se, location_s, capacity):
    """einsum("s,se,sc->sec"): a token's gate at (its expert, its slot)."""
    weighted = gate_s.unsqueeze(-1) * mask_se.to(gate_s.dtype)
    return weighted.unsqueeze(-1) * _fairseq_one_hot(location_s, capacity).to(gate_s.dtype).unsqueeze(1)


def _fairseq_l_aux(gates, mask1):
    num_experts = gates.shape[1]
    return (gates.mean(0) * mask1.to(gates.dtype).mean(0)).mean() * num_experts * num_experts


def fairseq_top1gating(
    logits: torch.Tensor,
    input_mask: Optional[torch.Tensor] = None,
    capacity_factor: float = 1.0,
    eval_mode: bool = False,
    eval_capacity_token_fraction: float = 0.25,
):
    """fairseq's top1gating on router logits [S, E] (in float32) ->
    (l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C] bool, capacity)."""
    gates = torch.softmax(logits.float(), dim=1)
    num_tokens, num_experts = gates.shape
    capacity = fairseq_capacity(num_tokens, num_experts, 1, capacity_factor, eval_mode, eval_capacity_token_fraction)
    mask1 = _fairseq_one_hot(gates.argmax(dim=1), num_experts)
    if input_mask is not None:
        mask1 = mask1 * (~input_mask).unsqueeze(-1).long()
    gates1 = (gates * mask1).sum(dim=1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    l_aux = _fairseq_l_aux(gates, mask1)
    mask1 = mask1 * (locations1 < capacity).long()
    combine = _fairseq_sec(gates1, mask1, (locations1 * mask1).sum(dim=1), capacity)
    return l_aux, combine, combine.bool(), capacity


def fairseq_top2gating(
    logits: torch.Tensor,
    input_mask: Optional[torch.Tensor] = None,
    second_expert_policy: str = "sampling",
    normalize_gate_prob_before_dropping: bool = False,
    eval_mode: bool = False,
    eval_capacity_token_fraction: float = 0.25,
    batch_prioritized_routing: bool = False,
    second_expert_noise: Optional[torch.Tensor] = None,
):
    """fairseq's top2gating on router logits [S, E] (in float32) ->
    (l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C] bool, capacity).

    The 'sampling' policy's Gumbel noise [S, E] and the 'random' policy's uniforms [S] are drawn
    from the global generator as fairseq draws them, unless given as ``second_expert_noise``.
    """
    logits = logits.float()
    gates = torch.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    capacity = fairseq_capacity(num_tokens, num_experts, 2, 1.0, eval_mode, eval_capacity_token_fraction)
    mask1 = _fairseq_one_hot(gates.argmax(dim=1), num_experts)
    noisy = logits
    if second_expert_policy == "sampling":
        noise = fairseq_gumbel_noise(logits.shape) if second_expert_noise is None else second_expert_noise
        noisy = logits + noise.to(logits.device)
    mask2 = _fairseq_one_hot(noisy.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1), num_experts)
    gates1 = (gates * mask1).sum(dim=1)
    gates2 = (gates * mask2).sum(dim=1)
    eps = torch.finfo(gates.dtype).eps
    if normalize_gate_prob_before_dropping:
        denom = (gates1 + gates2).clamp(min=eps)
        gates1, gates2 = gates1 / denom, gates2 / denom
    if second_expert_policy == "random":
        uniform = torch.rand_like(gates2) if second_expert_noise is None else second_expert_noise.to(gates2)
        mask2 = mask2 * (2 * gates2 > uniform).long().unsqueeze(-1)
    if input_mask is not None:
        keep = (~input_mask).unsqueeze(-1).long()
        mask1, mask2 = mask1 * keep, mask2 * keep
    if batch_prioritized_routing:
        order = torch.sort(-gates.max(dim=1).values, stable=True).indices
        inverse = torch.argsort(order)
        locations1 = (torch.cumsum(mask1[order], dim=0) - 1)[inverse]
        locations2 = (torch.cumsum(mask2[order], dim=0) - 1)[inverse]
    else:
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 = locations2 + mask1.sum(dim=0, keepdim=True)
    l_aux = _fairseq_l_aux(gates, mask1)
    mask1 = mask1 * (locations1 < capacity).long()
    mask2 = mask2 * (locations2 < capacity).long()
    if not normalize_gate_prob_before_dropping:
        gates1 = (gates * mask1).sum(dim=1)
        gates2 = (gates * mask2).sum(dim=1)
        denom = (gates1 + gates2).clamp(min=eps)
        gates1, gates2 = gates1 / denom, gates2 / denom
    combine = _fairseq_sec(gates1, mask1, (locations1 * mask1).sum(dim=1), capacity) + _fairseq_sec(
        gates2, mask2, (locations2 * mask2).sum(dim=1), capacity
    )
    return l_aux, combine, combine.bool(), capacity


def fairseq_moe_forward(
    hidden: torch.Tensor,
    combine_weights: torch.Tensor,
    dispatch_mask: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    activation: str = "relu",
) -> torch.Tensor:
    """fairseq MOELayer's compute for one process: einsum("sec,sm->ecm") dispatch with a dense
    matrix product, every expert's FFN over its whole [C, M] buffer (placeholders included), and
    einsum("sec,ecm->sm") combine. hidden [S, M] -> [S, M]."""
    num_tokens, num_experts, capacity = dispatch_mask.shape
    mask = dispatch_mask.to(hidden.dtype).permute(1, 2, 0).reshape(num_experts * capacity, num_tokens)
    dispatched = (mask @ hidden).view(num_experts, capacity, -1)
    ffn = expert_ffns(fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
    expert_out = torch.stack([ffn(dispatched[e], e) for e in range(num_experts)])
    combine = combine_weights.to(hidden.dtype).reshape(num_tokens, num_experts * capacity)
    return combine @ expert_out.reshape(num_experts * capacity, -1)
