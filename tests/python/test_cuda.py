"""CUDA kernels against the CPU kernels, the composite fallback and the reference; CUDA graphs.

Every test here needs a CUDA device and skips without one (scripts/gpu_check.sh runs them). The
device-generic tests in the other files also run on CUDA when it is present.
"""

import pytest
import torch

import moe_infer
from moe_infer import ops
from moe_infer import reference as ref

from conftest import relative_error, use_kernels

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
        with use_kernels(False):
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
    gated = ops.ACTIVATION_TABLE[activation].gated
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
    with use_kernels(False):
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


# ---- static gating --------------------------------------------------------------------------

STATIC_CONFIGS = [
    # (top_k, second_expert_policy, normalize_before_dropping)
    (1, "all", False),
    (2, "all", False),
    (2, "all", True),
    (2, "sampling", False),
    (2, "random", True),
]


def to_cuda(t):
    return None if t is None else t.to(CUDA)


def static_gating_on_both(logits, top_k, capacity, padding, policy, normalize_before, prioritized):
    noise = ops.second_expert_noise(policy, logits)
    args = (top_k, capacity)
    cpu = ops.static_gating(logits, *args, padding, policy, noise, normalize_before, prioritized)
    gpu = ops.static_gating(
        to_cuda(logits), *args, to_cuda(padding), policy, to_cuda(noise), normalize_before, prioritized
    )
    return cpu, gpu


