#!/usr/bin/env bash
# What travels to a lent GPU machine with each device-tool call: the working tree's tracked and
# untracked-not-ignored files, plus the carried paths, 64 MiB in all. The committed test models
# alone are about 260 MB, so a GPU session first moves aside the ones its check does not read,
# and puts them back afterwards (the moved files are tracked: nothing is lost, and `git status`
# shows them deleted until `back`).
#   scripts/gpu/travel.sh size              MiB that would travel now (carried paths not counted)
#   scripts/gpu/travel.sh bytes             the same in bytes (for prepare.sh's sums)
#   scripts/gpu/travel.sh away [MODEL...]   move every models/ folder except MODEL... (default:
#                                           tiny-zimage, which the CUDA parity tests read; `none`:
#                                           keep none) to ../<repo>-aside/models/, print the size
#   scripts/gpu/travel.sh back              move them back; fails rather than overwrite
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
aside="$(dirname "$root")/$(basename "$root")-aside"

travelling_bytes() {
  # Files git would show: tracked (if present) and untracked but not ignored.
  # (du skips and complains about the tracked files moved away: its total is the rest.)
  git ls-files -z --cached --others --exclude-standard | { xargs -0 du -cb 2>/dev/null || true; } | tail -1 | cut -f1
}

size() {
  local bytes; bytes=$(travelling_bytes)
  echo "travels: $((bytes / 1024 / 1024)) MiB of 64 (carried paths come on top)"
}

case "${1:-}" in
  size) size ;;
  bytes) travelling_bytes ;;
  away)
    shift
    keep=("${@:-tiny-zimage}")
    [ "${keep[*]}" = none ] && keep=()
    for k in ${keep[@]+"${keep[@]}"}; do [ -d "models/$k" ] || { echo "no models/$k" >&2; exit 2; }; done
    mkdir -p "$aside/models"
    for dir in models/*/; do
      name=$(basename "$dir")
      [[ " ${keep[*]-} " == *" $name "* ]] && continue
      [ -e "$aside/models/$name" ] && { echo "$aside/models/$name exists: run 'back' first" >&2; exit 3; }
      mv "models/$name" "$aside/models/$name"
    done
    echo "moved aside to $aside/models: $(ls "$aside/models" | tr '\n' ' ')"
    size ;;
  back)
    [ -d "$aside/models" ] || { echo "nothing aside ($aside/models)"; exit 0; }
    for dir in "$aside"/models/*/; do
      name=$(basename "$dir")
      [ -e "models/$name" ] && { echo "models/$name exists: not overwriting it" >&2; exit 3; }
      mv "$dir" "models/$name"
    done
    rmdir "$aside/models" "$aside" 2>/dev/null || true
    git status --short -- models | head -5
    size ;;
  *) echo "usage: $0 size | bytes | away [MODEL...] | back" >&2; exit 2 ;;
esac
