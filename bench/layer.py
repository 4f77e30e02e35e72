"""One sparse MoE block, every implementation, against its limits: the GEMM floor and the bandwidth floor.

For each shape (a transformers block: Mixtral-like and Qwen3-MoE-like, hidden 1024), token count
S, dtype and thread count, times interleaved (min / median / max over the repeats):
  moe_infer          the transformers block after moe_infer.optimize (fused routing + experts)
  MoELayer           moe_infer.MoELayer of the same shape (its own seeded weights)
  HF eager / HF batched_mm / HF grouped_mm
                     the transformers block with each of transformers' experts implementations
  GEMM floor         the two GEMMs of every routed expert alone (F.linear in the same dtype, on the
                     block's own routing, inputs gathered beforehand): the layer with no overhead
                     on ATen's GEMMs. At up to 16 rows per expert moe_infer streams the weights
                     with its own kernels (csrc/cpu/small_gemm.h), which can beat it.
and, for decode (S <= 16), the weight-bandwidth floor: the bytes of the active experts' weights
over the memory bandwidth measured in the same run (the larger of a large torch copy, read + write
bytes, and a large sum, read bytes, both on 2 MiB pages, and the same sum timed among the row's
own calls: the largest), the limit no implementation passes. Decode rows also time the router
alone (F.linear of the block's router weight: transformers' own call, which transformers' blocks
and moe_infer make and routing parity requires, as its logits' bits choose the experts) and show
the layer against the floor plus the router: no implementation that routes as transformers does
can pass that sum. The two ratios are medians over the interleaved rounds of the call's time over
that round's floor, at the rate the same sum read in that round (a shared machine's bandwidth
moves from minute to minute: two threads read 33 GB/s at some and 60 at others); in parentheses,
the median time over the strict floor above (the largest rate of the run).
Decode rows start every timed call with cold caches (128 MiB is read untimed before it), as a
decode step of a real model finds them. Every contender's expert weights are on 2 MiB
pages (moe_infer.optimize and MoEExperts put them there; the transformers blocks' are moved with
moe_infer.host_memory.to_huge_pages), so the rows compare computations.
Every row reads as ratios to those limits. Outputs are checked against HF eager first.

One thread: CPU time of the thread (time.thread_time; the machine is shared, and CPU time does not
count what other jobs take). More threads: wall-clock time.

    python bench/layer.py [--quick] [--dtype bfloat16 --dtype float32] [--threads 1 --threads 2] [--tokens 1 ...]
"""

import argparse
import copy
import os
import statistics

import torch
import torch.nn.functional as F

import moe_infer
from common import (
    Progress,
    ReadProbe,
    add_table_arguments,
    load_hf_models,
    machine_line,
    markdown_table,
    median_ratio,
    memory_bandwidth,
    ms_spread,
    publish_tables,
    relative_error,
    table_clock,
    table_settings,
    table_title,
    time_cpu_rows,
)
from moe_infer import host_memory

hf_models = load_hf_models()

SHAPES = {
    # name: (transformers architecture, hidden, ffn, experts, top_k)
    "Mixtral-like": ("mixtral", 1024, 3584, 8, 2),
    "Qwen3-MoE-like": ("qwen3_moe", 1024, 768, 64, 8),
}
TOKENS = (1, 16, 512)
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
MAX_GATHER_BYTES = 2**27  # HF batched_mm gathers one weight matrix pair per (token, expert): skipped beyond


def build_blocks(shape, dtype):
    """{variant: block} for one shape: transformers' block per experts implementation, moe_infer's, MoELayer."""
    arch, hidden, ffn, experts, top_k = SHAPES[shape]
    model = hf_models.build_model(arch, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, layers=1, vocab=128)
    model = model.to(dtype)
    blocks = {}
    for implementation in HF_IMPLEMENTATIONS:
        copy_ = copy.deepcopy(model)
        copy_.set_experts_implementation(implementation)
        # The same 2 MiB pages as moe_infer.optimize gives its experts: the rows compare computations.
        host_memory.to_huge_pages(copy_)
        blocks[f"HF {implementation}"] = sparse_block(copy_)
    blocks["moe_infer"] = sparse_block(moe_infer.optimize(copy.deepcopy(model), verbose=False))
    torch.manual_seed(0)
    layer = moe_infer.MoELayer(hidden, ffn, experts, top_k, activation="silu_glu", renormalize=True)
    blocks["MoELayer"] = layer.to(dtype).eval()  # MoEExperts keep their weights on 2 MiB pages
    return blocks


