"""`recaption status`: failure records with their errors, unreadable markers named."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recaption.cli import main
from recaption.config import load_config
from recaption.ledger import ShardLedger
from recaption.status import collect_status, format_status

ERROR = "OSError: truncated tar member 00003/000000031.jpg"


def _img2dataset_marker(folder: Path, shard: str, successes: int, count: int) -> None:
    with tarfile.open(folder / f"{shard}.tar", "w"):
        pass
    (folder / f"{shard}_stats.json").write_text(
        json.dumps({"count": count, "successes": successes, "duration": 2.0})
    )


@pytest.fixture
def run(tmp_path: Path, make_config) -> tuple[Path, Path]:
    """A run directory by hand: 3 downloaded shards, caption shard 00001 done, 00002 failed."""
    run_dir = tmp_path / "run"
    config_path = make_config(tmp_path / "run.yaml", run_dir)
    config = load_config(config_path)
    images = config.images_dir
    images.mkdir(parents=True)
    for shard in ("00000", "00001", "00002"):
        _img2dataset_marker(images, shard, successes=8, count=10)
    ledger = ShardLedger("caption", config.captions_dir, {"model": "m"})
    ledger.prepare()
    pq.write_table(pa.table({"key": ["a"]}), config.captions_dir / "00001.parquet")
    ledger.mark_done("00001", {"n_ok": 8, "n_failed": 0, "seconds": 1.0})
    ledger.mark_failed("00002", ERROR)
    return config_path, run_dir


def test_failed_shard_shows_its_error_in_the_table(run: tuple[Path, Path]) -> None:
    config_path, _ = run
    report = collect_status(load_config(config_path))
    caption = report["stages"]["caption"]
    assert caption["shards_failed"] == 1
    assert caption["failed"] == {"00002": ERROR}
    assert f"failed caption shard 00002: {ERROR}" in format_status(report)


def test_failed_shard_shows_its_error_in_json(run: tuple[Path, Path], capsys) -> None:
    config_path, _ = run
    assert main(["status", str(config_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"]["caption"]["failed"] == {"00002": ERROR}


def test_garbled_marker_is_reported_not_counted_as_zero(run: tuple[Path, Path], capsys) -> None:
    config_path, run_dir = run
    (run_dir / "images" / "00001_stats.json").write_text('{"count": 10, "succ')
    report = collect_status(load_config(config_path))
    download = report["stages"]["download"]
    assert download["shards_done"] == 2 and download["samples_ok"] == 16
    assert download["shards_unreadable"] == 1
    problem = download["unreadable"]["00001"]
    assert "images/00001_stats.json" in problem and "not valid JSON" in problem
    table = format_status(report)
    assert "unreadable download marker of shard 00001: images/00001_stats.json" in table

    assert main(["status", str(config_path), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert "images/00001_stats.json" in as_json["stages"]["download"]["unreadable"]["00001"]


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00garbage", b"[1, 2]", b'{"count": "many", "successes": 3}']
)
def test_marker_that_is_not_a_stats_object_is_unreadable(
    run: tuple[Path, Path], content: bytes
) -> None:
    config_path, run_dir = run
    (run_dir / "images" / "00000_stats.json").write_bytes(content)
    download = collect_status(load_config(config_path))["stages"]["download"]
    assert list(download["unreadable"]) == ["00000"]
    assert download["shards_done"] == 2


def test_done_shard_whose_output_is_unreadable_is_reported(run: tuple[Path, Path]) -> None:
    config_path, run_dir = run
    parquet = run_dir / "captions" / "00001.parquet"
    parquet.write_bytes(parquet.read_bytes()[:20])  # truncated, its done marker still there
    report = collect_status(load_config(config_path))
    caption = report["stages"]["caption"]
    assert caption["shards_done"] == 0 and caption["samples_ok"] == 0
    assert "00001.parquet is unreadable" in caption["unreadable"]["00001"]
    assert "rerun `recaption caption`" in format_status(report)
