#!/usr/bin/env bash
# The GPU check of issue 20 on a lent machine (no Rust, no network): run from the repository root
# with the bundles of scripts/gpu/prepare.sh. Two sub-commands, one device-tool call each (the
# machine keeps /opt between calls while it stays warm):
#   side-by-side.sh install   (carry one .gpu/ort/ort.tar.xz.part-NN and .gpu/ort/sha256 per call,
#                              until it says installed) ONNX Runtime GPU libraries -> /opt/ortgpu
#   side-by-side.sh run [zimage|torch]  (carry .gpu/run)  everything below (or one half: the
#                              whole takes about 11 minutes, over one call's 10), results in $OUT
# Results accumulate in $RESULTS (/opt/zimage-results) across calls; each call leaves in $OUT
# summary.md, summary.json and results.tar.xz (all logs and reports: the device tool returns at
# most 8 files).
# `run` does, on one card, in about 8 minutes:
#   1. the CUDA parity tests (diffusers goldens) and the device-loop tests on CUDA;
#   2. zimage bench at 1024x1024, 8 steps: the real-size 2+2+30 fp16 package (deepened from the
#      real-width one, scripts/gpu/deepen.py), resident and sequential; real-width 2+2+2 fp16: device loop with CUDA graphs
#      (default), without (--cuda-graphs off), the host loop (--host-loop), the sequential mode;
#      fp32 with TF32 like PyTorch; the fp16 one with its attention in 16 query chunks
#      (transformer_attention.py, resident and sequential); real-width 2+2+2 int4 (quantize_package.py), resident and
#      sequential, for issue 17's 8 GB budget (peak device memory);
#   3. diffusers ZImagePipeline (PyTorch SDPA) bf16 and fp16, real-width and real-size (30 blocks,
#      6.15 B parameters, random weights drawn on the card), with the card's measured matmul rate;
#   4. summary.json / summary.md (scripts/gpu/summarize.py) with the card, driver and versions.
# Stages that cannot run say why in the summary; nothing is filled in. Env: OUT (default out/gpu),
# SKIP_REAL_SIZE=1 (diffusers real-size), RUNS (timed runs, default 3); for a dry run on a CPU:
# DEVICE=cpu SIZE=64 STEPS=2 TORCH_CONFIGS=tiny PAIRS=rw-fp16=tiny ORT_DIR=... PKGS=... BIN=... RESULTS=...
set -u
OUT=${OUT:-out/gpu}; ORT=${ORT_DIR:-/opt/ortgpu}; RUNS=${RUNS:-3}
DEVICE=${DEVICE:-cuda}; SIZE=${SIZE:-1024}; STEPS=${STEPS:-8}; TORCH_CONFIGS=${TORCH_CONFIGS:-real-width real-size}
mkdir -p "$OUT"
stage() { echo "=== $* ($(date +%T))"; }

ld_path() {
  # CUDA 13 and cuDNN 9 from the machine's PyTorch wheels (nvidia-* packages).
  python3 - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
}

case "${1:-}" in
  install)
    # Parts arrive one per call; the machine keeps /opt while it stays warm.
    mkdir -p $ORT.parts && cp .gpu/ort/ort.tar.xz.part-* $ORT.parts/ 2>/dev/null
    if [ "$(cat $ORT.parts/ort.tar.xz.part-* | sha256sum | cut -d' ' -f1)" != "$(cat .gpu/ort/sha256)" ]; then
      echo "parts so far: $(ls $ORT.parts | tr '\n' ' '); carry the next part"; exit 0
    fi
    stage "ONNX Runtime GPU libraries -> $ORT"
    mkdir -p "$ORT" && cat $ORT.parts/ort.tar.xz.part-* | xz -dc | tar -C "$ORT" -xf - && ld_path > "$ORT/ldpath"
    echo installed; ls -la "$ORT"; exit 0 ;;
  run) part=${2:-all} ;;
  *) echo "usage: $0 install | run [zimage|torch]" >&2; exit 2 ;;
esac
case $part in all|zimage|torch) ;; *) echo "run: zimage, torch or nothing (both)" >&2; exit 2 ;; esac
FINAL_OUT=$OUT; OUT=${RESULTS:-/opt/zimage-results}; mkdir -p "$OUT"

[ -f "$ORT/libonnxruntime.so.1.31.1" ] || { echo "no $ORT: run '$0 install' first (same warm machine)" >&2; exit 3; }
export ORT_DYLIB_PATH=$ORT/libonnxruntime.so.1.31.1
export LD_LIBRARY_PATH=$ORT:$(cat "$ORT/ldpath")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=${BIN:-/opt/zimage-bin}; PKGS=${PKGS:-/opt/zimage-pkgs}
mkdir -p "$BIN" "$PKGS"
xz -dc .gpu/run/bin.tar.xz | tar -C "$BIN" -xf -
[ -f .gpu/run/rw.tar.xz ] && xz -dc .gpu/run/rw.tar.xz | tar -C "$PKGS" -xf -
# The test binaries look for the fixtures where they were built.
built=$(cat .gpu/run/build-root); if [ "$PWD" != "$built" ]; then mkdir -p "$(dirname "$built")" && ln -sfn "$PWD" "$built"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "${SITE:-/tmp/site}" .gpu/run/diffusers-*.whl && export PYTHONPATH=${SITE:-/tmp/site}
notes=()
[ -f "$OUT/notes.txt" ] && mapfile -t notes < "$OUT/notes.txt"
notes+=("card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)")
notes+=("$(python3 -c 'import torch, diffusers, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, transformers {transformers.__version__}")' 2>&1 | tail -1)")
notes+=("ONNX Runtime 1.31.1 (onnxruntime-gpu wheel, CUDA provider trimmed to this card's architecture)")

