"""Hugging Face transformers v5 on moe_infer's ops (needs transformers >= 5: the extra ``[hf]``).

Two entry points:

``optimize(model)`` (also ``moe_infer.optimize``)
    Runs every supported sparse MoE block -- router and experts together -- on the fused path
    ``topk_gating -> dispatch_plan -> grouped_mlp_combine`` (grouped_mlp with the gather and the
    weighted combine fused, so no [tokens * k, hidden] buffer exists), in place. The block and its router stay the same objects with the same parameters and names: their class
    becomes a subclass of the original whose ``forward`` calls our ops, so ``save_pretrained``
    writes a checkpoint that plain transformers loads, hooks stay attached, and the router still
    returns the router logits that transformers records for ``output_router_logits``. In training
    mode the blocks run transformers' own forward (dropout, jitter, token dropout), and so they do
    after ``model.set_experts_implementation(...)`` (any implementation, the one in use included:
    the choice is honoured) until ``optimize(model)`` is called again. So does a block whose
    experts' modules have forward hooks (``torch.nn.utils.prune``, a user's), which the fused path
    does not call, or were replaced since ``optimize`` (which, called again, fuses the new ones).

The ``"moe_infer"`` experts implementation
    Importing this module registers it in transformers' experts registry: after
    ``model.set_experts_implementation("moe_infer")`` (or ``from_pretrained(...,
    experts_implementation="moe_infer")``) every ``@use_experts_implementation`` experts module
    computes on ``dispatch_plan`` and ``grouped_mlp_combine``; the routing stays transformers'.

SwitchTransformers and NLLB-MoE route with an expert capacity in transformers. Their replacement is
capacity-free by default (identical wherever transformers drops nothing); ``hf_capacity=True``
reproduces transformers' capacity and its drops exactly (dropped pairs get expert id -1, which
``dispatch_plan`` leaves unrouted), with O(tokens * k) routing memory instead of one-hot
[tokens, experts] masks.
"""

import contextlib
import dataclasses
import math
import operator
from itertools import repeat
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.integrations import moe as hf_moe

    hf_moe.ALL_EXPERTS_FUNCTIONS  # noqa: B018  (transformers < 5 has no experts registry)
except (ImportError, AttributeError) as error:
    raise ImportError(
        "moe_infer.integrations.hf needs transformers >= 5.0 (its experts registry): pip install 'transformers>=5'"
    ) from error

from .. import host_memory, ops
from ..experts import ExpertSpec, LocalExperts, ModuleSpec, activation_of, expert_spec, parameter_of, run_local

