"""Property-based tests (hypothesis): generated shapes, dtypes, k, E, expert ids with -1 and ties,
empty and non-contiguous inputs, checked against moe_infer.reference, kernels against their
composite forms, and eager against torch.compile.

Profiles (MOE_INFER_HYPOTHESIS_PROFILE): "ci" (default) is derandomized with a small budget, so CI
runs the same examples every time in well under two minutes; "long" searches many more inputs
with fresh randomness (a local hunt). Every failure a search found is kept below as an @example.
"""

import math
import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import moe_infer
from moe_infer import ops
from moe_infer import reference as ref

from conftest import use_kernels

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MOE_INFER_HYPOTHESIS_PROFILE", "ci"))

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-2, 4e-2), torch.float16: (1e-2, 1e-2)}

# Hypothesis draws the sizes and a seed; torch draws the values from the seed (fast, reproducible).
seeds = st.integers(0, 2**31 - 1)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def maybe_strided(t, strided):
    """t itself, or an equal tensor whose rows are not contiguous (every other column of a wider one)."""
    if not strided or t.dim() != 2:
        return t
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


def routing_ids(seed, num_tokens, num_experts, k, unrouted):
    """[S, k] ids, distinct per row, with -1 (unrouted) at random when ``unrouted``."""
    gen = generator(seed)
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(1)[:, :k].to(torch.int32)
    if unrouted:
        ids[torch.rand(num_tokens, k, generator=gen) < 0.3] = -1
    return ids


def logits_of(seed, num_tokens, num_experts, dtype, ties):
    gen = generator(seed)
    if ties:  # few distinct values: many exact ties, in every dtype
        return torch.randint(-2, 3, (num_tokens, num_experts), generator=gen).to(dtype)
    return torch.randn(num_tokens, num_experts, generator=gen).to(dtype)


def assert_valid_topk(choice, ids):
    """ids [S, k] are a top-k of choice [S, E]: every chosen score >= every unchosen one."""
    if choice.numel() == 0:
        return
    chosen = choice.gather(1, ids.long())
    unchosen = choice.scatter(1, ids.long(), float("-inf"))
    assert (chosen.min(1).values >= unchosen.max(1).values).all()
    assert (ids.sort(1).values.diff(1) != 0).all()  # distinct experts per token


# ---- gating ------------------------------------------------------------------------------------------


gating_cases = st.fixed_dictionaries(
    {
        "seed": seeds,
        "num_tokens": st.integers(0, 40),
        "groups": st.sampled_from([(1, 1), (2, 1), (4, 2)]),
        "experts_per_group": st.integers(2, 8),
        "dtype": st.sampled_from(FLOATS),
        "scoring": st.sampled_from(ops.SCORINGS),
        "renormalize": st.booleans(),
        "bias": st.booleans(),
        "scaling_factor": st.sampled_from([1.0, 2.5]),
        "ties": st.booleans(),
        "strided": st.booleans(),
        "k_fraction": st.floats(0.0, 1.0),
    }
)


