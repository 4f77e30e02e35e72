"""Builds moe_infer and its extension module moe_infer._C.

The CUDA sources are compiled when the installed torch has CUDA and nvcc is found; otherwise the
extension is CPU-only. Build with `--no-build-isolation` so the installed torch is used:

    pip install --no-build-isolation -e .       (or: python setup.py build_ext --inplace)
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

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
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return CppExtension(
            "moe_infer._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "moe_infer._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("MOE_INFER_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + ["-DMOE_INFER_WITH_CUDA"], "nvcc": nvcc_flags},
    )


setup(
    name="moe_infer",
    version="0.1.0",
    description="Fast, memory-lean Mixture-of-Experts inference: dynamic gating, expert buffering, load balancing",
    package_dir={"": "python"},
    packages=find_packages("python"),
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    extras_require={"hf": ["transformers>=5.0"], "bench": ["matplotlib"], "safetensors": ["safetensors"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
