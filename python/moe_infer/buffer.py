"""Expert buffering (the paper's Technique 2): experts off the compute device, a fixed slot pool on it.

Every expert's weights stay in an :class:`ExpertStore` (host memory, pinned when the compute device
is a GPU, or a safetensors file read through mmap). Each MoE layer gets an :class:`ExpertBuffer`: a
pool of ``num_slots`` expert slots on the compute device and a C++ cache
(``torch.classes.moe_infer.ExpertBuffer``, csrc/buffer.h) that keeps the table expert -> slot,
picks victims (the paper's policy, FIFO, LRU or LFU), copies missing experts on copy threads (CPU)
or a side stream (CUDA), and makes the compute wait only for the copies it needs. The expert
compute is :func:`moe_infer.ops.grouped_mlp` on the pool, with the gating's expert ids mapped
through the slot table, so the full stack of experts never exists on the device.

How a batch runs (``ExpertBuffer.forward``):
  1. ``tokens_per_expert`` goes to the host (the one sync: the paper learns it from the counts
     all-to-all) and the cache walks the active experts in increasing id order; misses start
     their copies at once.
  2. Experts already resident are computed first while the copies run; then the compute waits
     for the copies and computes the loaded experts (``overlap=True``).
  3. If the batch needs more experts than there are slots, the walk is cut into rounds: a round
     ends just before the walk would evict an expert the round still has to compute with. Each
     round's expert outputs are gathered into one [S*k, H] buffer in (token, slot) order, and one
     :func:`unpermute_combine` at the end sums each token's k outputs in the same order, in float32,
     as the resident layer does. Every expert's rows go through one GEMM chain with the same rows in
     the same order as in the resident layer, so the output is bitwise identical whenever the BLAS
     sees operands of the same alignment (true when hidden and ffn sizes are multiples of 16 floats
     or 32 half floats, i.e. every production model; MKL picks alignment-dependent kernels
     otherwise, which may change the last bit).

Also here: the trace-driven simulator (:func:`simulate`, C++ core ``simulate_expert_cache``),
prefetch with a next-layer router predictor (:class:`NextLayerPrefetcher`), warm start from a saved
activation profile, and the entry points that attach buffers to moe_infer, Hugging Face and
fairseq-style expert modules (:func:`attach_expert_buffer`, :func:`attach_expert_buffers`).
"""

import json
import math
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .traces import is_transformers_experts

POLICIES = ("paper", "fifo", "lru", "lfu", "belady")
LIVE_POLICIES = ("paper", "fifo", "lru", "lfu")
PARTS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

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


# ---- safetensors, read through mmap ---------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile:
    """One safetensors file, its header validated, its bytes mapped (``mmap``, copy-on-write).

    Nothing is read until a tensor's bytes are touched; the pages are then served from the page
    cache, so a file larger than RAM works. Errors (``ValueError``) name the file and the problem:
    truncated, corrupt header, overlapping or mis-sized tensors.
    """

    def __init__(self, path: str):
        self.path = str(path)
        size = os.path.getsize(self.path)
        where = f"safetensors file '{self.path}'"
        if size < 8:
            raise ValueError(f"{where} is truncated: {size} bytes, fewer than the 8-byte header length")
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise ValueError(
                    f"{where} is truncated or corrupt: its header claims {header_len} bytes but only {size - 8} follow"
                )
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(f"{where} is corrupt: header length {header_len} is implausibly large")
            raw_header = f.read(header_len)
            try:
                header = json.loads(raw_header.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{where} is corrupt: its header is not valid JSON ({error})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{where} is corrupt: its header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self.data_start = 8 + header_len
            data_size = size - self.data_start
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                self.entries[name] = self._parse_entry(where, name, info, data_size)
            spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items())
            for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
                if begin_b < end_a:
                    raise ValueError(f"{where} is corrupt: tensors '{name_a}' and '{name_b}' overlap")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        # Copy-on-write mapping: readable and writable as torch wants, never written back.
        self.bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)

    @staticmethod
    def _parse_entry(where, name, info, data_size):
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{where} is corrupt: entry '{name}' lacks dtype/shape/data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{where}: tensor '{name}' has unsupported dtype '{info['dtype']}'")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{where} is corrupt: tensor '{name}' has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{where} is corrupt: tensor '{name}' has data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != expected:
            raise ValueError(
                f"{where} is corrupt: tensor '{name}' {info['dtype']}{shape} needs {expected} bytes but its "
                f"data_offsets are [{begin}, {end}]"
            )
        if end > data_size:
            raise ValueError(
                f"{where} is truncated: tensor '{name}' ends at data byte {end} but the file holds only "
                f"{data_size} data bytes"
            )
        return dtype, tuple(shape), begin, end

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> tuple[torch.Tensor, int, torch.dtype, tuple[int, ...]]:
        """(the file's bytes as a uint8 tensor, byte offset of the tensor in it, dtype, shape)."""
        dtype, shape, begin, _ = self.entries[name]
        return self.bytes, self.data_start + begin, dtype, shape

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the mapping (a copy if its offset is misaligned)."""
        dtype, shape, begin, end = self.entries[name]
        span = self.bytes[self.data_start + begin : self.data_start + end]
        if (self.data_start + begin) % torch.empty((), dtype=dtype).element_size():
            span = span.clone()
        return span.view(dtype).view(shape)


class SafetensorsCheckpoint:
    """A checkpoint: one .safetensors file, or a directory with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (as ``save_pretrained`` writes). Files are mapped on first use."""

    def __init__(self, path: str):
        path = str(path)
        self.path = path
        self._files: dict[str, SafetensorsFile] = {}
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        weight_map = json.load(f)
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise ValueError(f"SafetensorsCheckpoint: '{index}' is not valid JSON ({error})") from None
                weight_map = weight_map.get("weight_map", {}) if isinstance(weight_map, dict) else weight_map
                if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
                ):
                    raise ValueError(
                        f"SafetensorsCheckpoint: '{index}' is corrupt: its weight_map must be a JSON object "
                        f"mapping tensor names to file names, got {type(weight_map).__name__}"
                    )
                self._file_of = {name: os.path.join(path, file) for name, file in weight_map.items()}
            else:
                files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if not files:
                    raise FileNotFoundError(f"SafetensorsCheckpoint: no .safetensors file in '{path}'")
                self._file_of = {}
                for file in files:
                    for name in self._open(os.path.join(path, file)).keys():
                        self._file_of[name] = os.path.join(path, file)
        elif os.path.exists(path):
            self._file_of = dict.fromkeys(self._open(path).keys(), path)
        else:
            raise FileNotFoundError(f"SafetensorsCheckpoint: '{path}' does not exist")

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(file)
        return self._files[file]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file(self, name: str) -> SafetensorsFile:
        if name not in self._file_of:
            raise KeyError(name)
        return self._open(self._file_of[name])


# ---- the expert store -----------------------------------------------------------------------------

# Per-expert key layouts under an experts prefix, as checkpoints name them:
# (fc1 pieces stacked along the rows, fc2, fc1 bias pieces, fc2 bias).
_PER_EXPERT_LAYOUTS = {
    "hf": (
        ("gate_proj.weight", "up_proj.weight"),
        "down_proj.weight",
        ("gate_proj.bias", "up_proj.bias"),
        "down_proj.bias",
    ),
    "mixtral": (("w1.weight", "w3.weight"), "w2.weight", ("w1.bias", "w3.bias"), "w2.bias"),
    "fairseq": (("fc1.weight",), "fc2.weight", ("fc1.bias",), "fc2.bias"),
}
# Stacked [E, ...] keys (transformers v5 native, GPT-OSS): fc1 candidates, fc2.
_STACKED_FC1 = ("gate_up_proj", "up_proj")


@dataclass
class _Piece:
    """Bytes [offset, offset + num_bytes) of ``source`` land at ``dest_offset`` of an expert's slot."""

    source: torch.Tensor
    offset: int
    dest_offset: int
    num_bytes: int
    file: str = ""  # the file ``source`` maps from its first byte (the CPU copier reads it with pread)


