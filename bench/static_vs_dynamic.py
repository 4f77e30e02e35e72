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

For each batch, over interleaved rounds (static, dynamic, fairseq, static, ...; every call
measured for both): throughput (tokens per second of process CPU time, --threads torch threads,
1 by default) and the peak memory of the MoE layer's forward (peak RSS above the resident set
before the call, Linux's VmHWM reset; weights excluded, they are the same in both modes), each
with min / median / max over the rounds, and every ratio (dynamic / static throughput, static /
dynamic memory) from the per-round ratios, min / median / max; also the share of dispatched rows
that are placeholders, the share of (token, expert) pairs static gating drops, and, where it is
affordable, the "fairseq" column: moe_infer.reference's plain-PyTorch re-implementation of fairseq
(dense einsum dispatch and combine). A mode stops growing its batch once its median peak exceeds
the memory cap; the largest batch under the cap is reported per mode. Prints a table, writes
bench/results/static_vs_dynamic_<device>.{md,json} and PNG plots of throughput and memory.
--quick (2 rounds) gives no verdicts.

    python bench/static_vs_dynamic.py [--quick] [--cap-mib 512] [--workloads lm,mt] [--threads 1]
"""

import argparse
import copy
import json
import os
import time

import torch

from common import (
    RESULTS_DIR,
    Progress,
    band,
    commit,
    dtype_suffix,
    machine_description,
    markdown_table,
    peak_memory,
    relative_error,
    results_header,
    return_freed_memory_to_os,
    spread,
    write_result,
)
from moe_infer import reference as ref
from moe_infer.fairseq import MOELayer, Top2Gate

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
    error = relative_error(got, want).item()
    if not error < 1e-5:
        raise SystemExit(f"static gating disagrees with the fairseq re-implementation: relative error {error:.2e}")
    return error


def static_stats(metadata: dict) -> tuple[float, float]:
    """(placeholder share of the E * C dispatched rows, dropped share of the routed pairs), from a
    static-mode run's metadata."""
    dropped = (float(metadata["overflow_expert1"]) + float(metadata["overflow_expert2"])) / 2
    return float(metadata["placeholder_fraction"]), dropped / 100


