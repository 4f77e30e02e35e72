#!/usr/bin/env bash
# Compiles every CUDA source with nvcc (compile only), so CUDA code cannot rot on machines without
# a GPU. A CPU build of torch ships incomplete CUDA headers, so unless the installed torch has CUDA,
# the headers come from a CUDA build of torch (MOE_INFER_CUDA_TORCH, default torch==2.14.1, which
# this project's machines serve from local disk): only its include/ folder is unpacked, and cached.
# Targets sm_90 (Hopper) by default (MOE_INFER_CUDA_ARCH).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${MOE_INFER_VENV:-$(pwd)/.venv}/bin/python"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x "$nvcc" ]] || { echo "[nvcc] nvcc not found: cannot compile the CUDA sources" >&2; exit 1; }
arch=${MOE_INFER_CUDA_ARCH:-sm_90}
out=build/nvcc_check
mkdir -p "$out"

if "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  mapfile -t includes < <("$py" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
  version=$("$py" -c "import torch; print(torch.__version__)")
else
  spec=${MOE_INFER_CUDA_TORCH:-torch==2.14.1}
  headers="build/cuda_torch_headers/${spec//=/}"
  if [[ ! -d "$headers/torch/include" ]]; then
    echo "[nvcc] unpacking the C++ headers of $spec"
    rm -rf build/cuda_torch_wheel && mkdir -p build/cuda_torch_wheel "$headers"
    "$py" -m pip download -q --disable-pip-version-check --no-deps "$spec" -d build/cuda_torch_wheel
    "$py" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('torch/include/')])" \
      build/cuda_torch_wheel/*.whl "$headers"
    rm -rf build/cuda_torch_wheel
  fi
  includes=("$headers/torch/include" "$headers/torch/include/torch/csrc/api/include")
  version=${spec#torch==}
fi
major_minor=$(echo "$version" | cut -d. -f1,2)
std=$("$py" -c "import sys; v = tuple(int(x) for x in sys.argv[1].split('.')); print('c++20' if v >= (2, 10) else 'c++17')" "$major_minor")

shopt -s nullglob
sources=(csrc/cuda/*.cu)
((${#sources[@]})) || { echo "[nvcc] no CUDA sources"; exit 0; }
status=0
for src in "${sources[@]}"; do
  obj="$out/$(basename "$src").o"
  if "$nvcc" -c "$src" -o "$obj" -std="$std" -arch="$arch" -O2 --expt-relaxed-constexpr \
    -Xcompiler -fPIC -DMOE_INFER_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
    -Icsrc "${includes[@]/#/-I}" 2>"$obj.log"; then
    echo "[nvcc] ok      $src (torch $version headers, $arch)"
  else
    echo "[nvcc] FAILED  $src"; cat "$obj.log"; status=1
  fi
done
exit $status
