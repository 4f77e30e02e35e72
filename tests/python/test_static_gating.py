"""The static gating ops against hand-computed cases and the plain-PyTorch re-implementation of
fairseq's gates (moe_infer.reference.fairseq_top{1,2}gating), on the kernels and on the composite
ATen fallback (the `impl` fixture)."""

import itertools
import math

import pytest
import torch

from moe_infer import ops
from moe_infer import reference as ref

from conftest import argument_error, tolerance, use_kernels


def logits_of(gate_rows, device="cpu"):
    """Router logits whose softmax is exactly the given gate rows (up to rounding)."""
    return torch.tensor(gate_rows, dtype=torch.float64, device=device).log().float()


def dense(routing, num_experts, capacity):
    return ops.static_routing_tensors(
        routing.expert_ids, routing.locations, routing.topk_weights, num_experts, capacity
    )


# ---- hand-computed cases --------------------------------------------------------------------


def test_static_capacity_formulas():
    # Top-1 training: int(capacity_factor * ceil(S / E)); top-2 training: 2 * ceil(S / E).
    assert ops.static_capacity(10, 4, 1, capacity_factor=1.0) == 3
    assert ops.static_capacity(10, 4, 1, capacity_factor=1.5) == 4  # int(1.5 * 3)
    assert ops.static_capacity(10, 4, 2) == 6
    assert ops.static_capacity(1000, 128, 2) == 16
    # Eval with a token fraction: ceil(fraction * S), whatever E and k; S counts padding tokens.
    assert ops.static_capacity(10, 4, 2, eval_capacity_token_fraction=0.25, eval_mode=True) == 3
    assert ops.static_capacity(4096, 128, 2, eval_capacity_token_fraction=0.25, eval_mode=True) == 1024
    # moe_eval_capacity_max_seqlen: the fraction of a fixed length instead of S.
    assert ops.static_capacity(10, 4, 2, eval_capacity_token_fraction=0.5, eval_mode=True, eval_capacity_length=7) == 4
    # A fraction <= 0 in eval falls back to the training formula; training ignores the fraction.
    assert ops.static_capacity(10, 4, 2, eval_capacity_token_fraction=0.0, eval_mode=True) == 6
    assert ops.static_capacity(10, 4, 2, eval_capacity_token_fraction=-1.0, eval_mode=True) == 6
    assert ops.static_capacity(10, 4, 2, eval_capacity_token_fraction=0.25, eval_mode=False) == 6
    for num_tokens, num_experts in itertools.product([1, 7, 64, 1000], [1, 3, 64]):
        per_expert = math.ceil(num_tokens / num_experts)
        assert ops.static_capacity(num_tokens, num_experts, 2) == 2 * per_expert
        for factor in (0.5, 1.0, 2.0):
            if int(factor * per_expert) >= 1:
                assert ops.static_capacity(num_tokens, num_experts, 1, factor) == int(factor * per_expert)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(num_tokens=10, num_experts=16, top_k=1, capacity_factor=0.5),
            r"capacity is 0 \(int\(capacity_factor 0.5",
        ),
        (
            dict(num_tokens=10, num_experts=4, top_k=2, capacity_factor=None, eval_mode=True),
            r"eval_capacity_token_fraction \(0.0\) <= 0 selects the training formula, but capacity_factor is None",
        ),
        (
            dict(num_tokens=10, num_experts=4, top_k=2, capacity_factor=None),
            r"training mode .* capacity_factor is None",
        ),
        (dict(num_tokens=10, num_experts=4, top_k=1, capacity_factor=0.0), r"capacity_factor \(0.0\) must be > 0"),
        (dict(num_tokens=0, num_experts=4, top_k=2), r"capacity is 0"),
        (
            dict(num_tokens=10, num_experts=4, eval_capacity_token_fraction=float("nan"), eval_mode=True),
            r"eval_capacity_token_fraction is NaN",
        ),
        (dict(num_tokens=10, num_experts=0), r"num_experts \(0\) must be >= 1"),
        (dict(num_tokens=8, num_experts=4, capacity_factor=float("inf")), r"capacity_factor \(inf\) must be finite"),
        (dict(num_tokens=-3, num_experts=4), r"num_tokens \(-3\) must be >= 0"),
        (dict(num_tokens=8, num_experts=4, top_k=0), r"top_k \(0\) must be >= 1"),
        (
            dict(num_tokens=8, num_experts=4, eval_capacity_token_fraction=float("inf"), eval_mode=True),
            r"eval_capacity_token_fraction \(inf\) must be finite",
        ),
    ],
)
def test_static_capacity_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.static_capacity(**kwargs)


