"""Expert parallelism over torch.distributed (gloo between CPU processes, NCCL between GPUs).

The E experts of a layer are spread over the ranks of a process group by a
:class:`~moe_infer.placement.Placement` (physical expert slots, replicas allowed). Each rank routes
its own tokens, and then (dynamic gating, the paper's Technique 1 across devices):

1. maps every (token, slot) pair to a physical slot (a replicated expert's pairs are dealt to its
   replicas in turn, starting at a rank-dependent replica, so the split is even and deterministic);
2. ``dispatch_plan`` over the physical slots + ``permute``: rows grouped by slot, hence by rank;
3. an all-to-all of the per-slot counts, then one host sync for the split sizes;
4. a variable-size ``all_to_all_single`` of exactly the routed rows (no capacity, no placeholder);
5. ``grouped_mlp`` over the local slots (the same expert compute as everywhere in the library);
6. the reverse all-to-all and ``unpermute_combine`` with the gate weights.

The static baseline (``mode="static"``, as fairseq/GShard) pads every physical slot to a capacity
C agreed by all ranks, sends a fixed-size all-to-all of num_slots * C * H elements whatever the
load, computes the placeholders, and drops pairs over capacity.

Ranks may hold different numbers of tokens, or none. Every collective goes through one wrapper that
turns a failure (a peer that died, or hung past the process group's ``timeout``) into an
:class:`ExpertParallelError` naming the step; construction runs a handshake that checks that every
rank agrees on the world size, the placement and the layer's shapes.

Inference only: the forward runs without autograd (a tensor that requires grad is refused).
"""

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .experts import ExpertsBackend, ExpertSpec, MoEExperts, check_layer_input, expert_spec, parameters_spec
from .layer import MoELayer
from .placement import LoadRecorder, Placement

