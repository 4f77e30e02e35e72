#!/usr/bin/env bash
# Compiles every CUDA source with nvcc (compile only), so CUDA code cannot rot on machines without
# a GPU. Works with a CPU build of torch: only headers are needed. Targets sm_90 (Hopper) by default.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${MOE_INFER_VENV:-$(pwd)/.venv}/bin/python"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x "$nvcc" ]] || { echo "[nvcc] nvcc not found: cannot compile the CUDA sources" >&2; exit 1; }
arch=${MOE_INFER_CUDA_ARCH:-sm_90}
std=$("$py" -c "import torch; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 10) else 'c++17')")
abi=$("$py" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
mapfile -t includes < <("$py" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
out=build/nvcc_check
mkdir -p "$out"
# A CPU build of torch ships the c10/cuda headers but not their CMake-generated config header.
has_macros=0
for dir in "${includes[@]}"; do [[ -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]] && has_macros=1; done
if ((!has_macros)); then
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes+=("$(pwd)/$out/stub")
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
((${#sources[@]})) || { echo "[nvcc] no CUDA sources"; exit 0; }
status=0
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src").o"
  if "$nvcc" -c "$src" -o "$obj" -std="$std" -arch="$arch" -O2 --expt-relaxed-constexpr \
    -Xcompiler -fPIC -DMOE_INFER_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -Icsrc "${includes[@]/#/-I}" 2>"$obj.log"; then
    echo "[nvcc] ok      $src"
  else
    echo "[nvcc] FAILED  $src"; cat "$obj.log"; status=1
  fi
done
exit $status
