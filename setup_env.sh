#!/usr/bin/env bash
# Fresh machine -> working .venv for this repo. Run `bash setup_env.sh` or `source setup_env.sh` (also activates).
# torch: with an NVIDIA GPU (nvidia-smi works) the default PyPI CUDA build; without one torch==2.13.0, which is the
# CPU build on our CPU machines. Override with TORCH_SPEC="torch==X.Y" if you need another build.
# Idempotent: a second run only checks that everything is installed.

_memory_test_setup() {
    local repo venv python torch_spec
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    venv="${VENV_DIR:-$repo/.venv}"
    python="${PYTHON:-python3}"

    if ! command -v "$python" >/dev/null 2>&1; then
        echo "setup_env.sh: $python not found; install Python >= 3.10 first" >&2
        return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_env.sh: creating $venv"
        "$python" -m venv "$venv" || return 1
    fi

    if [ -n "${TORCH_SPEC:-}" ]; then
        torch_spec="$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        torch_spec="torch>=2.6"
        echo "setup_env.sh: NVIDIA GPU found -> CUDA build of torch"
    else
        torch_spec="torch==2.13.0"
        echo "setup_env.sh: no GPU -> CPU build of torch ($torch_spec)"
    fi

    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec" || return 1
    fi
    # Installing the rest after torch keeps pip from replacing the build chosen above.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$repo/requirements.txt" || return 1
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" \
        >/dev/null || return 1
    "$venv/bin/python" - <<'EOF' || return 1
import diffusers, opacus, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
print(f"setup_env.sh: ready - torch {torch.__version__}, opacus {opacus.__version__}, "
      f"diffusers {diffusers.__version__}, GPU: {gpu}")
EOF
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # sourced: set up, then activate in the caller's shell without leaking `set -e` into it
    _memory_test_setup && source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.venv/bin/activate"
else
    set -uo pipefail
    _memory_test_setup
fi
