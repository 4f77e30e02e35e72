"""The expert store: where every expert's weights of one MoE layer are, off the compute device."""

import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

from .checkpoint import SafetensorsCheckpoint

PARTS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

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
        for name, t in tensors.items():
            dims = 2 if name.endswith("bias") else 3
            if t.dim() != dims or not t.is_floating_point():
                raise ValueError(
                    f"ExpertStore.from_tensors: {name} must be a {dims}-D floating tensor [experts, ...], got "
                    f"{t.dtype} of shape {tuple(t.shape)}"
                )
        num_experts = fc1_weight.shape[0]
        if num_experts < 1:
            raise ValueError("ExpertStore.from_tensors: there are no experts (fc1_weight has 0 rows)")
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
        parts = {"fc1_weight": fc1_keys, "fc2_weight": (fc2_key,)}
        # Each bias where expert 0 has it (a part missing for a later expert is an error below).
        if f"{prefix}0.{fc1_bias_keys[0]}" in ckpt:
            parts["fc1_bias"] = fc1_bias_keys
        if f"{prefix}0.{fc2_bias_key}" in ckpt:
            parts["fc2_bias"] = (fc2_bias_key,)
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
