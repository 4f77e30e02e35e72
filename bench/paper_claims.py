"""The paper's nine claims beside ours, from the committed benchmark results.

Reads the result files the benchmarks write (bench/results/*.json), and writes
bench/results/paper_claims.json, bench/results/paper_claims.md (the full table) and the README's
short table (between its paper-claims markers).
Each claim carries our figure, the setting it was measured in, how that differs from the paper's,
a verdict and its evidence files. A claim whose evidence is missing gets ours = null and verdict
"not" with the reason.

Verdicts: "reproduced" when our figure shows the paper's effect at least as strongly in a setting
that keeps what drives the result; "partly" when the effect is there but weaker, or the setting
differs in a way that matters; "not" when it is absent or unmeasured.

    python bench/paper_claims.py
"""

import json
import os

from common import RESULTS_DIR, commit, markdown_table, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's paper table sits between these markers; this script rewrites it.
README_BEGIN, README_END = "<!-- paper-claims:begin -->", "<!-- paper-claims:end -->"


def _load(name):
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _evidence(*names):
    return [f"bench/results/{n}" for n in names if os.path.exists(os.path.join(RESULTS_DIR, n))]


def _claim(id, claim, paper, unit, ours=None, setting="", verdict="not", evidence=(), **extra):
    return dict(
        id=id,
        claim=claim,
        paper=paper,
        ours=ours,
        unit=unit,
        setting=setting,
        verdict=verdict,
        evidence=list(evidence),
        **extra,
    )


