"""fairseq-compatible MoE layer: ``Top1Gate``, ``Top2Gate`` and ``MOELayer`` over the moe_infer ops.

The classes take fairseq's constructor arguments (``fairseq/modules/moe/{top1gate,top2gate,
moe_layer}.py``, branch ``moe``), have its parameter names (``gate.wg.weight``,
``experts.{i}.fc1.weight`` / ``.bias``, ``experts.{i}.fc2.weight`` / ``.bias``) and its forward
contract, so a fairseq MoE layer's state dict loads unchanged and :func:`convert_fairseq_moe`
swaps the MoE layers of a fairseq model in place.

``MOELayer(..., gating=...)``:

- ``"dynamic"`` (the default): capacity-free. Each token goes to its chosen experts (fairseq's
  choices: the same first expert, second-expert policy, padding mask and weights), through
  ``dispatch_plan`` / ``permute`` / ``grouped_mlp`` / ``unpermute_combine``: no capacity, no
  dropped tokens, no placeholder rows.
- ``"static"``: fairseq's computation: capacity from the training formula or the eval token
  fraction, [S, E, C] combine weights and dispatch mask, dispatch into an [E, C, M] buffer,
  ``grouped_mlp`` over all E * C rows (placeholders included), combine back.

The one intended difference: dynamic gating never drops a token. Where static gating drops a
(token, expert) pair for lack of capacity, static mode gives that pair no output (a token that
loses both experts gets a zero MoE output, one that loses its second expert gets weight 1 on its
first), while dynamic mode computes it. Everywhere static gating drops nothing the two modes give
the same output, l_aux and metadata (except ``overflow_*`` and ``capacity``); so the capacity
settings (``capacity_factor``, ``moe_eval_capacity_token_fraction``, ``batch_prioritized_routing``,
which only decides who is dropped) have no effect in dynamic mode.

Other differences from fairseq, all deliberate: the routing math is always float32 (as fairseq's
``use_fp32=True``; ``use_fp32`` is accepted and changes nothing); the ``sampling`` and ``random``
policies draw from the gate's ``generator`` (default: the global one, drawn exactly as fairseq
does, so a seed reproduces fairseq's choices); batch-prioritised routing breaks ties between equal
gates by position (fairseq's argsort is unstable); experts' dropout is not applied (this is an
inference layer).

Beyond fairseq: ``expert_buffer=N`` keeps the experts in host memory (or a safetensors file) with
an N-slot pool on the compute device (moe_infer.buffer); and with an expert group of R > 1 ranks,
each rank holds its E / R local experts (as fairseq's per-rank shards) and the layer exchanges
tokens over torch.distributed (moe_infer.distributed): static gating with fairseq's equal-size
all-to-all of E * C rows (the capacity agreed across ranks), dynamic gating with the counts
all-to-all and the variable-size all-to-all of exactly the routed rows. Both are inference-only.
"""

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..buffer import attach_expert_buffer
from ..distributed import ExpertParallelExperts
from ..experts import ExpertsBackend, LocalExperts, MoEExperts, check_layer_input

__all__ = ["FairseqExperts", "MOELayer", "Top1Gate", "Top2Gate", "convert_fairseq_moe", "gate_from_fairseq"]

# fairseq's activation_fn names -> grouped_mlp's.
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}
GATINGS = ("dynamic", "static")
# logging, as fairseq: the share of experts in the balance_top / balance_bottom metadata
_SAMPLE_FRACTION = 0.2


def _grouped_mlp_activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"moe_infer.fairseq: activation_fn '{name}' is not supported; expected one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]


# ---- gates ----------------------------------------------------------------------------------


