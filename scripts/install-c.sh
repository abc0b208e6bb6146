#!/usr/bin/env bash
# Builds the zimage C library (release) and installs it for C/C++ projects:
#   PREFIX/include/zimage.h
#   PREFIX/lib/libzimage.so.X.Y.Z, libzimage.so.2 -> it (the SONAME), libzimage.so -> libzimage.so.2
#   PREFIX/lib/libzimage.a
#   PREFIX/lib/pkgconfig/zimage.pc                 (pkg-config --cflags --libs zimage)
#   PREFIX/lib/cmake/zimage/zimageConfig*.cmake   (find_package(zimage) -> zimage::zimage)
# ONNX Runtime is not installed: ship libonnxruntime.so.1.31.1 beside libzimage (ffi/README.md).
#
# Usage: scripts/install-c.sh PREFIX
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
prefix=$(cd "$1" && pwd)
cd "$root"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
soversion=2 # keep in step with ffi/build.rs
[ -n "$version" ] || { echo "install-c: no version in Cargo.toml" >&2; exit 1; }

# One build that also reports what a program linking libzimage.a needs from the system.
build_log=$(cargo rustc --release --locked -p zimage-ffi --lib -- --print native-static-libs 2>&1) || {
  echo "$build_log" >&2
  exit 1
}
static_libs=$(echo "$build_log" | sed -n 's/^note: native-static-libs: //p' | tail -n 1)
[ -n "$static_libs" ] || { echo "install-c: rustc did not report native-static-libs" >&2; exit 1; }
# CMake wants a list of library names: "-ldl -lm" -> "dl;m".
static_libs_cmake=$(echo "$static_libs" | sed 's/-l//g; s/ \+/;/g')
built="${CARGO_TARGET_DIR:-$root/target}/release"

install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/zimage"
install -m 644 include/zimage.h "$prefix/include/zimage.h"
install -m 755 "$built/libzimage.so" "$prefix/lib/libzimage.so.$version"
ln -sfn "libzimage.so.$version" "$prefix/lib/libzimage.so.$soversion"
ln -sfn "libzimage.so.$soversion" "$prefix/lib/libzimage.so"
install -m 644 "$built/libzimage.a" "$prefix/lib/libzimage.a"

fill() {
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@SOVERSION@|$soversion|g" \
      -e "s|@STATIC_LIBS@|$static_libs|g" -e "s|@STATIC_LIBS_CMAKE@|$static_libs_cmake|g" "$1" > "$2"
}
fill ffi/zimage.pc.in "$prefix/lib/pkgconfig/zimage.pc"
fill cmake/zimageConfig.cmake.in "$prefix/lib/cmake/zimage/zimageConfig.cmake"
fill cmake/zimageConfigVersion.cmake.in "$prefix/lib/cmake/zimage/zimageConfigVersion.cmake"
echo "install-c: zimage $version installed in $prefix" >&2