def _throughput_claims(models, fairseq_mt=None):
    """Claims 1-5 from bench/paper_models.py (whole models, dynamic vs static gating), bfloat16, at the
    headline memory budget (the other budgets and float32 are in its results)."""
    missing = "not measured: bench/paper_models.py has not run"
    if not models:
        return [
            _claim(1, "LM: dynamic / static gating, maximum throughput", 6.21, "x", setting=missing),
            _claim(2, "MT encoder: dynamic / static gating, maximum throughput", 5.75, "x", setting=missing),
            _claim(3, "MT decoder: dynamic / static gating, maximum throughput", 2.58, "x", setting=missing),
            _claim(4, "LM: memory, static / dynamic gating at equal batch", 1.36, "x", setting=missing),
            _claim(5, "LM: largest batch that fits, static -> dynamic", 8.0, "x (8 -> 64)", setting=missing),
        ]
    budget = models["headline_budget"]
    evidence = _evidence("paper_models.json", "paper_models.md")
    common = (
        f"whole model, bfloat16 (float32 in the evidence), one CPU thread, CPU time; memory budget {budget} "
        "(the paper's V100s held about 2.5x their weights); no expert parallelism, so static pays for "
        "placeholder compute and [S, E, C] tensors, not for a fixed-size all-to-all"
    )
    claims = []
    specs = [
        (1, "lm", "LM: dynamic / static gating, maximum throughput", 6.21, ""),
        (
            2,
            "mt_encoder",
            "MT encoder: dynamic / static gating, maximum throughput",
            5.75,
            "; static = transformers 5.24's NLLB-MoE as shipped (its expert loop computes E x tokens rows, as fairseq's "
            "static gating at fraction 1.0 does, but routes them wrongly)",
        ),
        (
            3,
            "mt_decoder",
            "MT decoder: dynamic / static gating, maximum throughput",
            2.58,
            "; greedy generation of 16 tokens with a KV cache; neither mode outgrew the budget within the sweep (batch "
            "128), so both are compared there; static = transformers as shipped (see claim 2)",
        ),
    ]
    for id, key, text, paper, note in specs:
        shipped = None
        entry = models["workloads"][key]["bf16"]
        if key != "lm" and fairseq_mt and key in fairseq_mt["workloads"]:
            # The correct static baseline: fairseq's static gating on the same NLLB-MoE weights.
            shipped = entry["budgets"][budget]["best_vs_best"]
            entry = fairseq_mt["workloads"][key]["bf16"]
            note = note.replace(
                "static = transformers 5.24's NLLB-MoE as shipped (its expert loop computes E x tokens rows, as "
                "fairseq's static gating at fraction 1.0 does, but routes them wrongly)",
                "static = fairseq's static gating on the NLLB-MoE weights (moe_infer.fairseq.MOELayer gating='static', "
                "Top2Gate with NLLB's options, eval capacity ceil(1.0 * S))",
            ).replace(
                "static = transformers as shipped (see claim 2)", "static = fairseq's static gating (see claim 2)"
            )
            note += (
                f"; against transformers 5.24's NLLB-MoE as shipped (which routes wrongly): {shipped['median']:.2f}x "
                f"[{shipped['min']:.2f}-{shipped['max']:.2f}]"
            )
        best = entry["budgets"][budget]["best_vs_best"]
        ours = best["median"]
        verdict = "reproduced" if best["min"] >= paper else ("partly" if ours > 1.0 else "not")
        setting = (
            f"{entry['setting']}; {common}{note}; static at batch {best['static_batch']}, dynamic at "
            f"{best['dynamic_batch']}; spread {best['min']:.2f}-{best['max']:.2f}x"
        )
        extra = {} if shipped is None else {"vs_transformers_as_shipped": shipped["median"]}
        claims.append(
            _claim(
                id,
                text,
                paper,
                "x",
                ours,
                setting,
                verdict,
                evidence + (_evidence("paper_models_mt_fairseq.json", "paper_models_mt_fairseq.md") if shipped else []),
                spread=[best["min"], best["median"], best["max"]],
                **extra,
            )
        )
    lm = models["workloads"]["lm"]["bf16"]
    headline = lm["budgets"][budget]
    memory = headline["memory_ratio_equal_batch"]
    claims.append(
        _claim(
            4,
            "LM: memory, static / dynamic gating at equal batch",
            1.36,
            "x",
            memory,
            f"{lm['setting']}; {common}; total peak memory (weights + activations) at static's largest batch "
            f"({headline['largest_batch']['static']}); up to {lm['memory_ratio_max']:.2f}x at larger batches",
            "reproduced" if memory >= 1.36 else ("partly" if memory > 1.0 else "not"),
            evidence,
        )
    )
    sizes = {name: b["largest_batch"] for name, b in lm["budgets"].items()}
    static_b, dynamic_b = headline["largest_batch"]["static"], headline["largest_batch"]["dynamic"]
    growth = dynamic_b / max(static_b, 1)
    bound = "+" if headline.get("dynamic_limited_by_sweep") else ""
    claims.append(
        _claim(
            5,
            "LM: largest batch that fits, static -> dynamic",
            8.0,
            "x (8 -> 64)",
            growth,
            f"{lm['setting']}; {common}; {static_b} -> {dynamic_b}{bound} sequences ('+': the sweep ended first, "
            f"a lower bound); every budget: {json.dumps(sizes)}",
            "reproduced" if growth >= 8.0 else ("partly" if growth > 1.0 else "not"),
            evidence,
            before=static_b,
            after=dynamic_b,
        )
    )
    return claims