def test_top1_capacity_drops_and_l_aux(device, impl):
    # Experts chosen: 0, 0, 1, 0, 0. Capacity 3 (training formula): token 4 overflows expert 0.
    gates = [[0.75, 0.25], [0.75, 0.25], [0.2, 0.8], [0.75, 0.25], [0.75, 0.25]]
    logits = logits_of(gates, device)
    capacity = ops.static_capacity(5, 2, 1, capacity_factor=1.0)
    assert capacity == 3
    r = ops.static_gating(logits, 1, capacity)
    assert r.expert_ids.flatten().tolist() == [0, 0, 1, 0, 0]
    assert r.locations.flatten().tolist() == [0, 1, 0, 2, 3]
    torch.testing.assert_close(r.topk_weights.flatten(), torch.tensor([0.75, 0.75, 0.8, 0.75, 0.0], device=device))
    # l_aux = E * sum_e mean_s(gates[:, e]) * (routed first choices of e / S) = 2 * (0.64 * 0.8 + 0.36 * 0.2)
    torch.testing.assert_close(r.l_aux, torch.tensor(1.168, device=device))
    combine, mask = dense(r, 2, capacity)
    assert combine.shape == mask.shape == (5, 2, 3) and combine.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.nonzero().tolist() == [[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 0, 2]]
    assert combine[2, 1, 0] == r.topk_weights[2, 0] and combine[4].abs().sum() == 0
    # Eval capacity ceil(0.25 * 5) = 2: token 3 is dropped as well.
    r = ops.static_gating(logits, 1, ops.static_capacity(5, 2, 1, eval_capacity_token_fraction=0.25, eval_mode=True))
    assert r.topk_weights[:, 0].tolist() == pytest.approx([0.75, 0.75, 0.8, 0.0, 0.0])


@pytest.mark.parametrize("normalize_before", [False, True])
def test_top2_normalisation_before_and_after_dropping(device, impl, normalize_before):
    gates = [[0.5, 0.3, 0.2]] * 3 + [[0.2, 0.3, 0.5]]
    r = ops.static_gating(logits_of(gates, device), 2, 2, normalize_before_dropping=normalize_before)
    assert r.expert_ids.tolist() == [[0, 1], [0, 1], [0, 1], [2, 1]]
    # First choices take slots first; second choices queue after all first choices of the expert.
    assert r.locations.tolist() == [[0, 0], [1, 1], [2, 2], [0, 3]]
    expected = [[0.625, 0.375], [0.625, 0.375], [0.0, 0.0]]
    # Token 3 lost its second expert: after dropping it renormalises to 1; before, it keeps 0.625.
    expected.append([0.625, 0.0] if normalize_before else [1.0, 0.0])
    torch.testing.assert_close(r.topk_weights, torch.tensor(expected, device=device))
    combine, mask = dense(r, 3, 2)
    assert mask.sum().item() == 5 and combine[2].abs().sum() == 0  # token 2 is dropped entirely


