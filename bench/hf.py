"""transformers v5 MoE models: HF's experts implementations against moe_infer, end to end.

For each architecture a small-but-not-trivial model (seeded weights, no downloads) is built once
and copied per variant:
  HF eager / HF batched_mm / HF grouped_mm   transformers' own experts implementations
  HF + moe_infer experts                     model.set_experts_implementation("moe_infer")
  moe_infer                                  moe_infer.optimize(model): fused routing + experts
  GEMM floor                                 the model with experts that only run the expert GEMMs
                                             (F.linear of each routed expert on its token count: no
                                             gather, activation or combine): what no experts
                                             implementation can beat
SwitchTransformers and NLLB-MoE have no experts interface: "HF eager" is their capacity routing and
expert loop (NLLB-MoE's loop corrected, see tests/python/hf_models.py), and moe_infer is
capacity-free. Every variant's float32 logits are checked against HF eager first, then the variants
are timed interleaved (median): prefill of 512 tokens (encoder-decoder models: 512 source tokens
and one target token), and one decode step at batch 1 and 16 after a 128-token context (the KV
cache is cropped back after each step), each timed call starting from cold caches (128 MiB read
untimed before it), as in a real model whose weights far exceed the caches. Decode rows also give
the weight-bandwidth floor: the bytes of weights the step must read (every parameter outside the
experts, an untied input embedding aside, plus each layer's active experts) over the memory
bandwidth measured in the same run (the largest of a large torch copy, read + write bytes, a large
sum, read bytes, both on 2 MiB pages, and the same sum timed among the row's own calls), and the
step's ratio to it is the median over rounds of its time over the floor at the rate that sum read
in the same round (the strict ratio beside it). Every variant's large weights are on 2 MiB pages
(moe_infer.host_memory), as optimize puts the experts'.

Tables for each --dtype (default bfloat16 and float32) and --threads (default 1 and 2). One thread
is timed in the CPU time of the thread (time.thread_time): this machine is shared, and CPU time
does not count the time other jobs hold the core; more threads in wall-clock time.

Peak memory of one SwitchTransformers / NLLB-MoE MoE layer on 4096 tokens is measured in a
subprocess per variant: the rise of VmHWM over the resting RSS (glibc told to return every block
over 64 KiB at once), for HF's capacity routing and moe_infer, at the benchmark's expert count and
at 128 experts (NLLB-MoE's). Prints the tables and writes bench/results/hf_cpu.md.

    python bench/hf.py [--quick] [--arch mixtral ...] [--dtype bfloat16 ...] [--threads 1 ...]
"""

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers.integrations import moe as hf_moe

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
from moe_infer.integrations import hf

hf_models = load_hf_models()

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
COLUMNS = ("HF eager", "HF batched_mm", "HF grouped_mm", "HF + moe_infer experts", "moe_infer", "GEMM floor")
GEMM_FLOOR = "gemm_floor"
PREFILL, CONTEXT, DECODE_BATCHES = 512, 128, (1, 16)
MEMORY_TOKENS = 4096
MEMORY_EXPERTS = (32, 128)
MAX_GATHER_BYTES = 2**30  # HF batched_mm is not run where it would gather more expert weights than this


def expert_matrices(experts):
    """(fc1 [E, ...], fc2 [E, ...], transposed) of a transformers experts module."""
    fc1 = experts.gate_up_proj if hasattr(experts, "gate_up_proj") else experts.up_proj
    fc2 = experts.down_proj
    return fc1, fc2, fc1.shape[-1] != experts.config.hidden_size


def gemm_floor_experts(self, hidden_states, top_k_index, top_k_weights):
    """An experts implementation that runs only the expert GEMMs, each routed expert on its token count."""
    fc1, fc2, transposed = expert_matrices(self)
    counts = torch.bincount(top_k_index.reshape(-1), minlength=fc1.shape[0]).tolist()
    ffn = fc2.shape[1] if transposed else fc2.shape[2]
    for e, count in enumerate(counts):
        if count:
            rows = hidden_states[:count]
            fc1_out = rows @ fc1[e] if transposed else F.linear(rows, fc1[e])
            act = fc1_out[:, :ffn]
            act @ fc2[e] if transposed else F.linear(act, fc2[e])
    return torch.zeros_like(hidden_states)