def _buffering_claim(whole_model):
    """Claim 6 from bench/buffer_model.py: total memory against static gating at a bounded throughput
    loss, on a whole model."""
    text, paper = "Expert buffering: less total memory than static gating, throughput comparable", 1.47
    if not whole_model:
        return _claim(6, text, paper, "x", setting="not measured: bench/buffer_model.py has not run")
    regimes = whole_model["regimes"]
    loss = whole_model["max_loss"]

    def described(label):
        result = regimes[label]
        best, gpu = result["best_within_loss"], result["gpu_model_best_within_loss"]
        curve = ", ".join(
            f"{r['name']} {r['memory_cut_vs_static']:.2f}x at {r['vs_dynamic'][1]:.2f}x"
            for r in result["rows"]
            if r["slots"]
        )
        return (
            f"{label}: "
            + (
                f"{best['memory_cut_vs_static']:.2f}x ({best['mode']}, {best['vs_dynamic'][1]:.2f}x of dynamic's throughput "
                f"[{best['vs_dynamic'][0]:.2f}-{best['vs_dynamic'][2]:.2f}])"
                if best
                else f"no slot count within {loss:.0%}"
            )
            + (
                f"; GPU model (not measured): {gpu['memory_cut_vs_static']:.2f}x ({gpu['mode']})"
                if gpu
                else "; GPU model: none within the loss"
            )
            + f"; curve (memory cut vs static at throughput vs dynamic): {curve}"
        )

    decode = next(label for label in regimes if label.startswith("decode"))
    # A buffer of every expert is no buffering: the cut counts only pools smaller than E.
    buffered = [r for r in regimes[decode]["rows"] if r["slots"] and r["name"] != "buffer 512"]
    within = [r for r in buffered if r["vs_dynamic"][1] >= 1 - loss]
    ours = max((r["memory_cut_vs_static"] for r in within), default=None)
    smallest = min(buffered, key=lambda r: r["slots"])
    setting = (
        f"{whole_model['setting']}, {whole_model['dtype']}; total peak memory (resident weights + activations) of "
        f"static gating with every expert resident against dynamic gating + expert buffering (experts in a "
        f"safetensors file, N of 512 slots per MoE layer), the largest cut with at most {loss:.0%} throughput loss "
        f"against dynamic gating with every expert resident (1 thread, process CPU time, interleaved); headline: "
        f"decode-sized steps (the paper's sparse MT-decoder regime). "
        + "; ".join(described(label) for label in regimes)
    )
    # Reproduced only if the GPU model of the same run agrees: a CPU's page-cache copy is cheap next to
    # a PCIe transfer.
    gpu = (regimes[decode]["gpu_model_best_within_loss"] or {}).get("memory_cut_vs_static")
    if ours is None:
        verdict = "not"
    else:
        verdict = "reproduced" if ours >= paper and (gpu or 0) >= paper else ("partly" if ours > 1.0 else "not")
    evidence = _evidence("buffer_model.json", "buffer_model.md")
    return _claim(
        6, text, paper, "x", ours, setting, verdict, evidence, gpu_model=gpu, measured=True, smallest_pool=smallest
    )


def _buffer_claims(recorded, whole_model):
    claims = [_buffering_claim(whole_model)]
    if not recorded:
        claims.append(
            _claim(
                7,
                "LIFO eviction beats FIFO and comes close to Belady's MIN",
                1.0,
                "paper / Belady misses",
                setting="not measured: no recorded traces",
            )
        )
        return claims
    prefill = recorded.get("lm_prefill.pt")
    decode = recorded.get("lm_decode.pt")
    size = "16"
    p = prefill["sizes"][size] if prefill else None
    d = decode["sizes"][size] if decode else None
    ours = p["paper_over_belady"] if p else None
    lifo_beats_fifo = p is not None and p["paper_over_fifo"] <= 1.0
    near = ours is not None and ours <= 1.10
    setting = (
        f"routing recorded from a trained MoE LM (E=32, top-2) on held-out text, 16 of 32 slots per layer; "
        f"prefill batches: paper/FIFO {p['paper_over_fifo']:.2f}, paper/Belady {p['paper_over_belady']:.2f}"
        if p
        else ""
    )
    if d:
        setting += (
            f"; decode (4 tokens per batch): paper/FIFO {d['paper_over_fifo']:.2f}, paper/Belady "
            f"{d['paper_over_belady']:.2f}, LRU {d['miss_rate']['lru']:.3f} vs paper {d['miss_rate']['paper']:.3f} miss rate"
        )
    verdict = (
        "reproduced"
        if lifo_beats_fifo and near and (d is None or d["paper_over_belady"] <= 1.10)
        else ("partly" if lifo_beats_fifo or near else "not")
    )
    claims.append(
        _claim(
            7,
            "LIFO eviction beats FIFO and comes close to Belady's MIN",
            1.0,
            "paper / Belady misses",
            ours,
            setting,
            verdict,
            _evidence("buffer_recorded.json", "buffer_recorded.md"),
        )
    )
    return claims


