"""Expert buffering on a whole model, on the paper's terms: total memory against static gating, at a
throughput loss.

The paper (Huang et al., NeurIPS 2024) reports that expert buffering cuts static memory by up to
1.47x with throughput comparable to no buffering: the total static GPU memory of a model whose
experts all sit on the GPU, against dynamic gating with a few expert slots per layer on the GPU and
the experts in host memory (1-16 slots of 16 experts per GPU save 0-32%). This benchmark runs the LM
of bench/paper_models.py (fairseq-style decoder-only LM, E=512, top-2, an MoE layer every other
layer, eval capacity fraction 0.25) in bfloat16 (--dtype float32 beside it), fed with real text (the bytes of the held-out
Python 3.11 documentation, as bench/routing_lm.py), in three kinds of modes with the same weights:

  static       fairseq's static gating, every expert resident (the paper's baseline)
  dynamic      capacity-free gating, every expert resident
  buffer N     capacity-free gating, N expert slots per MoE layer (moe_infer.buffer, policy
               'paper'), the experts in a safetensors file read through pread (the CPU's stand-in
               for the GPU's host memory: it is not part of the process's resident set)

in two regimes: prefill (batches of 4 sequences x 64 bytes: most experts are active in each batch)
and decode-sized steps (16 sequences, one byte each per step: a few experts per step, the sparse
regime the paper buffers the MT decoder in; there is no KV cache, so attention over the history is
not modelled). Each timed call is a fixed run of batches that continues through the text, so the
cache sees new routing every call.

Memory: resident weight bytes (static, dynamic: every parameter; buffer N: the non-expert
parameters plus the slot pools) plus the peak resident memory of a call above the resident set
before it (activations). Throughput: tokens per second of CPU time of the process (one torch thread;
the buffer's copy threads included), every mode interleaved in each round: median [min-max]; 'vs
dynamic': per-round ratio to dynamic with every expert resident. Headline: the largest memory cut
against static with at most 10% throughput loss against dynamic (median of the per-round ratios).

GPU model (labelled "model, not measured"): the same runs' miss counts and routing, priced at an
H200's rates: each miss copies one expert over PCIe 5 x16 at 50 GB/s effective (not overlapped,
an upper bound), each layer's compute takes max(FLOPs / 990 TFLOP/s bf16 dense, weight bytes read /
4.8 TB/s HBM) -- the bandwidth bound decides at these batch sizes.

Writes bench/results/buffer_model.{md,json}.

    python bench/buffer_model.py [--quick]
"""

import argparse
import json
import math
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

import common
from moe_infer.buffer import SafetensorsCheckpoint, attach_expert_buffers
from paper_models import LM, LM_SETTING, build_lm
from routing_lm import load_corpus

SLOTS = (512, 256, 128, 64, 32, 16)  # per MoE layer, of E=512
QUICK_SLOTS = (512, 64)
# regime: (sequences, tokens per sequence per batch, batches per timed call)
REGIMES = {"prefill, 4 x 64 tokens": (4, 64, 2), "decode-sized, 16 x 1 token": (16, 1, 16)}
WARMUP_CALLS = 4  # calls before the timed rounds (besides the memory call): the slot pools fill
MAX_LOSS = 0.10  # the headline: the largest cut with at most this throughput loss
# GPU model (an H200 on PCIe 5): assumed rates, not measured.
GPU = dict(pcie_bytes_per_s=50e9, hbm_bytes_per_s=4.8e12, bf16_flops_per_s=990e12)
PAPER = {"memory_cut": 1.47}


class TextBatches:
    """Consecutive [sequences, length] batches of held-out bytes: sequence i reads its own stretch of
    the text, and each batch continues where the last one stopped."""

    def __init__(self, text: torch.Tensor, sequences: int, length: int):
        self.text, self.sequences, self.length = text, sequences, length
        self.stride = text.numel() // sequences
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.length > self.stride:
            self.position = 0
        starts = torch.arange(self.sequences) * self.stride + self.position
        self.position += self.length
        return self.text[starts.unsqueeze(1) + torch.arange(self.length)]


def save_experts(model, path: str) -> None:
    """The model's expert tensors (fairseq's per-expert keys) as a safetensors file."""
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items() if ".experts." in k}
    save_file(tensors, path)


