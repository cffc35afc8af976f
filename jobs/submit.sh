#!/usr/bin/env bash
# Submit a recaption run to SLURM: download → caption → filter → merge → train → sample,
# chained with --dependency=afterok, each array sized from the number of image shards.
#
# Usage:
#   jobs/submit.sh CONFIG [KEY=VALUE ...] [--from STAGE] [--to STAGE] [--after JOBID] [--dry-run]
#
# How arrays are sized: how many shards img2dataset writes is known only once the download has
# run (the pre-filter decides how many rows remain). So when the chain starts at download,
# this script submits the download job and a one-CPU "plan" job (jobs/plan.sbatch) that waits
# for it with afterok and then runs this script again with --from caption: by then the shards
# exist and every array (caption, filter, merge) is sized from the real count. Started with
# --from caption or later, it counts the shards in run_dir/images/ straight away.
# An array has ceil(shards / SHARDS_PER_TASK) tasks, never more than the cluster's
# MaxArraySize (read from `scontrol show config`) nor RECAPTION_MAX_ARRAY_TASKS; task i of N
# owns shards [i::N] of the sorted shard list, so fewer tasks than shards is still complete.
#
# Every job is requeueable and stops cleanly on SIGUSR1/SIGTERM (jobs/stage_step.sh); finished
# shards are never redone, so running this script again resumes a run. A job whose shards fail
# requeues itself up to RECAPTION_MAX_RETRIES times; then the config's merge.min_done_fraction
# decides whether the chain goes on without them (see docs/SLURM.md, "Failed shards").
#
# Cluster specifics come from the environment (or a file of such lines named by
# RECAPTION_CLUSTER_ENV, sourced first); nothing in jobs/ needs editing:
#   RECAPTION_PARTITION            partition for every job (default: the cluster's default)
#   RECAPTION_CPU_PARTITION        partition for download, plan, filter, merge
#   RECAPTION_GPU_PARTITION        partition for caption, train, sample
#   RECAPTION_ACCOUNT, RECAPTION_QOS   --account and --qos
#   RECAPTION_GPUS_PER_NODE        GPUs on a GPU node (default 8)
#   RECAPTION_CPUS_PER_GPU         CPUs to ask per GPU (default 8)
#   RECAPTION_CPU_ONLY=1           ask for no GPUs; caption, train and sample run on CPU (demo)
#   RECAPTION_<STAGE>_TIME         --time of that stage's jobs, e.g. RECAPTION_CAPTION_TIME=4:00:00
#                                  (default: the partition's default time limit)
#   RECAPTION_<STAGE>_CPUS         --cpus-per-task (defaults: download = download.processes,
#                                  filter/merge 2, CPU-only caption/sample 1, GPU stages
#                                  GPUs x RECAPTION_CPUS_PER_GPU)
#   RECAPTION_<STAGE>_MEM          --mem of that stage's jobs (default: the partition's)
#   RECAPTION_<STAGE>_SBATCH_ARGS  more sbatch options for that stage, e.g. "--constraint=h100"
#   RECAPTION_SBATCH_ARGS          more sbatch options for every job
#   RECAPTION_<STAGE>_SHARDS_PER_TASK  shards per array task (caption 1, filter 8, merge 4)
#   RECAPTION_<STAGE>_MAX_RUNNING  array throttle %N: tasks running at once
#                                  (caption 64, filter 32, merge 32)
#   RECAPTION_MAX_ARRAY_TASKS      cap on tasks per array below MaxArraySize
#   RECAPTION_CAPTION_GPUS_PER_TASK    GPUs per caption task (1: one task per GPU; G > 1:
#                                  torchrun with G processes inside each task)
#   RECAPTION_TRAIN_NODES          nodes for training (default 1)
#   RECAPTION_TRAIN_GPUS_PER_NODE  GPUs per training node (default RECAPTION_GPUS_PER_NODE)
#   RECAPTION_TRAIN_PROCS_PER_NODE processes per node under RECAPTION_CPU_ONLY=1 (default 1)
#   RECAPTION_SIGNAL_LEAD          seconds before the time limit that SIGUSR1 arrives
#                                  (default 120; train 300, to leave time for a checkpoint)
#   RECAPTION_TRAIN_SHUTDOWN_TIMEOUT  seconds the training launchers wait for a stopping
#                                  process before SIGKILL (default: the train signal lead)
#   RECAPTION_MAX_RETRIES          requeues of a job whose shards failed (default 2)
#   RECAPTION_JOB_PREFIX           job name prefix (default "recaption")
#   RECAPTION_PYTHON               the Python that has recaption installed (default: python3)
#
# Jobs write logs to run_dir/slurm/logs/ and are listed in run_dir/slurm/jobs.tsv
# (stage, job id, array, dependency, time). Exit status: 0 submitted, 2 usage or config error.
set -euo pipefail