def _placement_claims(placement, timed):
    if not placement:
        return [
            _claim(
                8,
                "Max Load, 8 GPUs: > 0.6 -> < 0.4 with greedy placement",
                0.4,
                "share of tokens",
                setting="not measured",
            ),
            _balancing_claim(timed),
        ]
    lm = placement["traces"]["LM-like, calibrated"]
    before, after = lm["placements"]["contiguous"]["max_load"], lm["placements"]["greedy"]["max_load"]
    anti = lm["placements"]["anti-correlation"]["max_load"]
    recorded = {k: v for k, v in placement["traces"].items() if k.startswith("recorded")}
    rec_text = "; ".join(
        f"{name}: contiguous {v['placements']['contiguous']['max_load']:.3f} -> greedy "
        f"{v['placements']['greedy']['max_load']:.3f}"
        for name, v in recorded.items()
    )
    claims = [
        _claim(
            8,
            "Max Load, 8 GPUs: > 0.6 -> < 0.4 with greedy placement",
            0.4,
            "share of tokens",
            after,
            f"8 ranks, planned on the first half of the trace, measured on the second; LM-like calibrated trace "
            f"(E=512, expert ids by popularity, hottest expert {lm['hottest_expert_share']:.3f} of pairs): "
            f"contiguous {before:.3f} -> greedy {after:.3f}, anti-correlation {anti:.3f}"
            + (f"; recorded traces (E=32): {rec_text}" if rec_text else ""),
            "reproduced" if before > 0.6 and after < 0.4 else "partly",
            _evidence("placement_paper.json", "placement_paper.md"),
            before=before,
            after=after,
        )
    ]
    claims.append(_balancing_claim(timed))
    return claims


def _balancing_claim(timed):
    """Claim 9 from bench/placement.py --paper-timed: the whole model's ranks timed on 8 gloo processes
    (the MoE layer alone beside it)."""
    text, paper, paper_mt = "Throughput from load balancing (+10.1% LM, +19.5% MT encoder)", 1.101, 1.195
    if not timed:
        return _claim(9, text, paper, "x", setting="not measured: bench/placement.py --paper-timed has not run")
    traces = timed["traces"]
    lm, mt = traces["LM-like, calibrated"]["placements"], traces["MT-like, calibrated"]["placements"]

    def row(name, trace):
        parts = []
        for p, entry in trace["placements"].items():
            low, mid, high = entry["whole_model_speedup_per_batch"]
            parts.append(
                f"{p} {entry['whole_model_speedup_total']:.3f}x (per batch {mid:.2f}x [{low:.2f}-{high:.2f}]; "
                f"MoE layer alone {entry['speedup_total']:.2f}x)"
            )
        return f"{name} (rest of the model {trace['rest_share']:.0%} of contiguous's time): " + ", ".join(parts)

    ours, ours_mt = lm["greedy"]["whole_model_speedup_total"], mt["greedy"]["whole_model_speedup_total"]
    c = timed["config"]
    setting = (
        f"timed, not modelled: {timed['ranks']} gloo ranks, plan on the first half of each trace (calibrated: "
        "contiguous Max Load > 0.6), the second half through the whole model's ranks: per MoE layer, each rank runs "
        "the rest of the model around it on its own tokens (bench/paper_models.py's layers: LM with MoE every 2nd "
        "layer and a vocabulary projection, MT encoder with MoE every 4th) and then moe_infer's expert-parallel "
        f"layer (dynamic gating; d_model {c['hidden']}, ffn {c['ffn']}, {c['activation']}, float32), "
        f"{c['repeats']} passes; a step's time is the busiest rank's CPU time, a batch's the sum of its MoE layers' "
        "steps; speedup = contiguous over the placement, total over all batches (per batch: median [min-max]); "
        "greedy and anti-correlation are the paper's rows, replicas beyond it. "
        + "; ".join(row(name, t) for name, t in traces.items())
        + f". MT encoder: greedy {ours_mt:.3f}x (paper +19.5%). Unlike the paper's 8 V100s, the 8 ranks share "
        "this CPU's cores and time is per-rank CPU time: compute and the ranks' own work, not the wire time of "
        "the all-to-alls"
    )
    # Reproduced only if even the slowest batch's gain reaches the paper's, as for claims 1-3.
    lm_slowest, mt_slowest = (t["greedy"]["whole_model_speedup_per_batch"][0] for t in (lm, mt))
    verdict = "reproduced" if lm_slowest >= paper and mt_slowest >= paper_mt else ("partly" if ours > 1.0 else "not")
    evidence = _evidence("placement_timed.json", "placement_timed.md", "placement_paper.json")
    extra = dict(
        spread=lm["greedy"]["whole_model_speedup_per_batch"],  # the spread is per batch; ours is over all
        mt=ours_mt,
        mt_paper=paper_mt,
        moe_layer_alone=lm["greedy"]["speedup_total"],
        mt_moe_layer_alone=mt["greedy"]["speedup_total"],
        rest_share=traces["LM-like, calibrated"]["rest_share"],
    )
    recorded = traces.get("recorded lm_prefill.pt")
    if recorded:
        extra["recorded"] = recorded["placements"]["greedy"]["whole_model_speedup_total"]
    return _claim(9, text, paper, "x", ours, setting, verdict, evidence, **extra)


