# shellcheck shell=bash
# Sourced by every jobs/*.sbatch script except plan: run one recaption stage as this job's
# step, stop it cleanly before the time limit, retry failed shards a bounded number of times,
# and requeue the job so its remaining shards are picked up again.
#
# Signals:
#   SIGUSR1  sent by SLURM RECAPTION_SIGNAL_LEAD seconds before the time limit
#            (`--signal=B:USR1@120`, the `B:` makes it reach this batch shell), or by
#            `scancel --signal=USR1 --batch JOB`. The step is told to stop (the shard ledger
#            abandons the shard in progress, never marking it done; training saves a
#            checkpoint), then the job requeues itself with `scontrol requeue` and resumes from
#            the ledger when it starts again. A plain step gets SIGTERM; an `srun` step gets
#            SIGUSR1, which srun forwards to every process of the step (srun answers SIGTERM by
#            killing the step at once, which would lose the checkpoint).
#   SIGTERM  sent by `scancel` and by preemption. The step is told to stop the same way; the job
#            is not requeued by this script (a user's scancel means stop; SLURM's own preemption
#            with PreemptMode=REQUEUE requeues the job itself).
#
# Failed shards (the stage exits 1): the job requeues itself up to RECAPTION_MAX_RETRIES times
# (default 2; counted in RECAPTION_SLURM_DIR/retries/, which jobs/submit.sh sets); each retry
# redoes only the failed and unfinished shards. When none is left, `python -m recaption.status
# give-up` decides: with merge.min_done_fraction below 1 the job exits 0, so the chain goes on
# and the next stage checks that enough shards came through; otherwise it exits 1 and the
# chain stops here. Before a stage starts, `python -m recaption.status gate` refuses it (exit 2)
# when too few of the run's shards came through the stages before it.
#
# Exit status: the stage's own (0 ok, 1 some shard failed, 2 config error or refused by the
# gate, 3 interrupted), or 0 after giving up on failed shards as above.

set -uo pipefail

RECAPTION_PYTHON="${RECAPTION_PYTHON:-python3}"
_recaption_step_pid=""
_recaption_signal=""
_recaption_stop_signal=TERM
_recaption_stage=""
_recaption_stage_args=()

recaption_log() {
    echo "[$(date +%H:%M:%S)] ${SLURM_JOB_NAME:-recaption} job ${SLURM_JOB_ID:-?}: $*" >&2
}

_recaption_on_signal() {
    _recaption_signal="$1"
    recaption_log "got SIG$1: telling the step to stop at a safe point (SIG$_recaption_stop_signal)"
    if [[ -n "$_recaption_step_pid" ]]; then
        kill "-$_recaption_stop_signal" "$_recaption_step_pid" 2>/dev/null || true
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

# _recaption_find_stage COMMAND...: the stage and its arguments in a `... -m recaption STAGE
# CONFIG [KEY=VALUE ...]` command line (also inside torchrun, srun, accelerate launch).
_recaption_find_stage() {
    local previous="" i
    local -a words=("$@")
    _recaption_stage=""
    _recaption_stage_args=()
    for ((i = 0; i < ${#words[@]}; i++)); do
        if [[ "$previous" == -m && "${words[$i]}" == recaption && $((i + 1)) -lt ${#words[@]} ]]; then
            case "${words[$((i + 1))]}" in
                download | caption | filter | merge | train | sample)
                    _recaption_stage="${words[$((i + 1))]}"
                    # CONFIG and KEY=VALUE overrides; options such as --overwrite are the stage's.
                    local arg
                    for arg in "${words[@]:$((i + 2))}"; do
                        [[ "$arg" == -* ]] || _recaption_stage_args+=("$arg")
                    done
                    return 0 ;;
            esac
        fi
        previous="${words[$i]}"
    done
    return 0
}

# recaption_gate: refuse to start the stage (exit 2) when too few of the run's shards came
# through the stages before it (merge.min_done_fraction); the message names the shards.
recaption_gate() {
    [[ -n "$_recaption_stage" && "$_recaption_stage" != download ]] || return 0
    "$RECAPTION_PYTHON" -m recaption.status gate "$_recaption_stage" "${_recaption_stage_args[@]}"
}

# Attempts so far of this job (array task) that ended with failed shards.
_recaption_retry_file() {
    [[ -n "${RECAPTION_SLURM_DIR:-}" ]] || return 1
    echo "$RECAPTION_SLURM_DIR/retries/$(recaption_self_id)"
}

# _recaption_requeue WHY: requeue this job (task); returns only if SLURM refused.
_recaption_requeue() {
    local self
    self="$(recaption_self_id)"
    recaption_log "requeueing $self ($1); its unfinished shards resume from the ledger"
    if scontrol requeue "$self"; then
        # SLURM now ends this instance of the job; its next start resumes.
        sleep 60 &
        wait $!
    fi
    recaption_log "could not requeue $self (was it submitted with --requeue?)"
}

# After exit 1: retry (requeue) while retries are left, else apply the failure policy.
_recaption_after_failure() {
    local max="${RECAPTION_MAX_RETRIES:-2}" file attempts=0
    if ! file="$(_recaption_retry_file)"; then
        recaption_log "RECAPTION_SLURM_DIR is not set (not submitted by jobs/submit.sh): no retry"
        max=0
    else
        mkdir -p "$(dirname "$file")"
        [[ -f "$file" ]] && attempts="$(cat "$file" 2>/dev/null || echo 0)"
        [[ "$attempts" =~ ^[0-9]+$ ]] || attempts=0
    fi
    if ((attempts < max)); then
        echo $((attempts + 1)) >"$file"
        _recaption_requeue "retry $((attempts + 1)) of $max after failed shard(s)"
        return 1
    fi
    [[ -n "$_recaption_stage" ]] || return 1
    recaption_log "no retry left (RECAPTION_MAX_RETRIES=$max): applying the failure policy"
    "$RECAPTION_PYTHON" -m recaption.status give-up "$_recaption_stage" "${_recaption_stage_args[@]}"
}

# recaption_run_step COMMAND...: check the gate, run the step in the background, forward stop
# signals to it, wait for it, requeue the job if SIGUSR1 interrupted it or shards failed, and
# exit with the step's status.
recaption_run_step() {
    _recaption_find_stage "$@"
    [[ "$1" == srun ]] && _recaption_stop_signal=USR1
    recaption_log "restart ${SLURM_RESTART_COUNT:-0}, array task ${SLURM_ARRAY_TASK_ID:--}" \
        "of ${SLURM_ARRAY_TASK_COUNT:--}, node(s) ${SLURM_JOB_NODELIST:-?}: $*"
    local gate_rc=0
    recaption_gate || gate_rc=$?
    if ((gate_rc != 0)); then
        recaption_log "not starting ${_recaption_stage}: see the message above (exit $gate_rc)"
        exit "$gate_rc"
    fi
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
        _recaption_requeue "stopped before the time limit"
    elif [[ -z "$_recaption_signal" && $rc -eq 1 ]]; then
        if _recaption_after_failure; then
            recaption_log "exiting 0: the chain goes on without the shards given up above"
            exit 0
        fi
    fi
    exit "$rc"
}

# recaption_stage STAGE CONFIG [KEY=VALUE ...]: `python -m recaption STAGE CONFIG ...` as the step.
recaption_stage() {
    local stage="$1"
    shift
    recaption_run_step "$RECAPTION_PYTHON" -m recaption "$stage" "$@"
}
