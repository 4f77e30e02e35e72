"""Backward formulas for every op, so a layer called with gradients enabled returns true gradients.

Inference is the product: these favour clarity over speed (grouped_mlp's backward recomputes the
expert FFNs with plain PyTorch ops, one expert at a time).
"""

import types

import torch

from ._schema import arguments, per_argument
from .reference import expert_ffns


def _register(op: str, backward, setup_context) -> None:
    torch.library.register_autograd(f"moe_infer::{op}", backward, setup_context=setup_context)


# The expert arguments every expert op ends with (grouped_mlp's): tensors, then options.
_EXPERT_TENSORS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
_EXPERT_OPTIONS = ("activation", "weights_transposed", "swiglu_alpha", "swiglu_limit")


# ---- topk_gating ----------------------------------------------------------------------------


def _gating_setup(ctx, inputs, output):
    a = arguments("topk_gating", inputs)
    weights, ids = output
    ctx.scoring = a.scoring
    ctx.renormalize = a.renormalize
    ctx.scaling_factor = a.scaling_factor
    ctx.save_for_backward(a.router_logits, weights, ids)


def _gating_grads(grad_logits):
    # Only router_logits is differentiable.
    return per_argument("topk_gating", router_logits=grad_logits)


def _gating_backward(ctx, grad_weights, _grad_ids):
    router_logits, weights, ids = ctx.saved_tensors
    logits = router_logits.float()
    ids = ids.long()
    g = grad_weights.float() * ctx.scaling_factor
    if ctx.scoring == "softmax_topk":
        # w = softmax over the chosen logits
        w = weights.float() / ctx.scaling_factor
        grad_chosen = w * (g - (g * w).sum(-1, keepdim=True))
        return _gating_grads(torch.zeros_like(logits).scatter_add_(1, ids, grad_chosen).to(router_logits.dtype))
    scores = torch.softmax(logits, dim=-1) if ctx.scoring == "softmax" else torch.sigmoid(logits)
    chosen = scores.gather(1, ids)
    if ctx.renormalize:
        total = chosen.sum(-1, keepdim=True)
        normalized = chosen / total
        grad_chosen = (g - (g * normalized).sum(-1, keepdim=True)) / total
    else:
        grad_chosen = g
    grad_scores = torch.zeros_like(scores).scatter_add_(1, ids, grad_chosen)
    if ctx.scoring == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return _gating_grads(grad_logits.to(router_logits.dtype))


_register("topk_gating", _gating_backward, _gating_setup)

# ---- dispatch_plan: integer outputs, no gradient ---------------------------------------------

# ---- permute ----------------------------------------------------------------------------------


def _permute_setup(ctx, inputs, output):
    a = arguments("permute", inputs)
    ctx.top_k = a.top_k
    ctx.hidden_shape = a.hidden.shape
    ctx.save_for_backward(a.sorted_pair_ids)


def _permute_backward(ctx, grad_rows):
    (sorted_pair_ids,) = ctx.saved_tensors
    tokens = torch.div(sorted_pair_ids.long(), ctx.top_k, rounding_mode="floor")
    grad_hidden = grad_rows.new_zeros(ctx.hidden_shape, dtype=torch.float32)
    grad_hidden.index_add_(0, tokens, grad_rows.float())
    return per_argument("permute", hidden=grad_hidden.to(grad_rows.dtype))


_register("permute", _permute_backward, _permute_setup)

# ---- unpermute_combine ------------------------------------------------------------------------


def _combine_setup(ctx, inputs, output):
    a = arguments("unpermute_combine", inputs)
    ctx.save_for_backward(a.expert_out, a.topk_weights, a.row_of_pair)


def _combine_backward(ctx, grad_out):
    expert_out, topk_weights, row_of_pair = ctx.saved_tensors
    num_tokens, top_k = topk_weights.shape
    rows = row_of_pair.long()
    grad_expert_out = grad_weights = None
    if ctx.needs_input_grad[0]:
        per_pair = topk_weights.float().unsqueeze(-1) * grad_out.float().unsqueeze(1)
        grad_expert_out = torch.zeros(expert_out.shape, dtype=torch.float32, device=expert_out.device)
        # index_add_, not index_copy_: a row that several pairs read gets the sum of their gradients
        # (row_of_pair from dispatch_plan is a permutation, where the two agree bit for bit).
        grad_expert_out.index_add_(0, rows, per_pair.reshape(num_tokens * top_k, expert_out.shape[1]))
        grad_expert_out = grad_expert_out.to(expert_out.dtype)
    if ctx.needs_input_grad[1]:
        gathered = expert_out.float().index_select(0, rows).view(num_tokens, top_k, expert_out.shape[1])
        grad_weights = (gathered * grad_out.float().unsqueeze(1)).sum(-1).to(topk_weights.dtype)
    return per_argument("unpermute_combine", expert_out=grad_expert_out, topk_weights=grad_weights)


