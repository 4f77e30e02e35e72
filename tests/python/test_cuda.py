"""What only a CUDA device shows: host syncs, CUDA graphs, stream ordering, the grouped-GEMM
path, device-side validation, 64-bit index math, launch counts; and the CUDA ops against the CPU's.

Every test here takes the `cuda` fixture and skips without a CUDA device (scripts/gpu_check.sh
stage1 runs them). The device-generic tests of the other files (the `device` fixture) test every op
against the reference on CUDA too, so nothing here re-tests an op by hand for its own sake.
"""

import os
import sys

import pytest
import torch

import moe_infer
from moe_infer import ops
from moe_infer import reference as ref

from conftest import relative_error, use_kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from common import capture_cuda_graph  # noqa: E402  (bench/common.py: shared with bench/gpu_layer.py)

HAS_CUDA = torch.cuda.is_available() and moe_infer.built_with_cuda()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of moe_infer")
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grouped_gemm_device():
    """Whether torch._grouped_mm has its device-side (sync-free) path here: sm90 / sm100."""
    return HAS_CUDA and torch.cuda.get_device_capability() in ((9, 0), (10, 0))


needs_grouped_gemm = pytest.mark.skipif(
    not grouped_gemm_device(), reason="the grouped-GEMM (sync-free, capturable) path needs an sm90/sm100 GPU"
)


@pytest.fixture
def cuda():
    """The CUDA device, with no error record left over before or after the test."""
    torch.cuda.synchronize()
    ops.check_device_errors(CUDA)
    yield CUDA
    torch.cuda.synchronize()
    ops.check_device_errors(CUDA)


def random_ids(num_tokens, num_experts, k, device, skew=False):
    if skew:  # most pairs on a few experts, many experts empty
        logits = torch.randn(num_tokens, num_experts) + torch.linspace(6, 0, num_experts)
    else:
        logits = torch.randn(num_tokens, num_experts)
    return logits.topk(k, -1).indices.to(device)


def test_dispatch_plan_all_pairs_on_one_expert_cuda(cuda):
    ids = torch.full((5000, 2), 7, device=CUDA)
    plan = ops.dispatch_plan(ids, 16)
    assert plan.tokens_per_expert.tolist() == [0] * 7 + [10000] + [0] * 8
    assert torch.equal(plan.sorted_pair_ids.long(), torch.arange(10000, device=CUDA))


def test_cuda_index_values_are_memory_safe(cuda):
    """Unchecked on CUDA (no host sync): out-of-range rows read as zeros, never out of bounds."""
    hidden = torch.randn(3, 8, device=CUDA)
    rows = ops.permute(hidden, torch.tensor([0, 1, 2, 3, 4, 99], dtype=torch.int32, device=CUDA), 2)
    assert (rows[5] == 0).all() and torch.equal(rows[0], hidden[0])
    out = ops.unpermute_combine(
        rows, torch.ones(3, 2, device=CUDA), torch.tensor([0, 1, 2, 3, 4, 77], dtype=torch.int32, device=CUDA)
    )
    torch.testing.assert_close(out[2], rows[4])
    torch.cuda.synchronize()


def test_validate_false_is_memory_safe_and_raises_nothing(cuda):
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
def test_grouped_mlp_cuda_kernel_fallback_reference(cuda, dtype, hidden_size, ffn_size, activation, bias, transposed):
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


