"""ExpertBuffer: one MoE layer's slot pool on the compute device, driven by the C++ cache."""

import threading
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import host_memory, ops
from ..experts import ExpertsBackend, ExpertSpec
from .checkpoint import _file_header, _file_identity
from .store import ExpertStore

LIVE_POLICIES = ("paper", "fifo", "lru", "lfu")


def _parameter_state(param: torch.Tensor) -> tuple:
    """(the parameter, its version, its data pointer): what _follow_parameters compares."""
    return param, param._version, param.data_ptr()


class ExpertBuffer(ExpertsBackend):
    """One MoE layer's slot pool on the compute device, and its cache (a C++ object): an
    :class:`moe_infer.experts.ExpertsBackend` (inference only).

    Args:
        store: the layer's :class:`ExpertStore`.
        num_slots: slots in the pool (at most ``store.num_experts`` are allocated).
        device: the compute device (the pool lives there).
        policy: "paper" (experts inactive in the batch first, then LIFO), "fifo", "lru", "lfu".
        activation, weights_transposed, swiglu_alpha, swiglu_limit: as :func:`ops.grouped_mlp`.
        copy_threads: CPU copy threads (ignored on CUDA: one side stream).
        overlap: compute the resident experts while the missing ones are copied.

    ``buffer.run(hidden [T, H], top_k_weights [T, k], top_k_index [T, k]) -> [T, H]`` is the
    backend protocol; ``buffer(hidden, top_k_index, top_k_weights)`` has the signature of a
    transformers v5 experts module. The expert weights are frozen (inference).

    Thread-safe: calls from several threads run one at a time. A buffer attached to a layer
    (:func:`attach_expert_buffer`) follows the layer's parameters: with a host store (the
    parameters are the store), an in-place change to them empties the pool and the next batch
    loads the new weights; with a file store, writing or replacing the parameters raises a
    RuntimeError at the next call, and so does a file changed on disk, except one rewritten with
    the same layout (same tensors at the same places), whose new bytes the pool then loads: never a
    silent mix of old and new weights. A buffer owns copy threads and a slot pool: it cannot be
    copied or pickled (save the state_dict and attach a new buffer).
    """

    inference_only = True

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "ExpertBuffer cannot be copied or pickled (it owns copy threads and a slot pool): save the model's "
            "state_dict and attach a new buffer"
        )

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        device: Union[str, torch.device, None] = None,
        policy: str = "paper",
        activation: str = "silu_glu",
        weights_transposed: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        copy_threads: int = 2,
        overlap: bool = True,
    ):
        if policy not in LIVE_POLICIES:
            hint = " ('belady' needs the future: use moe_infer.buffer.simulate)" if policy == "belady" else ""
            raise ValueError(f"ExpertBuffer: policy must be one of {LIVE_POLICIES}, got '{policy}'{hint}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"ExpertBuffer: activation must be one of {ops.ACTIVATIONS}, got '{activation}'")
        if num_slots < 1:
            raise ValueError(f"ExpertBuffer: num_slots ({num_slots}) must be >= 1")
        self.store = store
        self.device = torch.device(device if device is not None else "cpu")
        self.num_experts = store.num_experts
        self.num_slots = min(int(num_slots), store.num_experts)
        self.policy = policy
        self.activation = activation
        self.weights_transposed = weights_transposed
        self.swiglu_alpha = swiglu_alpha
        self.swiglu_limit = swiglu_limit
        self.overlap = overlap
        self._deferred_computes = 0  # deferred resident experts computed while a copy ran
        # One batch at a time: calls from several threads are serialised (the cache protocol of
        # begin_batch .. end_round is one sequence).
        self._lock = threading.RLock()
        # The parameters the layer exposes, as (module, name, parameter, version), so that a change
        # to them is followed (host store) or refused (file store): see _follow_parameters.
        self._watched: list[tuple[nn.Module, str, nn.Parameter, int]] = []
        # Each file the experts are read from: its (inode, size, mtime) and header when last seen.
        self._files = {
            piece.file: (_file_identity(piece.file), _file_header(piece.file))
            for part in store.parts
            for expert_pieces in store.pieces[part]
            for piece in expert_pieces
            if piece.file
        }
        if self.device.type == "cuda" and store.file_backed:
            warnings.warn(
                "ExpertBuffer: a file-backed store cannot be pinned, so copies to the GPU are synchronous; "
                "load the experts into pinned host memory (ExpertStore.from_tensors(..., pin_memory=True)) to overlap",
                stacklevel=2,
            )
        # Zero-filled, so the whole pool is committed memory from the start (an empty CPU tensor's
        # pages would only become resident as slots fill, hiding the pool's real size); on the CPU
        # on 2 MiB pages (moe_infer.host_memory: every step streams the slots it computes with).
        self.pools = {part: self._pool((self.num_slots, *store.shapes[part]), store.dtype) for part in store.parts}
        self._core = torch.classes.moe_infer.ExpertBuffer(
            self.num_experts, self.num_slots, policy, list(self.pools.values()), int(copy_threads)
        )
        for p, part in enumerate(self.pools):
            for e, expert_pieces in enumerate(store.pieces[part]):
                for piece in expert_pieces:
                    self._core.add_segment(
                        e, p, piece.source, piece.offset, piece.dest_offset, piece.num_bytes, piece.file, piece.offset
                    )
        self._core.finalize()
        # The slot pool as experts: slot s holds whichever expert the slot table maps there.
        self.spec = ExpertSpec(
            self.pools["fc1_weight"],
            self.pools.get("fc1_bias"),
            self.pools["fc2_weight"],
            self.pools.get("fc2_bias"),
            activation,
            weights_transposed,
            swiglu_alpha,
            swiglu_limit,
        )
        self.device = self.spec.fc1_weight.device  # with its index ("cuda" -> "cuda:0")
        self.hidden_size = self.spec.hidden_size

    # -- compute --

    def _pool(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return host_memory.empty(shape, dtype).zero_()
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden, top_k_index, top_k_weights)

    def run(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden, topk_ids, topk_weights)

    @torch.compiler.disable  # host-side cache decisions: a graph break under torch.compile
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k] (ids in [0, E) or -1), top_k_weights [T, k] -> [T, H]."""
        with self._lock:
            return self._forward(hidden, top_k_index, top_k_weights)

    def _forward(self, hidden, top_k_index, top_k_weights):
        self._check_inputs(hidden, top_k_index, top_k_weights)
        self._follow_parameters()
        num_experts = self.num_experts
        # The one host sync: which experts the batch needs, and whether any id is out of range
        # (clamped into the first and last buckets, in int64: int32 would wrap ids of 2**31 on).
        counts = torch.bincount(
            top_k_index.reshape(-1).to(torch.int64, copy=True).clamp_(-2, num_experts).add_(2),
            minlength=num_experts + 3,
        ).cpu()
        edges = counts.numpy()  # (numpy: a tensor's items cost microseconds each)
        if edges[0] or edges[num_experts + 2]:
            raise ValueError(f"ExpertBuffer: top_k_index has ids outside [-1, {num_experts})")
        counts = counts[2 : num_experts + 2]  # the experts
        ids = top_k_index if top_k_index.dtype == torch.int32 else top_k_index.to(torch.int32)
        top_k = ids.shape[1]
        self._core.begin_batch(counts)
        try:
            return self._run_batch(hidden, ids, top_k_weights, counts, top_k)
        except BaseException:
            self._core.cancel_batch()
            raise

    def _run_batch(self, hidden, ids, weights, counts, top_k):
        rows = out = None  # once the batch takes more than one compute: its rows sorted by expert id
        # Resident experts whose slots the batch never refills wait here to be computed while a
        # later round's copies run (with LIFO, the misses after the first round take turns in one
        # slot, so only other experts' compute can hide their copies).
        deferred: list[tuple[int, int]] = []  # (expert, slot)
        first = True
        while True:
            ready, loading, num_ready, num_loading, last = self._core.next_round()
            if first and last and (num_loading == 0 or not self.overlap or num_ready == 0):
                # The common case: one compute over the whole batch, exactly the resident layer's ops.
                if num_loading:
                    self._core.wait_round()
                table = ready if num_loading == 0 else torch.maximum(ready, loading)
                rows, row_of_pair = self._compute(hidden, table[ids], top_k)
                self._core.end_round()
                return ops.unpermute_combine(rows, weights, row_of_pair)
            if rows is None:
                plan = ops.dispatch_plan(ids, self.num_experts, validate=False)
                rows = ops.permute(hidden, plan.sorted_pair_ids, top_k)
                out = torch.empty_like(rows)
                ends = torch.cumsum(counts, 0).tolist()
                out[ends[-1] :].zero_()  # unrouted pairs (id -1) sort last and contribute nothing
                bounds = [(end - int(n), end) for end, n in zip(ends, counts.tolist())]  # rows of each expert
            slot_of = self._core.slot_table().tolist()
            ready_experts, loading_experts, deferrable = self._core.round_experts()
            if num_loading and not self.overlap:
                self._core.wait_round()
                ready_experts, loading_experts = sorted(ready_experts + loading_experts), []
            elif self.overlap and not last:
                later = set(deferrable)
                deferred += [(e, slot_of[e]) for e in ready_experts if e in later]
                ready_experts = [e for e in ready_experts if e not in later]
            self._compute_experts(rows, out, bounds, [(e, slot_of[e]) for e in ready_experts])
            while loading_experts and deferred and not self._core.copies_done():
                self._compute_experts(rows, out, bounds, [deferred.pop(0)])
                self._deferred_computes += 1
            if loading_experts:
                self._core.wait_round()  # the resident experts were computed while these copied
                self._compute_experts(rows, out, bounds, [(e, slot_of[e]) for e in loading_experts])
            if last:
                self._compute_experts(rows, out, bounds, sorted(deferred))
            self._core.end_round()
            first = False
            if last:
                break
        return ops.unpermute_combine(out, weights, plan.row_of_pair)

    def _compute_experts(self, rows, out, bounds, experts):
        """Computes the rows of ``experts`` ((expert, slot) pairs, increasing expert) into ``out``.

        ``rows`` holds the batch's rows sorted by expert id and ``bounds[e]`` is expert e's range,
        so each expert's GEMMs see exactly the resident layer's rows. Experts whose rows are
        adjacent and whose slots increase go through one grouped_mlp call over the pool.
        """
        runs: list[list[tuple[int, int]]] = []
        for expert, slot in experts:
            if bounds[expert][0] == bounds[expert][1]:
                continue
            run = runs[-1] if runs else None
            if run is not None and bounds[run[-1][0]][1] == bounds[expert][0] and run[-1][1] < slot:
                run.append((expert, slot))
            else:
                runs.append([(expert, slot)])
        for run in runs:
            begin, end = bounds[run[0][0]][0], bounds[run[-1][0]][1]
            sizes = [0] * (self.num_slots + 1)
            for expert, slot in run:
                sizes[slot + 1] = bounds[expert][1] - bounds[expert][0]
            offsets = torch.tensor(sizes, dtype=torch.int32).cumsum_(0)
            out[begin:end] = self._grouped_mlp(rows[begin:end], offsets.to(rows.device, non_blocking=True))

    def _compute(self, hidden, slot_ids, top_k):
        """grouped_mlp over the pool for pairs routed to slots: (expert rows, row_of_pair)."""
        plan = ops.dispatch_plan(slot_ids, self.num_slots, validate=False)
        rows = ops.permute(hidden, plan.sorted_pair_ids, top_k)
        return self._grouped_mlp(rows, plan.expert_offsets), plan.row_of_pair

    def _grouped_mlp(self, rows, slot_offsets):
        """ops.grouped_mlp over the slot pool: slot s owns rows [slot_offsets[s], slot_offsets[s+1])."""
        return ops.grouped_mlp(rows, slot_offsets, self.spec)

    def watch_parameters(self, module: nn.Module, names: Mapping[str, str]) -> None:
        """Follows ``module``'s parameters {part: parameter name} (what attach_expert_buffer sets)."""
        self._watched = [(module, name, *_parameter_state(module._parameters[name])) for name in names.values()]

    def _follow_parameters(self) -> None:
        """A buffered layer follows its parameters: with a host store the parameters are the store,
        so an in-place change (``load_state_dict``, ``param.mul_()``) empties the pool and the next
        batch loads the new weights; a file store reads its files, so a change to the parameters or
        to the files is an error (never a silent mix of old and new weights). Not seen: a write
        through ``param.data`` in place (``param.data.copy_(...)``), which bypasses the version
        counter; call :meth:`clear` after one. ``param.data = tensor`` is seen, and an error."""
        changed = False
        for path, (identity, header) in self._files.items():
            now = _file_identity(path)
            if now == identity:
                continue
            # The slots may hold the old bytes: drop them all, so no batch mixes old and new weights.
            self._core.clear()
            if self.device.type != "cpu":
                raise RuntimeError(
                    f"ExpertBuffer: '{path}' changed on disk since the buffer was built; a {self.device.type} buffer "
                    "copies from its mapping of the file, so attach a new buffer to the new file"
                )
            if now[0] != identity[0]:
                raise RuntimeError(
                    f"ExpertBuffer: '{path}' was replaced on disk by another file since the buffer was built (the "
                    "copy threads read the file they opened); attach a new buffer to the new file"
                )
            if now[1] < identity[1] or _file_header(path) != header:
                raise RuntimeError(
                    f"ExpertBuffer: '{path}' changed on disk since the buffer was built and no longer has the same "
                    f"tensors at the same places (its header differs, or it shrank from {identity[1]} to {now[1]} "
                    "bytes); restore it or attach a new buffer to the new file"
                )
            self._files[path] = (now, header)  # the same layout: follow the new bytes
        for i, (module, name, param, version, data) in enumerate(self._watched):
            if module._parameters.get(name) is not param or param.data_ptr() != data:
                raise RuntimeError(
                    f"ExpertBuffer: the layer's parameter '{name}' was replaced (load_state_dict(assign=True), an "
                    "assignment, or param.data = ...); the buffer copies experts from its store, not from the new "
                    "tensor. Attach a new buffer to the new weights."
                )
            if param._version != version:
                if self.store.file_backed:
                    raise RuntimeError(
                        f"ExpertBuffer: the layer's parameter '{name}' was written, but its experts are read from "
                        f"{self.store.description}; write the new weights to a file and attach a new buffer"
                    )
                self._watched[i] = (module, name, *_parameter_state(param))
                changed = True
        if changed:
            self._core.clear()  # the host store holds the new weights: reload them on demand

    def _check_inputs(self, hidden, ids, weights):
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"ExpertBuffer: hidden must be [tokens, {self.hidden_size}], got {list(hidden.shape)}")
        if hidden.dtype != self.store.dtype:
            raise ValueError(f"ExpertBuffer: hidden is {hidden.dtype} but the experts are {self.store.dtype}")
        if hidden.device != self.device:
            raise ValueError(
                f"ExpertBuffer: hidden is on {hidden.device} but the slot pool is on {self.device} "
                "(attach the buffer after moving the model)"
            )
        if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
            raise ValueError(
                f"ExpertBuffer: top_k_index {list(ids.shape)} and top_k_weights {list(weights.shape)} must both be "
                f"[tokens ({hidden.shape[0]}), k]"
            )
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ExpertBuffer: top_k_index must be int32 or int64, got {ids.dtype}")
        self.refuse_gradients(hidden, weights)

    # -- cache control --

    def prefetch(self, experts: Union[Sequence[int], torch.Tensor], is_prediction: bool = False) -> int:
        """Starts loading ``experts`` (most wanted first) into the pool without waiting; returns
        how many copies started. Victims are chosen by the policy among residents not requested.
        With ``is_prediction``, the set is also scored against the next batch's active experts
        (precision and recall in :meth:`stats`)."""
        if isinstance(experts, torch.Tensor):
            if experts.is_floating_point() or experts.is_complex():
                raise ValueError(f"ExpertBuffer.prefetch: expert ids must be integers, got {experts.dtype}")
            experts = experts.reshape(-1).tolist()
        with self._lock:
            self._follow_parameters()
            return int(self._core.prefetch([int(e) for e in experts], bool(is_prediction)))

    def warm_start(self, tokens_per_expert: torch.Tensor, batches_active: Optional[torch.Tensor] = None) -> list[int]:
        """Empties the pool and fills it with the experts that received the most tokens (a saved
        activation profile); LFU's frequencies start from ``batches_active`` (or the token counts).
        Waits for the copies. Returns the experts loaded."""
        counts = {"tokens_per_expert": tokens_per_expert, "batches_active": batches_active}
        for name, values in counts.items():
            values = None if values is None else torch.as_tensor(values)
            if values is not None and (values.dim() != 1 or values.numel() != self.num_experts):
                raise ValueError(
                    f"ExpertBuffer.warm_start: {name} must be [{self.num_experts}] (one count per expert), "
                    f"got {list(values.shape)}"
                )
            if values is not None and values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise ValueError(f"ExpertBuffer.warm_start: {name} has NaN or infinite counts")
        tokens = torch.as_tensor(tokens_per_expert).long()
        order = sorted(range(self.num_experts), key=lambda e: (-int(tokens[e]), e))
        chosen = [e for e in order[: self.num_slots] if tokens[e] > 0]
        frequency = tokens if batches_active is None else torch.as_tensor(batches_active).reshape(-1).long()
        with self._lock:
            self._follow_parameters()
            self._core.warm_start(chosen, frequency)
        return chosen

    def clear(self) -> None:
        """Empties every slot (e.g. after the store's weights changed)."""
        with self._lock:
            self._core.clear()

    def synchronize(self) -> None:
        """Waits for every copy started so far."""
        with self._lock:
            self._core.synchronize()

    def slot_table(self) -> torch.Tensor:
        """int32 [E]: each expert's slot, -1 if not resident."""
        return self._core.slot_table()

    def resident_experts(self) -> list[int]:
        return [e for e, slot in enumerate(self.slot_table().tolist()) if slot >= 0]

    def activation_counts(self) -> dict[str, torch.Tensor]:
        """{"tokens": [E] tokens routed to each expert, "batches": [E] batches it was active in}."""
        counts = self._core.activation_counts()
        return {"tokens": counts[0], "batches": counts[1]}

    @property
    def pool_bytes(self) -> int:
        """Bytes of the slot pool on the device."""
        return sum(t.numel() * t.element_size() for t in self.pools.values())

    def stats(self) -> dict[str, float]:
        """Counters since the last :meth:`reset_stats`: hits, misses, evictions, loads (misses +
        prefetches + warm loads), bytes_copied, copy_time_s (sum over copies), stall_time_s (the
        compute waiting for copies), rounds, prefetches, prefetch_hits, prefetch_unused, and the
        prediction accuracy (precision, recall of predicted vs actual active experts).
        ``deferred_computes``: resident experts whose compute was moved behind a later copy."""
        raw = dict(self._core.stats())
        raw["deferred_computes"] = self._deferred_computes
        out: dict[str, float] = {k: v for k, v in raw.items() if not k.endswith("_ns")}
        out["copy_time_s"] = raw["copy_ns"] * 1e-9
        out["stall_time_s"] = raw["stall_ns"] * 1e-9
        accesses = raw["hits"] + raw["misses"]
        out["hit_rate"] = raw["hits"] / accesses if accesses else float("nan")
        tp, fp, fn = raw["predicted_tp"], raw["predicted_fp"], raw["predicted_fn"]
        out["precision"] = tp / (tp + fp) if tp + fp else float("nan")
        out["recall"] = tp / (tp + fn) if tp + fn else float("nan")
        return out

    def reset_stats(self) -> None:
        self._core.reset_stats()
        self._deferred_computes = 0

    def __repr__(self) -> str:
        return (
            f"ExpertBuffer(slots={self.num_slots}/{self.num_experts}, policy={self.policy}, device={self.device}, "
            f"pool={self.pool_bytes / 2**20:.1f} MiB, store={self.store.description})"
        )
