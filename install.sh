#!/usr/bin/env bash
# Installs the engine and its test tools into the current Python environment.
# A torch that is already installed (e.g. your CUDA build) is kept; only where none is
# present is the CPU build 2.13.0 installed first, so that no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q --upgrade "setuptools>=64" wheel
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
