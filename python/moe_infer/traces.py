"""Routing traces: which experts each MoE layer chose, batch by batch.

A :class:`RoutingTrace` is what expert caches (buffering) and placement (load balancing) are studied
on. It comes from a recorder on a real model, or from :func:`synthetic_trace`, whose knobs set the
three properties that matter to them: skew across experts, temporal locality across batches, and
co-activation of experts within a token.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import ops
from ._saved import load_saved_dict
from .experts import is_transformers_experts
from .layer import MoELayer


@dataclass
class RoutingTrace:
    """Expert choices of ``num_layers`` MoE layers over a sequence of batches.

    Attributes:
        num_experts: E.
        top_k: experts per token.
        layers: ``layers[l][b]`` is an int32 tensor [tokens_in_batch_b, top_k] of expert ids
            (-1 = the pair was not routed, e.g. a padding token).
        meta: free-form description (how the trace was made).
    """

    num_experts: int
    top_k: int
    layers: list[list[torch.Tensor]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_batches(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def expert_counts(self, layer: int) -> torch.Tensor:
        """[num_batches, E] int64: tokens routed to each expert in each batch of one layer."""
        rows = []
        for ids in self.layers[layer]:
            flat = ids.reshape(-1).long()
            rows.append(torch.bincount(flat[flat >= 0], minlength=self.num_experts))
        return torch.stack(rows) if rows else torch.zeros(0, self.num_experts, dtype=torch.long)

    def active_experts(self, layer: int, batch: int) -> list[int]:
        """Sorted ids of the experts that get at least one token in that batch."""
        ids = self.layers[layer][batch].reshape(-1)
        return torch.unique(ids[ids >= 0]).tolist()

    def save(self, path: str) -> None:
        payload = {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "meta": dict(self.meta),
            "layers": [[ids.to(torch.int32).cpu() for ids in batches] for batches in self.layers],
        }
        torch.save(payload, path)

    @classmethod
    def load(cls, path: str) -> "RoutingTrace":
        payload = load_saved_dict(path, "RoutingTrace.load", "routing trace", {"num_experts", "top_k", "layers"})
        trace = cls(int(payload["num_experts"]), int(payload["top_k"]), payload["layers"], payload.get("meta", {}))
        trace.validate()
        return trace

    def validate(self) -> None:
        """Raises ValueError if any batch has the wrong shape or out-of-range ids."""
        for layer, batches in enumerate(self.layers):
            if len(batches) != self.num_batches:
                raise ValueError(
                    f"RoutingTrace: layer {layer} has {len(batches)} batches, layer 0 has {self.num_batches}"
                )
            for b, ids in enumerate(batches):
                if ids.dim() != 2 or ids.shape[1] != self.top_k:
                    raise ValueError(
                        f"RoutingTrace: layer {layer} batch {b} has shape {tuple(ids.shape)}, expected [tokens, {self.top_k}]"
                    )
                if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_experts):
                    raise ValueError(f"RoutingTrace: layer {layer} batch {b} has ids outside [-1, {self.num_experts})")


def zipf_weights(num_experts: int, skew: float) -> torch.Tensor:
    """Popularity of the expert of rank r (1-based): proportional to r ** -skew, normalised."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    weights = ranks.pow(-skew)
    return weights / weights.sum()


