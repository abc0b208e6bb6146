#!/usr/bin/env bash
# The GPU check as it runs on a lent machine that has the NVIDIA driver and CUDA 13 / cuDNN 9
# libraries but no Rust and no network (see scripts/gpu/README.md): prebuilt release binaries,
# ONNX Runtime GPU libraries in $ORT_GPU_DIR, and random-weight benchmark packages carried as
# skeletons (scripts/gpu/weights_skeleton.py). Run from the repository root; results in $OUT.
set -u
# Expects in $ORT_GPU_DIR: libonnxruntime.so.1.31.1 and its provider libraries, `ldpath` (where
# the CUDA libraries are) and bin/{parity,zimage}; in $PKGS: rw.tar.xz (the skeletons).
OUT=${OUT:-out/gpu}; ORT_GPU_DIR=${ORT_GPU_DIR:-/opt/ortgpu}; BIN=$ORT_GPU_DIR/bin; PKGS=${PKGS:-.gpu/b}
mkdir -p "$OUT"
stage() { echo "=== $* ($(date +%T))"; }
# The test binaries find the fixtures through the path they were built at.
if [ "$PWD" != /work/main ]; then mkdir -p /work && ln -sfn "$PWD" /work/main; fi
[ -f "$PKGS/rw.tar.xz" ] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$PKGS/rw.tar.xz" "$PKGS"
export ORT_DYLIB_PATH=$ORT_GPU_DIR/libonnxruntime.so.1.31.1
export LD_LIBRARY_PATH=$(cat "$ORT_GPU_DIR/ldpath")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

stage "parity on CUDA against the CPU goldens"
ZIMAGE_TEST_DEVICE=cuda timeout 240 "$BIN/parity" --test-threads 1 2>&1 | tee "$OUT/parity-cuda.log"

stage "TensorRT asked for where TensorRT's libraries are missing: the error must say so"
timeout 60 "$BIN/zimage" generate --model models/tiny-zimage --prompt "a red apple" --width 64 --height 64 \
  --device tensorrt --output "$OUT/trt.png" > "$OUT/trt.log" 2>&1; echo "exit code $?" >> "$OUT/trt.log"; cat "$OUT/trt.log"

stage "CLI image on CUDA"
timeout 60 "$BIN/zimage" generate --model models/tiny-zimage --prompt "a red apple" --width 64 --height 64 \
  --seed 42 --device cuda --output "$OUT/cuda.png" 2>&1 | tail -3

for tiny in "$PKGS"/tiny16 "$PKGS"/tinybf; do
  [ -d "$tiny" ] || continue
  stage "CLI image on CUDA from ${tiny##*/}, latents compared with the fp32 CPU golden"
  timeout 60 "$BIN/zimage" generate --model "$tiny" --prompt "A cat holding a sign that says hello world, studio lighting" --width 64 --height 64 \
    --seed 42 --device cuda --output "$OUT/cuda-${tiny##*/}.png" --save-latents "$OUT/${tiny##*/}.npy" 2>&1 | tail -3
done

for pkg in "$PKGS"/rw-*; do
  precision=${pkg##*/rw-}
  [ -f "$pkg/skeleton.json" ] || continue
  stage "real-width 2+2+2 transformer, $precision, 1024x1024 on CUDA"
  python3 scripts/gpu/weights_skeleton.py fill "$pkg" || continue
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-$precision.txt" &
  sampler=$!
  timeout 200 "$BIN/zimage" bench --model "$pkg" --width 1024 --height 1024 --device cuda --warmup 1 --runs 3 \
    --json > "$OUT/bench-rw-$precision.json" 2> "$OUT/bench-rw-$precision.err"
  echo "exit code $?"; kill $sampler
  echo "peak device memory MiB: $(sort -n "$OUT/mem-$precision.txt" | tail -1)"
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print({s['name']: round(s['median'] * 1000, 1) for s in d['stages']}, 'load', round(d['load_s'], 2), 'zimage peak_device_memory', d.get('peak_device_memory'))" "$OUT/bench-rw-$precision.json"; tail -5 "$OUT/bench-rw-$precision.err"
  if [ "$precision" = fp16-23 ] && [ "${SEQUENTIAL:-1}" = 1 ]; then
    stage "the same in the sequential memory mode (CUDA arena grown as requested)"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-seq.txt" &
    sampler=$!
    timeout 200 "$BIN/zimage" bench --model "$pkg" --width 1024 --height 1024 --device cuda --sequential --warmup 1 \
      --runs 2 --json > "$OUT/bench-rw-seq.json" 2> "$OUT/bench-rw-seq.err"
    echo "exit code $?"; kill $sampler
    echo "peak device memory MiB: $(sort -n "$OUT/mem-seq.txt" | tail -1)"
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print({s['name']: round(s['median'] * 1000, 1) for s in d['stages']}, 'load', round(d['load_s'], 2), 'zimage peak_device_memory', d.get('peak_device_memory'))" "$OUT/bench-rw-seq.json"; tail -5 "$OUT/bench-rw-seq.err"
  fi
  if [ "$precision" = vaenew ]; then
    stage "the same with --cuda-tf32 off (full float32 in the VAE too)"
    timeout 120 "$BIN/zimage" bench --model "$pkg" --width 1024 --height 1024 --device cuda --cuda-tf32 off --warmup 1 \
      --runs 2 --json > "$OUT/bench-rw-vaenew-tf32off.json" 2> "$OUT/bench-rw-vaenew-tf32off.err"
    echo "exit code $?"
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print({s['name']: round(s['median'] * 1000, 1) for s in d['stages']})" "$OUT/bench-rw-vaenew-tf32off.json"
  fi
  if [ "$precision" = fp32 ]; then
    stage "the same with --cuda-tf32 on"
    timeout 120 "$BIN/zimage" bench --model "$pkg" --width 1024 --height 1024 --device cuda --cuda-tf32 on --warmup 1 \
      --runs 2 --json > "$OUT/bench-rw-fp32-tf32.json" 2> "$OUT/bench-rw-fp32-tf32.err"
    echo "exit code $?"; head -c 1500 "$OUT/bench-rw-fp32-tf32.json" | grep -A3 '"step 1"' 
  fi
  rm -f "$pkg"/*.data
done
stage done
