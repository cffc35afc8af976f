"""The stage driver with a toy stage: assignment, resume, failures, stops, stale and broken
outputs, claims, config changes, exit statuses, and adding a stage with one registry line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from recaption.claims import ClaimSet
from recaption.config import RunConfig
from recaption.driver import (
    ShardedStage,
    SingleOutputStage,
    StageContext,
    StartupError,
    is_startup_error,
    run_stage,
)
from recaption.ledger import ConfigMismatchError, StageSummary, atomic_path, write_json_atomic

SHARDS = [f"{i:05d}" for i in range(7)]


class ToyStage(ShardedStage):
    """Copies ``upstream/{shard}.txt`` to ``toy/{shard}.txt`` upper-cased."""

    name = "toy"
    input_stage = "upstream"
    output_suffixes = (".txt",)
    calls: list[str]
    fail: set[str]
    stop_at: str | None = None
    settings: dict[str, Any]

    def __init__(self, ctx: StageContext, **kwargs: Any) -> None:
        super().__init__(ctx)
        self.calls, self.fail, self.settings = [], set(), {"upper": True}
        self.finished: list[list[str]] = []
        self.__dict__.update(kwargs)

    @property
    def input_dir(self) -> Path:
        return self.config.run_dir / "upstream"

    @property
    def output_dir(self) -> Path:
        return self.config.run_dir / "toy"

    def stage_config(self) -> dict[str, Any]:
        return dict(self.settings)

    def process(self, shard: str) -> dict[str, Any]:
        self.calls.append(shard)
        text = (self.input_dir / f"{shard}.txt").read_text()
        with atomic_path(self.output_dir / f"{shard}.txt") as tmp:
            tmp.write_text(text.upper())
            if shard in self.fail:
                raise OSError(f"shard {shard} is truncated")
            if shard == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
                self.check_stop()
        return {"n_input": 1, "n_ok": 1, "n_failed": 0}

    def finish(self, summary: StageSummary) -> None:
        self.finished.append(list(self.shards))


def _upstream(run_dir: Path, shards: list[str] = SHARDS) -> None:
    folder = run_dir / "upstream"
    folder.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        (folder / f"{shard}.txt").write_text(f"shard {shard}")
        write_json_atomic(folder / f"{shard}_stats.json", {"n_ok": 1})


def _toy(tmp_path: Path, rank: int = 0, world_size: int = 1, **kwargs: Any) -> ToyStage:
    config = RunConfig(run_dir=tmp_path)
    return ToyStage(StageContext(config, rank, world_size), **kwargs)


def test_ranks_together_do_every_shard_once_and_finish_once_all_are_done(tmp_path: Path) -> None:
    _upstream(tmp_path)
    stages = [_toy(tmp_path, rank, 3) for rank in range(3)]
    summaries = [run_stage(s) for s in stages]
    assert sorted(s for stage in stages for s in stage.calls) == SHARDS
    assert [bool(s.finished) for s in stages] == [False, False, True]  # the last one
    again = _toy(tmp_path)
    summary = run_stage(again)
    assert again.calls == [] and summary.shards_done_before == len(SHARDS)
    assert all(s.ok for s in summaries)


def test_shard_without_marker_is_redone_and_dead_temporaries_go(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    out = tmp_path / "toy"
    (out / f"{SHARDS[1]}_stats.json").unlink()  # died after the output, before the marker
    (out / f".{SHARDS[1]}.txt.tmp-999999").write_text("half")
    stage = _toy(tmp_path)
    run_stage(stage)
    assert stage.calls == [SHARDS[1]]
    assert not list(out.glob(".*tmp-*"))


def test_failed_shard_is_recorded_and_the_others_go_on(tmp_path: Path) -> None:
    _upstream(tmp_path)
    stage = _toy(tmp_path, fail={SHARDS[1]})
    summary = run_stage(stage)
    assert summary.shards_ok == [s for s in SHARDS if s != SHARDS[1]]
    assert "truncated" in summary.shards_failed[SHARDS[1]] and not summary.ok
    assert "truncated" in stage.ledger.failed_shards()[SHARDS[1]]
    assert not (tmp_path / "toy" / f"{SHARDS[1]}.txt").exists()
    assert stage.finished == []  # the run is not complete: no run-wide outputs
    fixed = _toy(tmp_path)
    summary = run_stage(fixed)
    assert fixed.calls == [SHARDS[1]] and fixed.ledger.failed_shards() == {}
    assert fixed.finished == [SHARDS]


def test_changed_config_is_refused_naming_the_key_and_overwrite_redoes(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    with pytest.raises(ConfigMismatchError, match=r"toy\.upper") as err:
        run_stage(_toy(tmp_path, settings={"upper": False}))
    assert is_startup_error(err.value)  # exit status 2: nothing was processed
    forced = _toy(tmp_path, settings={"upper": False})
    forced.ctx.overwrite = True
    run_stage(forced)
    assert forced.calls == SHARDS


def test_garbled_recorded_config_is_refused_not_taken_as_new(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    (tmp_path / "toy" / "_ledger" / "config.json").write_text("{not json")
    with pytest.raises(ConfigMismatchError, match=r"config\.json is unreadable"):
        run_stage(_toy(tmp_path, settings={"upper": False}))


def test_stop_signal_abandons_the_shard_and_restores_the_handler(tmp_path: Path) -> None:
    _upstream(tmp_path)

    def mine(_signum: int, _frame: Any) -> None:
        raise AssertionError("the driver should have caught SIGTERM")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        stage = _toy(tmp_path, stop_at=SHARDS[1])
        summary = run_stage(stage)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert summary.interrupted and summary.shards_ok == [SHARDS[0]]
    assert not stage.ledger.is_done(SHARDS[1])
    assert not list((tmp_path / "toy").glob(f"*{SHARDS[1]}.txt*"))


def test_error_after_a_stop_signal_abandons_rather_than_fails(tmp_path: Path) -> None:
    _upstream(tmp_path)

    class Dies(ToyStage):
        def process(self, shard: str) -> dict[str, Any]:
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("DataLoader worker exited unexpectedly")

    stage = Dies(StageContext(RunConfig(run_dir=tmp_path)))
    summary = run_stage(stage)
    assert summary.interrupted and summary.shards_failed == {}
    assert stage.ledger.failed_shards() == {}


def test_shard_redone_when_its_input_was_redone(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    write_json_atomic(tmp_path / "upstream" / f"{SHARDS[2]}_stats.json", {"n_ok": 1, "again": 1})
    stage = _toy(tmp_path)
    run_stage(stage)
    assert stage.calls == [SHARDS[2]]


def test_outputs_of_shards_gone_upstream_are_removed(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    for suffix in (".txt", "_stats.json"):
        (tmp_path / "upstream" / f"{SHARDS[-1]}{suffix}").unlink()
    stage = _toy(tmp_path)
    run_stage(stage)
    out = tmp_path / "toy"
    assert sorted(p.stem for p in out.glob("*.txt")) == SHARDS[:-1]
    assert not (out / f"{SHARDS[-1]}_stats.json").exists()
    assert stage.finished == [SHARDS[:-1]]


def test_done_shard_with_unreadable_output_is_redone(tmp_path: Path) -> None:
    _upstream(tmp_path)
    run_stage(_toy(tmp_path))
    (tmp_path / "toy" / f"{SHARDS[3]}.txt").unlink()
    stage = _toy(tmp_path)
    run_stage(stage)
    assert stage.calls == [SHARDS[3]]


def test_a_shard_claimed_by_a_live_worker_is_left_and_a_dead_ones_claim_taken(
    tmp_path: Path,
) -> None:
    _upstream(tmp_path)
    records = tmp_path / "toy" / "_ledger"
    other = ClaimSet(records)  # another live worker (this process) holds shard 00002
    assert other.acquire(SHARDS[2])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    claim = {"host": other.host, "pid": int(dead.stdout), "token": "x", "time": 0}
    (records / f"{SHARDS[4]}.claim").write_text(json.dumps(claim))
    stage = _toy(tmp_path)
    summary = run_stage(stage)
    assert SHARDS[2] not in stage.calls and SHARDS[4] in stage.calls
    assert any("left to" in m for m in summary.messages)
    other.release_all()
    assert not (records / f"{SHARDS[4]}.claim").exists()


class ToyOutput(SingleOutputStage):
    name = "toy_once"
    output_name = "result"

    @property
    def output_dir(self) -> Path:
        return self.config.run_dir / "once"

    def run_once(self, summary: StageSummary) -> dict[str, Any]:
        (self.output_dir / "result.txt").write_text("done")
        return {"n_ok": 1}


def test_single_output_stage_runs_once_and_refuses_a_second_writer(tmp_path: Path) -> None:
    config = RunConfig(run_dir=tmp_path)
    holder = ClaimSet(tmp_path / "once" / "_ledger")
    assert holder.acquire("toy_once")
    with pytest.raises(StartupError, match="being written by another toy_once process"):
        run_stage(ToyOutput(StageContext(config)))
    holder.release_all()
    assert run_stage(ToyOutput(StageContext(config))).shards_ok == ["result"]
    again = run_stage(ToyOutput(StageContext(config)))
    assert again.shards_done_before == 1 and again.shards_ok == []


TOY_MODULE = textwrap.dedent(
    """
    from recaption.driver import ShardedStage
    from recaption.ledger import atomic_path


    class ShoutStage(ShardedStage):
        name = "shout"
        input_stage = "download"
        output_suffixes = (".txt",)

        @property
        def output_dir(self):
            return self.config.run_dir / "shout"

        def input_stamp(self, shard):
            return None

        def check(self):
            if (self.config.run_dir / "refuse").exists():
                raise ValueError("shout: refused at start-up")

        def process(self, shard):
            if (self.config.run_dir / "explode").exists():
                raise RuntimeError("boom")
            with atomic_path(self.output_dir / f"{shard}.txt") as tmp:
                tmp.write_text(shard.upper())
            return {"n_ok": 1}

        def finish(self, summary):
            if (self.config.run_dir / "explode-late").exists():
                raise RuntimeError("late boom")
    """
)


def test_a_new_stage_is_one_module_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recaption.cli import main
    from recaption.stages import STAGES

    (tmp_path / "shout_stage.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(STAGES, "shout", "shout_stage:ShoutStage")  # the one line
    run_dir = tmp_path / "run"
    images = run_dir / "images"
    images.mkdir(parents=True)
    for shard in SHARDS[:2]:
        (images / f"{shard}_stats.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run_dir}\n")

    assert main(["shout", str(config)]) == 0
    assert sorted(p.name for p in (run_dir / "shout").glob("*.txt")) == [
        f"{s}.txt" for s in SHARDS[:2]
    ]
    # Exit 2 only for start-up refusals; a failure after the start is 1.
    (run_dir / "refuse").touch()
    assert main(["shout", str(config), "--overwrite"]) == 2
    (run_dir / "refuse").unlink()
    (run_dir / "explode-late").touch()
    assert main(["shout", str(config)]) == 1


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs (root only): a real file system that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_stage_with_the_path_and_marks_nothing_done(
    small_disk: Path,
) -> None:
    class Big(ToyStage):
        def process(self, shard: str) -> dict[str, Any]:
            self.calls.append(shard)
            with atomic_path(self.output_dir / f"{shard}.txt") as tmp:
                tmp.write_bytes(os.urandom(100 * 1024))
            return {"n_ok": 1}

    _upstream(small_disk)
    stage = Big(StageContext(RunConfig(run_dir=small_disk)))
    summary = run_stage(stage)
    assert len(stage.calls) < len(SHARDS)  # stopped at the first full write, not 7 failures
    (failed, error), *_ = summary.shards_failed.items()
    assert "disk full" in error and str(small_disk / "toy") in error
    assert not stage.ledger.is_done(failed)
    assert not list((small_disk / "toy").glob(".*tmp-*"))


SLOW_MODULE = textwrap.dedent(
    """
    import os, time
    from recaption.driver import ShardedStage
    from recaption.ledger import atomic_path


    class SlowStage(ShardedStage):
        name = "slow"
        input_stage = "download"
        output_suffixes = (".txt",)

        @property
        def output_dir(self):
            return self.config.run_dir / "slow"

        def input_stamp(self, shard):
            return None

        def process(self, shard):
            with open(self.config.run_dir / "processed.log", "a") as log:
                log.write(f"{shard} {os.getpid()}\\n")
            time.sleep(0.5)
            with atomic_path(self.output_dir / f"{shard}.txt") as tmp:
                tmp.write_text(shard)
            return {"n_ok": 1}
    """
)


def test_two_processes_on_one_run_share_the_shards_never_doing_one_twice(tmp_path: Path) -> None:
    (tmp_path / "slow_stage.py").write_text(SLOW_MODULE)
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    shards = [f"{i:05d}" for i in range(10)]
    for shard in shards:
        (run_dir / "images" / f"{shard}_stats.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run_dir}\n")
    program = (
        "import sys; from recaption.cli import main; from recaption.stages import STAGES; "
        "STAGES['slow'] = 'slow_stage:SlowStage'; sys.exit(main(['slow', sys.argv[1]]))"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    workers = [
        subprocess.Popen([sys.executable, "-c", program, str(config)], env=env) for _ in range(2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    lines = (run_dir / "processed.log").read_text().split()
    processed = lines[0::2]
    assert sorted(processed) == shards  # every shard once, none twice
    assert len(set(lines[1::2])) == 2  # and both workers took part
