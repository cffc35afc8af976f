"""jobs/ on a real one-node SLURM cluster (bring it up with `bash .ci/slurm-up.sh`).

These tests submit the real sbatch scripts through ``jobs/submit.sh`` and wait for SLURM to run
them: the whole demo chain must produce what a local ``recaption run`` of the same config
produces, and a caption array task stopped mid-shard (``scancel``, or the time-limit warning
signal) must, once requeued, leave every image captioned exactly once.

Without the cluster they skip, saying how to start it, and fail under CI (tests/jobs/conftest.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from recaption.config import STAGE_NAMES

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "jobs" / "submit.sh"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# A smaller demo world: 64 rows, shards of 10 (40 rows pass the pre-filter: four shards), a few
# training steps.
DEMO_OVERRIDES = [
    "demo.n_images=64",
    "download.samples_per_shard=10",
    "train.max_steps=3",
    "train.batch_size=2",
    "train.num_workers=0",
]
# CPU-only cluster settings for a 2-core node: one CPU per task, two shards per array task.
CPU_CLUSTER_ENV = {
    "RECAPTION_CPU_ONLY": "1",
    "RECAPTION_FILTER_CPUS": "1",
    "RECAPTION_MERGE_CPUS": "1",
    "RECAPTION_CAPTION_SHARDS_PER_TASK": "2",
    "RECAPTION_FILTER_SHARDS_PER_TASK": "2",
    "RECAPTION_MERGE_SHARDS_PER_TASK": "2",
}
RUN_TIMEOUT_S = 240
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


# -- the cluster -----------------------------------------------------------------------------
@dataclass
class Cluster:
    """What the tests read from the running cluster."""

    max_array_size: int
    jobcomp_log: Path


@pytest.fixture(scope="session")
def cluster(slurm_config: dict[str, str]) -> Cluster:
    """The local SLURM cluster (tests/jobs/conftest.py skips, or fails under CI, without one)."""
    return Cluster(int(slurm_config["MaxArraySize"]), Path(slurm_config["JobCompLoc"]))


# -- running jobs/submit.sh and waiting ------------------------------------------------------
def _env(prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RECAPTION_"))}
    env.update(CPU_CLUSTER_ENV)
    env["RECAPTION_JOB_PREFIX"] = prefix
    env["RECAPTION_PYTHON"] = sys.executable
    env.update(extra)
    return env


def submit(
    run_dir: Path, overrides: list[str], *args: str, prefix: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``jobs/submit.sh configs/demo.yaml run_dir=... OVERRIDES ARGS`` from the repo root."""
    return subprocess.run(
        ["bash", str(SUBMIT), str(DEMO_CONFIG), f"run_dir={run_dir}", *overrides, *args],
        cwd=REPO,
        env=_env(prefix, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def recorded_jobs(run_dir: Path) -> list[tuple[str, str]]:
    """(stage, job id) of every job submit.sh recorded for the run, in order."""
    path = run_dir / "slurm" / "jobs.tsv"
    if not path.exists():
        return []
    return [tuple(line.split("\t")[:2]) for line in path.read_text().splitlines() if line]


def logs_tail(run_dir: Path, lines: int = 25) -> str:
    """The end of every job log of the run, for failure messages."""
    parts = []
    for log in sorted((run_dir / "slurm" / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        parts.append(f"--- {log.name}\n" + "\n".join(t[:300] for t in text[-lines:]))
    return "\n".join(parts)


def queued(prefix: str) -> list[dict[str, str]]:
    """The run's jobs still in the queue: id, name, state, reason."""
    out = subprocess.run(
        ["squeue", "--noheader", "--format=%i|%j|%T|%r"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        job_id, name, state, reason = line.strip().split("|", 3)
        if name.startswith(f"{prefix}-"):
            jobs.append({"id": job_id, "name": name, "state": state, "reason": reason})
    return jobs


def wait_for_queue(prefix: str, run_dir: Path, timeout: float = RUN_TIMEOUT_S) -> None:
    """Wait until none of the run's jobs is queued; fail on a chain that can never finish."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = queued(prefix)
        if not jobs:
            return
        stuck = [j for j in jobs if j["reason"] == "DependencyNeverSatisfied"]
        if stuck and all(j["state"] == "PENDING" for j in jobs):
            subprocess.run(["scancel", *[j["id"].split("_")[0] for j in jobs]], check=False)
            pytest.fail(
                f"a job of the chain failed, the rest can never run: {jobs}\n{logs_tail(run_dir)}"
            )
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *[j["id"].split("_")[0] for j in jobs]], check=False)
            pytest.fail(f"jobs still queued after {timeout:.0f}s: {jobs}\n{logs_tail(run_dir)}")
        time.sleep(1)


def finished_jobs(cluster: Cluster, job_ids: set[str]) -> dict[str, dict[str, str]]:
    """Final jobcomp record of each job or array task of ``job_ids`` ("12" or "12_3")."""
    records: dict[str, dict[str, str]] = {}
    for line in cluster.jobcomp_log.read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        array_id, task_id = fields.get("ArrayJobId", "0"), fields.get("ArrayTaskId", "")
        if array_id not in ("", "0", "4294967294") and task_id not in ("", "4294967294"):
            if array_id in job_ids:
                records[f"{array_id}_{task_id}"] = fields  # the last record wins
        elif fields.get("JobId") in job_ids:
            records[fields["JobId"]] = fields
    return records


def assert_all_completed(cluster: Cluster, run_dir: Path) -> dict[str, dict[str, str]]:
    """Every job and array task the run recorded ended COMPLETED with exit code 0."""
    ids = {job_id for _, job_id in recorded_jobs(run_dir)}
    records = finished_jobs(cluster, ids)
    bad = {
        k: (r.get("JobState"), r.get("ExitCode"))
        for k, r in records.items()
        if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"
    }
    assert not bad, f"jobs did not complete: {bad}\n{logs_tail(run_dir)}"
    return records


# -- comparing outputs -----------------------------------------------------------------------
def implemented_stages() -> list[str]:
    """The stages, in order, up to the first one whose module does not exist yet."""
    stages = []
    for name in STAGE_NAMES:
        if importlib.util.find_spec(f"recaption.stages.{name}") is None:
            break
        stages.append(name)
    return stages


def _rows(folder: Path, pattern: str = "*.parquet") -> list[dict[str, Any]]:
    rows = []
    for path in sorted(folder.glob(pattern)):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: str(r["key"]))


LOOPBACK_URL = re.compile(r"http://127\.0\.0\.1:\d+/")


class _Close(float):
    """A score that equals another within one unit of its 4th decimal: the stages round
    scores to 4 decimals, and a last-bit difference (another thread count) can fall on either
    side of a rounding boundary (-13.24575 written as -13.2457 by one run, -13.2458 by the
    other)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (int, float)) and abs(self - other) <= 1.5e-4

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = float.__hash__


def _same(value: Any) -> Any:
    """``value`` without what differs by design between two runs of one config.

    Each run serves the demo world on its own free port; scores computed with another thread
    count may differ in the last bits (compared as :class:`_Close`).
    """
    if isinstance(value, float):
        return _Close(round(value, 4))
    if isinstance(value, str):
        return LOOPBACK_URL.sub("http://127.0.0.1/", value)
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same(v) for v in value]
    return value


def _rows_same(folder: Path) -> list[dict[str, Any]]:
    return [_same(row) for row in _rows(folder)]


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _shards(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"*{suffix}") if not p.name.startswith("."))


def image_keys(run_dir: Path) -> list[str]:
    """Keys of every downloaded image, over all shards."""
    keys = []
    for tar in sorted((run_dir / "images").glob("*.tar")):
        keys += [n.rsplit(".", 1)[0] for n in _tar_members(tar) if n.endswith(".jpg")]
    return sorted(keys)


def compare_stage(stage: str, local: Path, cluster_run: Path) -> None:
    """Assert that ``stage`` wrote the same outputs in both run directories."""
    if stage == "download":
        assert _shards(cluster_run / "images", ".tar") == _shards(local / "images", ".tar")
        for tar in _shards(local / "images", ".tar"):
            a = _tar_members(local / "images" / tar)
            b = _tar_members(cluster_run / "images" / tar)
            assert sorted(a) == sorted(b), f"images/{tar}: members differ"
            for name in a:
                if not name.endswith(".json"):
                    assert a[name] == b[name], f"images/{tar}: {name} differs"
        cols = ("key", "url", "status", "caption")
        assert [_same({c: r[c] for c in cols}) for r in _rows(cluster_run / "images")] == [
            _same({c: r[c] for c in cols}) for r in _rows(local / "images")
        ]
    elif stage == "caption":
        got = _rows(cluster_run / "captions")
        assert got, "no captions written"
        assert _same(got) == _same(_rows(local / "captions"))
        assert [r["key"] for r in got] == image_keys(local)
    elif stage == "filter":
        got = _rows_same(cluster_run / "filtered")
        assert got, "no filter decisions written"
        assert got == _rows_same(local / "filtered")
    elif stage == "merge":
        wds_local, wds_cluster = (
            local / "dataset" / "webdataset",
            cluster_run / "dataset" / "webdataset",
        )
        assert _shards(wds_cluster, ".tar") == _shards(wds_local, ".tar")
        for tar in _shards(wds_local, ".tar"):
            a, b = _tar_members(wds_local / tar), _tar_members(wds_cluster / tar)
            assert sorted(a) == sorted(b), f"dataset/webdataset/{tar}: members differ"
            for name in a:
                if name.endswith(".json"):
                    assert _same(json.loads(a[name])) == _same(json.loads(b[name])), name
                else:
                    assert a[name] == b[name], f"dataset/webdataset/{tar}: {name} differs"
        assert _rows_same(cluster_run / "dataset" / "parquet") == _rows_same(
            local / "dataset" / "parquet"
        )
        for name in ("README.md", "stats.json", "MANIFEST.sha256"):
            assert (cluster_run / "dataset" / name).is_file(), f"dataset/{name} missing"
        stats_a = json.loads((local / "dataset" / "stats.json").read_text())
        stats_b = json.loads((cluster_run / "dataset" / "stats.json").read_text())
        for key in ("n_samples", "shards", "filter"):
            assert _same(stats_b.get(key)) == _same(stats_a.get(key)), f"dataset/stats.json: {key}"
    elif stage == "train":
        a = json.loads((local / "koala" / "train_state.json").read_text())
        b = json.loads((cluster_run / "koala" / "train_state.json").read_text())
        assert (b["status"], b["step"], b["samples_seen"]) == (
            a["status"],
            a["step"],
            a["samples_seen"],
        )
        assert b["loss"] > 0 and b["loss"] == b["loss"], "training loss is not a finite number"
        # Same samples, same seeds, one torch thread (train.cpu_threads): the same loss,
        # although img2dataset orders each tar's members differently in the two runs.
        for term in ("loss", "loss_task", "loss_out_kd", "loss_feat_kd"):
            assert b[term] == pytest.approx(a[term], rel=1e-6), term
        files_a = sorted(
            str(p.relative_to(local)) for p in (local / "koala" / "pipeline").rglob("*")
        )
        files_b = sorted(
            str(p.relative_to(cluster_run)) for p in (cluster_run / "koala" / "pipeline").rglob("*")
        )
        assert files_b == files_a
    elif stage == "sample":
        a = sorted(p.name for p in (local / "samples").glob("*.png"))
        b = sorted(p.name for p in (cluster_run / "samples").glob("*.png"))
        assert a, "the local run wrote no samples"
        assert b == a
    else:  # pragma: no cover - a new stage needs its comparison here
        raise AssertionError(f"no comparison for stage {stage}")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def models_dir(work: Path) -> Path:
    """One folder of tiny demo models shared by every run, so model paths match."""
    return work / "models"


@pytest.fixture(scope="module")
def stages() -> list[str]:
    found = implemented_stages()
    assert found[:1] == ["download"], "recaption.stages.download is missing"
    return found


@dataclass
class Runs:
    """The demo world run twice: locally and through jobs/submit.sh on the cluster."""

    local: Path
    cluster: Path
    prefix: str
    records: dict[str, dict[str, str]]
    local_log: str


@pytest.fixture(scope="module")
def runs(cluster: Cluster, work: Path, models_dir: Path, stages: list[str]) -> Iterator[Runs]:
    """Submit the chain, and meanwhile run the same config locally; wait for both."""
    overrides = [*DEMO_OVERRIDES, f"demo.models_dir={models_dir}"]
    local, cluster_run = work / "local", work / "cluster"
    prefix = f"rct-{uuid.uuid4().hex[:6]}"
    submitted = submit(cluster_run, overrides, "--to", stages[-1], prefix=prefix)
    assert submitted.returncode == 0, submitted.stderr
    local_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recaption",
            "run",
            str(DEMO_CONFIG),
            f"run_dir={local}",
            *overrides,
            "--to",
            stages[-1],
        ],
        cwd=REPO,
        env=_env(prefix),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_queue(prefix, cluster_run)
        local_log, _ = local_proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if local_proc.poll() is None:
            local_proc.kill()
    assert local_proc.returncode == 0, f"local run failed:\n{local_log[-5000:]}"
    records = assert_all_completed(cluster, cluster_run)
    yield Runs(local, cluster_run, prefix, records, local_log)


# -- tests -----------------------------------------------------------------------------------
def test_chain_submits_every_stage_with_arrays_sized_from_the_shards(
    runs: Runs, stages: list[str]
) -> None:
    jobs = recorded_jobs(runs.cluster)
    assert [stage for stage, _ in jobs] == ["download", "plan", *stages[1:]]
    table = (runs.cluster / "slurm" / "jobs.tsv").read_text().splitlines()
    arrays = {line.split("\t")[0]: line.split("\t")[2] for line in table}
    n_shards = len(_shards(runs.cluster / "images", ".tar"))
    assert n_shards == 4
    # Two shards per task: two tasks, both allowed to run at once.
    for stage in {"caption", "filter", "merge"} & set(stages):
        assert arrays[stage] == "0-1%2", stage
    # Every array task ran: 2 tasks for each array stage.
    for stage, job_id in jobs:
        if stage in {"caption", "filter", "merge"}:
            assert {f"{job_id}_0", f"{job_id}_1"} <= set(runs.records), stage
    # plan waited for download; the plan submitted caption once the shards existed, and each
    # later stage waits for the one before it.
    deps = {line.split("\t")[0]: line.split("\t")[3] for line in table}
    ids = {line.split("\t")[0]: line.split("\t")[1] for line in table}
    assert deps["download"] == "-" and deps["plan"] == ids["download"]
    assert deps["caption"] == "-"
    for before, after in itertools.pairwise(stages[1:]):
        assert deps[after] == ids[before], after


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_cluster_outputs_equal_a_local_run(runs: Runs, stages: list[str], stage: str) -> None:
    if stage not in stages:
        pytest.fail(f"recaption.stages.{stage} does not exist yet; the chain stopped before it")
    compare_stage(stage, runs.local, runs.cluster)


def _wait_for(predicate: Any, timeout: float, what: str, run_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{logs_tail(run_dir)}")
        time.sleep(0.05)


def _caption_run(runs: Runs, work: Path, name: str) -> Path:
    """A new run directory holding the cluster run's downloaded images, nothing else."""
    run_dir = work / name
    shutil.copytree(runs.cluster / "images", run_dir / "images")
    return run_dir


def _array_task_of_rank(run_dir: Path, rank: int) -> str:
    caption_job = dict(recorded_jobs(run_dir))["caption"]
    return f"{caption_job}_{rank}"


# One image per batch: a shard takes seconds, with a stop check between images.
SLOW_CAPTIONS = ["caption.batch_size=1"]


def _stop_task_mid_shard(runs: Runs, work: Path, name: str, stop: list[str], to: str) -> Path:
    """Submit caption (..`to`), stop array task 0 with ``stop`` right after its first shard."""
    run_dir = _caption_run(runs, work, name)
    prefix = f"{runs.prefix}-{name}"
    overrides = [*DEMO_OVERRIDES, f"demo.models_dir={work / 'models'}", *SLOW_CAPTIONS]
    submitted = submit(run_dir, overrides, "--from", "caption", "--to", to, prefix=prefix)
    assert submitted.returncode == 0, submitted.stderr
    # Task 0 owns shards 00000 and 00002: once 00000 is done it is inside 00002.
    captions = run_dir / "captions"
    _wait_for(lambda: (captions / "00000_stats.json").exists(), 120, "shard 00000", run_dir)
    task = _array_task_of_rank(run_dir, 0)
    subprocess.run([*stop, task], check=True, timeout=30)
    assert not (captions / "00002_stats.json").exists(), "shard 00002 finished before the stop"
    return run_dir


def _assert_captions_complete_once(run_dir: Path) -> None:
    rows = _rows(run_dir / "captions")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was captioned twice"
    assert keys == image_keys(run_dir), "captions and downloaded images differ (a gap)"
    assert all(r["status"] == "ok" for r in rows)
    assert _shards(run_dir / "captions", ".parquet") == [f"{i:05d}.parquet" for i in range(4)]


def test_scancel_mid_shard_then_requeue_leaves_no_duplicate_and_no_gap(
    cluster: Cluster, runs: Runs, work: Path
) -> None:
    run_dir = _stop_task_mid_shard(runs, work, "scancel", ["scancel"], to="caption")
    prefix = f"{runs.prefix}-scancel"
    task = _array_task_of_rank(run_dir, 0)
    # Wait until the cancelled task has left the queue, then requeue it by hand.
    _wait_for(
        lambda: not any(j["id"] == task for j in queued(prefix)), 60, f"{task} to stop", run_dir
    )
    done_before = (run_dir / "captions" / "00000_stats.json").read_text()
    subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)
    wait_for_queue(prefix, run_dir)
    text = "\n".join(
        p.read_text(errors="replace") for p in (run_dir / "slurm" / "logs").glob(f"*-{task}.log")
    )
    assert "restart 1" in text, "the task did not run again after the requeue"
    states = finished_jobs(cluster, {task.split("_")[0]})
    assert states[task]["JobState"] == "COMPLETED", logs_tail(run_dir)
    # The shard finished before the cancel was not redone; the one in progress was redone.
    assert (run_dir / "captions" / "00000_stats.json").read_text() == done_before
    _assert_captions_complete_once(run_dir)
    # The cancel landed inside shard 00002: the first run of the task never finished it.
    first_run = text.split("restart 1", 1)[0]
    assert "shard 00002 done" not in first_run, "the cancel did not land mid-shard"


def test_time_limit_signal_requeues_the_task_and_the_chain_goes_on(
    cluster: Cluster, runs: Runs, work: Path, stages: list[str]
) -> None:
    assert "filter" in stages, "recaption.stages.filter is missing"
    # What SLURM sends RECAPTION_SIGNAL_LEAD seconds before the time limit (--signal=B:USR1@N).
    run_dir = _stop_task_mid_shard(
        runs, work, "usr1", ["scancel", "--signal=USR1", "--batch"], to="filter"
    )
    prefix = f"{runs.prefix}-usr1"
    wait_for_queue(prefix, run_dir)
    task = _array_task_of_rank(run_dir, 0)
    text = "\n".join(
        p.read_text(errors="replace") for p in (run_dir / "slurm" / "logs").glob(f"*-{task}.log")
    )
    assert "got SIGUSR1" in text and f"requeueing {task}" in text, logs_tail(run_dir)
    assert "shard 00002 abandoned" in text, "the stop did not land mid-shard"
    assert "restart 1" in text, "the task did not run again after requeueing itself"
    assert_all_completed(cluster, run_dir)
    _assert_captions_complete_once(run_dir)
    # The filter array, chained with afterok, still ran after the requeue.
    assert _shards(run_dir / "filtered", "_stats.json") == [f"{i:05d}_stats.json" for i in range(4)]


def test_arrays_stay_under_max_array_size(cluster: Cluster, work: Path) -> None:
    run_dir = work / "many-shards"
    (run_dir / "images").mkdir(parents=True)
    n = cluster.max_array_size * 2 + 7
    for i in range(n):
        (run_dir / "images" / f"{i:06d}.tar").touch()
    result = submit(
        run_dir,
        [],
        "--from",
        "caption",
        "--to",
        "merge",
        "--dry-run",
        prefix="rct-dry",
        RECAPTION_CPU_ONLY="0",
        RECAPTION_CAPTION_SHARDS_PER_TASK="1",
        RECAPTION_FILTER_SHARDS_PER_TASK="8",
        RECAPTION_MERGE_SHARDS_PER_TASK="4",
        RECAPTION_MERGE_MAX_RUNNING="5",
        RECAPTION_PARTITION="gpu",
        RECAPTION_CPU_PARTITION="cpu",
        RECAPTION_ACCOUNT="proj42",
        RECAPTION_CAPTION_TIME="4:00:00",
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 3
    caption, filter_, merge = lines
    top = cluster.max_array_size - 1
    assert f"--array=0-{top}%64" in caption  # capped: indices stay below MaxArraySize
    assert f"--array=0-{-(-n // 8) - 1}%32" in filter_
    assert f"--array=0-{-(-n // 4) - 1}%5" in merge
    assert "--gres=gpu:1" in caption and "--partition=gpu" in caption
    assert "--time=4:00:00" in caption and "--account=proj42" in caption
    assert "--partition=cpu" in filter_ and "--gres" not in filter_
    assert "--dependency=afterok:DRYRUN-caption" in filter_
    assert "--dependency=afterok:DRYRUN-filter" in merge
    assert not (run_dir / "slurm" / "jobs.tsv").exists(), "a dry run recorded jobs"


def test_bad_config_is_refused_before_anything_is_queued(work: Path, cluster: Cluster) -> None:
    run_dir = work / "bad"
    result = submit(run_dir, ["caption.batch_sise=4"], prefix="rct-bad")
    assert result.returncode == 2
    assert "batch_sise" in result.stderr and "batch_size" in result.stderr
    assert not (run_dir / "slurm" / "jobs.tsv").exists()
    assert not queued("rct-bad")


# -- real-run readiness: failed shards, CPUs per task, a checkpoint that takes long -----------
@pytest.fixture(scope="module")
def merged(work: Path, models_dir: Path) -> Path:
    """The demo run, downloaded, captioned, filtered and merged locally (no cluster)."""
    run_dir = work / "merged"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recaption",
            "run",
            str(DEMO_CONFIG),
            f"run_dir={run_dir}",
            *DEMO_OVERRIDES,
            f"demo.models_dir={models_dir}",
            "--to",
            "merge",
        ],
        cwd=REPO,
        env=_env("rct-merged"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir


def _job_log(run_dir: Path, stage: str, task: str | None = None) -> str:
    """Every log of the run's ``stage`` jobs (or of one array task ``"_1"``), concatenated."""
    job_ids = [job_id for name, job_id in recorded_jobs(run_dir) if name == stage]
    texts = []
    for job_id in job_ids:
        pattern = f"*-{job_id}{task or ''}.log" if task else f"*-{job_id}*.log"
        texts += [
            p.read_text(errors="replace")
            for p in sorted((run_dir / "slurm" / "logs").glob(pattern))
        ]
    return "\n".join(texts)


def _wait_until_settled(prefix: str, timeout: float = RUN_TIMEOUT_S) -> list[dict[str, str]]:
    """Wait until no job of the run runs; cancel and return those that can never run."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = queued(prefix)
        if all(j["reason"] == "DependencyNeverSatisfied" for j in jobs):
            if jobs:
                subprocess.run(["scancel", *[j["id"].split("_")[0] for j in jobs]], check=False)
            return jobs
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *[j["id"].split("_")[0] for j in jobs]], check=False)
            pytest.fail(f"jobs still queued after {timeout:.0f}s: {jobs}")
        time.sleep(1)


def _truncate_inside_a_member(tar: Path) -> None:
    """Cut ``tar`` in the middle of its data, as a download killed mid-write leaves it."""
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])


@dataclass
class FailedShardRun:
    """A chain caption → merge over four image shards, one of them a truncated tar."""

    run_dir: Path
    prefix: str
    overrides: list[str]


@pytest.fixture(scope="module")
def failed_shard_run(cluster: Cluster, merged: Path, work: Path) -> FailedShardRun:
    run_dir = work / "truncated"
    shutil.copytree(merged / "images", run_dir / "images")
    _truncate_inside_a_member(run_dir / "images" / "00003.tar")
    prefix = f"rct-{uuid.uuid4().hex[:6]}-trunc"
    overrides = [*DEMO_OVERRIDES, f"demo.models_dir={work / 'models'}"]
    submitted = submit(
        run_dir,
        [*overrides, "merge.min_done_fraction=0.7"],
        "--from",
        "caption",
        "--to",
        "merge",
        prefix=prefix,
        RECAPTION_MAX_RETRIES="1",
    )
    assert submitted.returncode == 0, submitted.stderr
    stuck = _wait_until_settled(prefix)
    assert not stuck, f"the chain stopped: {stuck}\n{logs_tail(run_dir)}"
    return FailedShardRun(run_dir, prefix, overrides)


def test_a_failed_shard_is_retried_then_left_out_and_the_chain_goes_on(
    cluster: Cluster, failed_shard_run: FailedShardRun
) -> None:
    run_dir = failed_shard_run.run_dir
    # Every job ends COMPLETED: the caption task that kept failing gave its shard up (exit 0).
    assert_all_completed(cluster, run_dir)
    # Task 1 owns shards 00001 and 00003: it failed 00003, requeued itself once, failed it
    # again and gave it up.
    caption_log = _job_log(run_dir, "caption", "_1")
    assert "retry 1 of 1 after failed shard(s)" in caption_log, caption_log[-3000:]
    assert "restart 1" in caption_log
    assert "giving up on caption shard(s) 00003" in caption_log
    assert "retry 2 of" not in caption_log
    # The next stage says what it goes on without; filter and merge cover the other shards.
    assert "going on without 1 caption shard(s) that failed (00003)" in _job_log(run_dir, "filter")
    assert _shards(run_dir / "filtered", "_stats.json") == [f"{i:05d}_stats.json" for i in range(3)]
    assert _shards(run_dir / "dataset" / "webdataset", ".tar") == [f"{i:05d}.tar" for i in range(3)]
    # `recaption status` and the dataset card list the shard left out.
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "recaption",
            "status",
            str(DEMO_CONFIG),
            f"run_dir={run_dir}",
            *failed_shard_run.overrides,
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(status.stdout)
    assert list(report["stages"]["caption"]["failed"]) == ["00003"]
    card = (run_dir / "dataset" / "README.md").read_text()
    assert "00003" in card.split("Failed shards (left out):", 1)[1].splitlines()[0]


def test_too_few_shards_through_stop_the_chain_with_a_message(
    cluster: Cluster, failed_shard_run: FailedShardRun, work: Path
) -> None:
    # The same run state (caption 00003 failed for good), now asking for 90% of the shards.
    run_dir = work / "truncated-strict"
    shutil.copytree(failed_shard_run.run_dir / "images", run_dir / "images")
    shutil.copytree(failed_shard_run.run_dir / "captions", run_dir / "captions")
    prefix = f"{failed_shard_run.prefix}-strict"
    submitted = submit(
        run_dir,
        [*failed_shard_run.overrides, "merge.min_done_fraction=0.9"],
        "--from",
        "filter",
        "--to",
        "merge",
        prefix=prefix,
    )
    assert submitted.returncode == 0, submitted.stderr
    stuck = _wait_until_settled(prefix)
    # The filter tasks refused to start (exit 2), so merge can never run.
    assert [j["name"] for j in stuck] == [f"{prefix}-merge"], stuck
    filter_log = _job_log(run_dir, "filter")
    assert (
        "filter: refusing to start: caption brought 3 of the run's 4 shard(s) through (75.0%), "
        "below merge.min_done_fraction = 0.9" in filter_log
    ), filter_log[-3000:]
    assert "Shards left out by caption: 00003" in filter_log
    filter_job = dict(recorded_jobs(run_dir))["filter"]
    records = finished_jobs(cluster, {filter_job})
    assert records and all(r["ExitCode"] == "2:0" for r in records.values()), records
    assert not (run_dir / "filtered").exists() or not _shards(run_dir / "filtered", "_stats.json")


# A checkpoint that takes longer than torch.distributed.run's 30 s default shutdown timeout.
SLOW_SAVE_S = 45
SLOW_SAVE_HOOK = '''\
"""Test hook: make Accelerator.save_state sleep first, in the first run of a job only.

Put on PYTHONPATH by tests/jobs; RECAPTION_TEST_SLOW_SAVE_S seconds. Chains to any other
sitecustomize on sys.path.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    if os.path.abspath(_entry or ".") == _here:
        continue
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [_entry])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
        break

_delay = float(os.environ.get("RECAPTION_TEST_SLOW_SAVE_S", "0") or 0)


class _SlowSave(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "accelerate.accelerator":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            original = module.Accelerator.save_state

            def save_state(self, *args, **kwargs):
                print(f"slow save: sleeping {_delay:g} s", file=sys.stderr, flush=True)
                time.sleep(_delay)
                return original(self, *args, **kwargs)

            module.Accelerator.save_state = save_state

        spec.loader.exec_module = exec_module
        return spec


if _delay and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.meta_path.insert(0, _SlowSave())
'''


def test_train_stop_gives_a_slow_checkpoint_its_time_on_every_cpu(
    cluster: Cluster, merged: Path, work: Path
) -> None:
    """The time-limit signal reaches the training processes, which save a checkpoint that
    takes longer than the launcher's 30 s default; the requeued job resumes from it. Each
    launcher task runs on the job's two CPUs (the cluster binds tasks to cores)."""
    run_dir = work / "slow-save"
    shutil.copytree(merged, run_dir, ignore=shutil.ignore_patterns("koala", "samples", "slurm"))
    hook = work / "slow-save-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE_HOOK)
    prefix = f"rct-{uuid.uuid4().hex[:6]}-slowsave"
    max_steps = 40
    submitted = submit(
        run_dir,
        [
            *DEMO_OVERRIDES,
            f"demo.models_dir={work / 'models'}",
            f"train.max_steps={max_steps}",
            "train.log_every=1",
            "train.checkpointing_steps=1000",
        ],
        "--from",
        "train",
        "--to",
        "train",
        prefix=prefix,
        RECAPTION_TRAIN_PROCS_PER_NODE="2",
        RECAPTION_TRAIN_CPUS="2",
        RECAPTION_TEST_SLOW_SAVE_S=str(SLOW_SAVE_S),
        PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
    )
    assert submitted.returncode == 0, submitted.stderr
    train_log = run_dir / "koala" / "train_log.jsonl"
    _wait_for(
        lambda: train_log.exists() and train_log.read_text().strip(),
        RUN_TIMEOUT_S,
        "the first training step",
        run_dir,
    )
    job = dict(recorded_jobs(run_dir))["train"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    wait_for_queue(prefix, run_dir, timeout=RUN_TIMEOUT_S + SLOW_SAVE_S)
    log = _job_log(run_dir, "train")
    first, _, resumed = log.partition("restart 1")
    assert "got SIGUSR1" in first and f"requeueing {job}" in first, log[-4000:]
    assert f"slow save: sleeping {SLOW_SAVE_S}" in first, log[-4000:]
    # The launcher waited for the save instead of killing the processes after 30 s.
    assert "launcher shutdown timeout 300s" in first
    assert "forcefully exiting via" not in first, first[-4000:]
    assert re.search(r"resuming from checkpoint-0*[1-9]\d* at step [1-9]", resumed), resumed[-4000:]
    state = json.loads((run_dir / "koala" / "train_state.json").read_text())
    assert (state["status"], state["step"]) == ("finished", max_steps)
    assert finished_jobs(cluster, {job})[job]["JobState"] == "COMPLETED"
    # The node's launcher task ran on both CPUs of the job, not on one bound core.
    assert "task on" in log and "2 CPU(s) usable" in log, log[-4000:]
    assert "1 CPU(s) usable" not in log
