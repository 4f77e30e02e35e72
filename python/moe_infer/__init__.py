"""moe_infer: fast, memory-lean Mixture-of-Experts inference for PyTorch.

Importing the package loads torch, then the C++ extension (which registers
``torch.ops.moe_infer.*``), then the fake (meta) implementations and autograd formulas of those
ops, then the public modules.
"""

import sys

import torch  # noqa: F401  (loads libtorch, which the extension links against)

# isort: split
from . import _C  # registers the ops

# isort: split
from . import _autograd, _fake, ops, reference  # noqa: F401  (register_autograd / register_fake for every op)
from .layer import MoELayer

# isort: split
# Expert parallelism, load balancing, and the fairseq-compatible layer (moe_infer.fairseq).
from . import distributed, fairseq, placement  # noqa: F401

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_C.built_with_cuda)


def optimize(model, **options):
    """Runs every supported sparse MoE block of a transformers v5 model on moe_infer's fused ops, in place.

    Needs the extra ``moe_infer[hf]`` (transformers >= 5); see
    :func:`moe_infer.integrations.hf.optimize` for the options and the supported blocks.
    """
    from .integrations import hf

    return hf.optimize(model, **options)


if "transformers.integrations.moe" in sys.modules:
    # transformers is in use already: register the "moe_infer" experts implementation now (free).
    try:
        from .integrations import hf  # noqa: F401
    except ImportError:
        pass

__all__ = [
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
