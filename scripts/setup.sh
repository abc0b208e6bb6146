#!/usr/bin/env bash
# Installs what zimage needs at run time into the project-local .runtime/ folder:
# ONNX Runtime 1.31.1 as a shared library, taken from PyPI's wheel (no system changes).
# ZIMAGE_ORT_PACKAGE=onnxruntime-gpu selects the CUDA/TensorRT build instead.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
package=${ZIMAGE_ORT_PACKAGE:-onnxruntime}
version=1.31.1
runtime="$root/.runtime"
lib="$runtime/lib/libonnxruntime.so.$version"

if [ -f "$lib" ] && [ -f "$runtime/package" ] && [ "$(cat "$runtime/package")" = "$package==$version" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "setup: python3 with pip is needed to fetch $package==$version" >&2; exit 1; }
echo "setup: installing $package==$version into .runtime/" >&2
rm -rf "$runtime"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$runtime/python" "$package==$version"
# The provider libraries (CUDA, TensorRT) must sit beside libonnxruntime, so the whole capi
# folder is linked rather than the one file.
ln -sfn python/onnxruntime/capi "$runtime/lib"
echo "$package==$version" > "$runtime/package"
test -f "$lib" || { echo "setup: $lib is missing after install" >&2; exit 1; }