class ExpertStore:
    """Every expert's weights of one MoE layer, off the compute device.

    A store describes, for each expert and each part (``fc1_weight``, optional ``fc1_bias``,
    ``fc2_weight``, optional ``fc2_bias``), where its bytes are on the host. Per-expert shapes
    follow :func:`moe_infer.ops.grouped_mlp` (``fc1_weight`` [F1, H] or [H, F1] transposed, ...).
    Build one with :meth:`from_tensors` (host memory, optionally pinned) or
    :meth:`from_safetensors` (a file read through mmap).
    """

    def __init__(
        self,
        num_experts: int,
        dtype: torch.dtype,
        shapes: dict[str, tuple[int, ...]],
        pieces: dict[str, list[list[_Piece]]],
        stacked: dict[str, Optional[torch.Tensor]],
        file_backed: bool,
        description: str,
    ):
        self.num_experts = num_experts
        self.dtype = dtype
        self.shapes = shapes
        self.pieces = pieces
        self._stacked = stacked
        self.file_backed = file_backed
        self.description = description

    @property
    def parts(self) -> list[str]:
        return [name for name in PARTS if name in self.shapes]

    @property
    def expert_bytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(self.shapes[name]) * size for name in self.parts)

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * self.num_experts

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={list(self.shapes[name])}" for name in self.parts)
        return f"ExpertStore({self.description}, E={self.num_experts}, {self.dtype}, {shapes})"

    @classmethod
    def from_tensors(
        cls,
        fc1_weight: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor] = None,
        fc2_bias: Optional[torch.Tensor] = None,
        pin_memory: bool = False,
    ) -> "ExpertStore":
        """A store over stacked [E, ...] tensors (moved to host memory, pinned if asked; tensors
        already there are used in place, without a copy)."""
        tensors = {"fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
        tensors = {name: t for name, t in tensors.items() if t is not None}
        num_experts = fc1_weight.shape[0]
        for name, t in tensors.items():
            if t.shape[0] != num_experts:
                raise ValueError(f"ExpertStore.from_tensors: {name} has {t.shape[0]} experts, fc1_weight {num_experts}")
            if t.dtype != fc1_weight.dtype:
                raise ValueError(f"ExpertStore.from_tensors: {name} is {t.dtype} but fc1_weight is {fc1_weight.dtype}")
            if t.device.type == "meta":
                raise ValueError(f"ExpertStore.from_tensors: {name} is on the meta device (no data)")
        host = {}
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type != "cpu" or not t.is_contiguous() or (pin_memory and not t.is_pinned()):
                t = t.to("cpu", memory_format=torch.contiguous_format)
                if pin_memory:
                    t = t.pin_memory()
            host[name] = t
        pieces = {}
        for name, t in host.items():
            row = t[0].numel() * t.element_size()
            pieces[name] = [[_Piece(t, e * row, 0, row)] for e in range(num_experts)]
        shapes = {name: tuple(t.shape[1:]) for name, t in host.items()}
        kind = "pinned host memory" if pin_memory else "host memory"
        return cls(num_experts, fc1_weight.dtype, shapes, pieces, host, False, kind)

    @classmethod
    def from_safetensors(
        cls,
        checkpoint: Union[str, SafetensorsCheckpoint],
        prefix: str,
        dtype: Optional[torch.dtype] = None,
        num_experts: Optional[int] = None,
        expected_shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    ) -> "ExpertStore":
        """A store over one layer's experts in a safetensors checkpoint, read through mmap.

        Args:
            checkpoint: a file, a directory written by ``save_pretrained`` (sharded or not), or a
                :class:`SafetensorsCheckpoint` (share one between layers).
            prefix: the experts' key prefix, e.g. ``"model.layers.3.mlp.experts."``. Stacked keys
                (``gate_up_proj`` or ``up_proj``, ``down_proj``, ``*_bias``: transformers v5,
                GPT-OSS) and per-expert keys (``{e}.gate_proj/up_proj/down_proj.weight``,
                Mixtral's ``{e}.w1/w3/w2.weight``, fairseq's ``{e}.fc1/fc2.weight|bias``) are found.
            dtype: the dtype the layer computes in; a tensor of another dtype is an error.
            num_experts: E (checked; inferred when None).
            expected_shapes: per-expert shapes by part (e.g. from the module), checked when given.
        """
        ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
        where = f"ExpertStore.from_safetensors('{ckpt.path}', prefix='{prefix}')"
        fc1_name = next((prefix + n for n in _STACKED_FC1 if prefix + n in ckpt), None)
        if fc1_name is not None:
            names = {"fc1_weight": fc1_name, "fc2_weight": prefix + "down_proj"}
            names["fc1_bias"], names["fc2_bias"] = fc1_name + "_bias", prefix + "down_proj_bias"
            if names["fc2_weight"] not in ckpt:
                raise ValueError(f"{where}: found '{fc1_name}' but no tensor '{names['fc2_weight']}'")
            names = {k: v for k, v in names.items() if v in ckpt}
            store = cls._from_stacked(ckpt, names, where, dtype)
        else:
            layout = next((lay for lay in _PER_EXPERT_LAYOUTS.values() if f"{prefix}0.{lay[0][0]}" in ckpt), None)
            if layout is None:
                nearby = sorted(k for k in ckpt.keys() if k.startswith(prefix))[:8]
                tried = [prefix + n for n in _STACKED_FC1] + [
                    f"{prefix}0.{lay[0][0]}" for lay in _PER_EXPERT_LAYOUTS.values()
                ]
                raise ValueError(
                    f"{where}: no expert tensors found (missing tensor: tried {tried}); "
                    f"keys under the prefix: {nearby or 'none'}"
                )
            store = cls._from_per_expert(ckpt, prefix, layout, where, dtype, num_experts)
        if num_experts is not None and store.num_experts != num_experts:
            raise ValueError(f"{where}: the checkpoint has {store.num_experts} experts, expected {num_experts}")
        if expected_shapes is not None:
            for name, shape in expected_shapes.items():
                if store.shapes.get(name) != tuple(shape):
                    raise ValueError(
                        f"{where}: {name} has per-expert shape {store.shapes.get(name)} in the checkpoint "
                        f"but the layer expects {tuple(shape)}"
                    )
        return store

    @classmethod
    def _from_stacked(cls, ckpt, names, where, dtype):
        pieces, shapes, stacked, num_experts, store_dtype = {}, {}, {}, None, None
        for part, key in names.items():
            data, offset, key_dtype, shape = ckpt.file(key).raw(key)
            store_dtype = _check_dtype(where, key, key_dtype, dtype if dtype is not None else store_dtype)
            if len(shape) < 2 or (num_experts is not None and shape[0] != num_experts):
                raise ValueError(f"{where}: tensor '{key}' has shape {list(shape)}, expected [num_experts, ...]")
            num_experts = shape[0]
            row = math.prod(shape[1:]) * torch.empty((), dtype=key_dtype).element_size()
            path = ckpt.file(key).path
            pieces[part] = [[_Piece(data, offset + e * row, 0, row, path)] for e in range(num_experts)]
            shapes[part] = tuple(shape[1:])
            stacked[part] = ckpt.file(key).tensor(key)
        return cls(num_experts, store_dtype, shapes, pieces, stacked, True, f"safetensors '{ckpt.path}' (stacked)")

    @classmethod
    def _from_per_expert(cls, ckpt, prefix, layout, where, dtype, num_experts):
        fc1_keys, fc2_key, fc1_bias_keys, fc2_bias_key = layout
        count = 0
        while f"{prefix}{count}.{fc1_keys[0]}" in ckpt:
            count += 1
        if num_experts is not None and count < num_experts:
            missing = f"{prefix}{count}.{fc1_keys[0]}"
            raise ValueError(f"{where}: missing tensor '{missing}' (expected {num_experts} experts, found {count})")
        count = num_experts if num_experts is not None else count
        has_bias = f"{prefix}0.{fc2_bias_key}" in ckpt
        parts = {"fc1_weight": fc1_keys, "fc2_weight": (fc2_key,)}
        if has_bias:
            parts["fc1_bias"], parts["fc2_bias"] = fc1_bias_keys, (fc2_bias_key,)
        pieces = {part: [] for part in parts}
        shapes, store_dtype = {}, dtype
        for e in range(count):
            for part, keys in parts.items():
                expert_pieces, rows, width, dest = [], 0, None, 0
                for key in keys:
                    name = f"{prefix}{e}.{key}"
                    if name not in ckpt:
                        raise ValueError(f"{where}: missing tensor '{name}'")
                    data, offset, key_dtype, shape = ckpt.file(name).raw(name)
                    store_dtype = _check_dtype(where, name, key_dtype, store_dtype)
                    if len(shape) == 0:
                        raise ValueError(f"{where}: tensor '{name}' is 0-D; a per-expert weight is 2-D and a bias 1-D")
                    if width is not None and tuple(shape[1:]) != width:
                        raise ValueError(f"{where}: tensor '{name}' has shape {list(shape)}, unlike {keys[0]}")
                    width = tuple(shape[1:])
                    num_bytes = math.prod(shape) * torch.empty((), dtype=key_dtype).element_size()
                    expert_pieces.append(_Piece(data, offset, dest, num_bytes, ckpt.file(name).path))
                    rows, dest = rows + shape[0], dest + num_bytes
                shape = (rows, *width)
                if part in shapes and shapes[part] != shape:
                    raise ValueError(
                        f"{where}: expert {e} {part} has shape {list(shape)}, expert 0 has {list(shapes[part])}"
                    )
                shapes[part] = shape
                pieces[part].append(expert_pieces)
        stacked = dict.fromkeys(parts)  # not stored stacked: no zero-copy view exists
        return cls(count, store_dtype, shapes, pieces, stacked, True, f"safetensors '{ckpt.path}' (per-expert keys)")

    def stacked(self, part: str, materialize: bool = True) -> Optional[torch.Tensor]:
        """Host tensor [E, *shape] of one part: a view of the store when it is stacked in host
        memory, else (``materialize``) a new copy in host memory, else None.

        A file-backed store never hands out views of its mapped files (a file truncated on disk
        would turn a read of such a view into SIGBUS): its copies are read with ``pread``, and a
        file that changed size raises a ValueError."""
        if part not in self.shapes:
            return None
        if not self.file_backed and self._stacked.get(part) is not None:
            return self._stacked[part]
        if not materialize:
            return None
        out = torch.empty((self.num_experts, *self.shapes[part]), dtype=self.dtype)
        flat = out.view(self.num_experts, -1).view(torch.uint8)
        for e, expert_pieces in enumerate(self.pieces[part]):
            for piece in expert_pieces:
                dest = flat[e, piece.dest_offset : piece.dest_offset + piece.num_bytes]
                if piece.file:
                    dest.copy_(
                        torch.frombuffer(
                            bytearray(_pread(piece.file, piece.offset, piece.num_bytes)), dtype=torch.uint8
                        )
                    )
                else:
                    dest.copy_(piece.source.view(-1).view(torch.uint8)[piece.offset : piece.offset + piece.num_bytes])
        return out


def _pread(path: str, offset: int, num_bytes: int) -> bytes:
    """Bytes [offset, offset + num_bytes) of a file, read (not mapped); a short read is an error."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), num_bytes, offset)
    if len(data) != num_bytes:
        raise ValueError(
            f"'{path}' changed on disk: bytes [{offset}, {offset + num_bytes}) are no longer there (the file is "
            f"{os.path.getsize(path)} bytes now)"
        )
    return data


def _check_dtype(where, name, found, expected):
    if expected is not None and found != expected:
        raise ValueError(f"{where}: dtype mismatch: tensor '{name}' is {found} but {expected} is expected")
    if not found.is_floating_point:
        raise ValueError(f"{where}: tensor '{name}' is {found}; expert weights must be floating point")
    return found


# ---- the buffer -----------------------------------------------------------------------------------


class ExpertBuffer:
    """One MoE layer's slot pool on the compute device, and its cache (a C++ object).

    Args:
        store: the layer's :class:`ExpertStore`.
        num_slots: slots in the pool (at most ``store.num_experts`` are allocated).
        device: the compute device (the pool lives there).
        policy: "paper" (experts inactive in the batch first, then LIFO), "fifo", "lru", "lfu".
        activation, weights_transposed, swiglu_alpha, swiglu_limit: as :func:`ops.grouped_mlp`.
        copy_threads: CPU copy threads (ignored on CUDA: one side stream).
        overlap: compute the resident experts while the missing ones are copied.

    ``buffer(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` has the
    signature of a transformers v5 experts module. The expert weights are frozen (inference).

    Thread-safe: calls from several threads run one at a time. A buffer attached to a layer
    (:func:`attach_expert_buffer`) follows the layer's parameters: with a host store (the
    parameters are the store), an in-place change to them empties the pool and the next batch
    loads the new weights; with a file store, writing the parameters, replacing them or changing a
    file on disk raises a RuntimeError at the next call (never a silent mix of old and new weights).
    """

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
        # pages would only become resident as slots fill, hiding the pool's real size).
        self.pools = {
            part: torch.zeros((self.num_slots, *store.shapes[part]), dtype=store.dtype, device=self.device)
            for part in store.parts
        }
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
        first = self.pools["fc1_weight"]
        self.device = first.device  # with its index ("cuda" -> "cuda:0")
        self.hidden_size = first.shape[1] if weights_transposed else first.shape[2]

    # -- compute --

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden, top_k_index, top_k_weights)

    @torch.compiler.disable  # host-side cache decisions: a graph break under torch.compile
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k] (ids in [0, E) or -1), top_k_weights [T, k] -> [T, H]."""
        with self._lock:
            return self._forward(hidden, top_k_index, top_k_weights)

    def _forward(self, hidden, top_k_index, top_k_weights):
        self._check_inputs(hidden, top_k_index, top_k_weights)
        self._follow_parameters()
        ids = top_k_index if top_k_index.dtype == torch.int32 else top_k_index.to(torch.int32)
        top_k = ids.shape[1]
        # The one host sync: which experts the batch needs (id -1 counts in bucket 0, dropped).
        try:
            counts = torch.bincount(ids.reshape(-1).long() + 1, minlength=self.num_experts + 1).cpu()
        except RuntimeError:  # bincount rejects negative values: an id below -1
            counts = None
        if counts is None or counts.numel() > self.num_experts + 1:
            raise ValueError(f"ExpertBuffer: top_k_index has ids outside [-1, {self.num_experts})")
        self._core.begin_batch(counts[1:])
        try:
            return self._run_batch(hidden, ids, top_k_weights, counts[1:], top_k)
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
        return ops.grouped_mlp(
            rows,
            slot_offsets,
            self.pools["fc1_weight"],
            self.pools.get("fc1_bias"),
            self.pools["fc2_weight"],
            self.pools.get("fc2_bias"),
            self.activation,
            self.weights_transposed,
            self.swiglu_alpha,
            self.swiglu_limit,
        )

    def watch_parameters(self, module: nn.Module, names: Mapping[str, str]) -> None:
        """Follows ``module``'s parameters {part: parameter name} (what attach_expert_buffer sets)."""
        self._watched = [
            (module, name, module._parameters[name], module._parameters[name]._version) for name in names.values()
        ]

    def _follow_parameters(self) -> None:
        """A buffered layer follows its parameters: with a host store the parameters are the store,
        so an in-place change (``load_state_dict``, ``param.mul_()``) empties the pool and the next
        batch loads the new weights; a file store reads its files, so a change to the parameters or
        to the files is an error (never a silent mix of old and new weights)."""
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
            if now[1] < identity[1] or _file_header(path) != header:
                raise RuntimeError(
                    f"ExpertBuffer: '{path}' changed on disk since the buffer was built and no longer has the same "
                    f"tensors at the same places (its header differs, or it shrank from {identity[1]} to {now[1]} "
                    "bytes); restore it or attach a new buffer to the new file"
                )
            self._files[path] = (now, header)  # the same layout: follow the new bytes
        for i, (module, name, param, version) in enumerate(self._watched):
            if module._parameters.get(name) is not param:
                raise RuntimeError(
                    f"ExpertBuffer: the layer's parameter '{name}' was replaced (load_state_dict(assign=True) or an "
                    "assignment); the buffer copies experts from its store, not from the new tensor. Attach a new "
                    "buffer to the new weights."
                )
            if param._version != version:
                if self.store.file_backed:
                    raise RuntimeError(
                        f"ExpertBuffer: the layer's parameter '{name}' was written, but its experts are read from "
                        f"{self.store.description}; write the new weights to a file and attach a new buffer"
                    )
                self._watched[i] = (module, name, param, param._version)
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

    # -- cache control --

    def prefetch(self, experts: Union[Sequence[int], torch.Tensor], is_prediction: bool = False) -> int:
        """Starts loading ``experts`` (most wanted first) into the pool without waiting; returns
        how many copies started. Victims are chosen by the policy among residents not requested.
        With ``is_prediction``, the set is also scored against the next batch's active experts
        (precision and recall in :meth:`stats`)."""
        if isinstance(experts, torch.Tensor):
            experts = experts.reshape(-1).tolist()
        with self._lock:
            self._follow_parameters()
            return int(self._core.prefetch([int(e) for e in experts], bool(is_prediction)))

    def warm_start(self, tokens_per_expert: torch.Tensor, batches_active: Optional[torch.Tensor] = None) -> list[int]:
        """Empties the pool and fills it with the experts that received the most tokens (a saved
        activation profile); LFU's frequencies start from ``batches_active`` (or the token counts).
        Waits for the copies. Returns the experts loaded."""
        tokens = torch.as_tensor(tokens_per_expert).reshape(-1).long()
        if tokens.numel() != self.num_experts:
            raise ValueError(
                f"ExpertBuffer.warm_start: the profile has {tokens.numel()} experts, the layer {self.num_experts}"
            )
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


# ---- attaching buffers to expert modules ----------------------------------------------------------


def _expert_tensors(experts: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    fc1 = getattr(experts, "gate_up_proj", None)
    fc1_name = "gate_up_proj"
    if fc1 is None:
        fc1, fc1_name = getattr(experts, "up_proj", None), "up_proj"
    fc2 = getattr(experts, "down_proj", None)
    if not isinstance(fc1, torch.Tensor) or not isinstance(fc2, torch.Tensor) or fc1.dim() != 3 or fc2.dim() != 3:
        raise TypeError(
            f"attach_expert_buffer: {type(experts).__name__} is not a stacked experts module (expected 3-D "
            "gate_up_proj/up_proj and down_proj parameters: moe_infer.MoEExperts or a transformers v5 experts module)"
        )
    return {
        "fc1_weight": fc1,
        "fc1_bias": getattr(experts, fc1_name + "_bias", None),
        "fc2_weight": fc2,
        "fc2_bias": getattr(experts, "down_proj_bias", None),
        "_fc1_name": fc1_name,
    }


_HF_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "ReLU": "relu", "GELUActivation": "gelu"}
_HF_ACTIVATIONS.update(
    {"GELU": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}
)


def _expert_options(experts: nn.Module, activation: Optional[str]) -> dict:
    """activation / transposition / swiglu constants of a moe_infer or transformers experts module."""
    if hasattr(experts, "weights_transposed"):  # moe_infer.MoEExperts
        options = dict(
            activation=experts.activation,
            weights_transposed=experts.weights_transposed,
            swiglu_alpha=experts.swiglu_alpha,
            swiglu_limit=experts.swiglu_limit,
        )
    elif hasattr(experts, "alpha") and hasattr(experts, "limit"):  # GPT-OSS
        options = dict(
            activation="gpt_oss_swiglu", weights_transposed=True, swiglu_alpha=experts.alpha, swiglu_limit=experts.limit
        )
    else:
        if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "is_concatenated", True) is False:
            raise TypeError(f"attach_expert_buffer: {type(experts).__name__}'s expert layout is not supported")
        act = type(getattr(experts, "act_fn", None)).__name__
        base = _HF_ACTIVATIONS.get(act)
        if base is None and activation is None:
            raise TypeError(f"attach_expert_buffer: unknown activation {act}; pass activation=")
        gated = getattr(experts, "has_gate", True)
        if gated and base not in ("silu", None):
            raise TypeError(f"attach_expert_buffer: gated experts with activation {act} are not supported")
        options = dict(
            activation="silu_glu" if gated else base,
            weights_transposed=bool(getattr(experts, "is_transposed", False)),
            swiglu_alpha=1.702,
            swiglu_limit=7.0,
        )
    if activation is not None:
        options["activation"] = activation
    return options


def _keep_on_host(module: nn.Module) -> None:
    """Makes ``.to()`` / ``.cuda()`` / ``.half()`` leave this module's (host store) tensors alone."""
    module._apply = lambda fn, recurse=True: module


def attach_expert_buffer(
    experts: nn.Module,
    num_slots: int,
    policy: str = "paper",
    store: Optional[ExpertStore] = None,
    device: Union[str, torch.device, None] = None,
    activation: Optional[str] = None,
    copy_threads: int = 2,
    overlap: bool = True,
) -> ExpertBuffer:
    """Moves an experts module's weights off the compute device and gives it a slot pool there.

    Works on :class:`moe_infer.MoEExperts` and on transformers v5 experts modules (3-D
    ``gate_up_proj``/``up_proj`` and ``down_proj``, optional biases, GPT-OSS's transposed layout).

    Args:
        experts: the module. Its expert parameters are replaced by the store's host tensors
            (``requires_grad=False``; meta tensors when the store has no stacked view, e.g.
            per-expert checkpoint keys), and ``.to()`` no longer moves them.
        num_slots: slots in the pool.
        policy: see :class:`ExpertBuffer`.
        store: where the experts live; default: the module's own weights in host memory (pinned
            when ``device`` is a GPU). Give :meth:`ExpertStore.from_safetensors` for a disk store.
        device: the compute device; default: where the module's weights are (cpu if meta).
        activation: override the activation inferred from the module.

    Returns:
        The :class:`ExpertBuffer`, also set as ``experts.expert_buffer``. A transformers experts
        module's ``forward`` becomes the buffer's (same signature: hidden, top_k_index,
        top_k_weights). moe_infer's :class:`MoELayer` calls it itself.
    """
    tensors = _expert_tensors(experts)
    fc1_name = tensors.pop("_fc1_name")
    options = _expert_options(experts, activation)
    present = {part: t for part, t in tensors.items() if t is not None}
    if device is None:
        device = tensors["fc1_weight"].device
        device = torch.device("cpu") if device.type == "meta" else device
    device = torch.device(device)
    if store is None:
        store = ExpertStore.from_tensors(
            present["fc1_weight"],
            present["fc2_weight"],
            present.get("fc1_bias"),
            present.get("fc2_bias"),
            pin_memory=device.type == "cuda",
        )
    else:
        expected = {part: tuple(t.shape[1:]) for part, t in present.items()}
        found = {part: store.shapes.get(part) for part in expected}
        if set(store.parts) != set(expected) or any(found[p] != expected[p] for p in expected):
            raise ValueError(
                f"attach_expert_buffer: the store's parts {dict((p, store.shapes[p]) for p in store.parts)} do not "
                f"match the module's per-expert shapes {expected}"
            )
        if store.num_experts != present["fc1_weight"].shape[0]:
            raise ValueError(
                f"attach_expert_buffer: the store has {store.num_experts} experts, the module {present['fc1_weight'].shape[0]}"
            )
        if present["fc1_weight"].device.type != "meta" and store.dtype != present["fc1_weight"].dtype:
            raise ValueError(
                f"attach_expert_buffer: the store is {store.dtype} but the module is {present['fc1_weight'].dtype}"
            )
    buffer = ExpertBuffer(store, num_slots, device, policy, copy_threads=copy_threads, overlap=overlap, **options)
    param_names = {
        "fc1_weight": fc1_name,
        "fc1_bias": fc1_name + "_bias",
        "fc2_weight": "down_proj",
        "fc2_bias": "down_proj_bias",
    }
    for part in store.parts:
        # A file store's parameters are meta placeholders (never views of the mapped file); the
        # state_dict reads them from the file (see _state_dict_from_store).
        host = store.stacked(part, materialize=not store.file_backed)
        if host is None:
            host = torch.empty((store.num_experts, *store.shapes[part]), dtype=store.dtype, device="meta")
        experts._parameters[param_names[part]] = nn.Parameter(host, requires_grad=False)
    _keep_on_host(experts)
    experts.expert_buffer = buffer
    names = {part: param_names[part] for part in store.parts}
    buffer.watch_parameters(experts, names)
    if store.file_backed:
        experts._register_state_dict_hook(_state_dict_from_store(store, names))
    if not hasattr(experts, "weights_transposed"):  # a transformers module: route its forward to the buffer

        def forward(hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
            # GPT-OSS names the routing arguments router_indices / routing_weights.
            top_k_index = kwargs.pop("router_indices", top_k_index)
            top_k_weights = kwargs.pop("routing_weights", top_k_weights)
            return buffer(hidden_states, top_k_index, top_k_weights)

        experts.forward = forward
    return buffer


def _state_dict_from_store(store: ExpertStore, names: Mapping[str, str]):
    """A state_dict hook that gives a file store's parameters as host copies read from the files
    (the parameters themselves are meta placeholders), so saving a buffered model works."""

    def hook(module, state_dict, prefix, local_metadata):
        for part, name in names.items():
            if prefix + name in state_dict and state_dict[prefix + name].device.type == "meta":
                state_dict[prefix + name] = store.stacked(part)
        return state_dict

    return hook


def _file_identity(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def _file_header(path: str) -> bytes:
    """A safetensors file's header (its 8-byte length and the JSON), read, not mapped."""
    with open(path, "rb") as f:
        length = int.from_bytes(os.pread(f.fileno(), 8, 0), "little")
        return os.pread(f.fileno(), 8 + min(length, _MAX_HEADER_BYTES), 0)


def _checkpoint_prefixes(name: str) -> list[str]:
    """Key prefixes under which a checkpoint may store the experts of module ``name``
    (transformers v5 saves Mixtral's ``mlp`` as the original ``block_sparse_moe``)."""
    prefixes = [name + "."]
    if ".mlp." in name + ".":
        prefixes.append(name.replace(".mlp", ".block_sparse_moe", 1) + ".")
    return prefixes


def attach_expert_buffers(
    model: nn.Module,
    num_slots: int,
    policy: str = "paper",
    checkpoint: Union[str, SafetensorsCheckpoint, None] = None,
    device: Union[str, torch.device, None] = None,
    copy_threads: int = 2,
    overlap: bool = True,
) -> dict[str, ExpertBuffer]:
    """Attaches an :class:`ExpertBuffer` to every MoE layer of a model (moe_infer
    :class:`MoELayer` or transformers v5 sparse blocks). This is what
    ``moe_infer.optimize(model, expert_buffer=N)`` calls.

    With ``checkpoint`` (a safetensors file or ``save_pretrained`` directory), each layer's store is
    read from it through mmap (build the model on the meta device to never load the experts);
    otherwise the model's own expert weights move to host memory. Returns {module name: buffer}.
    """
    from .layer import MoELayer  # here: layer.py imports this module

    if checkpoint is not None and not isinstance(checkpoint, SafetensorsCheckpoint):
        checkpoint = SafetensorsCheckpoint(checkpoint)
    buffers, existing = {}, {}
    for name, module in list(model.named_modules()):
        if isinstance(module, MoELayer):
            target, target_name = module.experts, f"{name}.experts" if name else "experts"
        elif is_transformers_experts(module):
            target, target_name = module, name
        else:
            continue
        if getattr(target, "expert_buffer", None) is not None:
            existing[target_name] = target.expert_buffer
            continue
        store = None
        if checkpoint is not None:
            errors = []
            for prefix in _checkpoint_prefixes(target_name):
                try:
                    store = ExpertStore.from_safetensors(
                        checkpoint, prefix, num_experts=_expert_tensors(target)["fc1_weight"].shape[0]
                    )
                    break
                except ValueError as error:
                    errors.append(str(error))
            if store is None:
                raise ValueError(f"attach_expert_buffers: no experts for '{target_name}' in the checkpoint: {errors}")
        buffer = attach_expert_buffer(
            target, num_slots, policy, store, device, copy_threads=copy_threads, overlap=overlap
        )
        if isinstance(module, MoELayer):
            module.expert_buffer = buffer
        buffers[target_name] = buffer
    if not buffers and existing:
        sizes = {buffer.num_slots for buffer in existing.values()}
        if sizes != {min(num_slots, buffer.num_experts) for buffer in existing.values()}:
            raise ValueError(
                f"attach_expert_buffers: every MoE layer already has an expert buffer ({sorted(sizes)} slots); a "
                f"buffer of {num_slots} slots needs a model that is not buffered yet (load it again)"
            )
        return existing  # buffered already, as asked: the same buffers
    if not buffers:
        raise ValueError(
            "attach_expert_buffers: the model has no MoE layer (moe_infer.MoELayer or a transformers experts module)"
        )
    return {**existing, **buffers}


def buffer_stats(buffers: Mapping[str, ExpertBuffer]) -> dict[str, dict[str, float]]:
    """Per-layer statistics: {layer name: ExpertBuffer.stats()}."""
    return {name: buffer.stats() for name, buffer in buffers.items()}


# ---- warm start -----------------------------------------------------------------------------------

_PROFILE_FORMAT = "moe_infer.activation_profile"


def save_activation_profile(path: str, buffers: Mapping[str, ExpertBuffer]) -> None:
    """Writes each layer's observed activation counts (tokens and batches per expert) as JSON."""
    layers = {}
    for name, buffer in buffers.items():
        counts = buffer.activation_counts()
        layers[name] = {
            "num_experts": buffer.num_experts,
            "tokens": counts["tokens"].tolist(),
            "batches": counts["batches"].tolist(),
        }
    with open(path, "w") as f:
        json.dump({"format": _PROFILE_FORMAT, "version": 1, "layers": layers}, f)


def load_activation_profile(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Reads a profile written by :func:`save_activation_profile`: {layer: {"tokens", "batches"}}."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"load_activation_profile: '{path}' is not a readable profile ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != _PROFILE_FORMAT:
        raise ValueError(f"load_activation_profile: '{path}' is not a moe_infer activation profile")
    profile = {}
    for name, layer in payload["layers"].items():
        tokens, batches = torch.tensor(layer["tokens"]), torch.tensor(layer["batches"])
        if tokens.numel() != layer["num_experts"] or batches.numel() != layer["num_experts"]:
            raise ValueError(f"load_activation_profile: layer '{name}' has inconsistent counts")
        profile[name] = {"tokens": tokens, "batches": batches}
    return profile


def warm_start_buffers(
    buffers: Mapping[str, ExpertBuffer], profile: Mapping[str, Mapping[str, torch.Tensor]]
) -> list[str]:
    """Pre-fills each buffer named in ``profile`` with its most used experts; returns their names."""
    warmed = []
    for name, buffer in buffers.items():
        if name in profile:
            buffer.warm_start(profile[name]["tokens"], profile[name]["batches"])
            warmed.append(name)
    return warmed


# ---- prefetch with a next-layer router predictor --------------------------------------------------


def _default_router(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [T, H] -> expert ids [T, k] with the layer's own router."""
    if hasattr(layer, "route"):  # moe_infer.MoELayer
        return lambda hidden: layer.route(hidden)[2]
    router = getattr(layer, "gate", None)
    if router is None:
        router = getattr(layer, "router", None)
    if router is None:
        raise TypeError(f"NextLayerPrefetcher: {type(layer).__name__} has no gate/router; pass routers=")

    def route(hidden):
        out = router(hidden)
        if not isinstance(out, tuple):
            raise TypeError(f"NextLayerPrefetcher: {type(router).__name__} returns logits only; pass routers=")
        return out[-1]  # transformers v5 routers return (logits, weights, indices)

    return route


class NextLayerPrefetcher:
    """Guesses each MoE layer's experts from the previous MoE layer's input, and prefetches them.

    A forward pre-hook on layer l runs layer l+1's router on layer l's input hidden states (the
    residual stream changes little across one layer), and asks layer l+1's buffer to prefetch the
    predicted experts, most tokens first, while layer l computes. Each buffer scores the
    prediction against the experts it then really needs: ``stats()["precision"]`` and
    ``["recall"]``; :meth:`accuracy` collects them.

    Args:
        layers: the MoE layers in execution order (moe_infer MoELayer or transformers sparse blocks).
        buffers: their buffers (default: ``layer.expert_buffer`` or ``layer.experts.expert_buffer``).
        routers: per layer, hidden [T, H] -> ids [T, k] (default: the layer's own router).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        buffers: Optional[Sequence[ExpertBuffer]] = None,
        routers: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
    ):
        self.layers = list(layers)
        if buffers is None:
            buffers = [
                getattr(layer, "expert_buffer", None) or getattr(getattr(layer, "experts", None), "expert_buffer", None)
                for layer in self.layers
            ]
        self.buffers = list(buffers)
        if len(self.buffers) != len(self.layers):
            raise ValueError(f"NextLayerPrefetcher: {len(self.layers)} layers but {len(self.buffers)} buffers")
        unbuffered = [i for i, b in enumerate(self.buffers[1:], 1) if b is None]
        if unbuffered:
            raise ValueError(
                f"NextLayerPrefetcher: layers {unbuffered} have no expert buffer to prefetch into; buffer them "
                "first (MoELayer(expert_buffer=N) or moe_infer.integrations.hf.optimize(model, expert_buffer=N)) "
                "or pass buffers="
            )
        self.routers = list(routers) if routers is not None else [_default_router(layer) for layer in self.layers]
        self._handles = [
            self.layers[i].register_forward_pre_hook(self._hook(i + 1)) for i in range(len(self.layers) - 1)
        ]

    def _hook(self, target: int):
        def hook(module, args):
            hidden = args[0]
            with torch.no_grad():
                ids = self.routers[target](hidden.reshape(-1, hidden.shape[-1]))
                counts = torch.bincount(ids.reshape(-1).long() + 1, minlength=self.buffers[target].num_experts + 1)[1:]
            counts = counts.cpu()
            ranked = [e for e in torch.argsort(counts, descending=True, stable=True).tolist() if counts[e] > 0]
            self.buffers[target].prefetch(ranked, is_prediction=True)

        return hook

    def accuracy(self) -> list[dict[str, float]]:
        """Per predicted layer (1..L-1): precision and recall of the predicted expert sets."""
        return [{k: b.stats()[k] for k in ("precision", "recall", "predictions")} for b in self.buffers[1:]]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---- the trace-driven simulator -------------------------------------------------------------------


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
