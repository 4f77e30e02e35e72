"""Each op against the plain-PyTorch reference (moe_infer.reference) on fresh random inputs."""

import itertools

import pytest
import torch

from moe_infer import ops
from moe_infer import reference as ref

from conftest import relative_error, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def routing_grid():
    for num_tokens, num_experts, k in itertools.product([0, 1, 7, 1000], [1, 8, 64, 256], [1, 2, 4, 8]):
        if k <= num_experts:
            yield num_tokens, num_experts, k


def assert_same_routing(weights, ids, ref_weights, ref_ids, choice, tol):
    """Ids equal the reference's, except where the reference's choice scores tie; weights close."""
    ids = ids.long()
    num_experts = choice.shape[1]
    assert ids.dtype == torch.long and weights.dtype == torch.float32
    if ids.numel() == 0:
        assert ref_ids.numel() == 0
        return
    assert int(ids.min()) >= 0 and int(ids.max()) < num_experts
    assert (ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1]).all(), "duplicate expert in a row"
    # The chosen experts' choice scores equal the best k scores (ties may pick other experts).
    torch.testing.assert_close(choice.gather(1, ids), choice.gather(1, ref_ids), rtol=1e-5, atol=1e-6)
    same = (ids == ref_ids).all(-1)
    assert same.float().mean() > 0.9, "routing disagrees with the reference beyond ties"
    torch.testing.assert_close(weights[same], ref_weights[same].float(), rtol=tol, atol=tol)


def choice_scores(logits, scoring, bias=None):
    logits = logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, -1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = logits
    return scores if bias is None else scores + bias


@pytest.mark.parametrize("num_tokens,num_experts,k", list(routing_grid()))
def test_topk_gating_softmax_grid(device, num_tokens, num_experts, k):
    logits = torch.randn(num_tokens, num_experts, device=device)
    for renormalize in (False, True):
        weights, ids = ops.topk_gating(logits, k, "softmax", renormalize)
        ref_weights, ref_ids = ref.topk_gating(logits, k, "softmax", renormalize)
        assert weights.shape == ids.shape == (num_tokens, k)
        assert ids.dtype == torch.int32
        assert_same_routing(weights, ids, ref_weights, ref_ids, choice_scores(logits, "softmax"), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring", ["softmax", "softmax_topk", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_gating_variants(device, impl, dtype, scoring, renormalize):
    num_tokens, num_experts, k = 257, 64, 4
    logits = (torch.randn(num_tokens, num_experts, device=device) * 3).to(dtype)
    scale = 2.5
    weights, ids = ops.topk_gating(logits, k, scoring, renormalize, None, scale)
    ref_weights, ref_ids = ref.topk_gating(logits, k, scoring, renormalize, None, scale)
    assert_same_routing(weights, ids, ref_weights, ref_ids, choice_scores(logits, scoring), 1e-5)
    if scoring == "softmax_topk" or renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.full((num_tokens,), scale, device=device))


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4), (4, 1)])
def test_topk_gating_deepseek(device, impl, n_group, topk_group):
    """Sigmoid scores, a selection-only bias, group-limited top-k, scaling (DeepSeek-V3)."""
    num_tokens, num_experts, k = 300, 64, 6 if topk_group > 1 else 4
    logits = torch.randn(num_tokens, num_experts, device=device)
    bias = torch.randn(num_experts, device=device) * 0.1
    args = (logits, k, "sigmoid", True, bias, 2.5, n_group, topk_group)
    weights, ids = ops.topk_gating(*args)
    ref_weights, ref_ids = ref.topk_gating(*args)
    # With groups, the choice scores that decide are the masked ones; compare ids exactly
    # (random data makes ties vanishingly rare) and weights closely.
    ref_ids_sorted = ref_ids.sort(-1).values
    assert torch.equal(ids.long().sort(-1).values, ref_ids_sorted)
    order = ids.long().argsort(-1)
    ref_order = ref_ids.argsort(-1)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order))
    # The bias only steers selection: weights are the unbiased sigmoid scores, renormalized, scaled.
    chosen = torch.sigmoid(logits).gather(1, ids.long())
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_topk_gating_group_mask_with_negative_choices(device):
    """Experts outside the chosen groups are masked with -inf, as transformers v5's DeepSeek-V3 router
    does: a bias that makes every choice score negative must not let a masked expert win."""
    num_tokens, num_experts, n_group = 200, 16, 4
    logits = torch.randn(num_tokens, num_experts, device=device)
    bias = -2.0 - torch.rand(num_experts, device=device)  # sigmoid + bias < 0 everywhere
    weights, ids = ops.topk_gating(logits, 4, "sigmoid", True, bias, 1.0, n_group, 2)
    ref_weights, ref_ids = ref.topk_gating(logits, 4, "sigmoid", True, bias, 1.0, n_group, 2)
    assert torch.equal(ids.long().sort(-1).values, ref_ids.sort(-1).values)
    # The 4 experts lie in at most 2 groups: the ones with the best top-2 choice sums.
    choice = (torch.sigmoid(logits) + bias).view(num_tokens, n_group, -1)
    best_groups = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices.sort(-1).values
    chosen_groups = (ids.long() // (num_experts // n_group)).sort(-1).values
    assert all(set(c.tolist()) <= set(b.tolist()) for c, b in zip(chosen_groups, best_groups))
    torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens, device=device))


