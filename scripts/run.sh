#!/usr/bin/env bash
# The main job: sets the machine up, then builds realistic MoE layers with seeded weights, checks
# that moe_infer agrees with the plain-PyTorch reference, and prints a timing table (with a
# progress bar while it runs). Results go to bench/results/. Arguments go to bench/layer.py
# (e.g. scripts/run.sh --quick, or --device cuda on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${MOE_INFER_VENV:-$(pwd)/.venv}/bin/python" bench/layer.py "$@"
