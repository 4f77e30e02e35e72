"""Static vs dynamic gating, side by side: the paper's first result, scaled down to this machine.

One moe_infer.fairseq.MOELayer per workload (seeded weights), run in the same process with
``gating="static"`` (fairseq's capacity, [S, E, C] routing tensors, every expert computing its
whole capacity buffer, placeholders included) and ``gating="dynamic"`` (capacity-free), on a sweep
of batch sizes (sequences of --seq-len tokens). Both modes share the router, the expert weights
and the expert compute (grouped_mlp); only dispatch and combine differ.

Workloads (the paper's two, scaled down; see PAPER.md):
  lm  LM-like (fairseq MoE LM): top-2, 128 experts, hidden 512, ffn 2048, gelu, 'sampling'
      policy, fairseq's eval capacity ceil(0.25 * S)
  mt  MT-like (NLLB-MoE): top-2, 64 experts, hidden 512, ffn 2048, relu, policy 'all',
      capacity factor 1 (fairseq's training formula 2 * ceil(S / E), which eval falls back to
      when moe_eval_capacity_token_fraction <= 0)

For each batch: throughput (tokens/s, best of interleaved runs), the peak memory of the MoE
layer's forward (peak RSS above the resident set before the call, measured per call with Linux's
VmHWM reset; weights excluded, they are the same in both modes), the share of dispatched rows
that are placeholders, the share of (token, expert) pairs static gating drops, and, where it is
affordable, the "fairseq" column: moe_infer.reference's plain-PyTorch re-implementation of fairseq
(dense einsum dispatch and combine). A mode stops growing its batch once it exceeds the memory
cap; the largest batch under the cap is reported per mode. Prints a table, writes
bench/results/static_vs_dynamic_<device>.{md,json} and PNG plots of throughput and memory.

    python bench/static_vs_dynamic.py [--quick] [--cap-mib 512] [--workloads lm,mt]
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RESULTS_DIR,
    Progress,
    commit,
    machine_description,
    markdown_table,
    peak_memory,
    return_freed_memory_to_os,
    time_interleaved,
    write_result,
)
from moe_infer import reference as ref  # noqa: E402
from moe_infer.fairseq import MOELayer, Top2Gate  # noqa: E402

WORKLOADS = {
    "lm": dict(
        title="LM-like",
        description="top-2, E=128, H=512, ffn=2048, gelu, policy 'sampling', eval capacity ceil(0.25 * S)",
        num_experts=128,
        activation="gelu",
        gate=dict(second_expert_policy="sampling", moe_eval_capacity_token_fraction=0.25),
    ),
    "mt": dict(
        title="MT-like",
        description="top-2, E=64, H=512, ffn=2048, relu, policy 'all', capacity factor 1 (2 * ceil(S / E))",
        num_experts=64,
        activation="relu",
        gate=dict(second_expert_policy="all", moe_eval_capacity_token_fraction=0.0),
    ),
}
MODEL_DIM, FFN_DIM = 512, 2048
# The paper's numbers (8x V100, full-size models), for the README's side-by-side.
PAPER = {
    "lm": dict(max_throughput=6.21, largest_batch=(8, 64), memory=1.36),
    "mt": dict(max_throughput=5.75, largest_batch=(48, 96), memory=1.1),
}
# The fairseq column materialises several dense [S, E, C] float tensors: only up to this size.
FAIRSEQ_MAX_SEC = 1 << 23

# ---- the layer and its runs ------------------------------------------------------------------


def build_layer(workload: str, dtype: torch.dtype = torch.float32) -> MOELayer:
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    gate = Top2Gate(MODEL_DIM, spec["num_experts"], **spec["gate"])
    return MOELayer.build(gate, FFN_DIM, spec["activation"]).to(dtype).eval()


def run_mode(layer: MOELayer, x: torch.Tensor, mode: str):
    layer.gating = mode
    with torch.no_grad():
        return layer(x)[0]


def fairseq_forward(layer: MOELayer, x: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch re-implementation of fairseq on the layer's own weights."""
    gate, experts = layer.gate, layer.experts
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, combine, mask, _ = ref.fairseq_top2gating(
            gate.wg(tokens),
            None,
            gate.second_expert_policy,
            gate.normalize_gate_prob_before_dropping,
            eval_mode=True,
            eval_capacity_token_fraction=gate.moe_eval_capacity_token_fraction,
            batch_prioritized_routing=gate.batch_prioritized_routing,
        )
        out = ref.fairseq_moe_forward(
            tokens,
            combine,
            mask,
            experts.gate_up_proj,
            experts.gate_up_proj_bias,
            experts.down_proj,
            experts.down_proj_bias,
            experts.activation,
        )
    return out.view(x.shape)