def test_topk_gating_ties_follow_torch_topk(device):
    """Tied experts come in torch.topk's order (test_routing.py covers every scoring mode and dtype)."""
    logits = torch.zeros(3, 8, device=device)
    logits[1, 5] = 1.0
    weights, ids = ops.topk_gating(logits, 3)
    assert torch.equal(ids.long(), torch.topk(torch.softmax(logits, -1), 3).indices)
    assert ids[1, 0] == 5
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 8, device=device))


def test_topk_gating_masked_experts(device):
    """-inf logits (masked experts) are never chosen while a finite one remains."""
    logits = torch.randn(50, 16, device=device)
    logits[:, ::2] = float("-inf")
    _, ids = ops.topk_gating(logits, 4)
    assert (ids % 2 == 1).all()


def random_ids(num_tokens, num_experts, k, device, unrouted=0.0):
    ids = (
        torch.stack([torch.randperm(num_experts, device=device)[:k] for _ in range(num_tokens)])
        if num_tokens
        else torch.empty(0, k, dtype=torch.long, device=device)
    )
    if unrouted:
        ids[torch.rand(ids.shape, device=device) < unrouted] = -1
    return ids


@pytest.mark.parametrize("num_tokens,num_experts,k", list(routing_grid()))
def test_dispatch_plan_grid(device, num_tokens, num_experts, k):
    for id_dtype in (torch.int32, torch.int64):
        ids = random_ids(num_tokens, num_experts, k, device).to(id_dtype)
        plan = ops.dispatch_plan(ids, num_experts)
        expected = ref.dispatch_plan(ids, num_experts)
        for got, want in zip(plan, expected):
            assert got.dtype == torch.int32
            assert torch.equal(got.long(), want)


@pytest.mark.parametrize("num_tokens", [1, 1000, 40000])
def test_dispatch_plan_skewed_and_unrouted(device, impl, num_tokens):
    """All pairs on one expert, empty experts, and -1 (unrouted) pairs sorted after every expert."""
    num_experts, k = 16, 2
    ids = torch.full((num_tokens, k), 3, device=device)
    plan = ops.dispatch_plan(ids, num_experts)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, num_tokens * k] + [0] * 12
    assert torch.equal(plan.sorted_pair_ids.long(), torch.arange(num_tokens * k, device=device))

    ids = random_ids(num_tokens, num_experts, k, device, unrouted=0.3)
    ids[ids == 5] = 7  # expert 5 gets nothing
    plan = ops.dispatch_plan(ids, num_experts)
    expected = ref.dispatch_plan(ids, num_experts)
    for got, want in zip(plan, expected):
        assert torch.equal(got.long(), want)
    assert plan.tokens_per_expert[5] == 0
    assert int(plan.expert_offsets[-1]) == int((ids >= 0).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [1, 37, 64])
@pytest.mark.parametrize("num_tokens,k", [(0, 2), (1, 1), (7, 8), (1000, 2)])
def test_permute_and_combine(device, impl, dtype, hidden_size, num_tokens, k):
    num_experts = 8
    ids = random_ids(num_tokens, num_experts, k, device)
    plan = ops.dispatch_plan(ids, num_experts)
    # Non-contiguous hidden: every other column of a wider tensor.
    wide = torch.randn(num_tokens, 2 * hidden_size, device=device).to(dtype)
    hidden = wide[:, ::2]
    rows = ops.permute(hidden, plan.sorted_pair_ids, k)
    assert torch.equal(rows, ref.permute(hidden, plan.sorted_pair_ids, k))
    # Row-strided (a column slice) too.
    assert torch.equal(
        ops.permute(wide[:, :hidden_size], plan.sorted_pair_ids, k),
        ref.permute(wide[:, :hidden_size], plan.sorted_pair_ids, k),
    )

    expert_out = torch.randn(num_tokens * k, hidden_size, device=device).to(dtype)
    for weights in (torch.rand(num_tokens, k, device=device), torch.rand(num_tokens, k, device=device).to(dtype)):
        out = ops.unpermute_combine(expert_out, weights, plan.row_of_pair)
        assert out.dtype == dtype and out.shape == (num_tokens, hidden_size)
        expected = ref.unpermute_combine(expert_out.double(), weights.double(), plan.row_of_pair)
        rtol, atol = tolerance(dtype)
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