_register("unpermute_combine", _combine_backward, _combine_setup)

# ---- grouped_mlp ----------------------------------------------------------------------------


@torch.library.impl("moe_infer::grouped_mlp_backward", "CompositeExplicitAutograd")
def _grouped_mlp_backward_impl(grad_out, hidden, expert_offsets, *experts):
    # experts: grouped_mlp's fc1_weight ... swiglu_limit. An opaque op, so reading the offsets on
    # the host is fine here: recompute each expert's FFN with the reference's plain PyTorch ops and
    # let autograd differentiate it.
    x = hidden.detach().requires_grad_(True)
    tensors = [None if t is None else t.detach().requires_grad_(True) for t in experts[: len(_EXPERT_TENSORS)]]
    ffn = expert_ffns(*tensors, *experts[len(_EXPERT_TENSORS) :])
    leaves = [t for t in (x, *tensors) if t is not None]
    bounds = expert_offsets.tolist()
    outputs, grads_in = [], []
    with torch.enable_grad():
        for e in range(len(bounds) - 1):
            begin, end = bounds[e], bounds[e + 1]
            if end > begin:
                outputs.append(ffn(x[begin:end], e))
                grads_in.append(grad_out[begin:end])
        grads = torch.autograd.grad(outputs, leaves, grads_in, allow_unused=True) if outputs else [None] * len(leaves)
    by_leaf = {id(leaf): (torch.zeros_like(leaf) if g is None else g) for leaf, g in zip(leaves, grads)}
    empty = hidden.new_empty(0)
    return tuple(empty if t is None else by_leaf[id(t)] for t in (x, *tensors))


def _save_experts(ctx, a: types.SimpleNamespace, *tensors) -> None:
    """Saves ``tensors`` followed by the expert tensors, and the expert options, for the backward."""
    ctx.options = tuple(getattr(a, name) for name in _EXPERT_OPTIONS)
    ctx.save_for_backward(*tensors, *(getattr(a, name) for name in _EXPERT_TENSORS))


def _experts_backward(ctx, grad_rows, rows, offsets, experts) -> tuple[torch.Tensor, dict]:
    """grouped_mlp's gradients at its input rows: (grad of rows, {expert argument: its gradient}),
    None for an absent bias."""
    grad_x, *grads = torch.ops.moe_infer.grouped_mlp_backward(grad_rows, rows, offsets, *experts, *ctx.options)
    return grad_x, {
        name: None if tensor is None else grad for name, tensor, grad in zip(_EXPERT_TENSORS, experts, grads)
    }


def _mlp_setup(ctx, inputs, output):
    a = arguments("grouped_mlp", inputs)
    _save_experts(ctx, a, a.hidden, a.expert_offsets)


def _mlp_backward(ctx, grad_out):
    hidden, offsets, *experts = ctx.saved_tensors
    grad_x, grad_experts = _experts_backward(ctx, grad_out.contiguous(), hidden, offsets, experts)
    return per_argument("grouped_mlp", hidden=grad_x, **grad_experts)


_register("grouped_mlp", _mlp_backward, _mlp_setup)

# ---- static gating --------------------------------------------------------------------------


def _static_gating_setup(ctx, inputs, output):
    a = arguments("static_gating", inputs)
    _weights, expert_ids, locations, _l_aux = output
    ctx.options = (a.capacity, a.normalize_before_dropping)
    ctx.save_for_backward(a.router_logits, expert_ids, locations)


def _static_gating_backward(ctx, grad_weights, _grad_ids, _grad_locations, grad_l_aux):
    # The choices and slots are discrete: recompute the weights and l_aux from the logits with
    # plain PyTorch ops, for those choices, and let autograd differentiate them.
    router_logits, expert_ids, locations = ctx.saved_tensors
    capacity, normalize_before_dropping = ctx.options
    num_tokens, num_experts = router_logits.shape
    if num_tokens == 0:
        return per_argument("static_gating", router_logits=torch.zeros_like(router_logits))
    ids = expert_ids.long()
    routed = locations >= 0
    kept = (routed & (locations < capacity)).float()
    eps = torch.finfo(torch.float32).eps
    with torch.enable_grad():
        logits = router_logits.detach().float().requires_grad_(True)
        gates = torch.softmax(logits, dim=-1)
        chosen = gates.gather(1, ids)
        if ids.shape[1] == 1:
            weights = chosen * kept
        elif normalize_before_dropping:
            weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(eps) * kept
        else:
            kept_gates = chosen * kept
            weights = kept_gates / kept_gates.sum(-1, keepdim=True).clamp_min(eps)
        first_counts = torch.zeros(num_experts, device=logits.device).index_add_(0, ids[:, 0], routed[:, 0].float())
        l_aux = (gates.mean(0) * first_counts / num_tokens).mean() * num_experts * num_experts
        (grad,) = torch.autograd.grad([weights, l_aux], [logits], [grad_weights, grad_l_aux])
    return per_argument("static_gating", router_logits=grad.to(router_logits.dtype))


