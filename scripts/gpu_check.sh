#!/usr/bin/env bash
# The GPU check, in two stages run from the repository root on a machine with a CUDA GPU (the lent
# H200: python3 3.12 with torch 2.11 + CUDA 13, nvcc, compute-sanitizer, no internet).
#
#   scripts/gpu_check.sh stage1     versions; build; the CUDA tests (test_cuda.py and -k cuda)
#   scripts/gpu_check.sh stage2     compute-sanitizer (memcheck, racecheck, synccheck) on
#                                   scripts/cuda_kernel_smoke.py; the benchmarks: the layer, the
#                                   optimized HF blocks, buffering (copy bandwidth and overlap)
#   scripts/gpu_check.sh all        stage1 then stage2 in one command
#   --dry-run                       rehearse on a machine without a GPU: every step runs its real
#                                   command line (build flags, imports, argument parsing) in its
#                                   CPU form, with 3x the limits; results go to
#                                   build/gpu_check_dry_run/
#
# Time: each stage has a budget of GPU_CHECK_BUDGET seconds (default 240). Every step has its own
# limit, cut to what is left of the budget; a step with less than its minimum left is SKIPPED, so a
# stage never outlives its budget (plus a few seconds of bookkeeping). The device tool gives 15
# minutes in all, a machine start costs 1-2 of them and a machine goes cold 30 s after a call:
# `all` (about 8.5 minutes with its start, timeout_s 540) leaves about 6 minutes to rerun the
# stage that failed (4 minutes + a start).
# Stage 2 rebuilds the extension first only if moe_infer._C with CUDA does not import (after
# `all`, or with the .so that stage 1 returns carried back).
#
# Results: bench/results/gpu/ (and $OUT when set), written as each step ends: per stage one
# summary (stage<N>_summary.md) and one bundle of every step's log (stage<N>_logs.txt), plus the
# benchmark tables; at most 8 files per stage. Exit status non-zero if a step failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-240}

dry_run=0
stages=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    stage1 | stage2) stages+=("$arg") ;;
    all) stages+=(stage1 stage2) ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected stage1, stage2, all, --dry-run)" >&2; exit 2 ;;
  esac
