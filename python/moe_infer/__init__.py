"""moe_infer: fast, memory-lean Mixture-of-Experts inference for PyTorch.

Importing the package loads torch, then the C++ extension (which registers
``torch.ops.moe_infer.*``), then the fake (meta) implementations and autograd formulas of those
ops, then the public modules.
"""

import sys
from typing import Any, Optional

import torch  # noqa: F401  (loads libtorch, which the extension links against)

# isort: split
from . import _C  # registers the ops

# isort: split
from . import _autograd, _fake, ops, reference  # noqa: F401  (register_autograd / register_fake for every op)
from .experts import MoEExperts
from .layer import MoELayer

# isort: split
# Expert parallelism, load balancing, and the fairseq-compatible layer (moe_infer.fairseq).
from . import distributed, fairseq, host_memory, placement  # noqa: F401

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_C.built_with_cuda)


def optimize(
    model: torch.nn.Module,
    *,
    expert_buffer: Optional[int] = None,
    buffer_policy: str = "paper",
    checkpoint: Optional[str] = None,
    ep_group: Optional[Any] = None,
    ep_placement: Optional[Any] = None,
    hf_capacity: bool = False,
    validate: bool = True,
    verbose: bool = True,
    huge_pages: bool = True,
) -> torch.nn.Module:
    """Runs every supported sparse MoE block of a transformers v5 model on moe_infer's fused ops, in place.

    Needs transformers >= 5 (the ``[hf]`` extra). Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    GPT-OSS, DeepSeek-V3, SwitchTransformers, NLLB-MoE; parameters and their names are unchanged.
    Calling it again on an optimized model applies the keywords to the blocks it already replaced.

    Args:
        model: a transformers model (or any module containing supported blocks).
        expert_buffer: keep every block's experts in host memory with this many expert slots per
            layer on the compute device (inference only; not SwitchTransformers / NLLB-MoE).
        buffer_policy: the buffers' eviction policy: "paper" (LIFO after inactive experts),
            "fifo", "lru" or "lfu".
        checkpoint: with ``expert_buffer``, a ``save_pretrained`` directory whose safetensors files
            hold the experts (read through mmap instead of taking the model's own weights).
        ep_group: a torch.distributed process group: every block's experts are spread over its
            ranks (inference only; every rank calls optimize and then the model).
        ep_placement: a :class:`moe_infer.placement.Placement` of the experts on the ranks
            (default: contiguous).
        hf_capacity: SwitchTransformers / NLLB-MoE only: reproduce transformers' expert capacity and
            its dropped tokens exactly (default: capacity-free dynamic gating).
        validate: on CUDA, check router logits for NaN on the host (one sync per layer).
        verbose: print what was done (``model.moe_infer_report`` holds it too).
        huge_pages: move the experts' weights computed on the CPU onto 2 MiB pages
            (:mod:`moe_infer.host_memory`; decode reads them about 1.5x as fast where Linux grants
            them).

    Returns:
        ``model`` itself, with ``model.moe_infer_report`` (:class:`moe_infer.integrations.hf.OptimizeReport`).

    Raises:
        ImportError: transformers >= 5 is not installed.
        ValueError: the model has no supported sparse MoE block (the message lists them).
    """
    from .integrations import hf

    return hf.optimize(
        model,
        expert_buffer=expert_buffer,
        buffer_policy=buffer_policy,
        checkpoint=checkpoint,
        ep_group=ep_group,
        ep_placement=ep_placement,
        hf_capacity=hf_capacity,
        validate=validate,
        verbose=verbose,
        huge_pages=huge_pages,
    )


if "transformers.integrations.moe" in sys.modules:
    # transformers is in use already: register the "moe_infer" experts implementation now (free).
    try:
        from .integrations import hf  # noqa: F401
    except ImportError:
        pass

__all__ = [
    "MoEExperts",
    "MoELayer",
    "built_with_cuda",
    "distributed",
    "fairseq",
    "ops",
    "optimize",
    "placement",
    "reference",
    "__version__",
]