_register("static_gating", _static_gating_backward, _static_gating_setup)


def _routing_tensors_setup(ctx, inputs, output):
    a = arguments("static_routing_tensors", inputs)
    ctx.capacity = a.capacity
    ctx.weights_dtype = a.topk_weights.dtype
    ctx.save_for_backward(a.expert_ids, a.locations)


def _routing_tensors_backward(ctx, grad_combine, _grad_mask):
    expert_ids, locations = ctx.saved_tensors
    capacity = ctx.capacity
    kept = (locations >= 0) & (locations < capacity)
    slots = expert_ids.long() * capacity + locations.long().clamp(0, capacity - 1)
    slots = torch.where(kept, slots, torch.zeros_like(slots))
    grad = grad_combine.reshape(grad_combine.shape[0], -1).gather(1, slots) * kept
    return per_argument("static_routing_tensors", topk_weights=grad.to(ctx.weights_dtype))


_register("static_routing_tensors", _routing_tensors_backward, _routing_tensors_setup)


def _static_dispatch_setup(ctx, inputs, output):
    ctx.save_for_backward(arguments("static_dispatch", inputs).dispatch_mask)


def _static_dispatch_backward(ctx, grad_out):
    # The transpose of the dispatch is a combine with the mask as weights.
    (dispatch_mask,) = ctx.saved_tensors
    grad_hidden = torch.ops.moe_infer.static_combine(grad_out.contiguous(), dispatch_mask.to(torch.float32))
    return per_argument("static_dispatch", hidden=grad_hidden)


_register("static_dispatch", _static_dispatch_backward, _static_dispatch_setup)


def _static_combine_setup(ctx, inputs, output):
    a = arguments("static_combine", inputs)
    ctx.save_for_backward(a.expert_out, a.combine_weights)


def _static_combine_backward(ctx, grad_out):
    expert_out, combine_weights = ctx.saved_tensors
    num_experts, capacity, hidden_size = expert_out.shape
    weights = combine_weights.float().reshape(combine_weights.shape[0], num_experts * capacity)
    rows = expert_out.float().reshape(num_experts * capacity, hidden_size)
    grad_expert_out = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_expert_out = (weights.t() @ grad_out.float()).view_as(expert_out).to(expert_out.dtype)
    if ctx.needs_input_grad[1]:
        grad_weights = (grad_out.float() @ rows.t()).view_as(combine_weights).to(combine_weights.dtype)
    return per_argument("static_combine", expert_out=grad_expert_out, combine_weights=grad_weights)


_register("static_combine", _static_combine_backward, _static_combine_setup)
# ---- grouped_mlp_combine ----------------------------------------------------------------------


def _mlp_combine_setup(ctx, inputs, output):
    a = arguments("grouped_mlp_combine", inputs)
    _save_experts(ctx, a, a.hidden, a.topk_weights, a.sorted_pair_ids, a.expert_offsets)


def _mlp_combine_backward(ctx, grad_out):
    # The fused op is permute -> grouped_mlp -> unpermute_combine: chain their gradients, with the
    # expert rows recomputed (the forward keeps none).
    hidden, topk_weights, pair_ids, offsets, *experts = ctx.saved_tensors
    num_tokens, top_k = topk_weights.shape
    pairs = pair_ids.long()
    tokens = torch.div(pairs, top_k, rounding_mode="floor")
    rows = torch.ops.moe_infer.permute(hidden, pair_ids, top_k)
    expert_rows = torch.ops.moe_infer.grouped_mlp(rows, offsets, *experts, *ctx.options)
    grad_out = grad_out.float()
    grad_weights = None
    if ctx.needs_input_grad[1]:
        per_row = (expert_rows.float() * grad_out.index_select(0, tokens)).sum(-1)
        grad_weights = torch.zeros(num_tokens * top_k, dtype=torch.float32, device=hidden.device)
        grad_weights = grad_weights.index_add_(0, pairs, per_row).view(num_tokens, top_k).to(topk_weights.dtype)
    grad_rows = (grad_out.index_select(0, tokens) * topk_weights.float().reshape(-1)[pairs].unsqueeze(-1)).to(
        hidden.dtype
    )
    grad_x, grad_experts = _experts_backward(ctx, grad_rows, rows, offsets, experts)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_hidden.index_add_(0, tokens, grad_x.float())
    return per_argument(
        "grouped_mlp_combine", hidden=grad_hidden.to(hidden.dtype), topk_weights=grad_weights, **grad_experts
    )


_register("grouped_mlp_combine", _mlp_combine_backward, _mlp_combine_setup)