def resident_bytes(model, buffers: dict) -> int:
    """Bytes of the parameters held in memory (a file store's placeholders are meta) and the pools."""
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")
    return held + sum(b.pool_bytes for b in buffers.values())


class Mode:
    """One mode: a model, its buffers (none when every expert is resident), its own text stream."""

    def __init__(self, name, model, gating, buffers, text, regime):
        sequences, length, self.steps = regime
        self.name, self.model, self.gating, self.buffers = name, model, gating, buffers
        self.batches = TextBatches(text, sequences, length)
        self.tokens = sequences * length * self.steps
        self.weights = resident_bytes(model, buffers)

    def __call__(self):
        self.model.set_gating(self.gating)
        with torch.no_grad():
            for _ in range(self.steps):
                out = self.model(self.batches.next())
        return out

    def stats(self) -> dict:
        total = {}
        for buffer in self.buffers.values():
            for key, value in buffer.stats().items():
                if key in ("hits", "misses", "bytes_copied", "copy_time_s"):
                    total[key] = total.get(key, 0) + value
        return total

    def reset_stats(self) -> None:
        for buffer in self.buffers.values():
            buffer.reset_stats()


def gpu_model(spec: dict, regime: tuple, row: dict, expert_bytes: int, dense_bytes: int, element_size: int) -> dict:
    """Seconds per call on an H200 (model, not measured): dense layers + MoE layers + copies."""
    sequences, length, steps = regime
    tokens = sequences * length  # per batch
    moe_layers = spec["layers"] // spec["moe_freq"]
    flops_per_row = 2 * 2 * spec["d_model"] * spec["ffn"]
    bound = lambda flops, nbytes: max(flops / GPU["bf16_flops_per_s"], nbytes / GPU["hbm_bytes_per_s"])  # noqa: E731
    # Dense part (attention and dense FFN layers, the vocabulary projection): every mode the same.
    dense = bound(2 * tokens * dense_bytes / element_size, dense_bytes)
    if row["name"] == "static":
        capacity = math.ceil(spec["eval_capacity_fraction"] * tokens)
        rows = spec["num_experts"] * capacity
        moe = bound(rows * flops_per_row, spec["num_experts"] * expert_bytes)
    else:
        rows = 2 * tokens
        moe = bound(rows * flops_per_row, row["active_experts_per_layer"] * expert_bytes)
    copy = row.get("misses_per_call", 0) * expert_bytes / GPU["pcie_bytes_per_s"]
    seconds = steps * (dense + moe_layers * moe) + copy
    return {"seconds": seconds, "copy_seconds": copy, "tokens_per_s": sequences * length * steps / seconds}


