"""The main job (scripts/run.sh): what moe_infer is for, end to end, on a transformers MoE model.

1. Generation: a Mixtral-style transformers v5 model built from a config with seeded weights (no
   download) generates greedily as shipped (transformers' "eager" experts, and its "grouped_mm")
   and after ``moe_infer.optimize(model)``: tokens/s, and that moe_infer computes what the model
   as shipped does (the check below).
2. Expert buffering: the same generation after ``optimize(model, expert_buffer=N)``: every
   layer's experts in host memory, N expert slots per layer on the compute device: the same tokens
   as without; tokens/s, the experts' bytes on the compute device, hit rate of the slots.
3. Static vs dynamic gating: one fairseq-style MoE layer (``moe_infer.fairseq``, top-2, fairseq's
   eval capacity ceil(0.25 * S)) on one batch, both modes: tokens/s, rows computed, peak memory.
4. Expert placement, the paper's protocol (plan on the first half of a routing trace, measure on
   the second): Max Load on 4 ranks for the routing recorded in part 1 and for a skewed
   synthetic trace.

Timings are CPU time of one thread (the machine may be shared), variants interleaved, repeated;
min / median / max. Prints tables and writes main_cpu[_quick].md and .png to --out (default:
results/ at the repository root, untracked) or, with --refresh, to bench/results/.

Weights and activations in --dtype (default float32; bfloat16 writes main_cpu_bfloat16*). The job
exits non-zero where moe_infer's generation check fails (generation_failure: float32, the model as
shipped's tokens; 16-bit types, its logits as closely as transformers' own grouped_mm).

    python bench/generate.py [--quick] [--dtype bfloat16|float32] [--refresh | --out DIR]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

import moe_infer
from common import (
    RESULTS_DIR,
    Progress,
    dtype_suffix,
    load_hf_models,
    machine_description,
    markdown_table,
    relative_error,
    time_interleaved,
)
from moe_infer.fairseq import MOELayer, Top2Gate
from moe_infer.placement import LoadRecorder, load_metrics, rank_loads
from moe_infer.traces import RoutingRecorder, RoutingTrace, synthetic_trace

hf_models = load_hf_models()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (full, --quick) settings. model: Mixtral-style sizes; run: batch of prompts, prompt and generated
# lengths, timed repeats, expert slots of the buffered variants, the static-gating batch (batch, seq).
MODEL_SETTINGS = dict(
    hidden=(512, 256), ffn=(1024, 512), experts=(16, 8), top_k=(2, 2), layers=(4, 2), vocab=(1024, 512), heads=(8, 4)
)
RUN_SETTINGS = dict(
    batch=(4, 2),
    prompt=(32, 16),
    new_tokens=(32, 16),
    repeats=(5, 3),
    slots=([8, 4], [4, 2]),
    static_batch=((8, 128), (4, 64)),
)
STATIC_LAYER = dict(model_dim=256, ffn_dim=512, num_experts=64, eval_capacity_token_fraction=0.25)
RANKS = 4


def settings(quick: bool) -> dict:
    """One column of the settings tables: {"model": {...}, "batch": ..., ...}."""
    column = lambda table: {name: values[quick] for name, values in table.items()}  # noqa: E731
    return dict(model=column(MODEL_SETTINGS), **column(RUN_SETTINGS))


def spread(samples: list[float]) -> tuple[float, float, float]:
    return min(samples), statistics.median(samples), max(samples)


def generate(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def buffers_of(model) -> dict:
    report = getattr(model, "moe_infer_report", None)
    return report.buffers if report is not None else {}


def expert_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)


# ---- 1 and 2: generation, as shipped, optimized, buffered ----------------------------------------


def part_generation(cfg, dtype, progress):
    base = hf_models.build_model("mixtral", **cfg["model"], dtype=dtype)
    prompt = torch.randint(
        3, cfg["model"]["vocab"], (cfg["batch"], cfg["prompt"]), generator=torch.Generator().manual_seed(1)
    )
    variants = {"transformers eager (as shipped)": base}
    grouped = copy.deepcopy(base)
    grouped.set_experts_implementation("grouped_mm")
    variants["transformers grouped_mm"] = grouped
    variants["moe_infer.optimize"] = moe_infer.optimize(copy.deepcopy(base), verbose=False)
    for slots in cfg["slots"]:
        variants[f"optimize, expert_buffer={slots}"] = moe_infer.optimize(
            copy.deepcopy(base), expert_buffer=slots, verbose=False
        )
    shipped_sequence = generate(base, prompt, cfg["new_tokens"])
    expected = shipped_sequence[:, prompt.shape[1] :]
    identical = {}  # name -> generated tokens equal to the model as shipped in every sequence (a prefix)
    generated = {}  # name -> its generated tokens
    shipped_logits = teacher_forced_logits(base, shipped_sequence, prompt.shape[1])
    logits_error = {}  # name -> (prefill, decode) medians of its logits' error against the shipped model's
    for name, model in variants.items():
        generated[name] = generate(model, prompt, cfg["new_tokens"])[:, prompt.shape[1] :]
        identical[name] = int((generated[name] == expected).int().cumprod(dim=1).sum(dim=1).min())
        errors = relative_error(teacher_forced_logits(model, shipped_sequence, prompt.shape[1]), shipped_logits, -1)
        logits_error[name] = (
            errors[:, : prompt.shape[1]].median().item(),
            errors[:, prompt.shape[1] :].median().item(),
        )
        progress.step(f"check {name}")
    for model in variants.values():
        for buffer in buffers_of(model).values():
            buffer.reset_stats()  # hit rates of the timed runs only
    fns = {name: (lambda m=model: generate(m, prompt, cfg["new_tokens"])) for name, model in variants.items()}
    samples = time_interleaved(
        fns, torch.device("cpu"), cfg["repeats"], warmup=0, statistic=list, clock=time.process_time
    )
    progress.step("timed generation")
    tokens = cfg["batch"] * cfg["new_tokens"]
    all_experts = expert_bytes(base)
    rows = []
    shipped = statistics.median(samples["transformers eager (as shipped)"])
    for name, model in variants.items():
        low, mid, high = spread(samples[name])
        buffers = buffers_of(model)
        if buffers:
            on_device = sum(b.pool_bytes for b in buffers.values())
            hits = sum(b.stats()["hits"] for b in buffers.values())
            misses = sum(b.stats()["misses"] for b in buffers.values())
            slots = f"{next(iter(buffers.values())).num_slots} of {cfg['model']['experts']}"
            hit_rate = f"{hits / (hits + misses):.2f}"
        else:
            on_device, slots, hit_rate = all_experts, "all", "-"
        rows.append(
            dict(
                variant=name,
                ours=not name.startswith("transformers"),
                identical=identical[name],
                logits_error=logits_error[name],
                same_as_optimize=torch.equal(generated[name], generated["moe_infer.optimize"]),
                new_tokens=cfg["new_tokens"],
                tokens_per_s=(tokens / high, tokens / mid, tokens / low),
                vs_shipped=shipped / mid,
                slots=slots,
                device_mib=on_device / 2**20,
                memory_cut=all_experts / on_device,
                hit_rate=hit_rate,
            )
        )
    recording = RoutingRecorder(base)
    with recording:
        generate(base, prompt, cfg["new_tokens"])
    progress.step("routing trace")
    return rows, recording.trace, all_experts


def teacher_forced_logits(model, sequences, prompt_length):
    """The logits at every position of ``sequences`` as generate() computes them: the prompt in one
    forward (prefill), then each later token in a step of its own through the cache (decode, where
    moe_infer runs its few-rows kernels), float64."""
    with torch.no_grad():
        out = model(input_ids=sequences[:, :prompt_length], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = [out.logits]
        for t in range(prompt_length, sequences.shape[1]):
            position = torch.full((sequences.shape[0], 1), t)
            out = model(input_ids=sequences[:, t : t + 1], cache=cache, position_ids=position, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).double()


# In 16-bit types no two GEMM implementations round alike, transformers' own grouped_mm and its eager
# loop included: a last-bit difference in a logit changes a greedy token sooner or later, and the
# sequences part there. There moe_infer's logits on the shipped model's sequences (teacher-forced:
# prefill, then decode steps) must be at most this many times as far from the shipped model's as
# grouped_mm's are, median over positions, prefill and decode apart (measured over 9 seeds: 0.93-1.19x;
# a 2% error in every MoE output: about 2-3x). The distance taken is at least the dtype's epsilon.
MAX_ERROR_VS_GROUPED_MM = 1.5


def generation_failure(rows, dtype) -> str:
    """Why moe_infer's generation check fails, or "". float32: moe_infer's variants generate the
    shipped model's tokens. 16-bit types: their logits are within MAX_ERROR_VS_GROUPED_MM of
    grouped_mm's distance from the shipped model's, and expert buffering changes no token."""
    ours = [r for r in rows if r["ours"]]
    if dtype == torch.float32:
        different = [r["variant"] for r in ours if r["identical"] != r["new_tokens"]]
        return f"{', '.join(different)} generated other tokens than the model as shipped" if different else ""
    grouped = next(r for r in rows if r["variant"] == "transformers grouped_mm")["logits_error"]
    epsilon = torch.finfo(dtype).eps
    bounds = [MAX_ERROR_VS_GROUPED_MM * max(g, epsilon) for g in grouped]
    far = [
        f"{r['variant']} ({phase} {error:.1e} > {bound:.1e})"
        for r in ours
        for phase, error, bound in zip(("prefill", "decode"), r["logits_error"], bounds)
        if not error <= bound  # NaN fails
    ]
    if far:
        return f"logits further from the shipped model's than grouped_mm's allow: {', '.join(far)}"
    moved = [r["variant"] for r in ours if not r["same_as_optimize"]]
    return f"{', '.join(moved)} generated other tokens than moe_infer.optimize" if moved else ""


def generation_table(rows) -> str:
    return markdown_table(
        [
            "variant",
            "tokens identical",
            "logits vs as shipped (prefill / decode)",
            "tokens/s (median)",
            "tokens/s (min-max)",
            "vs as shipped",
            "expert slots",
            "experts on device MiB",
            "memory cut",
            "hit rate",
        ],
        [
            [
                r["variant"],
                "yes" if r["identical"] == r["new_tokens"] else f"first {r['identical']} of {r['new_tokens']}",
                f"{r['logits_error'][0]:.1e} / {r['logits_error'][1]:.1e}",
                f"{r['tokens_per_s'][1]:.1f}",
                f"{r['tokens_per_s'][0]:.1f}-{r['tokens_per_s'][2]:.1f}",
                f"{r['vs_shipped']:.2f}x",
                r["slots"],
                f"{r['device_mib']:.1f}",
                f"{r['memory_cut']:.2f}x",
                r["hit_rate"],
            ]
            for r in rows
        ],
    )


# ---- 3: static vs dynamic gating -------------------------------------------------------------------


def part_static_vs_dynamic(cfg, dtype, progress):
    from static_vs_dynamic import peak_memory, static_stats  # here: importing it changes malloc settings

    spec = STATIC_LAYER
    torch.manual_seed(0)
    gate = Top2Gate(
        spec["model_dim"],
        spec["num_experts"],
        second_expert_policy="all",
        moe_eval_capacity_token_fraction=spec["eval_capacity_token_fraction"],
    )
    layer = MOELayer.build(gate, spec["ffn_dim"], "gelu").to(dtype).eval()
    batch, seq = cfg["static_batch"]
    x = torch.randn(batch, seq, spec["model_dim"], dtype=dtype)

    def run(mode):
        layer.gating = mode
        with torch.no_grad():
            return layer(x)[0]

    outputs = {mode: run(mode) for mode in ("dynamic", "static")}
    placeholders, dropped = static_stats(layer.metadata)  # of the static run, the last one
    capacity = layer.metadata["capacity"]
    peaks = {mode: peak_memory(lambda m=mode: run(m)) for mode in ("static", "dynamic")}
    fns = {mode: (lambda m=mode: run(m)) for mode in ("static", "dynamic")}
    samples = time_interleaved(
        fns, torch.device("cpu"), cfg["repeats"], warmup=1, statistic=list, clock=time.process_time
    )
    progress.step("static vs dynamic")
    tokens = batch * seq
    rows_computed = {"static": spec["num_experts"] * int(capacity), "dynamic": tokens * 2}
    result = []
    for mode in ("static", "dynamic"):
        low, mid, high = spread(samples[mode])
        result.append(
            dict(
                mode=mode,
                tokens_per_s=(tokens / high, tokens / mid, tokens / low),
                rows=rows_computed[mode],
                peak_mib=peaks[mode] / 2**20,
            )
        )
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    same = dropped == 0 and torch.allclose(outputs["static"].float(), outputs["dynamic"].float(), **tolerance)
    return dict(
        rows=result,
        tokens=tokens,
        capacity=int(capacity),
        placeholders=placeholders,
        dropped=dropped,
        same_output=same,
        speedup=statistics.median(samples["static"]) / statistics.median(samples["dynamic"]),
    )


def static_table(result) -> str:
    return markdown_table(
        ["gating", "tokens/s (median)", "tokens/s (min-max)", "expert rows computed", "peak MiB", "dynamic / static"],
        [
            [
                r["mode"],
                f"{r['tokens_per_s'][1]:.0f}",
                f"{r['tokens_per_s'][0]:.0f}-{r['tokens_per_s'][2]:.0f}",
                r["rows"],
                f"{r['peak_mib']:.1f}",
                f"{result['speedup']:.2f}x" if r["mode"] == "dynamic" else "1.00x",
            ]
            for r in result["rows"]
        ],
    )


# ---- 4: expert placement ---------------------------------------------------------------------------


def placements(num_experts):
    base = -(-num_experts // RANKS)
    return {
        "contiguous": dict(algorithm="contiguous"),
        "greedy (paper)": dict(algorithm="greedy"),
        "anti-correlation (paper)": dict(algorithm="anti_correlation"),
        "greedy + replicas": dict(algorithm="greedy", replicate=True, slots_per_rank=base + 1),
    }


def placement_rows(trace: RoutingTrace):
    """Plan on the first half of the batches, measure on the second, averaged over layers."""
    half = trace.num_batches // 2
    history = LoadRecorder.from_trace(trace, range(half))
    rows = {}
    for name, options in placements(trace.num_experts).items():
        metrics = []
        for layer in range(trace.num_layers):
            placement = history.plan(layer, RANKS, **options)
            metrics.append(load_metrics(rank_loads(placement, trace.expert_counts(layer)[half:])))
        rows[name] = (
            max(m.max_load for m in metrics),
            statistics.mean(m.avg_max_load for m in metrics),
            statistics.mean(m.balancedness for m in metrics),
        )
    return rows


def part_placement(model_trace, cfg, progress):
    experts = cfg["model"]["experts"] * 4
    skewed = synthetic_trace(experts, 2, 40, 512, num_layers=2, skew=1.5, locality=0.999, seed=0)
    traces = {
        f"recorded in part 1 (E={model_trace.num_experts}, {model_trace.num_batches} batches)": model_trace,
        f"synthetic, Zipf skew 1.5 (E={experts}, 40 batches)": skewed,
    }
    out = {name: placement_rows(trace) for name, trace in traces.items()}
    progress.step("placement")
    return out


def placement_table(results) -> str:
    rows = []
    for trace, by_placement in results.items():
        contiguous = by_placement["contiguous"][0]
        for name, (max_load, avg_max_load, balancedness) in by_placement.items():
            rows.append(
                [
                    trace,
                    name,
                    f"{max_load:.3f}",
                    f"{avg_max_load:.3f}",
                    f"{balancedness:.3f}",
                    f"{contiguous / max_load:.2f}x",
                ]
            )
    return markdown_table(
        ["routing trace", f"placement on {RANKS} ranks", "Max Load", "Avg Max Load", "balancedness", "vs contiguous"],
        rows,
    )


# ---- plot and main -----------------------------------------------------------------------------------


def plot(generation, static, placement, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    names = [
        r["variant"]
        .replace("transformers ", "HF ")
        .replace(" (as shipped)", "\n(as shipped)")
        .replace("moe_infer.optimize", "moe_infer\noptimize")
        .replace(", expert_buffer=", "\nexpert_buffer=")
        for r in generation
    ]
    medians = [r["tokens_per_s"][1] for r in generation]
    errors = [
        [m - r["tokens_per_s"][0] for m, r in zip(medians, generation)],
        [r["tokens_per_s"][2] - m for m, r in zip(medians, generation)],
    ]
    axes[0].bar(range(len(names)), medians, yerr=errors, color=["grey", "grey"] + ["C0"] * (len(names) - 2))
    axes[0].set_xticks(range(len(names)), names, fontsize=7)
    axes[0].set_ylabel("generated tokens/s (1 thread)")
    axes[0].set_title("Generation: as shipped vs moe_infer")
    for i, r in enumerate(generation):
        if r["slots"] != "all":
            axes[0].annotate(
                f"{r['memory_cut']:.1f}x less\nexpert\nmemory\n\nhit rate\n{r['hit_rate']}",
                (i, medians[i] / 2),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    modes = [r["mode"] for r in static["rows"]]
    axes[1].bar(modes, [r["tokens_per_s"][1] for r in static["rows"]], color=["grey", "C0"])
    axes[1].set_ylabel("tokens/s")
    axes[1].set_ylim(0, 1.2 * max(r["tokens_per_s"][1] for r in static["rows"]))
    axes[1].set_title(f"Static vs dynamic gating ({static['tokens']} tokens, E={STATIC_LAYER['num_experts']})")
    for i, r in enumerate(static["rows"]):
        axes[1].annotate(
            f"{r['rows']} rows\n{r['peak_mib']:.0f} MiB peak",
            (i, r["tokens_per_s"][1]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    width = 0.8 / len(placement)
    for j, (trace, by_placement) in enumerate(placement.items()):
        labels = list(by_placement)
        axes[2].bar(
            [i + j * width for i in range(len(labels))],
            [v[0] for v in by_placement.values()],
            width,
            label=trace.split(" (")[0],
        )
        axes[2].set_xticks(
            [i + width / 2 for i in range(len(labels))], [s.replace(" (", "\n(") for s in labels], fontsize=7
        )
    axes[2].axhline(1 / RANKS, color="k", lw=0.8, ls="--", label=f"perfect balance (1/{RANKS})")
    axes[2].set_ylabel("Max Load (share of tokens on the busiest rank)")
    axes[2].set_title(f"Expert placement on {RANKS} ranks")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats (about a minute)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for the tables and plot")
    where.add_argument("--refresh", action="store_true", help="write to bench/results/ (the committed results)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    out_dir = RESULTS_DIR if args.refresh else args.out
    os.makedirs(out_dir, exist_ok=True)
    name = "main_cpu" + dtype_suffix(dtype) + ("_quick" if args.quick else "")
    cfg = settings(args.quick)
    torch.set_num_threads(1)
    # A check per variant (3, and one per slot count), timed generation, the routing trace, static
    # vs dynamic, placement.
    progress = Progress(3 + len(cfg["slots"]) + 4, "main job")

    generation, trace, all_experts = part_generation(cfg, dtype, progress)
    static = part_static_vs_dynamic(cfg, dtype, progress)
    placement = part_placement(trace, cfg, progress)

    m = cfg["model"]
    text = [
        "# moe_infer end to end: generation, expert buffering, static vs dynamic gating, placement",
        "",
        f"Machine: {machine_description(torch.device('cpu'))}. Written by `bench/generate.py{' --quick' if args.quick else ''}`"
        " (scripts/run.sh). Times are CPU time of one thread, variants interleaved, "
        f"{cfg['repeats']} repeats: median, and min-max.",
        "",
        "## Generation",
        "",
        f"A Mixtral-style transformers model built from a config, seeded weights in {args.dtype}: hidden {m['hidden']}, expert ffn "
        f"{m['ffn']}, {m['experts']} experts, top-{m['top_k']}, {m['layers']} layers ({all_experts / 2**20:.1f} MiB of "
        f"experts). Greedy generation of {cfg['new_tokens']} tokens after {cfg['prompt']}-token prompts, batch "
        f"{cfg['batch']}. 'tokens identical': the same generated ids as the model as shipped (else how many of the "
        "first generated tokens agree in every sequence). 'logits vs as shipped': each variant's logits on the "
        "shipped model's sequences, teacher-forced as generate() runs them (the prompt in one forward, then one "
        "token a step through the cache), against the shipped model's: the median over positions of the "
        "relative error, prompt positions / generated positions. With expert buffering "
        "the experts live in host memory and each layer keeps its slots on the compute device (on this CPU both are "
        "the same RAM: the column counts what a GPU would hold); hit rate over the timed runs."
        + (
            ""
            if dtype == torch.float32
            else " In 16-bit types no two GEMM implementations round alike, transformers' own grouped_mm and "
            "its eager loop included, so greedy sequences part after a few tokens. The job passes where moe_infer's "
            f"logits are within {MAX_ERROR_VS_GROUPED_MM}x grouped_mm's distance from the shipped model's and expert "
            "buffering changes no token. That the routing itself is transformers' (the same experts for the same "
            "inputs, ties included) is tested per architecture in tests/python/test_hf.py."
        ),
        "",
        generation_table(generation),
        "",
        "## Static vs dynamic gating",
        "",
        f"One fairseq-style MoE layer (moe_infer.fairseq, {args.dtype}): hidden {STATIC_LAYER['model_dim']}, ffn "
        f"{STATIC_LAYER['ffn_dim']}, {STATIC_LAYER['num_experts']} experts, top-2, gelu, fairseq's eval capacity "
        f"ceil({STATIC_LAYER['eval_capacity_token_fraction']} * S) = {static['capacity']} per expert; one batch of "
        f"{static['tokens']} tokens. Static gating computes every expert's whole capacity "
        f"({static['placeholders']:.0%} of its rows are placeholders; {static['dropped']:.1%} of pairs dropped); "
        f"dynamic gating computes the {static['tokens'] * 2} real rows. Outputs "
        f"{'equal within rounding (no pair dropped)' if static['same_output'] else 'differ where static gating drops pairs'}. "
        "Peak: the process's peak resident memory during one forward above what was resident before.",
        "",
        static_table(static),
        "",
        "## Expert placement",
        "",
        f"The paper's protocol: plan from the first half of a routing trace, measure the second half, {RANKS} ranks; "
        "'+ replicas' has one spare slot per rank for copies of hot experts. Max Load: the largest share of a batch's "
        "tokens on one rank (worst over batches and layers); the recorded trace comes from a model with random "
        "weights, whose routing is close to uniform, so placement has little to gain there.",
        "",
        placement_table(placement),
        "",
        f"Plot: {name}.png",
        "",
    ]
    text = "\n".join(text)
    print()
    print(text)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    plot(generation, static, placement, os.path.join(out_dir, f"{name}.png"))
    print(f"wrote {os.path.join(out_dir, name)}.md and .png")
    failure = generation_failure(generation, dtype)
    if failure:
        sys.exit(f"main job: {failure}")


if __name__ == "__main__":
    main()
