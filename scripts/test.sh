#!/usr/bin/env bash
# The whole test suite: lint, pytest, the C++ core with Catch2 (plain and ASan+UBSan), an nvcc
# compile of every CUDA source, and a CPU rehearsal of the GPU check (scripts/gpu_check.sh
# --dry-run: its build, imports and every step's arguments). Sets the machine up first
# (scripts/setup.sh). Non-zero on any failure.
#   MOE_INFER_QUICK=1   skip the sanitizer build, the nvcc compile and the GPU-check rehearsal
#   extra arguments     are passed to pytest (e.g. scripts/test.sh -k gating)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/setup.sh || { echo "[test] setup failed"; exit 1; }
py="${MOE_INFER_VENV:-$root/.venv}/bin/python"
bin="$(dirname "$py")"
results=()
failed=0

step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  echo "==== [test] $name"
  if "$@"; then
    results+=("$(printf '%-28s %-6s %5ss' "$name" ok $((SECONDS - start)))")
  else
    results+=("$(printf '%-28s %-6s %5ss' "$name" FAILED $((SECONDS - start)))")
    failed=1
  fi
}

cpp_files() { find csrc tests/cpp \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort; }

lint() {
  "$bin/ruff" check python tests/python bench scripts &&
    "$bin/ruff" format --check python tests/python bench scripts &&
    clang-format-14 --dry-run --Werror $(cpp_files)
}

cmake_tests() {  # cmake_tests BUILD_DIR EXTRA_CMAKE_ARGS...
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DPython3_EXECUTABLE="$py" "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j"$(nproc)" >"$dir.build.log" 2>&1 || { tail -50 "$dir.build.log"; return 1; }
  ctest --test-dir "$dir" --output-on-failure -j2
}

mkdir -p build
step "lint (ruff, clang-format)" lint
step "pytest" "$py" -m pytest -q -p no:cacheprovider "$@"
step "ctest (Catch2)" cmake_tests build/cmake
if [[ "${MOE_INFER_QUICK:-0}" != "1" ]]; then
  export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1
  step "ctest (ASan+UBSan)" cmake_tests build/cmake-asan -DMOE_INFER_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
  step "nvcc compile (every .cu)" scripts/check_cuda_compile.sh
  step "GPU check rehearsal (CPU)" env PYTHON="$py" GPU_CHECK_BUDGET=900 scripts/gpu_check.sh --dry-run all
fi

echo
echo "==== [test] summary"
printf '%s\n' "${results[@]}"
exit $failed
