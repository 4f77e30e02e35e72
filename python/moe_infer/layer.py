"""MoELayer: a capacity-free (dynamic gating) Mixture-of-Experts layer over the moe_infer ops.

Parameters are laid out like transformers v5 (``gate.weight`` [E, H], ``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I]), so HF state dicts map onto it by name.
"""

from typing import Optional

import torch
from torch import nn

from . import ops
from .buffer import ExpertBuffer, attach_expert_buffer
from .experts import ExpertsBackend, LocalExperts, MoEExperts, check_layer_input


class MoELayer(nn.Module):
    """A dropless top-k MoE layer: gating, counting-sort dispatch, grouped experts, weighted combine.

    Args:
        hidden_size, ffn_size, num_experts, top_k: H, I, E, k.
        activation: see :data:`moe_infer.ops.ACTIVATIONS` (default SiLU-GLU, as Mixtral/Qwen/OLMoE).
        scoring, renormalize, scaling_factor, n_group, topk_group: routing, as
            :func:`moe_infer.ops.topk_gating`.
        selection_bias: keep a [E] ``selection_bias`` buffer (DeepSeek-V3's score correction).
        router_bias, expert_bias: biases on the router and on both expert projections.
        weights_transposed: store experts as [E, H, F1] / [E, I, H] (GPT-OSS layout).
        validate: check router logits for NaN/inf (on CUDA on the device, without a host sync: the
            error is raised by a later call, see :func:`moe_infer.ops.check_device_errors`).
        expert_buffer: keep the experts off the compute device (host memory, or ``expert_store``)
            with a pool of this many expert slots on ``device`` (expert buffering, see
            :mod:`moe_infer.buffer`); None = every expert resident (the default).
        buffer_policy: the buffer's eviction policy ("paper", "fifo", "lru", "lfu").
        expert_store: where a buffered layer's experts live (e.g.
            ``ExpertStore.from_safetensors(path, prefix)``); default: its own weights, in host memory.

    forward(hidden [..., H]) -> [..., H] in hidden's dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int,
        activation: str = "silu_glu",
        scoring: str = "softmax",
        renormalize: bool = False,
        scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        selection_bias: bool = False,
        router_bias: bool = False,
        expert_bias: bool = False,
        weights_transposed: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        validate: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        expert_buffer: Optional[int] = None,
        buffer_policy: str = "paper",
        expert_store=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoELayer: top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"MoELayer: dtype must be float32, bfloat16 or float16 (the ops' types), got {dtype}")
        if scoring not in ops.SCORINGS:
            raise ValueError(f"MoELayer: scoring must be one of {ops.SCORINGS}, got '{scoring}'")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.activation = activation
        self.scoring = scoring
        self.renormalize = renormalize
        self.scaling_factor = scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.swiglu_alpha = swiglu_alpha
        self.swiglu_limit = swiglu_limit
        self.validate = validate
        factory = {"dtype": dtype, "device": device}
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias, **factory)
        self.experts = MoEExperts(
            num_experts,
            hidden_size,
            ffn_size,
            activation,
            expert_bias,
            weights_transposed,
            swiglu_alpha,
            swiglu_limit,
            dtype=dtype,
            # A buffered layer's experts live on the host (or nowhere yet, when a store brings them).
            device=device if expert_buffer is None else ("meta" if expert_store is not None else "cpu"),
        )
        # Where the experts run (moe_infer.experts.ExpertsBackend): here, or through an expert buffer.
        self.experts_backend: ExpertsBackend = LocalExperts(self.experts)
        if expert_store is not None and expert_store.dtype != self.gate.weight.dtype:
            raise ValueError(
                f"MoELayer: the expert store holds {expert_store.dtype} weights but the layer is "
                f"{self.gate.weight.dtype}; pass dtype={expert_store.dtype}"
            )
        if expert_buffer is not None:
            self.experts_backend = attach_expert_buffer(
                self.experts, expert_buffer, buffer_policy, expert_store, device or torch.device("cpu")
            )
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.selection_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [S, H] -> (router_logits [S, E], topk_weights [S, k] float32, expert_ids [S, k] int32)."""
        router_logits = self.gate(x)
        weights, ids = ops.topk_gating(
            router_logits,
            self.top_k,
            self.scoring,
            self.renormalize,
            self.selection_bias,
            self.scaling_factor,
            self.n_group,
            self.topk_group,
            self.validate,
        )
        return router_logits, weights, ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        check_layer_input("MoELayer", hidden, self.hidden_size, self.gate.weight.dtype)
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size)
        _, weights, ids = self.route(x)
        return self.experts_backend.run(x, weights, ids).view(shape)

    @property
    def expert_buffer(self):
        """The :class:`moe_infer.buffer.ExpertBuffer` a buffered layer runs its experts through,
        else None. (The layer runs the buffer it was built with, ``expert_buffer=N``; to buffer
        an existing layer: ``layer.experts_backend = attach_expert_buffer(layer.experts, N)``.)"""
        backend = self.experts_backend
        return backend if isinstance(backend, ExpertBuffer) else None

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_size={self.experts.ffn_size}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, scoring={self.scoring}"
        )
