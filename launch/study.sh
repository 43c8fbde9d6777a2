# Shared by compare-gates.sh and evomoe-schedule.sh (sourced, not run): a pool of training runs
# of the reference model (CONFIG) on this machine, and the compute each one spent.
#
# Environment: CONFIG (default configs/bench.yaml), STEPS (the equal-steps budget, default 600),
# SEEDS (runs per setting, default 3),
# JOBS (runs at once, each one process with one thread; default: one per core), RANKS (instead:
# one run at a time over mpirun with this many ranks), PRECISION (train.precision, default auto:
# bf16 where the CPU has it), MOE (the binary), OUT (the study's directory).
moe="${MOE:-.build/release/moe}"
config="${CONFIG:-configs/bench.yaml}"
steps="${STEPS:-600}"
seeds="${SEEDS:-3}"
precision="${PRECISION:-auto}"
jobs="${JOBS:-$(nproc)}"
[[ -n "${RANKS:-}" ]] && jobs=1
[[ -x "$moe" ]] || { echo "error: $moe not found; run 'swift build -c release' first" >&2; exit 1; }
# Runs still going when the study stops (an error, Ctrl-C) are stopped with it.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# run_training DIR STEPS ARGS...: trains CONFIG for STEPS steps into DIR, evaluating
# six times on the held-out works. A run that finished with the same arguments is kept, so an
# interrupted study continues where it stopped.
run_training() {
    local dir="$1" n="$2"; shift 2
    local arguments=(--config "$config" --set train.steps="$n" --set train.eval_every=$(( (n + 5) / 6 ))
                     --set train.warmup_steps=$(( n / 20 )) --set checkpoint.every=0 --set train.log_every=10
                     --set train.precision="$precision" "$@" --run-dir "$dir")
    if [[ -f "$dir/finished" && "$(cat "$dir/finished")" == "${arguments[*]}" ]]; then return 0; fi
    rm -rf "$dir"
    mkdir -p "$dir"
    local status=0
    if [[ -n "${RANKS:-}" ]]; then
        RANKS="$RANKS" MOE="$moe" launch/train.sh "${arguments[@]}" > "$dir/train.log" 2>&1 || status=$?
    else
        OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "$moe" train "${arguments[@]}" > "$dir/train.log" 2>&1 || status=$?
    fi
    if (( status != 0 )); then
        echo "error: the run in $dir failed (exit $status): $(tail -n 1 "$dir/train.log")" >&2
        return "$status"
    fi
    echo "${arguments[*]}" > "$dir/finished"
    echo "   $dir: $(grep -o 'val_loss [0-9.]*' "$dir/train.log" | tail -n 1), $(grep -o '[0-9.e+]* TFLOP.*' "$dir/train.log")"
}

# submit DIR STEPS ARGS...: run_training in the background once fewer than JOBS runs are going.
submitted=()
submit() {
    while (( $(jobs -rp | wc -l) >= jobs )); do wait -n || true; done
    submitted+=("$1")
    run_training "$@" &
}

# finish: waits for every submitted run; stops the study if one failed (its error was printed).
finish() {
    wait
    local dir
    for dir in "${submitted[@]}"; do
        [[ -f "$dir/finished" ]] || { echo "error: stopping the study: $dir did not finish (see $dir/train.log)" >&2; exit 1; }
    done
    submitted=()
}

# compute_of DIR...: the mean training compute (model FLOPs) of finished runs, from the last
# line of their metrics (the final evaluation).
compute_of() {
    local dir
    for dir in "$@"; do tail -n 1 "$dir/metrics.jsonl" | grep -o '"train_flops":[0-9.e+-]*' | cut -d: -f2; done \
        | awk '{ sum += $1 } END { if (NR == 0) exit 1; printf "%.6e\n", sum / NR }'
}

# tflop FLOPS: the value in TFLOP, one decimal.
tflop() { awk -v flops="$1" 'BEGIN { printf "%.1f", flops / 1e12 }'; }

# write_table FILE CHART_DIR RUN_DIR...: `moe compare` of the runs (one row per setting, mean ± sd
# over seeds) into FILE, its charts into CHART_DIR; prints the table.
write_table() {
    local file="$1" charts="$2"; shift 2
    "$moe" compare "$@" --output "$charts" > /dev/null
    mv "$charts/comparison.md" "$file"
    echo "== $file (curves by step and by compute in $charts/)"
    cat "$file"
}

# steps_for BUDGET DIR STEPS: the steps that spend BUDGET FLOPs at the per-step compute the runs
# in DIR (seed*/) measured over STEPS steps.
steps_for() {
    local per_run
    per_run=$(compute_of "$2"/seed*)
    awk -v budget="$1" -v spent="$per_run" -v n="$3" 'BEGIN { printf "%d\n", budget / (spent / n) + 0.5 }'
}