def test_batch_prioritized_routing(device, impl):
    # Best gates 0.5, 0.5, 0.6, 0.7: with priority, token 3 then 2 then 0 then 1 take slots.
    gates = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]
    logits = logits_of(gates, device)
    plain = ops.static_gating(logits, 1, 2)
    assert plain.locations[:, 0].tolist() == [0, 1, 2, 0]  # token 2 dropped
    prioritized = ops.static_gating(logits, 1, 2, batch_prioritized_routing=True)
    assert prioritized.locations[:, 0].tolist() == [1, 2, 0, 0]  # token 1 dropped instead
    assert (prioritized.topk_weights[:, 0] > 0).tolist() == [True, False, True, True]
    # Top-2: second choices are ordered by the same priority, after all first choices.
    r = ops.static_gating(logits, 2, 8, batch_prioritized_routing=True)
    assert r.expert_ids[:, 1].tolist() == [1, 1, 1, 1] and r.locations[:, 1].tolist() == [2, 3, 1, 0]


def test_padding_tokens_take_no_slot(device, impl):
    logits = logits_of([[0.9, 0.1]] * 4, device)
    padding = torch.tensor([True, False, False, False], device=device)
    r = ops.static_gating(logits, 2, 2, padding)
    assert r.locations.tolist() == [[-1, -1], [0, 0], [1, 1], [2, 2]]
    assert r.topk_weights[0].tolist() == [0.0, 0.0] and (r.topk_weights[3] == 0).all()
    # l_aux averages over all 4 tokens (padding included) but counts only routed first choices.
    torch.testing.assert_close(r.l_aux, torch.tensor(2 * (0.9 * 3 / 4), device=device))
    combine, mask = dense(r, 2, 2)
    assert not mask[0].any() and not mask[3].any()


def test_random_policy_keeps_second_expert_if_twice_its_gate_beats_the_sample(device, impl):
    logits = logits_of([[0.6, 0.3, 0.1]] * 3, device)
    uniform = torch.tensor([0.5, 0.7, 0.61], device=device)  # 2 * 0.3 = 0.6 > 0.5 only
    r = ops.static_gating(logits, 2, 8, None, "random", uniform)
    assert r.locations[:, 1].tolist() == [0, -1, -1]
    torch.testing.assert_close(r.topk_weights, torch.tensor([[2 / 3, 1 / 3], [1.0, 0.0], [1.0, 0.0]], device=device))
    # Normalised before dropping, the comparison uses the normalised gate: 2 * 1/3 = 0.667.
    r = ops.static_gating(logits, 2, 8, None, "random", uniform, normalize_before_dropping=True)
    assert r.locations[:, 1].tolist() == [0, -1, 1]


def test_sampling_policy_picks_the_noisy_argmax_but_weights_the_clean_gates(device, impl):
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * 2, device=device)
    noise = torch.tensor([[0.0, 0.0, 5.0, 0.0], [9.0, 0.0, 0.0, 0.0]], device=device)
    r = ops.static_gating(logits, 2, 8, None, "sampling", noise)
    # Token 1's noise favours expert 0, but that is its first expert: excluded.
    assert r.expert_ids.tolist() == [[0, 2], [0, 1]]
    gates = torch.softmax(logits[0], -1)
    expected = torch.stack([gates[[0, 2]] / gates[[0, 2]].sum(), gates[[0, 1]] / gates[[0, 1]].sum()])
    torch.testing.assert_close(r.topk_weights, expected)


def test_ties_go_to_the_lower_expert(device, impl):
    r = ops.static_gating(torch.zeros(2, 4, device=device), 2, 4)
    assert r.expert_ids.tolist() == [[0, 1], [0, 1]]


def test_dispatch_and_combine_hand_case(device, impl):
    hidden = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
    mask = torch.zeros(3, 2, 2, dtype=torch.bool, device=device)
    mask[0, 1, 0] = mask[1, 0, 1] = mask[2, 1, 1] = mask[0, 0, 0] = True
    rows = ops.static_dispatch(hidden, mask)
    assert rows.shape == (2, 2, 4)
    assert torch.equal(rows[0, 0], hidden[0]) and torch.equal(rows[0, 1], hidden[1])
    assert torch.equal(rows[1, 0], hidden[0]) and torch.equal(rows[1, 1], hidden[2])
    mask[2, 1, 1] = False
    assert (ops.static_dispatch(hidden, mask)[1, 1] == 0).all()  # a placeholder slot
    weights = torch.zeros(3, 2, 2, device=device)
    weights[0, 0, 0], weights[0, 1, 0], weights[2, 1, 1] = 0.25, 0.75, 2.0
    out = ops.static_combine(rows, weights)
    torch.testing.assert_close(out[0], 0.25 * rows[0, 0] + 0.75 * rows[1, 0])
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[2], 2.0 * rows[1, 1])


