"""The trace-driven expert cache simulator (C++ core ``simulate_expert_cache``)."""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

POLICIES = ("paper", "fifo", "lru", "lfu", "belady")

_ops = torch.ops.moe_infer


def simulate_expert_cache(
    accesses: torch.Tensor,
    batch_offsets: torch.Tensor,
    num_experts: int,
    cache_sizes: Sequence[int],
    policies: Sequence[str],
) -> torch.Tensor:
    """Replays expert accesses against every (policy, cache size) pair (the C++ simulator).

    Args:
        accesses: [N] int32/int64 (CPU): each batch's active experts, increasing within a batch.
        batch_offsets: [B+1] int64 (CPU): batch b is ``accesses[batch_offsets[b]:batch_offsets[b+1]]``.
        num_experts: E.
        cache_sizes: slots per cache, each >= 1.
        policies: names from :data:`POLICIES` ("belady" is Belady's MIN, the offline optimum).

    Returns:
        int64 [len(policies), len(cache_sizes), 3]: (hits, misses, evictions).
    """
    return _ops.simulate_expert_cache(accesses, batch_offsets, num_experts, list(cache_sizes), list(policies))


def trace_accesses(trace, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of a :class:`moe_infer.traces.RoutingTrace` as the simulator's input:
    (accesses int64 [N]: each batch's active experts in increasing order, batch_offsets int64 [B+1])."""
    active = [torch.unique(ids[ids >= 0].long()) for ids in trace.layers[layer]]
    lengths = torch.tensor([len(a) for a in active], dtype=torch.long)
    offsets = torch.zeros(len(active) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    accesses = torch.cat(active) if active else torch.zeros(0, dtype=torch.long)
    return accesses, offsets


@dataclass
class SimulationResult:
    """Counts summed over the simulated layers, each layer with its own cache of each size."""

    policies: list[str]
    cache_sizes: list[int]
    counts: torch.Tensor  # int64 [P, C, 3]: hits, misses, evictions
    accesses: int
    expert_bytes: Optional[int] = None

    def misses(self, policy: str, cache_size: int) -> int:
        return int(self.counts[self.policies.index(policy), self.cache_sizes.index(cache_size), 1])

    def miss_rate(self, policy: str, cache_size: int) -> float:
        return self.misses(policy, cache_size) / max(self.accesses, 1)

    def rows(self) -> list[dict]:
        """One dict per (policy, cache size): hits, misses, evictions, miss_rate, bytes_moved."""
        out = []
        for p, policy in enumerate(self.policies):
            for c, size in enumerate(self.cache_sizes):
                hits, misses, evictions = (int(v) for v in self.counts[p, c])
                row = dict(policy=policy, cache_size=size, hits=hits, misses=misses, evictions=evictions)
                row["miss_rate"] = misses / max(self.accesses, 1)
                row["bytes_moved"] = misses * self.expert_bytes if self.expert_bytes is not None else None
                out.append(row)
        return out


def simulate(
    trace,
    cache_sizes: Optional[Sequence[int]] = None,
    policies: Sequence[str] = POLICIES,
    layers: Optional[Sequence[int]] = None,
    expert_bytes: Optional[int] = None,
) -> SimulationResult:
    """Replays a :class:`moe_infer.traces.RoutingTrace` against every policy and cache size.

    Each layer has its own cache; counts are summed over ``layers`` (default all). Belady's MIN
    ("belady") is the offline optimum, the floor of every other policy's misses. With
    ``expert_bytes``, ``rows()`` also gives the bytes moved (one expert per miss).
    """
    cache_sizes = list(cache_sizes) if cache_sizes is not None else list(range(1, trace.num_experts + 1))
    layers = list(layers) if layers is not None else list(range(trace.num_layers))
    total = torch.zeros(len(policies), len(cache_sizes), 3, dtype=torch.long)
    accesses = 0
    for layer in layers:
        flat, offsets = trace_accesses(trace, layer)
        total += simulate_expert_cache(flat, offsets, trace.num_experts, cache_sizes, policies)
        accesses += flat.numel()
    return SimulationResult(list(policies), cache_sizes, total, accesses, expert_bytes)
