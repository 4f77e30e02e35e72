"""Expert modules: moe_infer's stacked experts, and how transformers' experts modules are recognised."""

import math
from typing import Optional

import torch
from torch import nn

from . import ops

_GATED = ("silu_glu", "gpt_oss_swiglu")


class MoEExperts(nn.Module):
    """E expert FFNs as stacked 3-D parameters, computed with :func:`moe_infer.ops.grouped_mlp`.

    Shapes (``weights_transposed=False``, transformers' default):
        gate_up_proj [E, F1, H], down_proj [E, H, I], gate_up_proj_bias [E, F1], down_proj_bias [E, H]
    with F1 = 2*I for gated activations ("silu_glu", "gpt_oss_swiglu"), else I. With
    ``weights_transposed=True`` (GPT-OSS layout): gate_up_proj [E, H, F1], down_proj [E, I, H].
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        activation: str = "silu_glu",
        bias: bool = False,
        weights_transposed: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"MoEExperts: activation must be one of {ops.ACTIVATIONS}, got '{activation}'")
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size), ("ffn_size", ffn_size)):
            if value < 1:
                raise ValueError(f"MoEExperts: {name} ({value}) must be >= 1")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.activation = activation
        self.weights_transposed = weights_transposed
        self.swiglu_alpha = swiglu_alpha
        self.swiglu_limit = swiglu_limit
        fc1_outputs = 2 * ffn_size if activation in _GATED else ffn_size
        factory = {"dtype": dtype, "device": device}
        fc1_shape = (
            (num_experts, hidden_size, fc1_outputs) if weights_transposed else (num_experts, fc1_outputs, hidden_size)
        )
        fc2_shape = (num_experts, ffn_size, hidden_size) if weights_transposed else (num_experts, hidden_size, ffn_size)
        self.gate_up_proj = nn.Parameter(torch.empty(fc1_shape, **factory))
        self.down_proj = nn.Parameter(torch.empty(fc2_shape, **factory))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, fc1_outputs, **factory))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation, per expert.
        for weight, fan_in, bias in (
            (self.gate_up_proj, self.hidden_size, self.gate_up_proj_bias),
            (self.down_proj, self.ffn_size, self.down_proj_bias),
        ):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward_tokens(self, hidden: torch.Tensor, topk_weights: torch.Tensor, plan: ops.DispatchPlan) -> torch.Tensor:
        """hidden [S, H] in token order, topk_weights [S, k], plan of the [S, k] expert ids -> [S, H]:
        every token's weighted expert outputs, summed (:func:`moe_infer.ops.grouped_mlp_combine`:
        no [S*k, H] buffers on the CPU)."""
        return ops.grouped_mlp_combine(
            hidden,
            topk_weights,
            plan,
            self.gate_up_proj,
            self.gate_up_proj_bias,
            self.down_proj,
            self.down_proj_bias,
            self.activation,
            self.weights_transposed,
            self.swiglu_alpha,
            self.swiglu_limit,
        )

    def forward(self, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """rows [N, H] grouped by expert, expert_offsets [E+1] int32 -> [N, H]."""
        return ops.grouped_mlp(
            rows,
            expert_offsets,
            self.gate_up_proj,
            self.gate_up_proj_bias,
            self.down_proj,
            self.down_proj_bias,
            self.activation,
            self.weights_transposed,
            self.swiglu_alpha,
            self.swiglu_limit,
        )


def is_transformers_experts(module: torch.nn.Module) -> bool:
    """A transformers v5 experts module: called as experts(hidden, top_k_index, top_k_weights)."""
    down = getattr(module, "down_proj", None)
    return (
        type(module).__name__.endswith("Experts")
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
        and not hasattr(module, "weights_transposed")  # moe_infer.MoEExperts is called differently
    )