# ---- against the fairseq re-implementation, fresh random inputs ----------------------------

GRID = [
    # (top_k, policy, normalize_before, batch_prioritized, padding, eval_mode)
    (1, "all", False, False, False, True),
    (1, "all", False, False, True, False),
    (1, "all", False, True, True, True),
    (2, "all", False, False, False, True),
    (2, "all", True, False, True, True),
    (2, "all", False, True, True, False),
    (2, "sampling", False, False, True, True),
    (2, "sampling", True, True, False, True),
    (2, "random", False, False, True, True),
    (2, "random", True, False, False, False),
    (2, "random", False, True, True, True),
]


def fairseq_reference(logits, top_k, policy, normalize_before, prioritized, padding, eval_mode, fraction, noise):
    if top_k == 1:
        assert not prioritized  # fairseq's top-1 has no batch-prioritised routing: emulate below
        return ref.fairseq_top1gating(logits, padding, 1.0, eval_mode, fraction)
    return ref.fairseq_top2gating(
        logits, padding, policy, normalize_before, eval_mode, fraction, prioritized, second_expert_noise=noise
    )


@pytest.mark.parametrize("top_k,policy,normalize_before,prioritized,with_padding,eval_mode", GRID)
@pytest.mark.parametrize("num_tokens,num_experts", [(1, 2), (37, 4), (300, 16)])
def test_matches_fairseq_reference(
    device, impl, top_k, policy, normalize_before, prioritized, with_padding, eval_mode, num_tokens, num_experts
):
    logits = torch.randn(num_tokens, num_experts, device=device) * 2
    padding = (torch.rand(num_tokens, device=device) < 0.2) if with_padding else None
    fraction = 0.25
    capacity = ops.static_capacity(num_tokens, num_experts, top_k, 1.0, fraction, eval_mode)
    noise = ops.second_expert_noise(policy, logits)
    r = ops.static_gating(logits, top_k, capacity, padding, policy, noise, normalize_before, prioritized)
    combine, mask = dense(r, num_experts, capacity)
    if top_k == 1 and prioritized:
        # fairseq's top-1 gate has no priority option; the same routing, tokens reordered by
        # their best gate, must give the same slots.
        order = torch.sort(-torch.softmax(logits, -1).max(-1).values, stable=True).indices
        _, want_combine, want_mask, want_capacity = ref.fairseq_top1gating(
            logits[order], None if padding is None else padding[order], 1.0, eval_mode, fraction
        )
        inverse = torch.argsort(order)
        want_combine, want_mask = want_combine[inverse], want_mask[inverse]
        want_l_aux = ref.fairseq_top1gating(logits, padding, 1.0, eval_mode, fraction)[0]
    else:
        want_l_aux, want_combine, want_mask, want_capacity = fairseq_reference(
            logits, top_k, policy, normalize_before, prioritized, padding, eval_mode, fraction, noise
        )
    assert want_capacity == capacity
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(combine, want_combine, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.l_aux, want_l_aux.float(), rtol=1e-5, atol=1e-6)
    # The per-pair form agrees with the dense one: kept pairs are exactly the nonzero weights.
    kept = (r.locations >= 0) & (r.locations < capacity)
    assert torch.equal(kept & (r.topk_weights != 0), (r.topk_weights != 0))
    assert int(mask.sum()) == int((r.topk_weights != 0).sum())


