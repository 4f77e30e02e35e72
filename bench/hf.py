"""transformers v5 MoE models: HF's experts implementations against moe_infer, end to end.

For each architecture a small-but-not-trivial model (seeded weights, no downloads) is built once
and copied per variant:
  HF eager / HF batched_mm / HF grouped_mm   transformers' own experts implementations
  HF + moe_infer experts                     model.set_experts_implementation("moe_infer")
  moe_infer                                  moe_infer.optimize(model): fused routing + experts
SwitchTransformers and NLLB-MoE have no experts interface: "HF eager" is their capacity routing and
expert loop (NLLB-MoE's loop corrected, see tests/python/hf_models.py), and moe_infer is
capacity-free. Every variant's float32 logits are checked against HF eager first, then the variants
are timed interleaved (median): prefill of 512 tokens (encoder-decoder models: 512 source tokens
and one target token), and one decode step at batch 1 and 16 after a 128-token context (the KV
cache is cropped back after each step).

By default the benchmark runs on one thread and times CPU time (time.process_time): this machine is
shared, and CPU time of a single-threaded run does not count the time other jobs hold the core.
--threads N with --clock wall measures wall-clock time instead.

Peak memory of one SwitchTransformers / NLLB-MoE MoE layer on 4096 tokens is measured in a
subprocess per variant: the rise of VmHWM over the resting RSS (glibc told to return every block
over 64 KiB at once), for HF's capacity routing and moe_infer, at the benchmark's expert count and
at 128 experts (NLLB-MoE's). Prints the tables and writes bench/results/hf_cpu.md.

    python bench/hf.py [--quick] [--arch mixtral --arch switch ...] [--threads N --clock wall]
"""

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))  # hf_models
import hf_models  # noqa: E402
import moe_infer  # noqa: E402
from common import Progress, machine_description, markdown_table, time_interleaved, write_result  # noqa: E402
from moe_infer.integrations import hf  # noqa: E402

# arch: make_config options (hidden 512, 8-64 experts; COMMON: 2 layers)
SIZES = {
    "mixtral": dict(hidden=512, ffn=1024, experts=8, top_k=2),
    "qwen2_moe": dict(hidden=512, ffn=256, experts=32, top_k=4),
    "qwen3_moe": dict(hidden=512, ffn=256, experts=64, top_k=8),
    "olmoe": dict(hidden=512, ffn=256, experts=64, top_k=8),
    "gpt_oss": dict(hidden=512, ffn=512, experts=32, top_k=4, sliding_window=4096),  # cache: whole context
    "deepseek_v3": dict(hidden=512, ffn=256, experts=64, top_k=8),
    "switch": dict(hidden=512, ffn=1024, experts=32, top_k=1),
    "nllb_moe": dict(hidden=512, ffn=1024, experts=32, top_k=2),
}
COMMON = dict(layers=2, vocab=1024, heads=8)
COLUMNS = ("HF eager", "HF batched_mm", "HF grouped_mm", "HF + moe_infer experts", "moe_infer")
PREFILL, CONTEXT, DECODE_BATCHES = 512, 128, (1, 16)
MEMORY_TOKENS = 4096
MEMORY_EXPERTS = (32, 128)
MAX_GATHER_BYTES = 2**30  # HF batched_mm is not run where it would gather more expert weights than this


def build_variants(arch):
    base = hf_models.build_model(arch, **SIZES[arch], **COMMON)
    variants = {}
    if arch in hf_models.ENCODER_DECODER:
        variants["HF eager"] = hf_models.correct_nllb_moe_experts(base) if arch == "nllb_moe" else base
    else:
        for implementation in ("eager", "batched_mm", "grouped_mm"):
            model = copy.deepcopy(base)
            model.set_experts_implementation(implementation)
            variants[f"HF {implementation}"] = model
        registry = copy.deepcopy(base)
        registry.set_experts_implementation(hf.EXPERTS_IMPLEMENTATION)
        variants["HF + moe_infer experts"] = registry
    variants["moe_infer"] = moe_infer.optimize(copy.deepcopy(base), verbose=False)
    return variants


def random_ids(batch, length, generator):
    return torch.randint(3, COMMON["vocab"], (batch, length), generator=generator)


def prefill_fn(arch, model, ids):
    if arch in hf_models.ENCODER_DECODER:
        decoder_ids = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
        return lambda: model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits
    return lambda: model(input_ids=ids, use_cache=False).logits


