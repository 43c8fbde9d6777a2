#!/usr/bin/env bash
# The EvoMoE schedule at equal compute, one setting changed at a time from the main job's former
# one ("default": threshold gamma 0.001, tau 2 -> 0.5, anneal over 50% and hard top-1 from 75% of
# the steps after the spawn, spawn at 5%, mask ratio 0.5), on the reference model (bench.yaml):
#
#   1. the default trains STEPS steps with SEEDS seeds; its mean training compute is the budget;
#   2. each variant trains STEPS steps with seed 1, which measures its compute per step (the
#      schedule's phases are fractions of the run, so compute grows in proportion to the steps);
#      it then trains, every seed, for the steps that spend the budget (STEPS when that is within
#      2% of them: seed 1 is then the calibration run);
#   3. OUT/schedule.md: mean ± sd over seeds (`moe compare`), and the curves as SVG.
#
#   launch/evomoe-schedule.sh                   # STEPS=400 SEEDS=2, every variant
#   VARIANTS="threshold-0.01 short-anneal" SEEDS=3 launch/evomoe-schedule.sh
#
# Environment: launch/study.sh's (STEPS here defaults to 400 and SEEDS to 2), VARIANTS (a subset),
# OUT (default runs/evomoe-schedule). Finished runs are kept: a stopped study continues.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-400}" SEEDS="${SEEDS:-2}"
source launch/study.sh
out="${OUT:-runs/evomoe-schedule}"
# The schedule the study started from (the main job's until it chose gamma 0.2), spelled out.
evomoe="--set moe.gate=dts --set evomoe.spawn_fraction=0.05 --set dts.threshold=0.001"
declare -A variants=(
    [threshold-0.01]="--set dts.threshold=0.01"
    [threshold-0.05]="--set dts.threshold=0.05"
    [threshold-0.1]="--set dts.threshold=0.1"
    [threshold-0.2]="--set dts.threshold=0.2"
    [threshold-0.05-short-anneal]="--set dts.threshold=0.05 --set dts.anneal_fraction=0.25 --set dts.hard_fraction=0.4"
    [tau-max-1]="--set dts.tau_max=1.0"
    [short-anneal]="--set dts.anneal_fraction=0.25 --set dts.hard_fraction=0.4"
    [spawn-0.15]="--set evomoe.spawn_fraction=0.15"
    [mask-0.25]="--set evomoe.mask_ratio=0.25"
)
names=()
for name in ${VARIANTS:-threshold-0.01 threshold-0.05 threshold-0.1 threshold-0.2 tau-max-1 short-anneal spawn-0.15 mask-0.25 threshold-0.05-short-anneal}; do
    [[ -n "${variants[$name]+set}" ]] || { echo "error: VARIANTS: unknown variant '$name' (known: ${!variants[*]})" >&2; exit 1; }
    names+=("$name")
done

echo "== the default and one run of each variant: $steps steps"
for seed in $(seq "$seeds"); do
    # shellcheck disable=SC2086
    submit "$out/default/seed$seed" "$steps" $evomoe --set train.seed="$seed"
done
for name in "${names[@]}"; do
    # shellcheck disable=SC2086
    submit "$out/calibration/$name/seed1" "$steps" $evomoe ${variants[$name]} --set train.seed=1
done
finish
budget=$(compute_of "$out"/default/seed*)
echo "== equal compute: the default's mean $(tflop "$budget") TFLOP per run"
for name in "${names[@]}"; do
    n=$(steps_for "$budget" "$out/calibration/$name" "$steps")
    # Within 2% of the budget already: every seed trains STEPS steps, seed 1 is the calibration run.
    (( n * 50 >= steps * 49 && n * 50 <= steps * 51 )) && n=$steps
    echo "   $name: $n steps"
    for seed in $(seq "$seeds"); do
        if (( seed == 1 && n == steps )); then
            rm -rf "$out/$name/seed1" && mkdir -p "$out/$name" && ln -s "../calibration/$name/seed1" "$out/$name/seed1"
            continue
        fi
        # shellcheck disable=SC2086
        submit "$out/$name/seed$seed" "$n" $evomoe ${variants[$name]} --set train.seed="$seed"
    done
done
finish
runs=("$out"/default/seed*)
for name in "${names[@]}"; do runs+=("$out/$name"/seed*); done
write_table "$out/schedule.md" "$out" "${runs[@]}"