@pytest.mark.parametrize("policy", ["sampling", "random"])
def test_same_seed_draws_fairseqs_noise(impl, policy):
    """second_expert_noise draws from the global generator exactly as fairseq does."""
    logits = torch.randn(200, 8)
    torch.manual_seed(1234)
    noise = ops.second_expert_noise(policy, logits)
    r = ops.static_gating(logits, 2, 400, None, policy, noise)
    torch.manual_seed(1234)
    _, want_combine, want_mask, _ = ref.fairseq_top2gating(
        logits, None, policy, eval_mode=True, eval_capacity_token_fraction=2.0
    )
    combine, mask = dense(r, 8, 400)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(combine, want_combine, rtol=1e-6, atol=1e-6)
    generator = torch.Generator().manual_seed(1234)
    assert torch.equal(ops.second_expert_noise(policy, logits, generator), noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatch_and_combine_match_einsum(device, impl, dtype):
    num_tokens, num_experts, hidden_size = 300, 8, 40
    logits = torch.randn(num_tokens, num_experts, device=device)
    capacity = 50
    r = ops.static_gating(logits, 2, capacity, None, "all")
    combine, mask = dense(r, num_experts, capacity)
    wide = torch.randn(num_tokens, 2 * hidden_size, device=device).to(dtype)
    hidden = wide[:, ::2]  # strided rows and columns
    rows = ops.static_dispatch(hidden, mask)
    assert rows.dtype == dtype and rows.shape == (num_experts, capacity, hidden_size)
    want_rows = torch.einsum("sec,sm->ecm", mask.double(), hidden.double())
    assert torch.equal(rows.double(), want_rows)  # a copy: exact
    expert_out = torch.randn(num_experts, capacity, hidden_size, device=device).to(dtype)
    out = ops.static_combine(expert_out, combine)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden_size)
    want = torch.einsum("sec,ecm->sm", combine.double(), expert_out.double())
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)


def test_dispatch_wide_buffer(device, impl):
    """More slots than one scan block (4096), a token per slot across block boundaries."""
    num_tokens, num_experts, capacity = 3000, 3, 2000
    r = ops.static_gating(torch.randn(num_tokens, num_experts, device=device), 2, capacity)
    combine, mask = dense(r, num_experts, capacity)
    hidden = torch.randn(num_tokens, 5, device=device)
    rows = ops.static_dispatch(hidden, mask)
    assert torch.equal(rows, torch.einsum("sec,sm->ecm", mask.float(), hidden))


@pytest.mark.parametrize("top_k,policy,normalize_before,prioritized", [g[:4] for g in GRID])
def test_composite_equals_kernels_on_ties_and_infinities(device, top_k, policy, normalize_before, prioritized):
    """Logits on a coarse grid (exact ties), -inf entries (rows with a single finite expert leave
    only -inf candidates for the second choice) and, for 'sampling', NaN noise: the composite
    routes exactly as the kernels do."""
    num_tokens, num_experts = 400, 6
    logits = torch.randint(-3, 3, (num_tokens, num_experts), device=device) / 2
    logits[torch.rand(num_tokens, num_experts, device=device) < 0.2] = float("-inf")
    logits[:20, 1:] = float("-inf")
    logits[20:40, :-1] = float("-inf")
    logits[logits.isinf().all(-1), 2] = 0.0
    noise = ops.second_expert_noise(policy, logits)
    if policy == "sampling":
        noise[torch.rand(num_tokens, num_experts, device=device) < 0.1] = float("nan")
    padding = torch.rand(num_tokens, device=device) < 0.1
    capacity = ops.static_capacity(num_tokens, num_experts, top_k, 0.5)
    args = (logits, top_k, capacity, padding, policy, noise, normalize_before, prioritized)
    got = ops.static_gating(*args)
    with use_kernels(False):
        fallback = ops.static_gating(*args)
        fallback_dense = dense(fallback, num_experts, capacity)
    assert torch.equal(got.expert_ids, fallback.expert_ids) and torch.equal(got.locations, fallback.locations)
    assert (got.expert_ids[:, 0] != got.expert_ids[:, -1]).all() or top_k == 1
    torch.testing.assert_close(got.topk_weights, fallback.topk_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.l_aux, fallback.l_aux, rtol=1e-6, atol=1e-7)
    combine, mask = dense(got, num_experts, capacity)
    assert torch.equal(mask, fallback_dense[1])
    torch.testing.assert_close(combine, fallback_dense[0], rtol=1e-6, atol=1e-7)


