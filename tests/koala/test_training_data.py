"""The training stream: which shards each reader opens, bytes read, resume, uneven shards."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recaption.config import TrainConfig
from recaption.training.data import (
    TrainingSamples,
    original_prompt,
    reader_units,
    resume_positions,
)
from tests.koala.conftest import write_shard

REPO = Path(__file__).resolve().parents[2]

CFG = TrainConfig(resolution=32, seed=3, num_workers=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight merged shards of unequal sizes (9 to 16 samples)."""
    folder = tmp_path_factory.mktemp("shards")
    return [
        write_shard(folder / f"{i:05d}.tar", 9 + i, seed=i) and folder / f"{i:05d}.tar"
        for i in range(8)
    ]


def _rchar() -> int:
    """Bytes this process has read so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _epoch_of(samples: TrainingSamples, reader: int) -> list[dict]:
    """One reader's samples of epoch 0."""
    out = []
    for item in samples.reader_stream(reader):
        if item["position"][1] != 0:
            break
        out.append(item)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_process_reads_only_its_own_shards(shards: list[Path], world_size: int) -> None:
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    seen: list[str] = []
    _epoch_of(TrainingSamples(shards[:1], CFG, rank=0, world_size=1), 0)  # warm imports up
    for rank in range(world_size):
        samples = TrainingSamples(shards, CFG, rank=rank, world_size=world_size)
        opened = {u.shard.name for u in reader_units(shards, CFG.seed, 0, rank, world_size)}
        before = _rchar()
        items = _epoch_of(samples, rank)
        read = _rchar() - before
        assert {i["position"] for i in items}  # it did read
        assert read <= total / world_size + largest, (rank, read, total)
        seen += [i["key"] for i in items]
        assert not opened & {
            u.shard.name
            for r in range(world_size)
            if r != rank
            for u in reader_units(shards, CFG.seed, 0, r, world_size)
        }
    all_keys = {k for i in range(8) for k in [f"{i:03d}{j:05d}" for j in range(9 + i)]}
    assert sorted(seen) == sorted(all_keys)  # every sample once per epoch, none twice


def test_fewer_shards_than_readers_split_shards_by_sample(shards: list[Path]) -> None:
    two = shards[:2]  # 9 + 10 samples for 4 readers
    keys = []
    for rank in range(4):
        items = _epoch_of(TrainingSamples(two, CFG, rank=rank, world_size=4), rank)
        assert items, f"reader {rank} got nothing"
        keys += [i["key"] for i in items]
    assert len(keys) == len(set(keys)) == 19


def test_the_stream_is_deterministic_and_resumes_exactly(shards: list[Path]) -> None:
    def first(n: int, **kwargs) -> list[tuple[str, str]]:
        samples = TrainingSamples(shards, CFG, rank=1, world_size=2, **kwargs)
        return [(i["key"], i["caption"]) for i in itertools.islice(samples.reader_stream(1), n)]

    whole = first(40)  # past the end of the reader's first epoch
    assert whole == first(40)
    samples = TrainingSamples(shards, CFG, rank=1, world_size=2)
    items = list(itertools.islice(samples.reader_stream(1), 25))
    reader, *place = items[24]["position"]
    resumed = first(15, start={reader: tuple(place)})
    assert resumed == whole[25:40]


def test_another_reader_count_resumes_at_the_next_epoch() -> None:
    saved = {"0": [2, 1, 5], "1": [3, 0, 2]}
    assert resume_positions(saved, 2, 2) == ({0: (2, 1, 5), 1: (3, 0, 2)}, 2)
    assert resume_positions(saved, 2, 4) == ({}, 4)
    assert resume_positions({}, 0, 4) == ({}, 0)


def test_two_processes_on_uneven_shards_take_the_same_steps(make_run, tmp_path: Path) -> None:
    config, path = make_run(shards=0, train={"max_steps": 4, "checkpointing_steps": 4})
    merged = config.stage_dir("merge")
    for i, n in enumerate((10, 2, 1)):  # 13 samples, very unequal
        write_shard(merged / f"{i:05d}.tar", n, seed=i)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "recaption", "train", str(path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (config.koala_dir / "pipeline" / "model_index.json").exists()
    assert (config.koala_dir / "checkpoints" / "checkpoint-00000004").is_dir()


def test_the_alt_text_baseline_never_trains_on_a_synthetic_caption() -> None:
    """At synthetic_caption_ratio 0 a sample without alt-text trains on the empty prompt; in a
    mix it falls back to its synthetic caption; an alt-text is always used as it is."""
    baseline = TrainConfig(synthetic_caption_ratio=0.0)
    mix = TrainConfig(synthetic_caption_ratio=0.5)
    assert original_prompt("", "a red circle", baseline) == ""
    assert original_prompt("", "a red circle", mix) == "a red circle"
    assert original_prompt("IMG_0001.jpg", "a red circle", baseline) == "IMG_0001.jpg"
    assert original_prompt("IMG_0001.jpg", "a red circle", mix) == "IMG_0001.jpg"
