"""Runs every CUDA kernel once on small awkward inputs, then on garbage: for compute-sanitizer.

Covers S = 0 and 1, unaligned hidden sizes, empty experts, unrouted pairs, all scoring variants,
the grouped-GEMM and the per-expert paths, grouped_mlp_combine, static dispatch and combine; then
garbage offsets (decreasing, negative, past the rows), out-of-range expert ids, pair ids and rows,
which must neither touch memory out of bounds (memcheck) nor go unreported where the op validates.
Exits non-zero if a result disagrees with the CPU.

    compute-sanitizer --tool memcheck python scripts/cuda_kernel_smoke.py
    python scripts/cuda_kernel_smoke.py --device cpu     (the same calls on the CPU: a rehearsal)
"""

import argparse
import re

import torch

import moe_infer
from moe_infer import ops

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
parser.add_argument(
    "--tool", default="memcheck", help="the sanitizer tool it runs under (racecheck/synccheck: S <= 37)"
)
args = parser.parse_args()
if args.device == "cuda":
    assert torch.cuda.is_available() and moe_infer.built_with_cuda(), "needs a CUDA device and a CUDA build"
dev = torch.device(args.device)
torch.manual_seed(0)


def synchronize():
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---- valid inputs, against the CPU ------------------------------------------------------------
for num_tokens in (0, 1, 37):
    for scoring, groups in (("softmax", (1, 1)), ("softmax_topk", (1, 1)), ("sigmoid", (4, 2))):
        logits = torch.randn(num_tokens, 16)
        bias = torch.randn(16) if scoring == "sigmoid" else None
        w_cpu, ids_cpu = ops.topk_gating(logits, 3, scoring, True, bias, 1.0, *groups)
        w, ids = ops.topk_gating(logits.to(dev), 3, scoring, True, None if bias is None else bias.to(dev), 1.0, *groups)
        assert torch.equal(ids.cpu(), ids_cpu), (num_tokens, scoring)
    ids = torch.randint(-1, 16, (num_tokens, 3))
    plan_cpu = ops.dispatch_plan(ids, 16)
    plan = ops.dispatch_plan(ids.to(dev), 16)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(plan_cpu, plan))
    for dtype, hidden_size in ((torch.float32, 37), (torch.bfloat16, 64), (torch.float16, 3)):
        hidden = torch.randn(num_tokens, hidden_size, device=dev).to(dtype)
        rows = ops.permute(hidden, plan.sorted_pair_ids, 3)
        weights = torch.rand(num_tokens, 3, device=dev)
        out = ops.unpermute_combine(rows, weights, plan.row_of_pair)
        want = ops.unpermute_combine(rows.cpu(), weights.cpu(), plan_cpu.row_of_pair)
        assert torch.allclose(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)
        for activation, ffn in (("silu_glu", 32), ("gpt_oss_swiglu", 16), ("relu", 8)):
            fc1_out = 2 * ffn if activation != "relu" else ffn
            fc1 = torch.randn(16, fc1_out, hidden_size, device=dev).to(dtype)
            fc2 = torch.randn(16, hidden_size, ffn, device=dev).to(dtype)
            b1 = torch.randn(16, fc1_out, device=dev).to(dtype)
            b2 = torch.randn(16, hidden_size, device=dev).to(dtype)
            y = ops.grouped_mlp(rows, plan.expert_offsets, fc1, b1, fc2, b2, activation)
            assert y.shape == rows.shape
            combined = ops.grouped_mlp_combine(hidden, weights, plan, fc1, b1, fc2, b2, activation)
            want = ops.grouped_mlp_combine(
                hidden.cpu(), weights.cpu(), plan_cpu, fc1.cpu(), b1.cpu(), fc2.cpu(), b2.cpu(), activation
            )
            scale = want.float().abs().amax().item() + 1 if want.numel() else 1.0
            assert torch.allclose(combined.cpu().float(), want.float(), rtol=5e-2, atol=5e-2 * scale), (
                num_tokens,
                dtype,
                activation,
            )
    # Static dispatch (slot owners, then permute's row copy) and combine (ballot scan of the weights).
    capacity = max(1, num_tokens // 4)
    r = ops.static_gating(torch.randn(num_tokens, 8), 2, capacity)
    combine, mask = ops.static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, 8, capacity)
    for dtype, hidden_size in ((torch.float32, 37), (torch.bfloat16, 64), (torch.float16, 3)):
        hidden = torch.randn(num_tokens, hidden_size).to(dtype)
        rows = ops.static_dispatch(hidden.to(dev), mask.to(dev))
        assert torch.equal(rows.cpu(), ops.static_dispatch(hidden, mask)), (num_tokens, dtype)
        out = ops.static_combine(rows, combine.to(dev))
        want = ops.static_combine(rows.cpu(), combine)
        assert torch.allclose(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2), (num_tokens, dtype)