def test_dispatch_names_the_same_conflict_on_every_impl(device, impl):
    """The error names the conflict the CPU kernel meets first: tokens in order, within the first
    block of 4096 slots that has one (here slot 100 of expert 2, not the lower slot 50)."""
    mask = torch.zeros(8, 100, 50, dtype=torch.bool, device=device)
    mask[3, 2, 0] = mask[4, 2, 0] = True
    mask[5, 1, 0] = mask[6, 1, 0] = True
    mask[0, 99, 0] = mask[1, 99, 0] = True  # slot 4950: a later block
    with pytest.raises(ValueError, match=r"puts tokens 3 and 4 in slot 0 of expert 2;"):
        ops.static_dispatch(torch.randn(8, 4, device=device), mask)


# ---- op contracts ---------------------------------------------------------------------------


def test_opcheck_static_ops(device, impl):
    num_tokens, num_experts, hidden_size = 11, 5, 6
    logits = torch.randn(num_tokens, num_experts, device=device, requires_grad=True)
    padding = torch.rand(num_tokens, device=device) < 0.3
    for args in (
        (logits, 1, 3, None, "all", None, False, True),
        (logits, 2, 4, padding, "sampling", ops.second_expert_noise("sampling", logits), True, False),
    ):
        torch.library.opcheck(torch.ops.moe_infer.static_gating, args)
    r = ops.static_gating(logits.detach(), 2, 4)
    weights = r.topk_weights.clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.moe_infer.static_routing_tensors, (r.expert_ids, r.locations, weights, num_experts, 4)
    )
    combine, mask = dense(r, num_experts, 4)
    hidden = torch.randn(num_tokens, hidden_size, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_infer.static_dispatch, (hidden, mask))
    expert_out = torch.randn(num_experts, 4, hidden_size, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_infer.static_combine, (expert_out, combine.requires_grad_(True)))


def static_moe(hidden, router_weight, fc1, fc2, capacity):
    """The whole static pipeline, as a function to compile."""
    num_experts = router_weight.shape[0]
    r = ops.static_gating(hidden @ router_weight.t(), 2, capacity)
    combine, mask = ops.static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, num_experts, capacity)
    rows = ops.static_dispatch(hidden, mask)
    offsets = torch.arange(0, (num_experts + 1) * capacity, capacity, dtype=torch.int32, device=hidden.device)
    rows = ops.grouped_mlp(rows.view(-1, hidden.shape[1]), offsets, fc1, None, fc2, None, "relu")
    return ops.static_combine(rows.view(num_experts, capacity, -1), combine), r.l_aux


def test_static_ops_under_torch_compile_fullgraph(device):
    num_experts, hidden_size, ffn = 6, 16, 12
    router = torch.randn(num_experts, hidden_size, device=device)
    fc1 = torch.randn(num_experts, ffn, hidden_size, device=device) / 4
    fc2 = torch.randn(num_experts, hidden_size, ffn, device=device) / 4
    compiled = torch.compile(static_moe, fullgraph=True)
    for num_tokens in (20,):
        hidden = torch.randn(num_tokens, hidden_size, device=device)
        capacity = ops.static_capacity(num_tokens, num_experts, 2)
        got, got_l_aux = compiled(hidden, router, fc1, fc2, capacity)
        want, want_l_aux = static_moe(hidden, router, fc1, fc2, capacity)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_l_aux, want_l_aux)
    torch._dynamo.reset()


