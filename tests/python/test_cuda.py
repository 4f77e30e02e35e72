"""CUDA kernels against the CPU kernels, the composite fallback and the reference; CUDA graphs.

Every test here needs a CUDA device and skips without one (scripts/gpu_check.sh runs them). The
device-generic tests in the other files also run on CUDA when it is present.
"""

import pytest
import torch

import moe_infer
from moe_infer import ops
from moe_infer import reference as ref

from conftest import relative_error

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and moe_infer.built_with_cuda()), reason="needs a CUDA device and a CUDA build"
)
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_ids(num_tokens, num_experts, k, device, skew=False):
    if skew:  # most pairs on a few experts, many experts empty
        logits = torch.randn(num_tokens, num_experts) + torch.linspace(6, 0, num_experts)
    else:
        logits = torch.randn(num_tokens, num_experts)
    return logits.topk(k, -1).indices.to(device)


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 1000, 20000])
@pytest.mark.parametrize("num_experts,k", [(1, 1), (8, 2), (64, 6), (256, 8)])
@pytest.mark.parametrize("skew", [False, True])
def test_dispatch_plan_cuda_equals_cpu(num_tokens, num_experts, k, skew):
    ids = random_ids(num_tokens, num_experts, k, "cpu", skew)
    ids[torch.rand(ids.shape) < 0.05] = -1  # unrouted pairs
    for id_dtype in (torch.int32, torch.int64):
        cpu = ops.dispatch_plan(ids.to(id_dtype), num_experts)
        gpu = ops.dispatch_plan(ids.to(id_dtype).to(CUDA), num_experts)
        with ops.use_kernels(False):
            fallback = ops.dispatch_plan(ids.to(id_dtype).to(CUDA), num_experts)
        for a, b, c in zip(cpu, gpu, fallback):
            assert torch.equal(a, b.cpu()) and torch.equal(a, c.cpu())


def test_dispatch_plan_all_pairs_on_one_expert_cuda():
    ids = torch.full((5000, 2), 7, device=CUDA)
    plan = ops.dispatch_plan(ids, 16)
    assert plan.tokens_per_expert.tolist() == [0] * 7 + [10000] + [0] * 8
    assert torch.equal(plan.sorted_pair_ids.long(), torch.arange(10000, device=CUDA))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "scoring,renormalize,groups",
    [("softmax", True, (1, 1)), ("softmax_topk", False, (1, 1)), ("sigmoid", True, (8, 4))],
)
@pytest.mark.parametrize("num_tokens,num_experts,k", [(0, 8, 2), (1, 8, 2), (333, 64, 6), (2048, 256, 8)])
def test_topk_gating_cuda_equals_cpu(dtype, scoring, renormalize, groups, num_tokens, num_experts, k):
    n_group, topk_group = groups if num_experts % groups[0] == 0 and num_experts // groups[0] >= 2 else (1, 1)
    logits = (torch.randn(num_tokens, num_experts) * 2).to(dtype)
    bias = torch.randn(num_experts) * 0.1 if scoring == "sigmoid" else None
    args = (k, scoring, renormalize, bias, 2.0, n_group, topk_group)
    gpu_args = (k, scoring, renormalize, None if bias is None else bias.to(CUDA), 2.0, n_group, topk_group)
    w_cpu, id_cpu = ops.topk_gating(logits, *args)
    w_gpu, id_gpu = ops.topk_gating(logits.to(CUDA), *gpu_args)
    same = (id_cpu == id_gpu.cpu()).all(-1)
    assert num_tokens == 0 or same.float().mean() >= 0.99  # float rounding may flip near-ties only
    torch.testing.assert_close(w_gpu.cpu()[same], w_cpu[same], rtol=2e-6, atol=2e-6)
    ref_w, ref_ids = ref.topk_gating(logits.to(CUDA), *gpu_args)
    agree = (ref_ids.sort(-1).values == id_gpu.long().sort(-1).values).all(-1)
    assert num_tokens == 0 or agree.float().mean() >= 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [1, 37, 64, 4096])
