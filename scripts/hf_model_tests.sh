#!/usr/bin/env bash
# transformers' own model test suites (ModelTesterMixin and the tests/models/<arch> files of the
# installed transformers) with and without moe_infer.optimize applied to every model they build.
#
#   bash scripts/hf_model_tests.sh [arch ...]      (default: the 8 supported architectures)
#
# Needs transformers' test tree at the installed version (tests/models is not in the wheel nor in
# the sdist): a clone of the v<version> tag in $MOE_INFER_TF_SRC (default /tmp/transformers-src,
# cloned with --depth 1 when missing), and `parameterized` (installed into the venv if missing).
# Writes per-arch JUnit XML and logs under bench/results/hf_model_tests/ and a summary table to
# bench/results/hf_model_tests.md. CPU only; one arch at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="${MOE_INFER_VENV:-$root/.venv}/bin/python"
version=$("$py" -c "import transformers; print(transformers.__version__)")
src="${MOE_INFER_TF_SRC:-/tmp/transformers-src}"
if [[ ! -d "$src/tests/models" ]]; then
  git clone -q --depth 1 --branch "v$version" https://github.com/huggingface/transformers "$src"
fi
"$py" -c "import parameterized" 2>/dev/null || "$py" -m pip install -q "parameterized==0.9.0"

archs=("$@")
((${#archs[@]})) || archs=(mixtral qwen2_moe qwen3_moe olmoe gpt_oss deepseek_v3 switch_transformers nllb_moe)
out="$root/bench/results/hf_model_tests"
mkdir -p "$out"
for arch in "${archs[@]}"; do
  for mode in plain optimized; do
    flag=$([[ $mode == optimized ]] && echo 1 || echo 0)
    echo "[hf_model_tests] $arch ($mode)"
    # Run from the sdist root so `tests.` imports resolve; the plugin sits on PYTHONPATH.
    (cd "$src" &&
      MOE_INFER_OPTIMIZE=$flag PYTHONPATH="$root/tests/hf_model_suite:$root/python:$src" \
        OMP_NUM_THREADS=1 timeout "${MOE_INFER_HF_TEST_TIMEOUT:-3000}" \
        "$py" -m pytest -q -p no:cacheprovider -p moe_infer_optimize_plugin "tests/models/$arch/test_modeling_$arch.py" \
        -k "not Integration and not integration" --timeout 300 \
        --junitxml="$out/$arch.$mode.xml" >"$out/$arch.$mode.log" 2>&1) || true
  done
done
"$py" "$root/tests/hf_model_suite/summarize.py" "$out" >"$root/bench/results/hf_model_tests.md"
cat "$root/bench/results/hf_model_tests.md"
