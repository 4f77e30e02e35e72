"""Builds moe_infer's extension module moe_infer._C against the torch of the target environment.

The package's metadata is in pyproject.toml. Install torch (>= 2.6) first, then, from a checkout:

    pip install --no-build-isolation .        (".[hf]" adds transformers; "-e ." for an editable install)
    python setup.py build_ext --inplace       (the extension only, next to the sources in python/)

Plain `pip install .` builds in an isolated environment that has no torch; there this file imports
the torch of the environment being installed into (pip's isolation keeps the interpreter, so
sysconfig still names that environment's site-packages). The CUDA sources are compiled when that
torch has CUDA and nvcc is found (MOE_INFER_CUDA=0/1 forces it); otherwise the extension is CPU-only.
They are built for TORCH_CUDA_ARCH_LIST where it is set, else for the GPU visible, else for
DEFAULT_CUDA_ARCHS.
"""

import glob
import os
import shutil
import sys
import sysconfig

MIN_TORCH = (2, 6)
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _import_torch():
    """The torch to compile against, or a SystemExit that says what to do."""
    try:
        import torch
    except ImportError:
        # Under pip's build isolation: look in the target environment's site-packages.
        for key in ("purelib", "platlib"):
            site = sysconfig.get_paths()[key]
            if os.path.isdir(os.path.join(site, "torch")) and site not in sys.path:
                sys.path.append(site)
        try:
            import torch
        except ImportError as error:
            raise SystemExit(
                f"moe_infer: cannot import torch ({error}). moe_infer compiles against the torch installed in the "
                "environment it is installed into: install torch >= 2.6 first (https://pytorch.org/get-started), "
                "then run `pip install --no-build-isolation .` from the checkout."
            ) from None
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise SystemExit(
            f"moe_infer: torch {torch.__version__} (at {os.path.dirname(torch.__file__)}) is too old; "
            f"moe_infer needs torch >= {'.'.join(map(str, MIN_TORCH))}."
        )
    print(f"moe_infer: building against torch {torch.__version__} at {os.path.dirname(torch.__file__)}")
    return torch


torch = _import_torch()

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda():
    forced = os.environ.get("MOE_INFER_CUDA")
    if forced is not None:
        return forced == "1"
    has_nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    return torch.version.cuda is not None and has_nvcc


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/common/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fvisibility=hidden"]  # the C++ standard is the one torch requires
    if os.environ.get("MOE_INFER_DEBUG") == "1":
        cxx_flags = ["-O0", "-g"]
    # at::parallel_for is a template whose `#pragma omp parallel` is compiled here: without OpenMP
    # every parallel loop of ours runs on one thread. Linking libgomp by its soname reuses the copy
    # torch has loaded, so torch.set_num_threads governs our loops too.
    link_flags = []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return CppExtension(
            "moe_infer._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    # The GPU's architecture; with no GPU visible (a build machine), torch's own choice can be an
    # empty list, on which its build fails with an IndexError: A100 and H100/H200 by default.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # unset or empty
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(
                f"moe_infer: no GPU visible, so the CUDA kernels are built for {DEFAULT_CUDA_ARCHS} (A100, H100/H200, PTX for newer); "
                "set TORCH_CUDA_ARCH_LIST for another GPU, or MOE_INFER_CUDA=0 for a CPU-only build"
            )
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "moe_infer._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("MOE_INFER_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + ["-DMOE_INFER_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
