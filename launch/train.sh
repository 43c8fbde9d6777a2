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
# that runs longer, default none), MPIRUN_ARGS (anything else for mpirun).
set -euo pipefail
cd "$(dirname "$0")/.."
moe="${MOE:-.build/release/moe}"
ranks="${RANKS:-$(nproc)}"
[[ -x "$moe" ]] || { echo "error: $moe not found; run 'swift build -c release' first" >&2; exit 1; }

args=(-np "$ranks" --bind-to core --map-by core -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1)
# OpenMPI refuses root unless told; only say so when we are root.
[[ $(id -u) -eq 0 ]] && args+=(--allow-run-as-root)
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
else
    # One machine: shared memory without the single-copy mechanism, 1.5-3x faster in VMs.
    args+=(--mca btl_vader_single_copy_mechanism none)
    (( ranks > $(nproc) )) && args+=(--oversubscribe)
fi
[[ -n "${TIMEOUT:-}" ]] && args+=(--timeout "$TIMEOUT")
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$moe" train "$@"
