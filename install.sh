#!/usr/bin/env bash
# Set up kernel-farm from nothing: a venv in .venv with the CPU build of torch 2.13, Ray 2.60
# and the project (editable) with its test extras. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: the CPU build (an unpinned torch can pull a multi-GB CUDA build).
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, ray, kernels, farm; print('kernel-farm ready: torch', torch.__version__, 'ray', ray.__version__)"
