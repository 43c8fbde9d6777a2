#!/usr/bin/env bash
# What asynchronous checkpoints hide (docs/OPERATIONS.md): trains the same run without periodic
# saves, with blocking saves and with `checkpoint.async=true`, REPS times in turn, and prints one
# JSON line per run and one summary line:
#   cost = the steps' seconds beyond the run without saves (from metrics.jsonl) + the seconds the
#          saves held the steps (blocking: the saves themselves), over the periodic saves (the
#          final save is blocking in every mode and left out);
#   hidden = 1 - async cost / blocking cost, on the means over the repetitions.
#
#   launch/bench-checkpoint.sh                                  # 2 ranks, 3 repetitions
#   RANKS=1 BIND=none OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 launch/bench-checkpoint.sh   # a free core
#
# Variables: RANKS (default 2), REPS (3), EVERY (save every N steps, 10), STEPS (40), BIND
# (mpirun --bind-to, default core), MOE (binary, default .build/release/moe). Arguments after
# `--` go to `moe train` (the default model is configs/bench.yaml at width 512, hidden 2048: an
# 860 MB checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
moe="$(realpath "${MOE:-.build/release/moe}")"
ranks="${RANKS:-2}" reps="${REPS:-3}" every="${EVERY:-10}" steps="${STEPS:-40}"
[[ "${1:-}" == "--" ]] && shift
[[ -x "$moe" ]] || { echo "bench-checkpoint: no moe binary at $moe (swift build -c release)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
model=(--config configs/bench.yaml --set model.width=512 --set model.ffn_hidden=2048 --set model.heads=8)
environment=()
for name in OMP_NUM_THREADS OPENBLAS_NUM_THREADS; do [[ -n "${!name:-}" ]] && environment+=(-x "$name"); done

for rep in $(seq "$reps"); do
    for mode in none blocking async; do
        case $mode in
            none) saves=(--set checkpoint.every=0) ;;
            blocking) saves=(--set checkpoint.every="$every" --set checkpoint.keep=2) ;;
            async) saves=(--set checkpoint.every="$every" --set checkpoint.keep=2 --set checkpoint.async=true) ;;
        esac
        rm -rf "$work/run"
        mpirun --timeout 1800 -np "$ranks" --bind-to "${BIND:-core}" "${environment[@]}" "$moe" train "${model[@]}" \
            --set train.steps="$steps" --set train.eval_every=0 --set train.log_every=1 "${saves[@]}" "$@" \
            --run-dir "$work/run" > "$work/$mode.log" 2>&1 || { cat "$work/$mode.log" >&2; exit 1; }
        python3 - "$mode" "$rep" "$work/run/metrics.jsonl" "$work/$mode.log" >> "$work/runs.jsonl" <<'PY'
import json, re, sys
mode, rep, metrics, log = sys.argv[1:]
records = [json.loads(line) for line in open(metrics) if line.strip()]
text = open(log).read()
batch = int(re.search(r"global batch \S+ = (\d+) tokens", text).group(1))
steps = sum(batch / r["tokens_per_sec"] for r in records if r.get("tokens_per_sec") and r["step"] > 1)
saves = [float(x) for x in re.findall(r"saved \S+ in ([0-9.]+) s\n", text)][:-1]
held = [float(x) for x in re.findall(r"held up ([0-9.]+) s", text)]
print(json.dumps({"mode": mode, "rep": int(rep), "step_seconds": round(steps, 2),
                  "saving_seconds": round(sum(saves) + sum(held), 2), "saves": len(saves) + len(held)}))
PY
        tail -1 "$work/runs.jsonl"
    done
done
python3 - "$work/runs.jsonl" "$ranks" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
mean = lambda mode, key: sum(r[key] for r in runs if r["mode"] == mode) / sum(r["mode"] == mode for r in runs)
reference = mean("none", "step_seconds")
cost = {mode: mean(mode, "step_seconds") - reference + mean(mode, "saving_seconds") for mode in ("blocking", "async")}
print(json.dumps({"ranks": int(sys.argv[2]), "blocking_cost_s": round(cost["blocking"], 2), "async_cost_s": round(cost["async"], 2),
                  "hidden": round(1 - cost["async"] / cost["blocking"], 3)}))
PY