class _GShardGate(nn.Module):
    """fairseq's top-1 / top-2 gate: router ``wg`` [E, M] (no bias) and capacity-based routing."""

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        top_k: int,
        use_fp32: bool,
        capacity_factor: float,
        moe_eval_capacity_token_fraction: float,
        *,
        second_expert_policy: str = "all",
        normalize_gate_prob_before_dropping: bool = False,
        batch_prioritized_routing: bool = False,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        if num_experts < top_k:
            raise ValueError(f"{name}: num_experts ({num_experts}) must be >= {top_k}")
        if second_expert_policy not in ops.SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"{name}: second_expert_policy must be one of {ops.SECOND_EXPERT_POLICIES}, got '{second_expert_policy}'"
            )
        self.wg = nn.Linear(model_dim, num_experts, bias=False, device=device, dtype=dtype)
        self.top_k = top_k
        self.use_fp32 = use_fp32
        self.capacity_factor = capacity_factor
        self.moe_eval_capacity_token_fraction = moe_eval_capacity_token_fraction
        self.second_expert_policy = second_expert_policy
        self.normalize_gate_prob_before_dropping = normalize_gate_prob_before_dropping
        self.batch_prioritized_routing = batch_prioritized_routing
        self.generator = generator

    @property
    def num_experts(self) -> int:
        return self.wg.weight.shape[0]

    @property
    def model_dim(self) -> int:
        return self.wg.weight.shape[1]

    def capacity(self, num_tokens: int, moe_eval_capacity_length: Optional[int] = None) -> int:
        """Slots per expert for a batch of ``num_tokens`` tokens (padding included), as fairseq."""
        return ops.static_capacity(
            num_tokens,
            self.num_experts,
            self.top_k,
            self.capacity_factor,
            self.moe_eval_capacity_token_fraction,
            eval_mode=not self.training,
            eval_capacity_length=moe_eval_capacity_length,
        )

    def route(
        self, input: torch.Tensor, mask: Optional[torch.Tensor] = None, capacity: Optional[int] = None
    ) -> tuple[torch.Tensor, ops.StaticRouting]:
        """input [S, M], mask [S] (True: padding) -> (router_logits [S, E], per-pair routing).

        ``capacity`` defaults to :meth:`capacity`; a capacity >= S drops nothing.
        """
        logits = self.wg(input)
        if capacity is None:
            capacity = self.capacity(input.shape[0])
        policy = self.second_expert_policy if self.top_k == 2 else "all"
        noise = ops.second_expert_noise(policy, logits, self.generator)
        routing = ops.static_gating(
            logits,
            self.top_k,
            capacity,
            None if mask is None else mask.bool(),
            policy,
            noise,
            self.normalize_gate_prob_before_dropping,
            self.batch_prioritized_routing,
        )
        return logits, routing

    def routing_metadata(self, router_logits: torch.Tensor, routing: ops.StaticRouting, capacity: int) -> dict:
        """fairseq's gate metadata (0-d tensors), plus ``capacity`` and ``placeholder_fraction``."""
        num_tokens, num_experts = router_logits.shape
        probs = torch.softmax(router_logits.detach().float(), dim=-1)
        log_probs = torch.log(probs.clamp(min=torch.finfo(probs.dtype).eps))
        metadata: dict[str, Any] = {"entropy_gating": -(probs * log_probs).sum(-1).mean()}
        sample_count = max(math.ceil(num_experts * _SAMPLE_FRACTION), 1)
        locations = routing.locations.detach()
        for j in range(self.top_k):
            routed = locations[:, j] >= 0
            dropped = routed & (locations[:, j] >= capacity)
            metadata[f"overflow_expert{j + 1}"] = 100 * dropped.sum() / routed.sum()
            chosen = routing.expert_ids[:, j].long()
            counts = torch.zeros(num_experts, device=chosen.device).scatter_add_(
                0, chosen, torch.ones_like(chosen, dtype=torch.float32)
            )
            hist = 100 * counts / num_tokens
            metadata[f"unused_expert{j + 1}_count"] = (hist == 0).sum()
            hist = torch.sort(hist, descending=True).values + torch.finfo(torch.float32).tiny
            metadata[f"expert{j + 1}_balance_top"] = hist[:sample_count].sum()
            metadata[f"expert{j + 1}_balance_bottom"] = hist[-sample_count:].sum()
        kept = ((locations >= 0) & (locations < capacity) & (routing.topk_weights != 0)).sum()
        metadata["capacity"] = capacity
        metadata["placeholder_fraction"] = 1 - kept / (num_experts * capacity)
        return metadata

    def forward(
        self,
        input: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        moe_eval_capacity_length: Optional[int] = None,
        prefix_tokens: Optional[torch.Tensor] = None,
    ):
        """input [S, M], mask [S] (True: padding) -> (l_aux, combine_weights [S, E, C],
        dispatch_mask [S, E, C] bool, metadata), as fairseq's gates. ``prefix_tokens`` (used by
        fairseq for logging only) is ignored."""
        if input.dim() != 2:
            raise ValueError(f"{type(self).__name__}: input must be [num_tokens, model_dim], got {tuple(input.shape)}")
        capacity = self.capacity(input.shape[0], moe_eval_capacity_length)
        logits, routing = self.route(input, mask, capacity)
        combine_weights, dispatch_mask = ops.static_routing_tensors(
            routing.expert_ids, routing.locations, routing.topk_weights, self.num_experts, capacity
        )
        metadata = self.routing_metadata(logits, routing, capacity)
        return routing.l_aux, combine_weights.to(logits.dtype), dispatch_mask, metadata

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, num_experts={self.num_experts}, top_k={self.top_k}"