def synthetic_trace(
    num_experts: int,
    top_k: int,
    num_batches: int,
    tokens_per_batch: int,
    num_layers: int = 1,
    skew: float = 1.0,
    locality: float = 0.5,
    coactivation: float = 0.0,
    cluster_size: int = 4,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> RoutingTrace:
    """A synthetic routing trace with controlled skew, temporal locality and co-activation.

    Knobs:
        skew: Zipf exponent s of expert popularity (expert of rank r has weight r**-s). 0 = uniform;
            1 = classic Zipf; larger = a few hot experts take most tokens. Which expert holds which
            rank is a random permutation per layer.
        locality: in [0, 1], how long a hot set lasts. Each expert has a score that follows a
            Gaussian AR(1) walk, ``score = locality * score + sqrt(1 - locality**2) * noise`` per
            batch, and the batch's popularity is the Zipf weights assigned by score rank. So every
            batch has exactly the Zipf skew, and only which experts are hot drifts: 1 = the same
            distribution every batch; 0 = a new hot set every batch; in between, ranks decorrelate
            over about ``1 / (1 - locality)`` batches (0.99: ~100 batches).
        coactivation: in [0, 1). A token draws its first expert from the batch's popularity; its
            other top_k - 1 experts are drawn without replacement with weights multiplied by
            ``1 / (1 - coactivation)`` inside the first expert's cluster (experts are grouped in
            fixed clusters of ``cluster_size`` experts, drawn per layer and kept in
            ``meta["clusters"][layer][expert]``). 0 = no co-activation beyond popularity.
        seed / generator: reproducibility (a generator, if given, wins).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"synthetic_trace: top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
    if num_batches < 0 or tokens_per_batch < 0 or num_layers < 1:
        raise ValueError("synthetic_trace: num_batches and tokens_per_batch must be >= 0, num_layers >= 1")
    if not 0.0 <= locality <= 1.0:
        raise ValueError(f"synthetic_trace: locality ({locality}) must be in [0, 1]")
    if not 0.0 <= coactivation < 1.0:
        raise ValueError(f"synthetic_trace: coactivation ({coactivation}) must be in [0, 1)")
    if skew < 0 or cluster_size < 1:
        raise ValueError("synthetic_trace: skew must be >= 0 and cluster_size >= 1")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    base = zipf_weights(num_experts, skew)
    boost = 1.0 / (1.0 - coactivation)
    layers, clusters = [], []
    for _ in range(num_layers):
        cluster_of = torch.empty(num_experts, dtype=torch.long)
        cluster_of[torch.randperm(num_experts, generator=gen)] = torch.arange(num_experts) // cluster_size
        clusters.append(cluster_of.tolist())
        score = torch.randn(num_experts, generator=gen, dtype=torch.float64)
        noise_scale = (1.0 - locality * locality) ** 0.5
        batches = []
        for _ in range(num_batches):
            score = locality * score + noise_scale * torch.randn(num_experts, generator=gen, dtype=torch.float64)
            popularity = torch.empty_like(base)
            popularity[torch.argsort(score, descending=True, stable=True)] = base
            batches.append(_draw_batch(popularity, cluster_of, top_k, tokens_per_batch, boost, gen))
        layers.append(batches)
    meta = dict(
        kind="synthetic",
        skew=skew,
        locality=locality,
        coactivation=coactivation,
        cluster_size=cluster_size,
        tokens_per_batch=tokens_per_batch,
        seed=seed,
        clusters=clusters,
    )
    return RoutingTrace(num_experts, top_k, layers, meta)


def _draw_batch(popularity, cluster_of, top_k, num_tokens, boost, gen) -> torch.Tensor:
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32)
    if num_tokens == 0:
        return ids
    first = torch.multinomial(popularity.expand(num_tokens, -1), 1, generator=gen).squeeze(1)
    ids[:, 0] = first.to(torch.int32)
    if top_k > 1:
        same_cluster = cluster_of.unsqueeze(0) == cluster_of[first].unsqueeze(1)  # [T, E]
        weights = popularity.unsqueeze(0) * torch.where(same_cluster, boost, 1.0)
        weights.scatter_(1, first.unsqueeze(1), 0.0)
        rest = torch.multinomial(weights, top_k - 1, replacement=False, generator=gen)
        ids[:, 1:] = rest.to(torch.int32)
    return ids


class RoutingRecorder:
    """Records which experts each MoE layer chose, batch by batch, into a :class:`RoutingTrace`.

    One forward call of a layer is one batch. Works on moe_infer :class:`~moe_infer.MoELayer`
    (a hook on its router recomputes the layer's top-k with the same op, so the ids are the
    layer's own) and on transformers v5 models (a pre-hook on each experts module reads the
    ``top_k_index`` its sparse block passes in; a block fused by ``moe_infer.optimize`` runs
    transformers' forward while the hook is there, which calls it). Layers are ordered as
    ``model.named_modules()``.

        with RoutingRecorder(model) as recorder:
            model(inputs)
        recorder.trace.save("trace.pt")
    """

    def __init__(self, model: torch.nn.Module):
        self._hooks = []  # (name, module, kind) of every MoE layer
        for name, module in model.named_modules():
            if isinstance(module, MoELayer):
                self._hooks.append((name, module, "moe_infer"))
            elif is_transformers_experts(module):
                self._hooks.append((name, module, "hf"))
        if not self._hooks:
            raise ValueError(
                "RoutingRecorder: the model has no MoE layer (moe_infer.MoELayer or a transformers experts module)"
            )
        self.names = [name for name, _, _ in self._hooks]
        self.num_experts: Optional[int] = None
        self.top_k: Optional[int] = None
        self.batches: list[list[torch.Tensor]] = [[] for _ in self._hooks]
        self._handles = []

    def _record(self, layer: int, ids: torch.Tensor, num_experts: int) -> None:
        ids = ids.detach().reshape(-1, ids.shape[-1]).to("cpu", torch.int32)
        if self.num_experts is None:
            self.num_experts, self.top_k = num_experts, ids.shape[1]
        elif (num_experts, ids.shape[1]) != (self.num_experts, self.top_k):
            raise ValueError(
                f"RoutingRecorder: layer '{self.names[layer]}' has E={num_experts}, k={ids.shape[1]} but earlier "
                f"layers have E={self.num_experts}, k={self.top_k}; a trace holds one shape"
            )
        self.batches[layer].append(ids)

    def start(self) -> "RoutingRecorder":
        for index, (_, module, kind) in enumerate(self._hooks):
            if kind == "moe_infer":

                def on_logits(gate, args, logits, layer=module, index=index):
                    _, ids = ops.topk_gating(
                        logits,
                        layer.top_k,
                        layer.scoring,
                        layer.renormalize,
                        layer.selection_bias,
                        layer.scaling_factor,
                        layer.n_group,
                        layer.topk_group,
                    )
                    self._record(index, ids, layer.num_experts)

                self._handles.append(module.gate.register_forward_hook(on_logits))
            else:

                def on_experts(experts, args, kwargs, index=index):
                    ids = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
                    self._record(index, ids, experts.down_proj.shape[0])

                self._handles.append(module.register_forward_pre_hook(on_experts, with_kwargs=True))
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def trace(self) -> RoutingTrace:
        """The batches recorded so far (every layer must have run the same number of batches)."""
        counts = {len(b) for b in self.batches}
        if len(counts) > 1:
            raise ValueError(
                f"RoutingRecorder: layers recorded different numbers of batches {dict(zip(self.names, map(len, self.batches)))}"
            )
        trace = RoutingTrace(self.num_experts or 0, self.top_k or 0, [list(b) for b in self.batches])
        trace.meta = dict(kind="recorded", layers=list(self.names))
        return trace
