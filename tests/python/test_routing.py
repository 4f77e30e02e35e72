"""Which experts topk_gating picks, ties included: exactly torch.topk's choice on the same device.

The reference is transformers' own sequence of torch calls for each scoring mode (softmax of the
logits in float32 then torch.topk; torch.topk of the logits; sigmoid + selection bias with
group-limited torch.topk), on logits with many ties: router logits in bfloat16 tie often.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_infer import ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(8, 1), (8, 2), (16, 4), (64, 8), (128, 1), (128, 2), (256, 8), (300, 3)]  # (E, k)


def tied_logits(num_tokens, num_experts, dtype, device):
    """Logits from few distinct values (most rows tie), bfloat16-like values near 0, and all-tie rows."""
    coarse = torch.randint(-2, 3, (num_tokens, num_experts), device=device).float() * 0.5
    fine = torch.randn(num_tokens, num_experts, device=device) * 1e-3  # dense near 0: ties after rounding
    logits = torch.where(torch.rand(num_tokens, 1, device=device) < 0.5, coarse, fine).to(dtype)
    logits[::7] = 0  # every expert tied
    logits[3::7] = logits[3::7, :1]  # every expert tied, at another value
    return logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts, k", SHAPES)
def test_softmax_picks_what_torch_topk_picks(device, dtype, num_experts, k):
    logits = tied_logits(200, num_experts, dtype, device)
    probs = F.softmax(logits.float(), dim=-1)  # Mixtral / Qwen / OLMoE
    expected_weights, expected_ids = torch.topk(probs, k, dim=-1)
    weights, ids = ops.topk_gating(logits, k)
    assert torch.equal(ids.long(), expected_ids)
    assert torch.equal(weights, expected_weights)
    _, ids = ops.topk_gating(logits, k, "softmax", True)
    assert torch.equal(ids.long(), expected_ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts, k", SHAPES)
def test_softmax_topk_picks_what_torch_topk_picks(device, dtype, num_experts, k):
    logits = tied_logits(200, num_experts, dtype, device)
    top_logits, expected_ids = torch.topk(logits, k, dim=-1)  # GPT-OSS: top-k of the logits
    weights, ids = ops.topk_gating(logits, k, "softmax_topk")
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, F.softmax(top_logits.float(), dim=-1), rtol=1e-6, atol=1e-7)


def deepseek_v3_route(logits, k, bias, n_group, topk_group):
    """transformers' DeepseekV3TopkRouter after its linear layer (sorted=False, as there)."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, choice.shape[1] // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, choice.shape[1] // n_group).reshape(choice.shape)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.topk(choice, k=k, dim=-1, sorted=False)[1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_experts, k, n_group, topk_group", [(16, 4, 4, 2), (64, 8, 8, 4), (256, 8, 8, 4), (32, 2, 1, 1)]
)
def test_sigmoid_with_bias_and_groups_picks_what_transformers_picks(device, dtype, num_experts, k, n_group, topk_group):
    logits = tied_logits(200, num_experts, dtype, device)
    bias = (torch.randint(0, 3, (num_experts,), device=device) * 0.25).float()  # ties stay ties
    expected = deepseek_v3_route(logits, k, bias, n_group, topk_group)
    _, ids = ops.topk_gating(logits, k, "sigmoid", True, bias, 2.5, n_group, topk_group)
    # The same experts; transformers leaves them unsorted, topk_gating puts the best first.
    assert torch.equal(ids.long().sort(-1).values, expected.sort(-1).values)
    choice = logits.float().sigmoid() + bias
    chosen = choice.gather(1, ids.long())
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()


def test_all_tie_rows_in_every_regime(device):
    """k * 64 <= E is torch's partial-sort regime on the CPU, otherwise nth_element."""
    for num_experts, k in [(4, 4), (8, 8), (64, 1), (128, 2), (512, 8), (1000, 5)]:
        logits = torch.zeros(3, num_experts, dtype=torch.bfloat16, device=device)
        expected = torch.topk(F.softmax(logits.float(), dim=-1), k, dim=-1).indices
        assert torch.equal(ops.topk_gating(logits, k)[1].long(), expected)


def test_random_bfloat16_router_logits_route_as_transformers(device):
    """The issue's case: a Mixtral router in bfloat16 over many tokens ties often near the top."""
    hidden = torch.randn(20000, 64, dtype=torch.bfloat16, device=device)
    weight = torch.randn(8, 64, dtype=torch.bfloat16, device=device) * 0.02
    logits = F.linear(hidden, weight)
    expected = torch.topk(F.softmax(logits.float(), dim=-1), 2, dim=-1).indices
    probs = F.softmax(logits.float(), dim=-1)
    assert (probs.topk(3, dim=-1).values.diff(dim=-1) == 0).any()  # ties occur among the top 3
    assert torch.equal(ops.topk_gating(logits, 2, "softmax", True)[1].long(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts", [8, 64, 128])
def test_static_gates_follow_fairseqs_argmax(device, dtype, num_experts):
    """The static (fairseq) gates pick fairseq's experts, not torch.topk's: Top1Gate / Top2Gate take
    torch.argmax of the float32 gates (ties -> the first expert), then the argmax of the logits
    without the first expert (the "all" policy)."""
    logits = tied_logits(200, num_experts, dtype, device)
    gates = F.softmax(logits.float(), dim=1)
    first = torch.argmax(gates, dim=1)
    others = logits.float().masked_fill(F.one_hot(first, num_experts).bool(), float("-inf"))
    second = torch.argmax(others, dim=1)
    routing = ops.static_gating(logits, 2, 200, second_expert_policy="all")
    assert torch.equal(routing.expert_ids.long(), torch.stack([first, second], dim=1))
    assert torch.equal(ops.static_gating(logits, 1, 200).expert_ids.long()[:, 0], first)