class Top1Gate(_GShardGate):
    """fairseq's Top1Gate: the expert with the largest gate; its weight is the raw softmax probability.

    Capacity: ``int(capacity_factor * ceil(S / E))`` in training, ``ceil(fraction * S)`` in eval
    when ``moe_eval_capacity_token_fraction`` > 0. ``input_noise_type``, ``use_tutel`` and
    ``init_model_on_gpu`` are accepted for compatibility and unused (as in fairseq's ``moe``
    branch for the first; use ``device=`` for the last).
    """

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        use_fp32: bool = False,
        input_noise_type=None,
        capacity_factor: float = 1.0,
        moe_eval_capacity_token_fraction: float = 0.25,
        use_tutel: bool = False,
        init_model_on_gpu: bool = False,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__(
            model_dim,
            num_experts,
            1,
            use_fp32,
            capacity_factor,
            moe_eval_capacity_token_fraction,
            device=device,
            dtype=dtype,
        )
        self.input_noise_type = input_noise_type


class Top2Gate(_GShardGate):
    """fairseq's Top2Gate (GShard): the best expert, plus a second one chosen by
    ``second_expert_policy`` ('sampling': Gumbel noise on the logits, in eval mode too; 'random':
    kept if 2 * its gate > U(0, 1); 'all'); weights normalised by their sum after dropping unless
    ``normalize_gate_prob_before_dropping``; ``batch_prioritized_routing`` gives slots to the
    tokens with the best gates first.

    Capacity: ``2 * ceil(S / E)`` in training, ``ceil(fraction * S)`` in eval when
    ``moe_eval_capacity_token_fraction`` > 0. ``generator`` (keyword only) seeds the policies'
    noise. ``use_tutel`` and ``init_model_on_gpu`` are accepted and unused.
    """

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        use_fp32: bool = False,
        second_expert_policy: str = "sampling",
        normalize_gate_prob_before_dropping: bool = False,
        moe_eval_capacity_token_fraction: float = 0.25,
        batch_prioritized_routing: bool = False,
        use_tutel: bool = False,
        init_model_on_gpu: bool = False,
        *,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            model_dim,
            num_experts,
            2,
            use_fp32,
            1.0,
            moe_eval_capacity_token_fraction,
            second_expert_policy=second_expert_policy,
            normalize_gate_prob_before_dropping=normalize_gate_prob_before_dropping,
            batch_prioritized_routing=batch_prioritized_routing,
            generator=generator,
            device=device,
            dtype=dtype,
        )