JOBS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGES=(download caption filter merge train sample)

die() {
    echo "submit.sh: $*" >&2
    exit 2
}
say() { echo "submit.sh: $*" >&2; }

if [[ -n "${RECAPTION_CLUSTER_ENV:-}" ]]; then
    [[ -f "$RECAPTION_CLUSTER_ENV" ]] || die "RECAPTION_CLUSTER_ENV=$RECAPTION_CLUSTER_ENV: no such file"
    # shellcheck disable=SC1090
    source "$RECAPTION_CLUSTER_ENV"
fi

# --- arguments ------------------------------------------------------------------------------
config=""
overrides=()
from_stage=download
to_stage=sample
after=""
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --from) from_stage="${2:?--from needs a stage}"; shift 2 ;;
        --to) to_stage="${2:?--to needs a stage}"; shift 2 ;;
        --after) after="${2:?--after needs a job id}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *=*) [[ -n "$config" ]] || die "the CONFIG file comes before KEY=VALUE overrides"
             overrides+=("$1"); shift ;;
        *) [[ -z "$config" ]] || die "unexpected argument $1: one CONFIG, then KEY=VALUE overrides"
           config="$1"; shift ;;
    esac
done
[[ -n "$config" ]] || die "usage: jobs/submit.sh CONFIG [KEY=VALUE ...] [--from STAGE] [--to STAGE] [--after JOBID] [--dry-run]"
[[ -f "$config" ]] || die "$config: config file not found"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"

stage_index() {
    local i
    for i in "${!STAGES[@]}"; do
        [[ "${STAGES[$i]}" == "$1" ]] && { echo "$i"; return; }
    done
    die "unknown stage '$1'; stages are: ${STAGES[*]}"
}
first=$(stage_index "$from_stage")
last=$(stage_index "$to_stage")
((first <= last)) || die "--from $from_stage comes after --to $to_stage"

# --- python and the config ------------------------------------------------------------------
RECAPTION_PYTHON="${RECAPTION_PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$RECAPTION_PYTHON" ]] || die "no python3 on PATH; set RECAPTION_PYTHON"
# The interpreter itself, not a shim or a venv's `activate`-dependent name.
RECAPTION_PYTHON="$("$RECAPTION_PYTHON" -c 'import sys; print(sys.executable)')" ||
    die "cannot run $RECAPTION_PYTHON; set RECAPTION_PYTHON to a working python"
export RECAPTION_PYTHON RECAPTION_JOBS_DIR="$JOBS_DIR"
if ! "$RECAPTION_PYTHON" -c 'import recaption' 2>/dev/null; then
    # A source checkout that is not pip-installed: let the jobs import it from here.
    repo="$(dirname "$JOBS_DIR")"
    [[ -d "$repo/recaption" ]] || die "$RECAPTION_PYTHON cannot import recaption; pip install it or set RECAPTION_PYTHON"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

# Validate the config here, before anything is queued, and read what sizing needs.
read -r run_dir download_processes train_batch train_accum train_global < <(
    "$RECAPTION_PYTHON" - "$config" "${overrides[@]}" <<'PY' || echo "ERROR"
import sys
from recaption.config import ConfigError, load_config
try:
    c = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as exc:
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)
t = c.train
print(
    c.run_dir.resolve(), c.download.processes, t.batch_size, t.gradient_accumulation_steps,
    t.global_batch_size or 0,
)
PY
)
[[ "$run_dir" != ERROR && -n "$run_dir" ]] || die "$config: invalid config (see above)"

slurm_dir="$run_dir/slurm"
log_dir="$slurm_dir/logs"
mkdir -p "$log_dir"
# Read by jobs/stage_step.sh: where it counts each job's retries.
export RECAPTION_SLURM_DIR="$slurm_dir"

# --- cluster settings -----------------------------------------------------------------------
upper() { tr '[:lower:]' '[:upper:]' <<<"$1"; }
setting() {  # setting STAGE NAME DEFAULT: RECAPTION_<STAGE>_<NAME>, else DEFAULT
    local var
    var="RECAPTION_$(upper "$1")_$2"
    echo "${!var:-$3}"
}
cpu_only="${RECAPTION_CPU_ONLY:-0}"
gpus_per_node="${RECAPTION_GPUS_PER_NODE:-8}"
cpus_per_gpu="${RECAPTION_CPUS_PER_GPU:-8}"
prefix="${RECAPTION_JOB_PREFIX:-recaption}"

