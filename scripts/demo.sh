#!/usr/bin/env bash
# Sets everything up and generates one image on CPU, by default from the committed trained toy
# package models/toy-zimage (64x64 scenes: a shape of some colour, position and size on a
# coloured background; English or Chinese captions, see docs/toy-model.md).
# Usage: scripts/demo.sh ["prompt"] [output.png]
#   ZIMAGE_DEMO_MODEL=path/to/package  another package (e.g. an export of the real model)
#   ZIMAGE_DEMO_SIZE=1024              its picture size (default: 64, the toy's own)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
prompt=${1:-"a red circle on a blue background"}
output=${2:-out/demo.png}
model=${ZIMAGE_DEMO_MODEL:-models/toy-zimage}
size=${ZIMAGE_DEMO_SIZE:-64}
mkdir -p "$(dirname "$output")"
cargo run --release --locked -q -p zimage-cli -- generate --model "$model" \
  --prompt "$prompt" --width "$size" --height "$size" --seed 42 --output "$output"
echo "wrote $output"