def gate_from_fairseq(gate: nn.Module) -> _GShardGate:
    """A moe_infer gate with the settings and router weight of a fairseq Top1Gate / Top2Gate."""
    if isinstance(gate, _GShardGate):
        return gate
    name = type(gate).__name__
    weight = getattr(getattr(gate, "wg", None), "weight", None)
    if name not in ("Top1Gate", "Top2Gate") or weight is None:
        raise ValueError(f"gate_from_fairseq: expected fairseq's Top1Gate or Top2Gate (with a `wg` router), got {name}")
    num_experts, model_dim = weight.shape
    factory = {"device": weight.device, "dtype": weight.dtype}
    fraction = getattr(gate, "moe_eval_capacity_token_fraction", 0.25)
    if name == "Top1Gate":
        new = Top1Gate(
            model_dim,
            num_experts,
            use_fp32=getattr(gate, "use_fp32", False),
            input_noise_type=getattr(gate, "input_noise_type", None),
            capacity_factor=getattr(gate, "capacity_factor", 1.0),
            moe_eval_capacity_token_fraction=fraction,
            **factory,
        )
    else:
        new = Top2Gate(
            model_dim,
            num_experts,
            use_fp32=getattr(gate, "use_fp32", False),
            second_expert_policy=getattr(gate, "second_expert_policy", "sampling"),
            normalize_gate_prob_before_dropping=getattr(gate, "normalize_gate_prob_before_dropping", False),
            moe_eval_capacity_token_fraction=fraction,
            batch_prioritized_routing=getattr(gate, "batch_prioritized_routing", False),
            **factory,
        )
    with torch.no_grad():
        new.wg.weight.copy_(weight)
    return new.train(gate.training)


# ---- experts --------------------------------------------------------------------------------

# Our stacked parameter -> fairseq's per-expert key suffix.
_FAIRSEQ_KEYS = (
    ("gate_up_proj", "fc1.weight"),
    ("gate_up_proj_bias", "fc1.bias"),
    ("down_proj", "fc2.weight"),
    ("down_proj_bias", "fc2.bias"),
)


class FairseqExperts(MoEExperts):
    """E fairseq FeedForwardNetworks (``fc1`` [F, M] + bias, activation, ``fc2`` [M, F] + bias),
    stored stacked for :func:`moe_infer.ops.grouped_mlp`: ``gate_up_proj`` [E, F, M],
    ``down_proj`` [E, M, F] and their biases, with no copy per call.

    ``state_dict()`` writes fairseq's keys (``{i}.fc1.weight``, ``{i}.fc1.bias``,
    ``{i}.fc2.weight``, ``{i}.fc2.bias``, views of the stacked tensors) and ``load_state_dict``
    accepts them (or the stacked names).
    """

    def __init__(
        self,
        num_experts: int,
        model_dim: int,
        ffn_dim: int,
        activation: str = "relu",
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_experts, model_dim, ffn_dim, _grouped_mlp_activation(activation), bias, device=device, dtype=dtype
        )
        for parameter in self.parameters():
            parameter.expert = True  # fairseq's marker for expert-parallel parameters
        self.register_state_dict_post_hook(_experts_to_fairseq_keys)
        self.register_load_state_dict_pre_hook(_experts_from_fairseq_keys)

    @classmethod
    def from_modules(cls, experts, activation: Optional[str] = None) -> "FairseqExperts":
        """Stacks a sequence of fairseq FeedForwardNetworks (modules with ``fc1`` and ``fc2``)."""
        experts = list(experts)
        if not experts or not all(hasattr(e, "fc1") and hasattr(e, "fc2") for e in experts):
            raise ValueError("FairseqExperts.from_modules: expected a non-empty list of modules with fc1 and fc2")
        fc1 = experts[0].fc1.weight
        ffn_dim, model_dim = fc1.shape
        for i, expert in enumerate(experts):
            if expert.fc1.weight.shape != (ffn_dim, model_dim) or expert.fc2.weight.shape != (model_dim, ffn_dim):
                raise ValueError(
                    f"FairseqExperts.from_modules: expert {i} has fc1 {tuple(expert.fc1.weight.shape)} and fc2 "
                    f"{tuple(expert.fc2.weight.shape)}; expected [{ffn_dim}, {model_dim}] and [{model_dim}, {ffn_dim}]"
                )
        if activation is None:
            activation_fn = getattr(experts[0], "activation_fn", None)
            activation = getattr(activation_fn, "__name__", "relu") if activation_fn is not None else "relu"
        bias = experts[0].fc1.bias is not None
        new = cls(len(experts), model_dim, ffn_dim, activation, bias, device=fc1.device, dtype=fc1.dtype)
        with torch.no_grad():
            new.gate_up_proj.copy_(torch.stack([e.fc1.weight for e in experts]))
            new.down_proj.copy_(torch.stack([e.fc2.weight for e in experts]))
            if bias:
                new.gate_up_proj_bias.copy_(torch.stack([e.fc1.bias for e in experts]))
                new.down_proj_bias.copy_(torch.stack([e.fc2.bias for e in experts]))
        return new

    def __len__(self) -> int:
        return self.num_experts


