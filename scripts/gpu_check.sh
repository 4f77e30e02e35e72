#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with a CUDA GPU (the lent H200: its own
# python3 with torch + CUDA, nvcc, no internet). Builds the extension against the installed torch,
# runs the whole pytest suite with CUDA, compute-sanitizer (memcheck, racecheck) on a short run of
# every kernel, and the GPU benchmarks. Writes logs and tables to $OUT (when set) and to
# bench/results/gpu/, and prints a summary table last. Step time limits add up to 8.5 minutes;
# a healthy run takes about 5.
#   GPU_CHECK_STEPS="build pytest sanitizer bench"   the steps to run (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
results=bench/results/gpu
out=${OUT:-$results}
mkdir -p "$results" "$out"
steps=${GPU_CHECK_STEPS:-"build pytest sanitizer bench"}
summary=()
failed=0

run_step() {  # run_step NAME LOG TIMEOUT COMMAND...
  local name=$1 log=$2 limit=$3; shift 3
  local start=$SECONDS status
  echo "==== [gpu_check] $name (log: $out/$log)"
  timeout "$limit" "$@" >"$out/$log" 2>&1
  status=$?
  tail -n 25 "$out/$log"
  local verdict=ok
  if ((status == 124)); then verdict="TIMEOUT"; elif ((status != 0)); then verdict="FAILED($status)"; fi
  [[ $verdict == ok ]] || failed=1
  summary+=("$(printf '| %-26s | %-11s | %5ss |' "$name" "$verdict" $((SECONDS - start)))")
}

env_info=$({
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
} 2>&1)
echo "$env_info"

has() { [[ " $steps " == *" $1 "* ]]; }
if has build; then
  arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  run_step "build (setup.py)" build.log 170 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$arch" \
    "$py" setup.py build_ext --inplace
  "$py" -c "import moe_infer; assert moe_infer.built_with_cuda(), 'extension built without CUDA'" >>"$out/build.log" 2>&1 ||
    { echo "the extension has no CUDA kernels"; failed=1; }
fi
if has pytest; then
  run_step "pytest (CPU + CUDA)" pytest.log 140 "$py" -m pytest tests/python -q -p no:cacheprovider \
    -o addopts="" --timeout 120 --maxfail=20
fi
if has sanitizer; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  run_step "compute-sanitizer memcheck" sanitizer.log 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 3 "$py" scripts/cuda_kernel_smoke.py
  run_step "compute-sanitizer racecheck" racecheck.log 45 \
    compute-sanitizer --tool racecheck --error-exitcode 3 "$py" scripts/cuda_kernel_smoke.py
fi
if has bench; then
  mkdir -p bench/results/gpu
  run_step "bench/gpu_layer.py" bench.log 90 "$py" bench/gpu_layer.py --quick
  run_step "bench/buffer.py (cuda)" bench_buffer.log 100 "$py" bench/buffer.py --device cuda --quick \
    --output gpu/buffer_h200
  if [[ "$out" != "$results" ]]; then
    cp "$results/layer_h200.md" "$results/buffer_h200.md" "$out/" 2>/dev/null
  fi
fi

{
  echo '```'
  echo "$env_info"
  echo '```'
  echo
  echo "| step                       | result      |  time |"
  echo "|----------------------------|-------------|-------|"
  printf '%s\n' "${summary[@]}"
} >"$out/summary.md"
# The device tool returns at most 8 files from $OUT: one sanitizer log, one bench log.
[[ -f "$out/racecheck.log" ]] && { cat "$out/racecheck.log" >>"$out/sanitizer.log"; rm "$out/racecheck.log"; }
[[ -f "$out/bench_buffer.log" ]] && { cat "$out/bench_buffer.log" >>"$out/bench.log"; rm "$out/bench_buffer.log"; }
if [[ "$out" != "$results" ]]; then cp "$out"/*.md "$out"/*.log "$results/" 2>/dev/null; fi
echo
echo "==== [gpu_check] summary"
cat "$out/summary.md"
exit $failed
