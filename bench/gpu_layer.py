"""MoE on a GPU: the layer, the optimized transformers blocks, and expert buffering, against floors.

Parts (--part, default all), bf16:
  layer   moe_infer.MoELayer (validate=True, the default) eager and replayed from a CUDA graph,
          against transformers' own sparse MoE block on the same weights (eager and grouped_mm
          experts, each eager and, where it captures, from a CUDA graph). Shapes: a Mixtral-8x7B
          layer (H 4096, ffn 14336, E 8, k 2) and a DeepSeek-like many-expert layer (H 2048, ffn
          1408, E 64, k 6). Plus a per-kernel time breakdown of moe_infer's layer (torch.profiler).
  hf      the same transformers blocks after moe_infer.optimize (how users run it), eager and from
          a CUDA graph, against the best unoptimized block.
  buffer  a buffered layer (Mixtral shape, experts in pinned host memory, 2 of 8 slots): the copy
          bandwidth the buffer reaches against a plain pinned host-to-device copy, and how much of
          the copy time the compute hides (1 - stall / copy).
Floors per row: the hardware's (989 TFLOP/s dense bf16, 4.8 TB/s HBM) and the measured ones (a
cuBLAS GEMM of the same FLOPs, a device-to-device copy); 'ours / floor' divides by the larger of the
GEMM and weight-read floors. Times are medians of CUDA-event timings. Writes
bench/results/gpu/<part>_h200.md (and a copy to $OUT when set).

    python bench/gpu_layer.py [--part layer|hf|buffer|all] [--quick]
    python bench/gpu_layer.py --dry-run      (CPU rehearsal: tiny shapes, results in build/)
"""

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

import moe_infer
from common import capture_cuda_graph, machine_description, markdown_table, relative_error
from moe_infer import reference as ref

SHAPES = {
    "mixtral-8x7b": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
    "deepseek-like": dict(hidden=2048, ffn=1408, experts=64, top_k=6),
}
DRY_SHAPES = {"tiny": dict(hidden=64, ffn=32, experts=8, top_k=2)}
TOKENS = [1, 16, 128, 1024, 8192]
QUICK_TOKENS = [1, 16, 1024, 8192]
HW_TFLOPS = 989e12  # H200 dense bf16
HW_BANDWIDTH = 4.8e12  # H200 HBM3e, bytes / s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Timer:
    """Median milliseconds of fn(): CUDA events on a GPU, perf_counter on the CPU (dry run)."""

    def __init__(self, device, repeats):
        self.device, self.repeats = device, repeats

    def __call__(self, fn, repeats=None):
        repeats = repeats or self.repeats
        for _ in range(2):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def copy_bandwidth(device, timer, elements):
    """Bytes per ms of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(elements, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / timer(lambda: dst.copy_(src))


def captured(fn, example):
    """fn replayed from a CUDA graph: (replay, static input, static output), or None if fn cannot
    be captured (or there is no GPU)."""
    if example.device.type != "cuda":
        return None
    static_x = example.clone()
    try:
        graph, static_out = capture_cuda_graph(fn, static_x)
    except Exception as error:  # noqa: BLE001  (an implementation that cannot be captured is reported)
        print(f"[bench] not capturable: {str(error).splitlines()[0][:160]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return graph.replay, static_x, static_out


def build_hf_block(shape, dtype, device):
    """transformers' sparse MoE block with the shape (eager experts), or (None, None)."""
    try:
        if shape["experts"] <= 8:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

            config = MixtralConfig(
                hidden_size=shape["hidden"],
                intermediate_size=shape["ffn"],
                num_local_experts=shape["experts"],
                num_experts_per_tok=shape["top_k"],
            )
        else:
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

            config = Qwen3MoeConfig(
                hidden_size=shape["hidden"],
                moe_intermediate_size=shape["ffn"],
                num_experts=shape["experts"],
                num_experts_per_tok=shape["top_k"],
                norm_topk_prob=True,
            )
        config._experts_implementation = "eager"
        with torch.device(device):
            block = Block(config).to(dtype).eval()
        with torch.no_grad():
            block.gate.weight.normal_(0, 4 / shape["hidden"] ** 0.5)  # decisive routing
        return block, config
    except Exception as error:  # noqa: BLE001  (a baseline missing is reported, not fatal)
        print(f"[bench] transformers block unavailable: {error}", file=sys.stderr)
        return None, None