def _experts_to_fairseq_keys(module, state_dict, prefix, local_metadata):
    stacked = {}
    for ours, theirs in _FAIRSEQ_KEYS:
        if prefix + ours in state_dict:
            stacked[theirs] = state_dict.pop(prefix + ours)
    for e in range(module.num_experts):
        for theirs, tensor in stacked.items():
            state_dict[f"{prefix}{e}.{theirs}"] = tensor[e]


def _experts_from_fairseq_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    for ours, theirs in _FAIRSEQ_KEYS:
        if getattr(module, ours) is None:
            continue
        keys = [f"{prefix}{e}.{theirs}" for e in range(module.num_experts)]
        present = [key for key in keys if key in state_dict]
        if not present:
            continue
        if len(present) < len(keys):
            # Report the experts that are missing; the stacked key then goes missing too.
            missing_keys.extend(key for key in keys if key not in state_dict)
            for key in present:
                state_dict.pop(key)
            continue
        state_dict[prefix + ours] = torch.stack([state_dict.pop(key) for key in keys])


# ---- the layer ------------------------------------------------------------------------------


def _expert_group_size(group) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


class MOELayer(nn.Module):
    """fairseq's MOELayer (GShard) on the moe_infer ops, for one process.

    Args (fairseq's):
        gate: a :class:`Top1Gate` / :class:`Top2Gate` (or fairseq's, converted with
            :func:`gate_from_fairseq`).
        experts: fairseq FeedForwardNetworks (a ModuleList of modules with ``fc1``/``fc2``; their
            weights are copied into stacked tensors) or a :class:`FairseqExperts`.
        args: fairseq's namespace; read: ``activation_fn``, ``batch_size`` / ``batch_size_valid``
            (batches are padded to it unless ``prepare_for_inference_()`` was called, as in
            fairseq), ``moe_eval_capacity_max_seqlen``.
        group, all2all_group: the expert-parallel process group; its world size must divide E and
            equal E / len(experts): each rank passes its own local experts.
        max_positions, tok_dropout (fairseq's moe_eom: expert outputs scaled by 1 - p in eval,
            dropped per slot in training), moe_local_drop, init_model_on_gpu: as fairseq.
    Keyword-only:
        gating: "dynamic" (default, capacity-free) or "static" (fairseq's capacity); a plain
            attribute, switchable at any time.
        activation: overrides the activation read from ``args`` / the experts.
        expert_buffer, buffer_policy, expert_store: keep the experts off the compute device with
            an ``expert_buffer``-slot pool there (:func:`moe_infer.buffer.attach_expert_buffer`;
            one process only).

    forward(input [B, T, M], input_padding_mask [B, T] bool or None) -> (output [B, T, M], l_aux []);
    the gate's metadata is kept on ``self.metadata``.
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: Union[nn.Module, nn.ModuleList],
        args: Any = None,
        group: Optional[Any] = None,
        all2all_group: Optional[Any] = None,
        max_positions: Optional[int] = None,
        init_model_on_gpu: bool = False,
        tok_dropout: float = 0.0,
        moe_local_drop: float = 0.0,
        *,
        gating: str = "dynamic",
        activation: Optional[str] = None,
        expert_buffer: Optional[int] = None,
        buffer_policy: str = "paper",
        expert_store: Optional[Any] = None,
    ):
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"MOELayer: gating must be one of {GATINGS}, got '{gating}'")
        self.gate = gate_from_fairseq(gate)
        if activation is None and getattr(args, "activation_fn", None) is not None:
            activation = str(args.activation_fn)
        if isinstance(experts, FairseqExperts):
            if activation is not None and _grouped_mlp_activation(activation) != experts.activation:
                raise ValueError(
                    f"MOELayer: activation '{activation}' disagrees with the experts' '{experts.activation}'"
                )
            self.experts = experts
        else:
            modules = list(experts) if isinstance(experts, nn.ModuleList) else [experts]
            self.experts = FairseqExperts.from_modules(modules, activation)
        num_experts = self.gate.num_experts
        num_local = self.experts.num_experts
        world_size = _expert_group_size(group)
        if num_experts % world_size != 0:
            raise ValueError(
                f"MOELayer: num_experts ({num_experts}) does not divide across the {world_size} ranks of the "
                "expert group; E must be a multiple of the world size"
            )
        if num_experts % num_local != 0:
            raise ValueError(
                f"MOELayer: the gate routes to {num_experts} experts, which do not divide across ranks of "
                f"{num_local} local experts each"
            )
        if num_local * world_size != num_experts:
            raise ValueError(
                f"MOELayer: the gate routes to {num_experts} experts but {world_size} rank(s) x {num_local} local "
                f"experts hold {num_local * world_size}; this layer runs on one process: give it all "
                f"{num_experts} experts"
            )
        if self.experts.hidden_size != self.gate.model_dim:
            raise ValueError(
                f"MOELayer: experts have model_dim {self.experts.hidden_size} but the gate {self.gate.model_dim}"
            )
        gate_dtype, experts_dtype = self.gate.wg.weight.dtype, self.experts.gate_up_proj.dtype
        if gate_dtype != experts_dtype and self.experts.gate_up_proj.device.type != "meta":
            raise ValueError(
                f"MOELayer: the gate is {gate_dtype} but the experts are {experts_dtype}; give them one dtype "
                f"(gate.to({experts_dtype}) or experts.to({gate_dtype}))"
            )
        self.gating = gating
        self.args = args
        self.expert_group = group
        self.all2all_group = all2all_group
        self.world_size = world_size
        self.all2all_size = 1
        self.num_local_experts = num_local
        self.in_generation = False
        self.max_positions = max_positions
        self.tok_dropout = tok_dropout
        self.moe_local_drop = moe_local_drop
        self.metadata: dict = {}
        # Where the experts run (moe_infer.experts.ExpertsBackend): across ranks (this rank's local
        # experts behind the exchange, inference only; registered as `expert_parallel`), through an
        # expert buffer, or here.
        self.expert_parallel = None
        backend: ExpertsBackend = LocalExperts(self.experts, row_transform=self._drop_expert_rows)
        if world_size > 1:
            if expert_buffer is not None:
                raise ValueError("MOELayer: expert_buffer and expert parallelism cannot be combined")
            backend = self.expert_parallel = ExpertParallelExperts.from_local_experts(
                self.experts, group, validate=False
            )
        if expert_buffer is not None:
            backend = attach_expert_buffer(self.experts, expert_buffer, buffer_policy, expert_store)
        self.__dict__["experts_backend"] = backend

    @classmethod
    def build(
        cls,
        gate: nn.Module,
        ffn_dim: int,
        activation: str = "relu",
        args: Any = None,
        *,
        gating: str = "dynamic",
        device=None,
        dtype=None,
        **kwargs,
    ) -> "MOELayer":
        """A layer with freshly initialised experts (nn.Linear's initialisation), allocated stacked."""
        experts = FairseqExperts(gate.num_experts, gate.model_dim, ffn_dim, activation, device=device, dtype=dtype)
        return cls(gate, experts, args, gating=gating, **kwargs)

    def prepare_for_inference_(self) -> None:
        self.in_generation = True

    def forward(self, *input: torch.Tensor, input_padding_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        if len(input) != 1:
            raise ValueError(f"MOELayer: only a single input tensor is supported, got {len(input)}")
        x = input[0]
        if x.dim() != 3:
            raise ValueError(f"MOELayer: input must be [batch, seq, model_dim], got shape {tuple(x.shape)}")
        check_layer_input("MOELayer", x, self.gate.model_dim, self.gate.wg.weight.dtype)
        if input_padding_mask is not None and tuple(input_padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"MOELayer: input_padding_mask must be [batch, seq] = {tuple(x.shape[:2])}, "
                f"got {tuple(input_padding_mask.shape)}"
            )
        batch_size = x.shape[0]
        x, input_padding_mask = self._pad_to_expected_batch(x, input_padding_mask)
        model_dim = x.shape[2]
        tokens = x.reshape(-1, model_dim)
        mask = None if input_padding_mask is None else input_padding_mask.reshape(-1).bool()
        if tokens.shape[0] == 0 and not self.experts_backend.collective:  # across ranks, still join the exchange
            self.metadata = {}
            return x[:batch_size].clone(), x.new_zeros((), dtype=torch.float32)
        eval_capacity_length = None
        if getattr(self.args, "moe_eval_capacity_max_seqlen", False):
            eval_capacity_length = self.max_positions * x.shape[0]
        if self.gating == "static":
            out, l_aux = self._forward_static(tokens, mask, eval_capacity_length)
        elif self.gating == "dynamic":
            out, l_aux = self._forward_dynamic(tokens, mask)
        else:
            raise ValueError(f"MOELayer: gating must be one of {GATINGS}, got '{self.gating}'")
        return out.view(x.shape)[:batch_size], l_aux

    def _pad_to_expected_batch(self, x, padding_mask):
        # fairseq pads every batch to --batch-size (training) / --batch-size-valid (eval) with
        # padding tokens, which count in S and so in the capacity.
        attribute = "batch_size" if self.training else "batch_size_valid"
        expected = getattr(self.args, attribute, 0) or 0
        if self.in_generation or expected == 0 or x.shape[0] == expected:
            return x, padding_mask
        if x.shape[0] > expected:
            raise ValueError(f"MOELayer: batch of {x.shape[0]} sequences exceeds args.{attribute} ({expected})")
        padded = x.new_zeros((expected,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        padded_mask = torch.ones(expected, x.shape[1], dtype=torch.bool, device=x.device)
        padded_mask[: x.shape[0]] = False if padding_mask is None else padding_mask
        return padded, padded_mask

    def _drop_expert_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fairseq's moe_eom in training: each expert output row (slot) dropped with probability
        tok_dropout (in eval the combine weights are scaled by 1 - tok_dropout instead)."""
        if self.tok_dropout > 0.0 and self.training:
            keep = torch.rand(rows.shape[0], device=rows.device) > self.tok_dropout
            rows = rows * keep.unsqueeze(-1).to(rows.dtype)
        return rows

    def _combine_weights(self, weights: torch.Tensor) -> torch.Tensor:
        # An inference-only backend refuses weights that need gradients (refuse_gradients), and
        # training mode even without: it would skip the training-mode expert-row dropout.
        if self.experts_backend.inference_only and self.training:
            raise RuntimeError(
                "MOELayer: the expert-buffered and expert-parallel paths are inference-only: call eval() (and run "
                "under torch.no_grad())"
            )
        return weights * (1 - self.tok_dropout) if self.tok_dropout > 0.0 and not self.training else weights

    def _forward_static(self, tokens, mask, eval_capacity_length):
        # Across ranks, the equal-size all-to-all needs one capacity on every rank: the largest
        # (fairseq's ranks agree because every batch is padded to the same size).
        capacity = self.experts_backend.agree_capacity(
            max(1, self.gate.capacity(tokens.shape[0], eval_capacity_length))
        )
        logits, routing = self.gate.route(tokens, mask, capacity)
        self.metadata = self.gate.routing_metadata(logits, routing, capacity)
        # Dropped and unrouted pairs (locations outside [0, capacity)) contribute nothing.
        weights = self._combine_weights(routing.topk_weights)
        out = self.experts_backend.run_capacity(tokens, weights, routing.expert_ids, routing.locations, capacity)
        return out, routing.l_aux

    def _forward_dynamic(self, tokens, mask):
        num_tokens = tokens.shape[0]
        # A capacity of S fits every pair: fairseq's choices and weights with nothing dropped.
        logits, routing = self.gate.route(tokens, mask, max(num_tokens, 1))
        self.metadata = self.gate.routing_metadata(logits, routing, max(num_tokens, 1))
        del self.metadata["capacity"], self.metadata["placeholder_fraction"]
        ids = routing.expert_ids.masked_fill(routing.locations < 0, -1)  # padding: unrouted
        return self.experts_backend.run(tokens, self._combine_weights(routing.topk_weights), ids), routing.l_aux

    def extra_repr(self) -> str:
        return f"gating={self.gating}"


# ---- conversion -----------------------------------------------------------------------------


def _is_fairseq_moe_layer(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "MOELayer"
        and hasattr(getattr(module, "gate", None), "wg")
        and hasattr(module, "experts")
    )


def convert_fairseq_moe(model: nn.Module, gating: str = "dynamic") -> nn.Module:
    """Swaps, in place, every fairseq MoE layer of ``model`` (fairseq's ``MOELayer``, found by
    class name, with a ``Top1Gate``/``Top2Gate`` and FeedForwardNetwork experts) for a moe_infer
    :class:`MOELayer` with the same weights and settings, and sets ``gating`` on moe_infer layers
    already there. Returns ``model`` (or the new layer, when ``model`` itself is a MoE layer).
    """
    if gating not in GATINGS:
        raise ValueError(f"convert_fairseq_moe: gating must be one of {GATINGS}, got '{gating}'")
    if isinstance(model, MOELayer):
        model.gating = gating
        return model
    if _is_fairseq_moe_layer(model):
        args = getattr(model, "args", None)
        layer = MOELayer(
            model.gate,
            model.experts,
            args,
            group=getattr(model, "expert_group", None),
            all2all_group=getattr(model, "all2all_group", None),
            max_positions=getattr(model, "max_positions", None),
            tok_dropout=getattr(model, "tok_dropout", 0.0),
            moe_local_drop=getattr(model, "moe_local_drop", 0.0),
            gating=gating,
        )
        layer.in_generation = getattr(model, "in_generation", False)
        return layer.train(model.training)
    for name, child in list(model.named_children()):
        new = convert_fairseq_moe(child, gating)
        if new is not child:
            setattr(model, name, new)
    return model
