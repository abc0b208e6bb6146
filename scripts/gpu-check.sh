#!/usr/bin/env bash
# The GPU checks, in one command, for a machine with an NVIDIA GPU (CUDA 13, cuDNN 9,
# TensorRT 10 installed where onnxruntime-gpu finds them):
#  1. the tiny packages' parity tests on CUDA and on TensorRT against the CPU goldens
#     (tolerances in sdk/tests/common/mod.rs: latents 2e-3, images 2 levels, features 1e-3);
#  2. zimage bench on the mid-size random model at 1024x1024 on CUDA and TensorRT (bf16 and
#     fp16), with per-step times (needs the export venv: export-scripts/requirements.txt).
# Results go to out/gpu-check/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=out/gpu-check
mkdir -p "$out"
ZIMAGE_ORT_PACKAGE=onnxruntime-gpu scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

for device in cuda tensorrt; do
  ZIMAGE_TEST_DEVICE=$device cargo test --release -p zimage --test parity -- --test-threads 1 2>&1 | tee "$out/parity-$device.log"
  # The device-resident loop against the host loop on the GPU (bit-identical on the CPU).
  ZIMAGE_TEST_DEVICE=$device cargo test --release -p zimage --test device_loop -- --test-threads 1 2>&1 | tee "$out/device-loop-$device.log"
done

if [ ! -f models/mid-zimage/manifest.json ]; then
  export-scripts/.venv/bin/python export-scripts/make_fixtures.py --mid-size
fi
cargo build --release -p zimage-cli
bench() { ./target/release/zimage bench --model models/mid-zimage --width 1024 --height 1024 --warmup 1 --runs 3 --json "$@"; }
bench --device cuda > "$out/bench-cuda.json"
bench --device cuda --cuda-graphs off > "$out/bench-cuda-nographs.json"
bench --device cuda --host-loop --cuda-graphs off > "$out/bench-cuda-hostloop.json"
bench --device tensorrt --trt-precision bf16 --trt-min 512x512 --trt-max 1024x1024 > "$out/bench-trt-bf16.json"
bench --device tensorrt --trt-precision fp16 --trt-min 512x512 --trt-max 1024x1024 > "$out/bench-trt-fp16.json"
echo "results in $out/"