MODES = ("dynamic", "static")


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed: a peer rank died, hung past the process
    group's timeout, or the ranks disagree on the layer's configuration."""


# ---- the static (capacity) baseline: capacity and slot positions, isolated -------------------------


def _encode_setting(value) -> int:
    """A setting as one int64: ints (and bools) as they are, floats by their bit pattern, names and
    dtypes by their CRC-32."""
    if isinstance(value, (str, torch.dtype)):
        return zlib.crc32(str(value).encode())
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return int(value)


def _decode_setting(example, encoded: int):
    """The readable form of an encoded setting (``example``: a value of the same kind)."""
    if isinstance(example, float):
        return struct.unpack("<d", struct.pack("<q", encoded))[0]
    if isinstance(example, (str, torch.dtype)):
        known = (*MODES, *ops.ACTIVATIONS, *ops.SCORINGS, *map(str, _DTYPES))
        return next((repr(n) for n in known if zlib.crc32(n.encode()) == encoded), f"an unknown value #{encoded}")
    return encoded


def static_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float = 1.0, capacity_fraction: float = 0.0
) -> int:
    """Rows per physical slot per source rank in the static baseline: :func:`moe_infer.ops.static_capacity`
    (fairseq's formulas, the one capacity of the library), with ``capacity_fraction`` as fairseq's
    ``moe_eval_capacity_token_fraction``.

    ``capacity_fraction > 0``: ceil(fraction * S); otherwise int(capacity_factor * top_k * ceil(S / E))
    (fairseq's top-1 is int(cf * ceil(S/E)), its top-2 is 2 * ceil(S/E)). S is the largest token count
    of any rank, so all ranks agree.
    """
    return ops.static_capacity(
        num_tokens, num_experts, top_k, capacity_factor, capacity_fraction, eval_mode=capacity_fraction > 0
    )


def static_slot_positions(physical_slots: torch.Tensor, num_slots: int, capacity: int) -> torch.Tensor:
    """Row of each pair in the static [num_slots * capacity] dispatch buffer, or -1 if dropped.

    physical_slots [S, k] int32 (-1 = unrouted). As fairseq, all first choices are placed before
    all second choices, each in token order; a pair beyond its slot's capacity is dropped.
    Returns [S, k] int64.
    """
    num_tokens, top_k = physical_slots.shape
    choice_major = physical_slots.t().reshape(-1, 1)  # pair order: (choice, token)
    plan = ops.dispatch_plan(choice_major, num_slots, validate=False)
    slots = choice_major.view(-1).long()
    routed = slots >= 0
    position = plan.row_of_pair.long() - plan.expert_offsets.long()[slots.clamp_min(0)]
    row = torch.where(routed & (position < capacity), slots * capacity + position, -1)
    return row.view(top_k, num_tokens).t()


# ---- the expert-parallel experts ------------------------------------------------------------------


@dataclass
class ExchangeStats:
    """What the last forward moved (this rank): rows it sent to / received from the all-to-all
    (its own included), bytes it sent to other ranks (dispatch + return), pairs dropped (static)."""

    rows_sent: int = 0
    rows_received: int = 0
    bytes_sent: int = 0
    dropped_pairs: int = 0
    capacity: int = 0


@dataclass
class RebalanceReport:
    """What :meth:`ExpertParallelExperts.rebalance` did, over all ranks: expert copies sent between
    ranks and their bytes, and slots refilled from a copy the rank already held."""

    experts_moved: int
    bytes_moved: int
    slots_kept_local: int


class ExpertParallelExperts(nn.Module, ExpertsBackend):
    """The experts of one MoE layer spread over the ranks of a process group: an
    :class:`moe_infer.experts.ExpertsBackend` (inference only, collective).

    Built from the full experts (every rank passes the same ones, e.g. loaded from a checkpoint);
    each rank keeps only the weights of its own slots. Collective: every rank of ``group`` must
    construct it, call it and rebalance it together.

    Args:
        experts: the experts (all E of them): a :class:`moe_infer.experts.ExpertSpec` or an
            experts module (:func:`moe_infer.experts.expert_spec`).
        placement: the expert -> slots table; default contiguous with ceil(E / R) slots per rank.
        group: the process group (default: the world).
        mode: "dynamic" (variable-size all-to-all, no capacity) or "static" (fairseq's baseline).
        capacity_factor, capacity_fraction: the static mode's capacity (:func:`static_capacity`).
        recorder, layer_index: if given, every forward records this rank's expert counts in
            ``recorder`` (see :meth:`LoadRecorder.all_reduce` before planning from it).
        validate: check the expert ids' range on the host.

    forward(hidden [S, H], topk_weights [S, k], expert_ids [S, k] int, -1 = unrouted) -> [S, H].
    """

    inference_only = True
    collective = True

    def __init__(
        self,
        experts: Union[ExpertSpec, nn.Module],
        placement: Optional[Placement] = None,
        group=None,
        mode: str = "dynamic",
        capacity_factor: float = 1.0,
        capacity_fraction: float = 0.0,
        recorder: Optional[LoadRecorder] = None,
        layer_index: int = 0,
        validate: bool = True,
        local_only: bool = False,
        top_k: Optional[int] = None,
        routing: Optional[dict] = None,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelExperts: torch.distributed is not initialised (call init_process_group)")
        if mode not in MODES:
            raise ValueError(f"ExpertParallelExperts: mode must be one of {MODES}, got '{mode}'")
        if not (0 < capacity_factor < math.inf) or not (0 <= capacity_fraction < math.inf):
            raise ValueError(
                f"ExpertParallelExperts: capacity_factor ({capacity_factor}) must be finite and > 0 and "
                f"capacity_fraction ({capacity_fraction}) finite and >= 0"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        spec = experts if isinstance(experts, ExpertSpec) else expert_spec(experts)
        # local_only: `experts` holds just this rank's E / R experts (see from_local_experts).
        self.num_experts = spec.num_experts * (self.world_size if local_only else 1)
        self.hidden_size = spec.hidden_size
        self.ffn_size = spec.ffn_size
        self.activation, self.weights_transposed, self.swiglu_alpha, self.swiglu_limit = spec.options
        self.mode = mode
        self.capacity_factor = capacity_factor
        self.capacity_fraction = capacity_fraction
        self.recorder = recorder
        self.layer_index = layer_index
        self.validate = validate
        self.top_k = top_k
        self.last_stats = ExchangeStats()
        # Settings that change what is exchanged or computed, checked equal on every rank.
        self._settings = {
            "mode": mode,
            "capacity_factor": float(capacity_factor),
            "capacity_fraction": float(capacity_fraction),
            "top_k": -1 if top_k is None else int(top_k),
            "activation": spec.activation,
            "weights_transposed": bool(spec.weights_transposed),
            "swiglu_alpha": float(spec.swiglu_alpha),
            "swiglu_limit": float(spec.swiglu_limit),
            "expert biases": int(spec.fc1_bias is not None) + 2 * int(spec.fc2_bias is not None),
            "local_only": bool(local_only),
        }
        self._settings.update(routing or {})
        if placement is None:
            placement = Placement.contiguous(self.num_experts, self.world_size)
        self._handshake("construction", placement, spec.fc1_weight)
        if local_only:
            local = [(_PARAMS[part], t.detach()) for part, t in spec.tensors().items() if t is not None]
        else:
            local = self._local_weights(spec, placement.rank_experts(self.rank))
        self._param_names = [name for name, _ in local]
        for name, tensor in local:
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if name not in self._param_names:
                self.register_parameter(name, None)
        self._set_placement(placement)

    @classmethod
    def from_local_experts(
        cls, experts: Union[ExpertSpec, nn.Module], group=None, **options
    ) -> "ExpertParallelExperts":
        """Each rank passes only its own E / R experts (as fairseq's per-rank checkpoint shards hold
        them): rank r serves experts [r * E / R, (r + 1) * E / R) (the contiguous placement), and
        the weights are used as they are, without a full copy anywhere."""
        if "placement" in options:
            raise ValueError("ExpertParallelExperts.from_local_experts: the placement is contiguous by construction")
        return cls(experts, None, group, local_only=True, **options)

    # -- placement bookkeeping ----------------------------------------------------------------

    def _set_placement(self, placement: Placement) -> None:
        device = self.gate_up_proj.device
        self.placement = placement
        self.slots_per_rank = placement.slots_per_rank
        self.num_slots = placement.num_slots
        self.register_buffer("slot_expert", placement.slot_expert.clone(), persistent=True)
        self.register_buffer("_expert_slots", placement.expert_slots.to(device, torch.long), persistent=False)
        self.register_buffer("_replica_count", placement.replica_count.to(device, torch.long), persistent=False)

    @staticmethod
    def _local_weights(spec: ExpertSpec, slot_experts: list[int]) -> list[tuple[str, torch.Tensor]]:
        """Copies of the experts' weights for the given slots (zeros in empty slots)."""
        index = torch.tensor([max(e, 0) for e in slot_experts], dtype=torch.long)
        empty = torch.tensor([e < 0 for e in slot_experts])
        local = []
        for part, full in spec.tensors().items():
            if full is None:
                continue
            tensor = full.detach().index_select(0, index.to(full.device))
            tensor[empty.to(full.device)] = 0
            local.append((_PARAMS[part], tensor))
        return local

    @property
    def spec(self) -> ExpertSpec:
        """This rank's slots as an :class:`ExpertSpec` (slot s: the expert the placement puts there)."""
        return parameters_spec(self)

    def _expert_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._param_names]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (and biases)."""
        return sum(t[0].numel() * t.element_size() for t in self._expert_tensors())

    # -- collectives --------------------------------------------------------------------------

    def _collective(self, step: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as error:  # gloo/NCCL raise RuntimeError subclasses with transport details
            raise ExpertParallelError(
                f"expert-parallel {step} failed on rank {self.rank} of {self.world_size}: a peer rank died, hung "
                f"past the process group's timeout, or called another collective ({type(error).__name__}: {error})"
            ) from error

    def _handshake(self, step: str, placement: Placement, reference: torch.Tensor) -> None:
        """Every rank shares what it believes; all raise the same clear error on any difference.

        The values travel as one int64 tensor of a fixed length whatever the settings (a float as
        its bit pattern), so the gather itself never disagrees on sizes."""
        fields = {
            "world size": self.world_size,
            "placement ranks": placement.num_ranks,
            "slots per rank": placement.slots_per_rank,
            "num_experts": placement.num_experts,
            "hidden_size": self.hidden_size,
            "ffn_size": self.ffn_size,
            "weight dtype": reference.dtype,
            "placement fingerprint": placement.fingerprint(),
            **self._settings,
        }
        # First the hash of the setting names, so ranks with other settings (a layer and bare
        # experts, or another code version) are told apart before the values are compared; the
        # tensor always has _HANDSHAKE_SLOTS entries.
        names = ["setting names", *fields]
        values = [zlib.crc32("|".join(fields).encode())] + [_encode_setting(v) for v in fields.values()]
        values += [0] * (_HANDSHAKE_SLOTS - len(values))
        # NCCL only moves CUDA tensors; gloo moves CPU (and some CUDA) tensors.
        nccl = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else reference.device
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective(f"handshake ({step})", dist.all_gather, gathered, mine)
        table = [g.tolist() for g in gathered]
        if any(row[0] != table[0][0] for row in table):
            raise ExpertParallelError(
                f"expert-parallel handshake ({step}): the ranks disagree on setting names (they build different "
                "kinds of expert-parallel module, e.g. a whole MoE layer on some ranks and bare experts on others, "
                "or run different moe_infer versions)"
            )
        differences = []
        for i, name in enumerate(names):
            column = [row[i] for row in table]
            if any(v != column[0] for v in column):
                shown = ", ".join(f"rank {r} has {_decode_setting(fields.get(name), v)}" for r, v in enumerate(column))
                differences.append(f"{name} ({shown})")
        if differences:
            raise ExpertParallelError(
                f"expert-parallel handshake ({step}): the ranks disagree on {'; '.join(differences)}; every rank "
                "must build the layer with the same settings, placement and shapes"
            )
        if placement.num_ranks != self.world_size:
            raise ExpertParallelError(
                f"expert-parallel handshake ({step}): the placement is for {placement.num_ranks} ranks but the "
                f"process group has {self.world_size}"
            )
        if placement.num_experts != self.num_experts:
            raise ExpertParallelError(
                f"expert-parallel handshake ({step}): the placement has {placement.num_experts} experts, "
                f"the layer {self.num_experts}"
            )

    # -- forward ------------------------------------------------------------------------------

    def _check_inputs(self, hidden, topk_weights, expert_ids) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(
                f"ExpertParallelExperts: hidden must be [num_tokens, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if expert_ids.dim() != 2 or expert_ids.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"ExpertParallelExperts: expert_ids must be [num_tokens ({hidden.shape[0]}), top_k], got {tuple(expert_ids.shape)}"
            )
        if expert_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ExpertParallelExperts: expert_ids must be int32 or int64, got {expert_ids.dtype}")
        if self.top_k is not None and expert_ids.shape[1] != self.top_k:
            raise ValueError(
                f"ExpertParallelExperts: expert_ids has {expert_ids.shape[1]} columns but the layer was built with "
                f"top_k {self.top_k}"
            )
        if topk_weights.shape != expert_ids.shape:
            raise ValueError(
                f"ExpertParallelExperts: topk_weights {tuple(topk_weights.shape)} must match expert_ids {tuple(expert_ids.shape)}"
            )
        if hidden.dtype != self.gate_up_proj.dtype:
            raise ValueError(
                f"ExpertParallelExperts: hidden is {hidden.dtype} but the experts are {self.gate_up_proj.dtype}"
            )
        self.refuse_gradients(hidden, topk_weights)
        if self.validate and expert_ids.numel():
            low, high = torch.aminmax(expert_ids)
            low, high = int(low), int(high)
            if low < -1 or high >= self.num_experts:
                raise ValueError(
                    f"ExpertParallelExperts: expert_ids has values in [{low}, {high}], expected [-1, {self.num_experts})"
                )

    def physical_slots(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """[S, k] expert ids -> [S, k] int32 physical slots (-1 stays -1).

        The pairs of a replicated expert go to its replicas in turn (in token order), starting at
        replica ``rank mod replicas``: each rank splits evenly, and the ranks' remainders spread.
        """
        ids = expert_ids.long()
        safe = ids.clamp_min(0)
        if self.placement.max_replicas == 1:
            slots = self._expert_slots[safe, 0]
        else:
            plan = ops.dispatch_plan(expert_ids, self.num_experts, validate=False)
            ordinal = plan.row_of_pair.view_as(ids).long() - plan.expert_offsets.long()[safe]
            replica = (ordinal + self.rank) % self._replica_count[safe]
            slots = self._expert_slots[safe, replica]
        return torch.where(ids >= 0, slots, -1).to(torch.int32)

    def _compute(self, rows: torch.Tensor, slot_offsets: torch.Tensor) -> torch.Tensor:
        return ops.grouped_mlp(rows, slot_offsets, self.spec)

    # -- the experts backend protocol ---------------------------------------------------------

    def run(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self(hidden, topk_weights, topk_ids)

    def run_capacity(self, hidden, topk_weights, topk_ids, locations, capacity):
        kept = (locations >= 0) & (locations < capacity)
        return self.forward_static_positions(hidden, topk_weights, topk_ids.masked_fill(~kept, -1), locations, capacity)

    def agree_capacity(self, capacity: int) -> int:
        """The largest capacity of any rank (every rank calls it: the static all-to-all has equal splits)."""
        agreed = torch.tensor([capacity], dtype=torch.int64, device=self.gate_up_proj.device)
        self._collective("capacity all-reduce", dist.all_reduce, agreed, op=dist.ReduceOp.MAX)
        return int(agreed)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        self._check_inputs(hidden, topk_weights, expert_ids)
        if self.recorder is not None:
            self.recorder.record(self.layer_index, expert_ids)
        with torch.no_grad():
            slots = self.physical_slots(expert_ids)
            if self.mode == "dynamic":
                return self._forward_dynamic(hidden, topk_weights, slots)
            return self._forward_static(hidden, topk_weights, slots)

    def _forward_dynamic(self, hidden, topk_weights, slots):
        num_tokens, top_k = slots.shape
        ranks, slots_per_rank = self.world_size, self.slots_per_rank
        plan = ops.dispatch_plan(slots, self.num_slots, validate=False)
        rows = ops.permute(hidden, plan.sorted_pair_ids, top_k)
        send_counts = plan.tokens_per_expert  # [R * S_local]: rows for slot s of rank r
        recv_counts = torch.empty_like(send_counts)  # [R * S_local]: rows from rank r for my slot s
        self._collective("counts all-to-all", dist.all_to_all_single, recv_counts, send_counts)
        # The one host sync of the dynamic path: the split sizes of the row all-to-alls.
        send_split, recv_split = torch.stack(
            [send_counts.view(ranks, slots_per_rank).sum(1), recv_counts.view(ranks, slots_per_rank).sum(1)]
        ).tolist()
        num_sent, num_received = sum(send_split), sum(recv_split)
        received = hidden.new_empty(num_received, self.hidden_size)
        self._collective(
            "dispatch all-to-all", dist.all_to_all_single, received, rows[:num_sent], recv_split, send_split
        )

        # Received rows come (source rank, slot)-major; the experts want them slot-major.
        if slots_per_rank == 1:
            slot_offsets = torch.tensor([0, num_received], dtype=torch.int32, device=hidden.device)
            expert_out = self._compute(received, slot_offsets)
        else:
            # Block (source, slot) b starts at row block_start[b]; a row's block is the number of
            # blocks starting at or before it, minus one (empty blocks share the next one's start).
            block_start = torch.cumsum(recv_counts, 0, dtype=torch.int32) - recv_counts
            starts = torch.zeros(num_received + 1, dtype=torch.int32, device=hidden.device)
            starts.index_add_(0, block_start, torch.ones_like(block_start))
            row_slot = (starts[:num_received].cumsum(0, dtype=torch.int32) - 1) % slots_per_rank
            local_plan = ops.dispatch_plan(row_slot.view(-1, 1), slots_per_rank, validate=False)
            grouped = ops.permute(received, local_plan.sorted_pair_ids, 1)
            expert_out = ops.permute(self._compute(grouped, local_plan.expert_offsets), local_plan.row_of_pair, 1)

        returned = hidden.new_empty(num_tokens * top_k, self.hidden_size)
        self._collective(
            "return all-to-all", dist.all_to_all_single, returned[:num_sent], expert_out, send_split, recv_split
        )
        returned[num_sent:].zero_()  # unrouted pairs contribute nothing
        row_bytes = self.hidden_size * hidden.element_size()
        off_rank = (num_sent - send_split[self.rank]) + (num_received - recv_split[self.rank])
        self.last_stats = ExchangeStats(num_sent, num_received, off_rank * row_bytes)
        return ops.unpermute_combine(returned, topk_weights, plan.row_of_pair)

    def forward_static_positions(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: torch.Tensor,
        positions: torch.Tensor,
        capacity: int,
    ) -> torch.Tensor:
        """The static exchange with the caller's own capacity and slot positions (e.g. from
        moe_infer's static_gating, as fairseq's layer computes them): ``positions`` [S, k] is each
        pair's row in its expert's buffer of ``capacity`` rows, outside [0, capacity) if dropped or
        unrouted. Needs a placement without replicas. Every rank must pass the same capacity."""
        self._check_inputs(hidden, topk_weights, expert_ids)
        if self.placement.max_replicas != 1:
            raise ValueError("forward_static_positions: the placement must not replicate experts")
        # The exchange's splits are capacity-sized: ranks that disagree would abort gloo, so every
        # rank learns the range first and all raise the same error.
        agreed = torch.tensor([capacity, -capacity], dtype=torch.int64, device=hidden.device)
        self._collective("capacity all-reduce", dist.all_reduce, agreed, op=dist.ReduceOp.MAX)
        if int(agreed[0]) != -int(agreed[1]):
            raise ExpertParallelError(
                f"forward_static_positions: the ranks disagree on capacity (from {-int(agreed[1])} to "
                f"{int(agreed[0])}); every rank must pass the same capacity"
            )
        with torch.no_grad():
            slots = self.physical_slots(expert_ids)
            positions = positions.long()
            kept = (slots >= 0) & (positions >= 0) & (positions < capacity)
            rows = torch.where(kept, slots.long() * capacity + positions, -1)
            return self._forward_static(hidden, topk_weights, slots, rows.reshape(-1), capacity)

    def _forward_static(self, hidden, topk_weights, slots, position=None, capacity=None):
        num_tokens, top_k = slots.shape
        ranks, slots_per_rank, hidden_size = self.world_size, self.slots_per_rank, self.hidden_size
        if position is None:
            # Capacity from the largest batch of any rank, so the all-to-all splits agree (fairseq
            # pads every rank's batch to the same size for the same reason).
            # top_k rides along (as k and -k): ranks with different k would size their buffers
            # differently, so every rank raises the same error before any exchange.
            agreed = torch.tensor([num_tokens, top_k, -top_k], dtype=torch.int64, device=hidden.device)
            self._collective("capacity all-reduce", dist.all_reduce, agreed, op=dist.ReduceOp.MAX)
            largest, max_k, min_k = agreed[0], int(agreed[1]), -int(agreed[2])
            if max_k != min_k:
                raise ExpertParallelError(
                    f"expert-parallel static forward: the ranks disagree on top_k (from {min_k} to {max_k}); every "
                    "rank must route with the same k"
                )
            # No rank has a token: nothing to size (and an empty exchange).
            capacity = (
                static_capacity(int(largest), self.num_experts, top_k, self.capacity_factor, self.capacity_fraction)
                if int(largest)
                else 0
            )
            position = static_slot_positions(slots, self.num_slots, capacity).reshape(-1)
        kept = position >= 0
        token_of_pair = torch.arange(num_tokens * top_k, device=hidden.device) // top_k
        dispatched = hidden.new_zeros(self.num_slots * capacity, hidden_size)  # placeholders included
        dispatched.index_copy_(0, position[kept], hidden.index_select(0, token_of_pair[kept]))
        received = torch.empty_like(dispatched)
        self._collective("dispatch all-to-all", dist.all_to_all_single, received, dispatched)
        # [source rank, slot, C, H] -> slot-major [slot, source rank, C, H] for the experts.
        block = (ranks, slots_per_rank, capacity, hidden_size)
        grouped = received.view(block).transpose(0, 1).reshape(-1, hidden_size)
        rows_per_slot = ranks * capacity
        slot_offsets = torch.arange(slots_per_rank + 1, dtype=torch.int32, device=hidden.device) * rows_per_slot
        expert_out = self._compute(grouped, slot_offsets)
        expert_out = (
            expert_out.view(slots_per_rank, ranks, capacity, hidden_size).transpose(0, 1).reshape(-1, hidden_size)
        )
        returned = torch.empty_like(expert_out)
        self._collective("return all-to-all", dist.all_to_all_single, returned, expert_out)
        pair_rows = returned.index_select(0, position.clamp_min(0))
        weights = topk_weights * kept.view(num_tokens, top_k)
        row_of_pair = torch.arange(num_tokens * top_k, dtype=torch.int32, device=hidden.device)
        block_rows = slots_per_rank * capacity
        dropped = int((slots.view(-1) >= 0).sum() - kept.sum())
        self.last_stats = ExchangeStats(
            rows_sent=self.num_slots * capacity,
            rows_received=self.num_slots * capacity,
            bytes_sent=2 * (ranks - 1) * block_rows * hidden_size * hidden.element_size(),
            dropped_pairs=dropped,
            capacity=capacity,
        )
        return ops.unpermute_combine(pair_rows, weights, row_of_pair)

    # -- rebalancing --------------------------------------------------------------------------

    def rebalance(self, placement: Placement) -> RebalanceReport:
        """Applies a new placement, moving only the expert weights a rank does not hold yet.

        A slot whose expert the rank already holds is refilled locally; every other slot receives
        the expert from a rank that holds it (point-to-point, the holders taking turns). Collective.
        """
        self._handshake("rebalance", placement, self.gate_up_proj)
        old, rank = self.placement, self.rank
        holders = [old.ranks_of_expert(e) for e in range(self.num_experts)]
        old_local = {e: s for s, e in reversed(list(enumerate(old.rank_experts(rank)))) if e >= 0}
        # Every rank derives the same list of moves: (destination rank, slot, expert, source rank).
        moves, kept_local = [], 0
        for dst in range(placement.num_ranks):
            for slot, expert in enumerate(placement.rank_experts(dst)):
                if expert < 0:
                    continue
                if dst in holders[expert]:
                    kept_local += 1
                else:
                    sources = sorted(set(holders[expert]))
                    moves.append((dst, slot, expert, sources[(dst + slot) % len(sources)]))
        tensors = self._expert_tensors()
        new_tensors = [t.new_zeros((placement.slots_per_rank, *t.shape[1:])) for t in tensors]
        for slot, expert in enumerate(placement.rank_experts(rank)):
            if expert in old_local:
                for new, current in zip(new_tensors, tensors):
                    new[slot] = current[old_local[expert]]
        sizes = [t[0].numel() for t in tensors]
        requests, receipts = [], []
        for tag, (dst, slot, expert, src) in enumerate(moves):
            if src == rank:
                payload = torch.cat([t[old_local[expert]].reshape(-1) for t in tensors])
                requests.append(dist.P2POp(dist.isend, payload, dst, self.group, tag))
            elif dst == rank:
                buffer = tensors[0].new_empty(sum(sizes))
                requests.append(dist.P2POp(dist.irecv, buffer, src, self.group, tag))
                receipts.append((slot, buffer))
        if requests:
            for work in self._collective("rebalance transfers", _batch_isend_irecv, requests):
                self._collective("rebalance transfers", _wait, work)
        for slot, buffer in receipts:
            for new, part in zip(new_tensors, buffer.split(sizes)):
                new[slot] = part.view(new.shape[1:])
        for name, new in zip(self._param_names, new_tensors):
            getattr(self, name).data = new
        self._set_placement(placement)
        return RebalanceReport(len(moves), len(moves) * self.expert_bytes(), kept_local)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rank={self.rank}/{self.world_size}, "
            f"slots={self.placement.rank_experts(self.rank)}, mode={self.mode}"
        )


def _batch_isend_irecv(requests, group=None):
    return dist.batch_isend_irecv(requests)


def _wait(work, group=None):
    work.wait()


_HANDSHAKE_SLOTS = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# ExpertSpec part -> this module's parameter (named as MoEExperts's).
_PARAMS = {
    "fc1_weight": "gate_up_proj",
    "fc1_bias": "gate_up_proj_bias",
    "fc2_weight": "down_proj",
    "fc2_bias": "down_proj_bias",
}


class ExpertParallelMoELayer(nn.Module):
    """A :class:`moe_infer.MoELayer` whose experts are spread over a process group.

    The router is replicated (every rank routes its own tokens with the same gate, shared with
    ``layer``); the experts are an :class:`ExpertParallelExperts` (``options`` go to it).
    ``forward(hidden [..., H]) -> [..., H]``, collective.
    """

    route = MoELayer.route  # the very routing of MoELayer (same gate, same options)

    def __init__(self, layer: MoELayer, placement: Optional[Placement] = None, group=None, **options):
        super().__init__()
        for name in (
            "hidden_size",
            "num_experts",
            "top_k",
            "activation",
            "scoring",
            "renormalize",
            "scaling_factor",
            "n_group",
            "topk_group",
            "swiglu_alpha",
            "swiglu_limit",
            "validate",
        ):
            setattr(self, name, getattr(layer, name))
        self.gate = layer.gate
        if layer.selection_bias is not None:
            self.register_buffer("selection_bias", layer.selection_bias)
        else:
            self.selection_bias = None
        # Ids come from topk_gating, always in range: the experts need not check them again.
        options.setdefault("validate", False)
        routing = {
            "scoring": self.scoring,
            "renormalize": bool(self.renormalize),
            "scaling_factor": float(self.scaling_factor),
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "selection_bias": self.selection_bias is not None,
        }
        self.experts = ExpertParallelExperts(
            layer.experts, placement, group, top_k=self.top_k, routing=routing, **options
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        check_layer_input("ExpertParallelMoELayer", hidden, self.hidden_size, self.gate.weight.dtype)
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size)
        _, weights, ids = self.route(x)
        return self.experts(x, weights, ids).view(shape)

    def rebalance(self, placement: Placement) -> RebalanceReport:
        return self.experts.rebalance(placement)


def expert_parallel(
    module: Union[MoELayer, MoEExperts], placement: Optional[Placement] = None, group=None, **options
) -> Union[ExpertParallelMoELayer, ExpertParallelExperts]:
    """The entry point for integrations: turns a :class:`MoELayer` into an
    :class:`ExpertParallelMoELayer`, or a :class:`MoEExperts` into an
    :class:`ExpertParallelExperts`, on ``group`` with ``placement`` (default contiguous).
    ``options``: mode, capacity_factor, capacity_fraction, recorder, layer_index, validate."""
    if isinstance(module, MoELayer):
        return ExpertParallelMoELayer(module, placement, group, **options)
    if isinstance(module, MoEExperts):
        return ExpertParallelExperts(module, placement, group, **options)
    raise TypeError(f"expert_parallel: expected a MoELayer or MoEExperts, got {type(module).__name__}")
