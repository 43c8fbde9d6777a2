#!/usr/bin/env bash
# Trains the reference model (configs/bench.yaml) with EvoMoE and the gates it is compared with,
# on the same data, seed and budget, then writes runs/compare/comparison.md (validation loss,
# tokens/s, load balance, dropped fraction) and runs/compare/validation.svg.
#
#   launch/compare-gates.sh            # STEPS=600 per gate by default
#   STEPS=2000 RANKS=2 launch/compare-gates.sh
set -euo pipefail
cd "$(dirname "$0")/.."
moe="${MOE:-.build/release/moe}"
steps="${STEPS:-600}"
out="${OUT:-runs/compare}"
common=(--config configs/bench.yaml --set train.steps="$steps" --set train.eval_every=$(( steps / 6 ))
        --set train.warmup_steps=$(( steps / 20 )) --set checkpoint.every=0 --set train.log_every=10)
declare -A gates=(
    [evomoe]="--set moe.gate=dts --set evomoe.spawn_fraction=0.05"
    [switch]="--set moe.gate=switch --set moe.top_k=1"
    [gshard]="--set moe.gate=gshard --set moe.capacity_factor=1.0"
    [base]="--set moe.gate=base"
    [hash]="--set moe.gate=hash"
    [stablemoe]="--set moe.gate=stablemoe"
)
runs=()
for name in evomoe switch gshard base hash stablemoe; do
    dir="$out/$name"
    rm -rf "$dir"
    echo "== $name: ${gates[$name]}"
    # shellcheck disable=SC2086
    if [[ -n "${RANKS:-}" ]]; then
        RANKS="$RANKS" MOE="$moe" launch/train.sh "${common[@]}" ${gates[$name]} --run-dir "$dir" | tail -2
    else
        "$moe" train "${common[@]}" ${gates[$name]} --run-dir "$dir" | tail -2
    fi
    runs+=("$dir")
done
"$moe" compare "${runs[@]}" --output "$out"
echo "wrote $out/comparison.md and $out/validation.svg"
