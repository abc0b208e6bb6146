#!/usr/bin/env bash
# Tests the export scripts' helpers that need no torch (export-scripts/tests: manifest assembly,
# Winograd arithmetic, tensor names, ONNX graph rewrites) in a small venv with pytest, numpy,
# onnx and onnxruntime (pinned as in requirements.txt): no torch or diffusers. The package itself
# is installed without its dependencies.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=export-scripts/.venv-test
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install pytest==9.2.0 numpy==2.4.6 onnx==1.23.2 onnxruntime==1.31.1 ml_dtypes==0.6.0 protobuf==7.36.2
"${pip[@]}" install --no-deps -e export-scripts
"$venv/bin/python" -m pytest -q -p no:cacheprovider export-scripts/tests
