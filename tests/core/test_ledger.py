"""The shard ledger on its own: assignment, markers, failures, config changes, stopping."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from recaption.distributed import resolve_rank
from recaption.ledger import (
    ConfigMismatchError,
    ShardLedger,
    StopRequested,
    assign,
    atomic_path,
    marker_digest,
)

SHARDS = [f"{i:05d}" for i in range(23)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 23, 40])
def test_assignment_covers_every_shard_exactly_once(world_size: int) -> None:
    owned = [s for rank in range(world_size) for s in assign(SHARDS, rank, world_size)]
    assert sorted(owned) == SHARDS
    assert len(owned) == len(set(owned))


def _writer(ledger: ShardLedger, seen: list[str]):
    def process(shard: str) -> dict:
        seen.append(shard)
        with atomic_path(ledger.output_path(shard, ".txt")) as tmp:
            tmp.write_text(shard)
        return {"n_input": 2, "n_ok": 2, "n_failed": 0}

    return process


def test_ranks_together_do_every_shard_once(tmp_path: Path) -> None:
    seen: list[str] = []
    for rank in range(3):
        ledger = ShardLedger("demo", tmp_path, {"a": 1})
        ledger.prepare()
        ledger.run(SHARDS, _writer(ledger, seen), rank=rank, world_size=3)
    assert sorted(seen) == SHARDS
    again: list[str] = []
    summary = ShardLedger("demo", tmp_path, {"a": 1}).run(SHARDS, _writer(ledger, again))
    assert again == [] and summary.shards_done_before == len(SHARDS)


def test_shard_without_marker_is_redone(tmp_path: Path) -> None:
    ledger = ShardLedger("demo", tmp_path, {"a": 1})
    ledger.prepare()
    ledger.run(SHARDS[:3], _writer(ledger, []))
    # A worker that died after writing its output but before the marker:
    ledger.marker_path(SHARDS[1]).unlink()
    (tmp_path / f".{SHARDS[1]}.txt.tmp-999").write_text("half")
    seen: list[str] = []
    ledger.run(SHARDS[:3], _writer(ledger, seen))
    assert seen == [SHARDS[1]]
    assert not list(tmp_path.glob(".*tmp-*"))


def test_failed_shard_is_recorded_and_others_go_on(tmp_path: Path) -> None:
    ledger = ShardLedger("demo", tmp_path, {"a": 1})
    ledger.prepare()
    ok = _writer(ledger, [])

    def process(shard: str) -> dict:
        if shard == SHARDS[1]:
            raise OSError("truncated tar")
        return ok(shard)

    summary = ledger.run(SHARDS[:3], process)
    assert summary.shards_ok == [SHARDS[0], SHARDS[2]]
    assert "truncated tar" in summary.shards_failed[SHARDS[1]]
    assert "truncated tar" in ledger.failed_shards()[SHARDS[1]]
    assert not summary.ok
    assert not ledger.output_path(SHARDS[1], ".txt").exists()
    # Fixed input: the rerun does only the failed shard and clears its failure record.
    summary = ledger.run(SHARDS[:3], ok)
    assert summary.shards_ok == [SHARDS[1]] and ledger.failed_shards() == {}


def test_changed_config_is_refused_naming_keys(tmp_path: Path) -> None:
    first = ShardLedger("caption", tmp_path, {"model": "a", "max_new_tokens": 8})
    first.prepare()
    first.run(SHARDS[:2], _writer(first, []))
    second = ShardLedger("caption", tmp_path, {"model": "b", "max_new_tokens": 8})
    with pytest.raises(ConfigMismatchError, match=r"caption\.model") as err:
        second.prepare()
    assert "max_new_tokens" not in str(err.value)
    forced = ShardLedger("caption", tmp_path, {"model": "b", "max_new_tokens": 8}, overwrite=True)
    forced.prepare()
    seen: list[str] = []
    forced.run(SHARDS[:2], _writer(forced, seen))
    assert seen == SHARDS[:2]
    record = json.loads((tmp_path / "_ledger" / "config.json").read_text())
    assert record["config"]["model"] == "b"


def test_stop_signal_abandons_the_shard_in_progress(tmp_path: Path) -> None:
    ledger = ShardLedger("demo", tmp_path, {})
    ledger.prepare()
    write = _writer(ledger, [])

    def process(shard: str) -> dict:
        if shard == SHARDS[1]:
            with atomic_path(ledger.output_path(shard, ".txt")) as tmp:
                tmp.write_text("half")
                os.kill(os.getpid(), signal.SIGTERM)
                ledger.check_stop()
        return write(shard)

    summary = ledger.run(SHARDS[:4], process)
    assert summary.interrupted
    assert summary.shards_ok == [SHARDS[0]]
    assert not ledger.is_done(SHARDS[1]) and not ledger.output_path(SHARDS[1], ".txt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )
    with pytest.raises(StopRequested):
        ledger.check_stop()


def test_unwritable_output_folder(tmp_path: Path) -> None:
    with pytest.raises(PermissionError, match="choose a run_dir you can write to"):
        ShardLedger("demo", Path("/sys/recaption-test"), {}).prepare()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ShardLedger("demo", tmp_path / "file", {}).prepare()


def test_rank_resolution_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "RANK",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank() == (1, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_rank() == (3, 6)  # array task 1 of 3, torchrun rank 1 of 2 inside it
    assert resolve_rank(2, 4) == (2, 4)
    with pytest.raises(ValueError, match="outside world size"):
        resolve_rank(4, 4)


def test_shard_redone_when_its_input_was_redone(tmp_path: Path) -> None:
    upstream = ShardLedger("caption", tmp_path / "captions", {"m": 1})
    upstream.prepare()
    upstream.run(SHARDS[:2], _writer(upstream, []))

    def downstream() -> ShardLedger:
        stamps = {s: marker_digest(tmp_path / "captions", s) for s in SHARDS[:2]}
        return ShardLedger("filter", tmp_path / "filtered", {"f": 1}, input_stamps=stamps)

    first = downstream()
    first.prepare()
    first.run(SHARDS[:2], _writer(first, []))
    assert downstream().done_shards() == SHARDS[:2]
    # The caption shard 00001 is redone (say, after a failed image was retried).
    upstream.marker_path(SHARDS[1]).unlink()
    upstream.run(SHARDS[:2], lambda s: {"n_ok": 3, "n_failed": 0, "n_input": 3})
    second = downstream()
    seen: list[str] = []
    second.run(SHARDS[:2], _writer(second, seen))
    assert seen == [SHARDS[1]]
    assert downstream().done_shards() == SHARDS[:2]


def test_error_after_stop_signal_abandons_rather_than_fails(tmp_path: Path) -> None:
    ledger = ShardLedger("demo", tmp_path, {})
    ledger.prepare()

    def process(shard: str) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("DataLoader worker exited unexpectedly")

    summary = ledger.run(SHARDS[:2], process)
    assert summary.interrupted and summary.shards_failed == {}
    assert ledger.failed_shards() == {} and not ledger.is_done(SHARDS[0])
