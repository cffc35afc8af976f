"""The shard ledger on its own: assignment, markers, config changes, rank resolution.

The loop that uses it (failures, stops, claims, stale outputs) is tested in test_driver.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recaption.distributed import resolve_rank
from recaption.ledger import (
    ConfigMismatchError,
    ShardLedger,
    assign,
)

SHARDS = [f"{i:05d}" for i in range(23)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 23, 40])
def test_assignment_covers_every_shard_exactly_once(world_size: int) -> None:
    owned = [s for rank in range(world_size) for s in assign(SHARDS, rank, world_size)]
    assert sorted(owned) == SHARDS
    assert len(owned) == len(set(owned))


def test_changed_config_is_refused_naming_keys(tmp_path: Path) -> None:
    first = ShardLedger("caption", tmp_path, {"model": "a", "max_new_tokens": 8})
    first.prepare()
    for shard in SHARDS[:2]:
        first.mark_done(shard, {"n_ok": 1})
    second = ShardLedger("caption", tmp_path, {"model": "b", "max_new_tokens": 8})
    with pytest.raises(ConfigMismatchError, match=r"caption\.model") as err:
        second.prepare()
    assert "max_new_tokens" not in str(err.value)
    forced = ShardLedger("caption", tmp_path, {"model": "b", "max_new_tokens": 8}, overwrite=True)
    assert forced.prepare() is True
    assert forced.done_shards() == []  # made with the old config: to be redone
    record = json.loads((tmp_path / "_ledger" / "config.json").read_text())
    assert record["config"]["model"] == "b"


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
