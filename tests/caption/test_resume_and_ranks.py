"""Crash-resume and multi-process runs of ``recaption caption`` give single-run outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.caption.conftest import cli_env

SHARDS = {"00000": 6, "00001": 6, "00002": 6, "00003": 5}
SETTINGS = {"batch_size": 3, "max_new_tokens": 8, "num_workers": 1}


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "recaption", "caption", str(config), *args]


@pytest.fixture(scope="module")
def make_run(tmp_path_factory, shard_writer, samples, make_config):
    """``make_run(name)``: a run folder with the same four shards and config every time."""

    def make(name: str) -> tuple[Path, Path]:
        run_dir = tmp_path_factory.mktemp(name)
        for i, (shard, n) in enumerate(SHARDS.items()):
            shard_writer(run_dir / "images", shard, samples(10 + i, n))
        return run_dir, make_config(run_dir, **SETTINGS)

    return make


@pytest.fixture(scope="module")
def reference(make_run, caption_stage, captions_of):
    """Captions of one uninterrupted single-process run."""
    run_dir, config = make_run("reference")
    assert caption_stage(config).ok
    captions = captions_of(run_dir)
    assert sorted(captions) == sorted(SHARDS)
    return captions


def _stats(run_dir: Path, shard: str) -> dict:
    return json.loads((run_dir / "captions" / f"{shard}_stats.json").read_text())


def _interrupt_after(config: Path, marker: Path, sig: signal.Signals) -> int:
    """Start the stage, send ``sig`` to its process group once ``marker`` appears."""
    proc = subprocess.Popen(
        _cli(config, "-q"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the DataLoader worker gets it too
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the run ended before the awaited shard was done"
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, sig)  # the next shard is under way
    finally:
        proc.wait(timeout=120)
    return proc.returncode


def test_sigterm_then_sigkill_mid_shard_then_rerun_equals_an_uninterrupted_run(
    make_run, reference, captions_of
) -> None:
    run_dir, config = make_run("killed")
    captions = run_dir / "captions"

    # SIGTERM (SLURM preemption), as SLURM sends it: to every process of the job step.
    code = _interrupt_after(config, captions / "00000_stats.json", signal.SIGTERM)
    assert code == 3  # interrupted: rerun to finish
    assert sorted(captions_of(run_dir)) == ["00000"]
    assert not (captions / "_ledger" / "00001_failed.json").exists()  # abandoned, not failed

    # SIGKILL (a crash): nothing can be cleaned up.
    code = _interrupt_after(config, captions / "00001_stats.json", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert sorted(captions_of(run_dir)) == ["00000", "00001"]

    rerun = subprocess.run(_cli(config, "-q"), env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = captions_of(run_dir)
    assert after == reference
    for shard, rows in after.items():
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == SHARDS[shard]
    leftovers = [p.name for p in captions.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_two_ranks_by_option_together_equal_one_process(make_run, reference, captions_of) -> None:
    run_dir, config = make_run("ranks")
    procs = [
        subprocess.Popen(
            _cli(config, "-q", "--rank", str(rank), "--world-size", "2"),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert captions_of(run_dir) == reference
    for i, shard in enumerate(sorted(SHARDS)):
        stats = _stats(run_dir, shard)
        assert (stats["rank"], stats["world_size"]) == (i % 2, 2)


def test_torchrun_two_cpu_processes_equal_one_process(make_run, reference, captions_of) -> None:
    run_dir, config = make_run("torchrun")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # the `torchrun` console script
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "recaption",
        "caption",
        str(config),
        "-q",
    ]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert captions_of(run_dir) == reference
    ranks = [_stats(run_dir, shard)["rank"] for shard in sorted(SHARDS)]
    assert ranks == [0, 1, 0, 1]
    assert all(_stats(run_dir, s)["world_size"] == 2 for s in SHARDS)


def test_done_shard_with_a_truncated_parquet_is_captioned_again(
    make_run, reference, captions_of
) -> None:
    run_dir, config = make_run("truncated")
    assert subprocess.run(_cli(config, "-q"), env=cli_env(), check=False).returncode == 0
    parquet = run_dir / "captions" / "00001.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])  # cut short; its done marker stays
    status = subprocess.run(
        [*_cli(config)[:3], "status", str(config)], env=cli_env(), capture_output=True, text=True
    )
    assert "00001.parquet is unreadable" in status.stdout
    rerun = subprocess.run(_cli(config), env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 shard(s) done now" in rerun.stderr
    assert captions_of(run_dir) == reference


def test_kill_mid_shard_resumes_after_the_last_saved_batch(make_run, reference, captions_of):
    run_dir, config = make_run("parts")
    every_batch = "caption.checkpoint_every_batches=1"
    parts = run_dir / "captions" / "_parts"
    proc = subprocess.Popen(
        _cli(config, every_batch, "-q"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("00001-*/part-000000.parquet")):
            assert proc.poll() is None, "the run ended before shard 00001 saved a batch"
            assert time.monotonic() < deadline, "no batch of shard 00001 saved within 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-shard: its second batch is under way
    finally:
        proc.wait(timeout=120)
    assert not (run_dir / "captions" / "00001_stats.json").exists()

    rerun = subprocess.run(_cli(config, every_batch), env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "shard 00001 resumes after 1 saved batch(es) (3 rows)" in rerun.stderr
    assert _stats(run_dir, "00001")["n_resumed"] == 3  # only the other 3 images captioned again
    assert captions_of(run_dir) == reference
    assert not list(parts.iterdir())  # parts go once the shard's file is written
