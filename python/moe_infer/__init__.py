"""moe_infer: fast, memory-lean Mixture-of-Experts inference for PyTorch.

Importing the package loads torch, then the C++ extension (which registers
``torch.ops.moe_infer.*``), then the fake (meta) implementations and autograd formulas of those
ops, then the public modules.
"""

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


__all__ = ["MoELayer", "built_with_cuda", "distributed", "fairseq", "ops", "placement", "reference", "__version__"]