# Why ours stands where it does against the paper's figure (the README's last column), by claim id.
WHY = {
    1: "static computes E x ceil(0.25 S) expert rows, placeholders included, at full cost on a CPU; the paper's "
    "V100s also spent time in the fixed-size all-to-all, which one process does not have",
    2: "static at fraction 1.0 computes E x S rows for 2 S real pairs: a 64x waste at E=128",
    3: lambda c: (
        "decode steps carry few tokens, so the static waste is smaller, as in the paper; the slowest pairing of "
        + ("rounds is still above" if c["spread"][0] >= c["paper"] else "rounds falls below")
        + " the paper's figure"
    ),
    4: "total memory, weights included, at static's largest batch; the [S, E, C] routing tensors make the gap",
    5: "static's [S, E, C] tensors outgrow the budget early; dynamic's sweep ended before it did (a lower bound)",
    6: lambda c: (
        "the experts are ~99% of this model's weights, as of the paper's 52B LM, so small pools cut total memory "
        "far more than the paper's 1-16 slots of 16 per GPU did"
        if c["ours"] is not None
        else "no pool smaller than all 512 experts stays within 10% of dynamic gating's throughput on this CPU "
        "(an untrained router's routing has little locality) nor in the GPU model; every pool still runs "
        f"{c['smallest_pool']['vs_static'][1]:.1f}x static gating's throughput or more, "
        f"{c['smallest_pool']['memory_cut_vs_static']:.1f}x less memory at {c['smallest_pool']['slots']} slots"
    ),
    7: "on prefill batches the paper's policy is at Belady's misses; in sparse decode steps it is further from "
    "Belady, where recency (LRU) does better",
    8: "the calibrated trace starts where the paper's did (> 0.6) and greedy brings it well under 0.4",
    9: lambda c: (
        f"whole model, 8 gloo ranks' CPU time; MT encoder {c['mt']:.2f}x (paper +19.5%). Greedy leaves Max Load far "
        f"below the paper's 0.4 (claim 8), so the MoE layer gains {c['moe_layer_alone']:.2f}x; the rest of the model "
        f"({c['rest_share']:.0%} of the time) dilutes it. CPU time omits the all-to-alls' wire time"
        + (f". Recorded trace (trained with a balancing loss): {c['recorded']:.2f}x" if "recorded" in c else "")
    ),
}


