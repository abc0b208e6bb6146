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
# (onnx-ir and its dependencies: ONNX Runtime's MatMulNBits quantizer imports it)
"${pip[@]}" install pytest==9.2.0 numpy==2.4.6 onnx==1.23.2 onnxruntime==1.31.1 ml_dtypes==0.6.0 protobuf==7.36.2 \
  onnx-ir==1.1.0 sympy==1.14.0 mpmath==1.3.0 packaging==26.4 typing_extensions==4.16.0
"${pip[@]}" install --no-deps -e export-scripts
"$venv/bin/python" -m pytest -q -p no:cacheprovider export-scripts/tests
