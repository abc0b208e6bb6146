#!/usr/bin/env bash
# Sets everything up and generates one image from the committed tiny package on CPU.
# Usage: scripts/demo.sh ["prompt"] [output.png]
# (The tiny package has random weights: the picture is noise-like; the real model is
# exported with export-scripts/export.py, see README.)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
prompt=${1:-"a lighthouse on a cliff at sunset, photoreal"}
output=${2:-out/demo.png}
mkdir -p "$(dirname "$output")"
cargo run --release --locked -q -p zimage-cli -- generate --model models/tiny-zimage \
  --prompt "$prompt" --width 256 --height 256 --seed 42 --output "$output"
echo "wrote $output"