def layer_for(shape, hf_block, dtype, device, **options):
    layer = moe_infer.MoELayer(
        shape["hidden"],
        shape["ffn"],
        shape["experts"],
        shape["top_k"],
        renormalize=True,
        device=device,
        dtype=dtype,  # a buffered layer's store takes its dtype here
        **options,
    ).eval()
    with torch.no_grad():
        if hf_block is not None:  # the very same weights
            layer.gate.weight.copy_(hf_block.gate.weight)
            layer.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
            layer.experts.down_proj.copy_(hf_block.experts.down_proj)
        else:
            layer.gate.weight.normal_(0, 4 / shape["hidden"] ** 0.5)
    return layer


def floors(shape, num_tokens, active, timer, bandwidth, dtype, device):
    """(measured GEMM ms, measured weight-read ms, hardware floor ms) for one row."""
    flops = 2 * num_tokens * shape["top_k"] * 3 * shape["hidden"] * shape["ffn"]
    weight_bytes = active * 3 * shape["hidden"] * shape["ffn"] * 2
    a = torch.randn(num_tokens * shape["top_k"], shape["hidden"], device=device, dtype=dtype)
    b = torch.randn(shape["hidden"], 3 * shape["ffn"], device=device, dtype=dtype)
    gemm_ms = timer(lambda: a @ b)
    read_ms = weight_bytes / bandwidth
    hardware_ms = max(flops / HW_TFLOPS, weight_bytes / HW_BANDWIDTH) * 1e3
    return flops, gemm_ms, read_ms, hardware_ms


def cell(times, key):
    """A time column: times[key] in ms, or n/a where it was not measured."""
    return f"{times[key]:.3f}" if key in times else "n/a"


def versus_floors(times, ours_prefix, hardware_ms, gemm_ms, read_ms):
    """(ours, best HF time or None, [ours / HW floor, ours / measured floor, best HF / ours]) of one
    row, where ours is the best of the times whose name starts with ``ours_prefix``."""
    ours = min(v for k, v in times.items() if k.startswith(ours_prefix))
    best_hf = min((v for k, v in times.items() if k.startswith("HF")), default=None)
    ratios = [
        f"{ours / hardware_ms:.2f}x",
        f"{ours / max(gemm_ms, read_ms):.2f}x",
        "n/a" if best_hf is None else f"{best_hf / ours:.2f}x",
    ]
    return ours, best_hf, ratios


def hf_times(block, config, x3, timer, prefix):
    """{name: ms} of the transformers block with each experts implementation, eager and graph."""
    times = {}
    if block is None:
        return times
    for impl in ("eager", "grouped_mm"):
        config._experts_implementation = impl
        try:
            times[f"{prefix}{impl}"] = timer(lambda: block(x3))
        except Exception as error:  # noqa: BLE001
            print(f"[bench] HF {impl} failed: {str(error).splitlines()[0][:160]}", file=sys.stderr)
            continue
        graph = captured(block, x3)
        if graph is not None:
            times[f"{prefix}{impl} graph"] = timer(graph[0])
    config._experts_implementation = "eager"
    return times


