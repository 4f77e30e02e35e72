#!/usr/bin/env bash
# The main job: sets the machine up, then shows what moe_infer is for, end to end, on a transformers
# MoE model built from a config (seeded weights, no download): generation as shipped vs optimized
# (float32: the same tokens; bfloat16: logits as close as transformers' grouped_mm's; tokens/s),
# the same with expert buffering (expert memory, slots, hit rate), static vs dynamic gating, and
# expert placement, with a plot (bench/generate.py).
#   scripts/run.sh --quick     about a minute once set up
#   scripts/run.sh --refresh   write the committed bench/results/main_cpu.* instead of results/
# Tables and plot go to results/ (untracked), so running the main job leaves the clone clean.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${MOE_INFER_VENV:-$(pwd)/.venv}/bin/python" bench/generate.py "$@"
