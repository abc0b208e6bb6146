#!/usr/bin/env bash
# The zimage Triton backend in a real tritonserver on this machine's CPU: PyPI's nvidia-pytriton
# wheel (0.7.0) ships Triton 2.51.0's server binary with its libraries. Builds the backend and
# the CLI, lays out a backend directory and a model repository (zimage triton-repo), then runs
# triton/tests/python with pytest; the tests start the server on free loopback ports (HTTP,
# gRPC, metrics, all on 127.0.0.1) and stop it. The load run's numbers go to
# target/triton-tests/load.json. Builds the debug binaries, or with ZIMAGE_PROFILE=release the
# release ones (as scripts/test-server.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=triton/.venv-test
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install -r triton/tests/python/requirements.txt
# Only the server binary is used, so the wheel goes to its own folder, without its Python
# dependencies; its RPATH finds the bundled libraries in nvidia_pytriton.libs beside it.
server_dir=triton/.venv-test/nvidia-pytriton-0.7.0
if [ ! -x "$server_dir/pytriton/tritonserver/bin/tritonserver" ]; then
  rm -rf "$server_dir"
  "${pip[@]}" install --no-deps --target "$server_dir" nvidia-pytriton==0.7.0
fi
tritonserver="$root/$server_dir/pytriton/tritonserver/bin/tritonserver"

case "${ZIMAGE_PROFILE:-debug}" in
  release) cargo build --release --locked -p zimage-triton -p zimage-cli; profile=release ;;
  debug) cargo build --locked -p zimage-triton -p zimage-cli; profile=debug ;;
  *) echo "ZIMAGE_PROFILE must be debug or release" >&2; exit 2 ;;
esac
target=$(cargo metadata --format-version 1 --no-deps | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/$profile"

work="$target/triton-tests"
rm -rf "$work/backends" "$work/repository"
mkdir -p "$work/backends/zimage"
# A copy, not a link: the backend looks for ONNX Runtime beside the file it was loaded from.
cp "$bin/libtriton_zimage.so" "$work/backends/zimage/"
ln -s "$root/.runtime/lib/libonnxruntime.so.1.31.1" "$work/backends/zimage/libonnxruntime.so.1.31.1"
package="$root/models/tiny-zimage"
"$bin/zimage" triton-repo --model "$package" --out "$work/repository" --instances 2 --threads 1
"$bin/zimage" triton-repo --model "$package" --out "$work/repository" --name zimage_reload --threads 1
control_package="$root/models/tiny-zimage-control"
"$bin/zimage" triton-repo --model "$control_package" --out "$work/repository" --name zimage_control \
  --threads 1 --controlnet union-v2.1
omni_package="$root/models/tiny-zimage-omni"
"$bin/zimage" triton-repo --model "$omni_package" --out "$work/repository" --name zimage_omni --threads 1
lora_file="$root/tests/golden/tiny-zimage/loras/peft.safetensors"
"$bin/zimage" triton-repo --model "$package" --out "$work/repository" --name zimage_lora --threads 1 \
  --lora "$lora_file:0.8"
"$bin/zimage" triton-repo --model "$omni_package" --out "$work/repository" --name zimage_omni_lora \
  --threads 1 --lora "$lora_file:0.8"

export TRITONSERVER="$tritonserver" ZIMAGE_BACKENDS="$work/backends" ZIMAGE_REPOSITORY="$work/repository"
export ZIMAGE_CLI="$bin/zimage" ZIMAGE_PACKAGE="$package" ZIMAGE_RESULTS="$work"
export ZIMAGE_CONTROL_PACKAGE="$control_package" ZIMAGE_LORA_FILE="$lora_file" ZIMAGE_OMNI_PACKAGE="$omni_package"
timeout 900 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs triton/tests/python "$@"
