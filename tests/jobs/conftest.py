"""The SLURM tests need a running SLURM cluster on this machine.

Without one, every test here skips with the reason and the command that enables them; under
CI (``CI`` set and not ``false``/``0``) they fail instead, so CI can never skip them silently.
``bash tests/run.sh`` (as root on Debian/Ubuntu) starts the one-node cluster of
``.ci/slurm-up.sh`` before running pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ENABLE = (
    "run the tests with `bash tests/run.sh` as root on Debian/Ubuntu (it starts a one-node "
    "cluster with .ci/slurm-up.sh), or run `sudo bash .ci/slurm-up.sh` once"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _scontrol_config() -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    config = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    return config


def probe_slurm() -> dict[str, str] | str:
    """``scontrol show config`` of a cluster these tests can use, or why there is none."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed on this machine"
    try:
        sinfo = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s: slurmctld is not running"
    states = sinfo.stdout.split()
    if sinfo.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states):
        return (
            "no usable SLURM node (sinfo: "
            f"{sinfo.stdout.strip() or sinfo.stderr.strip() or 'no output'})"
        )
    try:
        config = _scontrol_config()
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`scontrol show config` failed: {exc}"
    if config.get("JobCompType") != "jobcomp/filetxt":
        return (
            "these tests read finished jobs from a jobcomp/filetxt log, but this cluster's "
            f"JobCompType is {config.get('JobCompType')!r}; they need the cluster of "
            ".ci/slurm-up.sh"
        )
    if "MaxArraySize" not in config or "JobCompLoc" not in config:
        return "`scontrol show config` shows no MaxArraySize or JobCompLoc"
    return config


@pytest.fixture(scope="session")
def slurm_config() -> dict[str, str]:
    """The running cluster's ``scontrol show config``; a skip (a failure under CI) without one."""
    found = probe_slurm()
    if isinstance(found, str):
        if in_ci():
            pytest.fail(f"{found}; CI must run the SLURM tests, not skip them: {ENABLE}")
        pytest.skip(f"{found}; to run the SLURM tests, {ENABLE}")
    return found


@pytest.fixture(autouse=True)
def _needs_slurm(slurm_config: dict[str, str]) -> None:
    """Every test here needs the cluster: check it before any other fixture submits jobs."""
