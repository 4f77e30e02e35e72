"""Expert load balancing: placements of experts on ranks, the algorithms that plan them, the load
recorder they are planned from, and the metrics they are judged by.

A :class:`Placement` gives every rank ``slots_per_rank`` physical expert slots and says which
logical expert sits in each (``slot_expert`` [num_ranks, slots_per_rank] int32, -1 = empty). An
expert in several slots is replicated: its tokens are split across its replicas.

Algorithms (the C++ op ``torch.ops.moe_infer.expert_placement``), through :func:`plan_placement`:

- ``"contiguous"``: rank r holds experts [r*E/R, (r+1)*E/R), the default of every MoE framework;
- ``"greedy"`` (the paper's): experts by mean historical load, descending, each to the least-loaded
  rank that still has a free slot;
- ``"anti_correlation"`` (the paper's): the same, but an expert's cost on a rank adds
  ``correlation_weight`` (0.5) x its Pearson correlation with the experts already there, so experts
  that fire together are split apart;
- ``replicate=True`` (DeepSeek EPLB's rule): spare slots go, one at a time, to the expert with the
  largest load per replica; then the replicas are packed as above;
- ``num_nodes > 1`` (hierarchical): expert groups are spread over nodes first, then each node
  replicates and packs its experts into its own GPUs.

Metrics, over the batches of a trace (the paper's protocol plans on the first half and measures on
the second): Max Load (the largest share of a batch's tokens on one rank, over all batches), Avg
Max Load (its mean over batches) and balancedness (mean / max tokens per rank, averaged over
batches, as vLLM and SGLang report it).
"""

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._saved import load_saved_dict

_ops = torch.ops.moe_infer

ALGORITHMS = ("contiguous", "greedy", "anti_correlation")