hf_moe.ALL_EXPERTS_FUNCTIONS.register(GEMM_FLOOR, gemm_floor_experts)


def build_variants(arch, dtype):
    base = hf_models.build_model(arch, **SIZES[arch], **COMMON).to(dtype)
    variants = {}
    if arch in hf_models.ENCODER_DECODER:
        variants["HF eager"] = hf_models.correct_nllb_moe_experts(base) if arch == "nllb_moe" else base
    else:
        for implementation in ("eager", "batched_mm", "grouped_mm", GEMM_FLOOR):
            model = copy.deepcopy(base)
            model.set_experts_implementation(implementation)
            variants["GEMM floor" if implementation == GEMM_FLOOR else f"HF {implementation}"] = model
        registry = copy.deepcopy(base)
        registry.set_experts_implementation(hf.EXPERTS_IMPLEMENTATION)
        variants["HF + moe_infer experts"] = registry
    variants["moe_infer"] = moe_infer.optimize(copy.deepcopy(base), verbose=False)
    # Every variant's large weights on 2 MiB pages (moe_infer.optimize moves only the experts'):
    # the rows compare computations, all reading memory as fast as the bandwidth floor's buffers.
    for model in variants.values():
        host_memory.to_huge_pages(model)
    return variants


def step_weight_bytes(model, step):
    """Bytes of weights one call of ``step`` must read: every parameter outside the experts (an
    untied input embedding aside: a step reads one row of it) and each layer's distinct routed
    experts."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.Tensor)]
    expert_params = {id(p) for m in modules for p in m.parameters()}
    skip = set(expert_params)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight is not head.weight:
        skip.add(id(embedding.weight))
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    total = [dense]

    def hook(module, args, output):
        fc1, fc2, _ = expert_matrices(module)
        active = args[1].reshape(-1).unique().numel()
        total.append(active * (fc1[0].numel() + fc2[0].numel()) * fc1.element_size())

    hooks = [m.register_forward_hook(hook) for m in modules]
    with torch.no_grad():
        step()
    for h in hooks:
        h.remove()
    return sum(total)


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
            # transformers' variants prefill the context with grouped_mm (batched_mm would gather one
            # weight matrix per (token, expert) pair: gigabytes). An optimized model is left alone:
            # choosing an implementation on it hands its blocks back to transformers.
            optimized = any(hasattr(m, "experts_backend") for m in model.modules())
            implementation = model.config._experts_implementation
            if not optimized and implementation != hf.EXPERTS_IMPLEMENTATION:
                model.set_experts_implementation("grouped_mm")
            out = model(input_ids=context_ids, use_cache=True)
            if not optimized:
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


def check_variants(arch, variants, ids, dtype):
    """Every variant's logits against HF eager's; the worst moe_infer error.

    In 16-bit types transformers' own implementations can differ from eager by more than rounding
    (a GEMM's rounding flips a later layer's routing): moe_infer may then differ by as much as HF's
    own variants do (twice their worst), never more."""
    limit = 1e-5 if dtype == torch.float32 else 3e-2
    errors = {}
    with torch.no_grad():
        expected = prefill_fn(arch, variants["HF eager"], ids)().double()
        for name, model in variants.items():
            if name in ("GEMM floor", "HF eager"):
                continue
            if name == "HF batched_mm" and batched_mm_gather_bytes(arch, model, ids.numel()) > MAX_GATHER_BYTES:
                continue
            errors[name] = relative_error(prefill_fn(arch, model, ids)(), expected).item()
    ours = {name: e for name, e in errors.items() if "moe_infer" in name}
    hf_spread = max((e for name, e in errors.items() if name not in ours), default=0.0)
    allowed = limit if dtype == torch.float32 else max(limit, 2 * hf_spread)
    for name, error in ours.items():
        if not error < allowed:
            raise SystemExit(
                f"{arch}: {name} disagrees with HF eager: relative error {error:.2e} (allowed {allowed:.1e})"
            )
    return max(ours.values(), default=0.0)


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


def run_table(archs, dtype, threads, quick, progress):
    """One table: every architecture and phase at this dtype and thread count."""
    torch.set_num_threads(threads)
    clock = table_clock(threads)
    bandwidth = memory_bandwidth(clock)
    probe = ReadProbe()
    generator = torch.Generator().manual_seed(0)
    rows, worst = [], 0.0
    for arch in archs:
        variants = build_variants(arch, dtype)
        prefill_ids = random_ids(1, PREFILL, generator)
        worst = max(worst, check_variants(arch, variants, prefill_ids, dtype))
        phases = [(f"prefill {PREFILL}", 1, prefill_ids)]
        phases += [(f"decode b={b}", b, random_ids(b, CONTEXT, generator)) for b in DECODE_BATCHES]
        for phase, batch, ids in phases:
            skipped = {}
            bandwidth_floor = None
            if phase.startswith("prefill"):
                fns = {name: prefill_fn(arch, model, ids) for name, model in variants.items()}
                if "HF batched_mm" in fns:
                    gather = batched_mm_gather_bytes(arch, variants["HF batched_mm"], ids.numel())
                    if gather > MAX_GATHER_BYTES:
                        del fns["HF batched_mm"]
                        skipped["HF batched_mm"] = f"({gather / 2**30:.0f} GiB)"
                tokens, repeats = PREFILL, (3 if quick else 11)
            else:
                fns = {name: decode_fn(arch, model, ids) for name, model in variants.items()}
                tokens, repeats = batch, (5 if quick else 15)
            decode = not phase.startswith("prefill")
            with torch.no_grad():
                timed = time_cpu_rows(
                    fns,
                    repeats,
                    0.5 if quick else 2.0,
                    clock,
                    cold=decode,
                    probe=probe if decode and arch not in hf_models.ENCODER_DECODER else None,
                    bandwidth=bandwidth,
                )
            samples, floor_bandwidth = timed.samples, timed.floor_bandwidth
            if floor_bandwidth is not None:
                step_bytes = step_weight_bytes(variants["HF eager"], fns["HF eager"])
                bandwidth_floor = step_bytes / floor_bandwidth
                per_round = median_ratio(samples["moe_infer"], timed.round_floors(step_bytes))
            times = {name: statistics.median(values) for name, values in samples.items()}
            hf_times = {n: t for n, t in times.items() if n.startswith("HF") and "moe_infer" not in n}
            best_hf = min(hf_times, key=hf_times.get)
            floor = times.get("GEMM floor")
            row = [arch, phase]
            row += [f"{tokens / times[c]:.0f}" if c in times else skipped.get(c, "n/a") for c in COLUMNS]
            row.append(ms_spread(samples["moe_infer"], 2))
            row.append(f"{times['moe_infer'] / floor:.2f}" if floor else "n/a")
            row.append(f"{bandwidth_floor * 1e3:.2f}" if bandwidth_floor else "")
            row.append(f"{per_round:.2f} ({times['moe_infer'] / bandwidth_floor:.2f})" if bandwidth_floor else "")
            row.append(f"{hf_times[best_hf] / times['moe_infer']:.2f}x ({best_hf.removeprefix('HF ')})")
            rows.append(row)
            progress.step(f"{arch} {phase} {dtype} t={threads}")
        del variants
        gc.collect()

    headers = ["model", "phase", *(f"{c} tok/s" if c == "HF eager" else c for c in COLUMNS)]
    headers += [
        "moe_infer ms",
        "moe_infer / GEMM floor",
        "bandwidth floor ms",
        "moe_infer / bandwidth floor: per round (of medians)",
    ]
    table = markdown_table(headers + ["vs best HF"], rows)
    return (
        f"{table_title(dtype, threads)}\n\n"
        f"{bandwidth.describe()} Every variant agrees with HF eager "
        f"(worst relative error of the logits {worst:.1e}).\n\n{table}\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser, quick_help="fewer repeats; memory at one expert count")
    parser.add_argument("--arch", action="append", choices=list(SIZES), help="architectures (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--memory-child", nargs=3, metavar=("ARCH", "VARIANT", "EXPERTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        arch, variant, num_experts = args.memory_child
        memory_child(arch, variant, int(num_experts))
        return
    archs = args.arch or list(SIZES)
    dtypes, threads = table_settings(args)
    load_before = os.getloadavg()[0]
    progress = Progress(len(dtypes) * len(threads) * len(archs) * (1 + len(DECODE_BATCHES)), "bench/hf")
    sections = [run_table(archs, dtype, t, args.quick, progress) for dtype in dtypes for t in threads]
    sizes = "; ".join(
        f"{a}: H={s['hidden']}, ffn={s['ffn']}, E={s['experts']}, k={s['top_k']}"
        for a, s in SIZES.items()
        if a in archs
    )
    text = (
        "# transformers v5 MoE models: HF experts implementations vs moe_infer (cpu)\n\n"
        + machine_line(load_before)
        + f"Models ({COMMON['layers']} layers, vocab {COMMON['vocab']}, {COMMON['heads']} heads; "
        f"Switch/NLLB: {COMMON['layers']} encoder + {COMMON['layers']} decoder layers): {sizes}\n\n"
        f"Tokens per second from the median time of interleaved runs; 'moe_infer ms' is median (min-max). Prefill: "
        f"one sequence of {PREFILL} tokens (encoder-decoder: {PREFILL} source tokens, 1 target token). Decode: one "
        f"step at batch b after a {CONTEXT}-token context. 'GEMM floor': the whole model with experts that only run "
        f"their GEMMs (F.linear per routed expert), so 'moe_infer / GEMM floor' includes attention etc. on both "
        f"sides. 'bandwidth floor': bytes of the weights one decode step must read (every parameter outside the "
        f"experts, an untied input embedding aside, plus the active experts of every layer) / the memory bandwidth "
        f"(the largest of the table's copy and sum and the same sum timed among the row's own calls); every variant's "
        f"large weights are on 2 MiB pages (moe_infer.host_memory); decode rows are timed from cold caches. "
        f"'moe_infer / bandwidth floor': the median over the interleaved rounds of the step's time over the floor at "
        f"the rate the same sum read in that round; in parentheses, the median time over the floor in the cell. "
        f"'vs best HF' = fastest of HF eager / batched_mm / grouped_mm divided by "
        f"moe_infer. Switch/NLLB: 'HF eager' is transformers' capacity routing and expert loop (NLLB-MoE's loop "
        f"corrected); they have no experts interface, so no GEMM floor. HF batched_mm gathers one weight matrix "
        f"pair per (token, expert); it is not run where that exceeds {MAX_GATHER_BYTES / 2**30:.0f} GiB (the size "
        f"is shown instead).\n\n" + "\n".join(sections)
    )
    memory_archs = [a for a in archs if a in hf_models.ENCODER_DECODER]
    if memory_archs and not args.no_memory:
        text += (
            f"\nPeak memory of one MoE layer forward (float32) on {MEMORY_TOKENS} tokens (8 x 512, H=512; the "
            f"[tokens, H] output alone is {MEMORY_TOKENS * 512 * 4 / 2**20:.0f} MiB): rise of VmHWM over the resting "
            f"RSS. 'HF as shipped': transformers 5.x's NLLB-MoE expert loop, which one-hot encodes its [tokens, "
            f"experts] mask into [tokens, experts, experts].\n\n{memory_table(memory_archs, args.quick)}\n"
        )
    publish_tables(args, "hf_cpu", text)


if __name__ == "__main__":
    main()
