"""Safetensors checkpoints read through mmap: the bytes an :class:`~moe_infer.buffer.ExpertStore` copies from."""

import json
import math
import mmap
import os

import torch

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


def _file_identity(path: str) -> tuple[int, int, int, int]:
    """(inode, size, mtime, ctime): a write changes the ctime even where the mtime is set back
    (``cp -p``, ``rsync -t``). So does a change of metadata alone (``chmod``): a CPU buffer then
    reloads its experts, a GPU one raises (as for any change to its file)."""
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _file_header(path: str) -> bytes:
    """A safetensors file's header (its 8-byte length and the JSON), read, not mapped."""
    with open(path, "rb") as f:
        length = int.from_bytes(os.pread(f.fileno(), 8, 0), "little")
        return os.pread(f.fileno(), 8 + min(length, _MAX_HEADER_BYTES), 0)