def decode_fn(arch, model, context_ids):
    """One decode step after a cached context; the cache is cropped back after each step."""
    batch = context_ids.shape[0]
    step_ids = torch.full((batch, 1), 5)
    with torch.no_grad():
        if arch in hf_models.ENCODER_DECODER:
            encoder_outputs = model.get_encoder()(input_ids=context_ids)
            decoder_ids = torch.full((batch, 1), model.config.decoder_start_token_id)
            out = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids, use_cache=True)
        else:
            # The context is prefilled with grouped_mm whatever the variant (batched_mm would gather
            # one weight matrix per (token, expert) pair: gigabytes).
            implementation = model.config._experts_implementation
            if implementation != hf.EXPERTS_IMPLEMENTATION:
                model.set_experts_implementation("grouped_mm")
            out = model(input_ids=context_ids, use_cache=True)
            model.set_experts_implementation(implementation)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    length = cache.get_seq_length()

    def step():
        if arch in hf_models.ENCODER_DECODER:
            logits = model(
                encoder_outputs=encoder_outputs, decoder_input_ids=step_ids, cache=cache, use_cache=True
            ).logits
        else:
            position = torch.full((batch, 1), length)
            logits = model(input_ids=step_ids, cache=cache, position_ids=position, use_cache=True).logits
        cache.crop(-1)
        return logits

    return step


def batched_mm_gather_bytes(arch, model, num_tokens):
    """Bytes of expert weights HF's batched_mm gathers for num_tokens tokens: one matrix pair per (token, expert)."""
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    per_pair = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()
    return num_tokens * SIZES[arch]["top_k"] * per_pair


def check_variants(arch, variants, ids):
    """Every variant's float32 logits against HF eager's."""
    with torch.no_grad():
        expected = prefill_fn(arch, variants["HF eager"], ids)().double()
        worst = 0.0
        for name, model in variants.items():
            if name == "HF batched_mm" and batched_mm_gather_bytes(arch, model, ids.numel()) > MAX_GATHER_BYTES:
                continue
            error = ((prefill_fn(arch, model, ids)().double() - expected).norm() / expected.norm()).item()
            if not error < 1e-5:
                raise SystemExit(f"{arch}: {name} disagrees with HF eager: relative error {error:.2e}")
            worst = max(worst, error)
    return worst


# ---- peak memory (one subprocess per measurement) ---------------------------------------------


