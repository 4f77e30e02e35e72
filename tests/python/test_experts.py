"""moe_infer.experts: one spec of the expert weights, one execution protocol for every backend."""

import pytest
import torch
from torch import nn

from moe_infer import ops
from moe_infer import reference as ref
from moe_infer.buffer import ExpertStore
from moe_infer.buffer.runtime import ExpertBuffer
from moe_infer.experts import ExpertSpec, LocalExperts, MoEExperts, expert_spec

from conftest import relative_error


def routing(num_tokens, num_experts, top_k):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[0, -1] = -1  # an unrouted pair
    return torch.rand(num_tokens, top_k), ids


def expected(experts: MoEExperts, hidden, weights, ids):
    """The plain-PyTorch loop over (token, slot) pairs."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    spec = experts.spec
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            row = ref.expert_ffn(
                hidden[t : t + 1].double(),
                spec.fc1_weight[e].double(),
                None if spec.fc1_bias is None else spec.fc1_bias[e].double(),
                spec.fc2_weight[e].double(),
                None if spec.fc2_bias is None else spec.fc2_bias[e].double(),
                spec.activation,
                spec.weights_transposed,
                spec.swiglu_alpha,
                spec.swiglu_limit,
            )
            out[t] += float(weights[t, j]) * row[0]
    return out


@pytest.mark.parametrize(
    "options",
    [
        dict(activation="silu_glu"),
        dict(activation="gelu_tanh_glu", bias=True),
        dict(activation="relu", transposed=True),
    ],
    ids=["silu_glu", "gelu_tanh_glu_bias", "relu_transposed"],
)
def test_every_backend_is_called_the_same_way(options):
    """run(hidden, topk_weights, topk_ids) -> [S, H]: the local experts and the expert buffer agree
    with the reference (the expert-parallel backend: test_distributed.py)."""
    experts = MoEExperts(
        6,
        16,
        12,
        options["activation"],
        options.get("bias", False),
        options.get("transposed", False),
        dtype=torch.float32,
    )
    hidden = torch.randn(9, 16)
    weights, ids = routing(9, 6, 2)
    want = expected(experts, hidden, weights, ids)
    spec = experts.spec
    store = ExpertStore.from_tensors(spec.fc1_weight, spec.fc2_weight, spec.fc1_bias, spec.fc2_bias)
    backends = {
        "local": LocalExperts(experts),
        "buffer": ExpertBuffer(store, 2, "cpu", "lru", spec.activation, spec.weights_transposed),
    }
    with torch.no_grad():
        for name, backend in backends.items():
            assert relative_error(backend.run(hidden, weights, ids), want) < 1e-5, name


def test_ops_take_the_spec():
    experts = MoEExperts(4, 8, 6, "gelu_glu", bias=True)
    spec = experts.spec
    assert isinstance(spec, ExpertSpec) and (spec.num_experts, spec.hidden_size, spec.ffn_size) == (4, 8, 6)
    rows = torch.randn(10, 8)
    offsets = torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32)
    with torch.no_grad():
        loose = ops.grouped_mlp(rows, offsets, *spec)
        assert torch.equal(ops.grouped_mlp(rows, offsets, spec), loose)
        weights, ids = routing(5, 4, 2)
        plan = ops.dispatch_plan(ids, 4)
        assert torch.equal(
            ops.grouped_mlp_combine(rows[:5], weights, plan, spec),
            ops.grouped_mlp_combine(rows[:5], weights, plan, *spec),
        )


def test_spec_of_a_module_it_cannot_compute_is_refused():
    with pytest.raises(NotImplementedError, match="Linear is not a stacked experts module"):
        expert_spec(nn.Linear(4, 4))
    assert expert_spec(MoEExperts(2, 4, 4), activation="relu_glu").activation == "relu_glu"


def test_activation_table_comes_from_the_extension():
    table = ops.ACTIVATION_TABLE
    assert {"gelu_glu", "gelu_tanh_glu", "relu_glu", "silu_glu", "gpt_oss_swiglu"} <= set(table)
    assert all(table[name].gated for name in ("gelu_glu", "gelu_tanh_glu", "relu_glu", "silu_glu"))
    assert not any(table[name].gated for name in ("relu", "gelu", "gelu_tanh", "silu"))
    assert table["gpt_oss_swiglu"].swiglu_params and not table["silu_glu"].swiglu_params
    assert [ops.gated_activation(u) for u in ("silu", "gelu", "gelu_tanh", "relu")] == [
        "silu_glu",
        "gelu_glu",
        "gelu_tanh_glu",
        "relu_glu",
    ]