if [[ $dry_run -eq 1 ]] && ! command -v scontrol >/dev/null; then
    max_array_size=1001
else
    command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
    max_array_size="$(scontrol show config | awk '$1 == "MaxArraySize" {print $3}')"
    [[ "$max_array_size" =~ ^[0-9]+$ ]] || die "could not read MaxArraySize from 'scontrol show config'"
fi
# Indices run 0..N-1 and must stay below MaxArraySize.
max_tasks="$max_array_size"
if [[ -n "${RECAPTION_MAX_ARRAY_TASKS:-}" ]] && ((RECAPTION_MAX_ARRAY_TASKS < max_tasks)); then
    max_tasks="$RECAPTION_MAX_ARRAY_TASKS"
fi

is_gpu_stage() { [[ "$1" == caption || "$1" == train || "$1" == sample ]]; }

# "NODES PROCESSES_PER_NODE" of the training job.
train_layout() {
    local per_node="${RECAPTION_TRAIN_GPUS_PER_NODE:-$gpus_per_node}"
    [[ "$cpu_only" == 1 ]] && per_node="${RECAPTION_TRAIN_PROCS_PER_NODE:-1}"
    echo "${RECAPTION_TRAIN_NODES:-1} $per_node"
}

# Refuse a training job whose global batch differs from train.global_batch_size (the recipe's).
check_global_batch() {
    ((train_global > 0)) || return 0
    local nodes per_node global
    read -r nodes per_node < <(train_layout)
    global=$((train_batch * nodes * per_node * train_accum))
    ((global == train_global)) && return 0
    die "train.global_batch_size is $train_global in $config, but this job would train with" \
        "$global = train.batch_size $train_batch x $nodes node(s) (RECAPTION_TRAIN_NODES) x" \
        "$per_node process(es) per node x train.gradient_accumulation_steps $train_accum." \
        "Change train.batch_size or train.gradient_accumulation_steps (KEY=VALUE after the" \
        "config) or the node count so that the product is $train_global; see docs/GUIDE.md," \
        "'Training recipe', for how the learning rate goes with the batch"
}

# sbatch options for one stage (into the global array `opts`).
stage_options() {
    local stage="$1" partition time mem cpus gpus extra
    opts=(--parsable --chdir="$PWD" --job-name="$prefix-$stage")
    partition="$(setting "$stage" PARTITION "")"
    if [[ -z "$partition" ]]; then
        if [[ "$stage" == plan ]] || ! is_gpu_stage "$stage"; then
            partition="${RECAPTION_CPU_PARTITION:-${RECAPTION_PARTITION:-}}"
        else
            partition="${RECAPTION_GPU_PARTITION:-${RECAPTION_PARTITION:-}}"
        fi
    fi
    [[ -n "$partition" ]] && opts+=(--partition="$partition")
    [[ -n "${RECAPTION_ACCOUNT:-}" ]] && opts+=(--account="$RECAPTION_ACCOUNT")
    [[ -n "${RECAPTION_QOS:-}" ]] && opts+=(--qos="$RECAPTION_QOS")
    time="$(setting "$stage" TIME "")"
    [[ -n "$time" ]] && opts+=(--time="$time")
    mem="$(setting "$stage" MEM "")"
    [[ -n "$mem" ]] && opts+=(--mem="$mem")
    local lead_default=120
    [[ "$stage" == train ]] && lead_default=300
    [[ "$stage" != plan ]] && opts+=(--signal="B:USR1@${RECAPTION_SIGNAL_LEAD:-$lead_default}")

    gpus=0
    case "$stage" in
        caption) gpus="${RECAPTION_CAPTION_GPUS_PER_TASK:-1}" ;;
        train) gpus="${RECAPTION_TRAIN_GPUS_PER_NODE:-$gpus_per_node}" ;;
        sample) gpus=1 ;;
    esac
    if [[ "$cpu_only" == 1 ]]; then
        case "$stage" in
            download) cpus="$download_processes" ;;
            filter | merge) cpus=2 ;;
            train) cpus="${RECAPTION_TRAIN_PROCS_PER_NODE:-1}" ;;
            caption) cpus="${RECAPTION_CAPTION_GPUS_PER_TASK:-1}" ;;
            *) cpus=1 ;;
        esac
    else
        case "$stage" in
            download) cpus="$download_processes" ;;
            filter | merge) cpus=2 ;;
            plan) cpus=1 ;;
            *) cpus=$((gpus * cpus_per_gpu)) ;;
        esac
        ((gpus > 0)) && opts+=(--gres="gpu:$gpus")
    fi
    opts+=(--cpus-per-task="$(setting "$stage" CPUS "$cpus")")
    if [[ "$stage" == train ]]; then
        local nodes per_node
        read -r nodes per_node < <(train_layout)
        opts+=(--nodes="$nodes" --ntasks-per-node=1
            --export="ALL,RECAPTION_TRAIN_PROCS_PER_NODE=$per_node,RECAPTION_SIGNAL_LEAD_S=${RECAPTION_SIGNAL_LEAD:-$lead_default}")
    fi
    if [[ -n "${RECAPTION_SBATCH_ARGS:-}" ]]; then
        read -ra extra <<<"$RECAPTION_SBATCH_ARGS"
        opts+=("${extra[@]}")
    fi
    extra="$(setting "$stage" SBATCH_ARGS "")"
    if [[ -n "$extra" ]]; then
        read -ra extra <<<"$extra"
        opts+=("${extra[@]}")
    fi
}