synchronize()


# ---- garbage: memory-safe, and reported where the op validates ---------------------------------
def raises(call, pattern):
    """call() must raise `pattern`, at once (CPU, or a CUDA path that syncs) or from the device's
    error record (ops.check_device_errors)."""
    try:
        call()
        synchronize()
        ops.check_device_errors(dev)
    except (RuntimeError, ValueError, TypeError) as error:  # argument errors are ValueError / TypeError
        assert re.search(pattern, str(error)), f"expected /{pattern}/, got: {error}"
        return
    raise AssertionError(f"no error matching /{pattern}/")


def survives(call):
    """call() on inputs its kernels cannot check: any result (or a clear error), but no bad access."""
    try:
        call()
        synchronize()
    except (RuntimeError, ValueError, TypeError) as error:
        assert "CUDA error" not in str(error), error


num_tokens, hidden_size, ffn, experts = 33, 64, 32, 8


def garbage_offsets_and_pairs(dtype):
    """On the grouped-GEMM path (bfloat16, sm90) and the per-expert path (float32)."""
    hidden = torch.randn(num_tokens, hidden_size, device=dev).to(dtype)
    fc1 = torch.randn(experts, 2 * ffn, hidden_size, device=dev).to(dtype) / 8
    fc2 = torch.randn(experts, hidden_size, ffn, device=dev).to(dtype) / 8
    weights = torch.rand(num_tokens, 2, device=dev)
    plan = ops.dispatch_plan(torch.randint(0, experts, (num_tokens, 2), device=dev), experts)
    rows = ops.permute(hidden, plan.sorted_pair_ids, 2)
    for offsets, pattern in (
        ([0, 5, 3, 9, 9, 20, 30, 40, 66], r"expert_offsets must be non-decreasing"),
        ([0, 5, 9, 9, 20, 30, 40, 50, 1 << 30], r"expert_offsets\[-1\] \(1073741824\) exceeds"),
        ([7, 9, 9, 9, 20, 30, 40, 50, 66], r"expert_offsets\[0\] \(7\) must be 0"),
        ([0, -5, -9, 9, 20, 30, 40, 50, 66], r"expert_offsets must be non-decreasing"),
    ):
        bad = torch.tensor(offsets, dtype=torch.int32, device=dev)
        raises(lambda bad=bad: ops.grouped_mlp(rows, bad, fc1, None, fc2, None, "silu_glu"), pattern)
        bad_plan = plan._replace(expert_offsets=bad)
        raises(
            lambda bad_plan=bad_plan: ops.grouped_mlp_combine(
                hidden, weights, bad_plan, fc1, None, fc2, None, "silu_glu"
            ),
            pattern,
        )
    garbage_pairs = torch.randint(-(1 << 30), 1 << 30, (num_tokens * 2,), dtype=torch.int32, device=dev)
    survives(lambda: ops.permute(hidden, garbage_pairs, 2))
    survives(lambda: ops.unpermute_combine(rows, weights, garbage_pairs))
    garbage_plan = plan._replace(sorted_pair_ids=garbage_pairs)
    survives(lambda: ops.grouped_mlp_combine(hidden, weights, garbage_plan, fc1, None, fc2, None, "silu_glu"))


for dtype in (torch.bfloat16, torch.float32):
    garbage_offsets_and_pairs(dtype)
ids = torch.randint(0, experts, (num_tokens, 2), device=dev)
ids[5, 1] = 1 << 20
raises(lambda: ops.dispatch_plan(ids, experts), r"expert_ids\[5, 1\] = 1048576 is out of range")
ids[5, 1] = -7
raises(lambda: ops.dispatch_plan(ids.long(), experts), r"expert_ids\[5, 1\] = -7 is out of range")
logits = torch.randn(num_tokens, experts, device=dev)
logits[3, 2] = float("nan")
raises(lambda: ops.topk_gating(logits, 2), r"router_logits row 3 contains NaN")
synchronize()
print(f"cuda_kernel_smoke ({args.device}, {args.tool}): ok")
