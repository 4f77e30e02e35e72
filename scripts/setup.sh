#!/usr/bin/env bash
# Make this machine ready to build, run and test moe_infer; quick when it already is.
#   - Debian packages (Catch2 v2, clang-format, cmake, ninja) through apt-get when missing
#   - a project virtual environment .venv with pinned torch and Python dependencies
#   - the extension build (moe_infer._C, in place, incremental)
# Environment: MOE_INFER_VENV (default .venv), MOE_INFER_SKIP_APT=1 to leave apt alone.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

TORCH_PIN="torch==2.13.0"
PY_PINS=(
  "numpy==2.4.6"
  "pytest==9.2.0"
  "pytest-timeout==2.4.0"
  "ruff==0.17.6"
  "ninja==1.13.2"
  "matplotlib==3.11.2"
  "safetensors==0.8.0"
  "transformers==5.24.0"
  "hypothesis==6.170.15"
  "accelerate==1.15.0"
)
APT_PKGS=(catch2 clang-format-14 cmake ninja-build g++)

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages
if [[ "${MOE_INFER_SKIP_APT:-0}" != "1" ]]; then
  missing=()
  for pkg in "${APT_PKGS[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      log "installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      log "warning: missing Debian packages (${missing[*]}) and no root apt-get; C++ tests may not build"
    fi
  fi
fi

# 2. Virtual environment
venv="${MOE_INFER_VENV:-$root/.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.moe_infer_deps"
want="$TORCH_PIN ${PY_PINS[*]}"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "installing Python dependencies ($TORCH_PIN, ${#PY_PINS[@]} more)"
  "$py" -m pip install -q --disable-pip-version-check "setuptools==84.2.1" "wheel==0.48.0"
  "$py" -m pip install -q --disable-pip-version-check "$TORCH_PIN" "${PY_PINS[@]}"
  echo "$want" >"$stamp"
fi

# The package is imported from python/ (what an editable install does, without its build step).
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$root/python" >"$site/moe_infer_src.pth"

# 3. Build the extension in place (ninja makes re-runs incremental)
log "building moe_infer._C"
mkdir -p "$root/build"
if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" setup.py build_ext --inplace >"$root/build/setup_build.log" 2>&1; then
  cat "$root/build/setup_build.log" >&2
  log "build failed (log: build/setup_build.log)"
  exit 1
fi
"$py" -c "import moe_infer, torch; print('[setup] moe_infer', moe_infer.__version__, 'torch', torch.__version__, 'cuda ops:', moe_infer.built_with_cuda())" \
  || { log "import check failed"; exit 1; }
