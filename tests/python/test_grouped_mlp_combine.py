"""grouped_mlp_combine (grouped_mlp with the gather and the weighted combine fused) against the
plain-PyTorch reference and against the unfused permute -> grouped_mlp -> unpermute_combine."""

import pytest
import torch

from moe_infer import ops
from moe_infer import reference as ref

from conftest import argument_error, relative_error

LIMIT = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_case(num_tokens, num_experts, top_k, hidden_size, ffn_size, activation, bias, transposed, dtype, device):
    """Random hidden, routing (with a few unrouted pairs) and expert weights."""
    hidden = torch.randn(num_tokens, hidden_size, device=device).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device=device) * 3
    weights, ids = ops.topk_gating(logits, top_k, renormalize=True)
    ids[::7, -1] = -1  # unrouted pairs contribute nothing
    fc1_out = 2 * ffn_size if ops.ACTIVATION_TABLE[activation].gated else ffn_size
    fc1 = torch.randn((num_experts, hidden_size, fc1_out) if transposed else (num_experts, fc1_out, hidden_size))
    fc2 = torch.randn((num_experts, ffn_size, hidden_size) if transposed else (num_experts, hidden_size, ffn_size))
    params = [fc1 / hidden_size**0.5, torch.randn(num_experts, fc1_out) * 0.1 if bias else None]
    params += [fc2 / ffn_size**0.5, torch.randn(num_experts, hidden_size) * 0.1 if bias else None]
    params = [None if p is None else p.to(device=device, dtype=dtype) for p in params]
    return hidden, weights, ids, params


def unfused(hidden, weights, plan, params, activation, transposed):
    rows = ops.permute(hidden, plan.sorted_pair_ids, weights.shape[1])
    rows = ops.grouped_mlp(rows, plan.expert_offsets, *params, activation, transposed)
    return ops.unpermute_combine(rows, weights, plan.row_of_pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", list(ops.ACTIVATIONS))
@pytest.mark.parametrize("bias,transposed", [(False, False), (True, True)])
@pytest.mark.parametrize("num_tokens", [97, 7])  # 7: decode, at most 16 rows per expert (one pass on the CPU)
def test_matches_reference(device, impl, dtype, activation, bias, transposed, num_tokens):
    hidden, weights, ids, params = make_case(num_tokens, 6, 2, 24, 16, activation, bias, transposed, dtype, device)
    plan = ops.dispatch_plan(ids, 6)
    out = ops.grouped_mlp_combine(hidden, weights, plan, *params, activation, transposed)
    expected = ref.grouped_mlp_combine(
        hidden.double(),
        weights.double(),
        ids,
        *(p if p is None else p.double() for p in params),
        activation,
        transposed,
    )
    assert out.dtype == dtype and out.shape == hidden.shape
    assert relative_error(out, expected) < LIMIT[dtype]
    assert relative_error(out, unfused(hidden, weights, plan, params, activation, transposed)) < LIMIT[dtype]


def test_experts_larger_than_a_block_and_empty_experts(device, impl):
    # 5000 tokens, top-1 onto 3 of 8 experts: each busy expert spans several 1024-row blocks.
    hidden, _, _, params = make_case(5000, 8, 1, 32, 24, "silu_glu", True, False, torch.float32, device)
    ids = torch.tensor([0, 3, 5], device=device)[torch.randint(0, 3, (5000, 1), device=device)]
    weights = torch.rand(5000, 1, device=device)
    plan = ops.dispatch_plan(ids, 8)
    out = ops.grouped_mlp_combine(hidden, weights, plan, *params, "silu_glu")
    expected = ref.grouped_mlp_combine(hidden, weights, ids, *params, "silu_glu")
    assert relative_error(out, expected) < 1e-5
    empty = ops.grouped_mlp_combine(hidden[:0], weights[:0], ops.dispatch_plan(ids[:0], 8), *params, "silu_glu")
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_of_several_experts_and_of_part_of_one(device, impl, dtype):
    # Expert sizes around the CPU's 1024-row blocks: small experts share a block (a token can have
    # both its rows in one), a large expert is cut into blocks, a block ends where an expert ends.
    counts = torch.tensor([3, 1500, 2, 0, 700, 400, 1030, 1])
    first = torch.repeat_interleave(torch.arange(8), counts)[torch.randperm(int(counts.sum()))]
    second = (first + torch.randint(1, 8, first.shape)) % 8  # another expert of the same token
    ids = torch.stack([first, second], dim=1).to(device)
    num_tokens = ids.shape[0]
    hidden, _, _, params = make_case(num_tokens, 8, 2, 32, 24, "silu_glu", True, False, dtype, device)
    weights = torch.rand(num_tokens, 2, device=device)
    out = ops.grouped_mlp_combine(hidden, weights, ops.dispatch_plan(ids, 8), *params, "silu_glu")
    expected = ref.grouped_mlp_combine(
        hidden.double(), weights.double(), ids, *(p.double() for p in params), "silu_glu"
    )
    assert relative_error(out, expected) < LIMIT[dtype]


def test_strided_hidden_and_weights_in_hidden_dtype(device):
    hidden, weights, ids, params = make_case(40, 4, 2, 16, 8, "gelu", False, False, torch.bfloat16, device)
    wide = torch.randn(40, 48, device=device).to(torch.bfloat16)
    wide[:, 8:24] = hidden  # rows with a stride of 48
    plan = ops.dispatch_plan(ids, 4)
    out = ops.grouped_mlp_combine(wide[:, 8:24], weights.to(torch.bfloat16), plan, *params, "gelu")
    expected = ref.grouped_mlp_combine(
        hidden.double(), weights.double(), ids, params[0].double(), None, params[2].double(), None, "gelu"
    )
    assert relative_error(out, expected) < LIMIT[torch.bfloat16]


def test_gradients_match_the_unfused_pipeline(device):
    hidden, weights, ids, params = make_case(30, 5, 2, 12, 8, "silu_glu", True, False, torch.float32, device)
    plan = ops.dispatch_plan(ids, 5)
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weights, *params)]
    grad_out = torch.randn_like(hidden)
    fused = torch.autograd.grad(
        ops.grouped_mlp_combine(leaves[0], leaves[1], plan, *leaves[2:], "silu_glu"), leaves, grad_out
    )
    reference = torch.autograd.grad(
        unfused(leaves[0], leaves[1], plan, leaves[2:], "silu_glu", False), leaves, grad_out
    )
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck(device):
    hidden, weights, ids, params = make_case(9, 4, 2, 12, 8, "silu_glu", True, False, torch.float32, device)
    plan = ops.dispatch_plan(ids, 4)
    args = (
        hidden.requires_grad_(),
        weights.requires_grad_(),
        plan.sorted_pair_ids,
        plan.expert_offsets,
        *(p.requires_grad_() for p in params),
        "silu_glu",
        False,
        1.702,
        7.0,
    )
    torch.library.opcheck(torch.ops.moe_infer.grouped_mlp_combine, args)


