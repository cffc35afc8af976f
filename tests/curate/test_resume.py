"""Resume after SIGKILL in both stages, and a truncated image tar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.publish import verify_dataset
from recaption.stages import StageContext
from recaption.stages import run as run_stage

# The worker holds still right after shard 00000's done marker, so it is killed with shard
# 00001 unstarted; the test also leaves a half-written temporary, as a kill mid-write would.
WORKER = """
import sys, time
from pathlib import Path
from recaption.ledger import ShardLedger
mark_done = ShardLedger.mark_done
def mark_done_then_hold(self, shard, stats):
    out = mark_done(self, shard, stats)
    Path(sys.argv[3]).write_text(shard)
    time.sleep(120)
    return out
ShardLedger.mark_done = mark_done_then_hold
from recaption.cli import main
sys.exit(main([sys.argv[1], sys.argv[2]]))
"""


def _kill_after_first_shard(stage: str, config_path: Path, tmp_path: Path) -> None:
    flag = tmp_path / f"{stage}.flag"
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, stage, str(config_path), str(flag)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not flag.exists():
            assert proc.poll() is None, f"{stage} worker exited early ({proc.returncode})"
            assert time.monotonic() < deadline, f"{stage} worker never finished a shard"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_filter_resumes_after_sigkill(run_inputs, tmp_path):
    config, shards = run_inputs
    _kill_after_first_shard("filter", config.source, tmp_path)
    out = config.filtered_dir
    assert (out / "00000_stats.json").exists() and not (out / "00001_stats.json").exists()
    (out / ".00001.parquet.tmp-99999").write_bytes(b"PAR1 half a file")
    before = (out / "00000.parquet").stat().st_mtime_ns

    summary = run_stage("filter", StageContext(config))
    assert summary.shards_ok == ["00001"] and summary.shards_done_before == 1
    assert (out / "00000.parquet").stat().st_mtime_ns == before  # not redone
    assert not list(out.glob(".00001*"))
    for shard, samples in shards.items():
        assert pq.read_table(out / f"{shard}.parquet").num_rows == len(samples)


def test_merge_resumes_after_sigkill(run_inputs, tmp_path):
    config, shards = run_inputs
    assert run_stage("filter", StageContext(config)).ok
    _kill_after_first_shard("merge", config.source, tmp_path)
    wds_dir = config.dataset_dir / "webdataset"
    assert (wds_dir / "00000_stats.json").exists() and not (wds_dir / "00001_stats.json").exists()
    assert not (config.dataset_dir / "MANIFEST.sha256").exists()
    (wds_dir / ".00001.tar.tmp-99999").write_bytes(b"half a tar")

    assert main(["merge", str(config.source)]) == 0
    assert not list(wds_dir.glob(".00001*"))
    assert verify_dataset(config) == []
    stats = json.loads((config.dataset_dir / "stats.json").read_text())
    assert stats["merge"]["n_input"] == sum(len(s) for s in shards.values())
    assert stats["merge"]["n_ok"] == stats["filter"]["n_kept"]


@pytest.mark.parametrize("where", ["middle", "last member", "between samples"])
def test_truncated_image_tar_fails_that_shard_only(run_inputs, where):
    config, _ = run_inputs
    assert run_stage("filter", StageContext(config)).ok
    tar = config.images_dir / "00000.tar"
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
    last = members[-1]
    data = tar.read_bytes()
    if where == "middle":
        cut = len(data) // 2
    elif where == "last member":
        cut = last.offset_data + last.size // 2
    else:  # a valid tar without its last sample nor end-of-archive blocks
        last_key = last.name.split(".")[0]
        cut = next(m.offset for m in members if m.name.split(".")[0] == last_key)
    tar.write_bytes(data[:cut])
    assert main(["merge", str(config.source)]) == 1
    failure = json.loads(
        (config.dataset_dir / "webdataset" / "_ledger" / "00000_failed.json").read_text()
    )
    assert "00000.tar" in failure["error"] and "recaption download" in failure["error"]
    assert (config.dataset_dir / "webdataset" / "00001_stats.json").exists()
    assert not (config.dataset_dir / "webdataset" / "00000.tar").exists()
