#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (localhost), for tests/jobs.
#
# Idempotent: installs Debian's slurm-wlm and munge only if missing, writes a minimal
# /etc/slurm/slurm.conf for this node's real CPUs and memory, creates a munge key if there is
# none, starts munged, slurmctld and slurmd unless they already run, and waits until `sinfo`
# shows the node idle. Run as root (as CI does). Safe to run again at any time.
#
# Environment:
#   SLURM_UP_TIMEOUT     seconds to wait for the node to become idle (default 90)
#   SLURM_MAX_ARRAY_SIZE MaxArraySize written into slurm.conf (default 1001, SLURM's own)
#   SLURM_CRED_EXPIRE    AuthInfo cred_expire: how long a requeued job waits (default 10 s)
set -euo pipefail

TIMEOUT="${SLURM_UP_TIMEOUT:-90}"
MAX_ARRAY_SIZE="${SLURM_MAX_ARRAY_SIZE:-1001}"
CRED_EXPIRE="${SLURM_CRED_EXPIRE:-10}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm-up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons)"

# A slurm.conf this script did not write belongs to a real SLURM setup: never replace it.
MARK="# Written by .ci/slurm-up.sh"
if [[ -e "$CONF" ]] && [[ "$(head -n1 "$CONF")" != "$MARK"* ]]; then
    die "$CONF exists and was not written by this script: this machine has its own SLURM" \
        "setup, which it leaves alone (tests/jobs use a running cluster as it is)"
fi

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- slurm.conf -----------------------------------------------------------------------------
node="$(hostname -s)"
# slurmd -C prints this node's real hardware, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105".
hw="$(slurmd -C | head -n1)"
cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
[[ -n "$cpus" && -n "$mem" ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $hw"
# Leave a little memory for the OS so slurmd never registers with less than configured.
mem=$((mem * 95 / 100))

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by .ci/slurm-up.sh: a one-node cluster on localhost for tests.
ClusterName=recaption-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job waits cred_expire seconds before it may start again (SLURM's default: 120).
AuthInfo=cred_expire=${CRED_EXPIRE}
MpiDefault=none
ProctrackType=proctrack/linuxproc
# Bind every task to the cores it was given, as many production clusters do (task/affinity
# needs no cgroup; TaskPluginParam=Cores is the binding srun applies without --cpu-bind): an
# srun without --cpus-per-task then runs on one core, and tests/jobs see it.
TaskPlugin=task/affinity
TaskPluginParam=Cores
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Every finished job (state and exit code) is appended here; tests read it.
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
JobRequeue=1
MaxArraySize=${MAX_ARRAY_SIZE}
MinJobAge=600
KillWait=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (node $node, $cpus CPUs, ${mem} MB)"
fi
rm -f "$new_conf"

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

stop_daemon() {  # stop the daemon recorded in pid file $1 (only ours, by pid)
    if running "$1"; then
        kill "$(cat "$1")" 2>/dev/null || true
        for _ in $(seq 50); do running "$1" || break; sleep 0.2; done
    fi
}

# --- munge ----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key /run/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /var/lib/munge /var/log/munge
chown munge:munge /var/lib/munge /var/log/munge 2>/dev/null || true
if ! running "$MUNGE_PID"; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"

# --- slurm daemons --------------------------------------------------------------------------
if [[ $conf_changed -eq 1 ]]; then
    stop_daemon "$SLURMD_PID"
    stop_daemon "$CTLD_PID"
fi
if ! running "$CTLD_PID"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || die "slurmctld did not come up; see $LOG_DIR/slurmctld.log"
if ! running "$SLURMD_PID"; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# --- wait for the node ----------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
while :; do
    state="$(sinfo --noheader --nodes="$node" --format=%T 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle | mixed | allocated) break ;;
        drain* | down* | fail*)
            # A node left down by an earlier config comes back once slurmd registers again.
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    if ((SECONDS >= deadline)); then
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        die "node $node is '$state', not idle, after ${TIMEOUT}s"
    fi
    sleep 0.5
done
log "cluster up: node $node is $state ($(scontrol show config | awk '/^MaxArraySize/ {print "MaxArraySize=" $3}'))"
