"""MoELayer against moe_infer.reference (a plain-PyTorch loop over experts)."""

import itertools

import pytest
import torch

import moe_infer
from moe_infer import reference as ref

from conftest import relative_error

DTYPE_LIMIT = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_layer(device, dtype=torch.float32, **kwargs):
    layer = moe_infer.MoELayer(**kwargs, device=device)
    with torch.no_grad():
        # Router weights large enough that routing is decisive (no near-ties) in every dtype.
        layer.gate.weight.normal_(0, 1.0 / kwargs["hidden_size"] ** 0.5 * 4)
    return layer.to(dtype)


def reference_in_float64(layer, x):
    """The reference run in float64 on upcast copies of the layer's own weights.

    Routing follows the layer's own (possibly bf16) router logits: a float64 router would break
    near-ties differently, which is a routing difference, not an error of the expert compute.
    """
    logits = layer.gate(x.reshape(-1, x.shape[-1]))
    return ref.layer_forward(layer, x, compute_dtype=torch.float64, router_logits=logits)


@pytest.mark.parametrize(
    "num_tokens,num_experts,k",
    [
        (s, e, k)
        for s, e, k in itertools.product([0, 1, 7, 1000], [1, 8, 64, 256], [1, 2, 4, 8])
        if k <= e and not (s == 1000 and e == 256 and k == 8)
    ],
)
def test_layer_matches_reference_grid(device, num_tokens, num_experts, k):
    layer = make_layer(device, hidden_size=37, ffn_size=24, num_experts=num_experts, top_k=k)
    x = torch.randn(num_tokens, 37, device=device)
    with torch.no_grad():
        out = layer(x)
        expected = ref.layer_forward(layer, x)
    assert out.shape == x.shape
    if num_tokens:
        assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "options",
    [
        dict(activation="silu_glu", renormalize=True),  # Mixtral / Qwen3 / OLMoE
        dict(
            activation="gpt_oss_swiglu",
            scoring="softmax_topk",
            router_bias=True,
            expert_bias=True,
            weights_transposed=True,
        ),
        dict(
            activation="silu_glu",
            scoring="sigmoid",
            renormalize=True,
            selection_bias=True,
            scaling_factor=2.5,
            n_group=4,
            topk_group=2,
        ),
        dict(activation="relu", expert_bias=True),  # fairseq / NLLB / Switch
        dict(activation="gelu"),
        dict(activation="gelu_tanh"),
        dict(activation="silu"),
        dict(activation="gelu_glu"),
        dict(activation="gelu_tanh_glu", expert_bias=True),
        dict(activation="relu_glu", weights_transposed=True),
    ],
    ids=[
        "mixtral",
        "gpt_oss",
        "deepseek_v3",
        "relu_bias",
        "gelu",
        "gelu_tanh",
        "silu",
        "gelu_glu",
        "gelu_tanh_glu",
        "relu_glu",
    ],
)
def test_layer_variants(device, impl, dtype, options):
    layer = make_layer(device, dtype, hidden_size=45, ffn_size=30, num_experts=16, top_k=4, **options)
    if layer.selection_bias is not None:
        layer.selection_bias.normal_(0, 0.05)
    x = torch.randn(3, 33, 45, device=device).to(dtype)  # [batch, seq, H]
    with torch.no_grad():
        out = layer(x)
        expected = reference_in_float64(layer, x)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, expected) < DTYPE_LIMIT[dtype]


def test_layer_all_tokens_on_one_expert(device):
    layer = make_layer(device, hidden_size=16, ffn_size=8, num_experts=8, top_k=1)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[5] = 1.0
    x = torch.rand(100, 16, device=device) + 0.1  # positive: expert 5 always wins
    with torch.no_grad():
        out = layer(x)
    expected = ref.expert_ffn(x, layer.experts.gate_up_proj[5], None, layer.experts.down_proj[5], None, "silu_glu")
    torch.testing.assert_close(out, expected * torch.softmax(layer.gate(x), -1)[:, 5:6])


def test_layer_non_contiguous_input(device):
    layer = make_layer(device, hidden_size=24, ffn_size=16, num_experts=8, top_k=2)
    x = torch.randn(24, 50, device=device).t()  # [50, 24], column-major
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref.layer_forward(layer, x.contiguous()))


def test_layer_gradients_match_reference(device, impl):
    options = dict(
        hidden_size=20, ffn_size=12, num_experts=8, top_k=2, renormalize=True, expert_bias=True, router_bias=True
    )
    layer = make_layer(device, **options)
    x = torch.randn(40, 20, device=device, requires_grad=True)
    grad = torch.randn(40, 20, device=device)
    layer(x).backward(grad)
    got = {name: p.grad.clone() for name, p in layer.named_parameters()}
    got_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    ref.layer_forward(layer, x).backward(grad)
    torch.testing.assert_close(x.grad, got_x)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


@pytest.mark.parametrize("activation", ["silu_glu", "gpt_oss_swiglu"])
def test_layer_under_torch_compile_fullgraph(device, activation):
    options = dict(activation=activation, expert_bias=activation == "gpt_oss_swiglu")
    layer = make_layer(device, hidden_size=32, ffn_size=16, num_experts=8, top_k=2, **options)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for num_tokens in (5, 64):  # a second shape: dynamic shapes must not break the graph
            x = torch.randn(num_tokens, 32, device=device)
            torch.testing.assert_close(compiled(x), layer(x))
    torch._dynamo.reset()


def test_layer_state_dict_names_follow_transformers():
    layer = moe_infer.MoELayer(hidden_size=8, ffn_size=4, num_experts=3, top_k=2, expert_bias=True)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "gate.weight": (3, 8),
        "experts.gate_up_proj": (3, 8, 8),
        "experts.down_proj": (3, 8, 4),
        "experts.gate_up_proj_bias": (3, 8),
        "experts.down_proj_bias": (3, 8),
    }
