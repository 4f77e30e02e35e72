"""MoELayer against the plain-PyTorch reference loop, and against its own expert GEMMs alone.

For each shape and token count S: build the layer with seeded weights, check that moe_infer and
the reference agree, then time (interleaved, median) the whole moe_infer layer, the reference
layer, and the expert GEMMs alone (fc1 and fc2 of each non-empty expert on the same token counts,
into preallocated buffers). Prints a table and writes bench/results/layer_<device>.md.

    python bench/layer.py [--device cpu|cuda] [--quick] [--dtype float32|bfloat16]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_infer  # noqa: E402
from common import Progress, machine_description, markdown_table, time_interleaved, write_result  # noqa: E402
from moe_infer import ops  # noqa: E402
from moe_infer import reference as ref  # noqa: E402

SHAPES = {
    # name: (hidden, ffn, experts, top_k, activation)
    "mixtral-like": (1024, 3584, 8, 2, "silu_glu"),
    "many-expert": (512, 1024, 64, 2, "silu_glu"),
}
TOKENS = [1, 32, 512, 4096]


def build_layer(shape, device, dtype):
    hidden, ffn, experts, top_k, activation = SHAPES[shape]
    torch.manual_seed(0)
    layer = moe_infer.MoELayer(hidden, ffn, experts, top_k, activation=activation, renormalize=True, device=device)
    return layer.to(dtype).eval()


def expert_gemms_fn(layer, x):
    """The two GEMMs of every non-empty expert on the layer's own routing, nothing else."""
    with torch.no_grad():
        _, weights, ids = layer.route(x)
        plan = ops.dispatch_plan(ids, layer.num_experts)
        rows = ops.permute(x, plan.sorted_pair_ids, layer.top_k)
    bounds = plan.expert_offsets.tolist()
    experts = layer.experts
    fc1_width = experts.gate_up_proj.shape[1]
    fc1_out = torch.empty(rows.shape[0], fc1_width, dtype=x.dtype, device=x.device)
    act = torch.randn(rows.shape[0], experts.ffn_size, dtype=x.dtype, device=x.device)
    out = torch.empty_like(rows)
    segments = [(e, bounds[e], bounds[e + 1]) for e in range(layer.num_experts) if bounds[e + 1] > bounds[e]]

    def run():
        for e, begin, end in segments:
            torch.mm(rows[begin:end], experts.gate_up_proj[e].t(), out=fc1_out[begin:end])
            torch.mm(act[begin:end], experts.down_proj[e].t(), out=out[begin:end])

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, S up to 512")
    parser.add_argument("--output", default=None, help="results file name under bench/results/")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokens = [s for s in TOKENS if not args.quick or s <= 512]
    cases = [(shape, s) for shape in SHAPES for s in tokens]
    progress = Progress(len(cases), "bench/layer")
    rows = []
    worst_error = 0.0
    for shape, num_tokens in cases:
        layer = build_layer(shape, device, dtype)
        x = torch.randn(num_tokens, layer.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            out = layer(x)
            expected = ref.layer_forward(layer, x, compute_dtype=torch.float64)
        error = ((out.double() - expected).norm() / expected.norm()).item()
        worst_error = max(worst_error, error)
        limit = 1e-5 if dtype == torch.float32 else 2e-2
        if not error < limit:
            raise SystemExit(
                f"moe_infer and the reference disagree on {shape} S={num_tokens}: relative error {error:.2e}"
            )
        repeats = 3 if args.quick else (10 if num_tokens <= 32 else 5)
        with torch.inference_mode():
            times = time_interleaved(
                {
                    "moe_infer": lambda layer=layer, x=x: layer(x),
                    "reference": lambda layer=layer, x=x: ref.layer_forward(layer, x),
                    "gemms": expert_gemms_fn(layer, x),
                },
                device,
                repeats,
                min_seconds=0.3,
            )
        hidden, ffn, experts, top_k, _ = SHAPES[shape]
        rows.append(
            [
                shape,
                num_tokens,
                f"{times['moe_infer'] * 1e3:.3f}",
                f"{times['reference'] * 1e3:.3f}",
                f"{times['gemms'] * 1e3:.3f}",
                f"{times['reference'] / times['moe_infer']:.2f}x",
                f"{times['moe_infer'] / times['gemms']:.2f}x",
                f"{num_tokens / times['moe_infer']:.0f}",
                f"{error:.1e}",
            ]
        )
        progress.step(f"{shape} S={num_tokens}")
    headers = [
        "shape",
        "S",
        "moe_infer ms",
        "reference ms",
        "expert GEMMs ms",
        "speedup vs ref",
        "layer / GEMMs",
        "tokens/s",
        "rel. error",
    ]
    table = markdown_table(headers, rows)
    shapes = "; ".join(f"{k}: H={v[0]}, ffn={v[1]}, E={v[2]}, k={v[3]}, {v[4]}" for k, v in SHAPES.items())
    text = (
        f"# MoELayer vs reference ({args.device}, {args.dtype})\n\n"
        f"Machine: {machine_description(device)}\n\nShapes: {shapes}\n\n"
        f"Median of interleaved runs. 'speedup vs ref' = reference / moe_infer; "
        f"'layer / GEMMs' = moe_infer layer / its expert GEMMs alone.\n\n{table}\n"
    )
    print(text)
    name = (
        args.output
        or f"layer_{device.type}{'_quick' if args.quick else ''}{'' if dtype == torch.float32 else '_' + args.dtype}.md"
    )
    print(
        f"written: {write_result(name, text)}; outputs agree with the reference (worst relative error {worst_error:.1e})"
    )


if __name__ == "__main__":
    main()