def measured_rounds(fns: dict, repeats: int) -> dict:
    """Interleaved rounds (A B C A B C ...): per function, the CPU seconds and the peak memory
    (bytes above the resident set before it) of every call."""
    samples = {name: {"seconds": [], "peak_bytes": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds = []

            def timed(fn=fn, seconds=seconds):
                start = time.process_time()
                out = fn()
                seconds.append(time.process_time() - start)
                return out

            samples[name]["peak_bytes"].append(peak_memory(timed))
            samples[name]["seconds"].append(seconds[0])
    return samples


def sweep(workload: str, args, progress: Progress) -> dict:
    dtype = getattr(torch, args.dtype)
    layer = build_layer(workload, dtype)
    error = check_against_fairseq(layer, args.seq_len)
    cap = args.cap_mib * 2**20
    rows = []
    fits = {"static": True, "dynamic": True}
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
        round_seconds = 0.0
        for name, fn in fns.items():  # warm-up, timed to size the rounds
            start = time.process_time()
            fn()
            round_seconds += time.process_time() - start
            if name == "static":
                row["placeholder_fraction"], row["dropped_fraction"] = static_stats(layer.metadata)
        repeats = args.repeats or (
            2 if args.quick else max(3, min(9, int(args.seconds_per_batch / max(round_seconds, 1e-3))))
        )
        for name, s in measured_rounds(fns, repeats).items():
            row[name] = {
                **s,
                "tokens_per_s": spread([num_tokens / t for t in s["seconds"]]),
                "peak_mib": spread([b / 2**20 for b in s["peak_bytes"]]),
            }
        for mode in modes:
            row[mode]["fits"] = row[mode]["peak_mib"][1] * 2**20 <= cap
            fits[mode] = row[mode]["fits"]
        if len(modes) == 2:
            static, dynamic = row["static"], row["dynamic"]
            # Per-round ratios: round i's static call ran next to round i's dynamic call.
            row["throughput_ratio"] = spread([s / d for s, d in zip(static["seconds"], dynamic["seconds"])])
            # A small call may not grow the resident set at all (0 bytes): no ratio then.
            if min(dynamic["peak_bytes"]) > 0:
                row["memory_ratio"] = spread([s / d for s, d in zip(static["peak_bytes"], dynamic["peak_bytes"])])
        rows.append(row)
        progress.step(f"{workload} batch {batch} ({repeats} rounds)")
        batch *= 2
    return {"rows": rows, "fairseq_check_error": error, **headline(rows)}


def headline(rows: list) -> dict:
    """Largest batch under the cap per mode; at static's largest batch the throughput and memory
    ratios (per-round: [min, median, max]); each mode's best throughput under the cap and their ratio
    ([min / max, median / median, max / min] of the two rows' rounds)."""

    def fitting(mode):
        return [r for r in rows if r.get(mode, {}).get("fits")]

    static_fit, dynamic_fit = fitting("static"), fitting("dynamic")
    out = {
        "static_largest_batch": static_fit[-1]["batch"] if static_fit else None,
        "dynamic_largest_batch": dynamic_fit[-1]["batch"] if dynamic_fit else None,
        "dynamic_limited_by_sweep": bool(rows and rows[-1].get("dynamic", {}).get("fits")),
    }
    if static_fit and dynamic_fit:
        at = static_fit[-1]
        best_static = max(static_fit, key=lambda r: r["static"]["tokens_per_s"][1])
        best_dynamic = max(dynamic_fit, key=lambda r: r["dynamic"]["tokens_per_s"][1])
        s, d = best_static["static"]["tokens_per_s"], best_dynamic["dynamic"]["tokens_per_s"]
        out.update(
            largest_batch_ratio=out["dynamic_largest_batch"] / out["static_largest_batch"],
            speedup_at_static_largest_batch=at["throughput_ratio"],
            memory_ratio_at_static_largest_batch=at.get("memory_ratio"),
            max_throughput_ratio=[d[0] / s[2], d[1] / s[1], d[2] / s[0]],
            static_best_batch=best_static["batch"],
            dynamic_best_batch=best_dynamic["batch"],
            static_max_tokens_per_s=s,
            dynamic_max_tokens_per_s=d,
        )
    return out


# ---- report ----------------------------------------------------------------------------------


def table(results: dict, cap_mib: int) -> str:
    headers = [
        "workload",
        "batch",
        "tokens",
        "C",
        "rounds",
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

            def mem(mode, r=r):
                if mode not in r:
                    return "—"
                return f"{r[mode]['peak_mib'][1]:.0f}" + ("" if r[mode]["fits"] else f" (> {cap_mib})")

            lines.append(
                [
                    WORKLOADS[workload]["title"],
                    r["batch"],
                    r["tokens"],
                    r["capacity"],
                    len(next(r[m]["seconds"] for m in ("static", "dynamic") if m in r)),
                    *(band(r[m]["tokens_per_s"], "{:,.0f}") if m in r else "—" for m in ("static", "dynamic")),
                    band(r.get("throughput_ratio"), unit="x"),
                    band(r["fairseq"]["tokens_per_s"], "{:,.0f}") if "fairseq" in r else "—",
                    mem("static"),
                    mem("dynamic"),
                    band(r.get("memory_ratio"), unit="x"),
                    f"{100 * r['placeholder_fraction']:.1f}%" if "placeholder_fraction" in r else "—",
                    f"{100 * r['dropped_fraction']:.1f}%" if "dropped_fraction" in r else "—",
                ]
            )
    return markdown_table(headers, lines)


def headline_table(results: dict, quick: bool = False) -> str:
    # Two noisy quick rounds cannot settle a target: quick mode shows no targets.
    headers = ["workload", "metric", "moe_infer (this machine): median [min-max]", "paper (8x V100)"] + (
        [] if quick else ["target"]
    )
    lines = []
    for workload, h in results.items():
        title = WORKLOADS[workload]["title"]
        paper = PAPER[workload]
        if "largest_batch_ratio" not in h:
            lines.append([title, "largest batch under the cap", "static fits no batch", "—", "—"])
            continue
        limited = " (dynamic limited by the sweep)" if h["dynamic_limited_by_sweep"] else ""
        lm = workload == "lm"
        speedup = h["speedup_at_static_largest_batch"]
        lines += [
            [
                title,
                f"throughput at static's largest batch ({h['static_largest_batch']})",
                band(speedup, unit="x"),
                "—",
                (">= 5x: " + ("met" if speedup[0] >= 5 else "not met")) if lm else "—",
            ],
            [
                title,
                f"max throughput (static at batch {h['static_best_batch']}, dynamic at {h['dynamic_best_batch']})",
                band(h["max_throughput_ratio"], unit="x"),
                f"{paper['max_throughput']}x",
                "—",
            ],
            [
                title,
                "largest batch under the cap",
                f"{h['static_largest_batch']} -> {h['dynamic_largest_batch']} ({h['largest_batch_ratio']:.0f}x){limited}",
                f"{paper['largest_batch'][0]} -> {paper['largest_batch'][1]}",
                (">= 4x: " + ("met" if h["largest_batch_ratio"] >= 4 else "not met")) if lm else "—",
            ],
            [
                title,
                "memory at static's largest batch (static / dynamic)",
                band(h["memory_ratio_at_static_largest_batch"], unit="x"),
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
        ("tokens_per_s", "throughput (tokens/s of CPU time; bars: min-max)", "throughput"),
        ("peak_mib", "peak MoE-layer memory (MiB; bars: min-max)", "memory"),
    ):
        fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
        for ax, (workload, result) in zip(axes[0], results.items()):
            for mode, style in (("static", "o-"), ("dynamic", "s-"), ("fairseq", "x--")):
                points = [(r["batch"], r[mode][metric]) for r in result["rows"] if mode in r]
                if not points:
                    continue
                xs = [x for x, _ in points]
                mids = [v[1] for _, v in points]
                bars = [[v[1] - v[0] for _, v in points], [v[2] - v[1] for _, v in points]]
                label = {"fairseq": "fairseq (einsum re-implementation)"}.get(mode, f"{mode} gating")
                ax.errorbar(xs, mids, yerr=bars, fmt=style, capsize=2, label=label)
            if metric == "peak_mib":
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
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds per point, a 128 MiB cap, no fairseq column, no verdicts"
    )
    parser.add_argument("--cap-mib", type=int, default=None, help="memory cap for the largest batch (default 512)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch tried")
    parser.add_argument("--workloads", default="lm,mt")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then per core)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per point (default: 3-9, about 20 s a point)")
    parser.add_argument("--seconds-per-batch", type=float, default=20.0, help="CPU seconds of rounds per point (3-9)")
    parser.add_argument("--output", default=None, help="results file stem under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    stem = (
        args.output
        or f"static_vs_dynamic_cpu{'_quick' if args.quick else ''}{dtype_suffix(getattr(torch, args.dtype))}"
    )
    os.makedirs(RESULTS_DIR, exist_ok=True)
    plots = plot(results, args.cap_mib, os.path.join(RESULTS_DIR, stem))
    workload_lines = "\n".join(f"- {WORKLOADS[w]['title']}: {WORKLOADS[w]['description']}" for w in workloads)
    text = (
        results_header(
            f"Static vs dynamic gating (cpu, {args.dtype})",
            machine_description(torch.device("cpu")),
            commit(),
            args.quick,
        )
        + f"Workloads (batches of {args.seq_len}-token sequences, moe_infer.fairseq.MOELayer, one set of weights "
        f"for both modes):\n{workload_lines}\n\n"
        f"Throughput: tokens per second of process CPU time, {args.threads} torch thread(s), the process pinned to "
        f"core(s) {sorted(os.sched_getaffinity(0))} of {os.cpu_count()} (a shared machine: other jobs ran on the other "
        f"cores). Memory: peak resident "
        f"memory of one forward above the resident set before it (weights excluded); cap for the largest batch: "
        f"{args.cap_mib} MiB, on the median peak. Each point is 3-9 interleaved rounds (2 with --quick; the 'rounds' "
        f"column), every call measured for both time and memory; values are median [min-max] over the rounds, ratios "
        f"are per round (round i's static call against round i's dynamic call), and the max-throughput ratio pairs "
        f"the two best rows as [min / max, median / median, max / min]. 'fairseq': moe_infer.reference's "
        f"plain-PyTorch re-implementation of fairseq's MOELayer (dense einsum dispatch/combine), where its "
        f"[S, E, C] tensors are affordable. Static mode was checked against it (relative error "
        f"{max(r['fairseq_check_error'] for r in results.values()):.1e}).\n\n"
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
                "threads": args.threads,
                "clock": "process CPU time",
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
