#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install glam3d into it (editable), with the
# extras the README's set-up promises: the test suite and TensorBoard (RUN/tb/ event files).
# Torch is pinned to the CPU build 2.13.0 unless GLAM3D_TORCH overrides it (e.g. GLAM3D_TORCH="torch" on GPU nodes,
# or use environment.yml with conda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${GLAM3D_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.glam3d-installed"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[test,tensorboard]"
  echo "$want" > "$stamp"
fi