def assert_replay_equals_eager(fn, static_x):
    """fn captured in a CUDA graph and replayed on three fresh inputs equals fn run eagerly, bit for
    bit (a tuple output: its first element)."""
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.no_grad():
        graph, static_out = capture_cuda_graph(fn, static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(first(static_out), first(fn(x)), rtol=0, atol=0)


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
@needs_grouped_gemm
def test_cuda_graph_capture_replay_equals_eager(cuda, options):
    layer = make_layer(torch.bfloat16, hidden_size=256, ffn_size=128, **options)
    static_x = torch.randn(96, 256, device=CUDA, dtype=torch.bfloat16)
    assert_replay_equals_eager(layer, static_x)


def test_layer_cuda_equals_cpu_and_reference(cuda):
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
def test_grouped_mlp_combine_cuda_equals_cpu(cuda, dtype):
    """The fused expert compute + combine (MoELayer's and the transformers integration's path): on
    CUDA one gather that also inverts the plan, the expert compute, and a combine that adds fc2's
    bias; it equals the CPU's fused kernel (float32: the per-expert path; bfloat16: grouped GEMMs)."""
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
def test_static_gating_cuda_equals_cpu(cuda, top_k, policy, normalize_before, num_tokens, num_experts):
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
def test_static_gating_batch_prioritized_cuda_equals_cpu(cuda, top_k, policy, normalize_before):
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


def test_static_routing_tensors_cuda_equals_cpu(cuda):
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
def test_static_dispatch_combine_cuda_kernel_fallback_cpu(cuda, dtype, hidden_size, num_tokens, num_experts):
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
def test_static_ops_cuda_graph_capture_replay_equals_eager(cuda, kernels):
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


def test_fairseq_static_layer_cuda_equals_cpu(cuda):
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


# ---- sync-free, capturable, and the grouped-GEMM path ------------------------------------------


def bf16_layer(cuda, hidden_size=256, ffn_size=128, num_experts=8, top_k=2, **options):
    torch.manual_seed(0)
    return make_layer(
        torch.bfloat16, hidden_size=hidden_size, ffn_size=ffn_size, num_experts=num_experts, top_k=top_k, **options
    )


@needs_grouped_gemm
@pytest.mark.parametrize("num_tokens", [1, 64, 1000])
def test_layer_bf16_forward_makes_no_host_sync(cuda, num_tokens):
    """The whole layer (validate=True, the default) under torch's sync debug mode 'error'."""
    layer = bf16_layer(cuda, renormalize=True)
    x = torch.randn(num_tokens, 256, device=cuda, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # first call: allocates the device's error record (not a sync, but kept out)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = layer(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert relative_error(out, ref.layer_forward(layer, x, compute_dtype=torch.float32)) < 2e-2


def kernel_events(fn):
    """(the CUDA kernels, the aten ops) that one call of fn() ran, as names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, aten = [], []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if not event.name.startswith(("Memcpy", "Memset")):
                kernels.append(event.name)
        elif event.name.startswith("aten::"):
            aten.append(event.name)
    return kernels, aten


@needs_grouped_gemm
@pytest.mark.parametrize("num_tokens", [16, 1024])
def test_layer_bf16_takes_the_grouped_path_in_few_launches(cuda, num_tokens):
    """Two grouped GEMMs and no per-expert GEMM loop; 13 kernels expected for the whole layer
    (router GEMM, gating, plan: keys + one-tile sort + offsets, gather, offsets check, 2 x (grouped
    GEMM setup + GEMM), activation, combine) where the unfused pipeline took about 20; the bound
    leaves room for a split-K router GEMM and one more sort pass."""
    layer = bf16_layer(cuda, renormalize=True)
    x = torch.randn(num_tokens, 256, device=cuda, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        kernels, aten = kernel_events(lambda: layer(x))
    assert aten.count("aten::_grouped_mm") == 2, aten
    assert aten.count("aten::mm") + aten.count("aten::addmm") <= 1, aten  # the router only
    print(f"\n{len(kernels)} kernels per layer at S={num_tokens}: {kernels}")
    assert len(kernels) <= 15, kernels


@needs_grouped_gemm
def test_hf_block_bf16_cuda_graph_equals_eager(cuda):
    """A transformers Mixtral block optimized by moe_infer, captured in a CUDA graph and replayed."""
    pytest.importorskip("transformers", reason="the transformers integration needs transformers")
    import hf_models  # tests/python: small seeded transformers models

    model = hf_models.build_model("mixtral", dtype=torch.bfloat16, hidden=128, ffn=64).to(cuda)
    moe_infer.optimize(model, verbose=False)
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))
    static_x = torch.randn(2, 48, 128, device=cuda, dtype=torch.bfloat16)
    assert_replay_equals_eager(block, static_x)


@needs_grouped_gemm
def test_grouped_path_checks_offsets_like_the_per_expert_path(cuda):
    """Bad offsets: the per-expert path (float32) raises at once, the grouped path (bfloat16)
    records the same error on the device, raised without a sync by the next validating call."""
    rows = torch.randn(10, 64, device=cuda)
    fc1 = torch.randn(4, 64, 64, device=cuda) / 8
    fc2 = torch.randn(4, 64, 32, device=cuda) / 8
    bad = torch.tensor([0, 3, 2, 7, 10], dtype=torch.int32, device=cuda)
    message = r"expert_offsets must be non-decreasing, but expert_offsets\[2\] \(2\) < expert_offsets\[1\] \(3\)"
    with pytest.raises(RuntimeError, match=message):
        ops.grouped_mlp(rows, bad, fc1, None, fc2, None, "silu_glu")
    out = ops.grouped_mlp(rows.bfloat16(), bad, fc1.bfloat16(), None, fc2.bfloat16(), None, "silu_glu")
    assert out.shape == (10, 64)  # clamped offsets: computed, memory-safe
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=message):
        ops.grouped_mlp(rows.bfloat16(), bad.clone().fill_(0), fc1.bfloat16(), None, fc2.bfloat16(), None, "silu_glu")
    ops.check_device_errors(cuda)  # raised once, then cleared


def test_device_errors_raise_later_with_the_cpu_message(cuda):
    logits = torch.randn(6, 8, device=cuda)
    logits[4, 2] = float("nan")
    weights, ids = ops.topk_gating(logits, 2)  # no sync: nothing raised yet
    assert ((ids >= 0) & (ids < 8)).all()
    with pytest.raises(RuntimeError, match=r"router_logits row 4 contains NaN or \+inf"):
        ops.check_device_errors(cuda)
    ops.check_device_errors(cuda)  # cleared
    ops.dispatch_plan(torch.tensor([[0, 9], [1, 2]], device=cuda), 8)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"expert_ids\[0, 1\] = 9 is out of range"):
        ops.dispatch_plan(torch.tensor([[0, 1]], device=cuda), 8)  # the next validating call


def test_layer_nan_input_is_raised_by_the_next_forward(cuda):
    layer = bf16_layer(cuda)
    x = torch.randn(3, 256, device=cuda, dtype=torch.bfloat16)
    with torch.no_grad():
        bad = x.clone()
        bad[1, 0] = float("nan")
        layer(bad)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match=r"router_logits row 1 contains NaN"):
            layer(x)
        layer(x)  # reported once


def test_awkward_strides_fall_back_instead_of_raising(cuda):
    """A 1-row hidden with an odd row stride, and a weight whose expert stride is not a multiple of
    16 bytes (torch._grouped_mm refuses both): computed, equal to the reference."""
    num_experts, hidden_size, ffn_size = 4, 64, 32
    wide = torch.randn(3, hidden_size + 1, device=cuda, dtype=torch.bfloat16)
    one_row = wide[1:2, :hidden_size]
    assert one_row.is_contiguous() and one_row.stride(0) == hidden_size + 1
    fc1, _, fc2, _ = expert_weights(num_experts, hidden_size, ffn_size, "silu_glu", False, False, torch.bfloat16)
    odd = torch.empty(num_experts * (fc1[0].numel() + 1), device=cuda, dtype=torch.bfloat16)
    odd_fc1 = odd.as_strided(fc1.shape, (fc1[0].numel() + 1, hidden_size, 1)).copy_(fc1)
    offsets = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32, device=cuda)
    up = lambda t: t.double().cpu()  # noqa: E731
    expected = ref.grouped_mlp(up(one_row), offsets.cpu(), up(fc1), None, up(fc2), None, "silu_glu", False)
    for weights in (fc1, odd_fc1):
        out = ops.grouped_mlp(one_row, offsets, weights, None, fc2, None, "silu_glu")
        assert relative_error(out.cpu(), expected) < 2e-2


@needs_grouped_gemm
def test_index_math_beyond_2_31_elements(cuda):
    """S * k * H > 2^31: the gathered rows, the GEMM outputs and the combine index past int32."""
    num_experts, top_k, hidden_size, ffn_size = 8, 8, 2048, 8
    num_tokens = (1 << 31) // (top_k * hidden_size) + 64
    assert num_tokens * top_k * hidden_size > 1 << 31
    hidden = torch.randn(num_tokens, hidden_size, device=cuda, dtype=torch.bfloat16)
    fc1, _, fc2, _ = expert_weights(num_experts, hidden_size, ffn_size, "silu_glu", False, False, torch.bfloat16)
    ids = torch.arange(num_experts, device=cuda, dtype=torch.int32).repeat(num_tokens, 1)  # every expert
    weights = torch.rand(num_tokens, top_k, device=cuda)
    plan = ops.dispatch_plan(ids, num_experts)
    out = ops.grouped_mlp_combine(hidden, weights, plan, fc1, None, fc2, None, "silu_glu")
    # The last tokens' expert-7 rows sit past element 2^31 of the gathered rows.
    tail = slice(num_tokens - 64, num_tokens)
    x = hidden[tail].float()
    expected = torch.zeros(64, hidden_size, device=cuda)
    for e in range(num_experts):
        gate_up = x @ fc1[e].float().t()
        act = torch.nn.functional.silu(gate_up[:, :ffn_size]) * gate_up[:, ffn_size:]
        expected += weights[tail, e : e + 1] * (act @ fc2[e].float().t())
    assert relative_error(out[tail], expected) < 2e-2
    del out, hidden, plan


# ---- the expert buffer's streams --------------------------------------------------------------


def buffered_pair(cuda, num_slots, dtype=torch.bfloat16):
    """(a buffered layer, the same layer with every expert resident)."""
    options = dict(hidden_size=256, ffn_size=128, num_experts=8, top_k=2, renormalize=True, dtype=dtype)
    torch.manual_seed(0)
    buffered = moe_infer.MoELayer(device=cuda, expert_buffer=num_slots, **options).eval()
    with torch.no_grad():
        buffered.gate.weight.normal_(0, 4 / 256**0.5)
    resident = moe_infer.MoELayer(device=cuda, **options).eval()
    resident.load_state_dict(buffered.state_dict())
    return buffered, resident


def test_new_buffer_copies_wait_for_the_pool_zero_fill(cuda):
    """The pools are zero-filled on the compute stream; delay that stream first, so copies that
    did not wait for the fill would land before it and be wiped."""
    from moe_infer.buffer import ExpertBuffer, ExpertStore

    fc1 = torch.randn(8, 64, 32, dtype=torch.bfloat16)
    fc2 = torch.randn(8, 32, 32, dtype=torch.bfloat16)
    store = ExpertStore.from_tensors(fc1, fc2, pin_memory=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of the compute stream before the pools are made
    buffer = ExpertBuffer(store, 4, cuda)
    buffer.prefetch([0, 1, 2, 3])
    buffer.synchronize()
    torch.cuda.synchronize()
    table = buffer._core.slot_table().tolist()
    for expert in range(4):
        slot = table[expert]
        assert torch.equal(buffer.pools["fc1_weight"][slot].cpu(), fc1[expert]), expert


def test_buffered_bf16_layer_with_delayed_compute_equals_resident(cuda, monkeypatch):
    """Every expert compute is held back on the GPU (torch.cuda._sleep) before it runs, while the
    host goes on and refills slots: a refill that did not wait for the compute reading its slot
    would change the result."""
    buffered, resident = buffered_pair(cuda, num_slots=2)
    compute = ops.grouped_mlp

    def delayed(*args, **kwargs):
        torch.cuda._sleep(20_000_000)  # ~10 ms on the compute stream
        return compute(*args, **kwargs)

    monkeypatch.setattr(ops, "grouped_mlp", delayed)
    x = torch.randn(64, 256, device=cuda, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            out = buffered(x)
            # Other GEMM groupings round differently; a slot refilled too early gives O(1) errors.
            assert relative_error(out, resident(x)) < 1e-2
    assert buffered.expert_buffer.stats()["misses"] > 2


def test_pageable_expert_store_under_a_cuda_buffer_warns(cuda):
    from moe_infer.buffer import ExpertBuffer, ExpertStore

    store = ExpertStore.from_tensors(torch.randn(4, 16, 8), torch.randn(4, 8, 8), pin_memory=False)
    with pytest.warns(UserWarning, match=r"pageable \(not pinned\) host memory"):
        ExpertBuffer(store, 2, cuda)