def test_compiles_without_graph_breaks(device):
    hidden, weights, ids, params = make_case(33, 8, 2, 16, 8, "gpt_oss_swiglu", True, True, torch.float32, device)

    def layer(hidden, weights, ids):
        plan = ops.dispatch_plan(ids, 8, validate=False)
        return ops.grouped_mlp_combine(hidden, weights, plan, *params, "gpt_oss_swiglu", True)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for num_tokens in (33, 7):
        out = compiled(hidden[:num_tokens], weights[:num_tokens], ids[:num_tokens])
        torch.testing.assert_close(out, layer(hidden[:num_tokens], weights[:num_tokens], ids[:num_tokens]))


COMBINE_ARGUMENT_ERRORS = [
    (dict(weights=lambda w: w[:-1]), r"grouped_mlp_combine: topk_weights has 8 rows but hidden has 9 tokens"),
    (dict(weights=lambda w: w.long()), r"grouped_mlp_combine: topk_weights must be float32"),
    (dict(pairs=lambda p: p[:-1]), r"sorted_pair_ids has 17 entries, expected num_tokens \* top_k = 9 \* 2"),
    (dict(pairs=lambda p: p.long()), r"sorted_pair_ids must be int32"),
    pytest.param(
        dict(pairs=lambda p: torch.full_like(p, 18)),
        r"sorted_pair_ids\[0\] = 18 is out of range \[0, 18\)",
        marks=pytest.mark.data_dependent,
    ),
    pytest.param(
        dict(offsets=lambda o: o + 3), r"expert_offsets\[0\] \(3\) must be 0", marks=pytest.mark.data_dependent
    ),
    pytest.param(
        dict(offsets=lambda o: torch.cat([o[:1], o[1:] + 3])),
        r"expert_offsets\[-1\] \(\d+\) exceeds the number of pairs",
        marks=pytest.mark.data_dependent,
    ),
    (dict(fc1=lambda w: w[:, :, :-1]), r"grouped_mlp_combine: fc1_weight .* does not match hidden_size"),
    (dict(fc2=lambda w: w.double()), r"grouped_mlp_combine: fc2_weight is Double but hidden is Float"),
]


def combine_call(device, change):
    """grouped_mlp_combine on a small valid case with one argument changed by ``change``."""
    hidden, weights, ids, params = make_case(9, 4, 2, 12, 8, "silu_glu", False, False, torch.float32, device)
    plan = ops.dispatch_plan(ids, 4)
    pairs, offsets = plan.sorted_pair_ids, plan.expert_offsets
    fc1, _, fc2, _ = params
    weights = change.get("weights", lambda t: t)(weights)
    pairs = change.get("pairs", lambda t: t)(pairs)
    offsets = change.get("offsets", lambda t: t)(offsets)
    fc1 = change.get("fc1", lambda t: t)(fc1)
    fc2 = change.get("fc2", lambda t: t)(fc2)
    return torch.ops.moe_infer.grouped_mlp_combine(
        hidden, weights, pairs, offsets, fc1, None, fc2, None, "silu_glu", False, 1.702, 7.0
    )


@pytest.mark.parametrize("change,message", COMBINE_ARGUMENT_ERRORS)
def test_bad_arguments_get_clear_errors(device, change, message):
    with pytest.raises(argument_error(message), match=message):
        combine_call(device, change)