class Placement:
    """Which logical expert sits in each physical slot of each rank.

    Args:
        slot_expert: [num_ranks, slots_per_rank] integer tensor (or nested lists); entry (r, s) is
            the logical expert in slot s of rank r, or -1 for an empty slot. Every expert must be
            in at least one slot. Physical slot ids are rank-major: ``r * slots_per_rank + s``.
        num_experts: E.

    Raises ValueError on an expert on no rank, an id out of range, or a bad shape.
    """

    def __init__(self, slot_expert, num_experts: int):
        slot_expert = torch.as_tensor(slot_expert)
        if slot_expert.dim() != 2 or slot_expert.numel() == 0:
            raise ValueError(
                f"Placement: slot_expert must be a non-empty [num_ranks, slots_per_rank] table, got shape {tuple(slot_expert.shape)}"
            )
        if slot_expert.is_floating_point() or slot_expert.is_complex() or slot_expert.dtype == torch.bool:
            raise ValueError(f"Placement: slot_expert must hold integer expert ids, got {slot_expert.dtype}")
        if num_experts < 1:
            raise ValueError(f"Placement: num_experts ({num_experts}) must be >= 1")
        slot_expert = slot_expert.to(device="cpu", dtype=torch.int64)  # checked before int32, which wraps
        bad = (slot_expert < -1) | (slot_expert >= num_experts)
        if bad.any():
            r, s = bad.nonzero()[0].tolist()
            raise ValueError(
                f"Placement: slot ({r}, {s}) holds expert {int(slot_expert[r, s])}, expected -1 (empty) or [0, {num_experts})"
            )
        slot_expert = slot_expert.to(torch.int32).contiguous()
        flat = slot_expert.flatten().long()
        replicas = torch.bincount(flat[flat >= 0], minlength=num_experts)
        if (replicas == 0).any():
            missing = (replicas == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"Placement: expert {missing[0]} is on no rank ({len(missing)} of {num_experts} experts are missing: "
                f"{missing[:8]}{'...' if len(missing) > 8 else ''})"
            )
        self.slot_expert = slot_expert
        self.num_experts = num_experts
        self.replica_count = replicas.to(torch.int32)
        # expert_slots[e, j]: physical slot of expert e's j-th replica (in slot order), -1 padded.
        slots_of = [[] for _ in range(num_experts)]
        for slot, expert in enumerate(flat.tolist()):
            if expert >= 0:
                slots_of[expert].append(slot)
        max_replicas = int(replicas.max())
        self.expert_slots = torch.tensor([s + [-1] * (max_replicas - len(s)) for s in slots_of], dtype=torch.int32)

    @property
    def num_ranks(self) -> int:
        return self.slot_expert.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.slot_expert.shape[1]

    @property
    def num_slots(self) -> int:
        return self.slot_expert.numel()

    @property
    def max_replicas(self) -> int:
        return self.expert_slots.shape[1]

    def rank_experts(self, rank: int) -> list[int]:
        """Logical experts in the slots of one rank (-1 for an empty slot)."""
        return self.slot_expert[rank].tolist()

    def ranks_of_expert(self, expert: int) -> list[int]:
        """Ranks holding a replica of ``expert``, one entry per replica."""
        slots = self.expert_slots[expert]
        return (slots[slots >= 0] // self.slots_per_rank).tolist()

    def fingerprint(self) -> int:
        """A 31-bit checksum of (num_experts, slot table): equal placements have equal fingerprints."""
        header = torch.tensor([self.num_experts, *self.slot_expert.shape], dtype=torch.int32)
        payload = header.numpy().tobytes() + self.slot_expert.numpy().tobytes()
        return zlib.crc32(payload) & 0x7FFFFFFF

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Placement)
            and self.num_experts == other.num_experts
            and torch.equal(self.slot_expert, other.slot_expert)
        )

    def __repr__(self) -> str:
        rows = "; ".join(f"rank {r}: {self.rank_experts(r)}" for r in range(self.num_ranks))
        return f"Placement(num_experts={self.num_experts}, {rows})"

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, slots_per_rank: Optional[int] = None) -> "Placement":
        """Rank r holds experts [r*E/R, (r+1)*E/R)."""
        return plan_placement(torch.ones(num_experts), num_ranks, slots_per_rank, "contiguous")

    @classmethod
    def from_rank_experts(
        cls, rank_experts: Sequence[Sequence[int]], num_experts: int, slots_per_rank: Optional[int] = None
    ) -> "Placement":
        """From the list of experts of each rank (``[[0, 3], [1, 2]]``).

        ``slots_per_rank`` defaults to the longest list; a rank listing more experts than that is
        rejected (capacity overflow); shorter lists are padded with empty slots.
        """
        longest = max((len(experts) for experts in rank_experts), default=0)
        slots = longest if slots_per_rank is None else slots_per_rank
        if slots < 1:
            raise ValueError(f"Placement: slots_per_rank ({slots}) must be >= 1")
        table = torch.full((len(rank_experts), slots), -1, dtype=torch.int32)
        for rank, experts in enumerate(rank_experts):
            if len(experts) > slots:
                raise ValueError(
                    f"Placement: rank {rank} is given {len(experts)} experts but has only {slots} slots (capacity overflow)"
                )
            table[rank, : len(experts)] = torch.tensor(list(experts), dtype=torch.int32)
        return cls(table, num_experts)

    def state_dict(self) -> dict:
        return {"num_experts": self.num_experts, "slot_expert": self.slot_expert.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Placement":
        return cls(state["slot_expert"], int(state["num_experts"]))


def plan_placement(
    expert_load: torch.Tensor,
    num_ranks: int,
    slots_per_rank: Optional[int] = None,
    algorithm: str = "greedy",
    replicate: bool = False,
    correlation: Optional[torch.Tensor] = None,
    correlation_weight: float = 0.5,
    num_nodes: int = 1,
    expert_group: Optional[torch.Tensor] = None,
) -> Placement:
    """Plans a placement of E experts on ``num_ranks`` ranks from their historical load.

    Args:
        expert_load: [E] mean tokens per expert (any non-negative scale), e.g.
            :meth:`LoadRecorder.load`.
        num_ranks: R.
        slots_per_rank: expert slots on each rank (its memory budget in experts); default
            ceil(E / R). Must satisfy E <= R * slots_per_rank.
        algorithm: "contiguous", "greedy" or "anti_correlation".
        replicate: fill the spare slots (R * slots_per_rank - E) with replicas of hot experts.
        correlation: [E, E] Pearson correlation of expert loads (:meth:`LoadRecorder.correlation`),
            needed by "anti_correlation".
        correlation_weight: the weight of the correlation in the anti-correlation cost (paper: 0.5).
        num_nodes: > 1 for hierarchical placement (ranks r*R/N.. (r+1)*R/N - 1 form one node).
        expert_group: [E] group id of each expert (equal-size groups, a multiple of num_nodes of
            them, e.g. DeepSeek-V3's routing groups or co-activation clusters): with num_nodes > 1,
            whole groups go to one node. Default: each expert alone.
    """
    load = torch.as_tensor(expert_load).detach().to("cpu", torch.float64)
    if slots_per_rank is None:
        slots_per_rank = -(-load.numel() // max(num_ranks, 1))
    if correlation is not None:
        correlation = torch.as_tensor(correlation).detach().to("cpu")
    if expert_group is not None:
        expert_group = torch.as_tensor(expert_group).detach().to("cpu")
    table = _ops.expert_placement(
        load,
        num_ranks,
        slots_per_rank,
        algorithm,
        replicate,
        correlation,
        correlation_weight,
        num_nodes,
        expert_group,
    )
    return Placement(table, load.numel())


# ---- metrics ------------------------------------------------------------------------------------


def rank_loads(placement: Placement, expert_counts: torch.Tensor) -> torch.Tensor:
    """Tokens per rank: [B, E] (or [E]) counts -> [B, R] (or [R]) float64.

    A replicated expert's tokens are split evenly over its replicas (what the expert-parallel
    layer does, up to rounding).
    """
    counts = torch.as_tensor(expert_counts).to(torch.float64)
    if counts.shape[-1] != placement.num_experts:
        raise ValueError(f"rank_loads: counts have {counts.shape[-1]} experts, placement has {placement.num_experts}")
    slots = placement.slot_expert.flatten().long()
    occupied = slots >= 0
    per_replica = counts / placement.replica_count.to(torch.float64)
    slot_load = torch.zeros(*counts.shape[:-1], slots.numel(), dtype=torch.float64)
    slot_load[..., occupied] = per_replica[..., slots[occupied]]
    return slot_load.view(*counts.shape[:-1], placement.num_ranks, placement.slots_per_rank).sum(-1)


@dataclass
class LoadMetrics:
    """max_load: the largest share of a batch's tokens on one rank, over the batches; avg_max_load:
    that share averaged over batches; balancedness: mean / max tokens per rank, averaged over
    batches (1.0 = perfectly even). Batches without tokens are left out."""

    max_load: float
    avg_max_load: float
    balancedness: float


def load_metrics(loads: torch.Tensor) -> LoadMetrics:
    """Metrics of per-batch rank loads [B, R] (:func:`rank_loads`)."""
    loads = torch.as_tensor(loads).to(torch.float64)
    if loads.dim() == 1:
        loads = loads.unsqueeze(0)
    total = loads.sum(-1)
    loads = loads[total > 0]
    if loads.shape[0] == 0:
        raise ValueError("load_metrics: no batch has any tokens")
    busiest = loads.max(-1).values
    share = busiest / loads.sum(-1)
    return LoadMetrics(
        max_load=share.max().item(),
        avg_max_load=share.mean().item(),
        balancedness=(loads.mean(-1) / busiest).mean().item(),
    )


def pearson_correlation(samples: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the columns of samples [N, E] -> [E, E] float64.

    A column that never varies correlates 0 with every other column (and 1 with itself).
    """
    x = samples.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    cov = x.t() @ x
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = std.unsqueeze(0) * std.unsqueeze(1)
    corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    return corr


# ---- load recorder ------------------------------------------------------------------------------


class LoadRecorder:
    """Per-layer, per-expert token counts: a sliding window of the last ``window`` batches and an
    exponential moving average, from which loads and co-activation correlations are read.

    Counting stays on the device of the expert ids (no host sync); reading moves to the CPU.

    Args:
        num_layers, num_experts: L, E.
        window: batches kept per layer.
        ema_decay: ``ema = decay * ema + (1 - decay) * counts`` (the first batch initialises it).
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 128, ema_decay: float = 0.9):
        if num_layers < 1 or num_experts < 1 or window < 1:
            raise ValueError(
                f"LoadRecorder: num_layers ({num_layers}), num_experts ({num_experts}) and window ({window}) must be >= 1"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"LoadRecorder: ema_decay ({ema_decay}) must be in [0, 1)")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self.ema_decay = ema_decay
        self.counts = torch.zeros(num_layers, window, num_experts, dtype=torch.int64)
        self.ema = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.steps = [0] * num_layers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"LoadRecorder: layer {layer} is out of range [0, {self.num_layers})")

    def record(self, layer: int, expert_ids: torch.Tensor, validate: bool = True) -> None:
        """Adds one batch of one layer: expert ids [tokens, k] (-1 = unrouted, ignored).

        ``validate`` checks the ids are in [-1, E) (one host sync on CUDA); without it an id out
        of range is undefined behaviour on CUDA."""
        self._check_layer(layer)
        flat = expert_ids.reshape(-1).long() + 1
        if validate and flat.numel() > 0:
            bad = (flat < 0) | (flat > self.num_experts)
            if bad.any():
                where = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"LoadRecorder.record: expert_ids has {int(flat[where]) - 1} (flat index {where}); "
                    f"expected -1 (unrouted) or an expert in [0, {self.num_experts})"
                )
        # Bin 0 collects the unrouted pairs; index_add_ keeps it free of host syncs on CUDA.
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        self.record_counts(layer, counts[1:])

    def record_counts(self, layer: int, counts: torch.Tensor) -> None:
        """Adds one batch of one layer as per-expert token counts [E]."""
        self._check_layer(layer)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"LoadRecorder: counts must have shape [{self.num_experts}], got {tuple(counts.shape)}")
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(f"LoadRecorder: counts must be integer token counts, got {counts.dtype}")
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"LoadRecorder: counts must be >= 0, got {int(counts.min())}")
        if self.counts.device != counts.device:
            self.counts = self.counts.to(counts.device)
            self.ema = self.ema.to(counts.device)
        self.counts[layer, self.steps[layer] % self.window] = counts
        decay = self.ema_decay if self.steps[layer] > 0 else 0.0
        self.ema[layer].mul_(decay).add_(counts.to(torch.float64), alpha=1.0 - decay)
        self.steps[layer] += 1

    def window_counts(self, layer: int) -> torch.Tensor:
        """[batches in window, E] int64 on the CPU, oldest first."""
        self._check_layer(layer)
        filled = min(self.steps[layer], self.window)
        start = self.steps[layer] % self.window if self.steps[layer] >= self.window else 0
        order = (torch.arange(filled) + start) % self.window
        return self.counts[layer].cpu()[order]

    def load(self, layer: int, source: str = "window") -> torch.Tensor:
        """[E] float64: mean tokens per batch over the window ("window") or the EMA ("ema")."""
        if source == "ema":
            self._check_layer(layer)
            return self.ema[layer].cpu().clone()
        if source != "window":
            raise ValueError(f"LoadRecorder.load: source must be 'window' or 'ema', got '{source}'")
        counts = self.window_counts(layer)
        if counts.shape[0] == 0:
            return torch.zeros(self.num_experts, dtype=torch.float64)
        return counts.to(torch.float64).mean(0)

    def correlation(self, layer: int) -> torch.Tensor:
        """[E, E] Pearson correlation of the experts' per-batch token counts over the window.

        Positive for experts that are busy in the same batches (co-activated): on one rank they
        make that rank the straggler of those batches, which anti-correlation placement avoids.
        """
        return pearson_correlation(self.window_counts(layer))

    def plan(self, layer: int, num_ranks: int, source: str = "window", **options) -> Placement:
        """:func:`plan_placement` from this layer's recorded load (and correlation when needed)."""
        if options.get("algorithm") == "anti_correlation" and options.get("correlation") is None:
            options["correlation"] = self.correlation(layer)
        return plan_placement(self.load(layer, source), num_ranks, **options)

    def all_reduce(self, group=None) -> "LoadRecorder":
        """Sums the counts of every rank of ``group`` into this recorder (each rank records its own
        tokens; the placement must be planned from the global load). Every rank must call it."""
        import torch.distributed as dist

        world_size = dist.get_world_size(group)
        # The shapes first, in a message of one size on every rank: collectives of different sizes
        # abort gloo. Every rank sees every rank's, so all raise the same error.
        shape = torch.tensor([self.num_layers, self.window, self.num_experts], dtype=torch.int64)
        shape = shape.to(self.counts.device)
        shapes = [torch.empty_like(shape) for _ in range(world_size)]
        dist.all_gather(shapes, shape, group=group)
        if any(not torch.equal(s, shapes[0]) for s in shapes):
            found = ", ".join(f"rank {r}: {tuple(s.tolist())}" for r, s in enumerate(shapes))
            raise ValueError(
                f"LoadRecorder.all_reduce: the ranks' recorders differ in (num_layers, window, num_experts): {found}"
            )
        steps = torch.tensor(self.steps, dtype=torch.int64, device=self.counts.device)
        gathered = [torch.empty_like(steps) for _ in range(world_size)]
        dist.all_gather(gathered, steps, group=group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise ValueError("LoadRecorder.all_reduce: ranks recorded different numbers of batches")
        dist.all_reduce(self.counts, group=group)
        dist.all_reduce(self.ema, group=group)
        return self

    def state_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "window": self.window,
            "ema_decay": self.ema_decay,
            "counts": self.counts.cpu().clone(),
            "ema": self.ema.cpu().clone(),
            "steps": list(self.steps),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = (self.num_layers, self.window, self.num_experts)
        if tuple(state["counts"].shape) != expected:
            raise ValueError(
                f"LoadRecorder: saved counts have shape {tuple(state['counts'].shape)}, this recorder has {expected}"
            )
        if tuple(state["ema"].shape) != (self.num_layers, self.num_experts) or len(state["steps"]) != self.num_layers:
            raise ValueError(
                f"LoadRecorder: saved ema {tuple(state['ema'].shape)} and steps ({len(state['steps'])}) do not match "
                f"this recorder's {self.num_layers} layers of {self.num_experts} experts"
            )
        self.counts = state["counts"].to(self.counts.device, torch.int64)
        self.ema = state["ema"].to(self.ema.device, torch.float64)
        self.steps = [int(s) for s in state["steps"]]

    def save(self, path: str) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load_file(cls, path: str) -> "LoadRecorder":
        keys = {"num_layers", "num_experts", "window", "ema_decay", "counts", "ema", "steps"}
        state = load_saved_dict(path, "LoadRecorder.load_file", "load record", keys)
        recorder = cls(int(state["num_layers"]), int(state["num_experts"]), int(state["window"]), state["ema_decay"])
        recorder.load_state_dict(state)
        return recorder

    @classmethod
    def from_trace(cls, trace, batches: Optional[range] = None, ema_decay: float = 0.9) -> "LoadRecorder":
        """A recorder fed with (a range of) the batches of a :class:`moe_infer.traces.RoutingTrace`,
        its window holding all of them."""
        batches = range(trace.num_batches) if batches is None else batches
        recorder = cls(trace.num_layers, trace.num_experts, window=max(len(batches), 1), ema_decay=ema_decay)
        for layer in range(trace.num_layers):
            counts = trace.expert_counts(layer)
            for b in batches:
                recorder.record_counts(layer, counts[b])
        return recorder