def check_against_fairseq(layer: MOELayer, seq_len: int) -> float:
    """Static mode must reproduce fairseq (same seed, same second-expert draws), checked in float32
    (the re-implementation's one-hot einsums are too slow in bfloat16) on the layer's own weights."""
    layer = copy.deepcopy(layer).float()
    x = torch.randn(2, seq_len, MODEL_DIM)
    torch.manual_seed(1)
    got = run_mode(layer, x, "static")
    torch.manual_seed(1)
    want = fairseq_forward(layer, x)
    run_mode(layer, x, "dynamic")  # warms the dynamic path up too
    error = ((got - want).norm() / want.norm()).item()
    if not error < 1e-5:
        raise SystemExit(f"static gating disagrees with the fairseq re-implementation: relative error {error:.2e}")
    return error


def static_stats(metadata: dict) -> tuple[float, float]:
    """(placeholder share of the E * C dispatched rows, dropped share of the routed pairs), from a
    static-mode run's metadata."""
    dropped = (float(metadata["overflow_expert1"]) + float(metadata["overflow_expert2"])) / 2
    return float(metadata["placeholder_fraction"]), dropped / 100


def sweep(workload: str, args, progress: Progress) -> dict:
    dtype = getattr(torch, args.dtype)
    layer = build_layer(workload, dtype)
    error = check_against_fairseq(layer, args.seq_len)
    cap = args.cap_mib * 2**20
    rows = []
    fits = {"static": True, "dynamic": True}
    last_seconds = {}
    batch = 1
    while batch <= args.max_batch and (fits["static"] or fits["dynamic"]):
        num_tokens = batch * args.seq_len
        x = torch.randn(batch, args.seq_len, MODEL_DIM, dtype=dtype)
        modes = [m for m in ("static", "dynamic") if fits[m]]
        fns = {m: (lambda m=m, x=x: run_mode(layer, x, m)) for m in modes}
        capacity = layer.gate.capacity(num_tokens)
        affordable = num_tokens * layer.gate.num_experts * capacity <= FAIRSEQ_MAX_SEC
        if "static" in modes and affordable and not args.quick and dtype == torch.float32:
            fns["fairseq"] = lambda x=x: fairseq_forward(layer, x)
        row = {"batch": batch, "tokens": num_tokens, "capacity": capacity}
        slowest = 0.0
        for name, fn in fns.items():
            if last_seconds.get(name, 0.0) < 2.0:
                fn()  # warm-up, unless the last batch was slow: then the memory run warms up
            start = time.perf_counter()
            row[f"{name}_peak_bytes"] = peak_memory(fn)
            last_seconds[name] = time.perf_counter() - start
            slowest = max(slowest, last_seconds[name])
            if name == "static":
                row["placeholder_fraction"], row["dropped_fraction"] = static_stats(layer.metadata)
        repeats = 2 if args.quick else max(3, min(10, int(8.0 / max(slowest, 1e-3))))
        # Best of the interleaved runs: on a shared machine, noise only ever slows a run down.
        times = time_interleaved(fns, torch.device("cpu"), repeats, warmup=0, statistic=min)
        for name, seconds in times.items():
            row[f"{name}_seconds"] = seconds
            row[f"{name}_tokens_per_s"] = num_tokens / seconds
        for mode in modes:
            row[f"{mode}_fits"] = row[f"{mode}_peak_bytes"] <= cap
            fits[mode] = row[f"{mode}_fits"]
        rows.append(row)
        progress.step(f"{workload} batch {batch}")
        batch *= 2
    return {"rows": rows, "fairseq_check_error": error, **headline(workload, rows)}


