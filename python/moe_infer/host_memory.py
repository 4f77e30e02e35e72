"""Expert weights in host memory on 2 MiB pages.

A decode step reads each routed expert's weights once, straight from memory. On 4 KiB pages that
stream crosses a page every 4 KiB: a TLB miss each time (a two-level page walk in a virtual
machine), and the hardware prefetcher stops at every page boundary. On 2 MiB pages one core of
this project's CPU machine reads 1.2-1.6x the bytes per second (a 256 MiB sum: 30-31 against
19-25 GB/s, bench/results/layer_cpu.md).

Linux backs a private anonymous mapping with 2 MiB pages ("transparent huge pages") when it is
advised MADV_HUGEPAGE and /sys/kernel/mm/transparent_hugepage/enabled is not "never"; the kernel
may still fall back to 4 KiB pages when it finds no free 2 MiB page. Elsewhere (another OS, THP
off) these functions return ordinary tensors. torch's ``THP_MEM_ALLOC_ENABLE=1`` does the same
for every large allocation of a process; these functions do it for the tensors they are given.

:func:`moe_infer.optimize` moves the experts' weights of the blocks it replaces (on the CPU)
here; :class:`moe_infer.MoEExperts` allocates its weights here; :func:`to_huge_pages` moves the
large tensors of any module.
"""

import ctypes
import math
import mmap
import sys
from typing import Optional, Union

import torch
from torch import nn

HUGE_PAGE_BYTES = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_supported() -> bool:
    """Whether this process can ask for 2 MiB pages: Linux with transparent huge pages not "never"."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor on memory advised to take 2 MiB pages (2 MiB-aligned,
    its own mapping, freed with the tensor). An ordinary ``torch.empty`` where huge pages are not
    supported or the tensor is smaller than one huge page."""
    shape = tuple(shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    num_bytes = math.prod(shape) * element_size
    if num_bytes < HUGE_PAGE_BYTES or not huge_pages_supported():
        return torch.empty(shape, dtype=dtype)
    # Private: a shared anonymous mapping is shmem, whose huge pages follow another setting.
    mapping = mmap.mmap(-1, num_bytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(view)
    del view  # an exported buffer would pin the mapping open
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the pages are faulted in huge
    # The tensor holds the mapping (unmapped when the last tensor on it goes).
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=num_bytes, offset=-address % HUGE_PAGE_BYTES)
    return raw.view(dtype).view(shape)


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in :func:`empty` memory (values and dtype unchanged)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"moe_infer.host_memory.copy: the tensor is on {tensor.device}, expected the CPU")
    with torch.no_grad():
        return empty(tensor.shape, tensor.dtype).copy_(tensor)


class _Mappings:
    """This process's memory mappings (/proc/self/smaps): address range -> its fields, plus
    "anonymous" ("1" for memory not backed by a file: inode 0)."""

    def __init__(self):
        self.ranges: list[tuple[int, int, dict[str, str]]] = []
        try:
            with open("/proc/self/smaps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            head, _, rest = line.partition(" ")
            start, dash, end = head.partition("-")
            if dash and not head.endswith(":"):
                try:
                    fields = rest.split()  # perms offset dev inode [path]
                    anonymous = len(fields) >= 4 and fields[3] == "0"
                    self.ranges.append((int(start, 16), int(end, 16), {"anonymous": "1" if anonymous else "0"}))
                    continue
                except ValueError:
                    pass
            if self.ranges and head.endswith(":"):
                self.ranges[-1][2][head[:-1]] = rest.strip()

    def of(self, address: int) -> Optional[dict[str, str]]:
        for start, end, fields in self.ranges:
            if start <= address < end:
                return fields
        return None


def advised(tensor: torch.Tensor, mappings: Optional[_Mappings] = None) -> bool:
    """Whether the tensor's memory is advised to take 2 MiB pages (its mapping's ``hg`` flag)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    fields = (mappings or _Mappings()).of(tensor.data_ptr())
    return fields is not None and "hg" in fields.get("VmFlags", "").split()


def huge_page_bytes(tensor: torch.Tensor, mappings: Optional[_Mappings] = None) -> int:
    """Bytes of the tensor's mapping that the kernel holds on 2 MiB pages (smaps AnonHugePages);
    0 off Linux or for memory that is not an anonymous mapping."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    fields = (mappings or _Mappings()).of(tensor.data_ptr())
    if fields is None:
        return 0
    return int(fields.get("AnonHugePages", "0 kB").split()[0]) * 1024


def _movable(tensor: torch.Tensor, min_bytes: int) -> bool:
    """A plain, dense, large CPU tensor (not a subclass such as a FakeTensor or a DTensor, not
    sparse, not in shared or pinned memory)."""
    return (
        type(tensor.data) is torch.Tensor
        and tensor.layout == torch.strided
        and tensor.device.type == "cpu"
        and tensor.numel() * tensor.element_size() >= min_bytes
        and not tensor.is_shared()
        and not tensor.is_pinned()
        and tensor.is_contiguous()
    )


def to_huge_pages(source: Union[nn.Module, list], min_bytes: int = HUGE_PAGE_BYTES, recurse: bool = True) -> int:
    """Moves the large CPU tensors of a module (its parameters and buffers, ``recurse`` into its
    submodules) or of a list of tensors onto :func:`empty` memory, in place: each parameter keeps
    its identity, name and ``requires_grad`` (its ``.data`` is replaced, and the old memory is
    freed unless something outside ``source`` still holds it: a ``state_dict()`` kept by the
    caller, a view, which then no longer aliases the parameter).

    Skipped: tensors under ``min_bytes``; tensor subclasses, sparse, shared or pinned memory, not
    contiguous; sharing their storage with another tensor of ``source`` or leaving part of it
    unused (a move would untie them); memory backed by a file (``torch.load(mmap=True)``,
    safetensors: moving it would turn reclaimable page cache into committed memory); memory
    advised already, or already on 2 MiB pages (transparent huge pages "always").

    Returns the bytes moved (0 where huge pages are not supported)."""
    if not huge_pages_supported():
        return 0
    if isinstance(source, nn.Module):
        tensors = [*source.parameters(recurse=recurse), *source.buffers(recurse=recurse)]
    else:
        tensors = list(source)
    large = [t for t in {id(t): t for t in tensors if t is not None}.values() if _movable(t, min_bytes)]
    holders: dict[int, int] = {}
    for tensor in large:
        key = tensor.untyped_storage().data_ptr()
        holders[key] = holders.get(key, 0) + 1
    candidates = [
        tensor
        for tensor in large
        if holders[tensor.untyped_storage().data_ptr()] == 1
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    ]
    mappings = _Mappings() if candidates else None  # read /proc/self/smaps only when needed
    moved = 0
    for tensor in candidates:
        num_bytes = tensor.numel() * tensor.element_size()
        fields = mappings.of(tensor.data_ptr())
        if (
            fields is None
            or fields["anonymous"] != "1"
            or advised(tensor, mappings)
            or huge_page_bytes(tensor, mappings) >= num_bytes // 2
        ):
            continue
        tensor.data = copy(tensor.data)
        moved += num_bytes
    return moved