STATIC_ARGUMENT_ERRORS = [
    (lambda d: ops.static_gating(torch.randn(4, 3, device=d), 3, 2), r"top_k \(3\) must be 1 or 2"),
    (lambda d: ops.static_gating(torch.randn(4, 1, device=d), 2, 2), r"top-2 gating needs num_experts >= 2, got 1"),
    (lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 0), r"capacity \(0\) must be >= 1"),
    (lambda d: ops.static_gating(torch.randn(4, 3, 1, device=d), 2, 2), r"router_logits must be 2-D"),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, None, "top"),
        r"second_expert_policy must be one of",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, None, "sampling"),
        r"policy 'sampling' needs second_expert_noise \(\[num_tokens, num_experts\] Gumbel",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, None, "random", torch.rand(4, 3, device=d)),
        r"'random' must have shape \[4\]",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, None, "all", torch.rand(4, device=d)),
        r"second_expert_noise must be None",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 1, 2, None, "sampling", torch.rand(4, 3, device=d)),
        r"applies to top-2 gating only",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, torch.zeros(4, device=d)),
        r"padding_mask must be bool",
    ),
    (
        lambda d: ops.static_gating(torch.randn(4, 3, device=d), 2, 2, torch.zeros(5, dtype=torch.bool, device=d)),
        r"padding_mask has 5 entries but router_logits has 4 tokens",
    ),
    pytest.param(
        lambda d: ops.static_gating(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]], device=d), 1, 2),
        r"router_logits row 1 contains NaN",
        marks=pytest.mark.data_dependent,
    ),
    pytest.param(
        lambda d: ops.static_routing_tensors(
            torch.tensor([[5]], device=d),
            torch.zeros(1, 1, dtype=torch.int32, device=d),
            torch.ones(1, 1, device=d),
            4,
            2,
        ),
        r"expert_ids\[0, 0\] = 5 is out of range for a kept pair",
        marks=pytest.mark.data_dependent,
    ),
    (
        lambda d: ops.static_routing_tensors(
            torch.zeros(2, 2, dtype=torch.int32, device=d),
            torch.zeros(2, 1, dtype=torch.int32, device=d),
            torch.ones(2, 2, device=d),
            4,
            2,
        ),
        r"must have the same shape",
    ),
    pytest.param(
        lambda d: ops.static_dispatch(torch.randn(3, 4, device=d), torch.ones(3, 2, 2, dtype=torch.bool, device=d)),
        r"dispatch_mask puts tokens 0 and 1 in slot 0 of expert 0; a capacity slot holds at most one token",
        marks=pytest.mark.data_dependent,
    ),
    (
        lambda d: ops.static_dispatch(torch.randn(3, 4, device=d), torch.zeros(2, 2, 2, dtype=torch.bool, device=d)),
        r"dispatch_mask has 2 tokens but hidden has 3",
    ),
    (
        lambda d: ops.static_dispatch(torch.randn(3, 4, device=d), torch.zeros(3, 2, 2, device=d)),
        r"dispatch_mask must be bool",
    ),
    (
        lambda d: ops.static_combine(torch.randn(2, 3, 4, device=d), torch.zeros(5, 2, 2, device=d)),
        r"disagree on \[num_experts, capacity\]",
    ),
]


@pytest.mark.parametrize("call,message", STATIC_ARGUMENT_ERRORS)
def test_static_op_argument_errors(device, impl, call, message):
    with pytest.raises(argument_error(message), match=message):
        call(device)


def test_empty_batch(device, impl):
    r = ops.static_gating(torch.randn(0, 4, device=device), 2, 1)
    assert r.expert_ids.shape == r.locations.shape == r.topk_weights.shape == (0, 2) and r.l_aux.item() == 0
    combine, mask = dense(r, 4, 1)
    assert combine.shape == (0, 4, 1)
    assert ops.static_dispatch(torch.randn(0, 3, device=device), mask).abs().sum() == 0
    assert ops.static_combine(torch.randn(4, 1, 3, device=device), combine).shape == (0, 3)
