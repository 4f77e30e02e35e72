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

The subpackage, by job: ``checkpoint`` (safetensors read through mmap), ``store``
(:class:`ExpertStore`), ``runtime`` (:class:`ExpertBuffer`), ``attach`` (buffers on expert
modules), ``profile`` (activation profiles, warm start), ``prefetch`` (:class:`NextLayerPrefetcher`)
and ``simulate`` (the trace-driven simulator).
"""

from .attach import attach_expert_buffer, attach_expert_buffers, buffer_stats
from .checkpoint import SafetensorsCheckpoint, SafetensorsFile
from .prefetch import NextLayerPrefetcher
from .profile import load_activation_profile, save_activation_profile, warm_start_buffers
from .runtime import LIVE_POLICIES, ExpertBuffer
from .simulate import POLICIES, SimulationResult, simulate, simulate_expert_cache, trace_accesses
from .store import PARTS, ExpertStore

__all__ = [
    "LIVE_POLICIES",
    "PARTS",
    "POLICIES",
    "ExpertBuffer",
    "ExpertStore",
    "NextLayerPrefetcher",
    "SafetensorsCheckpoint",
    "SafetensorsFile",
    "SimulationResult",
    "attach_expert_buffer",
    "attach_expert_buffers",
    "buffer_stats",
    "load_activation_profile",
    "save_activation_profile",
    "simulate",
    "simulate_expert_cache",
    "trace_accesses",
    "warm_start_buffers",
]
