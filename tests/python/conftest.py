import contextlib
import os
import re
import zlib

import pytest
import torch

import moe_infer  # noqa: F401  (registers the ops)
from moe_infer._schema import complete


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and moe_infer.built_with_cuda():
        devices.append("cuda")
    return devices


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@contextlib.contextmanager
def composite_kernels():
    """Every op runs its composite implementation (moe_infer._C.composite.<op>, what the dispatcher
    runs on a device without a kernel): the CPU and CUDA kernels are overridden in the dispatcher
    for the duration, so every call path (ops, layers, integrations) reaches the composite."""
    with torch.library._scoped_library("moe_infer", "IMPL") as lib:
        for name in dir(moe_infer._C.composite):
            if not name.startswith("_"):
                for key in ("CPU", "CUDA"):
                    lib.impl(name, _with_defaults(name, getattr(moe_infer._C.composite, name)), key)
        yield


def _with_defaults(op, composite):
    # The dispatcher leaves trailing default arguments out when it calls a Python kernel.
    return lambda *args, **kwargs: composite(*complete(op, args, kwargs))


def use_kernels(enabled: bool):
    """The hand-written kernels (enabled) or the composite implementations."""
    return contextlib.nullcontext() if enabled else composite_kernels()


@pytest.fixture(params=["kernels", "composite"])
def impl(request):
    """Runs a test on the hand-written kernels and on the composite implementations."""
    with use_kernels(request.param == "kernels"):
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): more threads only add synchronisation, and stall on a
    loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed(request):
    # Random inputs, reproducible per test (its name), varied with MOE_INFER_TEST_SEED.
    seed = int(os.environ.get("MOE_INFER_TEST_SEED", "0")) ^ zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)


def tolerance(dtype):
    """(rtol, atol) for comparing against the float32/float64 reference."""
    return {
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2e-2, 2e-2),
        torch.bfloat16: (5e-2, 5e-2),
    }[dtype]


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


_DTYPE_MISTAKE = re.compile(r"must be (float32|int32|int64|bool)|is (Double|Float|Long|Int|Half|BFloat16) but")


def argument_error(message: str) -> type:
    """The exception of a bad argument (one type per kind of mistake, as torch's TORCH_CHECK_TYPE /
    TORCH_CHECK_VALUE raise): TypeError for a wrong dtype, ValueError for any other bad value."""
    return TypeError if _DTYPE_MISTAKE.search(message) else ValueError
