"""Expert load balancing (the paper's Technique 3) and expert parallelism over torch.distributed.

Part 1, simulation (the paper's protocol): for each synthetic routing trace, plan every placement
on the first half of the batches and measure it on the second half: Max Load (the largest share
of a batch's tokens on one rank), Avg Max Load (its mean over batches and layers) and
balancedness (mean / max tokens per rank), for 4, 8 and 16 ranks. A replicated expert's tokens are
split evenly over its replicas. "online" replans every few batches from a sliding window of the
batches just seen (as vLLM/SGLang do) instead of once from the first half.

Part 2, real processes: the expert-parallel layer on gloo process groups of 2 and 4 ranks on this
machine, routing ids from a skewed trace: time per layer (the busiest rank's CPU time, median over batches),
bytes each rank sends to the others, the busiest rank's rows, pairs dropped, for dynamic vs static
(fairseq's fixed-size all-to-all) and for each placement; and the cost of rebalancing.

Prints tables, writes bench/results/placement_cpu[_quick].md and .png. --dtype (default float32) is
the weights' and activations' type on the real ranks (gloo's all-to-all moves bfloat16 too); with
another dtype only the real ranks run (the simulation has no dtype), into files with its name as a
suffix (placement_cpu_bfloat16.md).

The paper's own protocol (claims 8 and 9), always run first: 8 ranks, calibrated traces and the
recorded ones, Max Load of the paper's placements (bench/results/placement_paper.md); with
--paper-timed, each placement then timed on 8 gloo ranks, the MoE layer alone and the whole
model's ranks (the rest of the model around each MoE layer, as bench/paper_models.py builds it):
bench/results/placement_timed.md.

    python bench/placement.py [--quick] [--skip-real] [--paper-only | --paper-timed] [--dtype bfloat16]
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from common import (
    RESULTS_DIR,
    Progress,
    commit,
    dtype_suffix,
    machine_description,
    markdown_table,
    results_header,
    spread,
    write_result,
)
from moe_infer.placement import LoadRecorder, Placement, load_metrics, plan_placement, rank_loads
from moe_infer.traces import RoutingTrace, synthetic_trace
from paper_models import LM, MT, SCALED, LMLayer

# name: (experts, top_k, layers, tokens per batch, batches, skew, locality, coactivation, description)
TRACES = {
    "LM-like": (512, 2, 12, 2048, 40, 1.8, 0.9999, 0.5, "fairseq MoE LM: 512 experts, 12 MoE layers, top-2"),
    "MT-like": (128, 2, 12, 2048, 40, 1.2, 0.999, 0.5, "NLLB-MoE: 128 experts, 12 MoE layers, top-2"),
    "drifting": (64, 2, 4, 1024, 60, 1.5, 0.9, 0.5, "hot set drifts fast (locality 0.9)"),
    "group-limited": (64, 2, 4, 1024, 40, 1.2, 0.999, 0.98, "a token's experts mostly from one group of 8"),
}
QUICK_TRACES = {
    "LM-like": (512, 2, 3, 1024, 24, 1.8, 0.9999, 0.5, "fairseq MoE LM: 512 experts, top-2 (3 layers)"),
    "drifting": (64, 2, 2, 512, 40, 1.5, 0.9, 0.5, "hot set drifts fast (locality 0.9)"),
    "group-limited": (64, 2, 2, 512, 24, 1.2, 0.999, 0.98, "a token's experts mostly from one group of 8"),
}
CLUSTER_SIZE = {"group-limited": 8}  # default 4
RANKS = [4, 8, 16]
ONLINE_EVERY = 5  # batches between replans in the online rows (window of the same length)


def spare_slots(num_experts, num_ranks):
    """Slots per rank with ~12.5% redundant experts (at least one spare slot per rank)."""
    base = -(-num_experts // num_ranks)
    return base + max(1, -(-base // 8))


def algorithms(num_experts, num_ranks):
    """name -> plan_placement options (slots_per_rank None = ceil(E / R))."""
    replicated = spare_slots(num_experts, num_ranks)
    nodes = 2
    return {
        "contiguous": dict(algorithm="contiguous"),
        "greedy": dict(algorithm="greedy"),
        "anti-correlation": dict(algorithm="anti_correlation"),
        "greedy + replicas": dict(algorithm="greedy", replicate=True, slots_per_rank=replicated),
        "anti-corr + replicas": dict(algorithm="anti_correlation", replicate=True, slots_per_rank=replicated),
        f"hierarchical ({nodes} nodes) + replicas": dict(
            algorithm="greedy", replicate=True, slots_per_rank=replicated, num_nodes=nodes, groups=True
        ),
    }


def plan(recorder, layer, num_ranks, options, clusters):
    options = dict(options)
    if options.pop("groups", False):
        options["expert_group"] = torch.tensor(clusters[layer])
    return recorder.plan(layer, num_ranks, **options)


def one_node_share(placement, ids_batches, num_nodes):
    """Share of tokens whose top-k experts all have a replica on one common node (what a transport
    that sends a token once per node, then fans out inside it, would keep off the network)."""
    ranks_per_node = placement.num_ranks // num_nodes
    node_mask = torch.zeros(placement.num_experts, dtype=torch.long)
    for rank in range(placement.num_ranks):
        for expert in placement.rank_experts(rank):
            if expert >= 0:
                node_mask[expert] |= 1 << (rank // ranks_per_node)
    ids = torch.cat(ids_batches).long()
    common = node_mask[ids[:, 0]]
    for j in range(1, ids.shape[1]):
        common = common & node_mask[ids[:, j]]
    return (common != 0).double().mean().item()


def simulate(traces, progress):
    rows, summary = [], {}
    for trace_name, (experts, top_k, layers, tokens, batches, skew, locality, coact, _) in traces.items():
        cluster_size = CLUSTER_SIZE.get(trace_name, 4)
        trace = synthetic_trace(experts, top_k, batches, tokens, layers, skew, locality, coact, cluster_size, seed=0)
        half = batches // 2
        recorder = LoadRecorder.from_trace(trace, range(half))
        counts = [trace.expert_counts(layer).double() for layer in range(layers)]
        clusters = trace.meta["clusters"]
        for num_ranks in RANKS:
            for name, options in algorithms(experts, num_ranks).items():
                placements = [plan(recorder, layer, num_ranks, options, clusters) for layer in range(layers)]
                loads = torch.cat([rank_loads(p, counts[layer][half:]) for layer, p in enumerate(placements)])
                metrics = load_metrics(loads)
                slots = placements[0].slots_per_rank
                one_node = statistics.mean(
                    one_node_share(p, trace.layers[layer][half:], 2) for layer, p in enumerate(placements)
                )
                rows.append(
                    [
                        trace_name,
                        num_ranks,
                        name,
                        slots,
                        f"{metrics.max_load:.3f}",
                        f"{metrics.avg_max_load:.3f}",
                        f"{metrics.balancedness:.3f}",
                        f"{one_node:.2f}",
                    ]
                )
                summary[(trace_name, num_ranks, name)] = metrics
            # Online: replan every ONLINE_EVERY batches from the last ONLINE_EVERY batches.
            options = algorithms(experts, num_ranks)["greedy + replicas"]
            loads = []
            for layer in range(layers):
                for start in range(half, batches, ONLINE_EVERY):
                    window = LoadRecorder.from_trace(trace, range(start - ONLINE_EVERY, start))
                    placement = plan(window, layer, num_ranks, options, clusters)
                    loads.append(rank_loads(placement, counts[layer][start : start + ONLINE_EVERY]))
            metrics = load_metrics(torch.cat(loads))
            name = f"greedy + replicas, online (every {ONLINE_EVERY})"
            rows.append(
                [
                    trace_name,
                    num_ranks,
                    name,
                    options["slots_per_rank"],
                    f"{metrics.max_load:.3f}",
                    f"{metrics.avg_max_load:.3f}",
                    f"{metrics.balancedness:.3f}",
                    "",
                ]
            )
            summary[(trace_name, num_ranks, name)] = metrics
            progress.step(f"{trace_name} R={num_ranks}")
    return rows, summary


# ---- the paper's protocol, like for like -------------------------------------------------------

# The paper measured Max Load > 0.6 with experts placed in id order and < 0.4 after greedy
# placement (LM, 8 GPUs). Calibrated traces reproduce that starting point: expert ids ordered by
# popularity, so the contiguous placement puts the hottest E/8 experts on rank 0, with no single
# expert above 0.4 of all pairs (else no placement without replicas could go below 0.4).
# name: (experts, layers, tokens per batch, batches, skew, locality, coactivation)
PAPER_TRACES = {
    "LM-like, calibrated": (512, 4, 2048, 40, 0.9, 0.9999, 0.5),
    "MT-like, calibrated": (128, 4, 2048, 40, 1.0, 0.999, 0.5),
}
PAPER_RANKS = 8
PAPER_ALGORITHMS = ["contiguous", "greedy", "anti-correlation", "greedy + replicas"]
RECORDED_TRACES = ["lm_prefill.pt", "lm_decode.pt"]


def popularity_ordered(trace):
    """The same trace with expert ids renumbered by total load, hottest first (per layer)."""
    layers = []
    for layer in range(trace.num_layers):
        order = torch.argsort(trace.expert_counts(layer).sum(0), descending=True, stable=True)
        new_id = torch.empty_like(order)
        new_id[order] = torch.arange(trace.num_experts)
        new_id = torch.cat([new_id, torch.tensor([-1])])  # index -1 -> -1
        layers.append([new_id[ids.long()].to(torch.int32) for ids in trace.layers[layer]])
    return RoutingTrace(trace.num_experts, trace.top_k, layers, dict(trace.meta))


def paper_traces(recorded_dir):
    traces = {}
    for name, (experts, layers, tokens, batches, skew, locality, coact) in PAPER_TRACES.items():
        trace = synthetic_trace(experts, 2, batches, tokens, layers, skew, locality, coact, seed=0)
        traces[name] = (popularity_ordered(trace), f"Zipf skew {skew}, locality {locality}, ids by popularity")
    for file in RECORDED_TRACES:
        path = os.path.join(recorded_dir, file)
        if os.path.exists(path):
            trace = RoutingTrace.load(path)
            traces[f"recorded {file}"] = (trace, trace.meta.get("batches", "recorded"))
    return traces


def paper_protocol(recorded_dir):
    """Max Load / Avg Max Load of each placement on 8 ranks, planned on the first half of each trace
    and measured on the second; the modelled MoE-layer speedup is the ratio of busiest-rank loads."""
    rows, results = [], {}
    for trace_name, (trace, how) in paper_traces(recorded_dir).items():
        half = trace.num_batches // 2
        recorder = LoadRecorder.from_trace(trace, range(half))
        counts = [trace.expert_counts(layer).double() for layer in range(trace.num_layers)]
        total = torch.stack([c.sum(0) for c in counts])
        hottest = (total.max(-1).values / total.sum(-1)).max().item()
        options = algorithms(trace.num_experts, PAPER_RANKS)
        by_name = {}
        for name in PAPER_ALGORITHMS:
            placements = [plan(recorder, layer, PAPER_RANKS, options[name], None) for layer in range(trace.num_layers)]
            loads = torch.cat([rank_loads(p, counts[layer][half:]) for layer, p in enumerate(placements)])
            by_name[name] = load_metrics(loads)
        base = by_name["contiguous"].avg_max_load
        for name, metrics in by_name.items():
            rows.append(
                [
                    trace_name,
                    name,
                    f"{metrics.max_load:.3f}",
                    f"{metrics.avg_max_load:.3f}",
                    f"{base / metrics.avg_max_load:.2f}x",
                    f"{hottest:.3f}",
                ]
            )
        results[trace_name] = dict(
            how=how,
            num_experts=trace.num_experts,
            hottest_expert_share=hottest,
            placements={
                name: dict(max_load=m.max_load, avg_max_load=m.avg_max_load, balancedness=m.balancedness)
                for name, m in by_name.items()
            },
        )
    table = markdown_table(
        ["trace", "placement", "Max Load", "Avg Max Load", "busiest-rank speedup (model)", "hottest expert share"],
        rows,
    )
    return table, results


# The paper's protocol on real ranks: each placement runs the second half of a trace through the
# expert-parallel layer on 8 gloo processes. The fairseq LM's expert shape (d_model : ffn = 1 : 4,
# gelu), scaled as bench/paper_models.py scales it; in --dtype.
TIMED = dict(hidden=SCALED["d_model"], ffn=SCALED["ffn"], activation="gelu", repeats=3)
QUICK_TIMED = dict(hidden=64, ffn=256, activation="gelu", repeats=1, batches=2)
TIMED_TRACES = ["LM-like, calibrated", "MT-like, calibrated", "recorded lm_prefill.pt"]
# The rest of the model around each MoE layer of a trace, as bench/paper_models.py builds the paper's
# models: period = layers per MoE layer (fairseq's MoE LM: every 2nd; NLLB-MoE: every 4th), tokens per
# sequence, causal attention or not, and the vocabulary projection after the last layer (the LM's; the
# MT encoder has none).
WHOLE_MODEL = {
    "LM-like, calibrated": dict(period=LM["moe_freq"], seq_len=LM["seq_len"], causal=True, vocab=LM["vocab"]),
    "MT-like, calibrated": dict(period=MT["sparse_step"], seq_len=MT["src_len"], causal=False, vocab=None),
    # bench/routing_lm.py's byte-level LM: MoE in layers 1 and 3, 128-byte sequences.
    "recorded lm_prefill.pt": dict(period=2, seq_len=128, causal=True, vocab=256),
}


class NonExpertBlocks(nn.Module):
    """What a rank computes for one MoE layer of a whole model besides the experts, on its own tokens
    (data parallel, as on the paper's GPUs): the ``period - 1`` dense layers before it (pre-norm
    attention + FFN, paper_models.LMLayer), the MoE layer's own attention, its router (fairseq's wg,
    softmax top-k) and, around the first / last MoE layer, the embedding / final norm and vocabulary
    projection. ``before_experts`` returns what the experts take; ``after_experts`` adds their output
    back to the residual (and projects to the vocabulary after the last layer)."""

    def __init__(self, spec: dict, num_experts: int, top_k: int, first: bool, last: bool, dtype: torch.dtype):
        super().__init__()
        layer_spec = dict(SCALED, d_model=spec["hidden"], ffn=spec["ffn"], causal=spec["causal"])
        self.seq_len, self.top_k = spec["seq_len"], top_k
        hidden, vocab = spec["hidden"], spec["vocab"]
        self.embed = nn.Embedding(vocab or 1024, hidden, dtype=dtype) if first else None
        self.dense = nn.ModuleList(LMLayer(layer_spec, False, dtype) for _ in range(spec["period"] - 1))
        self.moe_layer = LMLayer(layer_spec, False, dtype)  # its attention and ffn_norm only
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        self.head = nn.Linear(hidden, vocab, bias=False, dtype=dtype) if last and vocab else None
        self.norm = nn.LayerNorm(hidden, dtype=dtype) if self.head is not None else None

    def before_experts(self, x: torch.Tensor) -> tuple:
        """x [T, d] (or [T] token ids at the first MoE layer) -> (residual [T, d], expert input
        [T, d], router weights [T, k])."""
        x = self.embed(x) if self.embed is not None else x
        tokens = x.shape[0]
        seq_len = self.seq_len if tokens % self.seq_len == 0 else tokens
        h = x.view(tokens // seq_len, seq_len, -1)
        for layer in self.dense:
            h = layer(h)
        h = self.moe_layer.attend(h).reshape(tokens, -1)
        normed = self.moe_layer.ffn_norm(h)
        weights, _ = torch.softmax(self.router(normed), dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        return h, normed, weights

    def after_experts(self, residual: torch.Tensor, expert_output: torch.Tensor) -> torch.Tensor:
        out = residual + expert_output
        return self.head(self.norm(out)) if self.head is not None else out


def _timed_worker(rank, world_size, store, trace, placements, config, model, dtype, results):
    """Every step (batch x layer) runs through each placement's layer in turn, a barrier before each:
    the rest of the model around that MoE layer (NonExpertBlocks of ``model``), then the expert-parallel
    layer. A call's CPU time is this rank's main thread's (gloo moves the rows on its own threads),
    kept for the expert-parallel layer and for the rest of the model."""
    import torch.distributed as dist

    from moe_infer import MoEExperts
    from moe_infer.distributed import expert_parallel

    _init_gloo(rank, world_size, store)
    try:
        c = config
        torch.manual_seed(0)
        experts = MoEExperts(trace.num_experts, c["hidden"], c["ffn"], activation=c["activation"])
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
        experts = experts.to(dtype)
        names = list(placements)
        layers = {
            name: [expert_parallel(experts, placement, validate=False) for placement in per_layer]
            for name, per_layer in placements.items()
        }
        del experts
        spec = dict(model, hidden=c["hidden"], ffn=c["ffn"])
        last = trace.num_layers - 1
        rest = [
            NonExpertBlocks(spec, trace.num_experts, trace.top_k, i == 0, i == last, dtype) for i in range(last + 1)
        ]
        half = trace.num_batches // 2
        batches = range(half, trace.num_batches if "batches" not in c else half + c["batches"])
        gen = torch.Generator().manual_seed(100 + rank)
        cpu, rest_cpu, wall, rows = ({name: [] for name in names} for _ in range(4))
        with torch.no_grad():
            for repeat in range(-1, c["repeats"]):  # repeat -1: one warm-up step
                for b in batches if repeat >= 0 else batches[:1]:
                    for layer in range(trace.num_layers):
                        ids_all = trace.layers[layer][b]
                        tokens = ids_all.shape[0] // world_size
                        ids = ids_all[rank * tokens : (rank + 1) * tokens]
                        if layer == 0:  # token ids into the embedding
                            x = torch.randint(0, rest[0].embed.num_embeddings, (tokens,), generator=gen)
                        else:
                            x = torch.randn(tokens, c["hidden"], generator=gen, dtype=dtype)
                        shift = (b + layer + repeat) % len(names)  # interleaved, each first in turn
                        for name in names[shift:] + names[:shift]:
                            dist.barrier()
                            start_step, start_wall = time.thread_time(), time.perf_counter()
                            residual, normed, weights = rest[layer].before_experts(x)
                            start_experts = time.thread_time()
                            expert_output = layers[name][layer](normed, weights, ids)
                            experts_cpu = time.thread_time() - start_experts
                            rest[layer].after_experts(residual, expert_output)
                            if repeat >= 0:
                                cpu[name].append(experts_cpu)
                                rest_cpu[name].append(time.thread_time() - start_step - experts_cpu)
                                wall[name].append(time.perf_counter() - start_wall)
                                rows[name].append(layers[name][layer].last_stats.rows_received)
        results.put((rank, cpu, wall, rows, rest_cpu))
    finally:
        dist.destroy_process_group()


def _busiest(by_rank, field):
    """Per placement and step, the largest of the ranks' values of one field (a step waits for its
    slowest rank)."""
    steps = len(by_rank[0][field]["contiguous"])
    return {name: [max(by_rank[r][field][name][i] for r in by_rank) for i in range(steps)] for name in PAPER_ALGORITHMS}


def paper_timed(recorded_dir, modelled, quick, dtype):
    """Claim 9 on real ranks: per trace, the paper's placements (and replication, beyond the paper)
    planned on the first half, the second half timed through the expert-parallel layer on 8 gloo
    ranks. A step's time is its busiest rank's CPU time; the speedup of a placement is contiguous's
    step time over its own, per step (min / median / max) and over the whole half (total / total)."""
    config = QUICK_TIMED if quick else TIMED
    traces = paper_traces(recorded_dir)
    rows, results = [], {}
    for trace_name in TIMED_TRACES:
        if trace_name not in traces:
            continue
        trace, _ = traces[trace_name]
        recorder = LoadRecorder.from_trace(trace, range(trace.num_batches // 2))
        options = algorithms(trace.num_experts, PAPER_RANKS)
        placements = {
            name: [plan(recorder, layer, PAPER_RANKS, options[name], None) for layer in range(trace.num_layers)]
            for name in PAPER_ALGORITHMS
        }
        model = WHOLE_MODEL[trace_name]
        by_rank = run_ranks(PAPER_RANKS, _timed_worker, trace, placements, config, model, dtype)
        steps = len(by_rank[0][0]["contiguous"])
        step_cpu, step_wall, step_rest = (_busiest(by_rank, field) for field in (0, 1, 3))
        # The all-to-alls make the expert-parallel layer a synchronisation point: a whole-model step takes
        # the busiest rank's rest of the model plus the busiest rank's MoE layer; a batch, its MoE layers'
        # steps in a row.
        per_batch = {
            name: [
                sum(step_rest[name][i : i + trace.num_layers]) + sum(step_cpu[name][i : i + trace.num_layers])
                for i in range(0, steps, trace.num_layers)
            ]
            for name in PAPER_ALGORITHMS
        }
        busiest_rows = {
            name: statistics.mean(max(by_rank[r][2][name][i] for r in by_rank) for i in range(steps))
            for name in PAPER_ALGORITHMS
        }
        base, base_batch = step_cpu["contiguous"], per_batch["contiguous"]
        # The rest of the model's share of contiguous's whole-model time (on each step's busiest rank).
        rest_share = sum(step_rest["contiguous"]) / sum(base_batch)
        results[trace_name] = dict(
            num_experts=trace.num_experts, steps=steps, whole_model=model, rest_share=rest_share, placements={}
        )
        for name in PAPER_ALGORITHMS:
            ratios = [b / t for b, t in zip(base, step_cpu[name])]
            entry = dict(
                step_cpu_ms=spread([t * 1e3 for t in step_cpu[name]]),
                step_wall_ms=spread([t * 1e3 for t in step_wall[name]]),
                speedup_per_step=spread(ratios),
                speedup_total=sum(base) / sum(step_cpu[name]),
                whole_model_batch_ms=spread([t * 1e3 for t in per_batch[name]]),
                whole_model_speedup_per_batch=spread([b / t for b, t in zip(base_batch, per_batch[name])]),
                whole_model_speedup_total=sum(base_batch) / sum(per_batch[name]),
                busiest_rank_rows=busiest_rows[name],
                modelled_speedup=modelled[trace_name]["placements"]["contiguous"]["avg_max_load"]
                / modelled[trace_name]["placements"][name]["avg_max_load"],
            )
            results[trace_name]["placements"][name] = entry
            low, mid, high = entry["speedup_per_step"]
            whole_low, whole_mid, whole_high = entry["whole_model_speedup_per_batch"]
            rows.append(
                [
                    trace_name,
                    name + (" (beyond the paper)" if "replicas" in name else ""),
                    f"{entry['step_cpu_ms'][1]:.2f}",
                    f"{entry['busiest_rank_rows']:.0f}",
                    f"{mid:.2f}x [{low:.2f}-{high:.2f}]",
                    f"{entry['speedup_total']:.2f}x",
                    f"{entry['modelled_speedup']:.2f}x",
                    f"{entry['whole_model_batch_ms'][1]:.1f}",
                    f"{100 * rest_share:.0f}%",
                    f"{whole_mid:.2f}x [{whole_low:.2f}-{whole_high:.2f}]",
                    f"**{entry['whole_model_speedup_total']:.3f}x**",
                    f"{entry['step_wall_ms'][1]:.1f}",
                ]
            )
    table = markdown_table(
        [
            "trace",
            "placement",
            "MoE layer: step CPU ms (busiest rank, median)",
            "busiest rank rows",
            "MoE layer: speedup per step, median [min-max]",
            "MoE layer: speedup, total",
            "modelled (busiest-rank load)",
            "whole model: batch CPU ms (median)",
            "rest of the model's share (contiguous)",
            "whole model: speedup per batch, median [min-max]",
            "whole model: speedup, total",
            "MoE layer: step wall ms (median)",
        ],
        rows,
    )
    return table, dict(config=config, ranks=PAPER_RANKS, traces=results)


# ---- part 2: real gloo processes ----------------------------------------------------------------

REAL = dict(experts=16, hidden=256, ffn=512, top_k=2, tokens=512, batches=16, skew=1.8, locality=0.9999)
QUICK_REAL = dict(experts=16, hidden=128, ffn=256, top_k=2, tokens=256, batches=8, skew=1.8, locality=0.9999)


def real_configs(world_size, load):
    experts = load.numel()
    greedy = plan_placement(load, world_size)
    replicated = plan_placement(load, world_size, spare_slots(experts, world_size), replicate=True)
    return {
        ("contiguous", "dynamic"): (Placement.contiguous(experts, world_size), dict(mode="dynamic")),
        ("greedy", "dynamic"): (greedy, dict(mode="dynamic")),
        ("greedy + replicas", "dynamic"): (replicated, dict(mode="dynamic")),
        ("contiguous", "static cf=1"): (Placement.contiguous(experts, world_size), dict(mode="static")),
        ("contiguous", "static no-drop"): (
            Placement.contiguous(experts, world_size),
            dict(mode="static", capacity_fraction=1.0),
        ),
        ("greedy + replicas", "static cf=1"): (replicated, dict(mode="static")),
    }


def _real_worker(rank, world_size, store, config, dtype, results):
    import torch.distributed as dist

    import moe_infer
    from moe_infer.distributed import expert_parallel

    _init_gloo(rank, world_size, store)
    try:
        c = config
        trace = synthetic_trace(
            c["experts"], c["top_k"], 2 * c["batches"], world_size * c["tokens"], 1, c["skew"], c["locality"], seed=1
        )
        load = LoadRecorder.from_trace(trace, range(c["batches"])).load(0)
        torch.manual_seed(0)
        layer = moe_infer.MoELayer(c["hidden"], c["ffn"], c["experts"], c["top_k"]).to(dtype).eval()
        configs = real_configs(world_size, load)
        layers = {key: expert_parallel(layer.experts, p, **opts) for key, (p, opts) in configs.items()}
        gen = torch.Generator().manual_seed(100 + rank)
        samples = {key: [] for key in configs}
        stats = {key: [] for key in configs}
        with torch.no_grad():
            for b in range(c["batches"] - 1, 2 * c["batches"]):  # the first one warms up
                ids = trace.layers[0][b][rank * c["tokens"] : (rank + 1) * c["tokens"]]
                x = torch.randn(c["tokens"], c["hidden"], generator=gen, dtype=dtype)
                weights = torch.rand(c["tokens"], c["top_k"], generator=gen)
                for key, ep in layers.items():
                    dist.barrier()
                    start = time.thread_time()  # this rank's CPU time: 2-4 processes share the cores
                    ep(x, weights, ids)
                    elapsed = time.thread_time() - start
                    if b >= c["batches"]:
                        samples[key].append(elapsed)
                        s = ep.last_stats
                        stats[key].append((s.bytes_sent, s.rows_received, s.dropped_pairs, s.rows_sent))
            # Rebalancing cost: contiguous -> greedy + replicas on a running layer.
            moving = expert_parallel(layer.experts, Placement.contiguous(c["experts"], world_size))
            dist.barrier()
            start = time.perf_counter()
            report = moving.rebalance(configs[("greedy + replicas", "dynamic")][0])
            rebalance_s = time.perf_counter() - start
        results.put((rank, samples, stats, (report.experts_moved, report.bytes_moved, rebalance_s)))
    finally:
        dist.destroy_process_group()


def _init_gloo(rank, world_size, store):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600)
    )


def run_ranks(world_size, worker, *args):
    """Runs worker(rank, world_size, store, *args, results) in world_size spawned processes; returns
    what each put on ``results``, by rank (its first element)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = tempfile.mktemp(prefix="moe_infer_bench_store_")
    procs = [ctx.Process(target=worker, args=(r, world_size, store, *args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=1800) for _ in range(world_size)]
    for proc in procs:
        proc.join()
    if os.path.exists(store):
        os.remove(store)
    return {outcome[0]: outcome[1:] for outcome in outcomes}


def run_real(world_size, config, dtype):
    by_rank = run_ranks(world_size, _real_worker, config, dtype)
    rows, times = [], {}
    keys = list(by_rank[0][0])
    baseline = None
    for key in keys:
        # The layer is as slow as its slowest rank: max over ranks, per batch.
        per_batch = [max(by_rank[r][0][key][i] for r in range(world_size)) for i in range(len(by_rank[0][0][key]))]
        median = statistics.median(per_batch)
        baseline = baseline or per_batch
        low, mid, high = spread([b / t for b, t in zip(baseline, per_batch)])  # per batch, against the first row
        bytes_sent = statistics.mean(s[0] for r in range(world_size) for s in by_rank[r][1][key])
        busiest = statistics.mean(
            max(by_rank[r][1][key][i][1] for r in range(world_size)) for i in range(len(per_batch))
        )
        dropped = sum(s[2] for r in range(world_size) for s in by_rank[r][1][key])
        routed = len(per_batch) * world_size * config["tokens"] * config["top_k"]
        times[key] = median
        rows.append(
            [
                world_size,
                key[0],
                key[1],
                f"{median * 1e3:.1f}",
                f"{mid:.2f}x [{low:.2f}-{high:.2f}]",
                f"{bytes_sent / 1e6:.2f}",
                f"{busiest:.0f}",
                f"{100 * dropped / routed:.1f}%",
            ]
        )
    moved, moved_bytes, rebalance_s = by_rank[0][2]
    rebalance = [world_size, moved, f"{moved_bytes / 1e6:.2f}", f"{max(by_rank[r][2][2] for r in by_rank) * 1e3:.1f}"]
    return rows, rebalance, times


# ---- report -------------------------------------------------------------------------------------


def plot(summary, traces, real_times, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(algorithms(64, 8)) + [f"greedy + replicas, online (every {ONLINE_EVERY})"]
    panels = len(traces) + (1 if real_times else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    for ax, trace_name in zip(axes[0], traces):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [summary[(trace_name, r, name)].avg_max_load for r in RANKS]
            peaks = [summary[(trace_name, r, name)].max_load for r in RANKS]
            xs = [j + i * width for j in range(len(RANKS))]
            ax.bar(xs, values, width, label=name)
            ax.scatter(xs, peaks, marker="_", color="black", s=40, zorder=3)
        ax.plot([-0.2, len(RANKS)], [0.4, 0.4], "k:", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(RANKS))], [f"{r} ranks" for r in RANKS])
        ax.set_ylabel("Avg Max Load (bars), Max Load (ticks)")
        ax.set_title(f"{trace_name} trace")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8)
    if real_times:
        ax = axes[0][-1]
        for world_size, times in real_times.items():
            labels = [f"{k[0]}\n{k[1]}" for k in times]
            ax.barh([f"{world_size} ranks: {label}" for label in labels], [t * 1e3 for t in times.values()])
        ax.set_xlabel("CPU ms per layer (busiest rank, median)")
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title("gloo, this machine")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller traces and layers (a couple of minutes)")
    parser.add_argument("--skip-real", action="store_true", help="simulation only (no gloo processes)")
    parser.add_argument("--paper-only", action="store_true", help="only the paper's protocol on 8 ranks (seconds)")
    parser.add_argument(
        "--paper-timed", action="store_true", help="the paper's protocol, then timed on 8 gloo ranks (minutes)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights and activations on the real ranks (default float32)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32 and args.skip_real:
        parser.error("--skip-real runs the simulation only, which has no dtype: leave out --dtype")
    torch.set_num_threads(1)
    paper_table, paper_results = paper_protocol(os.path.join(RESULTS_DIR, "traces"))
    paper_text = (
        "# Load balancing on the paper's protocol (bench/placement.py)\n\n"
        f"Machine: {machine_description(torch.device('cpu'))}. Measured at commit {commit()}.\n\n"
        f"{PAPER_RANKS} ranks; each placement planned on the first half of a trace's batches and measured on the "
        "second (the paper's protocol). Calibrated traces: expert ids ordered by popularity, so that placing "
        "experts in id order (contiguous) gives the paper's starting point (Max Load > 0.6) while no single expert "
        "carries 0.4 of all pairs; recorded traces: bench/routing_lm.py's trained model on held-out text (E=32, "
        "4 experts per rank). 'busiest-rank speedup (model)': contiguous's Avg Max Load over the row's, the "
        "speedup of a MoE layer whose time is its busiest rank's expert compute (an upper bound on the "
        "whole-model gain, which the paper measured: +10.1% LM, +19.5% MT encoder).\n\n"
        + "\n".join(f"- **{name}**: E={r['num_experts']}, {r['how']}" for name, r in paper_results.items())
        + f"\n\n{paper_table}\n"
    )
    print(paper_text)
    write_result("placement_paper.md", paper_text)
    write_result(
        "placement_paper.json",
        json.dumps(dict(commit=commit(), ranks=PAPER_RANKS, traces=paper_results), indent=1) + "\n",
    )
    if args.paper_timed:
        timed_table, timed_results = paper_timed(os.path.join(RESULTS_DIR, "traces"), paper_results, args.quick, dtype)
        c = timed_results["config"]
        timed_text = results_header(
            "Load balancing timed on real ranks, the paper's protocol (bench/placement.py --paper-timed)",
            machine_description(torch.device("cpu")),
            commit(),
            args.quick,
        ) + (
            f"{PAPER_RANKS} gloo processes on this machine, one torch thread each, all pinned to core(s) "
            f"{sorted(os.sched_getaffinity(0))} of {os.cpu_count()} (a shared machine). Per trace, each placement is "
            "planned on the first half of the batches and the second half runs through moe_infer's expert-parallel "
            f"layer (ExpertParallelExperts, dynamic gating: counts all-to-all, then the variable-size all-to-alls): "
            f"E experts of d_model {c['hidden']}, ffn {c['ffn']}, {c['activation']}, {args.dtype}; each batch's tokens "
            f"split evenly over the ranks; every layer of the trace is a step; {c['repeats']} passes over the half, "
            "the placements interleaved step by step (a barrier before each call). A step's time is the busiest "
            "rank's CPU time of the call (its main thread: routing, permutes, expert GEMMs and combine; gloo moves "
            "the rows on its own threads), so the 8 processes sharing the cores do not distort it. 'speedup': "
            "contiguous's step time over the placement's, per step (median [min-max]) and over all steps "
            "(total / total, the throughput gain of the MoE layer). 'modelled': the ratio of Avg Max Load from "
            "placement_paper.md. Wall time per step (communication and waiting on the other ranks included, "
            "8 processes on the machine's cores) is beside it, not used.\n\n"
            "Whole model (claim 9 on the paper's terms: +10.1% LM, +19.5% MT encoder, whole-model throughput): "
            "before each MoE layer call, every rank runs the rest of the model around that MoE layer on its own "
            "tokens (data parallel, as on the paper's GPUs), built as bench/paper_models.py builds the paper's "
            "models at the same width: the layers between MoE layers (pre-norm attention + dense FFN; LM: MoE every "
            "2nd layer, causal, 64-token sequences; MT encoder: every 4th, bidirectional, 32-token sequences), "
            "the MoE layer's own attention and router (softmax top-2; the trace gives the expert ids, the router "
            "the combine weights) and, around the first / last MoE layer, the embedding / final norm and vocabulary "
            "projection (the LM's; the encoder has none). The MoE layer's all-to-alls make it a synchronisation point, so a "
            "step's whole-model time is the busiest rank's CPU time of the rest of the model plus the busiest "
            "rank's CPU time of the expert-parallel layer; a batch's is the sum of its MoE layers' steps; 'whole model: speedup' is contiguous's over the placement's, per batch "
            "(median [min-max]) and total / total. 'rest of the model's share': the part of contiguous's "
            "whole-model time outside the expert-parallel layer. How this differs from the paper's 8 V100s: here "
            "8 processes share this machine's cores and time is per-rank CPU time, so it counts compute and the "
            "ranks' own work around gloo but not the wire time of the all-to-alls (gloo's threads), which a "
            f"placement changes too; the model is scaled down (d_model {c['hidden']}) keeping the paper's MoE "
            "frequency, top-2, "
            "E and ffn = 4 x d_model, so per token the dense layers and attention projections weigh against the "
            "experts as in the paper's models, while the router (E x d_model) weighs more and attention over short "
            "sequences less; and a CPU runs attention and the small GEMMs at other relative speeds than a V100.\n\n"
            + timed_table
            + "\n"
        )
        print(timed_text)
        stem = f"placement_timed{'_quick' if args.quick else ''}{dtype_suffix(dtype)}"
        write_result(f"{stem}.md", timed_text)
        write_result(
            f"{stem}.json",
            json.dumps(dict(commit=commit(), quick=args.quick, dtype=args.dtype, **timed_results), indent=1) + "\n",
        )
    if args.paper_only or args.paper_timed:
        return
    # The simulation has no dtype: in another dtype only the real ranks run.
    traces = {} if dtype != torch.float32 else QUICK_TRACES if args.quick else TRACES
    real_config = QUICK_REAL if args.quick else REAL
    worlds = [] if args.skip_real else [2, 4]
    progress = Progress(len(traces) * len(RANKS) + len(worlds), "bench/placement")
    sim_rows, summary = simulate(traces, progress)
    real_rows, rebalance_rows, real_times = [], [], {}
    for world_size in worlds:
        rows, rebalance, times = run_real(world_size, real_config, dtype)
        real_rows += rows
        rebalance_rows.append(rebalance)
        real_times[world_size] = times
        progress.step(f"gloo x{world_size}")

    trace_lines = "\n".join(
        f"- **{name}**: {d[8]}; E={d[0]}, top-{d[1]}, {d[2]} layers, {d[3]} tokens/batch, {d[4]} batches, "
        f"Zipf skew {d[5]}, locality {d[6]}, co-activation {d[7]} (clusters of {CLUSTER_SIZE.get(name, 4)})"
        for name, d in traces.items()
    )
    sim_table = markdown_table(
        ["trace", "ranks", "placement", "slots/rank", "Max Load", "Avg Max Load", "balancedness", "one-node tokens"],
        sim_rows,
    )
    text = (
        f"# Expert placement and expert parallelism ({'quick' if args.quick else 'full'}, {args.dtype})\n\n"
        f"Machine: {machine_description(torch.device('cpu'))}. Measured at commit {commit()}.\n\n"
    )
    if traces:
        text += (
            "## Load balance (simulation, the paper's protocol)\n\n"
            "Each placement is planned on the first half of the batches of a synthetic routing trace "
            "(moe_infer.traces.synthetic_trace) and measured on the second half, layer by layer. "
            "Max Load: the largest share of one batch's tokens on one rank; Avg Max Load: its mean over "
            "batches and layers (1/ranks is perfect); balancedness: mean / max tokens per rank, averaged. "
            "'+ replicas' uses ~12.5% extra expert slots (slots/rank). Hierarchical: ranks in 2 nodes, "
            "co-activation clusters kept on one node. 'one-node tokens': share of tokens whose experts "
            "all have a replica on one common node (traffic a per-node deduplicating transport would keep "
            f"inside a node; 2 nodes). 'online' replans every {ONLINE_EVERY} batches from the last "
            f"{ONLINE_EVERY}.\n\n{trace_lines}\n\n{sim_table}\n"
        )
    if real_rows:
        cfg = real_config
        real_table = markdown_table(
            [
                "ranks",
                "placement",
                "all-to-all",
                "ms/layer",
                "vs first row",
                "MB sent/rank",
                "busiest rank rows",
                "dropped",
            ],
            real_rows,
        )
        rebalance_table = markdown_table(["ranks", "experts moved", "MB moved", "wall ms"], rebalance_rows)
        text += (
            "\n## Expert-parallel layer on gloo processes (this machine)\n\n"
            f"ExpertParallelExperts, E={cfg['experts']}, H={cfg['hidden']}, ffn={cfg['ffn']} (SiLU-GLU), "
            f"top-{cfg['top_k']}, {cfg['tokens']} tokens per rank per batch, {args.dtype}, one thread per rank, the "
            f"ranks pinned to core(s) {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}; "
            f"routing ids from a trace (skew {cfg['skew']}, locality {cfg['locality']}), placement planned "
            f"on its first {cfg['batches']} batches, measured on the next {cfg['batches']} (interleaved, "
            "a barrier before each call). ms/layer: the busiest rank's CPU time of the call (its main thread; gloo "
            "moves the rows on its own threads), median over batches; 'vs first row': the first row's time over "
            "the row's, per batch, median [min-max]. MB sent/rank: "
            "rows sent to other ranks by the dispatch and return all-to-alls. busiest rank rows: rows "
            "the busiest rank computes (static: its slots x capacity, placeholders included). static "
            "cf=1: fairseq's capacity (k * ceil(S/E) per expert and source rank); static no-drop: a "
            f"capacity of S.\n\n{real_table}\n\nRebalancing a running layer (contiguous -> greedy + "
            f"replicas, point-to-point):\n\n{rebalance_table}\n"
        )
    suffix = ("_quick" if args.quick else "") + dtype_suffix(dtype)
    png = os.path.join(RESULTS_DIR, f"placement_cpu{suffix}.png")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    plot(summary, traces, real_times, png)
    text += f"\n![placement](placement_cpu{suffix}.png)\n"
    print(text)
    print(f"written: {write_result(f'placement_cpu{suffix}.md', text)}, {png}")


if __name__ == "__main__":
    main()