@pytest.mark.parametrize("num_tokens,k", [(0, 2), (1, 1), (513, 8)])
def test_permute_combine_cuda_equals_cpu(dtype, hidden_size, num_tokens, k):
    ids = random_ids(num_tokens, 16, k, "cpu")
    plan = ops.dispatch_plan(ids, 16)
    hidden = torch.randn(num_tokens, hidden_size).to(dtype)
    rows_cpu = ops.permute(hidden, plan.sorted_pair_ids, k)
    rows_gpu = ops.permute(hidden.to(CUDA), plan.sorted_pair_ids.to(CUDA), k)
    assert torch.equal(rows_cpu, rows_gpu.cpu())
    weights = torch.rand(num_tokens, k)
    out_cpu = ops.unpermute_combine(rows_cpu, weights, plan.row_of_pair)
    out_gpu = ops.unpermute_combine(rows_gpu, weights.to(CUDA), plan.row_of_pair.to(CUDA))
    # Both accumulate in float32 in the same order (the GPU may fuse multiply-adds).
    torch.testing.assert_close(
        out_gpu.cpu().float(), out_cpu.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-5
    )


def test_cuda_index_values_are_memory_safe():
    """Unchecked on CUDA (no host sync): out-of-range rows read as zeros, never out of bounds."""
    hidden = torch.randn(3, 8, device=CUDA)
    rows = ops.permute(hidden, torch.tensor([0, 1, 2, 3, 4, 99], dtype=torch.int32, device=CUDA), 2)
    assert (rows[5] == 0).all() and torch.equal(rows[0], hidden[0])
    out = ops.unpermute_combine(
        rows, torch.ones(3, 2, device=CUDA), torch.tensor([0, 1, 2, 3, 4, 77], dtype=torch.int32, device=CUDA)
    )
    torch.testing.assert_close(out[2], rows[4])
    torch.cuda.synchronize()


def test_validate_false_is_memory_safe_and_raises_nothing():
    logits = torch.randn(4, 8, device=CUDA)
    logits[2, 3] = float("nan")
    weights, ids = ops.topk_gating(logits, 2, validate=False)
    assert torch.isnan(weights[2]).all() and ((ids >= 0) & (ids < 8)).all()
    plan = ops.dispatch_plan(torch.tensor([[0, 9], [1, -5]], device=CUDA), 8, validate=False)
    assert plan.expert_offsets[-1].item() == 2  # the two invalid ids are treated as unrouted
    torch.cuda.synchronize()


def expert_weights(num_experts, hidden_size, ffn_size, activation, bias, transposed, dtype):
    gated = activation in ("silu_glu", "gpt_oss_swiglu")
    fc1_out = 2 * ffn_size if gated else ffn_size
    fc1 = (
        torch.randn((num_experts, hidden_size, fc1_out) if transposed else (num_experts, fc1_out, hidden_size))
        / hidden_size**0.5
    )
    fc2 = (
        torch.randn((num_experts, ffn_size, hidden_size) if transposed else (num_experts, hidden_size, ffn_size))
        / ffn_size**0.5
    )
    b1 = torch.randn(num_experts, fc1_out) * 0.1 if bias else None
    b2 = torch.randn(num_experts, hidden_size) * 0.1 if bias else None
    return [None if t is None else t.to(dtype).to(CUDA) for t in (fc1, b1, fc2, b2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size,ffn_size", [(64, 32), (37, 20)])  # grouped-GEMM path, per-expert path
@pytest.mark.parametrize(
    "activation,bias,transposed",
    [("silu_glu", False, False), ("gpt_oss_swiglu", True, True), ("relu", True, False), ("gelu", False, False)],
)
def test_grouped_mlp_cuda_kernel_fallback_reference(dtype, hidden_size, ffn_size, activation, bias, transposed):
    num_experts = 8
    counts = torch.tensor([40, 0, 3, 97, 0, 1, 12, 0])  # empty experts included
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    num_rows = int(offsets[-1]) + 5  # unrouted rows
    hidden = torch.randn(num_rows, hidden_size).to(dtype).to(CUDA)
    fc1, b1, fc2, b2 = expert_weights(num_experts, hidden_size, ffn_size, activation, bias, transposed, dtype)
    args = (hidden, offsets.to(CUDA), fc1, b1, fc2, b2, activation, transposed)
    out = ops.grouped_mlp(*args)
    with ops.use_kernels(False):
        fallback = ops.grouped_mlp(*args)
    up = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    expected = ref.grouped_mlp(up(hidden), offsets, up(fc1), up(b1), up(fc2), up(b2), activation, transposed)
    limit = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out[-5:] == 0).all() and (fallback[-5:] == 0).all()
    assert relative_error(out.cpu(), expected) < limit
    assert relative_error(fallback.cpu(), expected) < limit


def make_layer(dtype, **kwargs):
    layer = moe_infer.MoELayer(device=CUDA, **kwargs).to(dtype).eval()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 4 / kwargs["hidden_size"] ** 0.5)
    return layer