def sparse_block(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))


def gemm_floor_fn(block, x):
    """The expert GEMMs alone, on the block's routing: F.linear per routed expert, in x's dtype."""
    with torch.no_grad():
        _, _, ids = block.gate(x.reshape(-1, x.shape[-1]))
    experts = block.experts
    counts = torch.bincount(ids.reshape(-1), minlength=experts.gate_up_proj.shape[0]).tolist()
    ffn = experts.down_proj.shape[2]
    inputs = [
        (e, torch.randn(n, x.shape[-1], dtype=x.dtype), torch.randn(n, ffn, dtype=x.dtype))
        for e, n in enumerate(counts)
        if n
    ]

    def run():
        for e, rows, act in inputs:
            F.linear(rows, experts.gate_up_proj[e])
            F.linear(act, experts.down_proj[e])

    active_bytes = sum(
        (experts.gate_up_proj[e].numel() + experts.down_proj[e].numel()) * x.element_size() for e, _, _ in inputs
    )
    return run, active_bytes, len(inputs)


def run_table(dtype, threads, tokens, quick, progress):
    torch.set_num_threads(threads)
    clock = table_clock(threads)
    bandwidth = memory_bandwidth(clock)
    probe = ReadProbe()
    rows, worst = [], 0.0
    for shape in SHAPES:
        blocks = build_blocks(shape, dtype)
        for num_tokens in tokens:
            x = torch.randn(1, num_tokens, SHAPES[shape][1], dtype=dtype)
            with torch.no_grad():
                expected = blocks["HF eager"](x)
                for name in ("moe_infer", "HF grouped_mm"):
                    error = relative_error(blocks[name](x), expected).item()
                    if not error < (1e-5 if dtype == torch.float32 else 2e-2):
                        raise SystemExit(
                            f"{shape} S={num_tokens} {dtype}: {name} disagrees with HF eager ({error:.1e})"
                        )
                    worst = max(worst, error)
            floor, active_bytes, active = gemm_floor_fn(blocks["HF eager"], x)
            fns = {name: (lambda block=block, x=x: block(x)) for name, block in blocks.items()}
            _, hidden, ffn, _, top_k = SHAPES[shape]
            gather = num_tokens * top_k * 3 * hidden * ffn * x.element_size()
            if gather > MAX_GATHER_BYTES:
                del fns["HF batched_mm"]
            fns["GEMM floor"] = floor
            decode = num_tokens <= 16
            if decode:
                flat, router_weight = x.reshape(-1, x.shape[-1]), blocks["HF eager"].gate.weight
                fns["router"] = lambda flat=flat, router_weight=router_weight: F.linear(flat, router_weight)
            with torch.inference_mode():
                row = time_cpu_rows(
                    fns,
                    3 if quick else 15,
                    0.3 if quick else 1.0,
                    clock,
                    cold=decode,
                    probe=probe if decode else None,
                    bandwidth=bandwidth,
                )
            samples, floor_bandwidth = row.samples, row.floor_bandwidth
            ours, gemms = samples["moe_infer"], samples["GEMM floor"]
            hf = {n: statistics.median(t) for n, t in samples.items() if n.startswith("HF")}
            best_hf = min(hf, key=hf.get)
            if decode:
                bandwidth_floor = active_bytes / floor_bandwidth
                router = statistics.median(samples["router"])
                # Per round: the floor at the rate the probe read in that round (plus, for the
                # second, that round's router call).
                floors = row.round_floors(active_bytes)
                per_round = median_ratio(ours, floors)
                per_round_router = median_ratio(ours, [f + r for f, r in zip(floors, samples["router"])])
            rows.append(
                [
                    shape,
                    num_tokens,
                    ms_spread(ours),
                    ms_spread(samples["MoELayer"]),
                    *(ms_spread(samples[f"HF {i}"]) if f"HF {i}" in samples else "skipped" for i in HF_IMPLEMENTATIONS),
                    ms_spread(gemms),
                    f"{bandwidth_floor * 1e3:.3f} ({active} experts, {floor_bandwidth / 1e9:.0f} GB/s)"
                    if decode
                    else "",
                    f"{statistics.median(ours) / statistics.median(gemms):.3f} ({min(ours) / min(gemms):.3f})",
                    f"{per_round:.2f} ({statistics.median(ours) / bandwidth_floor:.2f})" if decode else "",
                    ms_spread(samples["router"]) if decode else "",
                    f"{per_round_router:.2f} ({statistics.median(ours) / (bandwidth_floor + router):.2f})"
                    if decode
                    else "",
                    f"{hf[best_hf] / statistics.median(ours):.2f}x ({best_hf.removeprefix('HF ')})",
                ]
            )
            progress.step(f"{shape} S={num_tokens} {dtype} t={threads}")
    headers = [
        "block",
        "S",
        "moe_infer ms",
        "MoELayer ms",
        *(f"HF {i} ms" for i in HF_IMPLEMENTATIONS),
        "GEMM floor ms",
        "bandwidth floor ms",
        "moe_infer / GEMM floor (of mins)",
        "moe_infer / bandwidth floor: per round (of medians)",
        "router ms",
        "moe_infer / (bandwidth floor + router): per round (of medians)",
        "best HF / moe_infer",
    ]
    title = table_title(dtype, threads)
    note = f"{bandwidth.describe()} Outputs agree with HF eager (worst relative error {worst:.1e})."
    return f"{title}\n\n{note}\n\n{markdown_table(headers, rows)}\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser, dtypes=("bfloat16", "float32", "float16"))
    parser.add_argument("--tokens", action="append", type=int, help=f"token counts S (default: {TOKENS})")
    args = parser.parse_args()
    dtypes, threads = table_settings(args)
    tokens = args.tokens or list(TOKENS)
    load_before = os.getloadavg()[0]
    progress = Progress(len(dtypes) * len(threads) * len(SHAPES) * len(tokens), "bench/layer")
    sections = [run_table(dtype, t, tokens, args.quick, progress) for dtype in dtypes for t in threads]
    shapes = "; ".join(f"{k}: {v[0]} block, H={v[1]}, ffn={v[2]}, E={v[3]}, k={v[4]}" for k, v in SHAPES.items())
    text = (
        "# One sparse MoE block against its limits (cpu)\n\n"
        + machine_line(load_before)
        + f"Blocks: {shapes}; input [1, S, H]. Times: median (min-max) of interleaved repeats, in ms. "
        f"GEMM floor: F.linear of each routed expert's fc1 and fc2 on its token count, in the same dtype. "
        f"Bandwidth floor (S <= 16): bytes of the active experts' weights / the largest of the table's copy and sum bandwidths "
        f"and the same sum timed among the row's own calls (the GB/s in the cell); "
        f"every contender's expert weights, and the bandwidth buffers, on 2 MiB pages (moe_infer.host_memory); "
        f"decode rows are timed from cold caches (128 MiB read untimed before every call). "
        f"Ratios to the bandwidth floor: the median over rounds of the call's time over the floor at the rate the "
        f"sum read in the same round; in parentheses, the median time over the floor in the cell. "
        f"Router (S <= 16): F.linear of the block's router weight alone, timed among the row's calls: "
        f"transformers' own call, which transformers' blocks and moe_infer make and routing parity requires. "
        f"'best HF' = fastest median of transformers' eager / batched_mm / grouped_mm.\n\n" + "\n".join(sections)
    )
    publish_tables(args, "layer_cpu", text)


if __name__ == "__main__":
    main()