def _gating_args(case):
    n_group, topk_group = case["groups"]
    num_experts = n_group * case["experts_per_group"]
    scoring = case["scoring"]
    if scoring == "softmax_topk":
        n_group, topk_group = 1, 1
    eligible = topk_group * (num_experts // n_group)
    k = 1 + int(case["k_fraction"] * (eligible - 1))
    logits = maybe_strided(
        logits_of(case["seed"], case["num_tokens"], num_experts, case["dtype"], case["ties"]), case["strided"]
    )
    bias = None
    if case["bias"] and scoring == "sigmoid":
        bias = torch.randint(0, 2, (num_experts,), generator=generator(case["seed"] + 1)).float() * 0.5
    return logits, k, scoring, case["renormalize"], bias, case["scaling_factor"], n_group, topk_group


@given(gating_cases)
@example(
    dict(
        seed=0,
        num_tokens=0,
        groups=(2, 1),
        experts_per_group=2,
        dtype=torch.float32,
        scoring="softmax",
        renormalize=False,
        bias=False,
        scaling_factor=1.0,
        ties=False,
        strided=False,
        k_fraction=0.0,
    )
).via("group-limited routing of an empty batch: the composite could not reshape [0, E]")
def test_topk_gating_matches_reference_and_composite(case):
    args = _gating_args(case)
    logits, k, scoring, renormalize, bias, scaling, n_group, topk_group = args
    weights, ids = ops.topk_gating(*args)
    with use_kernels(False):
        c_weights, c_ids = ops.topk_gating(*args)
    # Kernel and composite follow one contract (on ties: test_kernel_and_composite_pick_torch_topks_experts_on_ties).
    if not case["ties"]:
        torch.testing.assert_close(weights, c_weights, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids, c_ids)
    r_weights, r_ids = ref.topk_gating(*args)
    # The reference may break ties otherwise: compare choices by score, and the weights they get.
    scores = logits.float()
    if scoring != "softmax_topk":
        scores = torch.softmax(scores, -1) if scoring == "softmax" else torch.sigmoid(scores)
        if bias is not None:
            scores = scores + bias
    if n_group > 1:  # at most topk_group groups, and a top-k among the experts of those groups
        group_of = torch.arange(scores.shape[1]) // (scores.shape[1] // n_group)
        chosen_groups = torch.zeros(scores.shape[0], n_group, dtype=torch.bool).scatter_(1, group_of[ids.long()], True)
        assert (chosen_groups.sum(1) <= topk_group).all()
        scores = scores.masked_fill(~chosen_groups[:, group_of], float("-inf"))
    assert_valid_topk(scores, ids)
    if n_group == 1:
        assert_valid_topk(scores, c_ids)
    if n_group == 1 or not case["ties"]:  # tied groups may be chosen either way
        torch.testing.assert_close(weights.sort(1).values, r_weights.float().sort(1).values, rtol=1e-5, atol=1e-6)


@given(seed=seeds, num_tokens=st.integers(1, 12), num_experts=st.integers(2, 12), data=st.data())
@example(seed=0, num_tokens=3, num_experts=4, data=None).via("sigmoid + renormalize on an all -inf row")
def test_sigmoid_renormalize_of_an_all_minus_inf_row_gives_zero_weights(seed, num_tokens, num_experts, data):
    k = 2 if data is None else data.draw(st.integers(1, num_experts))
    logits = torch.randn(num_tokens, num_experts, generator=generator(seed))
    logits[0] = float("-inf")
    for kernels in (True, False):
        with use_kernels(kernels):
            weights, ids = ops.topk_gating(logits, k, "sigmoid", True)
        assert torch.equal(weights[0], torch.zeros(k)), (kernels, weights[0])
        assert torch.isfinite(weights).all()
    r_weights, _ = ref.topk_gating(logits, k, "sigmoid", True)
    torch.testing.assert_close(weights.sort(1).values, r_weights.sort(1).values)


@given(
    seed=seeds,
    num_tokens=st.integers(0, 24),
    groups=st.sampled_from([(1, 1), (1, 1), (2, 1), (4, 2)]),
    experts_per_group=st.sampled_from([1, 2, 3, 8, 33]),
    k_fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from(FLOATS),
    scoring=st.sampled_from(ops.SCORINGS),
    renormalize=st.booleans(),
    bias=st.booleans(),
    strided=st.booleans(),
)
@example(
    seed=1,
    num_tokens=4,
    groups=(1, 1),
    experts_per_group=8,
    k_fraction=0.2,
    dtype=torch.float32,
    scoring="softmax_topk",
    renormalize=False,
    bias=False,
    strided=False,
).via("softmax_topk tie order, kernel vs composite")
def test_kernel_and_composite_pick_torch_topks_experts_on_ties(
    seed, num_tokens, groups, experts_per_group, k_fraction, dtype, scoring, renormalize, bias, strided
):
    """On tied scores in every dtype (few distinct logits, rows where every expert ties) the kernel
    and the composite both pick torch.topk's experts in torch.topk's order: the reference is the
    torch calls transformers' routers make. E up to 132 reaches torch's partial-sort regime
    (64 k <= E) as well as its nth_element one."""
    n_group, topk_group = (1, 1) if scoring == "softmax_topk" else groups
    num_experts = max(n_group * experts_per_group, 2)
    if n_group > 1 and experts_per_group < 2:  # group scores are a top-2 within each group
        n_group, topk_group = 1, 1
    k = 1 + int(k_fraction * (topk_group * (num_experts // n_group) - 1))
    logits = logits_of(seed, num_tokens, num_experts, dtype, ties=True)
    logits[::3] = logits[::3, :1]  # every expert tied
    logits = maybe_strided(logits, strided)
    selection_bias = None
    if bias and scoring == "sigmoid":  # a bias of few values keeps ties tied
        selection_bias = torch.randint(0, 2, (num_experts,), generator=generator(seed + 1)).float() * 0.5
    args = (logits, k, scoring, renormalize, selection_bias, 1.0, n_group, topk_group)
    want_weights, want_ids = ref.topk_gating(*args)
    for kernels in (True, False):
        with use_kernels(kernels):
            weights, ids = ops.topk_gating(*args)
        assert torch.equal(ids.long(), want_ids), ("kernel" if kernels else "composite", ids, want_ids)
        torch.testing.assert_close(weights, want_weights.float(), rtol=1e-6, atol=1e-7)


# ---- dispatch ----------------------------------------------------------------------------------------


@given(
    seed=seeds,
    num_tokens=st.integers(0, 50),
    num_experts=st.integers(1, 20),
    k_fraction=st.floats(0.0, 1.0),
    unrouted=st.booleans(),
    dtype=st.sampled_from([torch.int32, torch.int64]),
    transposed=st.booleans(),
)
def test_dispatch_plan_matches_reference(seed, num_tokens, num_experts, k_fraction, unrouted, dtype, transposed):
    k = 1 + int(k_fraction * (num_experts - 1))
    ids = routing_ids(seed, num_tokens, num_experts, k, unrouted).to(dtype)
    if transposed:  # a non-contiguous [S, k] view
        ids = ids.t().contiguous().t()
    for kernels in (True, False):
        with use_kernels(kernels):
            plan = ops.dispatch_plan(ids, num_experts)
        for got, want in zip(plan, ref.dispatch_plan(ids, num_experts)):
            assert torch.equal(got.long(), want), kernels


@given(
    seed=seeds,
    num_tokens=st.integers(0, 30),
    num_experts=st.integers(1, 10),
    hidden_size=st.integers(1, 24),
    k_fraction=st.floats(0.0, 1.0),
    unrouted=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    strided=st.booleans(),
    weights_dtype=st.sampled_from(["float32", "same"]),
)
def test_permute_and_unpermute_combine_match_reference(
    seed, num_tokens, num_experts, hidden_size, k_fraction, unrouted, dtype, strided, weights_dtype
):
    k = 1 + int(k_fraction * (num_experts - 1))
    gen = generator(seed)
    ids = routing_ids(seed, num_tokens, num_experts, k, unrouted)
    hidden = maybe_strided(torch.randn(num_tokens, hidden_size, generator=gen).to(dtype), strided)
    weights = torch.rand(num_tokens, k, generator=gen).to(torch.float32 if weights_dtype == "float32" else dtype)
    plan = ops.dispatch_plan(ids, num_experts)
    for kernels in (True, False):
        with use_kernels(kernels):
            rows = ops.permute(hidden, plan.sorted_pair_ids, k)
            assert torch.equal(rows, ref.permute(hidden, plan.sorted_pair_ids, k))
            out = ops.unpermute_combine(rows, weights, plan.row_of_pair)
        want = ref.unpermute_combine(rows, weights, plan.row_of_pair)
        torch.testing.assert_close(out, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@given(seed=seeds, num_tokens=st.integers(1, 8), k=st.integers(1, 3), hidden_size=st.integers(1, 6), data=st.data())
@example(seed=0, num_tokens=2, k=2, hidden_size=3, data=None).via("a row used twice: backward kept the last write")
def test_unpermute_combine_gradient_for_any_row_map(seed, num_tokens, k, hidden_size, data):
    # row_of_pair need not be a permutation (a row read by several pairs): the gradient is the sum.
    gen = generator(seed)
    num_rows = num_tokens * k
    if data is None:
        row_of_pair = torch.zeros(num_rows, dtype=torch.int32)
    else:
        row_of_pair = torch.tensor(
            data.draw(st.lists(st.integers(0, num_rows - 1), min_size=num_rows, max_size=num_rows)), dtype=torch.int32
        )
    expert_out = torch.randn(num_rows, hidden_size, generator=gen, dtype=torch.float64).float().requires_grad_()
    weights = torch.rand(num_tokens, k, generator=gen).requires_grad_()
    grad = torch.randn(num_tokens, hidden_size, generator=gen)
    got = torch.autograd.grad(ops.unpermute_combine(expert_out, weights, row_of_pair), (expert_out, weights), grad)
    want = torch.autograd.grad(ref.unpermute_combine(expert_out, weights, row_of_pair), (expert_out, weights), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---- experts -----------------------------------------------------------------------------------------

mlp_cases = st.fixed_dictionaries(
    {
        "seed": seeds,
        "num_tokens": st.integers(0, 24),
        "num_experts": st.integers(1, 6),
        "hidden_size": st.integers(1, 16),
        "ffn_size": st.integers(1, 12),
        "k_fraction": st.floats(0.0, 1.0),
        "unrouted": st.booleans(),
        "activation": st.sampled_from(ops.ACTIVATIONS),
        "bias": st.booleans(),
        "transposed": st.booleans(),
        "dtype": st.sampled_from(FLOATS),
        "strided": st.booleans(),
    }
)


def _mlp_inputs(case):
    gen = generator(case["seed"])
    num_experts, hidden_size, ffn = case["num_experts"], case["hidden_size"], case["ffn_size"]
    k = 1 + int(case["k_fraction"] * (num_experts - 1))
    fc1 = 2 * ffn if ops.ACTIVATION_TABLE[case["activation"]].gated else ffn
    dtype = case["dtype"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(dtype)

    fc1_weight = rand(num_experts, hidden_size, fc1) if case["transposed"] else rand(num_experts, fc1, hidden_size)
    fc2_weight = rand(num_experts, ffn, hidden_size) if case["transposed"] else rand(num_experts, hidden_size, ffn)
    fc1_bias = rand(num_experts, fc1) if case["bias"] else None
    fc2_bias = rand(num_experts, hidden_size) if case["bias"] else None
    hidden = maybe_strided(rand(case["num_tokens"], hidden_size), case["strided"])
    ids = routing_ids(case["seed"], case["num_tokens"], num_experts, k, case["unrouted"])
    weights = torch.rand(case["num_tokens"], k, generator=gen)
    weights_args = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, case["activation"], case["transposed"])
    return hidden, ids, weights, weights_args


def _close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        got.float(), want.float(), rtol=rtol, atol=atol * max(1.0, want.abs().max().item() if want.numel() else 1.0)
    )


@given(mlp_cases)
def test_grouped_mlp_matches_reference_and_composite(case):
    hidden, ids, _, weights_args = _mlp_inputs(case)
    num_experts = weights_args[0].shape[0]
    plan = ops.dispatch_plan(ids, num_experts)
    rows = ops.permute(hidden, plan.sorted_pair_ids, ids.shape[1])
    out = ops.grouped_mlp(rows, plan.expert_offsets, *weights_args)
    with use_kernels(False):
        composite = ops.grouped_mlp(rows, plan.expert_offsets, *weights_args)
    f64 = [None if t is None else t.double() if isinstance(t, torch.Tensor) else t for t in weights_args]
    want = ref.grouped_mlp(rows.double(), plan.expert_offsets, *f64)
    _close(out, want, case["dtype"])
    _close(composite, want, case["dtype"])


@given(mlp_cases)
def test_grouped_mlp_combine_matches_reference(case):
    hidden, ids, weights, weights_args = _mlp_inputs(case)
    num_experts = weights_args[0].shape[0]
    plan = ops.dispatch_plan(ids, num_experts)
    out = ops.grouped_mlp_combine(hidden, weights, plan, *weights_args)
    with use_kernels(False):
        composite = ops.grouped_mlp_combine(hidden, weights, plan, *weights_args)
    f64 = [None if t is None else t.double() if isinstance(t, torch.Tensor) else t for t in weights_args]
    want = ref.grouped_mlp_combine(hidden.double(), weights.double(), ids, *f64)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    _close(out, want, case["dtype"])
    _close(composite, want, case["dtype"])


# ---- static gating -----------------------------------------------------------------------------------


@given(
    seed=seeds,
    num_tokens=st.integers(0, 30),
    num_experts=st.integers(2, 8),
    top_k=st.sampled_from([1, 2]),
    capacity=st.integers(1, 12),
    policy=st.sampled_from(ops.SECOND_EXPERT_POLICIES),
    padding=st.booleans(),
    ties=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    before=st.booleans(),
    prioritized=st.booleans(),
    hidden_size=st.integers(1, 8),
)
def test_static_gating_kernels_match_composites_and_einsum(
    seed, num_tokens, num_experts, top_k, capacity, policy, padding, ties, dtype, before, prioritized, hidden_size
):
    policy = policy if top_k == 2 else "all"
    gen = generator(seed)
    logits = logits_of(seed, num_tokens, num_experts, dtype, ties)
    mask = torch.rand(num_tokens, generator=gen) < 0.2 if padding else None
    noise = ops.second_expert_noise(policy, logits, generator=gen)
    args = (logits, top_k, capacity, mask, policy, noise, before, prioritized)
    routing = ops.static_gating(*args)
    with use_kernels(False):
        c_routing = ops.static_gating(*args)
    for got, want in zip(routing, c_routing):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    combine, dispatch = ops.static_routing_tensors(
        routing.expert_ids, routing.locations, routing.topk_weights, num_experts, capacity
    )
    with use_kernels(False):
        c_combine, c_dispatch = ops.static_routing_tensors(
            routing.expert_ids, routing.locations, routing.topk_weights, num_experts, capacity
        )
    assert torch.equal(combine, c_combine) and torch.equal(dispatch, c_dispatch)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    buffers = ops.static_dispatch(hidden, dispatch)
    want_buffers = torch.einsum("sec,sm->ecm", dispatch.to(dtype), hidden)
    torch.testing.assert_close(buffers, want_buffers)
    out = ops.static_combine(buffers, combine)
    with use_kernels(False):
        c_out = ops.static_combine(buffers, combine)
    want = torch.einsum("sec,ecm->sm", combine.double(), buffers.double())
    _close(out, want, dtype)
    _close(c_out, want, dtype)


@given(
    seed=seeds,
    num_tokens=st.integers(1, 24),
    num_experts=st.sampled_from([2, 3, 8, 64, 130]),
    top_k=st.sampled_from([1, 2]),
    policy=st.sampled_from(ops.SECOND_EXPERT_POLICIES),
    dtype=st.sampled_from(FLOATS),
)
def test_static_gates_pick_fairseqs_experts_on_ties(seed, num_tokens, num_experts, top_k, policy, dtype):
    """fairseq's Top1Gate / Top2Gate take torch.argmax (the first of tied experts), not torch.topk:
    on tied logits in every dtype (rows where every expert ties included) the kernel and the
    composite route every token to fairseq's experts, with fairseq's weights."""
    policy = policy if top_k == 2 else "all"
    logits = logits_of(seed, num_tokens, num_experts, dtype, ties=True)
    logits[::3] = logits[::3, :1]
    noise = ops.second_expert_noise(policy, logits, generator=generator(seed))
    # fairseq's eval capacity with eval_capacity_token_fraction=2 is 2 S: no token is dropped.
    capacity = 2 * num_tokens
    if top_k == 1:
        _, want_combine, want_mask, _ = ref.fairseq_top1gating(logits, None, 1.0, True, 2.0)
    else:
        _, want_combine, want_mask, _ = ref.fairseq_top2gating(
            logits, None, policy, eval_mode=True, eval_capacity_token_fraction=2.0, second_expert_noise=noise
        )
    for kernels in (True, False):
        with use_kernels(kernels):
            routing = ops.static_gating(logits, top_k, capacity, None, policy, noise)
            combine, mask = ops.static_routing_tensors(
                routing.expert_ids, routing.locations, routing.topk_weights, num_experts, capacity
            )
        assert torch.equal(mask, want_mask), "kernel" if kernels else "composite"
        torch.testing.assert_close(combine, want_combine, rtol=1e-6, atol=1e-6)


@given(seed=seeds, num_tokens=st.integers(1, 10), num_experts=st.integers(1, 6), capacity=st.integers(1, 6))
@example(seed=0, num_tokens=3, num_experts=2, capacity=2).via("static_combine of 0 * inf")
def test_static_combine_ignores_slots_of_weight_zero(seed, num_tokens, num_experts, capacity):
    # A slot no token weighs (weight 0) contributes nothing, even when its row holds inf or NaN.
    gen = generator(seed)
    combine = torch.rand(num_tokens, num_experts, capacity, generator=gen)
    combine[combine < 0.5] = 0
    combine[:, -1, -1] = 0
    expert_out = torch.randn(num_experts, capacity, 4, generator=gen)
    expert_out[-1, -1] = float("inf")
    expert_out[-1, -1, 0] = float("nan")
    finite = expert_out.clone()
    finite[-1, -1] = 0
    want = torch.einsum("sec,ecm->sm", combine.double(), finite.double()).float()
    for kernels in (True, False):
        with use_kernels(kernels):
            out = ops.static_combine(expert_out, combine)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- the layer, and compile --------------------------------------------------------------------------


@given(
    seed=seeds,
    batch_shape=st.sampled_from([(0,), (5,), (2, 3), (3, 0), (17,)]),
    num_experts=st.integers(1, 8),
    k_fraction=st.floats(0.0, 1.0),
    activation=st.sampled_from(ops.ACTIVATIONS),
    scoring=st.sampled_from(ops.SCORINGS),
    renormalize=st.booleans(),
    expert_bias=st.booleans(),
    transposed=st.booleans(),
    dtype=st.sampled_from(FLOATS),
)
def test_moe_layer_matches_reference(
    seed, batch_shape, num_experts, k_fraction, activation, scoring, renormalize, expert_bias, transposed, dtype
):
    torch.manual_seed(seed)
    k = 1 + int(k_fraction * (num_experts - 1))
    layer = moe_infer.MoELayer(
        12,
        6,
        num_experts,
        k,
        activation=activation,
        scoring=scoring,
        renormalize=renormalize,
        expert_bias=expert_bias,
        weights_transposed=transposed,
        dtype=dtype,
    ).eval()
    hidden = torch.randn(*batch_shape, 12).to(dtype)
    with torch.no_grad():
        out = layer(hidden)
        # Route exactly as the layer did (bf16 logits may tie differently in another dtype).
        logits = layer.gate(hidden.reshape(-1, 12))
        want = ref.layer_forward(layer, hidden, torch.float64, router_logits=logits.double())
    assert out.shape == hidden.shape and out.dtype == dtype
    _close(out, want, dtype)


@settings(max_examples=6)
@given(
    seed=seeds,
    num_tokens=st.integers(1, 20),
    num_experts=st.integers(2, 6),
    activation=st.sampled_from(["silu_glu", "gelu", "gpt_oss_swiglu"]),
)
def test_compiled_layer_matches_eager(seed, num_tokens, num_experts, activation):
    torch.manual_seed(seed)
    layer = moe_infer.MoELayer(8, 4, num_experts, 2, activation=activation).eval()
    hidden = torch.randn(num_tokens, 8)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden), layer(hidden), rtol=1e-5, atol=1e-6)
