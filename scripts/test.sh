#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: Rust unit and integration tests (parity
# with the diffusers goldens, SDK behaviour, CLI, C ABI header), the export scripts' pure
# Python helpers (pytest in a venv with only pytest and numpy), the image server driven by the
# official OpenAI Python client (scripts/test-server.sh), then the C and C++ clients against the
# shared and static libraries, under valgrind when it is installed, and the Triton backend in a
# real tritonserver on the CPU (scripts/test-triton.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
cargo test --workspace --locked
# A CPU-only build of the SDK (no CUDA/TensorRT bindings), as a game engine would embed it: the
# workspace build unifies the GPU features on, so this combination is checked on its own.
cargo check -p zimage --no-default-features --locked
if [ -x scripts/test-python.sh ]; then
  scripts/test-python.sh
fi
if [ -x scripts/test-server.sh ]; then
  scripts/test-server.sh
fi
if [ -x scripts/test-c.sh ]; then
  scripts/test-c.sh
fi
if [ -x scripts/test-triton.sh ]; then
  scripts/test-triton.sh
fi
