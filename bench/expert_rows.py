"""The expert FFNs of a decode step, by rows per expert, against the bandwidth floor.

At decode an expert gets a handful of rows (the tokens routed to it) and its FFN is bound by the
bytes of its weights: moe_infer streams each weight once with its own kernels
(csrc/cpu/small_gemm.h), whose register tile depends on the rows and on the length of a row of x.
For each shape, dtype, thread count and R rows per expert, E experts take R rows each, timed in
interleaved rounds from cold caches (128 MiB read untimed before every call; min / median / max):
  moe_infer        ops.grouped_mlp of MoEExperts (weights on 2 MiB pages): fc1, the gated SiLU and
                   fc2 of every expert, in one pass over the experts
  GEMM floor       F.linear of each expert's fc1 and fc2 on its rows (ATen's GEMMs, without the
                   activation), the same weights
against two limits: the bandwidth floor, the experts' weight bytes over the read bandwidth (the
largest of a 128 MiB copy's, reads + writes, a 256 MiB sum's, and the same sum timed among the
row's own calls), and the compute floor, two FLOPs per weight and row at the rate of a large
F.linear in the same dtype and threads; ratios are to the larger, medians over the rounds of the
call's time over that round's limit (the bandwidth floor at the rate the sum read in the round).
Shapes: Mixtral-like (hidden 1024, ffn 3584, 8 experts: bench/layer.py's) and Mixtral-8x7B-sized
(hidden 4096, ffn 14336, 2 experts). fc2 reads rows of x of ffn values: 7 and 28 KiB in bfloat16,
14 and 56 KiB in float32, each side of the 8 KiB from which two to four rows take the square tile.
Outputs are checked against a float64 loop of the same FFN first.

One thread: CPU time of the thread. More threads: wall-clock time.

    python bench/expert_rows.py [--quick] [--dtype bfloat16 --dtype float32] [--threads 1 --threads 2] [--rows 1 ...]
"""

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