# The array spec "0-(N-1)%M" for a stage over `shards` shards.
array_spec() {
    local stage="$1" shards="$2" per_task running tasks default_per default_running
    case "$stage" in
        caption) default_per=1 default_running=64 ;;
        filter) default_per=8 default_running=32 ;;
        *) default_per=4 default_running=32 ;;
    esac
    per_task="$(setting "$stage" SHARDS_PER_TASK "$default_per")"
    running="$(setting "$stage" MAX_RUNNING "$default_running")"
    ((per_task >= 1 && running >= 1)) || die "$stage: SHARDS_PER_TASK and MAX_RUNNING must be >= 1"
    tasks=$(((shards + per_task - 1) / per_task))
    ((tasks > max_tasks)) && tasks="$max_tasks"
    ((running > tasks)) && running="$tasks"
    echo "0-$((tasks - 1))%$running"
}

# submit STAGE DEPENDENCY ARRAY SCRIPT_ARGS...: prints the job id.
submit() {
    local stage="$1" dependency="$2" array="$3" output jobid
    shift 3
    stage_options "$stage"
    if [[ -n "$array" ]]; then
        opts+=(--array="$array")
        output="$log_dir/%x-%A_%a.log"
    else
        output="$log_dir/%x-%j.log"
    fi
    opts+=(--output="$output")
    [[ -n "$dependency" ]] && opts+=(--dependency="afterok:$dependency")
    if [[ $dry_run -eq 1 ]]; then
        jobid="DRYRUN-$stage"
        printf 'sbatch' >&2
        printf ' %q' "${opts[@]}" "$JOBS_DIR/$stage.sbatch" "$@" >&2
        printf '\n' >&2
    else
        jobid="$(sbatch "${opts[@]}" "$JOBS_DIR/$stage.sbatch" "$@")" ||
            die "sbatch refused the $stage job (see its message above)"
        jobid="${jobid%%;*}"
        printf '%s\t%s\t%s\t%s\t%s\n' "$stage" "$jobid" "${array:--}" "${dependency:--}" \
            "$(date -Iseconds)" >>"$slurm_dir/jobs.tsv"
    fi
    say "$stage: job $jobid${array:+ array $array}${dependency:+ after $dependency}"
    echo "$jobid"
}

# --- the chain ------------------------------------------------------------------------------
train_index=$(stage_index train)
((first <= train_index && train_index <= last)) && check_global_batch
previous="$after"
if [[ "${STAGES[$first]}" == download ]]; then
    previous="$(submit download "$previous" "" "$config" "${overrides[@]}")"
    if ((last > first)); then
        submit plan "$previous" "" "$config" "${overrides[@]}" \
            --from "${STAGES[$((first + 1))]}" --to "$to_stage" >/dev/null
    fi
    exit 0
fi

shopt -s nullglob
tars=("$run_dir"/images/*.tar)
shopt -u nullglob
n_shards=${#tars[@]}
((n_shards > 0)) || die "no image shards in $run_dir/images; submit the download first: jobs/submit.sh $config ${overrides[*]}"
say "$n_shards image shard(s) in $run_dir/images; MaxArraySize $max_array_size"

for ((i = first; i <= last; i++)); do
    stage="${STAGES[$i]}"
    array=""
    case "$stage" in caption | filter | merge) array="$(array_spec "$stage" "$n_shards")" ;; esac
    previous="$(submit "$stage" "$previous" "$array" "$config" "${overrides[@]}")"
done