EXPERTS_IMPLEMENTATION = "moe_infer"


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"moe_infer"`` experts implementation (transformers' experts-interface signature).

    hidden_states [S, H], top_k_index [S, k], top_k_weights [S, k] -> [S, H]: dispatch by counting
    sort, grouped_mlp on the module's own parameters, weighted combine accumulated in float32.
    """
    if getattr(self, "_is_expert_parallel", False):
        # Expert-parallel sentinels (ids of experts on other ranks) contribute nothing here.
        top_k_index = top_k_index.masked_fill(top_k_index >= self.num_experts, -1)
    return run_local(expert_spec(self), hidden_states, top_k_weights, top_k_index)


hf_moe.ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


def check_experts_implementation(model: nn.Module) -> None:
    """Raises NotImplementedError (naming the module and why) if an experts module of ``model`` that
    dispatches through transformers' experts registry is not computable by the ``"moe_infer"``
    implementation: the choice is refused when it is made, not at the first forward."""
    for name, module in model.named_modules():
        if hasattr(module, "is_concatenated") and hasattr(type(module), "_apply_gate"):
            try:
                expert_spec(module)
            except NotImplementedError as error:
                raise NotImplementedError(f"{name}: {error}") from None


def _refuse_unsupported_experts(choose):
    """Wraps the PreTrainedModel method through which transformers validates an experts
    implementation (set_experts_implementation, from_pretrained(experts_implementation=...))."""

    def wrapped(self, *args, **kwargs):
        chosen = choose(self, *args, **kwargs)
        if chosen == EXPERTS_IMPLEMENTATION:
            check_experts_implementation(self)
        return chosen

    wrapped._moe_infer_wraps = choose
    return wrapped


def _refuse_at_init(post_init):
    """Models built with ``experts_implementation="moe_infer"`` are checked once their modules exist."""

    def wrapped(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if getattr(self.config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
            check_experts_implementation(self)

    wrapped._moe_infer_wraps = post_init
    return wrapped


# Set on a fused block by set_experts_implementation (any implementation, the one in use at optimize
# time included): it runs transformers' forward with that implementation until optimize() again.
_HANDED_OVER = "_moe_infer_handed_over"


def _hand_over_on_choice(choose):
    """Wraps PreTrainedModel.set_experts_implementation: a choice made after optimize() is honoured."""

    def wrapped(self, *args, **kwargs):
        result = choose(self, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, _RoutedBlock):
                module.__dict__[_HANDED_OVER] = True
        return result

    wrapped._moe_infer_wraps = choose
    return wrapped


def _not_a_choice(optimize_for_decode):
    """Wraps generate()'s ``_optimize_model_for_decode``: off the CPU it switches grouped_mm to
    batched_mm for the decoding steps and back through set_experts_implementation. That is not the
    user's choice, so the fused blocks keep running moe_infer through it."""

    @contextlib.contextmanager
    def wrapped(self, *args, **kwargs):
        blocks = [module for module in self.modules() if isinstance(module, _RoutedBlock)]
        before = [block.__dict__.get(_HANDED_OVER, False) for block in blocks]

        def keep():
            for block, handed_over in zip(blocks, before):
                block.__dict__[_HANDED_OVER] = handed_over

        try:
            with optimize_for_decode(self, *args, **kwargs):
                keep()
                yield
        finally:
            keep()

    wrapped._moe_infer_wraps = optimize_for_decode
    return wrapped


if not hasattr(PreTrainedModel.get_correct_experts_implementation, "_moe_infer_wraps"):
    PreTrainedModel.get_correct_experts_implementation = _refuse_unsupported_experts(
        PreTrainedModel.get_correct_experts_implementation
    )
    PreTrainedModel.post_init = _refuse_at_init(PreTrainedModel.post_init)
    PreTrainedModel.set_experts_implementation = _hand_over_on_choice(PreTrainedModel.set_experts_implementation)
    if hasattr(GenerationMixin, "_optimize_model_for_decode"):
        GenerationMixin._optimize_model_for_decode = _not_a_choice(GenerationMixin._optimize_model_for_decode)


# ---- fused routers: forward returns (router_logits, topk_weights, expert_ids) -----------------
# Each is mixed in front of the original router class, so transformers' output recorders
# (isinstance on that class, index 0) still capture the logits.


class _SoftmaxRouter:
    """Qwen2-MoE, Qwen3-MoE, OLMoE (and Mixtral, below): softmax over E in float32, top-k, and the
    renormalization transformers' router does: its ``norm_topk_prob``, or always
    (``_moe_infer_renormalize``)."""

    _moe_infer_renormalize: Optional[bool] = None

    _moe_infer_weights_in_logits_dtype = False  # Qwen and OLMoE round the weights to the logits' dtype

    def forward(self, hidden_states):
        if self.training or self.__dict__.get("_moe_infer_passthrough", False):
            return super().forward(hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        # The weight and the flag read without nn.Module.__getattr__ (parameter_of, __dict__),
        # which costs tens of microseconds on a decode step.
        router_logits = F.linear(hidden_states, parameter_of(self, "weight"))
        renormalize = self._moe_infer_renormalize
        if renormalize is None:
            attributes = self.__dict__
            renormalize = attributes["norm_topk_prob"] if "norm_topk_prob" in attributes else self.norm_topk_prob
        weights, ids = ops.topk_gating(
            router_logits, self.top_k, "softmax", renormalize, validate=self._moe_infer_validate
        )
        if self._moe_infer_weights_in_logits_dtype:
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, ids


class _MixtralRouter(_SoftmaxRouter):
    """Mixtral: always renormalizes (its router has no norm_topk_prob)."""

    _moe_infer_renormalize = True


class _RoundedSoftmaxRouter(_SoftmaxRouter):
    _moe_infer_weights_in_logits_dtype = True


class _GptOssRouter:
    """Top-k on the logits (with the router bias), softmax over the k."""

    def forward(self, hidden_states):
        if self.training or self.__dict__.get("_moe_infer_passthrough", False):
            return super().forward(hidden_states)
        router_logits = F.linear(hidden_states, self.weight, self.bias)
        weights, ids = ops.topk_gating(router_logits, self.top_k, "softmax_topk", validate=self._moe_infer_validate)
        return router_logits, weights.to(router_logits.dtype), ids


class _DeepseekV3Router:
    """Sigmoid scores in float32, a selection-only bias, group-limited top-k, renormalization, scaling."""

    def forward(self, hidden_states):
        if self.training or self.__dict__.get("_moe_infer_passthrough", False):
            return super().forward(hidden_states)
        if self.top_k > self.topk_group * (self.num_experts // self.num_group):
            # More experts than the chosen groups hold: transformers fills the k with experts of the
            # masked groups (-inf choice scores, in torch.topk's order among them) at their sigmoid
            # weights. topk_gating refuses such a k, so these routers route with transformers' own
            # forward; the experts still run on the fused path.
            router_logits, weights, ids = super().forward(hidden_states)
            return router_logits, weights, ids.to(torch.int32)
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        weights, ids = ops.topk_gating(
            router_logits,
            self.top_k,
            "sigmoid",
            self.norm_topk_prob,
            self.e_score_correction_bias,
            self.routed_scaling_factor,
            self.num_group,
            self.topk_group,
            validate=self._moe_infer_validate,
        )
        return router_logits, weights, ids


def _router_linear(classifier: nn.Linear, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The classifier in the router's dtype (what transformers does by casting the module, without the cast)."""
    bias = None if classifier.bias is None else classifier.bias.to(dtype)
    return F.linear(hidden.to(dtype), classifier.weight.to(dtype), bias)


def _arrival_rank(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """rank[i] = how many j < i have keys[j] == keys[i] (keys [N] in [0, num_keys) or -1), by counting sort."""
    plan = ops.dispatch_plan(keys.view(-1, 1), num_keys, validate=False)
    bucket = torch.where(keys >= 0, keys, num_keys).long()
    return plan.row_of_pair - plan.expert_offsets[bucket]


class _SwitchRouter:
    """SwitchTransformers: top-1 of the softmax (router dtype), weight = that probability."""

    def forward(self, hidden_states):
        if self.training or self.__dict__.get("_moe_infer_passthrough", False):
            return super().forward(hidden_states)
        router_logits = _router_linear(self.classifier, hidden_states, self.dtype)  # [B, S, E]
        flat_logits = router_logits.view(-1, self.num_experts)
        if self._moe_infer_validate:
            ops.topk_gating(flat_logits, 1)  # its checks: NaN / +inf logits are refused
        # transformers takes the argmax (ties -> the first expert, not torch.topk's order) of the
        # probabilities rounded to the input dtype.
        probs = F.softmax(flat_logits, dim=-1, dtype=self.dtype).to(hidden_states.dtype)
        ids = probs.argmax(dim=-1, keepdim=True)
        weights = probs.gather(1, ids)
        # The logits stay at index 2, where transformers records them.
        return ids, weights.to(hidden_states.dtype), router_logits


class _NllbRouter:
    """NLLB-MoE's top-2 router (fairseq's Top2Gate), with padding, second-expert policy and capacity.

    forward(hidden [T, H], padding_mask) -> (expert_ids [T, 2] with -1 for dropped/padding pairs,
    combine weights [T, 2] in the input dtype, router_logits [T, E]).
    """

    def forward(self, hidden_states, padding_mask=None):
        if self.training or self.__dict__.get("_moe_infer_passthrough", False):
            return super().forward(hidden_states, padding_mask)
        input_dtype = hidden_states.dtype
        router_logits = _router_linear(self.classifier, hidden_states, self.dtype)
        num_tokens = router_logits.shape[0]
        if self._moe_infer_validate:
            ops.topk_gating(router_logits, 2)  # its checks: NaN / +inf logits are refused
        # transformers' order exactly (fairseq's argmax, ties -> the first expert): top-1 on the
        # probabilities in the input dtype, then top-2 on the logits (plus Gumbel noise for
        # "sampling", which the recorded logits keep).
        probs = F.softmax(router_logits, dim=-1, dtype=self.dtype).to(input_dtype)
        top_1 = probs.argmax(dim=-1)
        if self.second_expert_policy == "sampling":
            gumbel = torch.distributions.gumbel.Gumbel(0, 1).rsample
            router_logits += gumbel(router_logits.shape).to(router_logits.device)
        others = router_logits.masked_fill(F.one_hot(top_1, self.num_experts).bool(), float("-inf"))
        ids = torch.stack([top_1, others.argmax(dim=-1)], dim=1)
        top_probs = probs.gather(1, ids)
        eps = torch.finfo(top_probs.dtype).eps
        raw_probs = top_probs
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.normalize_router_prob_before_dropping:
            top_probs = raw_probs / raw_probs.sum(dim=1, keepdim=True).clamp(min=eps)
        if self.second_expert_policy == "random":
            sampled = (2 * raw_probs[:, 1]) > torch.rand_like(raw_probs[:, 1].float())
            keep = torch.stack([keep[:, 0], sampled], dim=1)
            # transformers then weighs the second choice by its raw probability
            top_probs = torch.stack([top_probs[:, 0], raw_probs[:, 1]], dim=1)
        if padding_mask is not None and not self.router_ignore_padding_tokens:
            keep = keep & _nllb_non_padding(padding_mask, num_tokens).unsqueeze(1)
        if self._moe_infer_hf_capacity:
            keep = keep & self._moe_infer_capacity_keep(ids, keep, raw_probs, num_tokens)
        gates = top_probs * keep
        if not self.normalize_router_prob_before_dropping:  # fairseq's default: normalize after dropping
            gates = gates / gates.sum(dim=1, keepdim=True).clamp(min=eps)
        return ids.masked_fill(~keep, -1), gates, router_logits

    def _moe_infer_capacity_keep(self, ids, keep, top_probs, num_tokens):
        """Which pairs transformers keeps: per expert, first choices before second choices, each in
        token order (or by decreasing top-1 probability with batch_prioritized_routing), up to the
        capacity -- which transformers also stores on the router, as here."""
        if self.moe_eval_capacity_token_fraction > 0:  # eval mode (training runs transformers' forward)
            self.expert_capacity = math.ceil(self.moe_eval_capacity_token_fraction * num_tokens)
        elif self.expert_capacity is None:
            self.expert_capacity = 2 * math.ceil(num_tokens / self.num_experts)
        routed = ids.masked_fill(~keep, -1)
        order = None
        if self.batch_prioritized_routing:
            order = (-1 * top_probs[:, 0]).argsort(dim=0)
            routed = routed[order]
        rank = _arrival_rank(routed.t().reshape(-1), self.num_experts).view(2, num_tokens).t()
        if order is not None:
            rank = torch.empty_like(rank).index_copy_(0, order, rank)
        return rank < self.expert_capacity


def _nllb_non_padding(padding_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] bool, True for real tokens, from the mask NLLB-MoE's layers pass (as transformers reads it)."""
    if padding_mask.dim() == 4:  # an additive attention mask: its last query row marks the padding keys
        padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-num_tokens:]
    return ~padding_mask.reshape(-1).bool()


# ---- fused blocks -----------------------------------------------------------------------------


class _ExpertsSnapshot:
    """The modules a block's experts backend was built from, where they sit, and where their hooks
    go, listed once (at optimize()) so that each forward checks them in a few C-level passes:
    - ``where``: (the ``_modules`` dict, name, module) of the experts module, its children and
      theirs (an expert's module, activation and layers for experts kept as separate modules);
    - every module among the experts, and its hook dicts and ``__dict__`` (accelerate's
      ``_hf_hook``), listed again at the first check after a copy or unpickling (whose modules
      have new ones)."""

    def __init__(self, block: nn.Module):
        experts = block._modules["experts"]
        where = [(block._modules, "experts", experts)]
        for name, child in experts._modules.items():
            where.append((experts._modules, name, child))
            if child is not None:
                where += [(child._modules, n, grandchild) for n, grandchild in child._modules.items()]
        self.dicts, self.names, self.modules = (list(column) for column in zip(*where))
        self.all_modules = list(experts.modules())
        self._hook_places = None

    def __getstate__(self):
        return {**self.__dict__, "_hook_places": None}

    def unchanged(self) -> bool:
        """Every module still sits where it was."""
        return all(map(operator.is_, map(dict.get, self.dicts, self.names), self.modules))

    def hooked(self) -> bool:
        """A forward hook or pre-hook on one of the modules, or accelerate's."""
        if self._hook_places is None:
            modules = self.all_modules
            hooks = [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]
            self._hook_places = (hooks, [m.__dict__ for m in modules])
        hooks, attributes = self._hook_places
        return any(hooks) or any(map(operator.contains, attributes, repeat("_hf_hook")))


def _experts_need_transformers(block: nn.Module) -> bool:
    """Whether the block's experts must run in transformers' own forward, the exact one for them:
    - a module of theirs (the experts module, its activation, an expert's module or layer) was
      replaced since optimize() (the backend was built from the one before; ``optimize(model)``
      again fuses the new one);
    - a module among them has forward hooks or pre-hooks (torch.nn.utils.prune, a user's hooks),
      which the fused path, not calling the experts' modules, would skip;
    - accelerate's hooks (cpu_offload, disk_offload, a device_map with "cpu"/"disk"): the weights
      are placeholders until a hook loads them.
    Runs every forward (_ExpertsSnapshot: about 1 us for stacked experts, 40 us for 128 separate
    ones)."""
    return _experts_replaced(block) or block.__dict__[_FUSED_EXPERTS].hooked()


def _experts_replaced(block: nn.Module) -> bool:
    """Whether a module the block's experts backend was built from no longer sits where it was
    (or the block has no snapshot of them)."""
    snapshot = block.__dict__.get(_FUSED_EXPERTS)
    return snapshot is None or not snapshot.unchanged()


def _transformers_forward(block: nn.Module, forward, *args):
    """transformers' own forward of a fused block, its router's included (the fused router returns
    int32 ids, which transformers' experts do not take)."""
    if block.training:
        return forward(*args)
    router = getattr(block, getattr(block, "_router_attr", "router"))
    router.__dict__["_moe_infer_passthrough"] = True
    try:
        return forward(*args)
    finally:
        router.__dict__["_moe_infer_passthrough"] = False


class _RoutedBlock:
    """The part every router + stacked-experts block shares (eval mode)."""

    _router_attr = "gate"

    @property
    def _runs_transformers(self) -> bool:
        """Training mode, an experts implementation chosen after optimize()
        (``model.set_experts_implementation(...)``), or experts that the fused path cannot run
        exactly (_experts_need_transformers): transformers' own forward, which honours them."""
        return self.training or self.__dict__.get(_HANDED_OVER, False) or _experts_need_transformers(self)

    def _routed(self, hidden_states):
        """hidden_states [..., H] -> (routed expert output [S, H], hidden [S, H], topk weights [S, k])."""
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, ids = self._modules[self._router_attr](hidden)
        return self.experts_backend.run(hidden, weights, ids), hidden, weights


class _TopKBlock(_RoutedBlock):
    """Mixtral, Qwen3-MoE, OLMoE: router + experts."""

    def forward(self, hidden_states):
        if self._runs_transformers:
            return _transformers_forward(self, super().forward, hidden_states)
        return self._routed(hidden_states)[0].view(hidden_states.shape)


class _Qwen2MoeBlock(_RoutedBlock):
    """Qwen2-MoE: router + experts + a shared expert scaled by sigmoid(shared_expert_gate)."""

    def forward(self, hidden_states):
        if self._runs_transformers:
            return _transformers_forward(self, super().forward, hidden_states)
        out, hidden, _ = self._routed(hidden_states)
        shared = F.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return (out + shared).view(hidden_states.shape)


class _GptOssBlock(_RoutedBlock):
    """GPT-OSS: returns (hidden, router_scores) like transformers' GptOssMLP."""

    _router_attr = "router"

    def forward(self, hidden_states):
        if self._runs_transformers:
            return _transformers_forward(self, super().forward, hidden_states)
        out, _, weights = self._routed(hidden_states)
        return out.view(hidden_states.shape), weights


class _DeepseekV3Block(_RoutedBlock):
    """DeepSeek-V3: routed experts + always-on shared experts."""

    def forward(self, hidden_states):
        if self._runs_transformers:
            return _transformers_forward(self, super().forward, hidden_states)
        return self._routed(hidden_states)[0].view(hidden_states.shape) + self.shared_experts(hidden_states)


class _SwitchBlock:
    """SwitchTransformers: top-1, capacity-free unless hf_capacity (then per sequence, in token order)."""

    def forward(self, hidden_states):
        if self.training or _experts_need_transformers(self):
            return _transformers_forward(self, super().forward, hidden_states)
        batch, seq, hidden_size = hidden_states.shape
        ids, weights, _ = self.router(hidden_states)
        if self._moe_infer_hf_capacity:
            num_experts = self.router.num_experts
            keys = ids.view(batch, seq) + num_experts * torch.arange(batch, device=ids.device).unsqueeze(1)
            rank = _arrival_rank(keys.reshape(-1), batch * num_experts).view(-1, 1)
            ids = ids.masked_fill(rank >= self.router.expert_capacity, -1)
        hidden = hidden_states.reshape(-1, hidden_size)
        return self.experts_backend.run(hidden, weights, ids).view(batch, seq, hidden_size)


class _NllbBlock:
    """NLLB-MoE: top-2 with padding and capacity rules, outputs scaled by (1 - moe_token_dropout) in eval."""

    def forward(self, hidden_states, padding_mask=None):
        if self.training or _experts_need_transformers(self):
            return _transformers_forward(self, super().forward, hidden_states, padding_mask)
        batch, seq, hidden_size = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_size)
        ids, gates, _ = self.router(hidden, padding_mask)
        if self.experts.moe_token_dropout > 0:
            gates = gates * (1 - self.experts.moe_token_dropout)
        out = self.experts_backend.run(hidden, gates, ids)
        return out.view(batch, seq, hidden_size)


class _ExpertStack:
    """Stacked [E, ...] weights for experts kept as E separate modules (SwitchTransformers, NLLB-MoE).

    The stacks are copies: the expert modules keep their own, independent parameters, so
    checkpoints and transformers' storage-based tied-weight checks see E separate tensors (views of
    one stack would look tied). The price is a second copy of these experts' weights. Any change to
    a parameter (in place, ``load_state_dict``, ``model.to(...)``, a replaced Parameter) is seen
    through its version and storage, and the next forward stacks them again.
    """

    def __init__(self, experts: nn.ModuleDict, fc1: str, fc2: str, owner: str):
        self.experts = experts
        self.num_experts = experts.num_experts
        self.fc1, self.fc2 = fc1, fc2
        modules = [experts[f"expert_{e}"] for e in range(self.num_experts)]
        # Every expert's two linear layers, looked up once (their parameters are read each forward;
        # a replaced module sends the block to transformers' forward: _experts_need_transformers).
        self._layers = [[m.get_submodule(name) for m in modules] for name in (fc1, fc2)]
        # Each layer's _parameters and "weight" / "bias", flat: the signature's fast path.
        slots = [
            (layer._parameters, attr) for layers in self._layers for layer in layers for attr in ("weight", "bias")
        ]
        self._dicts, self._names = (list(column) for column in zip(*slots))
        self.activation = activation_of(modules[0].act, False, owner)
        if any(type(m.act) is not type(modules[0].act) for m in modules):
            raise NotImplementedError(f"moe_infer: the experts of {owner} use different activations")
        self.weights = self._stack()

    def _params(self) -> list[list[Optional[torch.Tensor]]]:
        """[fc1 weight, fc1 bias, fc2 weight, fc2 bias] -> each expert's tensor (or None), a
        parametrized one computed."""
        return [
            [parameter_of(layer, attr) for layer in layers] for layers in self._layers for attr in ("weight", "bias")
        ]

    def _signature(self):
        """What the stacks were made from: each weight's parameter, or for one under
        torch.nn.utils.parametrize the parametrization's own tensors (original, ...), whose value it
        is computed from each time it is read. A moved or replaced tensor has another id or
        data_ptr; an in-place change bumps its _version. Every forward reads it: where every
        weight is a parameter, in C-level passes."""
        dicts, names = self._dicts, self._names
        if all(map(operator.contains, dicts, names)):
            tensors = list(map(dict.get, dicts, names))
            present = [t for t in tensors if t is not None]
            versions = tuple(map(operator.attrgetter("_version"), present))
            return tuple(map(id, tensors)), versions, tuple(map(torch.Tensor.data_ptr, present))
        signature = []
        for layers in self._layers:
            for layer in layers:
                for attr in ("weight", "bias"):
                    if attr in layer._parameters:
                        sources, computed = (layer._parameters[attr],), False
                    else:
                        parametrizations = layer._modules.get("parametrizations")
                        found = parametrizations is not None and attr in parametrizations._modules
                        source = parametrizations._modules[attr] if found else None
                        sources = (*source.parameters(), *source.buffers()) if found else (getattr(layer, attr),)
                        computed = True
                    signature += [(computed, id(t), t._version, t.data_ptr()) for t in sources if t is not None]
        return signature

    def _stack(self) -> ExpertSpec:
        signature = self._signature()
        groups = self._params()
        stacks = []
        with torch.no_grad():
            for params in groups:
                if params[0] is None:
                    stacks.append(None)
                    continue
                tensors = [p.detach() for p in params]
                out = None
                if tensors[0].device.type == "cpu":  # read by every decode step: 2 MiB pages
                    out = host_memory.empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
                stacks.append(torch.stack(tensors, out=out))
        self._seen = signature
        fc1, fc1_bias, fc2, fc2_bias = stacks
        return ExpertSpec(fc1, fc1_bias, fc2, fc2_bias, self.activation)

    def expert_spec(self) -> ExpertSpec:
        if not torch.compiler.is_compiling() and self._signature() != self._seen:
            self.weights = self._stack()
        return self.weights


# ---- the supported blocks ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Architecture:
    name: str
    module: str  # transformers module holding both classes
    block: str
    block_mixin: type
    router_attr: str
    router: str
    router_mixin: type
    expert_layers: Optional[tuple[str, str]] = None  # (fc1, fc2) of experts kept as separate modules


_ARCHITECTURES = (
    _Architecture(
        "Mixtral",
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralSparseMoeBlock",
        _TopKBlock,
        "gate",
        "MixtralTopKRouter",
        _MixtralRouter,
    ),
    _Architecture(
        "Qwen2-MoE",
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        _Qwen2MoeBlock,
        "gate",
        "Qwen2MoeTopKRouter",
        _RoundedSoftmaxRouter,
    ),
    _Architecture(
        "Qwen3-MoE",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        _TopKBlock,
        "gate",
        "Qwen3MoeTopKRouter",
        _RoundedSoftmaxRouter,
    ),
    _Architecture(
        "OLMoE",
        "transformers.models.olmoe.modeling_olmoe",
        "OlmoeSparseMoeBlock",
        _TopKBlock,
        "gate",
        "OlmoeTopKRouter",
        _RoundedSoftmaxRouter,
    ),
    _Architecture(
        "GPT-OSS",
        "transformers.models.gpt_oss.modeling_gpt_oss",
        "GptOssMLP",
        _GptOssBlock,
        "router",
        "GptOssTopKRouter",
        _GptOssRouter,
    ),
    _Architecture(
        "DeepSeek-V3",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3MoE",
        _DeepseekV3Block,
        "gate",
        "DeepseekV3TopkRouter",
        _DeepseekV3Router,
    ),
    _Architecture(
        "SwitchTransformers",
        "transformers.models.switch_transformers.modeling_switch_transformers",
        "SwitchTransformersSparseMLP",
        _SwitchBlock,
        "router",
        "SwitchTransformersTop1Router",
        _SwitchRouter,
        ("wi", "wo"),
    ),
    _Architecture(
        "NLLB-MoE",
        "transformers.models.nllb_moe.modeling_nllb_moe",
        "NllbMoeSparseMLP",
        _NllbBlock,
        "router",
        "NllbMoeTop2Router",
        _NllbRouter,
        ("fc1", "fc2"),
    ),
)
_BY_BLOCK = {(a.module, a.block): a for a in _ARCHITECTURES}
SUPPORTED_BLOCKS = tuple(f"{a.block} ({a.name})" for a in _ARCHITECTURES)

_FUSED_PREFIX = "MoeInfer"
_FUSED_CLASSES: dict = {}


def _fused_class(base: type, mixin: type) -> type:
    """``MoeInfer<Base>``: the mixin's forward in front of the original class (cached, picklable)."""
    name = _FUSED_PREFIX + base.__name__
    cls = _FUSED_CLASSES.get(name)
    if cls is None:
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_moe_infer_original": base})
        _FUSED_CLASSES[name] = cls
    return cls


def __getattr__(name: str):
    # Lets pickle find a fused class in a process that has not called optimize yet.
    if name.startswith(_FUSED_PREFIX):
        import importlib

        for arch in _ARCHITECTURES:
            for cls_name, mixin in ((arch.block, arch.block_mixin), (arch.router, arch.router_mixin)):
                if name == _FUSED_PREFIX + cls_name:
                    return _fused_class(getattr(importlib.import_module(arch.module), cls_name), mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` did: module name -> architecture, and module name -> why it was left alone."""

    replaced: dict = dataclasses.field(default_factory=dict)
    already_optimized: dict = dataclasses.field(default_factory=dict)
    skipped: dict = dataclasses.field(default_factory=dict)
    buffers: dict = dataclasses.field(default_factory=dict)  # experts module name -> ExpertBuffer
    expert_parallel: bool = False
    huge_page_bytes: int = 0  # expert weights moved onto 2 MiB pages (moe_infer.host_memory)

    def __str__(self) -> str:
        counts: dict = {}
        for arch in self.replaced.values():
            counts[arch] = counts.get(arch, 0) + 1
        done = ", ".join(f"{n} x {arch}" for arch, n in counts.items())
        lines = [
            f"moe_infer.optimize: replaced {len(self.replaced)} sparse MoE block(s)" + (f" ({done})" if done else "")
        ]
        if self.already_optimized:
            lines[0] += f"; {len(self.already_optimized)} already optimized"
        if self.huge_page_bytes:
            lines.append(f"  moved {self.huge_page_bytes / 2**20:.0f} MiB of expert weights onto 2 MiB pages")
        if self.buffers:
            slots = sorted({buffer.num_slots for buffer in self.buffers.values()})
            lines.append(
                f"  attached expert buffers to {len(self.buffers)} experts module(s) "
                f"({'/'.join(map(str, slots))} slots per layer)"
            )
        if self.expert_parallel:
            blocks = len(self.replaced) + len(self.already_optimized)
            lines.append(f"  spread the experts of {blocks} block(s) over the process group")
        lines += [f"  left as is: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _architecture_of(module: nn.Module) -> Optional[_Architecture]:
    cls = type(module)
    return _BY_BLOCK.get((cls.__module__, cls.__name__))


# block.__dict__: the _ExpertsSnapshot of the modules its experts backend was built from.
_FUSED_EXPERTS = "_moe_infer_fused_experts"


def _attach_experts(block: nn.Module, arch: _Architecture) -> None:
    """The block's experts backend (moe_infer.experts.ExpertsBackend), kept out of the module tree
    (the checkpoint's parameters and names stay as they are): the experts here, or their buffer.
    NotImplementedError (nothing changed) for experts our ops do not compute."""
    if arch.expert_layers is None:
        source = ModuleSpec(block.experts)  # raises for an unsupported layout or activation
        block.__dict__.pop("_moe_infer_stack", None)
    else:
        source = block.__dict__["_moe_infer_stack"] = _ExpertStack(block.experts, *arch.expert_layers, owner=arch.block)
    block.__dict__["experts_backend"] = getattr(block.experts, "expert_buffer", None) or LocalExperts(source)
    block.__dict__[_FUSED_EXPERTS] = _ExpertsSnapshot(block)


def _set_options(block: nn.Module, arch: _Architecture, hf_capacity: bool, validate: bool) -> None:
    """optimize()'s keywords on a fused block and its router (again where it is called again)."""
    router = getattr(block, arch.router_attr)
    block._moe_infer_hf_capacity = router._moe_infer_hf_capacity = hf_capacity
    router._moe_infer_validate = validate


def _prepare(block: nn.Module, arch: _Architecture, hf_capacity: bool, validate: bool) -> None:
    """Checks that the block is computable by our ops (NotImplementedError if not), then swaps the classes."""
    router = getattr(block, arch.router_attr)
    if type(router).__name__ != arch.router or type(router).__module__ != arch.module:
        raise NotImplementedError(f"moe_infer: its router is a {type(router).__name__}, expected {arch.router}")
    _attach_experts(block, arch)
    _set_options(block, arch, hf_capacity, validate)
    router.__class__ = _fused_class(type(router), arch.router_mixin)
    block.__class__ = _fused_class(type(block), arch.block_mixin)


def optimize(
    model: nn.Module,
    *,
    hf_capacity: bool = False,
    validate: bool = True,
    verbose: bool = True,
    expert_buffer: Optional[int] = None,
    buffer_policy: str = "paper",
    checkpoint: Optional[str] = None,
    ep_group: Optional[Any] = None,
    ep_placement: Optional[Any] = None,
    huge_pages: bool = True,
) -> nn.Module:
    """Runs every supported sparse MoE block of a transformers v5 model on moe_infer's fused ops, in place.

    Supported (each with its exact routing): Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE,
    GPT-OSS, DeepSeek-V3 (sigmoid, selection bias, group-limited top-k, shared experts),
    SwitchTransformers and NLLB-MoE. Parameters, buffers and their names are unchanged (no weight
    is held twice, except in one stacked copy of SwitchTransformers' / NLLB-MoE's per-expert
    modules; ``huge_pages`` moves weights, it does not duplicate them); router logits are still
    recorded for ``output_router_logits``.

    Args:
        model: a transformers model (or any module containing supported blocks).
        hf_capacity: SwitchTransformers / NLLB-MoE only: reproduce transformers' expert capacity and
            its dropped tokens exactly. By default routing is capacity-free (dynamic gating), which is
            identical wherever transformers drops nothing.
        validate: check router logits for NaN (on CUDA on the device, raised by a later call: no sync).
        verbose: print what was replaced.
        expert_buffer: keep every block's experts in host memory (or, with ``checkpoint``, in the
            safetensors files of a ``save_pretrained`` directory, read through mmap) with this many
            expert slots per layer on the compute device (:mod:`moe_infer.buffer`; inference only;
            blocks with stacked experts, i.e. not SwitchTransformers / NLLB-MoE).
        buffer_policy: the buffers' eviction policy ("paper", "fifo", "lru", "lfu").
        ep_group: a torch.distributed process group: every block's experts are spread over its
            ranks (:class:`moe_infer.distributed.ExpertParallelExperts`, dynamic all-to-alls;
            inference only). Every rank calls optimize and the model together.
        ep_placement: the :class:`moe_infer.placement.Placement` of every block (default contiguous).
        huge_pages: move the experts' weights of the replaced blocks that are on the CPU (and
            computed there: no expert_buffer, no ep_group) onto 2 MiB pages
            (:mod:`moe_infer.host_memory`; a copy each, in place of the original). Decode reads
            them about 1.5x as fast where Linux grants such pages.

    Returns:
        ``model`` itself, with ``model.moe_infer_report`` (an :class:`OptimizeReport`).

    Raises:
        ValueError: the model has no supported sparse MoE block (the message lists them).
    """
    # Everything that can be refused is refused before the first block changes.
    if expert_buffer is not None and ep_group is not None:
        raise ValueError("moe_infer.optimize: expert_buffer and ep_group cannot be combined")
    if expert_buffer is not None:
        separate = [name for name, module in model.named_modules() if _separate_experts_block(module)]
        if separate:
            raise ValueError(
                f"moe_infer.optimize: expert_buffer needs stacked experts; {', '.join(separate)} keep one module per "
                "expert (SwitchTransformers / NLLB-MoE)"
            )
    report = OptimizeReport()
    for name, module in model.named_modules():
        original = getattr(type(module), "_moe_infer_original", None)
        if original is not None:
            arch = _BY_BLOCK.get((original.__module__, original.__name__))
            if arch is not None:
                report.already_optimized[name] = arch.name
                _set_options(module, arch, hf_capacity, validate)
                if _experts_replaced(module):  # since optimize(): fuse the new ones
                    try:
                        _attach_experts(module, arch)
                    except NotImplementedError as error:
                        report.skipped[name] = f"{error} (its experts run in transformers' forward)"
            continue
        arch = _architecture_of(module)
        if arch is None:
            continue
        try:
            _prepare(module, arch, hf_capacity, validate)
        except NotImplementedError as error:
            report.skipped[name] = str(error)
            continue
        report.replaced[name] = arch.name
    if not report.replaced and not report.already_optimized:
        found = "".join(f"\n  {name}: {why}" for name, why in report.skipped.items())
        raise ValueError(
            f"moe_infer.optimize: {type(model).__name__} has no supported sparse MoE block"
            f"{' (found, but not computable by moe_infer:' + found + ')' if found else ''}. "
            f"Supported blocks: {', '.join(SUPPORTED_BLOCKS)}. For other transformers v5 models whose experts "
            f"use @use_experts_implementation, try model.set_experts_implementation({EXPERTS_IMPLEMENTATION!r})."
        )
    if expert_buffer is not None:
        from ..buffer import attach_expert_buffers

        report.buffers = attach_expert_buffers(model, expert_buffer, buffer_policy, checkpoint)
    else:  # buffers attached by an earlier optimize(model, expert_buffer=N): still the ones in use
        for name in report.already_optimized:
            buffer = model.get_submodule(name).experts.__dict__.get("expert_buffer")
            if buffer is not None:
                report.buffers[f"{name}.experts"] = buffer
    if ep_group is not None:
        from ..distributed import ExpertParallelExperts

        for name in [*report.replaced, *report.already_optimized]:
            block = model.get_submodule(name)
            source = getattr(block, "_moe_infer_stack", None) or ModuleSpec(block.experts)
            # Read as they are, no copy; each rank then keeps only its own experts' weights.
            block.__dict__["experts_backend"] = ExpertParallelExperts(
                source.expert_spec(), ep_placement, ep_group, validate=False
            )
        report.expert_parallel = True
    if huge_pages:
        # Experts computed here on the CPU, by their module's own parameters (not buffered, not
        # spread over ranks: those backends hold the tensors they were given; a stacked copy is
        # on 2 MiB pages already, and its per-expert modules are not the experts' own parameters).
        for name in [*report.replaced, *report.already_optimized]:
            block = model.get_submodule(name)
            if isinstance(block.__dict__.get("experts_backend"), LocalExperts):
                report.huge_page_bytes += host_memory.to_huge_pages(block.experts, recurse=False)
    for name in report.already_optimized:  # an experts implementation chosen since gives way again
        model.get_submodule(name).__dict__.pop(_HANDED_OVER, None)
    model.moe_infer_report = report
    if verbose:
        print(report)
    return model


def _separate_experts_block(module: nn.Module) -> bool:
    """A SwitchTransformers / NLLB-MoE block (one module per expert), optimized or not."""
    cls = getattr(type(module), "_moe_infer_original", None) or type(module)
    arch = _BY_BLOCK.get((cls.__module__, cls.__name__))
    return arch is not None and arch.name in ("SwitchTransformers", "NLLB-MoE")


def _without_fused(cls: type, fused: type, original: type) -> type:
    """``cls`` with the fused class among its bases replaced by the original: a class made on top
    of the fused one since optimize(), e.g. torch.nn.utils.parametrize's ``Parametrized<fused>``
    (its properties compute the parametrized tensors), rebuilt on top of the original."""
    if cls is fused:
        return original
    bases = tuple(_without_fused(b, fused, original) if issubclass(b, fused) else b for b in cls.__bases__)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__.replace(fused.__name__, original.__name__), bases, namespace)


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`optimize`: every fused block and router runs transformers' own forward again."""
    for module in model.modules():
        cls = type(module)
        original = getattr(cls, "_moe_infer_original", None)
        if original is not None:
            fused = next(c for c in cls.__mro__ if c.__dict__.get("_moe_infer_original") is original)
            module.__class__ = _without_fused(cls, fused, original)
    return model
