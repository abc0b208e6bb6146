#!/usr/bin/env bash
# Drives zimage-server with the official OpenAI Python client (pinned below): byte parity with
# `zimage generate`, formats, the stream, typed errors, a bounded load test and fault tests
# (server/tests/openai_client). Builds the debug binaries first (the ones the workspace tests
# build), or with ZIMAGE_PROFILE=release the release ones; the venv is
# server/tests/openai_client/.venv. Servers listen on 127.0.0.1 only.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
case "${ZIMAGE_PROFILE:-debug}" in
  release) cargo build --release --locked -p zimage-server -p zimage-cli; bin=target/release ;;
  debug) cargo build --locked -p zimage-server -p zimage-cli; bin=target/debug ;;
  *) echo "ZIMAGE_PROFILE must be debug or release" >&2; exit 2 ;;
esac
export ZIMAGE_BIN_DIR="${ZIMAGE_BIN_DIR:-$root/$bin}"
venv=server/tests/openai_client/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install openai==3.57.0 httpx==0.28.1 pytest==9.2.0
"$venv/bin/python" -m pytest -q -s -p no:cacheprovider server/tests/openai_client "$@"