import moe_infer
from common import (
    Progress,
    ReadProbe,
    add_table_arguments,
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
from moe_infer import ops

SHAPES = {
    # name: (hidden, ffn, experts)
    "Mixtral-like": (1024, 3584, 8),
    "Mixtral-8x7B-sized": (4096, 14336, 2),
}
ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def reference(experts: moe_infer.MoEExperts, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The gated-SiLU FFN of each expert's rows in float64."""
    out = []
    for e in range(experts.num_experts):
        h = F.linear(x[e * rows : (e + 1) * rows].double(), experts.gate_up_proj[e].double())
        gate, up = h.chunk(2, dim=-1)
        out.append(F.linear(F.silu(gate) * up, experts.down_proj[e].double()))
    return torch.cat(out)


def gemm_rate(dtype, clock) -> float:
    """FLOP/s of a large F.linear in ``dtype`` on the current threads (2048 x 2048 x 4096, warm, the
    best of five): the compute rate ATen's GEMMs reach here, against which many rows are bound."""
    x, w = torch.randn(2048, 2048, dtype=dtype), torch.randn(4096, 2048, dtype=dtype)
    F.linear(x, w)
    seconds = []
    for _ in range(5):
        start = clock()
        F.linear(x, w)
        seconds.append(clock() - start)
    return 2 * x.shape[0] * x.shape[1] * w.shape[0] / min(seconds)


def shape_rows(shape, dtype, row_counts, quick, clock, probe, bandwidth, flops, progress):
    """The table rows of one shape (and the worst relative error of its outputs)."""
    hidden, ffn, num_experts = SHAPES[shape]
    torch.manual_seed(0)
    experts = moe_infer.MoEExperts(num_experts, hidden, ffn, dtype=dtype).eval()
    spec = experts.spec
    weight_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    table, worst = [], 0.0
    for rows in row_counts:
        x = torch.randn(num_experts * rows, hidden, dtype=dtype)
        offsets = torch.arange(0, num_experts * rows + 1, rows, dtype=torch.int32)
        with torch.inference_mode():
            error = relative_error(ops.grouped_mlp(x, offsets, spec), reference(experts, x, rows)).item()
        if not error < (1e-5 if dtype == torch.float32 else 2e-2):
            raise SystemExit(f"{shape} R={rows} {dtype}: moe_infer disagrees with the float64 FFN ({error:.1e})")
        worst = max(worst, error)
        fc1_inputs = [x[e * rows : (e + 1) * rows] for e in range(num_experts)]
        fc2_inputs = [torch.randn(rows, ffn, dtype=dtype) for _ in range(num_experts)]

        def gemm_floor(fc1_inputs=fc1_inputs, fc2_inputs=fc2_inputs):
            for e in range(num_experts):
                F.linear(fc1_inputs[e], spec.fc1_weight[e])
                F.linear(fc2_inputs[e], spec.fc2_weight[e])

        fns = {
            "moe_infer": lambda x=x, offsets=offsets: ops.grouped_mlp(x, offsets, spec),
            "GEMM floor": gemm_floor,
        }
        with torch.inference_mode():
            row = time_cpu_rows(
                fns, 3 if quick else 11, 0.2 if quick else 0.6, clock, cold=True, probe=probe, bandwidth=bandwidth
            )
        ours, gemms = row.samples["moe_infer"], row.samples["GEMM floor"]
        floor = weight_bytes / row.floor_bandwidth
        # Every row multiplies every weight once (two FLOPs), at the rate of a large GEMM.
        compute = 2 * rows * weight_bytes / spec.fc1_weight.element_size() / flops
        limits = [max(f, compute) for f in row.round_floors(weight_bytes)]
        table.append(
            [
                shape,
                f"{num_experts} x {rows}",
                ms_spread(ours),
                ms_spread(gemms),
                f"{floor * 1e3:.3f} ({row.floor_bandwidth / 1e9:.0f} GB/s)",
                f"{compute * 1e3:.3f}",
                f"{weight_bytes / statistics.median(ours) / 1e9:.1f}",
                f"{median_ratio(ours, limits):.2f} ({statistics.median(ours) / max(floor, compute):.2f})",
                f"{statistics.median(gemms) / statistics.median(ours):.2f}x",
            ]
        )
        progress.step(f"{shape} R={rows} {dtype}")
    return table, worst


def run_table(dtype, threads, row_counts, quick, progress):
    torch.set_num_threads(threads)
    clock = table_clock(threads)
    bandwidth = memory_bandwidth(clock)
    probe = ReadProbe()
    flops = gemm_rate(dtype, clock)
    table, worst = [], 0.0
    for shape in SHAPES:
        rows, error = shape_rows(shape, dtype, row_counts, quick, clock, probe, bandwidth, flops, progress)
        table += rows
        worst = max(worst, error)
    headers = [
        "shape",
        "experts x rows",
        "moe_infer ms",
        "GEMM floor ms",
        "bandwidth floor ms",
        "compute floor ms",
        "moe_infer GB/s",
        "moe_infer / the larger floor: per round (of medians)",
        "GEMM floor / moe_infer",
    ]
    title = table_title(dtype, threads)
    note = (
        f"{bandwidth.describe()} Compute: a large F.linear runs at {flops / 1e9:.0f} GFLOP/s"
        f" (2048 x 2048 x 4096, warm, the best of five)."
    )
    note += f" Outputs agree with a float64 loop (worst relative error {worst:.1e})."
    return f"{title}\n\n{note}\n\n{markdown_table(headers, table)}\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser)
    parser.add_argument("--rows", action="append", type=int, help=f"rows per expert (default: {ROWS})")
    args = parser.parse_args()
    dtypes, threads = table_settings(args)
    row_counts = args.rows or list(ROWS)
    if any(not 1 <= r <= 16 for r in row_counts):
        parser.error("--rows: 1 to 16 rows per expert (decode; more take ATen's GEMMs)")
    load_before = os.getloadavg()[0]
    progress = Progress(len(dtypes) * len(threads) * len(SHAPES) * len(row_counts), "bench/expert_rows")
    sections = [run_table(dtype, t, row_counts, args.quick, progress) for dtype in dtypes for t in threads]
    shapes = "; ".join(f"{name}: H={h}, ffn={f}, E={e}" for name, (h, f, e) in SHAPES.items())
    text = (
        f"# The expert FFNs of a decode step, by rows per expert (cpu){' (quick run)' if args.quick else ''}\n\n"
        + machine_line(load_before)
        + f"Shapes: {shapes}; gated SiLU experts (MoEExperts, weights on 2 MiB pages), every expert R rows. "
        f"Times: median (min-max) of interleaved repeats from cold caches, in ms. GEMM floor: F.linear of each "
        f"expert's fc1 and fc2 on its rows, in the same dtype, without the activation. Bandwidth floor: the "
        f"experts' weight bytes / the largest of the table's copy and sum bandwidths and the same sum timed among "
        f"the row's calls (the GB/s in the cell). Compute floor: two FLOPs per weight and row at the rate of a "
        f"large F.linear (the table's GFLOP/s). Ratio: the median over rounds of the call's time over the larger "
        f"floor, the bandwidth floor at the rate the sum read in the same round; in parentheses, the median time "
        f"over the larger floor in the cells.\n\n" + "\n".join(sections)
    )
    publish_tables(args, "expert_rows_cpu", text)


if __name__ == "__main__":
    main()
