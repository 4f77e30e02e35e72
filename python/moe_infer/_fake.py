"""Fake (meta) implementations of every op, so torch.compile and FakeTensor can trace them.

They mirror the shape and dtype checks of csrc/common/checks.cpp with torch._check, and give the
same static output shapes as the C++ kernels.
"""

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_GATED = ("silu_glu", "gpt_oss_swiglu")


def _check_devices(op, **tensors):
    """All tensor arguments on one device. The C++ checks say this too, but an argument on the meta
    device routes the whole call here (Meta outranks every backend), so it is checked here as well:
    otherwise a meta tensor next to real ones would return uninitialised real memory."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    ref_name, ref = present[0]
    for name, t in present[1:]:
        torch._check(
            t.device == ref.device,
            lambda name=name, t=t: (
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all arguments must be on one device"
            ),
        )


def _check_float(op, name, t):
    torch._check(t.dtype in _FLOATS, lambda: f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


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
    op = "topk_gating"
    _check_devices(op, router_logits=router_logits, selection_bias=selection_bias)
    torch._check(router_logits.dim() == 2, lambda: f"{op}: router_logits must be 2-D [num_tokens, num_experts]")
    _check_float(op, "router_logits", router_logits)
    num_experts = router_logits.shape[1]
    torch._check(k >= 1, lambda: f"{op}: k ({k}) must be >= 1")
    torch._check(k <= num_experts, lambda: f"{op}: k ({k}) must be <= num_experts ({num_experts})")
    torch._check(scoring in ("softmax", "softmax_topk", "sigmoid"), lambda: f"{op}: unknown scoring '{scoring}'")
    torch._check(n_group >= 1 and num_experts % n_group == 0, lambda: f"{op}: bad n_group ({n_group})")
    if selection_bias is not None:
        torch._check(selection_bias.shape == (num_experts,), lambda: f"{op}: selection_bias must be [num_experts]")
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, k), dtype=torch.int32)
    return weights, ids


@torch.library.register_fake("moe_infer::dispatch_plan")
def _dispatch_plan_fake(expert_ids, num_experts, validate=True):
    op = "dispatch_plan"
    torch._check(expert_ids.dim() == 2, lambda: f"{op}: expert_ids must be 2-D [num_tokens, top_k]")
    torch._check(expert_ids.dtype in (torch.int32, torch.int64), lambda: f"{op}: expert_ids must be int32 or int64")
    torch._check(num_experts >= 1, lambda: f"{op}: num_experts ({num_experts}) must be >= 1")
    num_pairs = expert_ids.numel()
    sorted_pair_ids = expert_ids.new_empty((num_pairs,), dtype=torch.int32)
    row_of_pair = expert_ids.new_empty((num_pairs,), dtype=torch.int32)
    tokens_per_expert = expert_ids.new_empty((num_experts,), dtype=torch.int32)
    expert_offsets = expert_ids.new_empty((num_experts + 1,), dtype=torch.int32)
    return sorted_pair_ids, row_of_pair, tokens_per_expert, expert_offsets


@torch.library.register_fake("moe_infer::permute")
def _permute_fake(hidden, sorted_pair_ids, top_k):
    op = "permute"
    _check_devices(op, hidden=hidden, sorted_pair_ids=sorted_pair_ids)
    torch._check(hidden.dim() == 2, lambda: f"{op}: hidden must be 2-D [num_tokens, hidden_size]")
    _check_float(op, "hidden", hidden)
    torch._check(sorted_pair_ids.dtype == torch.int32, lambda: f"{op}: sorted_pair_ids must be int32")
    torch._check(top_k >= 1, lambda: f"{op}: top_k ({top_k}) must be >= 1")
    num_rows = hidden.shape[0] * top_k
    torch._check(
        sorted_pair_ids.shape == (num_rows,), lambda: f"{op}: sorted_pair_ids must have num_tokens * top_k entries"
    )
    return hidden.new_empty((num_rows, hidden.shape[1]))


@torch.library.register_fake("moe_infer::unpermute_combine")
def _unpermute_combine_fake(expert_out, topk_weights, row_of_pair):
    op = "unpermute_combine"
    _check_devices(op, expert_out=expert_out, topk_weights=topk_weights, row_of_pair=row_of_pair)
    torch._check(expert_out.dim() == 2, lambda: f"{op}: expert_out must be 2-D")
    torch._check(topk_weights.dim() == 2, lambda: f"{op}: topk_weights must be 2-D [num_tokens, top_k]")
    _check_float(op, "expert_out", expert_out)
    _check_float(op, "topk_weights", topk_weights)
    torch._check(row_of_pair.dtype == torch.int32, lambda: f"{op}: row_of_pair must be int32")
    num_tokens, top_k = topk_weights.shape
    torch._check(
        expert_out.shape[0] == num_tokens * top_k, lambda: f"{op}: expert_out must have num_tokens * top_k rows"
    )
    torch._check(
        row_of_pair.shape == (num_tokens * top_k,), lambda: f"{op}: row_of_pair must have num_tokens * top_k entries"
    )
    return expert_out.new_empty((num_tokens, expert_out.shape[1]))


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
    op = "grouped_mlp"
    _check_devices(
        op,
        hidden=hidden,
        expert_offsets=expert_offsets,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    torch._check(hidden.dim() == 2, lambda: f"{op}: hidden must be 2-D [num_rows, hidden_size]")
    _check_float(op, "hidden", hidden)
    torch._check(expert_offsets.dtype == torch.int32, lambda: f"{op}: expert_offsets must be int32")
    torch._check(fc1_weight.dim() == 3 and fc2_weight.dim() == 3, lambda: f"{op}: weights must be 3-D")
    num_experts = expert_offsets.shape[0] - 1
    torch._check(fc1_weight.shape[0] == num_experts, lambda: f"{op}: fc1_weight expert count mismatch")
    torch._check(fc2_weight.shape[0] == num_experts, lambda: f"{op}: fc2_weight expert count mismatch")
    hidden_size = hidden.shape[1]
    fc1_in = fc1_weight.shape[1] if weights_transposed else fc1_weight.shape[2]
    fc2_out = fc2_weight.shape[2] if weights_transposed else fc2_weight.shape[1]
    torch._check(fc1_in == hidden_size, lambda: f"{op}: fc1_weight does not match hidden_size")
    torch._check(fc2_out == hidden_size, lambda: f"{op}: fc2_weight does not match hidden_size")
    ffn = fc2_weight.shape[1] if weights_transposed else fc2_weight.shape[2]
    fc1_out = fc1_weight.shape[2] if weights_transposed else fc1_weight.shape[1]
    torch._check(fc1_out == (2 * ffn if activation in _GATED else ffn), lambda: f"{op}: fc1/fc2 widths disagree")
    torch._check(
        fc1_weight.dtype == hidden.dtype and fc2_weight.dtype == hidden.dtype,
        lambda: f"{op}: weight dtype must match hidden",
    )
    return hidden.new_empty((hidden.shape[0], hidden_size))


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
    _check_devices(
        "grouped_mlp_backward",
        grad_out=grad_out,
        hidden=hidden,
        expert_offsets=expert_offsets,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    torch._check(grad_out.shape == hidden.shape, lambda: "grouped_mlp_backward: grad_out must match hidden")
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden),
        torch.empty_like(fc1_weight),
        torch.empty_like(fc1_bias) if fc1_bias is not None else empty,
        torch.empty_like(fc2_weight),
        torch.empty_like(fc2_bias) if fc2_bias is not None else empty,
    )


# ---- placement (issue 6) ----


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
    op = "expert_placement"
    _check_devices(op, expert_load=expert_load, correlation=correlation, expert_group=expert_group)
    torch._check(expert_load.dim() == 1, lambda: f"{op}: expert_load must be 1-D [num_experts]")
    torch._check(
        expert_load.dtype in (torch.float32, torch.float64), lambda: f"{op}: expert_load must be float32 or float64"
    )
    num_experts = expert_load.shape[0]
    torch._check(num_ranks >= 1 and slots_per_rank >= 1, lambda: f"{op}: num_ranks and slots_per_rank must be >= 1")
    torch._check(
        num_experts <= num_ranks * slots_per_rank,
        lambda: f"{op}: {num_experts} experts do not fit on {num_ranks} ranks x {slots_per_rank} slots per rank",
    )
    torch._check(
        algorithm in ("contiguous", "greedy", "anti_correlation"), lambda: f"{op}: unknown algorithm '{algorithm}'"
    )
    torch._check(num_nodes >= 1 and num_ranks % num_nodes == 0, lambda: f"{op}: num_nodes must divide num_ranks")
    if algorithm == "anti_correlation":
        torch._check(correlation is not None, lambda: f"{op}: 'anti_correlation' needs a correlation matrix")
    return expert_load.new_empty((num_ranks, slots_per_rank), dtype=torch.int32)


# ---- expert buffering (issue 5) ----


@torch.library.register_fake("moe_infer::simulate_expert_cache")
def _simulate_expert_cache_fake(accesses, batch_offsets, num_experts, cache_sizes, policies):
    op = "simulate_expert_cache"
    _check_devices(op, accesses=accesses, batch_offsets=batch_offsets)
    torch._check(accesses.dim() == 1, lambda: f"{op}: accesses must be 1-D [num_accesses]")
    torch._check(accesses.dtype in (torch.int32, torch.int64), lambda: f"{op}: accesses must be int32 or int64")
    torch._check(batch_offsets.dim() == 1, lambda: f"{op}: batch_offsets must be 1-D [num_batches + 1]")
    torch._check(batch_offsets.dtype == torch.int64, lambda: f"{op}: batch_offsets must be int64")
    torch._check(num_experts >= 1, lambda: f"{op}: num_experts ({num_experts}) must be >= 1")
    torch._check(len(cache_sizes) >= 1 and min(cache_sizes) >= 1, lambda: f"{op}: every cache size must be >= 1")
    torch._check(len(policies) >= 1, lambda: f"{op}: policies must not be empty")
    return accesses.new_empty((len(policies), len(cache_sizes), 3), dtype=torch.int64)


# ---- static gating (issue 3) ----------------------------------------------------------------


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
    op = "static_gating"
    _check_devices(op, router_logits=router_logits, padding_mask=padding_mask, second_expert_noise=second_expert_noise)
    torch._check(router_logits.dim() == 2, lambda: f"{op}: router_logits must be 2-D [num_tokens, num_experts]")
    _check_float(op, "router_logits", router_logits)
    torch._check(top_k in (1, 2), lambda: f"{op}: top_k ({top_k}) must be 1 or 2")
    torch._check(router_logits.shape[1] >= top_k, lambda: f"{op}: top-{top_k} gating needs num_experts >= {top_k}")
    torch._check(capacity >= 1, lambda: f"{op}: capacity ({capacity}) must be >= 1")
    torch._check(
        second_expert_policy in ("all", "sampling", "random"), lambda: f"{op}: unknown policy '{second_expert_policy}'"
    )
    if padding_mask is not None:
        torch._check(padding_mask.dtype == torch.bool, lambda: f"{op}: padding_mask must be bool")
        torch._check(
            padding_mask.shape == (router_logits.shape[0],), lambda: f"{op}: padding_mask must be [num_tokens]"
        )
    num_tokens = router_logits.shape[0]
    expert_ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    locations = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    topk_weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    l_aux = router_logits.new_empty((), dtype=torch.float32)
    return topk_weights, expert_ids, locations, l_aux


@torch.library.register_fake("moe_infer::static_routing_tensors")
def _static_routing_tensors_fake(expert_ids, locations, topk_weights, num_experts, capacity):
    op = "static_routing_tensors"
    _check_devices(op, expert_ids=expert_ids, locations=locations, topk_weights=topk_weights)
    torch._check(expert_ids.dim() == 2, lambda: f"{op}: expert_ids must be 2-D [num_tokens, top_k]")
    torch._check(expert_ids.dtype in (torch.int32, torch.int64), lambda: f"{op}: expert_ids must be int32 or int64")
    torch._check(locations.dtype == torch.int32, lambda: f"{op}: locations must be int32")
    _check_float(op, "topk_weights", topk_weights)
    torch._check(
        locations.shape == expert_ids.shape and topk_weights.shape == expert_ids.shape,
        lambda: f"{op}: expert_ids, locations and topk_weights must have the same shape",
    )
    torch._check(num_experts >= 1, lambda: f"{op}: num_experts ({num_experts}) must be >= 1")
    torch._check(capacity >= 1, lambda: f"{op}: capacity ({capacity}) must be >= 1")
    shape = (expert_ids.shape[0], num_experts, capacity)
    return topk_weights.new_empty(shape, dtype=torch.float32), topk_weights.new_empty(shape, dtype=torch.bool)


@torch.library.register_fake("moe_infer::static_dispatch")
def _static_dispatch_fake(hidden, dispatch_mask):
    op = "static_dispatch"
    _check_devices(op, hidden=hidden, dispatch_mask=dispatch_mask)
    torch._check(hidden.dim() == 2, lambda: f"{op}: hidden must be 2-D [num_tokens, hidden_size]")
    _check_float(op, "hidden", hidden)
    torch._check(
        dispatch_mask.dim() == 3, lambda: f"{op}: dispatch_mask must be 3-D [num_tokens, num_experts, capacity]"
    )
    torch._check(dispatch_mask.dtype == torch.bool, lambda: f"{op}: dispatch_mask must be bool")
    torch._check(
        dispatch_mask.shape[0] == hidden.shape[0], lambda: f"{op}: dispatch_mask and hidden disagree on num_tokens"
    )
    return hidden.new_empty((dispatch_mask.shape[1], dispatch_mask.shape[2], hidden.shape[1]))


@torch.library.register_fake("moe_infer::static_combine")
def _static_combine_fake(expert_out, combine_weights):
    op = "static_combine"
    _check_devices(op, expert_out=expert_out, combine_weights=combine_weights)
    torch._check(expert_out.dim() == 3, lambda: f"{op}: expert_out must be 3-D [num_experts, capacity, hidden_size]")
    torch._check(combine_weights.dim() == 3, lambda: f"{op}: combine_weights must be 3-D")
    _check_float(op, "expert_out", expert_out)
    _check_float(op, "combine_weights", combine_weights)
    torch._check(
        combine_weights.shape[1] == expert_out.shape[0] and combine_weights.shape[2] == expert_out.shape[1],
        lambda: f"{op}: combine_weights and expert_out disagree on [num_experts, capacity]",
    )
    return expert_out.new_empty((combine_weights.shape[0], expert_out.shape[2]))


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
    op = "grouped_mlp_combine"
    _check_devices(op, hidden=hidden, topk_weights=topk_weights, sorted_pair_ids=sorted_pair_ids)
    _grouped_mlp_fake(
        hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, weights_transposed
    )
    torch._check(topk_weights.dim() == 2, lambda: f"{op}: topk_weights must be 2-D [num_tokens, top_k]")
    _check_float(op, "topk_weights", topk_weights)
    torch._check(topk_weights.shape[0] == hidden.shape[0], lambda: f"{op}: topk_weights must have num_tokens rows")
    torch._check(sorted_pair_ids.dtype == torch.int32, lambda: f"{op}: sorted_pair_ids must be int32")
    torch._check(
        sorted_pair_ids.shape == (hidden.shape[0] * topk_weights.shape[1],),
        lambda: f"{op}: sorted_pair_ids must have num_tokens * top_k entries",
    )
    return hidden.new_empty(hidden.shape)