@pytest.mark.parametrize(
    "options",
    [
        dict(num_experts=8, top_k=2, renormalize=True),
        dict(
            num_experts=64,
            top_k=6,
            scoring="sigmoid",
            selection_bias=True,
            n_group=8,
            topk_group=4,
            renormalize=True,
            scaling_factor=2.5,
        ),
    ],
    ids=["mixtral", "deepseek"],
)
def test_cuda_graph_capture_replay_equals_eager(options):
    layer = make_layer(torch.bfloat16, hidden_size=256, ffn_size=128, **options)
    static_x = torch.randn(96, 256, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                layer(static_x)  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_out, layer(x), rtol=0, atol=0)


def test_layer_cuda_equals_cpu_and_reference():
    layer = make_layer(torch.float32, hidden_size=128, ffn_size=96, num_experts=32, top_k=4, renormalize=True)
    x = torch.randn(500, 128, device=CUDA)
    with torch.no_grad():
        out = layer(x)
        cpu_layer = make_layer(
            torch.float32, hidden_size=128, ffn_size=96, num_experts=32, top_k=4, renormalize=True
        ).cpu()
        cpu_layer.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
        assert relative_error(out.cpu(), cpu_layer(x.cpu())) < 1e-4  # TF32-free float32 on both
        assert relative_error(out, ref.layer_forward(layer, x, compute_dtype=torch.float64)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mlp_combine_cuda_equals_cpu(dtype):
    """The fused expert compute + combine (the transformers integration's path) on CUDA runs
    permute -> grouped_mlp -> unpermute_combine; it equals the CPU's fused kernel."""
    num_tokens, num_experts, k, hidden_size, ffn_size = 300, 16, 2, 64, 32
    ids = random_ids(num_tokens, num_experts, k, "cpu")
    ids[5, 1] = -1  # an unrouted pair
    plan = ops.dispatch_plan(ids, num_experts)
    hidden = torch.randn(num_tokens, hidden_size).to(dtype)
    weights = torch.rand(num_tokens, k)
    fc1, b1, fc2, b2 = (
        t.cpu() for t in expert_weights(num_experts, hidden_size, ffn_size, "silu_glu", True, False, dtype)
    )
    cpu = ops.grouped_mlp_combine(hidden, weights, plan, fc1, b1, fc2, b2, "silu_glu")
    cuda_plan = ops.dispatch_plan(ids.to(CUDA), num_experts)
    gpu = ops.grouped_mlp_combine(
        hidden.to(CUDA), weights.to(CUDA), cuda_plan, fc1.to(CUDA), b1.to(CUDA), fc2.to(CUDA), b2.to(CUDA), "silu_glu"
    )
    assert relative_error(gpu.cpu(), cpu) < (1e-5 if dtype == torch.float32 else 2e-2)
