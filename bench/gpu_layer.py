"""The MoE layer on a GPU: moe_infer against transformers' eager and grouped_mm experts, and two floors.

Shapes (bf16): a Mixtral-8x7B layer (H 4096, ffn 14336, E 8, k 2) and a DeepSeek-like many-expert
layer (H 2048, ffn 1408, E 64, k 6), at S in {1, 16, 128, 1024, 8192}. For each row:
  - moe_infer eager, and moe_infer replayed from a CUDA graph (the layer is capturable);
  - HF eager and HF grouped_mm: transformers' own sparse MoE block on the same weights;
  - floors measured in the same run: the dense GEMM time for the same FLOPs, and the time to read
    the active experts' weights once at the measured device-to-device copy bandwidth.
Times are medians of CUDA-event timings. Prints a table; writes bench/results/gpu/layer_h200.md (or
--output) and, with $OUT set, a copy there.

    python bench/gpu_layer.py [--quick]
"""

import argparse
import os
import shutil
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_infer  # noqa: E402
from common import Progress, machine_description, markdown_table  # noqa: E402
from moe_infer import reference as ref  # noqa: E402

SHAPES = {
    "mixtral-8x7b": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
    "deepseek-like": dict(hidden=2048, ffn=1408, experts=64, top_k=6),
}
TOKENS = [1, 16, 128, 1024, 8192]


def cuda_time(fn, repeats=20, warmup=3):
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes per ms of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), repeats=10)
    return 2 * src.numel() * src.element_size() / ms


def build_hf_block(shape, dtype):
    """transformers' sparse MoE block with the shape, or None if transformers is unavailable."""
    try:
        if shape["experts"] == 8:
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
        with torch.device("cuda"):
            block = Block(config).to(dtype).eval()
        return block, config
    except Exception as error:  # noqa: BLE001  (a baseline missing is reported, not fatal)
        print(f"[bench] transformers block unavailable: {error}", file=sys.stderr)
        return None, None


def moe_infer_layer_for(shape, hf_block, dtype):
    layer = (
        moe_infer.MoELayer(
            shape["hidden"],
            shape["ffn"],
            shape["experts"],
            shape["top_k"],
            renormalize=True,
            validate=False,
            device="cuda",
        )
        .to(dtype)
        .eval()
    )
    with torch.no_grad():
        if hf_block is not None:  # the very same weights
            layer.gate.weight.copy_(hf_block.gate.weight)
            layer.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
            layer.experts.down_proj.copy_(hf_block.experts.down_proj)
        else:
            layer.gate.weight.normal_(0, 0.02)
    return layer


def graph_runner(layer, x):
    static_x = x.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
    return graph.replay, static_out, static_x


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--output", default="gpu/layer_h200.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_layer.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16
    repeats = 10 if args.quick else 30
    bandwidth = copy_bandwidth()  # bytes / ms
    rows = []
    progress = Progress(len(SHAPES) * len(TOKENS), "bench/gpu_layer")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        hf_block, config = build_hf_block(shape, dtype)
        layer = moe_infer_layer_for(shape, hf_block, dtype)
        expert_bytes = 3 * shape["hidden"] * shape["ffn"] * 2
        for num_tokens in TOKENS:
            x = torch.randn(num_tokens, shape["hidden"], device="cuda", dtype=dtype)
            with torch.no_grad():
                out = layer(x)
                _, _, ids = layer.route(x)
                active = int(torch.unique(ids).numel())
                expected = ref.layer_forward(layer, x[:256], compute_dtype=torch.float32)
                error = ((out[:256].float() - expected).norm() / expected.norm()).item()
                t = {"moe_infer": cuda_time(lambda layer=layer, x=x: layer(x), repeats)}
                replay, _, _ = graph_runner(layer, x)
                t["moe_infer graph"] = cuda_time(replay, repeats)
                hf_error = float("nan")
                if hf_block is not None:
                    x3 = x.view(1, num_tokens, -1)
                    for impl in ("eager", "grouped_mm"):
                        config._experts_implementation = impl
                        try:
                            hf_out = hf_block(x3).view(num_tokens, -1)
                            t[f"HF {impl}"] = cuda_time(lambda block=hf_block, x3=x3: block(x3), repeats)
                            if impl == "eager":
                                hf_error = ((out.float() - hf_out.float()).norm() / hf_out.float().norm()).item()
                        except Exception as error_hf:  # noqa: BLE001
                            print(f"[bench] HF {impl} failed: {error_hf}", file=sys.stderr)
                # Floors: dense GEMM with the same FLOPs; reading the active experts' weights once.
                flops = 2 * num_tokens * shape["top_k"] * 3 * shape["hidden"] * shape["ffn"]
                a = torch.randn(num_tokens * shape["top_k"], shape["hidden"], device="cuda", dtype=dtype)
                b = torch.randn(shape["hidden"], 3 * shape["ffn"], device="cuda", dtype=dtype)
                gemm_ms = cuda_time(lambda a=a, b=b: a @ b, repeats)
                read_ms = active * expert_bytes / bandwidth
            floor = max(gemm_ms, read_ms)
            best_ours = min(t["moe_infer"], t["moe_infer graph"])
            hf_times = [v for k, v in t.items() if k.startswith("HF")]
            rows.append(
                [
                    name,
                    num_tokens,
                    active,
                    f"{t['moe_infer']:.3f}",
                    f"{t['moe_infer graph']:.3f}",
                    f"{t.get('HF eager', float('nan')):.3f}",
                    f"{t.get('HF grouped_mm', float('nan')):.3f}",
                    f"{gemm_ms:.3f}",
                    f"{read_ms:.3f}",
                    f"{best_ours / floor:.2f}x",
                    f"{min(hf_times) / best_ours:.2f}x" if hf_times else "n/a",
                    f"{flops / best_ours / 1e9:.0f}",
                    f"{error:.1e}" + (f" / {hf_error:.1e}" if hf_block is not None else ""),
                ]
            )
            progress.step(f"{name} S={num_tokens}")
        hf_block = layer = None  # free the weights before the next shape
        torch.cuda.empty_cache()
    headers = [
        "shape",
        "S",
        "active E",
        "moe_infer ms",
        "+CUDA graph ms",
        "HF eager ms",
        "HF grouped_mm ms",
        "GEMM floor ms",
        "weight-read floor ms",
        "ours / floor",
        "best HF / ours",
        "TFLOP/s",
        "rel. err vs ref / vs HF",
    ]
    table = markdown_table(headers, rows)
    text = (
        f"# MoE layer on the GPU (bf16)\n\nMachine: {machine_description(torch.device('cuda'))}; "
        f"measured copy bandwidth {bandwidth / 1e9:.2f} TB/s (read + write)\n\n"
        "Median CUDA-event times. Floors measured in the same run: a dense GEMM of the same FLOPs, and reading the "
        "active experts' weights once at the copy bandwidth. 'ours / floor' uses the better of eager and CUDA-graph "
        "replay and the larger floor; 'best HF / ours' > 1 means moe_infer is faster than every HF implementation.\n\n"
        f"{table}\n"
    )
    print(text)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if os.environ.get("OUT"):
        shutil.copy(path, os.path.join(os.environ["OUT"], os.path.basename(path)))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
