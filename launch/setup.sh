#!/usr/bin/env bash
# Sets up a fresh machine: system packages, a release build, the Shakespeare corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/install-deps.sh
swift build -c release
launch/prepare-shakespeare.sh .build/release/moe data/shakespeare