def run_regime(label, regime, text, path, slots, repeats, dtype, progress) -> dict:
    spec = LM
    resident = build_lm(spec, dtype)
    element_size = resident.embed.weight.element_size()
    moe_params = {id(p) for moe in resident.moe_layers() for p in moe.experts.parameters()}
    dense_bytes = sum(p.numel() * p.element_size() for p in resident.parameters() if id(p) not in moe_params)
    checkpoint = SafetensorsCheckpoint(path)
    modes = [
        Mode("static", resident, "static", {}, text, regime),
        Mode("dynamic", resident, "dynamic", {}, text, regime),
    ]
    for n in slots:
        model = build_lm(spec, dtype)
        buffers = attach_expert_buffers(model, n, checkpoint=checkpoint)
        modes.append(Mode(f"buffer {n}", model, "dynamic", buffers, text, regime))
    expert_bytes = next(iter(modes[-1].buffers.values())).store.expert_bytes
    rows = {}
    for mode in modes:  # memory (also the first warm-up); then the pools fill before the timed rounds
        activation = common.peak_memory(mode)
        for _ in range(WARMUP_CALLS):
            mode()
        rows[mode.name] = {
            "name": mode.name,
            "slots": None if not mode.buffers else next(iter(mode.buffers.values())).num_slots,
            "weights_mib": mode.weights / 2**20,
            "activation_mib": activation / 2**20,
            "peak_mib": (mode.weights + activation) / 2**20,
        }
        mode.reset_stats()
        progress.step(f"{label}: {mode.name} memory")
    samples = common.time_interleaved(
        {mode.name: mode for mode in modes},
        torch.device("cpu"),
        repeats,
        warmup=0,
        statistic=list,
        clock=time.process_time,
    )
    progress.step(f"{label}: timed")
    static_mib = rows["static"]["peak_mib"]
    for mode in modes:
        row = rows[mode.name]
        seconds = samples[mode.name]
        row["seconds"] = seconds
        row["tokens_per_s"] = common.spread([mode.tokens / s for s in seconds])
        row["vs_dynamic"] = common.spread([d / s for s, d in zip(seconds, samples["dynamic"])])
        row["vs_static"] = common.spread([st / s for s, st in zip(seconds, samples["static"])])
        row["memory_cut_vs_static"] = static_mib / row["peak_mib"]
        stats = mode.stats()
        calls = repeats
        if stats:
            accesses = stats["hits"] + stats["misses"]
            row["hit_rate"] = stats["hits"] / accesses if accesses else float("nan")
            row["misses_per_call"] = stats["misses"] / calls
            row["active_experts_per_layer"] = accesses / calls / len(mode.buffers) / mode.steps
    # Active experts of the resident modes: the same routing as the buffered ones.
    active = [r["active_experts_per_layer"] for r in rows.values() if "active_experts_per_layer" in r]
    for name in ("static", "dynamic"):
        rows[name]["active_experts_per_layer"] = sum(active) / len(active) if active else spec["num_experts"]
    for row in rows.values():
        row["gpu_model"] = gpu_model(spec, regime, row, expert_bytes, dense_bytes, element_size)
    gpu_dynamic = rows["dynamic"]["gpu_model"]["tokens_per_s"]
    for row in rows.values():
        row["gpu_model"]["vs_dynamic"] = row["gpu_model"]["tokens_per_s"] / gpu_dynamic
    within = [r for r in rows.values() if r["slots"] and r["vs_dynamic"][1] >= 1 - MAX_LOSS]
    best = max(within, key=lambda r: r["memory_cut_vs_static"], default=None)
    gpu_within = [r for r in rows.values() if r["slots"] and r["gpu_model"]["vs_dynamic"] >= 1 - MAX_LOSS]
    gpu_best = max(gpu_within, key=lambda r: r["memory_cut_vs_static"], default=None)
    return {
        "regime": dict(zip(("sequences", "tokens_per_sequence", "batches_per_call"), regime)),
        "expert_bytes": expert_bytes,
        "rows": list(rows.values()),
        "best_within_loss": None
        if best is None
        else {
            "mode": best["name"],
            "memory_cut_vs_static": best["memory_cut_vs_static"],
            "vs_dynamic": best["vs_dynamic"],
        },
        "gpu_model_best_within_loss": None
        if gpu_best is None
        else {
            "mode": gpu_best["name"],
            "memory_cut_vs_static": gpu_best["memory_cut_vs_static"],
            "vs_dynamic": gpu_best["gpu_model"]["vs_dynamic"],
        },
    }


