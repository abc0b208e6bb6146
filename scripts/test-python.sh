#!/usr/bin/env bash
# Tests the export scripts' pure helpers (export-scripts/tests: manifest assembly, Winograd
# arithmetic, tensor names) in a small venv with only pytest and numpy: no torch, ONNX or
# diffusers. The package itself is installed without its dependencies.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=export-scripts/.venv-test
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install pytest==9.2.0 numpy==2.4.6
"${pip[@]}" install --no-deps -e export-scripts
"$venv/bin/python" -m pytest -q -p no:cacheprovider export-scripts/tests