def test_combine_accumulates_in_float32(device):
    """Eight bf16 rows whose sum cancels: a bf16 accumulator would lose the small terms."""
    k, hidden_size = 8, 16
    big = torch.full((1, hidden_size), 256.0)
    rows = torch.cat([big, -big, torch.full((6, hidden_size), 0.5)]).to(torch.bfloat16).to(device)
    weights = torch.ones(1, k, device=device)
    out = ops.unpermute_combine(rows, weights, torch.arange(k, dtype=torch.int32, device=device))
    assert torch.equal(out.float(), torch.full((1, hidden_size), 3.0, device=device))


def make_expert_weights(num_experts, hidden_size, ffn_size, activation, bias, transposed, dtype, device):
    fc1_outputs = 2 * ffn_size if ops.ACTIVATION_TABLE[activation].gated else ffn_size
    fc1_shape = (num_experts, hidden_size, fc1_outputs) if transposed else (num_experts, fc1_outputs, hidden_size)
    fc2_shape = (num_experts, ffn_size, hidden_size) if transposed else (num_experts, hidden_size, ffn_size)
    fc1 = (torch.randn(fc1_shape, device=device) / hidden_size**0.5).to(dtype)
    fc2 = (torch.randn(fc2_shape, device=device) / ffn_size**0.5).to(dtype)
    b1 = (torch.randn(num_experts, fc1_outputs, device=device) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(num_experts, hidden_size, device=device) * 0.1).to(dtype) if bias else None
    return fc1, b1, fc2, b2


def upcast(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ops.ACTIVATIONS))
@pytest.mark.parametrize("bias,transposed", [(False, False), (True, True), (True, False)])
# Empty experts included; on the CPU, 17 rows take ATen's GEMM for that expert, and 16 or fewer in
# every expert take one pass over all experts.
@pytest.mark.parametrize("busiest", [17, 16])
def test_grouped_mlp(device, impl, dtype, activation, bias, transposed, busiest):
    num_experts, hidden_size, ffn_size = 6, 37, 20
    counts = torch.tensor([5, 0, busiest, 1, 0, 9])
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    num_rows = int(offsets[-1]) + 3  # 3 trailing (unrouted) rows must come out as zeros
    hidden = (torch.randn(num_rows, hidden_size, device=device) * 2).to(dtype)
    weights = make_expert_weights(num_experts, hidden_size, ffn_size, activation, bias, transposed, dtype, device)
    out = ops.grouped_mlp(
        hidden, offsets.to(device), weights[0], weights[1], weights[2], weights[3], activation, transposed
    )
    expected = ref.grouped_mlp(hidden.double(), offsets, *(upcast(w) for w in weights), activation, transposed)
    assert out.dtype == dtype
    assert (out[-3:] == 0).all()
    limit = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(out, expected) < limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "activation,bias,transposed",
    [("silu_glu", False, False), ("gpt_oss_swiglu", True, True), ("gelu", True, False), ("gelu_glu", False, False)],
)
def test_decode_pass_gives_each_experts_rows_the_per_expert_bits(dtype, activation, bias, transposed):
    """On the CPU, up to 16 rows in every expert take one pass over all experts, more take the
    per-expert loop: an expert's rows come out with the same bits in both (so a buffered layer,
    which computes a batch's experts in rounds, equals the resident one bit for bit)."""
    # ffn 1000: a vector tail in every row, and (with two threads) ATen's elementwise kernels split
    # the one pass's 18 rows between threads mid-row, unlike each expert's own call.
    num_experts, hidden_size, ffn_size = 4, 64, 1000
    weights = make_expert_weights(num_experts, hidden_size, ffn_size, activation, bias, transposed, dtype, "cpu")
    counts = [9, 17, 8, 1]  # expert 1 above 16 rows: the per-expert loop for every expert
    hidden = (torch.randn(sum(counts), hidden_size) * 2).to(dtype)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    per_expert = ops.grouped_mlp(hidden, offsets, *weights, activation, transposed)
    keep = torch.ones(sum(counts), dtype=torch.bool)
    keep[9:26] = False  # expert 1's rows out: the one pass
    few_offsets = torch.tensor([0, 9, 9, 17, 18], dtype=torch.int32)
    one_pass = ops.grouped_mlp(hidden[keep], few_offsets, *weights, activation, transposed)
    assert torch.equal(one_pass, per_expert[keep])