done
((${#stages[@]})) || { echo "gpu_check.sh: name a stage: stage1, stage2 or all (see --help)" >&2; exit 2; }

if ((dry_run)); then
  results=build/gpu_check_dry_run
  out=$results
else
  results=bench/results/gpu
  out=${OUT:-$results}
fi
mkdir -p "$results" "$out"
failed=0

# ---- step runner ------------------------------------------------------------------------------
stage=""
stage_start=0
summary_rows=()
logs=""

publish() {  # copies the stage's files to $OUT as they are written
  [[ "$out" == "$results" ]] || cp "$@" "$out/" 2>/dev/null
  true
}

write_summary() {
  {
    echo "# GPU check, $stage$( ((dry_run)) && echo ' (dry run on the CPU)')"
    echo
    echo '```'
    echo "$env_info"
    echo '```'
    echo
    echo "Budget ${budget}s; used $((SECONDS - stage_start))s."
    echo
    echo "| step | result | limit | time |"
    echo "|------|--------|-------|------|"
    printf '%s\n' "${summary_rows[@]}"
  } >"$results/${stage}_summary.md"
  publish "$results/${stage}_summary.md" "$logs"
}

# step NAME LIMIT MINIMUM COMMAND...: runs COMMAND with min(LIMIT, budget left) seconds.
step() {
  local name=$1 limit=$2 minimum=$3; shift 3
  local left=$((budget - (SECONDS - stage_start)))
  ((dry_run)) && limit=$((limit * 3))  # the CPU is slower than the GPU; the rehearsal is for errors
  ((limit > left)) && limit=$left
  local verdict status start=$SECONDS
  if ((limit < minimum)); then
    verdict="SKIPPED (${left}s left, needs ${minimum}s)"
    failed=1
  else
    echo "==== [gpu_check] $stage: $name (limit ${limit}s)"
    {
      echo
      echo "==== $name (limit ${limit}s): $*"
    } >>"$logs"
    # Shell functions run in a child bash (exported below), so `timeout` can stop them.
    timeout -k 5 "$limit" bash -c '"$@"' step "$@" >>"$logs" 2>&1
    status=$?
    tail -n 30 "$logs"
    verdict=ok
    if ((status == 124 || status == 137)); then
      verdict=TIMEOUT
    elif ((status == 77)); then
      verdict="unavailable (see log)"
    elif ((status != 0)); then
      verdict="FAILED ($status)"
    fi
    [[ $verdict == ok || $verdict == unavailable* ]] || failed=1
  fi
  summary_rows+=("| $name | $verdict | ${limit}s | $((SECONDS - start))s |")
  write_summary
}

# ---- the steps --------------------------------------------------------------------------------
versions() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "no nvidia-smi"
  fi
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  "$py" - <<'EOF'
import importlib.metadata as md
for name in ("transformers", "safetensors", "pytest", "pytest-timeout", "ninja"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
  (nvcc --version | tail -n 1) 2>&1 || echo "no nvcc"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --version | tail -n 1
  else
    echo "no compute-sanitizer"
  fi
}

cuda_extension_loads() {
  "$py" -c "import moe_infer, sys; sys.exit(0 if moe_infer.built_with_cuda() else 1)" >/dev/null 2>&1
}

build() {
  local arch
  arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '9.0')")
  MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=$arch "$py" setup.py -q build_ext --inplace || return
  local want_cuda
  want_cuda=$("$py" -c "import torch; print(int(torch.version.cuda is not None))")
  "$py" -c "import moe_infer; print('built_with_cuda:', moe_infer.built_with_cuda())"
  if ((want_cuda)); then
    cuda_extension_loads || { echo "the extension has no CUDA kernels"; return 1; }
  fi
  # The built module, so a later call on a fresh machine can carry it back instead of rebuilding.
  ((dry_run)) || cp python/moe_infer/_C*.so "$out/" 2>/dev/null
  true
}

cuda_tests() {
  local timeout_flag=()
  "$py" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 60)
  # -k cuda: the whole of test_cuda.py and every test parametrized on the cuda device; modules
  # whose optional dependencies are missing skip themselves (pytest.importorskip).
  "$py" -m pytest tests/python -k cuda -q -rs -p no:cacheprovider -o addopts="" --maxfail=25 \
    --continue-on-collection-errors "${timeout_flag[@]}"
}

sanitizer() {  # sanitizer TOOL: the kernel smoke run under compute-sanitizer
  local tool=$1
  if ((dry_run)); then
    if [[ $tool == memcheck ]]; then
      echo "(dry run: the smoke script on the CPU, without compute-sanitizer)"
      "$py" scripts/cuda_kernel_smoke.py --device cpu --tool "$tool"
    else
      echo "(dry run: the smoke script's arguments only)"
      "$py" scripts/cuda_kernel_smoke.py --device cpu --tool "$tool" --help >/dev/null
    fi
    return
  fi
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 77; }
  local log
  log=$(mktemp)
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
    --print-limit 20 "$py" scripts/cuda_kernel_smoke.py --tool "$tool" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  if grep -q "Device not supported\|Unable to find injection library" "$log"; then
    echo "compute-sanitizer cannot attach to this device (seen under gVisor): $tool not run"
    status=77
  fi
  rm -f "$log"
  return "$status"
}

bench() {  # bench SCRIPT ARGS...: a benchmark, --dry-run on the CPU
  local script=$1; shift
  if ((dry_run)); then
    "$py" "$script" "$@" --dry-run
  else
    "$py" "$script" "$@"
  fi
}

# ---- the stages -------------------------------------------------------------------------------
export py dry_run out
export -f versions cuda_extension_loads build cuda_tests sanitizer bench
env_info=$(versions 2>&1)
echo "$env_info"

for stage in "${stages[@]}"; do
  stage_start=$SECONDS
  summary_rows=()
  logs="$results/${stage}_logs.txt"
  : >"$logs"
  case $stage in
    stage1)
      step "build (setup.py build_ext)" 150 60 build
      step "CUDA tests (pytest -k cuda)" 90 30 cuda_tests
      ;;
    stage2)
      if ! cuda_extension_loads && ! ((dry_run)); then
        step "build (setup.py build_ext)" 150 60 build
      fi
      step "compute-sanitizer memcheck" 50 25 sanitizer memcheck
      step "compute-sanitizer racecheck" 30 20 sanitizer racecheck
      step "compute-sanitizer synccheck" 25 15 sanitizer synccheck
      step "bench: MoE layer" 55 30 bench bench/gpu_layer.py --part layer --quick
      step "bench: optimized HF blocks" 35 20 bench bench/gpu_layer.py --part hf --quick
      step "bench: buffering (copy bandwidth, overlap)" 40 25 bench bench/gpu_layer.py --part buffer --quick
      ;;
  esac
  echo
  echo "==== [gpu_check] $stage summary"
  cat "$results/${stage}_summary.md"
done
exit $failed
