# Sourced by launch/train.sh and launch/slurm.sbatch: runs a training job and relaunches it from
# its newest complete checkpoint when it fails, up to RESTARTS times (default 0: no restart).
#
#   run_with_restarts RUN_DIR RANKS LAUNCH
#
# LAUNCH is a function called as `LAUNCH ranks resume`, which starts the job on `ranks` ranks
# (`resume` is "--resume" on a restart, else empty) and returns its exit status. A failure is
# restarted when a restart can cure it: a rank was killed (status 128 + signal: a lost rank, a
# crashed node), or the job saved a newer checkpoint than the one it started from before it
# failed (a stall, an abort, mpirun's timeout after progress). A failure with no progress and no
# signal (status 1 or 64: a bad config, data file or argument) is not: it would fail again. With MIN_RANKS below RANKS, each
# restart halves the ranks, down to MIN_RANKS (a crashed node's ranks are gone; checkpoints
# reshard to any rank count the expert count allows).

newest_checkpoint() { { ls -d "$1"/checkpoints/step_*/DONE 2>/dev/null || true; } | sort | tail -1; }

run_with_restarts() {
    local run_dir=$1 ranks=$2 launch=$3
    local restarts=${RESTARTS:-0} min_ranks=${MIN_RANKS:-$2} attempt=0 resume="" status before
    while true; do
        before=$(newest_checkpoint "$run_dir")
        status=0
        "$launch" "$ranks" "$resume" || status=$?
        (( status == 0 )) && return 0
        if (( attempt >= restarts )); then return "$status"; fi
        if (( status < 128 )) && [[ "$(newest_checkpoint "$run_dir")" == "$before" ]]; then
            echo "restart: not restarting: the job failed with status $status and saved nothing new (an input to fix?)" >&2
            return "$status"
        fi
        attempt=$((attempt + 1))
        (( ranks / 2 >= min_ranks && min_ranks < ranks )) && ranks=$((ranks / 2))
        local newest from="the start"
        newest=$(newest_checkpoint "$run_dir")
        [[ -n "$newest" ]] && from=$(dirname "$newest")
        echo "restart $attempt of $restarts: the job ended with status $status; resuming $run_dir from $from on $ranks ranks" >&2
        resume="--resume"
    done
}
