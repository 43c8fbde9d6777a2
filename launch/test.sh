#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine (installs the system packages first).
# Tests make their own data; no download is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/install-deps.sh
# The reference safetensors reader, to check our checkpoint files open in it (skipped if offline).
python3 -m pip install --quiet --disable-pip-version-check safetensors numpy 2>/dev/null \
    || echo "note: could not install the Python safetensors package; that check will be skipped"
# PyTorch (a CPU build: a local wheel, PyTorch's CPU index, or PyPI's default) and transformers,
# to load a `moe export --format hf` model (ExportTests skip, saying so, without them).
python3 -c "import torch" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0+cpu" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check torch 2>/dev/null \
    || echo "note: could not install PyTorch; the Hugging Face export test will be skipped"
python3 -m pip install --quiet --disable-pip-version-check transformers 2>/dev/null \
    || echo "note: could not install transformers; the Hugging Face export test will be skipped"
# The release binary too: the bf16-vs-fp32 training comparison runs the reference model for
# 300 steps, which the debug build cannot do in reasonable time.
swift build -c release
export MOE_RELEASE_BINARY="$(swift build -c release --show-bin-path)/moe"
swift build --build-tests
swift test --skip-build
# The parsers of untrusted bytes under libFuzzer (FUZZ_SECONDS each, default 10), and the core
# tests under AddressSanitizer and the threads-as-ranks tests under ThreadSanitizer.
launch/fuzz.sh
launch/sanitize.sh
