#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine (installs the system packages first).
# Tests make their own data; no download is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/install-deps.sh
swift build --build-tests
swift test --skip-build