def _standing(claim) -> str:
    """'beats' / 'matches' (within 5%) / 'falls short of' the paper's figure."""
    ours, paper = claim["ours"], claim["paper"]
    if ours is None:
        return "falls short" if claim.get("measured") else "not measured"
    if claim["id"] == 7:  # misses over Belady's: 1.0 is the floor
        return "matches" if ours <= 1.10 else "falls short"
    better = paper / ours if claim["id"] == 8 else ours / paper  # claim 8: a lower Max Load is better
    return "beats" if better > 1.05 else ("matches" if better >= 0.95 else "falls short")


def main():
    models = _load("paper_models.json")
    recorded = _load("buffer_recorded.json")
    placement = _load("placement_paper.json")
    lm_made = _load("traces/routing_lm.json")
    claims = (
        _throughput_claims(models, _load("paper_models_mt_fairseq.json"))
        + _buffer_claims(recorded, _load("buffer_model.json"))
        + _placement_claims(placement, _load("placement_timed.json"))
    )
    for c in claims:
        c["standing"] = _standing(c)
        why = WHY[c["id"]]
        c["why"] = why(c) if callable(why) else (why if c["ours"] is not None else c["setting"])
    payload = dict(
        claims=claims,
        recorded_traces=[
            f"bench/results/traces/{n}"
            for n in ("lm_prefill.pt", "lm_decode.pt")
            if os.path.exists(os.path.join(RESULTS_DIR, "traces", n))
        ],
        quality=(lm_made or {}).get("quality"),
        commit=commit(),
    )
    write_result("paper_claims.json", json.dumps(payload, indent=1) + "\n")
    fmt = lambda v: "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731

    def ours(c):
        """Our figure, with its spread [min-max] where it has one."""
        band = c.get("spread")
        return fmt(c["ours"]) + (f" [{band[0]:.2f}-{band[2]:.2f}]" if band else "")

    rows = [
        [c["id"], c["claim"], f"{fmt(c['paper'])} {c['unit']}", ours(c), c["verdict"], c["setting"]] for c in claims
    ]
    table = markdown_table(["#", "claim", "paper", "ours", "verdict", "how ours was measured"], rows)
    text = "# The paper's claims beside ours (bench/paper_claims.py)\n\n" + table + "\n"
    if payload["quality"]:
        q_rows = [
            [q["gating"], f"{q['bits_per_byte']:.4f}", f"{q['dropped_pair_fraction']:.2%}"] for q in payload["quality"]
        ]
        text += (
            "\nWhat capacity costs in quality (held-out bits per byte of the trained LM):\n\n"
            + markdown_table(["gating", "bits/byte", "pairs dropped"], q_rows)
            + "\n"
        )
    write_result("paper_claims.md", text)
    print(text)
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        current = f.read()
    if README_BEGIN in current and README_END in current:
        short = [
            [
                c["id"],
                c["claim"],
                f"{fmt(c['paper'])} {c['unit']}",
                ours(c),
                c["verdict"],
                f"{c['standing']}: {c['why']}",
            ]
            for c in claims
        ]
        block = (
            f"{README_BEGIN}\n"
            + markdown_table(["#", "claim", "paper", "ours", "verdict", "against the paper, and why"], short)
            + "\n\nGenerated by `bench/paper_claims.py` from the committed results; how each figure was measured and "
            "how its setting differs from the paper's: [bench/results/paper_claims.md](bench/results/paper_claims.md).\n"
            f"{README_END}"
        )
        head, rest = current.split(README_BEGIN, 1)
        updated = head + block + rest.split(README_END, 1)[1]
        if updated != current:
            with open(readme, "w") as f:
                f.write(updated)
            print("README.md: paper table updated")


if __name__ == "__main__":
    main()