def test_grouped_mlp_all_rows_one_expert_and_none(device):
    num_experts, hidden_size, ffn_size = 4, 24, 16
    weights = make_expert_weights(num_experts, hidden_size, ffn_size, "silu_glu", False, False, torch.float32, device)
    hidden = torch.randn(50, hidden_size, device=device)
    offsets = torch.tensor([0, 0, 50, 50, 50], dtype=torch.int32, device=device)
    out = ops.grouped_mlp(hidden, offsets, weights[0], None, weights[2], None, "silu_glu")
    expected = ref.expert_ffn(hidden, weights[0][1], None, weights[2][1], None, "silu_glu")
    torch.testing.assert_close(out, expected)
    empty = ops.grouped_mlp(
        hidden[:0], torch.zeros(5, dtype=torch.int32, device=device), weights[0], None, weights[2], None, "silu_glu"
    )
    assert empty.shape == (0, hidden_size)


def test_opcheck_every_op(device, impl):
    """Schema, fake implementation, autograd registration and AOT dispatch agree for every op."""
    num_tokens, num_experts, k, hidden_size, ffn_size = 9, 6, 2, 12, 8
    logits = torch.randn(num_tokens, num_experts, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_infer.topk_gating, (logits, k, "softmax", True, None, 1.0, 1, 1, True))
    torch.library.opcheck(
        torch.ops.moe_infer.topk_gating,
        (logits, k, "sigmoid", True, torch.randn(num_experts, device=device), 2.0, 3, 2, True),
    )
    torch.library.opcheck(torch.ops.moe_infer.topk_gating, (logits, k, "softmax_topk", False, None, 1.0, 1, 1, True))
    weights, ids = ops.topk_gating(logits.detach(), k)
    torch.library.opcheck(torch.ops.moe_infer.dispatch_plan, (ids, num_experts, True))
    plan = ops.dispatch_plan(ids, num_experts)
    hidden = torch.randn(num_tokens, hidden_size, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_infer.permute, (hidden, plan.sorted_pair_ids, k))
    rows = torch.randn(num_tokens * k, hidden_size, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_infer.unpermute_combine, (rows, weights.requires_grad_(), plan.row_of_pair))
    fc1, b1, fc2, b2 = make_expert_weights(
        num_experts, hidden_size, ffn_size, "silu_glu", True, False, torch.float32, device
    )
    args = (
        rows,
        plan.expert_offsets,
        fc1.requires_grad_(),
        b1.requires_grad_(),
        fc2.requires_grad_(),
        b2.requires_grad_(),
        "silu_glu",
        False,
        1.702,
        7.0,
    )
    torch.library.opcheck(torch.ops.moe_infer.grouped_mlp, args)


def test_gradients_off_give_the_same_results_and_no_graph():
    """With gradients off (no_grad, inference mode) the ops are called below the Autograd key
    (ops._run): the same values as with gradients on, no autograd graph; with gradients on,
    gradients against the reference."""
    torch.manual_seed(0)
    num_experts, hidden, ffn = 4, 16, 8
    logits = torch.randn(6, num_experts, requires_grad=True)
    x = torch.randn(6, hidden, requires_grad=True)
    fc1 = torch.randn(num_experts, 2 * ffn, hidden, requires_grad=True)
    fc2 = torch.randn(num_experts, hidden, ffn, requires_grad=True)

    def layer():
        weights, ids = ops.topk_gating(logits, 2, renormalize=True)
        plan = ops.dispatch_plan(ids, num_experts)
        return ops.grouped_mlp_combine(x, weights, plan, fc1, None, fc2, None, "silu_glu"), ids

    with torch.no_grad():
        off, off_ids = layer()
    with torch.inference_mode():  # the Autograd keys excluded already: called directly
        inference, inference_ids = layer()
    on, on_ids = layer()
    assert off.grad_fn is None and not off.requires_grad
    assert inference.grad_fn is None and inference.is_inference()
    assert on.grad_fn is not None
    assert torch.equal(off_ids, on_ids) and torch.equal(off, on.detach())
    assert torch.equal(inference_ids, on_ids) and torch.equal(inference, on.detach())
    on.sum().backward()
    grads = [t.grad.clone() for t in (logits, x, fc1, fc2)]
    for t in (logits, x, fc1, fc2):
        t.grad = None
    ref_weights, ref_ids = ref.topk_gating(logits, 2, renormalize=True)
    ref_out = ref.grouped_mlp_combine(x, ref_weights, ref_ids, fc1, None, fc2, None, "silu_glu")
    ref_out.sum().backward()
    for got, t in zip(grads, (logits, x, fc1, fc2)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)
