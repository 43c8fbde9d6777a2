#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes with libFuzzer and AddressSanitizer, starting from the
# seed corpus in Tests/Fuzz/corpus (safetensors header, checkpoint manifest, token-file header,
# tokenizer.json / llm.c tokenizer file, YAML config).
#
#   launch/fuzz.sh                 # every target, FUZZ_SECONDS (default 10) each
#   FUZZ_SECONDS=600 launch/fuzz.sh tokenizer
#
# New inputs go to a scratch corpus, not the repository. A crash, an overflow, a sanitizer
# report or a hang (over 10 s for one input) stops the run, saves the input as
# .build/fuzz-findings/TARGET-*, and exits non-zero; replay one with
# `swift run moe-fuzz TARGET FILE` after fixing it, and add it to the seed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-10}"
targets=("$@")
(( ${#targets[@]} )) || targets=(safetensors manifest token_file tokenizer config)
build=.build/fuzz
swift build --product moe-fuzz --build-path "$build" -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING 2>&1 \
    | grep -v "Cannot export local symbol" || true
binary="$(swift build --product moe-fuzz --build-path "$build" --show-bin-path)/moe-fuzz"
[[ -x "$binary" ]] || { echo "error: the fuzz build failed" >&2; exit 1; }
mkdir -p .build/fuzz-findings
status=0
for target in "${targets[@]}"; do
    scratch=$(mktemp -d)
    cp Tests/Fuzz/corpus/"$target"/* "$scratch"/
    echo "fuzz $target: ${seconds}s from $(ls Tests/Fuzz/corpus/"$target" | wc -l) seeds"
    if ! FUZZ_TARGET="$target" ASAN_OPTIONS=detect_leaks=0 "$binary" "$scratch" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=4096 -max_len=65536 -artifact_prefix=".build/fuzz-findings/$target-" -print_final_stats=1 \
        > ".build/fuzz-findings/$target.log" 2>&1; then
        echo "error: fuzz $target found a failing input (see .build/fuzz-findings/$target.log):" >&2
        grep -E "ERROR|Fatal|SUMMARY|Test unit written" ".build/fuzz-findings/$target.log" | head -5 >&2
        status=1
    fi
    grep -E "stat::number_of_executed_units|cov:" ".build/fuzz-findings/$target.log" | tail -1 || true
    rm -rf "$scratch"
done
exit "$status"
