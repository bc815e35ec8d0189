#!/usr/bin/env bash
# Create .venv at the repo root with everything the app and the tests need.
# Idempotent: re-running after a pull only reinstalls when pyproject.toml changed.
#
# torch: a CPU machine gets the pinned CPU wheel (TORCH_SPEC overrides it, e.g.
# TORCH_SPEC="torch==2.13.0" or a CUDA build's spec); an existing torch in the
# venv is kept, so a GPU user's own build is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    fi
    .venv/bin/python -m pip install --quiet -e ".[server,sim,dev,ros2]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