def headline(workload: str, rows: list) -> dict:
    def largest(mode):
        fitting = [r for r in rows if r.get(f"{mode}_fits")]
        return fitting[-1] if fitting else None

    def best_throughput(mode):
        fitting = [r for r in rows if r.get(f"{mode}_fits")]
        return max((r[f"{mode}_tokens_per_s"] for r in fitting), default=None)

    static_row, dynamic_row = largest("static"), largest("dynamic")
    out = {
        "static_largest_batch": static_row and static_row["batch"],
        "dynamic_largest_batch": dynamic_row and dynamic_row["batch"],
        "dynamic_limited_by_sweep": bool(rows and rows[-1].get("dynamic_fits")),
    }
    if static_row and dynamic_row:
        out["largest_batch_ratio"] = dynamic_row["batch"] / static_row["batch"]
        out["speedup_at_static_largest_batch"] = static_row["dynamic_tokens_per_s"] / static_row["static_tokens_per_s"]
        out["memory_ratio_at_static_largest_batch"] = static_row["static_peak_bytes"] / static_row["dynamic_peak_bytes"]
        out["max_throughput_ratio"] = best_throughput("dynamic") / best_throughput("static")
        out["static_max_tokens_per_s"] = best_throughput("static")
        out["dynamic_max_tokens_per_s"] = best_throughput("dynamic")
    return out


# ---- report ----------------------------------------------------------------------------------


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def rate(value) -> str:
    return "—" if value is None else f"{value:,.0f}"


def table(results: dict, cap_mib: int) -> str:
    headers = [
        "workload",
        "batch",
        "tokens",
        "C",
        "static tok/s",
        "dynamic tok/s",
        "dyn / static",
        "fairseq tok/s",
        "static MiB",
        "dynamic MiB",
        "static / dyn mem",
        "placeholders",
        "dropped",
    ]
    lines = []
    for workload, result in results.items():
        for r in result["rows"]:
            static, dynamic = r.get("static_tokens_per_s"), r.get("dynamic_tokens_per_s")
            static_mem, dynamic_mem = r.get("static_peak_bytes"), r.get("dynamic_peak_bytes")
            over = {m: "" if r.get(f"{m}_fits", True) else f" (> {cap_mib})" for m in ("static", "dynamic")}
            lines.append(
                [
                    WORKLOADS[workload]["title"],
                    r["batch"],
                    r["tokens"],
                    r["capacity"],
                    rate(static),
                    rate(dynamic),
                    f"{dynamic / static:.2f}x" if static and dynamic else "—",
                    rate(r.get("fairseq_tokens_per_s")),
                    mib(static_mem) + over["static"],
                    mib(dynamic_mem) + over["dynamic"],
                    f"{static_mem / dynamic_mem:.2f}x" if static_mem and dynamic_mem else "—",
                    f"{100 * r['placeholder_fraction']:.1f}%" if "placeholder_fraction" in r else "—",
                    f"{100 * r['dropped_fraction']:.1f}%" if "dropped_fraction" in r else "—",
                ]
            )
    return markdown_table(headers, lines)


def headline_table(results: dict, quick: bool = False) -> str:
    # Two noisy quick runs cannot settle a target: quick mode shows no targets.
    headers = ["workload", "metric", "moe_infer (this machine)", "paper (8x V100)"] + ([] if quick else ["target"])
    lines = []
    for workload, h in results.items():
        title = WORKLOADS[workload]["title"]
        paper = PAPER[workload]
        if "largest_batch_ratio" not in h:
            lines.append([title, "largest batch under the cap", "static fits no batch", "—", "—"])
            continue
        limited = " (dynamic limited by the sweep)" if h["dynamic_limited_by_sweep"] else ""
        lm = workload == "lm"
        lines += [
            [
                title,
                "throughput at static's largest batch",
                f"{h['speedup_at_static_largest_batch']:.2f}x",
                "—",
                ">= 5x" if lm else "—",
            ],
            [
                title,
                "max throughput (each at its best batch)",
                f"{h['max_throughput_ratio']:.2f}x",
                f"{paper['max_throughput']}x",
                "—",
            ],
            [
                title,
                "largest batch under the cap",
                f"{h['static_largest_batch']} -> {h['dynamic_largest_batch']} ({h['largest_batch_ratio']:.0f}x){limited}",
                f"{paper['largest_batch'][0]} -> {paper['largest_batch'][1]}",
                ">= 4x" if lm else "—",
            ],
            [
                title,
                "memory at static's largest batch",
                f"{h['memory_ratio_at_static_largest_batch']:.2f}x less",
                f"up to {paper['memory']}x less",
                "—",
            ],
        ]
    return markdown_table(headers, [line[: len(headers)] for line in lines])