def table(result: dict) -> str:
    headers = ["mode", "weights MiB", "total peak MiB", "static / this", "tok/s (CPU)", "vs dynamic", "vs static"]
    headers += ["hit rate", "misses/call", "GPU model tok/s", "GPU model vs dynamic", "GPU model copy share"]
    lines = []
    for r in result["rows"]:
        low, mid, high = r["tokens_per_s"]
        gpu = r["gpu_model"]
        lines.append(
            [
                r["name"],
                f"{r['weights_mib']:.1f}",
                f"{r['peak_mib']:.1f}",
                f"{r['memory_cut_vs_static']:.2f}x",
                f"{mid:,.0f} [{low:,.0f}-{high:,.0f}]",
                common.band(r["vs_dynamic"], unit="x"),
                common.band(r["vs_static"], unit="x"),
                f"{r['hit_rate']:.2f}" if "hit_rate" in r else "—",
                f"{r['misses_per_call']:.0f}" if "misses_per_call" in r else "—",
                f"{gpu['tokens_per_s']:,.0f}",
                f"{gpu['vs_dynamic']:.2f}x",
                f"{gpu['copy_seconds'] / gpu['seconds']:.0%}",
            ]
        )
    return common.markdown_table(headers, lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two slot counts, 2 rounds, no verdicts")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    slots = QUICK_SLOTS if args.quick else SLOTS
    common.return_freed_memory_to_os()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    stem = "buffer_model" + ("" if dtype == torch.bfloat16 else f"_{args.dtype}") + ("_quick" if args.quick else "")
    _, text, _ = load_corpus()
    text = text[: 1 << 20] if args.quick else text
    progress = common.Progress(len(REGIMES) * (len(slots) + 3), "bench/buffer_model")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "experts.safetensors")
        save_experts(build_lm(LM, dtype), path)
        for label, regime in REGIMES.items():
            results[label] = run_regime(label, regime, text, path, slots, repeats, dtype, progress)
    revision = common.commit()
    machine = common.machine_description(torch.device("cpu"))
    text = common.results_header(
        "Expert buffering on a whole model (bench/buffer_model.py)", machine, revision, args.quick
    )
    text += (
        f"Model: {LM_SETTING.format(**LM)}; bfloat16; inputs: bytes of the held-out Python 3.11 documentation. Static: "
        "fairseq's static gating, every expert resident. dynamic: capacity-free, every expert resident. buffer N: "
        "capacity-free, N of 512 expert slots per MoE layer (policy 'paper'), the experts in a safetensors file "
        "read with pread (not in the resident set: the CPU's stand-in for a GPU's host memory).\n\n"
        "Memory: resident weights (buffer N: non-expert parameters + slot pools) + the call's peak resident memory "
        f"above what was resident before it. Throughput: tokens per second of process CPU time (one torch thread, "
        f"the buffer's copy threads included), all modes interleaved, {repeats} rounds after {WARMUP_CALLS + 1} warm-up calls: median [min-max]; 'vs "
        "dynamic' / 'vs static': per-round throughput ratios, median [min-max]. Decode-sized steps have no KV "
        "cache (attention over the history is not modelled).\n\n"
        f"GPU model (model, not measured): the same runs' misses and active experts priced at an H200's rates: "
        f"a miss copies one expert over PCIe 5 x16 at {GPU['pcie_bytes_per_s'] / 1e9:.0f} GB/s effective, not "
        f"overlapped (an upper bound on its cost); each layer takes max(FLOPs / {GPU['bf16_flops_per_s'] / 1e12:.0f} "
        f"TFLOP/s bf16, weight bytes read / {GPU['hbm_bytes_per_s'] / 1e12:.1f} TB/s HBM); the host-side cost of "
        "the buffer's bookkeeping and kernel launch latencies are not in it (at this model's size launches would "
        "dominate every mode's time on a GPU, so the model overstates the copies' share).\n\n"
    )
    for label, result in results.items():
        text += f"## {label}\n\n{table(result)}\n\n"
        if not args.quick:
            best, gpu_best = result["best_within_loss"], result["gpu_model_best_within_loss"]
            text += (
                f"Largest memory cut against static with at most {MAX_LOSS:.0%} throughput loss against dynamic: "
                + (
                    f"**{best['memory_cut_vs_static']:.2f}x** ({best['mode']}, {common.band(best['vs_dynamic'], unit='x')} of "
                    f"dynamic's throughput) on this CPU"
                    if best
                    else "none on this CPU"
                )
                + (
                    f"; GPU model: {gpu_best['memory_cut_vs_static']:.2f}x ({gpu_best['mode']}, "
                    f"{gpu_best['vs_dynamic']:.2f}x of dynamic's modelled throughput)"
                    if gpu_best
                    else "; GPU model: none"
                )
                + f" (paper: up to {PAPER['memory_cut']}x).\n\n"
            )
    print(text)
    md = common.write_result(f"{stem}.md", text)
    payload = dict(
        machine=machine,
        commit=revision,
        quick=args.quick,
        setting=LM_SETTING.format(**LM),
        dtype="bfloat16",
        gpu_model_assumptions=GPU,
        max_loss=MAX_LOSS,
        paper=PAPER,
        regimes=results,
    )
    js = common.write_result(f"{stem}.json", json.dumps(payload, indent=1) + "\n")
    print(f"written: {md}, {js}")


if __name__ == "__main__":
    main()