def memory_child(arch, variant, num_experts):
    """Peak bytes above the resting RSS during one MoE layer forward on MEMORY_TOKENS tokens."""
    model = hf_models.build_model(arch, **{**SIZES[arch], "experts": num_experts}, **COMMON)
    if arch == "nllb_moe" and variant != "HF as shipped":
        hf_models.correct_nllb_moe_experts(model)
    if variant.startswith("moe_infer"):
        moe_infer.optimize(model, verbose=False, hf_capacity=variant.endswith("hf_capacity"))
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMLP"))
    hidden = torch.randn(MEMORY_TOKENS // 512, 512, model.config.d_model)
    with torch.no_grad():
        block(hidden)  # warm-up
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_kb("VmRSS")
        block(hidden)
        peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(arch, variant, num_experts):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", arch, variant, str(num_experts)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def memory_table(archs, quick):
    rows = []
    for arch in archs:
        for num_experts in MEMORY_EXPERTS[:1] if quick else MEMORY_EXPERTS:
            variants = ["HF eager", "moe_infer", "moe_infer hf_capacity"]
            if arch == "nllb_moe" and num_experts == MEMORY_EXPERTS[0] and not quick:  # gigabytes beyond
                variants.insert(1, "HF as shipped")
            peaks = {v: measure_memory(arch, v if v != "HF eager" else "HF", num_experts) for v in variants}
            shipped = f"{peaks['HF as shipped'] / 2**20:.1f}" if "HF as shipped" in peaks else "n/a"
            rows.append(
                [
                    arch,
                    num_experts,
                    f"{peaks['HF eager'] / 2**20:.1f}",
                    shipped,
                    f"{peaks['moe_infer'] / 2**20:.1f}",
                    f"{peaks['moe_infer hf_capacity'] / 2**20:.1f}",
                    f"{peaks['HF eager'] / peaks['moe_infer']:.2f}x",
                ]
            )
    headers = ["model", "experts", "HF MiB", "HF as shipped MiB", "moe_infer MiB", "moe_infer hf_capacity MiB"]
    return markdown_table(headers + ["HF / moe_infer"], rows)


# ---- main -------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats; memory at one expert count")
    parser.add_argument("--arch", action="append", choices=list(SIZES), help="architectures (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu with 1 thread, else wall")
    parser.add_argument("--output", default=None, help="results file name under bench/results/")
    parser.add_argument("--memory-child", nargs=3, metavar=("ARCH", "VARIANT", "EXPERTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        arch, variant, num_experts = args.memory_child
        memory_child(arch, variant, int(num_experts))
        return
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.threads == 1 else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    archs = args.arch or list(SIZES)
    load_before = os.getloadavg()[0]
    generator = torch.Generator().manual_seed(0)
    progress = Progress(len(archs) * (1 + len(DECODE_BATCHES)), "bench/hf")
    rows, worst = [], 0.0
    for arch in archs:
        variants = build_variants(arch)
        prefill_ids = random_ids(1, PREFILL, generator)
        worst = max(worst, check_variants(arch, variants, prefill_ids))
        phases = [(f"prefill {PREFILL}", 1, prefill_ids)]
        phases += [(f"decode b={b}", b, random_ids(b, CONTEXT, generator)) for b in DECODE_BATCHES]
        for phase, batch, ids in phases:
            skipped = {}
            if phase.startswith("prefill"):
                fns = {name: prefill_fn(arch, model, ids) for name, model in variants.items()}
                if "HF batched_mm" in fns:
                    gather = batched_mm_gather_bytes(arch, variants["HF batched_mm"], ids.numel())
                    if gather > MAX_GATHER_BYTES:
                        del fns["HF batched_mm"]
                        skipped["HF batched_mm"] = f"({gather / 2**30:.0f} GiB)"
                tokens, repeats = PREFILL, (3 if args.quick else 7)
            else:
                fns = {name: decode_fn(arch, model, ids) for name, model in variants.items()}
                tokens, repeats = batch, (5 if args.quick else 15)
            with torch.no_grad():
                times = time_interleaved(
                    fns, torch.device("cpu"), repeats, min_seconds=0.5 if args.quick else 2.0, clock=clock
                )
            hf_times = {n: t for n, t in times.items() if n.startswith("HF") and "moe_infer" not in n}
            best_hf = min(hf_times, key=hf_times.get)
            row = [arch, phase]
            row += [f"{tokens / times[c]:.0f}" if c in times else skipped.get(c, "n/a") for c in COLUMNS]
            row.append(f"{times['HF eager'] / times['moe_infer']:.2f}x")
            row.append(f"{hf_times[best_hf] / times['moe_infer']:.2f}x ({best_hf.removeprefix('HF ')})")
            rows.append(row)
            progress.step(f"{arch} {phase}")
        del variants
        gc.collect()

    headers = ["model", "phase", *(f"{c} tok/s" if c == "HF eager" else c for c in COLUMNS)]
    table = markdown_table(headers + ["vs HF eager", "vs best HF"], rows)
    sizes = "; ".join(
        f"{a}: H={s['hidden']}, ffn={s['ffn']}, E={s['experts']}, k={s['top_k']}"
        for a, s in SIZES.items()
        if a in archs
    )
    timing = "CPU time of the benchmark thread (time.process_time)" if clock_name == "cpu" else "wall-clock time"
    text = (
        f"# transformers v5 MoE models: HF experts implementations vs moe_infer (cpu, float32)\n\n"
        f"Machine: {machine_description(torch.device('cpu'))}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (the machine is shared).\n\n"
        f"Models ({COMMON['layers']} layers, vocab {COMMON['vocab']}, {COMMON['heads']} heads; "
        f"Switch/NLLB: {COMMON['layers']} encoder + {COMMON['layers']} decoder layers): {sizes}\n\n"
        f"Tokens per second from the median {timing} of interleaved runs. Prefill: one sequence of "
        f"{PREFILL} tokens (encoder-decoder: {PREFILL} source tokens, 1 target token). Decode: one step at "
        f"batch b after a {CONTEXT}-token context. 'vs best HF' = fastest of HF eager / batched_mm / grouped_mm "
        f"divided by moe_infer. Switch/NLLB: 'HF eager' is transformers' capacity routing and expert loop "
        f"(NLLB-MoE's loop corrected). Every variant agrees with HF eager (worst relative error of the logits "
        f"{worst:.1e}). HF batched_mm gathers one weight matrix pair per (token, expert); it is not run where "
        f"that exceeds {MAX_GATHER_BYTES / 2**30:.0f} GiB (the size is shown instead).\n\n{table}\n"
    )
    memory_archs = [a for a in archs if a in hf_models.ENCODER_DECODER]
    if memory_archs:
        text += (
            f"\nPeak memory of one MoE layer forward on {MEMORY_TOKENS} tokens (8 x 512, H=512; the [tokens, H] "
            f"output alone is {MEMORY_TOKENS * 512 * 4 / 2**20:.0f} MiB): rise of VmHWM over the resting RSS. "
            f"'HF as shipped': transformers 5.x's NLLB-MoE expert loop, which one-hot encodes its [tokens, experts] "
            f"mask into [tokens, experts, experts].\n\n{memory_table(memory_archs, args.quick)}\n"
        )
    print(text)
    name = args.output or ("hf_cpu_quick.md" if args.quick else "hf_cpu.md")
    print(f"written: {write_result(name, text)}")


if __name__ == "__main__":
    main()
