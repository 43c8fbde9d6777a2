#!/usr/bin/env bash
# EvoMoE against the gates it is compared with, on the reference model (configs/bench.yaml),
# validated on the held-out works, SEEDS seeds per gate, at equal steps and at equal compute:
#
#   1. every gate (and a dense model with the active parameters of top-1) trains STEPS steps;
#   2. EvoMoE's mean training compute (model FLOPs, counting what its gate computed: dense phase,
#      soft DTS, hard top-1) is the budget; every other gate trains again for the steps that spend
#      that budget at its own measured compute per step (its learning-rate schedule fitted to them);
#   3. OUT/equal-steps.md and OUT/equal-compute.md: mean ± sd over seeds of the validation loss,
#      the compute and the training time (`moe compare`), and the validation curves as SVG.
#
#   launch/compare-gates.sh                      # STEPS=600 SEEDS=3, one single-threaded run per core
#   STEPS=300 SEEDS=1 GATES="evomoe hash" launch/compare-gates.sh
#   EVOMOE="--set dts.threshold=0.01" launch/compare-gates.sh   # another EvoMoE setting
#
# Environment (besides launch/study.sh's CONFIG, STEPS, SEEDS, JOBS, RANKS, PRECISION, MOE): GATES
# (default: the paper's baselines and dense; also top2, plain top-2 with the config's capacity;
# deepseek, DeepSeek-V3's routing at top-2's parameters; dense2, dense with top-2's active FFN;
# evomoe always runs, it sets the budget), EVOMOE (extra --set arguments for EvoMoE), OUT (default
# runs/compare). Finished runs are kept: a stopped study continues. The main job against plain
# top-2 at its compute:
#
#   CONFIG=configs/shakespeare.yaml STEPS=2000 SEEDS=1 GATES=top2 OUT=runs/main-vs-top2 launch/compare-gates.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/study.sh
out="${OUT:-runs/compare}"
declare -A settings=(
    [evomoe]="--set moe.gate=dts --set evomoe.spawn_fraction=0.05 ${EVOMOE:-}"
    [switch]="--set moe.gate=switch --set moe.top_k=1"
    [gshard]="--set moe.gate=gshard --set moe.capacity_factor=1.0"
    [top2]="--set moe.gate=topk --set moe.top_k=2"
    [base]="--set moe.gate=base"
    [hash]="--set moe.gate=hash"
    [stablemoe]="--set moe.gate=stablemoe"
    [dense]="--set model.moe_every=0"
    # DeepSeek-V3's recipe at top-2's parameters: 32 fine-grained experts of 128 (8 x 512 routed in
    # all), 6 of them per token plus one shared expert of 256 (1024 active, as top-2 of 512),
    # sigmoid scores, loss-free bias balancing, the sequence-wise loss, dropless.
    [deepseek]="--set moe.gate=topk --set moe.experts=32 --set moe.top_k=6 --set moe.expert_hidden=128 --set moe.shared_experts=1 --set moe.shared_hidden=256 --set moe.score=sigmoid --set moe.renormalize=before_drop --set moe.balance_loss=0 --set moe.z_loss=0 --set moe.capacity_factor=none --set moe.bias_update_rate=1e-3 --set moe.sequence_balance_loss=1e-4"
    # A dense model with the active FFN of top-2 (and of deepseek): hidden 1024.
    [dense2]="--set model.moe_every=0 --set model.ffn_hidden=1024"
)
gates=(evomoe)
for gate in ${GATES:-switch gshard base hash stablemoe dense}; do
    [[ -n "${settings[$gate]+set}" ]] || { echo "error: GATES: unknown gate '$gate' (known: ${!settings[*]})" >&2; exit 1; }
    [[ "$gate" != evomoe ]] && gates+=("$gate")
done

echo "== equal steps: $steps steps, seeds 1..$seeds, gates ${gates[*]}"
for gate in "${gates[@]}"; do
    for seed in $(seq "$seeds"); do
        # shellcheck disable=SC2086
        submit "$out/steps/$gate/seed$seed" "$steps" ${settings[$gate]} --set train.seed="$seed"
    done
done
finish
budget=$(compute_of "$out"/steps/evomoe/seed*)
echo "== equal compute: EvoMoE's mean $(tflop "$budget") TFLOP per run"
rm -rf "$out/compute/evomoe"
mkdir -p "$out/compute"
ln -s ../steps/evomoe "$out/compute/evomoe"
for gate in "${gates[@]:1}"; do
    n=$(steps_for "$budget" "$out/steps/$gate" "$steps")
    echo "   $gate: $n steps"
    for seed in $(seq "$seeds"); do
        # shellcheck disable=SC2086
        submit "$out/compute/$gate/seed$seed" "$n" ${settings[$gate]} --set train.seed="$seed"
    done
done
finish
for budget_kind in steps compute; do
    runs=()
    for gate in "${gates[@]}"; do runs+=("$out/$budget_kind/$gate"/seed*); done
    write_table "$out/equal-$budget_kind.md" "$out/$budget_kind" "${runs[@]}"
done
