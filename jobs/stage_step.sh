# shellcheck shell=bash
# Sourced by every jobs/*.sbatch script: run one recaption stage as this job's step, stop it
# cleanly on preemption and requeue the job so its remaining shards are picked up again.
#
# Signals:
#   SIGUSR1  sent by SLURM RECAPTION_SIGNAL_LEAD seconds before the time limit
#            (`--signal=B:USR1@120`, the `B:` makes it reach this batch shell), or by
#            `scancel --signal=USR1 --batch JOB`. The step is told to stop (SIGTERM: the shard
#            ledger abandons the shard in progress, never marking it done), then the job requeues
#            itself with `scontrol requeue` and resumes from the ledger when it starts again.
#   SIGTERM  sent by `scancel` and by preemption. The step is told to stop the same way; the job
#            is not requeued by this script (a user's scancel means stop; SLURM's own preemption
#            with PreemptMode=REQUEUE requeues the job itself).
# Exit status: the stage's own (0 ok, 1 some shard failed, 2 config error, 3 interrupted).

set -uo pipefail

RECAPTION_PYTHON="${RECAPTION_PYTHON:-python3}"
_recaption_step_pid=""
_recaption_signal=""

recaption_log() {
    echo "[$(date +%H:%M:%S)] ${SLURM_JOB_NAME:-recaption} job ${SLURM_JOB_ID:-?}: $*" >&2
}

_recaption_on_signal() {
    _recaption_signal="$1"
    recaption_log "got SIG$1: telling the step to stop at a shard boundary"
    if [[ -n "$_recaption_step_pid" ]]; then
        kill -TERM "$_recaption_step_pid" 2>/dev/null || true
    fi
}

# The id to requeue: this array task alone (the bare array id would requeue every task).
recaption_self_id() {
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID:?not inside a SLURM job}"
    fi
}

# recaption_run_step COMMAND...: run the step in the background, forward stop signals to it,
# wait for it, requeue the job if SIGUSR1 interrupted it, and exit with the step's status.
recaption_run_step() {
    recaption_log "restart ${SLURM_RESTART_COUNT:-0}, array task ${SLURM_ARRAY_TASK_ID:--}" \
        "of ${SLURM_ARRAY_TASK_COUNT:--}, node(s) ${SLURM_JOB_NODELIST:-?}: $*"
    trap '_recaption_on_signal USR1' USR1
    trap '_recaption_on_signal TERM' TERM
    "$@" &
    _recaption_step_pid=$!
    local rc
    while :; do
        wait "$_recaption_step_pid"
        rc=$?
        # `wait` also returns (with 128+signal) when a trapped signal arrives: wait again.
        kill -0 "$_recaption_step_pid" 2>/dev/null || break
    done
    # Reap it for real: the status of the finished process, not of the interrupted wait.
    if [[ -n "$_recaption_signal" ]]; then
        wait "$_recaption_step_pid" 2>/dev/null
        local reaped=$?
        [[ $reaped -ne 127 ]] && rc=$reaped
    fi
    trap - USR1 TERM
    recaption_log "step exited with status $rc"
    if [[ "$_recaption_signal" == USR1 && $rc -ne 0 ]]; then
        local self
        self="$(recaption_self_id)"
        recaption_log "requeueing $self; its unfinished shards resume from the ledger"
        if scontrol requeue "$self"; then
            # SLURM now ends this instance of the job; its next start resumes.
            sleep 60 &
            wait $!
        fi
        recaption_log "could not requeue $self (was it submitted with --requeue?)"
    fi
    exit "$rc"
}

# recaption_stage STAGE CONFIG [KEY=VALUE ...]: `python -m recaption STAGE CONFIG ...` as the step.
recaption_stage() {
    local stage="$1"
    shift
    recaption_run_step "$RECAPTION_PYTHON" -m recaption "$stage" "$@"
}
