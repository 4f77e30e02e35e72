#!/usr/bin/env bash
# transformers' own model test suites (ModelTesterMixin, GenerationTesterMixin, ... and the
# tests/models/<arch>/test_modeling_<arch>.py files) with and without moe_infer.optimize applied to
# every model they build (tests/hf_model_suite/moe_infer_optimize_plugin.py).
#
#   bash scripts/hf_model_tests.sh [arch ...]      (default: the 8 supported architectures)
#
# transformers' test tree is in neither its wheel nor its sdist. MOE_INFER_TF_SRC (default
# /tmp/transformers-src) names a directory holding it: transformers' tests/ with conftest.py and
# pyproject.toml next to it, e.g. `git archive <commit> tests conftest.py pyproject.toml utils | tar x`
# from any checkout of a version near the installed one. When $MOE_INFER_TF_SRC/tests/models exists
# it is used as it is (no network); otherwise the v<installed version> tag is cloned there (needs
# github.com). The tree's version may differ from the installed transformers, so some tests may fail
# without moe_infer too (and some imports of the tree may need adapting): the comparison that
# matters is plain vs optimized on the same tree.
# Needs `parameterized`, `pytest-timeout` and `pytest-xdist` in the venv (installed from the package
# index if missing).
#
# Environment:
#   MOE_INFER_VENV                  the venv (default ./.venv)
#   MOE_INFER_HF_TEST_SELECT        pytest -k expression (default: every test but the integration ones)
#   MOE_INFER_HF_PER_TEST_TIMEOUT   seconds one test may take (default 300; then it counts as failed)
#   MOE_INFER_HF_TEST_TIMEOUT       seconds one arch in one mode may take (default 3000)
#   MOE_INFER_HF_TEST_OUT           JUnit XML and logs (default build/hf_model_tests)
#   MOE_INFER_HF_TEST_MODES         "plain optimized" (default), or one of them to rerun only it
# Writes the summary table to bench/results/hf_model_tests.md. CPU only, one thread, one arch at a
# time, offline (HF_HUB_OFFLINE=1: tests that need the Hub fail or skip in both modes alike).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="${MOE_INFER_VENV:-$root/.venv}/bin/python"
version=$("$py" -c "import transformers; print(transformers.__version__)")
src="${MOE_INFER_TF_SRC:-/tmp/transformers-src}"
if [[ ! -d "$src/tests/models" ]]; then
  echo "[hf_model_tests] no test tree in $src: cloning transformers v$version"
  git clone -q --depth 1 --branch "v$version" https://github.com/huggingface/transformers "$src"
fi
"$py" -c "import parameterized" 2>/dev/null || "$py" -m pip install -q "parameterized==0.9.0"
"$py" -c "import pytest_timeout" 2>/dev/null || "$py" -m pip install -q "pytest-timeout"
# transformers' conftest registers a plugin with pytest-xdist hooks: pytest refuses it without xdist.
"$py" -c "import xdist" 2>/dev/null || "$py" -m pip install -q "pytest-xdist"

archs=("$@")
((${#archs[@]})) || archs=(mixtral qwen2_moe qwen3_moe olmoe gpt_oss deepseek_v3 switch_transformers nllb_moe)
out="${MOE_INFER_HF_TEST_OUT:-$root/build/hf_model_tests}"
mkdir -p "$out"
for arch in "${archs[@]}"; do
  for mode in ${MOE_INFER_HF_TEST_MODES:-plain optimized}; do
    flag=$([[ $mode == optimized ]] && echo 1 || echo 0)
    echo "[hf_model_tests] $arch ($mode)"
    # Run from the tree's root so `tests.` imports resolve; the plugin sits on PYTHONPATH.
    (cd "$src" &&
      MOE_INFER_OPTIMIZE=$flag PYTHONPATH="$root/tests/hf_model_suite:$root/python:$src" \
        HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 timeout "${MOE_INFER_HF_TEST_TIMEOUT:-3000}" \
        "$py" -m pytest -q -p no:cacheprovider -p moe_infer_optimize_plugin "tests/models/$arch/test_modeling_$arch.py" \
        -k "${MOE_INFER_HF_TEST_SELECT:-not Integration and not integration}" \
        --timeout "${MOE_INFER_HF_PER_TEST_TIMEOUT:-300}" \
        --junitxml="$out/$arch.$mode.xml" >"$out/$arch.$mode.log" 2>&1) || true
  done
done
# $src/TREE.txt, if there, describes a pre-made tree (where it came from, what was adapted) in the summary.
tree=$(cat "$src/TREE.txt" 2>/dev/null || git -C "$src" describe --tags --always 2>/dev/null || echo "unknown")
"$py" "$root/tests/hf_model_suite/summarize.py" "$out" "$version" "$tree" >"$root/bench/results/hf_model_tests.md"
cat "$root/bench/results/hf_model_tests.md"
