#!/usr/bin/env bash
# Builds, on the CPU machine, everything the GPU side-by-side (scripts/gpu/side-by-side.sh) carries
# to a lent GPU machine that has the driver, CUDA 13 / cuDNN 9 (PyTorch's wheels), python3 with
# torch, but no Rust, no onnxruntime-gpu, no diffusers and no network. Two bundles, each carried by
# one call of the device tool (64 MiB per call, the repository's tracked files included):
#   .gpu/ort/  ONNX Runtime 1.31.1 GPU libraries, the CUDA provider trimmed to sm_90 (Hopper)
#   .gpu/run/  release binaries (zimage, parity, device_loop tests), the diffusers wheel, and the
#              real-width 2+2+2 random-weight packages as skeletons (weights drawn there)
# Usage: scripts/gpu/prepare.sh [--arch 90] [--no-packages]
# Needs: cargo, python3 with pip, and for the packages the export venv (/work/venv or
# export-scripts/.venv: torch, diffusers, onnx). Prints each bundle's size against the budget.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
arch=90; packages=1
while [ $# -gt 0 ]; do
  case $1 in
    --arch) arch=$2; shift 2 ;;
    --no-packages) packages=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-$( [ -x /work/venv/bin/python ] && echo /work/venv/bin/python || echo export-scripts/.venv/bin/python )}
mkdir -p .gpu/ort .gpu/run .gpu/cache
stage() { echo "=== $* ($(date +%T))"; }

