"""The CPU kernels split their loops across torch's threads (OpenMP): every op gives the same bits on
one thread as on several, on inputs large enough to cross every loop's grain.

The expert GEMMs at up to 16 rows per expert are moe_infer's own kernels (split by output columns,
so the split does not change any sum); at more rows they are ATen's, whose sums may be ordered
by the thread count, so grouped_mlp is checked at few rows only.
"""

import pytest
import torch

from moe_infer import ops


@pytest.fixture
def thread_counts():
    before = torch.get_num_threads()
    yield (1, 2, 3)
    torch.set_num_threads(before)


def on_each(thread_counts, fn):
    """fn() on each thread count; asserts that every result equals the first, bit for bit."""
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        results.append(fn())
    for other in results[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(results[0]), torch.utils._pytree.tree_leaves(other)):
            assert torch.equal(a, b)
    return results[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_pipeline_is_the_same_on_any_thread_count(thread_counts, dtype):
    S, E, k, H, F = 4096, 64, 4, 128, 64
    logits = torch.randn(S, E).to(dtype)
    weights, ids = on_each(thread_counts, lambda: ops.topk_gating(logits, k, renormalize=True))
    ids = ids.masked_fill(torch.rand(ids.shape) < 0.05, -1)  # some unrouted pairs
    plan = on_each(thread_counts, lambda: ops.dispatch_plan(ids, E))
    hidden = torch.randn(S, H, dtype=dtype)
    rows = on_each(thread_counts, lambda: ops.permute(hidden, plan.sorted_pair_ids, k))
    on_each(thread_counts, lambda: ops.unpermute_combine(rows, weights, plan.row_of_pair))
    # The fused op at decode size (a few rows per expert: moe_infer's own GEMMs).
    fc1 = torch.randn(E, 2 * F, H, dtype=dtype) / H**0.5
    fc2 = torch.randn(E, H, F, dtype=dtype) / F**0.5
    few = slice(0, 16)
    plan_few = ops.dispatch_plan(ids[few], E)
    on_each(
        thread_counts,
        lambda: ops.grouped_mlp_combine(hidden[few], weights[few], plan_few, fc1, None, fc2, None, "silu_glu"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_small_row_expert_gemms_are_the_same_on_any_thread_count(thread_counts, dtype, transposed):
    E, H, F = 4, 256, 1000  # F not a multiple of any kernel block
    rows = torch.tensor([0, 1, 5, 16])  # per expert: none, one, a few, the most that take them
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), rows.cumsum(0).int()])
    hidden = torch.randn(int(rows.sum()), H, dtype=dtype)
    fc1 = torch.randn(E, 2 * F, H, dtype=dtype) / H**0.5
    fc2 = torch.randn(E, H, F, dtype=dtype) / F**0.5
    b1, b2 = torch.randn(E, 2 * F, dtype=dtype), torch.randn(E, H, dtype=dtype)
    if transposed:
        fc1, fc2 = fc1.transpose(1, 2).contiguous(), fc2.transpose(1, 2).contiguous()
    out = on_each(
        thread_counts,
        lambda: ops.grouped_mlp(hidden, offsets, fc1, b1, fc2, b2, "silu_glu", weights_transposed=transposed),
    )
    # and the value is the float64 reference's
    w1 = fc1.double() if transposed else fc1.double().transpose(1, 2)
    w2 = fc2.double() if transposed else fc2.double().transpose(1, 2)
    expected = torch.empty(hidden.shape, dtype=torch.float64)
    for e in range(E):
        x = hidden[offsets[e] : offsets[e + 1]].double()
        h = x @ w1[e] + b1[e].double()
        h = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        expected[offsets[e] : offsets[e + 1]] = h @ w2[e] + b2[e].double()
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_static_pipeline_is_the_same_on_any_thread_count(thread_counts):
    S, E, C, H = 2048, 16, 160, 64
    logits = torch.randn(S, E)
    routing = on_each(thread_counts, lambda: ops.static_gating(logits, 2, C))
    combine_weights, dispatch_mask = on_each(
        thread_counts,
        lambda: ops.static_routing_tensors(routing.expert_ids, routing.locations, routing.topk_weights, E, C),
    )
    hidden = torch.randn(S, H)
    buffer = on_each(thread_counts, lambda: ops.static_dispatch(hidden, dispatch_mask))
    on_each(thread_counts, lambda: ops.static_combine(buffer, combine_weights))
