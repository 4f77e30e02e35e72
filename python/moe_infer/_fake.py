"""Fake (meta) implementations of every op, so torch.compile and FakeTensor can trace them.

Each gives the op's output metadata (static shapes, the kernels' dtypes). Argument errors come from
one place, the C++ checks (csrc/common/checks.cpp, bound as ``moe_infer._C.checks``), which read
only shapes, dtypes and devices: a fake call raises the very error of an eager call. Under symbolic
shapes the C++ checks cannot read the sizes; the fakes then check only what the output shapes
depend on.
"""

import torch

from . import _C


def _concrete(*args) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return all(isinstance(size, int) for t in tensors for size in t.shape)


def _check(op: str, *args) -> None:
    """The op's C++ argument checks, whenever the sizes are concrete."""
    if _concrete(*args):
        getattr(_C.checks, op)(*args)


def _check_dims(op: str, *named) -> None:
    """What output shapes are read from, under symbolic shapes: (name, tensor, dims) triples."""
    for name, t, dim in named:
        torch._check(t.dim() == dim, lambda name=name, dim=dim: f"{op}: {name} must be {dim}-D")


@torch.library.register_fake("moe_infer::topk_gating")
def _topk_gating_fake(
    router_logits,
    k,
    scoring="softmax",
    renormalize=False,
    selection_bias=None,
    scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    validate=True,
):
    _check(
        "topk_gating",
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
    _check_dims("topk_gating", ("router_logits", router_logits, 2))
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, k), dtype=torch.int32)
    return weights, ids


@torch.library.register_fake("moe_infer::dispatch_plan")
def _dispatch_plan_fake(expert_ids, num_experts, validate=True):
    _check("dispatch_plan", expert_ids, num_experts, validate)
    num_pairs = expert_ids.numel()
    sorted_pair_ids = expert_ids.new_empty((num_pairs,), dtype=torch.int32)
    row_of_pair = expert_ids.new_empty((num_pairs,), dtype=torch.int32)
    tokens_per_expert = expert_ids.new_empty((num_experts,), dtype=torch.int32)
    expert_offsets = expert_ids.new_empty((num_experts + 1,), dtype=torch.int32)
    return sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets


@torch.library.register_fake("moe_infer::permute")
def _permute_fake(hidden, sorted_pair_ids, top_k):
    _check("permute", hidden, sorted_pair_ids, top_k)
    _check_dims("permute", ("hidden", hidden, 2))
    return hidden.new_empty((hidden.shape[0] * top_k, hidden.shape[1]))


@torch.library.register_fake("moe_infer::unpermute_combine")
def _unpermute_combine_fake(expert_out, topk_weights, row_of_pair):
    _check("unpermute_combine", expert_out, topk_weights, row_of_pair)
    _check_dims("unpermute_combine", ("expert_out", expert_out, 2), ("topk_weights", topk_weights, 2))
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))


@torch.library.register_fake("moe_infer::grouped_mlp")
def _grouped_mlp_fake(
    hidden,
    expert_offsets,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    activation,
    weights_transposed=False,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
):
    _check(
        "grouped_mlp",
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
    _check_dims("grouped_mlp", ("hidden", hidden, 2))
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moe_infer::grouped_mlp_backward")
def _grouped_mlp_backward_fake(
    grad_out,
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
):
    torch._check(grad_out.shape == hidden.shape, lambda: "grouped_mlp_backward: grad_out must match hidden")
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden),
        torch.empty_like(fc1_weight),
        torch.empty_like(fc1_bias) if fc1_bias is not None else empty,
        torch.empty_like(fc2_weight),
        torch.empty_like(fc2_bias) if fc2_bias is not None else empty,
    )


@torch.library.register_fake("moe_infer::grouped_mlp_combine")
def _grouped_mlp_combine_fake(
    hidden,
    topk_weights,
    sorted_pair_ids,
    expert_offsets,
    fc1_weight,
    fc1_bias,
    fc2_weight,
    fc2_bias,
    activation,
    weights_transposed=False,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
):
    _check(
        "grouped_mlp_combine",
        hidden,
        topk_weights,
        sorted_pair_ids,
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
    _check_dims("grouped_mlp_combine", ("hidden", hidden, 2))
    return hidden.new_empty(hidden.shape)


# ---- static gating --------------------------------------------------------------------------


@torch.library.register_fake("moe_infer::static_gating")
def _static_gating_fake(
    router_logits,
    top_k,
    capacity,
    padding_mask=None,
    second_expert_policy="all",
    second_expert_noise=None,
    normalize_before_dropping=False,
    batch_prioritized_routing=False,
):
    _check(
        "static_gating",
        router_logits,
        top_k,
        capacity,
        padding_mask,
        second_expert_policy,
        second_expert_noise,
        normalize_before_dropping,
        batch_prioritized_routing,
    )
    _check_dims("static_gating", ("router_logits", router_logits, 2))
    num_tokens = router_logits.shape[0]
    expert_ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    locations = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    topk_weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    l_aux = router_logits.new_empty((), dtype=torch.float32)
    return topk_weights, expert_ids, locations, l_aux


@torch.library.register_fake("moe_infer::static_routing_tensors")
def _static_routing_tensors_fake(expert_ids, locations, topk_weights, num_experts, capacity):
    _check("static_routing_tensors", expert_ids, locations, topk_weights, num_experts, capacity)
    _check_dims("static_routing_tensors", ("expert_ids", expert_ids, 2))
    shape = (expert_ids.shape[0], num_experts, capacity)
    return topk_weights.new_empty(shape, dtype=torch.float32), topk_weights.new_empty(shape, dtype=torch.bool)


@torch.library.register_fake("moe_infer::static_dispatch")
def _static_dispatch_fake(hidden, dispatch_mask):
    _check("static_dispatch", hidden, dispatch_mask)
    _check_dims("static_dispatch", ("hidden", hidden, 2), ("dispatch_mask", dispatch_mask, 3))
    return hidden.new_empty((dispatch_mask.shape[1], dispatch_mask.shape[2], hidden.shape[1]))


@torch.library.register_fake("moe_infer::static_combine")
def _static_combine_fake(expert_out, combine_weights):
    _check("static_combine", expert_out, combine_weights)
    _check_dims("static_combine", ("expert_out", expert_out, 3), ("combine_weights", combine_weights, 3))
    return expert_out.new_empty((combine_weights.shape[0], expert_out.shape[2]))


# ---- placement and expert buffering (host ops) --------------------------------------------------


@torch.library.register_fake("moe_infer::expert_placement")
def _expert_placement_fake(
    expert_load,
    num_ranks,
    slots_per_rank,
    algorithm="greedy",
    replicate=False,
    correlation=None,
    correlation_weight=0.5,
    num_nodes=1,
    expert_group=None,
):
    _check(
        "expert_placement",
        expert_load,
        num_ranks,
        slots_per_rank,
        algorithm,
        replicate,
        correlation,
        correlation_weight,
        num_nodes,
        expert_group,
    )
    return expert_load.new_empty((num_ranks, slots_per_rank), dtype=torch.int32)


@torch.library.register_fake("moe_infer::simulate_expert_cache")
def _simulate_expert_cache_fake(accesses, batch_offsets, num_experts, cache_sizes, policies):
    _check("simulate_expert_cache", accesses, batch_offsets, num_experts, list(cache_sizes), list(policies))
    return accesses.new_empty((len(policies), len(cache_sizes), 3), dtype=torch.int64)
