"""Writes the input, weights and Python output of one MoE layer for examples/cpp/moe_layer.cpp.

python examples/cpp/make_case.py CASE.pt
"""

import sys

import torch

import moe_infer


def main(path: str) -> None:
    torch.manual_seed(0)
    layer = moe_infer.MoELayer(hidden_size=64, ffn_size=128, num_experts=8, top_k=2, renormalize=True)
    hidden = torch.randn(37, 64)
    with torch.no_grad():
        expected = layer(hidden)
        torch.testing.assert_close(expected, moe_infer.reference.layer_forward(layer, hidden), rtol=1e-5, atol=1e-5)
    case = {
        "hidden": hidden,
        "router_weight": layer.gate.weight.detach(),
        "gate_up_proj": layer.experts.gate_up_proj.detach(),
        "down_proj": layer.experts.down_proj.detach(),
        "top_k": layer.top_k,
        "expected": expected,
    }
    torch.save(case, path)
    print(f"make_case: wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