if [ "$part" != torch ]; then
stage "parity (diffusers goldens) and the device loop on CUDA"
for t in parity device_loop; do
  ZIMAGE_TEST_DEVICE=$DEVICE timeout 240 "$BIN/$t" --test-threads 1 > "$OUT/$t-cuda.log" 2>&1
  notes+=("$t tests on $DEVICE: $(grep -E '^test result' "$OUT/$t-cuda.log" | tail -1 || echo 'no result (see log)')")
done

bench() {  # label, package, extra flags...; BENCH_RUNS overrides RUNS (warm-up 1 either way)
  local label=$1 pkg=$2; shift 2
  timeout 240 "$BIN/zimage" bench --model "$pkg" --width "$SIZE" --height "$SIZE" --steps "$STEPS" --device "$DEVICE" --warmup 1 \
    --runs "${BENCH_RUNS:-$RUNS}" --json "$@" > "$OUT/bench-$label.json" 2> "$OUT/bench-$label.err"
  local rc=$?; echo "$label: exit $rc"
  [ $rc = 0 ] || notes+=("zimage $label failed (exit $rc): $(tail -1 "$OUT/bench-$label.err")")
}
notes+=("zimage's packages carry the tiny fixture's text encoder and VAE: compare steps; diffusers' text_encode_s and vae_decode_s are at the real shapes")
pkg=$PKGS/rs-fp16
if [ -f "$pkg/skeleton.json" ]; then
  stage "real-size 2+2+30 fp16 (deepened): weights drawn, zimage bench, resident and sequential"
  python3 scripts/gpu/weights_skeleton.py fill "$pkg"
  bench rs-fp16 "$pkg"
  BENCH_RUNS=1 bench rs-fp16-sequential "$pkg" --sequential
  rm -f "$pkg"/*.data
else
  notes+=("no real-size package carried")
fi
for precision in fp16 fp16-chunked fp32 int4; do
  pkg=$PKGS/rw-$precision
  [ -f "$pkg/skeleton.json" ] || { notes+=("no real-width $precision package carried"); continue; }
  stage "real-width 2+2+2 $precision: weights drawn, zimage bench"
  python3 scripts/gpu/weights_skeleton.py fill "$pkg"
  if [ $precision = fp16 ]; then
    bench rw-fp16 "$pkg"
    bench rw-fp16-nographs "$pkg" --cuda-graphs off
    bench rw-fp16-hostloop "$pkg" --host-loop --cuda-graphs off
    bench rw-fp16-sequential "$pkg" --sequential
  elif [ $precision = fp16-chunked ]; then
    # The transformer's attention in 16 query chunks (opt-in on the CPU): against rw-fp16.
    bench rw-fp16-chunked "$pkg"
    BENCH_RUNS=1 bench rw-fp16-chunked-sequential "$pkg" --sequential
  elif [ $precision = int4 ]; then
    # Issue 17's 8 GB budget: the int4 package's peak, resident and in the sequential mode.
    BENCH_RUNS=1 bench rw-int4 "$pkg"
    BENCH_RUNS=1 bench rw-int4-sequential "$pkg" --sequential
  else
    bench rw-fp32 "$pkg"
  fi
  rm -f "$pkg"/*.data
done
fi

if [ "$part" != zimage ]; then
for config in $TORCH_CONFIGS; do
  [ "$config" = real-size ] && [ "${SKIP_REAL_SIZE:-0}" = 1 ] && continue
  stage "diffusers ZImagePipeline, $config, bf16 and fp16"
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/gpu/side_by_side.py --config "$config" --dtype bf16 --dtype fp16 \
    --device "$DEVICE" --width "$SIZE" --height "$SIZE" --steps "$STEPS" --runs "$RUNS" --peak-check --out "$OUT/torch-$config.json" 2>&1 | grep -v "should be kept in float32"
done
fi

stage "summary"
printf '%s\n' "${notes[@]}" | awk '!seen[$0]++' > "$OUT/notes.txt"
mapfile -t notes < "$OUT/notes.txt"
note_args=(); for n in "${notes[@]}"; do note_args+=(--note "$n"); done
torch_args=(); for f in "$OUT"/torch-*.json; do [ -f "$f" ] && torch_args+=(--torch "$f"); done
zimage_args=(); for f in "$OUT"/bench-*.json; do
  [ -s "$f" ] && label=${f##*/bench-} && zimage_args+=(--zimage "${label%.json}=$f")
done
pair_args=(); for p in ${PAIRS:-rw-fp16=real-width rw-fp16-nographs=real-width rw-fp16-hostloop=real-width rs-fp16=real-size rs-fp16-sequential=real-size}; do
  pair_args+=(--pair "$p")
done
python3 scripts/gpu/summarize.py --out-dir "$OUT" "${torch_args[@]}" "${zimage_args[@]}" "${note_args[@]}" "${pair_args[@]}"
cat "$OUT/summary.md"
mkdir -p "$FINAL_OUT"
cp "$OUT/summary.md" "$OUT/summary.json" "$FINAL_OUT/"
tar -C "$OUT" -cf - . | xz -6 > "$FINAL_OUT/results.tar.xz"
