#!/usr/bin/env bash
# The core tests under AddressSanitizer, and the tests that run ranks as threads (the
# communicator and distributed training) under ThreadSanitizer. Each sanitizer has its own build
# directory; a report fails the run. The long end-to-end tests (MoECLITests) are not run here.
#
#   launch/sanitize.sh            # both
#   launch/sanitize.sh thread     # one
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizers=("$@")
(( ${#sanitizers[@]} )) || sanitizers=(address thread)
for sanitizer in "${sanitizers[@]}"; do
    case "$sanitizer" in
        address) filter="MoECoreTests"; export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" ;;
        thread) filter="CommunicatorTests|DistributedTrainingTests"; export TSAN_OPTIONS="halt_on_error=1" ;;
        *) echo "error: unknown sanitizer '$sanitizer' (address or thread)" >&2; exit 64 ;;
    esac
    build=".build/sanitize-$sanitizer"
    echo "sanitizer $sanitizer: building the tests in $build"
    swift build --build-tests --build-path "$build" -Xswiftc -sanitize="$sanitizer" 2>&1 | grep -E "error|warning: unre" || true
    log="$build/tests.log"
    if ! swift test --skip-build --build-path "$build" --filter "$filter" > "$log" 2>&1 || grep -q "Sanitizer" "$log"; then
        grep -E "Sanitizer|SUMMARY|error:|failed" "$log" | head -20 >&2
        echo "error: the tests under the $sanitizer sanitizer failed or reported (see $log)" >&2
        exit 1
    fi
    grep -E "Executed [0-9]+ tests" "$log" | tail -1
done