def kernel_breakdown(fn, device, top=12):
    """[(kernel, calls per call of fn, microseconds per call, share)] of one fn() by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    calls = 5
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            micros = getattr(event, "device_time_total", None)
            if micros is None:
                micros = event.cuda_time_total
            if event.device_type != torch.autograd.DeviceType.CUDA or micros <= 0:
                continue
        else:
            micros = event.self_cpu_time_total
            if not event.key.startswith("moe_infer::") and not event.key.startswith("aten::"):
                continue
        rows.append((event.key[:90], event.count / calls, micros / calls))
    total = sum(r[2] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [(name, f"{n:.0f}", f"{us:.1f}", f"{us / total:.0%}") for name, n, us in rows[:top]], len(rows)


# ---- parts ------------------------------------------------------------------------------------


def part_layer(args, device, dtype, timer, bandwidth, shapes, tokens):
    rows, breakdowns = [], []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        hf_block, config = build_hf_block(shape, dtype, device)
        layer = layer_for(shape, hf_block, dtype, device)
        for num_tokens in tokens:
            x = torch.randn(num_tokens, shape["hidden"], device=device, dtype=dtype)
            with torch.no_grad():
                out = layer(x)
                active = int(torch.unique(layer.route(x)[2]).numel())
                expected = ref.layer_forward(layer, x[:256], compute_dtype=torch.float32)
                error = relative_error(out[:256], expected).item()
                t = {"moe_infer": timer(lambda layer=layer, x=x: layer(x))}
                graph = captured(layer, x)
                if graph is not None:
                    t["moe_infer graph"] = timer(graph[0])
                t.update(hf_times(hf_block, config, x.view(1, num_tokens, -1), timer, "HF "))
                flops, gemm_ms, read_ms, hardware_ms = floors(
                    shape, num_tokens, active, timer, bandwidth, dtype, device
                )
                if num_tokens in (16, 1024) or args.dry_run:
                    table, kernels = kernel_breakdown(lambda layer=layer, x=x: layer(x), device)
                    breakdowns.append((f"{name} S={num_tokens} ({kernels} distinct kernels)", table))
            ours, _, ratios = versus_floors(t, "moe_infer", hardware_ms, gemm_ms, read_ms)
            measured = (
                "moe_infer",
                "moe_infer graph",
                "HF eager",
                "HF eager graph",
                "HF grouped_mm",
                "HF grouped_mm graph",
            )
            rows.append(
                [
                    name,
                    num_tokens,
                    active,
                    *(cell(t, key) for key in measured),
                    f"{hardware_ms:.3f}",
                    f"{gemm_ms:.3f} / {read_ms:.3f}",
                    *ratios,
                    f"{flops / ours / 1e9:.0f}",
                    f"{error:.1e}",
                ]
            )
            print(f"[bench] layer {name} S={num_tokens}: {rows[-1][3:]}", file=sys.stderr)
        hf_block = layer = None  # free the weights before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    headers = [
        "shape",
        "S",
        "active E",
        "moe_infer ms",
        "+graph ms",
        "HF eager ms",
        "+graph ms",
        "HF grouped_mm ms",
        "+graph ms",
        "HW floor ms",
        "measured GEMM / read ms",
        "ours / HW floor",
        "ours / measured floor",
        "best HF / ours",
        "TFLOP/s",
        "rel. err vs fp32 ref",
    ]
    text = (
        "'ours' is the better of eager and graph replay; the HW floor is max(FLOPs / 989 TFLOP/s, active expert "
        "bytes / 4.8 TB/s); the measured floor is the larger of a cuBLAS GEMM of the same FLOPs and reading the "
        "active experts at the measured copy bandwidth. 'best HF / ours' > 1: moe_infer beats every HF variant, "
        "graph-captured ones included. Targets: <= 1.3x the floor at S >= 1024, <= 1.6x at S <= 16.\n\n"
        + markdown_table(headers, rows)
    )
    for title, table in breakdowns:
        text += f"\n\n### Kernels of one moe_infer layer forward: {title}\n\n"
        text += markdown_table(["kernel", "calls", "us", "share"], table)
    return "MoE layer (bf16)", text


def part_hf(args, device, dtype, timer, bandwidth, shapes, tokens):
    rows = []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        block, config = build_hf_block(shape, dtype, device)
        if block is None:
            return "optimized transformers blocks", "transformers is not installed: nothing measured."
        for num_tokens in tokens:
            x3 = torch.randn(1, num_tokens, shape["hidden"], device=device, dtype=dtype)
            with torch.no_grad():
                t = hf_times(block, config, x3, timer, "HF ")
                moe_infer.optimize(block, verbose=False)
                t["optimized"] = timer(lambda block=block, x3=x3: block(x3))
                graph = captured(block, x3)
                if graph is not None:
                    t["optimized graph"] = timer(graph[0])
                active = (
                    shape["experts"] if num_tokens * shape["top_k"] >= shape["experts"] else num_tokens * shape["top_k"]
                )
                flops, gemm_ms, read_ms, hardware_ms = floors(
                    shape, num_tokens, active, timer, bandwidth, dtype, device
                )
            _, best_hf, ratios = versus_floors(t, "optimized", hardware_ms, gemm_ms, read_ms)
            rows.append(
                [
                    name,
                    num_tokens,
                    cell(t, "optimized"),
                    cell(t, "optimized graph"),
                    "n/a" if best_hf is None else f"{best_hf:.3f}",
                    f"{hardware_ms:.3f}",
                    *ratios,
                ]
            )
            print(f"[bench] hf {name} S={num_tokens}: {rows[-1][2:]}", file=sys.stderr)
            block, config = build_hf_block(shape, dtype, device)  # a fresh, unoptimized block
        block = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    headers = [
        "block",
        "S",
        "optimized ms",
        "+graph ms",
        "best HF ms (any impl, graph or not)",
        "HW floor ms",
        "ours / HW floor",
        "ours / measured floor",
        "best HF / ours",
    ]
    note = (
        "transformers' sparse MoE block after moe_infer.optimize (routing and shared parts unchanged), against the "
        "best of the unoptimized block's eager and grouped_mm experts, eager or graph-captured. Active experts are "
        "estimated as min(E, S*k) for the weight-read floor.\n\n"
    )
    return "optimized transformers blocks (bf16)", note + markdown_table(headers, rows)


def part_buffer(args, device, dtype, timer, bandwidth, shapes, tokens):
    shape = next(iter(shapes.values()))
    num_slots = 2
    rows = []
    torch.manual_seed(0)
    layer = layer_for(shape, None, dtype, device, expert_buffer=num_slots)
    expert_bytes = int(layer.expert_buffer._core.expert_bytes())
    # The copy floor: one expert's bytes from pinned host memory, as one plain copy.
    host = torch.empty(expert_bytes // 2, dtype=dtype, pin_memory=device.type == "cuda")
    dest = torch.empty(expert_bytes // 2, dtype=dtype, device=device)
    copy_ms = timer(lambda: dest.copy_(host, non_blocking=True), repeats=5)
    host_bandwidth = expert_bytes / copy_ms  # bytes / ms
    for num_tokens in tokens:
        x = torch.randn(num_tokens, shape["hidden"], device=device, dtype=dtype)
        with torch.no_grad():
            layer(x)
            timer.sync()
            layer.expert_buffer.reset_stats()
            ms = timer(lambda x=x: layer(x))
            stats = layer.expert_buffer.stats()
        copy_ns, stall_ns, copied = stats["copy_time_s"] * 1e9, stats["stall_time_s"] * 1e9, stats["bytes_copied"]
        reached = copied / (copy_ns / 1e6) if copy_ns else float("nan")
        rows.append(
            [
                num_tokens,
                f"{ms:.3f}",
                stats["misses"],
                f"{copied / 1e9:.2f}",
                f"{reached / 1e6:.1f}",
                f"{host_bandwidth / 1e6:.1f}",
                f"{reached / host_bandwidth:.0%}",
                f"{1 - stall_ns / copy_ns:.0%}" if copy_ns else "n/a",
            ]
        )
        print(f"[bench] buffer S={num_tokens}: {rows[-1]}", file=sys.stderr)
    headers = [
        "S",
        "forward ms",
        "misses",
        "GB copied",
        "copy GB/s reached",
        "pinned copy GB/s (floor)",
        "reached / floor",
        "copy time hidden (1 - stall/copy)",
    ]
    note = (
        f"{next(iter(shapes))} layer, {num_slots} of {shape['experts']} slots, experts in pinned host memory; "
        f"one expert = {expert_bytes / 1e6:.0f} MB. Counters cover the timed forwards and their two warm-ups.\n\n"
    )
    return "expert buffering (bf16)", note + markdown_table(headers, rows)


PARTS = {"layer": part_layer, "hf": part_hf, "buffer": part_buffer}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help=f"S in {QUICK_TOKENS}, fewer repeats")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny shapes, one repeat")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if args.dry_run:
        device, shapes, tokens, repeats = torch.device("cpu"), DRY_SHAPES, [1, 16], 1
        out_dir = os.path.join(ROOT, "build", "gpu_check_dry_run")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_layer.py needs a CUDA device (or --dry-run)")
        torch.backends.cuda.matmul.allow_tf32 = False
        device, shapes = torch.device("cuda"), SHAPES
        tokens, repeats = (QUICK_TOKENS, 10) if args.quick else (TOKENS, 30)
        out_dir = os.path.join(ROOT, "bench", "results", "gpu")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, repeats)
    bandwidth = copy_bandwidth(device, timer, 1 << 16 if args.dry_run else 1 << 30)  # bytes / ms
    os.makedirs(out_dir, exist_ok=True)
    for part in PARTS if args.part == "all" else [args.part]:
        title, body = PARTS[part](args, device, dtype, timer, bandwidth, shapes, tokens)
        text = (
            f"# {title}\n\nMachine: {machine_description(device)}; measured device copy bandwidth "
            f"{bandwidth / 1e9:.2f} TB/s (read + write){' (DRY RUN on the CPU: not a measurement)' if args.dry_run else ''}\n\n"
            f"{body}\n"
        )
        print(text)
        suffix = "" if dtype == torch.bfloat16 else f"_{args.dtype}"
        path = os.path.join(out_dir, f"{part}_{'dry_run' if args.dry_run else 'h200'}{suffix}.md")
        with open(path, "w") as f:
            f.write(text)
        if os.environ.get("OUT") and not args.dry_run:
            shutil.copy(path, os.path.join(os.environ["OUT"], os.path.basename(path)))
        print(f"written: {path}")


if __name__ == "__main__":
    main()