def plot(results: dict, cap_mib: int, path_prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, ylabel, suffix in (
        ("tokens_per_s", "throughput (tokens/s)", "throughput"),
        ("peak_bytes", "peak MoE-layer memory (MiB)", "memory"),
    ):
        fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
        for ax, (workload, result) in zip(axes[0], results.items()):
            for mode, style in (("static", "o-"), ("dynamic", "s-"), ("fairseq", "x--")):
                points = [(r["batch"], r[f"{mode}_{metric}"]) for r in result["rows"] if f"{mode}_{metric}" in r]
                if not points:
                    continue
                xs, ys = zip(*points)
                ys = [y / 2**20 for y in ys] if metric == "peak_bytes" else ys
                label = {"fairseq": "fairseq (einsum re-implementation)"}.get(mode, f"{mode} gating")
                ax.plot(xs, ys, style, label=label)
            if metric == "peak_bytes":
                ax.axhline(cap_mib, color="grey", linestyle=":", label=f"cap {cap_mib} MiB")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch (sequences)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{WORKLOADS[workload]['title']}: {WORKLOADS[workload]['description']}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{path_prefix}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed runs per point, a 128 MiB cap, no fairseq column")
    parser.add_argument("--cap-mib", type=int, default=None, help="memory cap for the largest batch (default 512)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch tried")
    parser.add_argument("--workloads", default="lm,mt")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", default=None, help="results file stem under bench/results/")
    args = parser.parse_args()
    return_freed_memory_to_os()
    if args.cap_mib is None:
        args.cap_mib = 128 if args.quick else 512
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload '{w}'; expected some of {sorted(WORKLOADS)}")
    # Rough number of batch sizes per workload, for the progress bar.
    progress = Progress(len(workloads) * (8 if args.quick else 10), "bench/static_vs_dynamic")
    results = {}
    for workload in workloads:
        results[workload] = sweep(workload, args, progress)
    dtype_suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    stem = args.output or f"static_vs_dynamic_cpu{'_quick' if args.quick else ''}{dtype_suffix}"
    os.makedirs(RESULTS_DIR, exist_ok=True)
    plots = plot(results, args.cap_mib, os.path.join(RESULTS_DIR, stem))
    workload_lines = "\n".join(f"- {WORKLOADS[w]['title']}: {WORKLOADS[w]['description']}" for w in workloads)
    text = (
        f"# Static vs dynamic gating (cpu, {args.dtype})\n\n"
        f"Machine: {machine_description(torch.device('cpu'))}. Measured at commit {commit()}.\n\n"
        f"Workloads (batches of {args.seq_len}-token sequences, moe_infer.fairseq.MOELayer, one set of weights "
        f"for both modes):\n{workload_lines}\n\n"
        f"Memory: peak resident memory of one forward above the resident set before it (weights excluded); "
        f"cap for the largest batch: {args.cap_mib} MiB. Throughput: best of 3-10 interleaved runs (2 with --quick): the "
        f"machine is shared, and noise only ever slows a run down. 'fairseq': "
        f"moe_infer.reference's plain-PyTorch re-implementation of fairseq's MOELayer (dense einsum "
        f"dispatch/combine), where its [S, E, C] tensors are affordable. Static mode was checked against it "
        f"(relative error {max(r['fairseq_check_error'] for r in results.values()):.1e}).\n\n"
        f"## Headline\n\n{headline_table(results, args.quick)}\n\n## Sweep\n\n{table(results, args.cap_mib)}\n\n"
        f"Plots: {', '.join(os.path.basename(p) for p in plots)}\n"
    )
    print(text)
    md_path = write_result(f"{stem}.md", text)
    json_path = write_result(
        f"{stem}.json",
        json.dumps(
            {
                "machine": machine_description(torch.device("cpu")),
                "commit": commit(),
                "cap_mib": args.cap_mib,
                "seq_len": args.seq_len,
                "workloads": {w: {**WORKLOADS[w], **results[w]} for w in workloads},
                "paper": PAPER,
            },
            indent=1,
        ),
    )
    print(f"written: {md_path}, {json_path}, {', '.join(plots)}")


if __name__ == "__main__":
    main()
