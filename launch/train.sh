#!/usr/bin/env bash
# Runs `moe train` on this machine with R ranks (default: one per core), one BLAS thread per
# rank, each rank bound to its own core. Extra arguments go to `moe train`.
#
#   launch/train.sh                                 # all cores, the default main job
#   RANKS=2 launch/train.sh --config configs/bench.yaml --run-dir runs/bench2
#   HOSTFILE=launch/hostfile RANKS=8 launch/train.sh --config configs/shakespeare.yaml
#
# Environment: RANKS (ranks, default: cores), HOSTFILE (an OpenMPI hostfile for several
# machines), MOE (the binary, default .build/release/moe), TIMEOUT (seconds; mpirun kills a job
# that runs longer, default none), MPIRUN_ARGS (anything else for mpirun), RESTARTS (relaunch a
# failed job from its newest checkpoint up to this many times, default 0) and MIN_RANKS (halve
# the ranks at each restart down to this many; default: keep them); see launch/restarts.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
moe="${MOE:-.build/release/moe}"
ranks="${RANKS:-$(nproc)}"
[[ -x "$moe" ]] || { echo "error: $moe not found; run 'swift build -c release' first" >&2; exit 1; }

args=(--bind-to core --map-by core -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1)
# OpenMPI refuses root unless told; only say so when we are root.
[[ $(id -u) -eq 0 ]] && args+=(--allow-run-as-root)
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
else
    # One machine: OpenMPI's shared memory as it comes. Its single-copy mechanism (CMA) is slower
    # for a lone blocking collective in a VM, but without it the overlapped exchanges wait for the
    # sender to push each fragment: training ran 8% slower (docs/PERFORMANCE.md).
    (( ranks > $(nproc) )) && args+=(--oversubscribe)
fi
[[ -n "${TIMEOUT:-}" ]] && args+=(--timeout "$TIMEOUT")

# The run directory, for the restarts: --run-dir's value, or moe's default for the config.
run_dir=""
previous=""
for argument in "$@"; do
    [[ "$previous" == "--run-dir" ]] && run_dir=$argument
    [[ "$previous" == "--config" && -z "$run_dir" ]] && config_name=$(basename "$argument" .yaml)
    previous=$argument
done
run_dir=${run_dir:-runs/${config_name:-default}}

train_args=("$@")
if (( ${RESTARTS:-0} == 0 )); then
    # shellcheck disable=SC2086
    exec mpirun -np "$ranks" "${args[@]}" ${MPIRUN_ARGS:-} "$moe" train "${train_args[@]}"
fi

# With restarts the script stays, as mpirun's parent: a TERM (a scheduler's stop) goes on to the
# job, which checkpoints and exits, and is not restarted.
stopping=0
trap 'stopping=1; [[ -n "${child:-}" ]] && kill -TERM "$child" 2>/dev/null' TERM INT
launch() {   # launch RANKS RESUME
    local extra=()
    [[ -n "$2" && " ${train_args[*]} " != *" --resume "* ]] && extra=(--resume)
    # shellcheck disable=SC2086
    mpirun -np "$1" "${args[@]}" ${MPIRUN_ARGS:-} "$moe" train "${train_args[@]}" "${extra[@]}" &
    child=$!
    local status=0
    wait "$child" || status=$?
    # A signal interrupts `wait`; wait again for the job's own status.
    if (( stopping )); then wait "$child" 2>/dev/null || status=$?; exit "$status"; fi
    return "$status"
}
source launch/restarts.sh
run_with_restarts "$run_dir" "$ranks" launch