@pytest.mark.parametrize("top_k,policy,normalize_before", STATIC_CONFIGS)
@pytest.mark.parametrize("num_tokens,num_experts", [(0, 8), (1, 8), (333, 64), (4096, 256)])
def test_static_gating_cuda_equals_cpu(top_k, policy, normalize_before, num_tokens, num_experts):
    # Logits on a grid of 1/4: equal logits tie exactly on both devices and distinct ones are far
    # apart, so softmax rounding cannot make the devices choose (and queue) differently.
    logits = torch.randint(-16, 16, (num_tokens, num_experts)) / 4
    padding = torch.rand(num_tokens) < 0.1
    capacity = max(1, num_tokens * top_k // (2 * num_experts))  # half the balanced load: drops
    cpu, gpu = static_gating_on_both(logits, top_k, capacity, padding, policy, normalize_before, False)
    assert torch.equal(cpu.expert_ids, gpu.expert_ids.cpu()) and torch.equal(cpu.locations, gpu.locations.cpu())
    torch.testing.assert_close(gpu.topk_weights.cpu(), cpu.topk_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.l_aux.cpu(), cpu.l_aux, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k,policy,normalize_before", STATIC_CONFIGS)
def test_static_gating_batch_prioritized_cuda_equals_cpu(top_k, policy, normalize_before):
    # Logits 0 or -inf: every gate is exactly 1/m (m finite logits in the row) on both devices, so
    # the priority order, full of ties broken by token, is the same on both.
    num_tokens, num_experts = 2000, 16
    finite = torch.rand(num_tokens, num_experts) < torch.rand(num_tokens, 1)
    finite[torch.arange(num_tokens), torch.randint(0, num_experts, (num_tokens,))] = True
    logits = torch.zeros(num_tokens, num_experts).masked_fill(~finite, float("-inf"))
    capacity = ops.static_capacity(num_tokens, num_experts, top_k, 0.5)
    cpu, gpu = static_gating_on_both(logits, top_k, capacity, None, policy, normalize_before, True)
    assert torch.equal(cpu.expert_ids, gpu.expert_ids.cpu()) and torch.equal(cpu.locations, gpu.locations.cpu())
    torch.testing.assert_close(gpu.topk_weights.cpu(), cpu.topk_weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(gpu.l_aux.cpu(), cpu.l_aux, rtol=1e-6, atol=1e-7)


def test_static_routing_tensors_cuda_equals_cpu():
    num_tokens, num_experts = 500, 8
    capacity = ops.static_capacity(num_tokens, num_experts, 2, 0.5)
    r = ops.static_gating(torch.randn(num_tokens, num_experts), 2, capacity)
    ids = r.expert_ids.clone()
    ids[r.topk_weights == 0] = 99  # ids of pairs that are not kept are never read
    for id_dtype in (torch.int32, torch.int64):
        cpu = ops.static_routing_tensors(ids.to(id_dtype), r.locations, r.topk_weights, num_experts, capacity)
        gpu = ops.static_routing_tensors(
            ids.to(id_dtype).to(CUDA), r.locations.to(CUDA), r.topk_weights.to(CUDA), num_experts, capacity
        )
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    token, slot = (r.topk_weights != 0).nonzero()[0].tolist()
    ids[token, slot] = 99
    with pytest.raises(ValueError, match=rf"expert_ids\[{token}, {slot}\] = 99 is out of range"):
        ops.static_routing_tensors(ids.to(CUDA), r.locations.to(CUDA), r.topk_weights.to(CUDA), num_experts, capacity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [1, 37, 64, 4096])
@pytest.mark.parametrize("num_tokens,num_experts", [(0, 4), (1, 4), (700, 64)])
def test_static_dispatch_combine_cuda_kernel_fallback_cpu(dtype, hidden_size, num_tokens, num_experts):
    capacity = ops.static_capacity(max(num_tokens, 1), num_experts, 2)
    r = ops.static_gating(torch.randn(num_tokens, num_experts), 2, capacity)
    combine, mask = ops.static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, num_experts, capacity)
    hidden = torch.randn(num_tokens, hidden_size).to(dtype)
    expert_out = torch.randn(num_experts, capacity, hidden_size).to(dtype)
    rows_cpu = ops.static_dispatch(hidden, mask)
    out_cpu = ops.static_combine(expert_out, combine)
    want = torch.einsum("sec,ecm->sm", combine.double(), expert_out.double())
    limit = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for kernels in (True, False):
        with use_kernels(kernels):
            rows = ops.static_dispatch(hidden.to(CUDA), mask.to(CUDA))
            out = ops.static_combine(expert_out.to(CUDA), combine.to(CUDA))
        assert torch.equal(rows.cpu(), rows_cpu)  # copies: exact
        assert out.dtype == dtype and out.shape == (num_tokens, hidden_size)
        # float32 accumulation everywhere; the devices may round the last bit differently.
        rtol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.cpu().float(), out_cpu.float(), rtol=rtol, atol=1e-5)
        assert num_tokens == 0 or relative_error(out.cpu(), want) < limit


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "composite"])
def test_static_ops_cuda_graph_capture_replay_equals_eager(kernels):
    num_tokens, num_experts, hidden_size = 96, 8, 64
    capacity = ops.static_capacity(num_tokens, num_experts, 2, 0.5)
    router = torch.randn(num_experts, hidden_size, device=CUDA) / hidden_size**0.5

    def static_moe(x, uniform):
        r = ops.static_gating(x @ router.t(), 2, capacity, None, "random", uniform, False, True)
        combine, mask = ops.static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, num_experts, capacity)
        rows = ops.static_dispatch(x, mask)
        return ops.static_combine(rows * 2 + 1, combine), r.l_aux  # an elementwise stand-in expert

    static_x = torch.randn(num_tokens, hidden_size, device=CUDA)
    static_uniform = torch.rand(num_tokens, device=CUDA)
    with use_kernels(kernels):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                static_moe(static_x, static_uniform)  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_l_aux = static_moe(static_x, static_uniform)
        for _ in range(3):
            x, uniform = torch.randn_like(static_x), torch.rand_like(static_uniform)
            static_x.copy_(x)
            static_uniform.copy_(uniform)
            graph.replay()
            out, l_aux = static_moe(x, uniform)
            torch.testing.assert_close(static_out, out, rtol=0, atol=0)
            torch.testing.assert_close(static_l_aux, l_aux, rtol=0, atol=0)


def test_fairseq_static_layer_cuda_equals_cpu():
    from moe_infer.fairseq import MOELayer, Top2Gate

    gate = Top2Gate(64, 8, second_expert_policy="all", moe_eval_capacity_token_fraction=0.25)
    layer = MOELayer.build(gate, ffn_dim=96, activation="gelu", gating="static").eval()
    x = torch.randn(4, 32, 64)
    padding = torch.rand(4, 32) < 0.1
    with torch.no_grad():
        want, want_l_aux = layer(x, input_padding_mask=padding)
        layer.to(CUDA)
        got, got_l_aux = layer(x.to(CUDA), input_padding_mask=padding.to(CUDA))
    assert layer.metadata["capacity"] == 32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_l_aux.cpu(), want_l_aux, rtol=1e-5, atol=1e-6)