stage "ONNX Runtime GPU libraries (onnxruntime-gpu==1.31.1), CUDA provider trimmed to sm_$arch"
wheel=$(ls .gpu/cache/onnxruntime_gpu-1.31.1-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/cache onnxruntime-gpu==1.31.1
  wheel=$(ls .gpu/cache/onnxruntime_gpu-1.31.1-*.whl | head -1)
fi
rm -rf .gpu/cache/ortlib && mkdir -p .gpu/cache/ortlib
(cd .gpu/cache/ortlib && unzip -q -j "$root/$wheel" 'onnxruntime/capi/libonnxruntime.so.1.31.1' \
  'onnxruntime/capi/libonnxruntime_providers_shared.so' 'onnxruntime/capi/libonnxruntime_providers_cuda.so')
python3 scripts/gpu/trim_fatbin.py .gpu/cache/ortlib/libonnxruntime_providers_cuda.so \
  .gpu/cache/ortlib/libonnxruntime_providers_cuda.so.trimmed --keep "$arch"
mv .gpu/cache/ortlib/libonnxruntime_providers_cuda.so.trimmed .gpu/cache/ortlib/libonnxruntime_providers_cuda.so
rm -f .gpu/ort/*
tar -C .gpu/cache/ortlib -cf - . | xz -9e -T0 > .gpu/cache/ort.tar.xz
# In parts of PART_MIB (default 24) MiB: each device-tool call can carry one part (the
# repository's tracked files travel with every call and count towards its 64 MiB).
split -b "${PART_MIB:-24}M" -d -a 2 .gpu/cache/ort.tar.xz .gpu/ort/ort.tar.xz.part-
sha256sum < .gpu/cache/ort.tar.xz | cut -d' ' -f1 > .gpu/ort/sha256

stage "release binaries"
cargo build --release --locked -p zimage-cli
tests=$(cargo test --release --locked -p zimage --test parity --test device_loop --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m.get("profile",{}).get("test")]')
rm -rf .gpu/cache/bin && mkdir -p .gpu/cache/bin
cp target/release/zimage .gpu/cache/bin/
for t in $tests; do cp "$t" ".gpu/cache/bin/$(basename "$t" | sed 's/-[0-9a-f]*$//')"; done
strip .gpu/cache/bin/*
tar -C .gpu/cache/bin -cf - . | xz -9 -T0 > .gpu/run/bin.tar.xz
# The test binaries find the fixtures through the path they were built at.
echo "$root" > .gpu/run/build-root

stage "diffusers wheel (pure Python; the machine's transformers and torch are used)"
"$python" -m pip download --no-deps --only-binary=:all: -d .gpu/run diffusers==0.42.1

if [ "$packages" = 1 ]; then
  stage "real-width 2+2+2 random-weight packages (fp16, fp32) as skeletons"
  src=.gpu/cache/rw-src
  if [ ! -d "$src" ]; then
    base=export-scripts/.cache/src/tiny-zimage-base
    [ -d "$base" ] || base=/work/main/export-scripts/.cache/src/tiny-zimage-base
    PYTHONPATH=export-scripts "$python" -m zimage_export.fixtures.real_width --base "$base" --out "$src" --layers 2 --match-base-caption
  fi
  for precision in fp16 fp32; do
    pkg=.gpu/cache/rw-$precision
    [ -f "$pkg/manifest.json" ] || PYTHONPATH=export-scripts "$python" export-scripts/export.py --src "$src" --out "$pkg" --precision "$precision"
    rm -rf ".gpu/cache/skel/rw-$precision"; mkdir -p .gpu/cache/skel
    "$python" scripts/gpu/weights_skeleton.py strip "$pkg" ".gpu/cache/skel/rw-$precision"
  done
  stage "real-width 2+2+2 int4 package (quantize_package.py at its defaults), as a skeleton"
  # The sequential-mode peak of a quantized package (issue 17's 8 GB budget): the GPU side
  # benches it resident and --sequential; docs/quantization.md says how the 2+2+2 peak gives
  # the 30-block one (the weights' difference is computed exactly by quantized_sizes.py).
  [ -f .gpu/cache/rw-int4/manifest.json ] || "$python" export-scripts/quantize_package.py \
    --package .gpu/cache/rw-fp16 --out .gpu/cache/rw-int4 --weights int4
  rm -rf .gpu/cache/skel/rw-int4
  # Its block scales are just under 1 MiB each: drawn there too, from 64 KiB up.
  "$python" scripts/gpu/weights_skeleton.py strip .gpu/cache/rw-int4 .gpu/cache/skel/rw-int4 65536
  stage "real-width 2+2+2 fp16 with the transformer's attention in 16 query chunks (opt-in), as a skeleton"
  # Whether the chunked attention (zimage_export/transformer_attention.py, CPU-measured only) may
  # become the default: its speed and peak on the card against rw-fp16's, same weights.
  if [ ! -f .gpu/cache/rw-fp16-chunked/manifest.json ]; then
    rm -rf .gpu/cache/rw-fp16-chunked && cp -al .gpu/cache/rw-fp16 .gpu/cache/rw-fp16-chunked
    PYTHONPATH=export-scripts "$python" -m zimage_export.transformer_attention --package .gpu/cache/rw-fp16-chunked
  fi
  rm -rf .gpu/cache/skel/rw-fp16-chunked
  "$python" scripts/gpu/weights_skeleton.py strip .gpu/cache/rw-fp16-chunked .gpu/cache/skel/rw-fp16-chunked
  stage "real-size 2+2+30 fp16 package: the real-width one deepened (scripts/gpu/deepen.py), as a skeleton"
  "$python" scripts/gpu/deepen.py .gpu/cache/rw-fp16 .gpu/cache/rs-fp16 --layers 30
  rm -rf .gpu/cache/skel/rs-fp16
  "$python" scripts/gpu/weights_skeleton.py strip .gpu/cache/rs-fp16 .gpu/cache/skel/rs-fp16
  tar -C .gpu/cache/skel -cf - . | xz -9 -T0 > .gpu/run/rw.tar.xz
fi

# What travels with every call besides the carried bundle: the working tree (git's tracked and
# untracked-not-ignored files). The committed test models alone are ~260 MB: before the calls,
# `scripts/gpu/travel.sh away` moves all but tiny-zimage aside (`back` afterwards).
tracked=$(scripts/gpu/travel.sh bytes)
for carried in .gpu/ort/ort.tar.xz.part-* .gpu/run; do
  size=$(du -cb "$carried" | tail -1 | cut -f1)
  total=$((tracked + size))
  verdict=$([ $total -le $((64 * 1024 * 1024)) ] && echo "fits" || echo "OVER the 64 MiB per call (scripts/gpu/travel.sh away?)")
  echo "$carried: $((size / 1024 / 1024)) MiB + working tree $((tracked / 1024 / 1024)) MiB = $((total / 1024 / 1024)) MiB: $verdict"
done
