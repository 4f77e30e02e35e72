"""Fake (meta) implementations of every op, so torch.compile and FakeTensor can trace them.

Each gives the op's output metadata (static shapes, the kernels' dtypes). Argument errors come from
one place, the C++ checks (csrc/common/checks.cpp, bound as ``moe_infer._C.checks``), which read
only shapes, dtypes and devices: a fake call raises the very error of an eager call. Under symbolic
shapes the C++ checks cannot read the sizes; the fakes then check only the dimensions the output
shapes are read from.
"""

import torch

from . import _C
from ._schema import arguments, complete


def _fake(op: str, *dims: tuple[str, int]):
    """Registers ``outputs(args)`` (args by schema name) as the fake of ``op``, behind the op's C++
    argument checks; ``dims``: (argument, number of dimensions) the output shapes are read from."""

    def register(outputs):
        def fake(*values, **kwargs):
            values = complete(op, values, kwargs)
            a = arguments(op, values)
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            if all(isinstance(size, int) for t in tensors for size in t.shape):
                getattr(_C.checks, op)(*(list(v) if isinstance(v, (list, tuple)) else v for v in values))
            for name, dim in dims:
                t = getattr(a, name)
                torch._check(t.dim() == dim, lambda name=name, dim=dim: f"{op}: {name} must be {dim}-D")
            return outputs(a)

        torch.library.register_fake(f"moe_infer::{op}")(fake)
        return outputs

    return register


@_fake("topk_gating", ("router_logits", 2))
def _topk_gating(a):
    shape = (a.router_logits.shape[0], a.k)
    return a.router_logits.new_empty(shape, dtype=torch.float32), a.router_logits.new_empty(shape, dtype=torch.int32)


@_fake("dispatch_plan")
def _dispatch_plan(a):
    num_pairs, int32 = a.expert_ids.numel(), torch.int32
    return (
        a.expert_ids.new_empty((num_pairs,), dtype=int32),  # sorted_pair_ids
        a.expert_ids.new_empty((num_pairs,), dtype=int32),  # row_of_pair
        a.expert_ids.new_empty((a.num_experts,), dtype=int32),  # tokens_per_expert
        a.expert_ids.new_empty((a.num_experts + 1,), dtype=int32),  # expert_offsets
    )


@_fake("permute", ("hidden", 2))
def _permute(a):
    return a.hidden.new_empty((a.hidden.shape[0] * a.top_k, a.hidden.shape[1]))


@_fake("unpermute_combine", ("expert_out", 2), ("topk_weights", 2))
def _unpermute_combine(a):
    return a.expert_out.new_empty((a.topk_weights.shape[0], a.expert_out.shape[1]))


@_fake("grouped_mlp", ("hidden", 2))
def _grouped_mlp(a):
    return a.hidden.new_empty(a.hidden.shape)


@_fake("grouped_mlp_combine", ("hidden", 2))
def _grouped_mlp_combine(a):
    return a.hidden.new_empty(a.hidden.shape)


@torch.library.register_fake("moe_infer::grouped_mlp_backward")
def _grouped_mlp_backward(grad_out, hidden, expert_offsets, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *options):
    # Called only by grouped_mlp's backward, on its own saved arguments (checked by grouped_mlp).
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden),
        torch.empty_like(fc1_weight),
        torch.empty_like(fc1_bias) if fc1_bias is not None else empty,
        torch.empty_like(fc2_weight),
        torch.empty_like(fc2_bias) if fc2_bias is not None else empty,
    )


# ---- static gating --------------------------------------------------------------------------


@_fake("static_gating", ("router_logits", 2))
def _static_gating(a):
    shape, logits = (a.router_logits.shape[0], a.top_k), a.router_logits
    return (
        logits.new_empty(shape, dtype=torch.float32),  # topk_weights
        logits.new_empty(shape, dtype=torch.int32),  # expert_ids
        logits.new_empty(shape, dtype=torch.int32),  # locations
        logits.new_empty((), dtype=torch.float32),  # l_aux
    )


@_fake("static_routing_tensors", ("expert_ids", 2))
def _static_routing_tensors(a):
    shape = (a.expert_ids.shape[0], a.num_experts, a.capacity)
    return a.topk_weights.new_empty(shape, dtype=torch.float32), a.topk_weights.new_empty(shape, dtype=torch.bool)


@_fake("static_dispatch", ("hidden", 2), ("dispatch_mask", 3))
def _static_dispatch(a):
    return a.hidden.new_empty((a.dispatch_mask.shape[1], a.dispatch_mask.shape[2], a.hidden.shape[1]))


@_fake("static_combine", ("expert_out", 3), ("combine_weights", 3))
def _static_combine(a):
    return a.expert_out.new_empty((a.combine_weights.shape[0], a.expert_out.shape[2]))


# ---- placement and expert buffering (planned on the host) ----------------------------------------


@_fake("expert_placement")
def _expert_placement(a):
    return a.expert_load.new_empty((a.num_ranks, a.slots_per_rank), dtype=torch.int32)


@_fake("simulate_expert_cache")
def _simulate_expert_cache(a):
    return a.accesses.new_empty((len(a.policies), len(a.cache_sizes), 3), dtype=torch.int64)
