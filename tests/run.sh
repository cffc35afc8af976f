#!/usr/bin/env bash
# The test command: bring up what the tests need, then run pytest (arguments go to pytest).
#
#   bash tests/run.sh [PYTEST ARGS ...]
#
# The SLURM tests (tests/jobs) need a SLURM cluster on this machine:
# - as root on Debian/Ubuntu, this starts a one-node cluster first with .ci/slurm-up.sh
#   (idempotent: installs slurm-wlm and munge only if missing, leaves running daemons alone);
# - elsewhere, or when that fails, they use a cluster that already runs, else they skip, saying
#   how to enable them;
# - with CI set (CI=true), a cluster that cannot be started is a failure, never a skip.
#
# Environment: RECAPTION_SLURM_UP=0 skips starting the cluster (e.g. for `tests/core` only);
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "tests/run.sh: $*" >&2; }
ci() {  # CI set and not false/0/no (portable to bash 3: no ${CI,,})
    local v
    v="$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')"
    [[ -n "$v" && ! "$v" =~ ^(0|false|no)$ ]]
}

if [[ "${RECAPTION_SLURM_UP:-1}" != 0 ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        if ! bash .ci/slurm-up.sh; then
            if ci; then
                log "ERROR: could not start the SLURM cluster (CI must run the SLURM tests)"
                exit 1
            fi
            log "could not start the SLURM cluster; the tests in tests/jobs will skip"
        fi
    elif ! ci; then
        log "not root on Debian/Ubuntu: tests/jobs run only if a SLURM cluster already runs" \
            "here (start one with: sudo bash .ci/slurm-up.sh)"
    fi
fi

exec "${PYTHON:-python}" -m pytest "$@"
