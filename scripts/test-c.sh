#!/usr/bin/env bash
# Tests the C ABI end to end:
#  1. builds libzimage.so and libzimage.a (release) and runs the zimage-ffi tests: unit tests,
#     the header check, and the C (C99) and C++ (C++17) clients, each linked once to the shared
#     and once to the static library, on every golden case of models/tiny-zimage;
#  2. runs the four clients again under valgrind memcheck (one golden case each; zero errors
#     and no definite leaks, or the run fails; suppressions in tests/c/valgrind.supp);
#  3. installs into a temporary prefix (scripts/install-c.sh) and builds the clients the way a
#     downstream project would: with pkg-config, and with CMake's find_package when cmake exists.
# ONNX Runtime comes from ORT_DYLIB_PATH or .runtime/ (scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  scripts/setup.sh
fi

echo "== zimage-ffi tests (C and C++ clients on the goldens)" >&2
cargo test --release --locked -p zimage-ffi

work="$root/target/tmp/c_clients" # prepared by ffi/tests/c_clients.rs
client_args=("$root/models/tiny-zimage" "$work/cases.tsv" "$work/folder-manifest-package" "$work/mismatched-package"
  "$root/models/tiny-qwen3-enhancer" "$work/enhancer-cases.tsv" 1)
# The clients' LoRA, ControlNet and tiling tests read these; c_clients.rs writes the cases files.
export ZIMAGE_TEST_LORA_CASES="$work/lora-cases.tsv"
export ZIMAGE_TEST_CONTROLNET_CASES="$work/controlnet-cases.tsv"
export ZIMAGE_TEST_TILING_CASE="$work/tiling-case.tsv"
export ZIMAGE_TEST_WRONG_LORA="$root/tests/golden/tiny-zimage-alt/loras/peft.safetensors"
# test_recommended_params: a package exported as the base model.
export ZIMAGE_TEST_BASE_PACKAGE="$root/models/tiny-zimage-base"
# The clients' editing tests (test_edit) read these; c_clients.rs writes the cases file.
export ZIMAGE_TEST_EDIT_CASES="$work/omni-edit-cases.tsv"
export ZIMAGE_TEST_EDIT_LORA_CASES="$work/omni-lora-cases.tsv"
export ZIMAGE_TEST_OMNI_PACKAGE="$root/models/tiny-zimage-omni"

if command -v valgrind >/dev/null; then
  echo "== the C and C++ clients under valgrind memcheck (slow: minutes)" >&2
  log="$root/target/tmp/valgrind.log"
  status=0
  ZIMAGE_VALGRIND=1 cargo test --release --locked -p zimage-ffi --test c_clients -- --nocapture >"$log" 2>&1 || status=$?
  grep -E "ERROR SUMMARY|definitely lost|golden case|test result" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 80 "$log" >&2
    echo "valgrind run failed; full log in $log" >&2
    exit "$status"
  fi
else
  echo "== valgrind is not installed: memcheck skipped" >&2
fi

echo "== installed package: pkg-config and CMake" >&2
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
scripts/install-c.sh "$prefix/usr"
export PKG_CONFIG_PATH="$prefix/usr/lib/pkgconfig"
warnings=(-Wall -Wextra -Wpedantic -Werror)
# shellcheck disable=SC2046 # pkg-config output is meant to split into words
cc -std=c99 "${warnings[@]}" tests/c/zimage_test.c -o "$prefix/c-pkgconfig" \
  $(pkg-config --cflags --libs zimage) -Wl,-rpath,"$prefix/usr/lib" -pthread -lm
# shellcheck disable=SC2046
c++ -std=c++17 "${warnings[@]}" -Itests/cpp tests/cpp/zimage_test.cpp -o "$prefix/cpp-pkgconfig-static" \
  $(pkg-config --cflags zimage) "$prefix/usr/lib/libzimage.a" $(pkg-config --static --libs-only-l zimage | sed 's/-lzimage//') -pthread
readelf -d "$prefix/c-pkgconfig" | grep -q 'NEEDED.*\[libzimage.so.2\]'
"$prefix/c-pkgconfig" "${client_args[@]}"
"$prefix/cpp-pkgconfig-static" "${client_args[@]}"

if command -v cmake >/dev/null; then
  cmake -S tests/c/find_package -B "$prefix/cmake-build" -DCMAKE_PREFIX_PATH="$prefix/usr" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$prefix/cmake-build" >/dev/null
  "$prefix/cmake-build/c_client_shared" "${client_args[@]}"
  "$prefix/cmake-build/cpp_client_static" "${client_args[@]}"
else
  echo "== cmake is not installed: find_package check skipped" >&2
fi
echo "== C ABI tests passed" >&2
