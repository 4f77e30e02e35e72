"""Shared benchmark helpers: interleaved timing, CUDA graph capture, peak memory of a call, a progress
bar, machine info, result tables."""

import ctypes
import dataclasses
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from moe_infer import host_memory

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TESTS_PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python")


def relative_error(got: torch.Tensor, expected: torch.Tensor, dim=None) -> torch.Tensor:
    """||got - expected|| / ||expected|| in float64: of the whole tensors, or along ``dim``."""
    got, expected = got.double(), expected.double()
    return (got - expected).norm(dim=dim) / expected.norm(dim=dim)


def dtype_suffix(dtype: torch.dtype) -> str:
    """The results-file suffix of a dtype: "" for float32 (the default), else "_bfloat16" etc."""
    return "" if dtype == torch.float32 else "_" + str(dtype).removeprefix("torch.")


def load_hf_models():
    """tests/python/hf_models.py: the transformers models, built from configs with seeded weights,
    that the tests check and the benchmarks time (imported on demand: it imports transformers)."""
    if TESTS_PYTHON_DIR not in sys.path:
        sys.path.insert(1, TESTS_PYTHON_DIR)
    import hf_models

    return hf_models


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str = ""):
        self.total, self.done, self.label, self.start = max(total, 1), 0, label, time.time()

    def step(self, what: str = "") -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.time() - self.start
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {what[:40]:<40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_cuda_graph(fn: Callable[[torch.Tensor], object], static_x: torch.Tensor):
    """fn(static_x) captured in a CUDA graph, after two warm-up calls on a side stream (outside the
    capture): (graph, static output). ``graph.replay()`` reruns fn on whatever static_x then holds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out


# The order of the variants in every round after the first (time_interleaved): one seeded sequence
# for the whole run, so that a table's rows do not all see the same orders.
_ROUND_ORDER = random.Random(0)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
    statistic: Callable[[list[float]], float] = statistics.median,
    clock: Callable[[], float] = time.perf_counter,
    before: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median (or ``statistic``) seconds per call of each function, measured in interleaved rounds
    (A B C, then e.g. C A B, ...).

    Interleaving spreads the machine's noise over all variants, so their ratios are fair. Every
    round after the first takes the variants in a new random order (one seeded sequence for the
    run), so that each follows each of the others about as often over a table: a call pays for what the one before it left behind
    (dirty cache lines to write back, memory handed back to the system that it faults in again;
    measured: a Qwen3-MoE-like S = 512 block right after transformers' grouped_mm took 736 page
    faults a call, right after another block none). ``clock`` may be ``time.process_time`` (CPU
    time, for single-threaded runs on a shared machine). ``before`` runs untimed before every timed
    call (e.g. evict_caches).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    names = list(fns)
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 50 * repeats):
        for name in names:
            fn = fns[name]
            if before is not None:
                before()
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            samples[name].append(clock() - t0)
        _ROUND_ORDER.shuffle(names)
        rounds += 1
    return {name: statistic(values) for name, values in samples.items()}


@dataclasses.dataclass
class Bandwidth:
    """Memory bandwidths in bytes per second: a large copy (read + write bytes) and a large sum
    (read bytes), on 2 MiB pages where the OS grants them, and the same sum on ordinary 4 KiB pages
    for comparison. A weight-bound step only reads, and one core may read faster or slower than it
    copies: its floor takes the larger (and, for a row, the sum timed among the row's own calls),
    the rate no implementation passes."""

    copy: float
    read: float
    read_small_pages: float
    huge_pages: bool = False  # copy and read measured on 2 MiB pages

    @property
    def floor(self) -> float:
        return max(self.copy, self.read)

    def floor_with(self, row_read: float) -> float:
        """The floor's bandwidth for a row whose own moments read at ``row_read`` (ReadProbe)."""
        return max(self.floor, row_read)

    def describe(self) -> str:
        pages = "2 MiB" if self.huge_pages else "4 KiB (no 2 MiB pages granted)"
        return (
            f"Memory bandwidth: copy {self.copy / 1e9:.1f} GB/s (read + write), sum {self.read / 1e9:.1f} GB/s "
            f"(read), on {pages} pages (the same sum on 4 KiB pages: {self.read_small_pages / 1e9:.1f} GB/s), "
            "medians of interleaved rounds; bandwidth floors use the largest of the copy, the sum and the "
            "sum timed among the row's own calls."
        )


class ReadProbe:
    """A 256 MiB float32 sum: the read bandwidth. Timed among a decode row's contenders
    (interleaved with them) it gives the bandwidth of the very moments the row was measured in: on
    a shared machine the bandwidth moves from minute to minute, and a floor from a slower minute
    than the row's would be one that the row passes, so floors take the largest
    (Bandwidth.floor_with). On 2 MiB pages (moe_infer.host_memory), as the benchmarks' weights
    are; ``huge_pages=False``: an ordinary tensor."""

    name = "memory read (256 MiB sum)"

    def __init__(self, huge_pages: bool = True):
        shape = (2**26,)
        values = host_memory.empty(shape, torch.float32) if huge_pages else torch.empty(shape)
        self.values = values.fill_(1)

    def __call__(self) -> None:
        self.values.sum()

    @property
    def bytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def bandwidth(self, seconds: list[float]) -> float:
        return self.bytes / statistics.median(seconds)


def memory_bandwidth(clock: Callable[[], float] = time.perf_counter, rounds: int = 9) -> Bandwidth:
    """The copy and read bandwidths, the median of interleaved rounds (as the tables' times are
    medians; the best round of a shared machine is an outlier), on the current threads, timed with
    the clock of the table they sit in (CPU time on one thread, so that other jobs holding the core
    do not count)."""
    source = host_memory.empty((2**27,), torch.uint8).fill_(1)  # 128 MiB: far beyond the caches
    target = host_memory.empty((2**27,), torch.uint8)
    target.copy_(source)
    probes = {"huge": ReadProbe(), "small": ReadProbe(huge_pages=False)}
    times = {"copy": [], "huge": [], "small": []}
    for _ in range(rounds):
        start = clock()
        target.copy_(source)
        times["copy"].append(clock() - start)
        for name, probe in probes.items():
            start = clock()
            probe()
            times[name].append(clock() - start)
    on_huge_pages = [source, target, probes["huge"].values]
    huge = all(host_memory.huge_page_bytes(t) >= t.numel() * t.element_size() // 2 for t in on_huge_pages)
    return Bandwidth(
        copy=2 * source.numel() / statistics.median(times["copy"]),
        read=probes["huge"].bandwidth(times["huge"]),
        read_small_pages=probes["small"].bandwidth(times["small"]),
        huge_pages=huge,
    )


_EVICTION_BUFFER = None


def evict_caches() -> None:
    """Reads 128 MiB (4x this machine's L3) so the next call finds no weight in a cache: a decode
    step of a real model reads each layer's experts once, long after the last time.

    It only reads, as what runs between two MoE layers of a real model mostly does (the other
    layers' weights, the KV cache), and as the bandwidth floor's sum does: an eviction that wrote
    would leave the caches full of dirty lines, and the next call would pay their write-back (32 MiB
    at the start of its own reads), which neither the floor nor a real decode step pays (measured,
    minimum times: 2 threads read the Mixtral-like experts of one token about 1.35x slower after
    such an eviction, one thread 1.1x)."""
    global _EVICTION_BUFFER
    if _EVICTION_BUFFER is None:
        # Ordinary 4 KiB pages: 32768 of them, so the TLB's entries go too.
        _EVICTION_BUFFER = torch.ones(2**25, dtype=torch.float32)
    _EVICTION_BUFFER.sum()


@dataclasses.dataclass
class RowTimes:
    """time_cpu_rows' result. samples: the seconds of every call, by name, in round order.
    floor_bandwidth: the bandwidth of the row's floor (Bandwidth.floor_with the probe's median
    rate), None without a probe. round_read: the probe's read rate in each round (bytes per
    second), the same order as the samples, None without a probe."""

    samples: dict[str, list[float]]
    floor_bandwidth: float | None
    round_read: list[float] | None

    def round_floors(self, num_bytes: int) -> list[float]:
        """The seconds ``num_bytes`` take at the rate the probe read in each round: a floor per round
        (the bandwidth a shared machine gives moves from minute to minute; interleaving pairs each
        call with the probe of its own round)."""
        return [num_bytes / read for read in self.round_read]


def median_ratio(times: list[float], floors: list[float]) -> float:
    """The median over rounds of time / floor (the two lists in round order)."""
    return statistics.median(t / f for t, f in zip(times, floors, strict=True))


def add_table_arguments(parser, dtypes=("bfloat16", "float32"), quick_help: str = "fewer repeats") -> None:
    """The options of the CPU table benchmarks: --dtype and --threads (each repeatable; default
    bfloat16 and float32, 1 and 2 threads: table_settings), --quick and --output."""
    parser.add_argument("--dtype", action="append", choices=list(dtypes), help="default: bfloat16 and float32")
    parser.add_argument("--threads", action="append", type=int, help="torch threads (default: 1 and 2)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output", default=None, help="results file name under bench/results/")


def table_settings(args) -> tuple[list[torch.dtype], list[int]]:
    """The dtypes and thread counts that add_table_arguments' options ask for."""
    return [getattr(torch, d) for d in args.dtype or ["bfloat16", "float32"]], args.threads or [1, 2]


def publish_tables(args, stem: str, text: str) -> None:
    """Prints a CPU table benchmark's results and writes them under bench/results/: as --output, or
    ``<stem>.md`` (``<stem>_quick.md`` for --quick)."""
    print(text)
    name = args.output or f"{stem}{'_quick' if args.quick else ''}.md"
    print(f"written: {write_result(name, text)}")


def machine_line(load_before: float) -> str:
    """A CPU results file's line on where and when it was measured: the machine, the load average
    before (``load_before``) and now, and the commit."""
    return (
        f"Machine: {machine_description(torch.device('cpu'))}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (the machine is shared: other jobs ran during the measurement). "
        f"Measured at commit {commit()}.\n\n"
    )


def table_clock(threads: int) -> Callable[[], float]:
    """The clock of a CPU table on ``threads`` torch threads: the CPU time of the thread on one
    (the machine is shared, and CPU time does not count what other jobs take), wall-clock time on
    more (table_title names it)."""
    return time.thread_time if threads == 1 else time.perf_counter


def table_title(dtype: torch.dtype, threads: int) -> str:
    """A CPU table's section title: its dtype, threads and clock (table_clock)."""
    clock = "CPU time of the thread" if threads == 1 else "wall-clock time"
    return f"## {str(dtype).removeprefix('torch.')}, {threads} thread{'s' if threads > 1 else ''} ({clock})"


def time_cpu_rows(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    min_seconds: float,
    clock: Callable[[], float],
    cold: bool,
    probe: "ReadProbe | None" = None,
    bandwidth: Bandwidth | None = None,
) -> RowTimes:
    """The seconds of every call of ``fns`` on the CPU, in interleaved rounds (time_interleaved),
    and the bandwidth floor of those moments. ``cold``: evict_caches before every call (a decode
    step). With a ``probe``, it is timed among ``fns``: the floor is ``bandwidth.floor_with`` its
    median rate, and its rate in each round is kept for per-round ratios."""
    timed = dict(fns)
    if probe is not None:
        timed[probe.name] = probe
    samples = time_interleaved(
        timed,
        torch.device("cpu"),
        repeats,
        min_seconds=min_seconds,
        statistic=list,
        clock=clock,
        before=evict_caches if cold else None,
    )
    if probe is None:
        return RowTimes(samples, None, None)
    probe_seconds = samples.pop(probe.name)
    return RowTimes(
        samples, bandwidth.floor_with(probe.bandwidth(probe_seconds)), [probe.bytes / t for t in probe_seconds]
    )


# ---- memory: peak RSS of one call ------------------------------------------------------------

_libc = None


def return_freed_memory_to_os() -> ctypes.CDLL:
    """glibc set up so that the resident set before a call holds no freed memory the call could
    reuse: every allocation of 64 KiB or more is its own mapping, returned to the system when freed,
    and the heap is trimmed. Call it before building what is measured; ``peak_memory`` calls it too
    (benchmarks that never measure memory keep glibc's defaults)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    return _libc


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(fn) -> int:
    """Bytes of the process's peak resident set during fn() above its resident set before (Linux:
    VmHWM reset through /proc/self/clear_refs)."""
    libc = return_freed_memory_to_os()
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_bytes("VmRSS")
    out = fn()
    peak = _status_bytes("VmHWM")
    del out
    return peak - before


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])


def write_result(name: str, text: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def spread(values: list[float]) -> list[float]:
    """[min, median, max] of measured values (or of per-round ratios)."""
    return [min(values), statistics.median(values), max(values)]


def band(values: list[float] | None, fmt: str = "{:.2f}", unit: str = "") -> str:
    """'median [min-max]' of a [min, median, max] spread, for a table cell ('—' for none)."""
    if values is None:
        return "—"
    low, mid, high = (fmt.format(v) for v in values)
    return f"{mid}{unit} [{low}-{high}]"


def ms_spread(seconds: list[float], digits: int = 3) -> str:
    """'median (min-max)' of times in seconds, in ms, for a table cell."""
    low, mid, high = (value * 1e3 for value in spread(seconds))
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def commit() -> str:
    """The checkout's short commit hash, which results files are stamped with ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_header(title: str, machine: str, revision: str, quick: bool = False) -> str:
    """A results file's first lines: its title (quick runs say they give no verdicts), the machine
    and the commit measured."""
    return (
        f"# {title}{' (quick run: no verdicts)' if quick else ''}\n\n"
        f"Machine: {machine}. Measured at commit {revision}.\n\n"
    )
