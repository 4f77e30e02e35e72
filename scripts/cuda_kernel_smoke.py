"""Runs every CUDA kernel once on small awkward inputs: for compute-sanitizer (memcheck, racecheck).

Covers S = 0 and 1, unaligned hidden sizes, empty experts, unrouted pairs, all scoring variants,
the grouped-GEMM and the per-expert paths, static dispatch and combine. Exits non-zero if a result disagrees with the CPU.
"""

import torch

import moe_infer
from moe_infer import ops

assert torch.cuda.is_available() and moe_infer.built_with_cuda(), "needs a CUDA device and a CUDA build"
cuda = torch.device("cuda")
torch.manual_seed(0)

for num_tokens in (0, 1, 37):
    for scoring, groups in (("softmax", (1, 1)), ("softmax_topk", (1, 1)), ("sigmoid", (4, 2))):
        logits = torch.randn(num_tokens, 16)
        bias = torch.randn(16) if scoring == "sigmoid" else None
        w_cpu, ids_cpu = ops.topk_gating(logits, 3, scoring, True, bias, 1.0, *groups)
        w, ids = ops.topk_gating(
            logits.to(cuda), 3, scoring, True, None if bias is None else bias.to(cuda), 1.0, *groups
        )
        assert torch.equal(ids.cpu(), ids_cpu), (num_tokens, scoring)
    ids = torch.randint(-1, 16, (num_tokens, 3))
    plan_cpu = ops.dispatch_plan(ids, 16)
    plan = ops.dispatch_plan(ids.to(cuda), 16)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(plan_cpu, plan))
    for dtype, hidden_size in ((torch.float32, 37), (torch.bfloat16, 64), (torch.float16, 3)):
        hidden = torch.randn(num_tokens, hidden_size, device=cuda).to(dtype)
        rows = ops.permute(hidden, plan.sorted_pair_ids, 3)
        weights = torch.rand(num_tokens, 3, device=cuda)
        out = ops.unpermute_combine(rows, weights, plan.row_of_pair)
        assert torch.allclose(
            out.cpu().float(),
            ops.unpermute_combine(rows.cpu(), weights.cpu(), plan_cpu.row_of_pair).float(),
            rtol=1e-2,
            atol=1e-2,
        )
        for activation, ffn in (("silu_glu", 32), ("gpt_oss_swiglu", 16), ("relu", 8)):
            fc1_out = 2 * ffn if activation != "relu" else ffn
            fc1 = torch.randn(16, fc1_out, hidden_size, device=cuda).to(dtype)
            fc2 = torch.randn(16, hidden_size, ffn, device=cuda).to(dtype)
            b1 = torch.randn(16, fc1_out, device=cuda).to(dtype)
            b2 = torch.randn(16, hidden_size, device=cuda).to(dtype)
            y = ops.grouped_mlp(rows, plan.expert_offsets, fc1, b1, fc2, b2, activation)
            assert y.shape == rows.shape
    # Static dispatch (slot owners, then permute's row copy) and combine (ballot scan of the weights).
    capacity = max(1, num_tokens // 4)
    r = ops.static_gating(torch.randn(num_tokens, 8), 2, capacity)
    combine, mask = ops.static_routing_tensors(r.expert_ids, r.locations, r.topk_weights, 8, capacity)
    for dtype, hidden_size in ((torch.float32, 37), (torch.bfloat16, 64), (torch.float16, 3)):
        hidden = torch.randn(num_tokens, hidden_size).to(dtype)
        rows = ops.static_dispatch(hidden.to(cuda), mask.to(cuda))
        assert torch.equal(rows.cpu(), ops.static_dispatch(hidden, mask)), (num_tokens, dtype)
        out = ops.static_combine(rows, combine.to(cuda))
        want = ops.static_combine(rows.cpu(), combine)
        assert torch.allclose(out.cpu().float(), want.float(), rtol=1e-2, atol=1e-2), (num_tokens, dtype)
torch.cuda.synchronize()
print("cuda_kernel_smoke: ok")
