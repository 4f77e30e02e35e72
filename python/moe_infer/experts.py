"""The experts of a MoE layer: one spec of their weights, one way to call them.

- :class:`ExpertSpec`: the stacked weights and biases of E expert FFNs, their layout and their
  activation, i.e. everything :func:`moe_infer.ops.grouped_mlp` reads. :func:`expert_spec` reads
  it off any supported experts module (moe_infer's :class:`MoEExperts`, a transformers v5 experts
  module, GPT-OSS's).
- :class:`ExpertsBackend`: where the experts run, called the same way by :class:`moe_infer.MoELayer`,
  the transformers blocks and the fairseq layer:
  ``backend.run(hidden [S, H], topk_weights [S, k], topk_ids [S, k]) -> [S, H]`` (id -1: the pair is
  not routed). :class:`LocalExperts` computes on this device with the fused ops;
  :class:`moe_infer.buffer.ExpertBuffer` keeps the experts off the device behind a slot pool;
  :class:`moe_infer.distributed.ExpertParallelExperts` spreads them over a process group.
  A layer holds one backend and never looks at which one it is.
- :class:`MoEExperts`: moe_infer's experts module (parameters laid out as transformers v5).
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import host_memory, ops

# Activation modules of torch and transformers (by class name) -> the element function they compute
# (a unary of the activation table, ops.ACTIVATION_TABLE).
_MODULE_UNARY = {
    "ReLU": "relu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
}


def module_activation(act: Optional[nn.Module], gated: bool) -> Optional[str]:
    """The table activation an activation module computes: its element function, or with ``gated``
    the gated activation ``unary(gate) * up`` (transformers' ``hidden_act`` "silu" -> "silu_glu",
    "gelu" -> "gelu_glu", "gelu_pytorch_tanh" / "gelu_new" -> "gelu_tanh_glu", "relu" -> "relu_glu").
    None when the table has no such activation."""
    unary = _MODULE_UNARY.get(type(act).__name__)
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        unary = "gelu_tanh"
    if unary is None:
        return None
    return ops.gated_activation(unary) if gated else unary


def activation_of(act: Optional[nn.Module], gated: bool, owner: str) -> str:
    """:func:`module_activation`, or NotImplementedError naming ``owner`` and what is supported."""
    activation = module_activation(act, gated)
    if activation is None:
        supported = sorted({a.unary for a in ops.ACTIVATION_TABLE.values() if a.gated == gated and not a.swiglu_params})
        raise NotImplementedError(
            f"moe_infer: {owner} uses the {'gated ' if gated else ''}activation {type(act).__name__}; "
            f"grouped_mlp supports {', '.join(supported)} there"
        )
    return activation


# ---- the spec ---------------------------------------------------------------------------------


class ExpertSpec(NamedTuple):
    """E expert FFNs as grouped_mlp reads them (views of a module's own parameters, no copy).

    fc1_weight: [E, F1, H], or [E, H, F1] when ``weights_transposed`` (F1 = 2*I for gated activations)
    fc1_bias:   [E, F1] or None
    fc2_weight: [E, H, I], or [E, I, H] when ``weights_transposed``
    fc2_bias:   [E, H] or None
    activation: a name of :data:`moe_infer.ops.ACTIVATIONS`; swiglu_alpha / swiglu_limit: GPT-OSS's.
    """

    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]
    activation: str
    weights_transposed: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def num_experts(self) -> int:
        return self.fc1_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.fc1_weight.shape[1 if self.weights_transposed else 2]

    @property
    def ffn_size(self) -> int:
        return self.fc2_weight.shape[1 if self.weights_transposed else 2]

    @property
    def options(self) -> tuple:
        """(activation, weights_transposed, swiglu_alpha, swiglu_limit): the ops' trailing arguments."""
        return self.activation, self.weights_transposed, self.swiglu_alpha, self.swiglu_limit

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        """{"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"} (biases may be None)."""
        return {
            "fc1_weight": self.fc1_weight,
            "fc1_bias": self.fc1_bias,
            "fc2_weight": self.fc2_weight,
            "fc2_bias": self.fc2_bias,
        }


def expert_spec(experts: nn.Module, activation: Optional[str] = None) -> ExpertSpec:
    """The :class:`ExpertSpec` of an experts module: :class:`MoEExperts` (and subclasses such as
    the fairseq experts), or a transformers v5 stacked experts module (3-D ``gate_up_proj`` /
    ``up_proj`` and ``down_proj``, optional biases, transposed or not, gated by one of the table's
    element functions, or GPT-OSS's clamped interleaved swiGLU).

    Raises NotImplementedError (naming the module and the reason) for what grouped_mlp does not
    compute: another activation, a custom gate, a norm after each expert, per-expert modules.
    ``activation`` overrides the activation read from the module.
    """
    if isinstance(experts, MoEExperts):
        return experts.spec if activation is None else experts.spec._replace(activation=activation)
    owner = type(experts).__name__
    fc1_name, fc1_bias_name, fc2_name, fc2_bias_name = tensor_names(experts)
    fc1, fc2 = getattr(experts, fc1_name, None), getattr(experts, fc2_name, None)
    if not isinstance(fc1, torch.Tensor) or not isinstance(fc2, torch.Tensor) or fc1.dim() != 3 or fc2.dim() != 3:
        raise NotImplementedError(
            f"moe_infer: {owner} is not a stacked experts module (expected 3-D gate_up_proj/up_proj and down_proj "
            "parameters: moe_infer.MoEExperts or a transformers v5 experts module)"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError(f"moe_infer: {owner} normalizes each expert's output, which grouped_mlp does not do")
    fc1_bias = getattr(experts, fc1_bias_name) if fc1_bias_name else None
    fc2_bias = getattr(experts, fc2_bias_name) if fc2_bias_name else None
    transposed = bool(getattr(experts, "is_transposed", False))
    if _is_gpt_oss(experts):
        return ExpertSpec(
            fc1, fc1_bias, fc2, fc2_bias, activation or "gpt_oss_swiglu", True, experts.alpha, experts.limit
        )
    gated = fc1_name == "gate_up_proj"
    if gated and (not getattr(experts, "is_concatenated", True) or not _default_gate(experts)):
        raise NotImplementedError(f"moe_infer: {owner} has a custom _apply_gate, which grouped_mlp does not compute")
    activation = activation or activation_of(getattr(experts, "act_fn", None), gated, owner)
    return ExpertSpec(fc1, fc1_bias, fc2, fc2_bias, activation, transposed)


def tensor_names(experts: nn.Module) -> tuple[str, Optional[str], str, Optional[str]]:
    """The attributes of a stacked experts module that :func:`expert_spec` reads its fc1 weight,
    fc1 bias, fc2 weight and fc2 bias from (None: no bias), whether they are parameters or computed
    on each read (torch.nn.utils.parametrize)."""
    if isinstance(experts, MoEExperts):  # each bias on its own
        fc1_name = "gate_up_proj"
        biases = [experts.gate_up_proj_bias is not None, experts.down_proj_bias is not None]
    else:  # transformers' experts: both biases or neither (has_bias)
        fc1_name = "gate_up_proj" if getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")) else "up_proj"
        biases = [getattr(experts, "has_bias", getattr(experts, fc1_name + "_bias", None) is not None)] * 2
    return (
        fc1_name,
        fc1_name + "_bias" if biases[0] else None,
        "down_proj",
        "down_proj_bias" if biases[1] else None,
    )


def _is_gpt_oss(experts: nn.Module) -> bool:
    # Class name and attributes rather than the gate function's __qualname__, which torch.compile cannot trace.
    return (
        type(experts).__name__ == "GptOssExperts"
        and not getattr(experts, "is_concatenated", True)
        and hasattr(experts, "alpha")
        and hasattr(experts, "limit")
    )


# transformers' default gate (act_fn(gate) * up), found once: compared by identity, which
# torch.compile traces (a function's __qualname__ it does not).
_DEFAULT_GATES: list = []


def _default_gate(experts: nn.Module) -> bool:
    """Whether a transformers experts module gates with transformers' default act_fn(gate) * up."""
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is None:
        return True
    if not _DEFAULT_GATES:
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:
            return False
        _DEFAULT_GATES.append(_default_apply_gate)
    return any(apply_gate is gate for gate in _DEFAULT_GATES)


# ---- moe_infer's experts module ---------------------------------------------------------------


class MoEExperts(nn.Module):
    """E expert FFNs as stacked 3-D parameters, computed with :func:`moe_infer.ops.grouped_mlp`.

    Shapes (``weights_transposed=False``, transformers' default):
        gate_up_proj [E, F1, H], down_proj [E, H, I], gate_up_proj_bias [E, F1], down_proj_bias [E, H]
    with F1 = 2*I for gated activations (``ops.ACTIVATION_TABLE[name].gated``), else I. With
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
        fc1_outputs = 2 * ffn_size if ops.ACTIVATION_TABLE[activation].gated else ffn_size
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
        # On the CPU the weights take 2 MiB pages (moe_infer.host_memory: decode streams them);
        # before they are written, the move copies untouched pages only.
        host_memory.to_huge_pages(self, recurse=False)
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

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .float() / .cpu() allocate new weights: back onto 2 MiB pages on the CPU.
        module = super()._apply(fn, recurse)
        host_memory.to_huge_pages(self, recurse=False)
        return module

    @property
    def spec(self) -> ExpertSpec:
        """The module's own parameters as an :class:`ExpertSpec` (no copy)."""
        return parameters_spec(self)

    def expert_spec(self) -> ExpertSpec:
        return self.spec

    def forward_tokens(self, hidden: torch.Tensor, topk_weights: torch.Tensor, plan: ops.DispatchPlan) -> torch.Tensor:
        """hidden [S, H] in token order, topk_weights [S, k], plan of the [S, k] expert ids -> [S, H]:
        every token's weighted expert outputs, summed (:func:`moe_infer.ops.grouped_mlp_combine`:
        no [S*k, H] buffers on the CPU)."""
        return ops.grouped_mlp_combine(hidden, topk_weights, plan, self.spec)

    def forward(self, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """rows [N, H] grouped by expert, expert_offsets [E+1] int32 -> [N, H]."""
        return ops.grouped_mlp(rows, expert_offsets, self.spec)


def check_layer_input(owner: str, hidden: torch.Tensor, hidden_size: int, weights_dtype: torch.dtype) -> None:
    """A layer's input [..., hidden_size] in the layer's dtype: ValueError / TypeError naming
    ``owner`` and the fix otherwise."""
    if hidden.dim() == 0 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"{owner}: the input's last dimension must be {hidden_size}, got shape {tuple(hidden.shape)}")
    if hidden.dtype != weights_dtype:
        raise TypeError(
            f"{owner}: the input is {hidden.dtype} but the layer's weights are {weights_dtype}; "
            f"convert one of them (input.to({weights_dtype}) or layer.to({hidden.dtype}))"
        )


def parameter_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name)`` for a parameter, read from ``module._parameters`` where it is: the
    forward of a decode step starts cold in the caches, and nn.Module.__getattr__ (after the
    failed ordinary lookup) costs tens of microseconds there. A parametrized or pruned weight, which
    is not in ``_parameters``, is read the usual way."""
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def parameters_spec(module: nn.Module) -> ExpertSpec:
    """The :class:`ExpertSpec` of a module laid out as :class:`MoEExperts` (``gate_up_proj``,
    ``gate_up_proj_bias``, ``down_proj``, ``down_proj_bias``, ``activation``, ``weights_transposed``,
    ``swiglu_alpha``, ``swiglu_limit``), e.g. the expert-parallel experts' local slots."""
    return ExpertSpec(
        module.gate_up_proj,
        module.gate_up_proj_bias,
        module.down_proj,
        module.down_proj_bias,
        module.activation,
        module.weights_transposed,
        module.swiglu_alpha,
        module.swiglu_limit,
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


# ---- the execution protocol -------------------------------------------------------------------


class ExpertsBackend:
    """Where a layer's experts run. Every layer and integration calls its backend the same way:

    ``run(hidden [S, H], topk_weights [S, k], topk_ids [S, k] int32/int64) -> [S, H]``: each token's
    expert outputs weighted and summed (float32 accumulation); ids of -1 are unrouted pairs and
    contribute nothing. Static (capacity) gating calls ``run_capacity`` with each pair's slot in its
    expert's buffer; pairs outside [0, capacity) are dropped. ``agree_capacity`` is where ranks
    agree on one capacity (the largest) when the experts are spread over a group.

    Attributes:
        inference_only: the backend computes outside autograd: a call autograd would record is
            refused (refuse_gradients), and so is a fairseq layer in training mode.
        collective: every rank must call it, even one without tokens.
    """

    inference_only = False
    collective = False

    def refuse_gradients(self, hidden: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """RuntimeError where autograd would record a call of an inference-only backend: it computes
        outside autograd's view (slots overwritten within a batch, all-to-alls), so gradients
        through it would be wrong. No error under torch.no_grad() / inference_mode, or for inputs
        that need no gradient."""
        if self.inference_only and torch.is_grad_enabled() and (hidden.requires_grad or topk_weights.requires_grad):
            raise RuntimeError(
                f"{type(self).__name__} is inference-only (gradients through it would be wrong): call the layer "
                "under torch.no_grad() or torch.inference_mode()"
            )

    def run(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_capacity(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        locations: torch.Tensor,
        capacity: int,
    ) -> torch.Tensor:
        kept = (locations >= 0) & (locations < capacity)
        return self.run(hidden, topk_weights, topk_ids.masked_fill(~kept, -1))

    def agree_capacity(self, capacity: int) -> int:
        return capacity


def run_local(
    spec: ExpertSpec, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The experts of ``spec`` on hidden's device: dispatch_plan, then grouped_mlp_combine (the
    gather and the weighted combine fused into the expert compute, no [S*k, H] buffer)."""
    # Ids come from a router (in range) or are -1: the device-side id check is not needed.
    plan = ops.dispatch_plan(topk_ids, spec.num_experts, validate=False)
    if topk_weights.dtype not in (torch.float32, hidden.dtype):
        topk_weights = topk_weights.float()
    return ops.grouped_mlp_combine(hidden, topk_weights, plan, spec)


class LocalExperts(ExpertsBackend):
    """Every expert on this device, computed with the fused ops.

    Args:
        source: what holds the weights, asked for its :class:`ExpertSpec` on every call (its
            parameters may be replaced): a :class:`MoEExperts`, or any object with ``expert_spec()``.
        row_transform: applied to the expert output rows [N, H] (e.g. fairseq's per-slot token
            dropout in training); the rows are then materialized (permute -> grouped_mlp ->
            unpermute_combine) instead of fused.
    """

    def __init__(self, source, row_transform=None):
        self.source = source
        self.row_transform = row_transform

    def run(self, hidden, topk_weights, topk_ids):
        spec = self.source.expert_spec()
        if self.row_transform is None:
            return run_local(spec, hidden, topk_weights, topk_ids)
        plan = ops.dispatch_plan(topk_ids, spec.num_experts, validate=False)
        rows = ops.permute(hidden, plan.sorted_pair_ids, topk_ids.shape[1])
        expert_rows = self.row_transform(ops.grouped_mlp(rows, plan.expert_offsets, spec))
        return ops.unpermute_combine(expert_rows, topk_weights, plan.row_of_pair)

    def run_capacity(self, hidden, topk_weights, topk_ids, locations, capacity):
        """fairseq's dense static path: every expert computes its ``capacity`` rows, placeholders
        included (the baseline's cost), through the [S, E, C] routing tensors."""
        spec = self.source.expert_spec()
        num_experts, hidden_size = spec.num_experts, hidden.shape[1]
        combine_weights, dispatch_mask = ops.static_routing_tensors(
            topk_ids, locations, topk_weights, num_experts, capacity
        )
        rows = ops.static_dispatch(hidden, dispatch_mask).view(num_experts * capacity, hidden_size)
        # Expert e owns rows [e * C, (e + 1) * C).
        offsets = torch.arange(0, (num_experts + 1) * capacity, capacity, dtype=torch.int32, device=hidden.device)
        expert_rows = ops.grouped_mlp(rows, offsets, spec)
        if self.row_transform is not None:
            expert_rows = self.row_transform(expert_rows)
        return ops.static_combine(expert_rows.view(num_experts, capacity, hidden_size), combine_weights)


class ModuleSpec:
    """The spec of an experts module read on each call (its parameters may be replaced), with the
    layout and activation found once, when it is built (NotImplementedError if unsupported)."""

    def __init__(self, experts: nn.Module):
        spec = expert_spec(experts)
        self.experts = experts
        self._names = tensor_names(experts)
        self._options = spec.options

    def expert_spec(self) -> ExpertSpec:
        tensors = [parameter_of(self.experts, name) if name is not None else None for name in self._names]
        return ExpertSpec(*tensors, *self._options)
